"""Scoring protocol: crop offsets; cached/batched trial scores equal the literal 10x10 mean of eq. 9-12;
a cache too big for its memory budget is spilled and scored block by block with the same scores."""
import os
import subprocess
import sys

import kaldiio
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from capsv.data import ArkReader
from capsv.losses import NPSoftmaxLoss
from capsv.models.pooling import cap_grid_direct, cap_pair_direct
from capsv.models.speaker_net import SpeakerNet
from capsv.scoring import build_cache, crop_starts, score_trials, utterance_cache, utterance_crops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERI_TEST = os.path.join(os.path.dirname(ROOT), "shared", "data", "voxceleb1", "veri_test.txt")


def test_crop_starts_even_and_cover_the_utterance():
    s = crop_starts(800, 350, 10)
    assert s[0] == 0 and s[-1] == 450 and len(s) == 10 and np.all(np.diff(s) > 0)
    assert list(crop_starts(200, 350, 10)) == [0] * 10       # short: repeated, every crop the same


def small_net(pooling, dtype=torch.float64, embed_dim=6, proj=5, channels=(4, 4, 8, 8)):
    torch.manual_seed(0)
    net = SpeakerNet(n_mels=40, channels=list(channels), layers=[1, 1, 1, 1], pooling=pooling,
                     embed_dim=embed_dim, cap_proj_dim=proj, cap_tau=0.05).to(dtype).eval()
    with torch.no_grad():    # non-trivial BN statistics and affine for the head
        net.head[0].running_mean.uniform_(-0.5, 0.5)
        net.head[0].running_var.uniform_(0.5, 2.0)
        net.head[0].weight.uniform_(0.5, 1.5)
        net.head[0].bias.uniform_(-0.3, 0.3)
    return net


def literal_score(net, fa, fb):
    """Mean over all crop pairs of the cosine of the pair's embeddings, one pair at a time."""
    cos = []
    for a in fa:
        for b in fb:
            if net.pair_dependent:
                ea, eb = cap_pair_direct(net.pool, a, b)
            else:
                ea, eb = net.pool.single(a), net.pool.single(b)
            ea, eb = net.head(ea[None])[0], net.head(eb[None])[0]
            cos.append(F.cosine_similarity(ea, eb, dim=0))
    return torch.stack(cos).mean().item()


def direct_scores(net, frames, trials):
    """Eq. 9-12 batched over each trial's crop pairs (cap_grid_direct), then the full head and cosine."""
    out = []
    for e, t, *_ in trials:
        ea, eb = cap_grid_direct(net.pool, frames[e], frames[t])
        za, zb = net.head(ea.reshape(-1, ea.shape[-1])), net.head(eb.reshape(-1, eb.shape[-1]))
        out.append(F.cosine_similarity(za, zb, dim=-1).mean().item())
    return np.array(out)


TRIALS = [("a", "b", True), ("a", "c", False), ("d", "e", True), ("e", "a", False), ("b", "b", True)]


def test_batched_scores_equal_literal_protocol():
    g = torch.Generator().manual_seed(1)
    frames = {u: torch.randn(4, 9, 8, dtype=torch.float64, generator=g) for u in "abcde"}
    for pooling in ["tap", "sap", "cap"]:
        net = small_net(pooling)
        with torch.no_grad():
            got = score_trials(net, frames, TRIALS, trial_batch=2)
            want = [literal_score(net, frames[e], frames[t]) for e, t, _ in TRIALS]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def test_embed_dim_below_pooled_dim():
    """The fc's triangular factor R is min(E, C) x C; with E < C the cosines must still be the fc's."""
    g = torch.Generator().manual_seed(2)
    frames = {u: torch.randn(3, 7, 8, dtype=torch.float64, generator=g).abs() for u in "abcde"}
    net = small_net("cap", embed_dim=3)
    with torch.no_grad():
        got = score_trials(net, frames, TRIALS, trial_batch=3)
        np.testing.assert_allclose(got, direct_scores(net, frames, TRIALS), rtol=0, atol=1e-10)


def test_float32_paper_dims_match_float64_direct_form():
    """The recipe's case: float32 trunk outputs [10, 88, 128] (non-negative, as after the trunk's ReLU),
    D = 128, E = 512, tau = 0.05. Logits reach T/tau = 1760, so float32 rounding is the only error."""
    torch.manual_seed(3)
    net = SpeakerNet(40, [16, 32, 64, 128], [3, 4, 6, 3], "cap", 512, 128, 0.05).eval()
    with torch.no_grad():
        net.head[0].running_mean.uniform_(0.0, 1.0)
        net.head[0].running_var.uniform_(0.1, 1.0)
    g = torch.Generator().manual_seed(4)
    frames = {u: torch.randn(10, 88, 128, generator=g).abs() for u in "abcde"}
    with torch.no_grad():
        got = score_trials(net, frames, TRIALS, trial_batch=2)
        want = direct_scores(net.double(), {u: x.double() for u, x in frames.items()}, TRIALS)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.ptp(want) > 1e-3          # the trials differ, so equality is not trivial


def write_ark(d, feats):
    os.makedirs(d, exist_ok=True)
    with kaldiio.WriteHelper(f"ark,scp:{d}/feats.ark,{d}/feats.scp") as w:
        for k in sorted(feats):
            w(k, feats[k])
    return dict(line.split() for line in open(f"{d}/feats.scp"))


def test_trained_small_model_through_the_ark_matches_direct_form(tmp_path):
    """A small network after a few Adam steps of the recipe's loss (so BN has learnt statistics), scored
    from an ark as stage 3 does: crops, trunk, cache, trials; against eq. 9-12 in float64 on the same crops."""
    torch.manual_seed(5)
    net = SpeakerNet(40, [8, 8, 16, 32], [1, 1, 1, 1], "cap", 64, 32, 0.05)
    loss_fn = NPSoftmaxLoss(64, 4)
    opt = torch.optim.Adam(list(net.parameters()) + list(loss_fn.parameters()), lr=0.01)
    for _ in range(3):
        x = torch.randn(4, 2, 80, 40) + torch.arange(4.0)[:, None, None, None]
        frames = net.frames(x.view(8, 80, 40)).view(4, 2, 20, -1)
        loss, _ = loss_fn(net, frames, torch.arange(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    rng = np.random.default_rng(6)
    lengths = {"a": 500, "b": 420, "c": 120, "d": 380, "e": 390}       # c is shorter than a crop
    scp = write_ark(tmp_path, {u: (rng.standard_normal((n, 40)) + i).astype(np.float32)
                               for i, (u, n) in enumerate(lengths.items())})
    ecfg = {"num_crops": 4, "crop_frames": 350}
    reader = ArkReader(scp)
    with torch.no_grad():
        cache = utterance_cache(net, reader, lengths, sorted(lengths), ecfg, torch.device("cpu"), utts_per_batch=2)
        got = score_trials(net, cache, TRIALS, trial_batch=2)
        net64 = net.double()
        frames = {u: net64.frames(torch.from_numpy(utterance_crops(reader, u, n, 350, 4)).double())
                  for u, n in lengths.items()}
        want = direct_scores(net64, frames, TRIALS)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def random_batches(utts, shape, per_batch, seed, dtype=torch.float32):
    """(utts, trunk outputs) batches of non-negative random frames: the same values for the same seed."""
    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(utts), per_batch):
        chunk = utts[i:i + per_batch]
        yield chunk, torch.rand(len(chunk), *shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("pooling", ["cap", "tap"])
def test_spilled_cache_scores_equal_in_memory(tmp_path, pooling):
    net = small_net(pooling, dtype=torch.float32, embed_dim=12, proj=8)
    utts = [f"u{i:03d}" for i in range(60)]
    rng = np.random.default_rng(7)
    trials = [(utts[a], utts[b], True) for a, b in rng.integers(0, len(utts), (400, 2))]
    trials += [(utts[3], utts[3], True), (utts[59], utts[0], False)]      # same utterance; first and last
    cpu = torch.device("cpu")
    with torch.no_grad():
        mem = build_cache(net, utts, random_batches(utts, (3, 6, 8), 7, seed=8), cpu, mem_bytes=float("inf"))
        small = mem.nbytes // 6          # blocks of 60 / 12 = 5 utterances
        spill = build_cache(net, utts, random_batches(utts, (3, 6, 8), 7, seed=8), cpu, mem_bytes=small,
                            spill_dir=tmp_path)
        assert mem.in_memory and not spill.in_memory and os.listdir(tmp_path) == [os.path.basename(spill.path)]
        want = score_trials(net, mem, trials, trial_batch=16)
        got = score_trials(net, spill, trials, trial_batch=16)
    np.testing.assert_array_equal(got, want)
    assert 0 < spill.peak_bytes <= small
    spill.close()
    assert os.listdir(tmp_path) == []


def vox1_o_trials():
    """Vox1-O as (enroll, test) pairs: the real veri_test.txt when it is there, else as many random pairs."""
    if os.path.exists(VERI_TEST):
        pairs = [line.split()[1:] for line in open(VERI_TEST)]
    else:
        rng = np.random.default_rng(9)
        pairs = [(f"u{a:04d}", f"u{b:04d}") for a, b in rng.integers(0, 4715, (37720, 2))]
    return pairs


BOUNDED = r"""
import resource, sys, numpy as np, torch
sys.path.insert(0, {tests!r})
from test_scoring import small_net, random_batches, vox1_o_trials
from capsv.scoring import build_cache, score_trials
torch.set_num_threads(1)
pairs = vox1_o_trials()
utts = sorted({{u for p in pairs for u in p}})
trials = [(e, t, True) for e, t in pairs]
net = small_net("cap", dtype=torch.float32, embed_dim=32, proj=64, channels=(64, 64, 64, 64))
budget = {budget}
with torch.no_grad():    # warm-up: libraries' one-time allocations are not the cache's
    warm = build_cache(net, utts[:8], random_batches(utts[:8], (4, 22, 64), 16, seed=10), torch.device("cpu"))
    score_trials(net, warm, [(utts[0], utts[1], True)] * 64, trial_batch=64)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with torch.no_grad():
    cache = build_cache(net, utts, random_batches(utts, (4, 22, 64), 16, seed=10), torch.device("cpu"),
                        mem_bytes=budget, spill_dir={tmp!r})
    scores = score_trials(net, cache, trials, trial_batch=64)
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(len(utts), len(trials), cache.nbytes, cache.in_memory, cache.peak_bytes, rss1 - rss0, np.isfinite(scores).all())
"""


def test_vox1_o_sized_scoring_runs_in_bounded_memory(tmp_path):
    """37,720 trials over 4,715 utterances with a cache budget a tenth of the cache: the process grows by
    far less than the cache (measured as peak RSS in a fresh process). Random trunk outputs of a smaller
    shape than the recipe's keep it fast; the counts and, when present, the trial graph are Vox1-O's."""
    budget = 24 << 20
    code = BOUNDED.format(tests=os.path.join(ROOT, "tests"), budget=budget, tmp=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    n_utts, n_trials, nbytes, in_memory, peak, growth, finite = out.stdout.split()
    assert (int(n_utts), int(n_trials)) == (4715, 37720) and finite == "True"
    assert in_memory == "False" and int(peak) <= budget
    # the cache is ~220 MB; holding it (or a per-trial copy) would grow the process by at least that
    assert int(nbytes) > 200 << 20
    assert int(growth) < int(nbytes) / 3, (int(growth) >> 20, int(nbytes) >> 20)
