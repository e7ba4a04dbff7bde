"""The recipe's benchmarks, each measuring its alternatives side by side in one run.

    python -m capsv.bin.bench [--quick] [--only NAME ...] [--repeats N] [--out FILE] [--device auto]

  pooling     pooling head fwd+bwd (TAP, SAP, CAP fast, CAP direct eq. 9-12) vs the trunk's own fwd+bwd, time
              and peak memory, 200 speakers x 3 utterances of 2 s (each in its own process, for its peak RSS)
  train_step  full training step (trunk + pooling + NP/softmax loss fwd+bwd + Adam), CAP / TAP, at 50x2, 200x3
  scoring     CAP scoring ms/trial from trunk outputs: the cached fast path vs the direct form vs the previous
              scorer (the training grid, embed_grid, over each trial's 10x10 crops), vs a Gram-cached variant
  embedding   test-utterance embedding (ark -> crops -> trunk -> cache row) ms/utt, batched vs one at a time
  metrics     EER + minDCF (p=0.05) + minDCF (p=0.01) on 10^6 trials
  fbank       stage 1 throughput, audio reading included, x real time per core (one thread)
  loader      training crops/s per loader worker from an ark in the page cache, and the data-wait share of
              training steps with one worker (the mini config's)
  scale       (only with --only scale) the training data path at 10 k, 100 k and 1,092,009 utterances (VoxCeleb2
              dev: 5,994 speakers), on a fake data dir whose feats.scp points into a few real arks: read_data_dir
              time and memory, the sampler's epoch time and share of utterances used, each of 8 loader workers'
              resident and private memory after an epoch's batches, and stage 2's start-up to its first batch

Every figure is the fastest of --repeats runs (timings, not averages: other work only slows a run down).
Prints a Markdown table (and writes it to --out). --quick shrinks every size so the suite runs in about a
minute on a 2-core CPU; its figures are for checking the suite, the targets hold for the full sizes.
"""
import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from unittest import mock

import kaldiio
import numpy as np
import soundfile
import torch
import torch.nn.functional as F

from capsv import scoring
from capsv.device import pick_device, resolve_precision
from capsv.config import load_config
from capsv.data import ArkReader, EpisodeDataset, EpisodicBatches
from capsv.features import compute_fbank, load_audio, read_fbank_conf
from capsv.losses import NPSoftmaxLoss
from capsv.metrics import eer_from_rates, error_rates, min_dcf_from_rates
from capsv.models.pooling import cap_grid_direct
from capsv.models.speaker_net import SpeakerNet
from capsv.scoring import _CapPairs, cache_from_frames, partner_independent, score_trials, utterance_cache, \
    utterance_crops
from capsv.utils import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
NAMES = ["pooling", "train_step", "scoring", "embedding", "metrics", "fbank", "loader"]   # the default suite
EXTRA = ["scale"]   # minutes long: by name only


def paper_config(pooling="cap"):
    cfg = load_config(os.path.join(ROOT, "conf", "cap.yaml"))
    cfg["model"]["pooling"] = pooling
    return cfg


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fastest(fn, repeats, device):
    """Seconds of the fastest of `repeats` calls."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def row(bench, what, value, vs="", target=""):
    return {"bench": bench, "what": what, "value": value, "vs": vs, "target": target}


def verdict(value, limit, quick, unit=""):
    if quick:
        return f"≤ {limit:g}{unit} at full size"
    return f"≤ {limit:g}{unit}: {'met' if value <= limit else 'NOT met'}"


# (a) ----------------------------------------------------------------------------------------------------

class DirectCAPNet(SpeakerNet):
    """SpeakerNet whose CAP grid is eq. 9-12 batched over all query/support pairs (the tensor the fast
    form never builds)."""

    def embed_grid(self, a, b):
        return self.embed_pairs(*cap_grid_direct(self.pool, a, b))


POOLING_ROWS = [("trunk (yardstick)", "trunk"), ("TAP", "tap"), ("SAP", "sap"), ("CAP fast (recipe)", "cap"),
                ("CAP direct eq. 9-12", "direct")]


def pooling_child(kind, n, m, frames_in, repeats, device):
    """One row of (a) in this process: prints {seconds, rss0, peak} as JSON."""
    torch.manual_seed(0)
    cfg = paper_config("cap" if kind in ("trunk", "direct") else kind)
    net = (DirectCAPNet if kind == "direct" else SpeakerNet).from_config(cfg).to(device)
    if kind == "trunk":
        feats = torch.randn(n * m, frames_in, cfg["model"]["n_mels"], device=device)

        def step():
            net.zero_grad(set_to_none=True)
            net.frames(feats).sum().backward()
    else:
        with torch.no_grad():
            t = net.frames(torch.zeros(1, frames_in, cfg["model"]["n_mels"], device=device)).shape[1]
        frames = torch.randn(n, m, t, net.trunk.out_dim, device=device, requires_grad=True)
        loss_fn = NPSoftmaxLoss(cfg["model"]["embed_dim"], n).to(device)
        speakers = torch.arange(n, device=device)

        def step():
            net.zero_grad(set_to_none=True)
            frames.grad = None
            loss, _ = loss_fn(net, frames, speakers)
            loss.backward()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        rss0 = torch.cuda.memory_allocated()
    else:
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()          # warm-up (its peak counts): one-time allocations are not the step's time
    secs = fastest(step, repeats, device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": secs, "rss0": rss0, "peak": peak}))


def bench_pooling(args, device):
    n, m, t = (6, 3, 100) if args.quick else (200, 3, 200)
    mem = "GPU memory allocated" if device.type == "cuda" else "peak RSS"
    out, base = [], None
    for label, kind in POOLING_ROWS:
        cmd = [sys.executable, "-m", "capsv.bin.bench", "--child", kind, "--device", str(device),
               "--repeats", str(args.repeats), "--size", f"{n},{m},{t}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            tail = (res.stderr.strip().splitlines() or ["?"])[-1]
            out.append(row("pooling", f"{label}, {n}x{m} x {t} frames", "failed", tail))
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        base = base or r["seconds"]
        out.append(row("pooling", f"{label} fwd+bwd, {n}x{m} x {t} frames", f"{r['seconds']:.3f} s",
                       f"{r['seconds'] / base:.3f} x trunk; {mem} {r['peak'] / 2**30:.2f} GB "
                       f"(+{(r['peak'] - r['rss0']) / 2**30:.2f} over set-up)"))
    return out


# (b) ----------------------------------------------------------------------------------------------------

def bench_train_step(args, device):
    sizes = [(2, 2, 1.05), (3, 3, 1.15)] if args.quick else [(50, 2, 1.05), (200, 3, 1.15)]
    crop = 60 if args.quick else None
    precision = resolve_precision("auto", device)   # the training default, as capsv.bin.train resolves it
    out = []
    for n, m, limit in sizes:
        steps = {}
        for pooling in ("tap", "cap"):
            torch.manual_seed(0)
            cfg = paper_config(pooling)
            net = SpeakerNet.from_config(cfg).to(device)
            loss_fn = NPSoftmaxLoss(cfg["model"]["embed_dim"], n).to(device)
            opt = torch.optim.Adam(list(net.parameters()) + list(loss_fn.parameters()), lr=cfg["train"]["lr"])
            feats = torch.randn(n * m, crop or cfg["train"]["crop_frames"], cfg["model"]["n_mels"], device=device)
            speakers = torch.arange(n, device=device)

            def step(net=net, loss_fn=loss_fn, opt=opt, feats=feats, speakers=speakers):
                with precision.autocast():   # as capsv.bin.train
                    frames = net.frames(feats)
                loss, _ = loss_fn(net, frames.float().view(n, m, *frames.shape[1:]), speakers)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            step()                       # warm-up: first-call allocations
            steps[pooling] = step
        best = {p: float("inf") for p in steps}
        for _ in range(args.repeats):    # interleaved, so drift in machine load hits both alike
            for p, step in steps.items():
                best[p] = min(best[p], fastest(step, 1, device))
        ratio = best["cap"] / best["tap"]
        out.append(row("train_step", f"CAP / TAP full step, {n}x{m} x {feats.shape[1]} frames", f"{ratio:.3f}",
                       f"CAP {best['cap']:.2f} s, TAP {best['tap']:.2f} s", verdict(ratio, limit, args.quick)))
    return out


# (c) ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def previous_scores(net, frames, trials, trial_batch):
    """The scorer this recipe had before the cache: the training grid over each batch of trials."""
    scores = []
    for i in range(0, len(trials), trial_batch):
        chunk = trials[i:i + trial_batch]
        ea, eb = net.embed_grid(torch.stack([frames[e] for e, *_ in chunk]), torch.stack([frames[t] for _, t, *_ in chunk]))
        scores.append((F.normalize(ea, dim=-1) * F.normalize(eb, dim=-1)).sum(-1).mean(dim=(-1, -2)))
    return torch.cat(scores).double().cpu().numpy()


@torch.no_grad()
def direct_scores(net, frames, trials):
    """Eq. 9-12 over each trial's crop pairs at once (cap_grid_direct), the full head, the cosines."""
    out = []
    for e, t, *_ in trials:
        ea, eb = cap_grid_direct(net.pool, frames[e], frames[t])
        za, zb = net.head(ea.reshape(-1, ea.shape[-1])), net.head(eb.reshape(-1, eb.shape[-1]))
        out.append(F.cosine_similarity(za, zb, dim=-1).mean().item())
    return np.array(out)


class GramCapPairs(_CapPairs):
    """The fast path with each crop's Gram matrix G = ŜᵀŜ cached and gathered per trial, G m taken directly:
    D^2 products per crop pair instead of 2 T D, but 64 KB more per crop to hold and gather."""

    def __call__(self, fa, ia, fb, ib):
        a = {k: self.gather("a" + k, v, ia) for k, v in fa.items()}
        b = {k: self.gather("b" + k, v, ib) for k, v in fb.items()}
        za = self.side_g(a, b["g"])
        zb = self.side_g(b, a["g"]).transpose(1, 2)
        num = (za * zb).sum(-1)
        return (num / (za.norm(dim=-1) * zb.norm(dim=-1))).mean(dim=(1, 2))

    def side_g(self, x, gy):
        b, kx, d, tx = x["st"].shape
        ky = gy.shape[1]
        v = (gy.reshape(b, ky * d, d) @ x["m"].transpose(1, 2)).view(b, ky, d, kx)
        v = v.permute(0, 3, 1, 2).reshape(b * kx, ky, d)
        w = torch.softmax(torch.bmm(v, x["st"].reshape(b * kx, d, tx)), dim=-1)
        h = torch.baddbmm(x["c"].reshape(b * kx, 1, -1), w, x["u"].reshape(b * kx, tx, -1))
        return (torch.relu_(h) @ self.r.T).view(b, kx, ky, -1)


@torch.no_grad()
def bench_scoring(args, device):
    n_utts, n_fast, n_slow = (24, 96, 4) if args.quick else (200, 2048, 32)
    torch.manual_seed(0)
    net = SpeakerNet.from_config(paper_config("cap")).to(device).eval()
    net.head[0].running_mean.uniform_(0.0, 1.0)     # BN statistics of a trained model, roughly
    net.head[0].running_var.uniform_(0.1, 1.0)
    ecfg = paper_config()["eval"]
    t_out = -(-ecfg["crop_frames"] // 4)
    g = torch.Generator().manual_seed(1)
    frames = {f"u{i:04d}": torch.rand(ecfg["num_crops"], t_out, net.trunk.out_dim, generator=g).to(device)
              for i in range(n_utts)}
    rng = np.random.default_rng(2)
    trials = [(f"u{a:04d}", f"u{b:04d}", True) for a, b in rng.integers(0, n_utts, (n_fast, 2))]
    batch = ecfg["trial_batch"]                 # score_trials takes the config's; it caps it on a CPU

    t0 = time.perf_counter()
    cache = cache_from_frames(net, frames)
    sync(device)
    t_cache = (time.perf_counter() - t0) / n_utts
    score_trials(net, cache, trials[:64], batch)          # warm-up
    fast = fastest(lambda: score_trials(net, cache, trials, batch), args.repeats, device) / n_fast
    # the Gram variant: the same cache plus G, through the same batching and threads
    cache.data["g"] = cache.data["st"] @ cache.data["st"].transpose(-1, -2)
    with mock.patch.object(scoring, "_CapPairs", GramCapPairs):
        t_gram = fastest(lambda: score_trials(net, cache, trials, batch), args.repeats, device) / n_fast
    del cache.data["g"]
    few = trials[:n_slow]
    prev = fastest(lambda: previous_scores(net, frames, few, 32), args.repeats, device) / n_slow
    direct = fastest(lambda: direct_scores(net, frames, few), 1, device) / n_slow
    want = direct_scores(copy.deepcopy(net).double(), {u: x.double() for u, x in frames.items()}, few)
    err = np.abs(score_trials(net, cache, few, batch) - want).max()
    per = f"{ecfg['num_crops']}x{ecfg['num_crops']} crops x {t_out} frames"
    return [
        row("scoring", f"CAP fast (cache), ms/trial, {per}", f"{fast * 1e3:.3f}",
            f"{prev / fast:.1f}x faster than previous, {direct / fast:.1f}x than direct; max |fast - direct float64| "
            f"{err:.1e}", verdict(fast * 1e3, 0.6, args.quick, " ms") + "; |diff| ≤ 1e-5"),
        row("scoring", "CAP cache row, ms/utterance (Ŝ, m, U, c)", f"{t_cache * 1e3:.2f}",
            f"{cache.nbytes / n_utts / 2**20:.2f} MiB per utterance (float32)"),
        row("scoring", "CAP fast with Gram matrices cached, ms/trial", f"{t_gram * 1e3:.3f}",
            f"{t_gram / fast:.2f}x the recipe's; +{ecfg['num_crops'] * net.pool.proj.out_features ** 2 * 4 / 2**20:.2f}"
            f" MiB per utterance"),
        row("scoring", "CAP previous scorer (embed_grid), ms/trial", f"{prev * 1e3:.3f}"),
        row("scoring", "CAP direct eq. 9-12 per trial, ms/trial", f"{direct * 1e3:.3f}"),
    ]


# (d) ----------------------------------------------------------------------------------------------------

def write_ark(d, feats):
    with kaldiio.WriteHelper(f"ark,scp:{d}/feats.ark,{d}/feats.scp") as w:
        for k in sorted(feats):
            w(k, feats[k])
    with open(f"{d}/feats.scp") as f:
        return dict(line.split() for line in f)


@torch.no_grad()
def bench_embedding(args, device):
    n_utts, n_frames = (2, 500) if args.quick else (24, 800)
    torch.manual_seed(0)
    net = SpeakerNet.from_config(paper_config("cap")).to(device).eval()
    ecfg = paper_config()["eval"]
    rng = np.random.default_rng(3)
    feats = {f"u{i:03d}": rng.standard_normal((n_frames, 40)).astype(np.float32) for i in range(n_utts)}
    nframes = {u: n_frames for u in feats}
    utts = sorted(feats)
    with tempfile.TemporaryDirectory() as d:
        reader = ArkReader(write_ark(d, feats))

        def batched():
            utterance_cache(net, reader, nframes, utts, ecfg, device, utts_per_batch=8)

        def one_at_a_time():
            for u in utts:
                crops = utterance_crops(reader, u, n_frames, ecfg["crop_frames"], ecfg["num_crops"])
                partner_independent(net, net.frames(torch.from_numpy(crops).to(device))[None])
        one_at_a_time()                 # warm-up
        best = {"batched": float("inf"), "one": float("inf")}
        for _ in range(args.repeats):
            best["batched"] = min(best["batched"], fastest(batched, 1, device))
            best["one"] = min(best["one"], fastest(one_at_a_time, 1, device))
    b, o = best["batched"] / n_utts, best["one"] / n_utts
    return [row("embedding", f"test utterance -> cache row, {ecfg['num_crops']} crops x {ecfg['crop_frames']} frames",
                f"{b * 1e3:.0f} ms/utt batched (8 utts)", f"{o * 1e3:.0f} ms/utt one at a time: {o / b:.2f}x")]


# (e) ----------------------------------------------------------------------------------------------------

def bench_metrics(args, device):
    rng = np.random.default_rng(4)
    n = 10 ** 6
    labels = rng.random(n) < 0.5
    scores = rng.standard_normal(n) + labels

    def run():   # as stage 4 does it: one sort of the scores for the three figures
        rates = error_rates(scores, labels)
        eer_from_rates(*rates)
        min_dcf_from_rates(*rates, 0.05)
        min_dcf_from_rates(*rates, 0.01)
    secs = fastest(run, args.repeats, device)
    return [row("metrics", "EER + minDCF(0.05) + minDCF(0.01), 10^6 trials", f"{secs:.3f} s", "",
                verdict(secs, 0.5, False, " s"))]


# (f) ----------------------------------------------------------------------------------------------------

def bench_fbank(args, device):
    n_files, seconds = (3, 4.0) if args.quick else (20, 8.0)
    opts = read_fbank_conf(os.path.join(ROOT, "conf", "fbank.conf"))
    rng = np.random.default_rng(5)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i in range(n_files):
            t = np.arange(int(16000 * seconds)) / 16000
            x = 0.3 * np.sin(2 * np.pi * (120 + 40 * i) * t) + 0.05 * rng.standard_normal(len(t))
            paths.append(os.path.join(d, f"u{i}.wav"))
            soundfile.write(paths[-1], x.astype(np.float32), 16000, subtype="PCM_16")

        def run():
            for i, p in enumerate(paths):
                wave, sr = load_audio(p, f"u{i}")
                compute_fbank(wave, sr, opts, f"u{i}")
        torch.set_num_threads(1)      # as the stage-1 jobs run: one thread each, --nj of them
        try:
            run()
            secs = fastest(run, args.repeats, device)
        finally:
            torch.set_num_threads(threads)
    xrt = n_files * seconds / secs
    return [row("fbank", f"wav read + 40-dim fbank, {n_files} x {seconds:g} s of 16 kHz, 1 thread",
                f"{xrt:.0f} x real time per core", f"{secs / (n_files * seconds) * 1e3:.2f} ms per audio second")]


# (g) ----------------------------------------------------------------------------------------------------

def bench_loader(args, device):
    n_spk, n_utt, n_frames = (20, 3, 400) if args.quick else (200, 3, 600)
    batch_n, m, steps = (4, 2, 2) if args.quick else (20, 3, 6)
    cfg = paper_config("cap")
    crop_frames = cfg["train"]["crop_frames"]
    rng = np.random.default_rng(6)
    feats = {f"s{s:03d}-u{u}": rng.standard_normal((n_frames, 40)).astype(np.float32)
             for s in range(n_spk) for u in range(n_utt)}
    utt2spk = {u: u.split("-")[0] for u in feats}
    nframes = {u: n_frames for u in feats}
    with tempfile.TemporaryDirectory() as d:
        scp = write_ark(d, feats)
        with open(f"{d}/feats.ark", "rb") as f:     # warm page cache
            while f.read(1 << 24):
                pass
        reader = ArkReader(scp)
        full = EpisodicBatches(utt2spk, n_spk // 2 if args.quick else 200, 3, seed=1)
        data = EpisodeDataset(reader, nframes, full.epoch(1), crop_frames, 1, 1)
        per_item = len(data.batches[0]) * 3

        def read_all():
            for i in range(len(data)):
                data[i]
        secs = fastest(read_all, args.repeats, device)
        crops_per_s = len(data) * per_item / secs

        # data wait: one worker feeding CAP training steps at batch_n x m
        torch.manual_seed(0)
        net = SpeakerNet.from_config(cfg).to(device)
        loss_fn = NPSoftmaxLoss(cfg["model"]["embed_dim"], n_spk).to(device)
        opt = torch.optim.Adam(list(net.parameters()) + list(loss_fn.parameters()))
        sampler = EpisodicBatches(utt2spk, batch_n, m, seed=2)
        batches = [b for e in range(1, steps + 2) for b in sampler.epoch(e)][:steps + 1]   # enough for the steps
        loader = torch.utils.data.DataLoader(EpisodeDataset(reader, nframes, batches, crop_frames, 2, 1),
                                             batch_size=None, num_workers=1)
        wait = busy = 0.0
        it = iter(loader)
        next(it)                          # the first batch waits for the worker to start: not steady state
        for _ in range(steps):
            t0 = time.perf_counter()
            x, spk = next(it)
            t1 = time.perf_counter()
            x, spk = x.to(device), spk.to(device)
            frames = net.frames(x.view(-1, *x.shape[2:]))
            loss, _ = loss_fn(net, frames.view(*x.shape[:2], *frames.shape[1:]), spk)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync(device)
            t2 = time.perf_counter()
            wait, busy = wait + t1 - t0, busy + t2 - t1
        del it, loader
    return [row("loader", f"training crops/s per worker ({crop_frames}-frame crops, ark in page cache)",
                f"{crops_per_s:.0f} crops/s", f"one {full.n}x3 batch in {per_item / crops_per_s:.2f} s"),
            row("loader", f"data-wait share of CAP training steps, {batch_n}x{m}, 1 worker",
                f"{100 * wait / (wait + busy):.1f} %", f"step {busy / steps:.2f} s, waited {wait / steps * 1e3:.0f} ms")]


# (h) ----------------------------------------------------------------------------------------------------

VOX2_UTTS, VOX2_SPEAKERS = 1_092_009, 5_994
# put on stage 2's PYTHONPATH: the time its first batch reaches the training step, then the end (what the
# step then costs is the model's, not the data path's)
FIRST_BATCH_HOOK = '''
import os, sys, time
if os.environ.get("CAPSV_BENCH_FIRST_BATCH"):
    import torch.utils.data.dataloader as dl
    _next = dl._BaseDataLoaderIter.__next__
    def _first(self):
        out = _next(self)
        print(f"FIRST_BATCH {time.time()} {time.process_time()}", file=sys.stderr, flush=True)
        os._exit(0)
    dl._BaseDataLoaderIter.__next__ = _first
'''


def fake_data_dir(d, n_utts, n_spk, n_mats=64):
    """A training data dir of n_utts VoxCeleb-style ids over n_spk speakers whose feats.scp points, round
    robin, into n_mats real matrices of one ark (named as stage 1 names them)."""
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    ark = os.path.join(d, "raw_fbank.1.0123456789abcdef.ark")
    mats = [rng.standard_normal((int(rng.integers(300, 800)), 40)).astype(np.float32) for _ in range(n_mats)]
    with kaldiio.WriteHelper(f"ark,scp:{ark},{d}/mats.scp") as w:
        for i, m in enumerate(mats):
            w(f"m{i:03d}", m)
    with open(f"{d}/mats.scp") as f:
        locs = [line.split()[1] for line in f]
    utts = []
    for s in range(n_spk):
        for k in range(n_utts // n_spk + (s < n_utts % n_spk)):
            utts.append((f"id{10001 + s:05d}-{k // 8:011d}-{k % 8 + 1:05d}", f"id{10001 + s:05d}"))
    with open(f"{d}/utt2spk", "w") as f:
        f.write("".join(f"{u} {s}\n" for u, s in utts))
    with open(f"{d}/feats.scp", "w") as f:
        f.write("".join(f"{u} {locs[i % n_mats]}\n" for i, (u, _) in enumerate(utts)))
    with open(f"{d}/utt2num_frames", "w") as f:
        f.write("".join(f"{u} {len(mats[i % n_mats])}\n" for i, (u, _) in enumerate(utts)))
    with open(ark, "rb") as f:   # in the page cache: the figures are the tables', not the disk's
        while f.read(1 << 24):
            pass


def memory_kib(pid="self"):
    """(resident, private) KiB of a process: private pages are its own, not shared with its parent."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        fields = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()[-1] == "kB"}
    return fields["Rss"], fields["Private_Clean"] + fields["Private_Dirty"]


def scale_child(d, workers, crop_frames):
    """Measure the training data path on data dir d in this process; print one JSON line."""
    import gc

    from capsv.data import EpisodeLoader, read_data_dir
    cfg = paper_config("cap")["train"]
    def timed(fn):   # (result, CPU seconds, wall seconds): CPU time is what other work on the machine leaves alone
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        return out, time.process_time() - c0, time.perf_counter() - t0

    gc.collect()
    rss0 = memory_kib()[0]
    (utt2spk, nframes, scp), c_read, t_read = timed(lambda: read_data_dir(d))
    gc.collect()
    rss_read = memory_kib()[0]
    sampler, c_init, t_init = timed(lambda: EpisodicBatches(utt2spk, cfg["speakers_per_batch"],
                                                             cfg["utts_per_speaker"], seed=1))
    batches, c_epoch, t_epoch = timed(lambda: sampler.epoch(1))
    used = sum(len(utts) for b in batches for _, utts in b)
    loader = EpisodeLoader(ArkReader(scp), nframes, crop_frames, 1, num_workers=workers, prefetch_factor=2)
    it = iter(loader.epoch(1, batches))
    next(it)
    pids = [w.pid for w in loader.loader._iterator._workers]
    start = [memory_kib(p) for p in pids]
    t0 = time.perf_counter()
    n = 1 + sum(1 for _ in it)
    t_loader = time.perf_counter() - t0
    after = [memory_kib(p) for p in pids]
    print(json.dumps({"utts": len(utt2spk), "read_s": t_read, "read_cpu": c_read, "read_mib": (rss_read - rss0) / 1024,
                      "sampler_init_s": t_init, "sampler_init_cpu": c_init, "sampler_epoch_s": t_epoch,
                      "sampler_epoch_cpu": c_epoch, "used": used / len(utt2spk),
                      "batches": n, "loader_s": t_loader, "workers_start": start, "workers_after": after}))


def first_batch(d, exp, workers):
    """Seconds from launching stage 2's entry point (the paper's config, CPU) to its first batch: wall, and the
    CPU time of its main process."""
    hook = os.path.join(exp, "hook")
    os.makedirs(hook, exist_ok=True)
    with open(os.path.join(hook, "sitecustomize.py"), "w") as f:
        f.write(FIRST_BATCH_HOOK)
    env = dict(os.environ, CAPSV_BENCH_FIRST_BATCH="1",
               PYTHONPATH=os.pathsep.join([hook, os.environ.get("PYTHONPATH", "")]))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "capsv.bin.train", "--config", os.path.join(ROOT, "conf", "cap.yaml"),
                        "--data", d, "--exp", os.path.join(exp, "e"), "device=cpu", f"train.num_workers={workers}"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    found = [line.split() for line in r.stderr.splitlines() if line.startswith("FIRST_BATCH ")]
    if not found:
        raise RuntimeError(f"stage 2 did not reach its first batch: {r.stderr[-2000:]}")
    return float(found[0][1]) - t0, float(found[0][2])


def bench_scale(args, device):
    sizes = (2_000, 8_000, 32_000) if args.quick else (10_000, 100_000, VOX2_UTTS)
    workers, crop_frames = (2, 20) if args.quick else (8, 20)
    out, got = [], {}
    for n in sizes:
        n_spk = max(200, round(n * VOX2_SPEAKERS / VOX2_UTTS))   # a batch needs 200 speakers
        with tempfile.TemporaryDirectory() as tmp:
            d = os.path.join(tmp, "data")
            fake_data_dir(d, n, n_spk)
            r = subprocess.run([sys.executable, "-m", "capsv.bin.bench", "--scale-child", d, "--size",
                                f"{workers},{crop_frames}"], capture_output=True, text=True, cwd=ROOT)
            if r.returncode != 0:
                raise RuntimeError(f"scale child at {n} utterances failed: {r.stderr[-2000:]}")
            m = json.loads(r.stdout.strip().splitlines()[-1])
            m["first_batch_s"], m["first_batch_cpu"] = first_batch(d, tmp, workers) if not args.quick else (0.0, 0.0)
        got[n] = m
        rss = [a[0] / 1024 for a in m["workers_after"]]
        own0 = [a[1] / 1024 for a in m["workers_start"]]
        own = [a[1] / 1024 for a in m["workers_after"]]
        out += [
            row("scale", f"read_data_dir, {n:,} utts ({n_spk:,} speakers)",
                f"{m['read_cpu']:.2f} s CPU, +{m['read_mib']:.0f} MiB",
                f"{m['read_cpu'] / n * 1e6:.2f} µs/utt; wall {m['read_s']:.2f} s"),
            row("scale", f"sampler at {n:,} utts: set-up, one epoch (CPU); share of utterances in the epoch",
                f"{m['sampler_init_cpu']:.2f} s, {m['sampler_epoch_cpu']:.2f} s; {100 * m['used']:.1f} %",
                f"{m['batches']} batches of 200x3; wall {m['sampler_init_s']:.2f} s, {m['sampler_epoch_s']:.2f} s"),
            row("scale", f"{len(rss)} loader workers after an epoch's {m['batches']} batches at {n:,} utts "
                         f"({crop_frames}-frame crops)",
                f"resident {min(rss):.0f}-{max(rss):.0f} MiB, private {min(own):.0f}-{max(own):.0f} MiB",
                f"private after the first batch {min(own0):.0f}-{max(own0):.0f} MiB; epoch {m['loader_s']:.1f} s"),
        ]
        if not args.quick:
            out.append(row("scale", f"stage 2 start-up at {n:,} utts (conf/cap.yaml, CPU, {workers} workers)",
                           f"{m['first_batch_s']:.1f} s", f"launch to the first batch at the training step; "
                                                          f"main process {m['first_batch_cpu']:.1f} s CPU"))
    for lo, hi in zip(sizes, sizes[1:]):
        grow = lambda k: (got[hi][k] / max(got[lo][k], 1e-9)) / (hi / lo)
        out.append(row("scale", f"growth {lo:,} -> {hi:,} utts ({hi / lo:.1f}x), per utterance (1.0 = linear)",
                       f"read {grow('read_cpu'):.2f}x, memory {grow('read_mib'):.2f}x, sampler epoch "
                       f"{grow('sampler_epoch_cpu'):.2f}x (CPU time)"))
    return out


BENCHES = {"pooling": bench_pooling, "train_step": bench_train_step, "scoring": bench_scoring,
           "embedding": bench_embedding, "metrics": bench_metrics, "fbank": bench_fbank, "loader": bench_loader,
           "scale": bench_scale}


def machine(device):
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"device {device}{gpu}")


def table(rows):
    lines = ["| benchmark | measurement | value | side by side | target |", "|---|---|---|---|---|"]
    lines += [f"| {r['bench']} | {r['what']} | {r['value']} | {r['vs']} | {r['target']} |" for r in rows]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: the whole suite in about a minute")
    p.add_argument("--only", nargs="+", choices=NAMES + EXTRA, metavar="NAME",
                   help=f"run only these: {', '.join(NAMES + EXTRA)}")
    p.add_argument("--repeats", type=int, help="runs per figure, the fastest kept (default 3; 1 with --quick)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--child", choices=[k for _, k in POOLING_ROWS], help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--scale-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.scale_child:
        workers, crop_frames = map(int, args.size.split(","))
        return scale_child(args.scale_child, workers, crop_frames)
    device = pick_device(args.device)
    if args.child:
        n, m, t = map(int, args.size.split(","))
        return pooling_child(args.child, n, m, t, args.repeats, device)
    print(f"# capsv benchmarks{' (--quick)' if args.quick else ''}: {machine(device)}; "
          f"load average {os.getloadavg()[0]:.2f} at start", flush=True)
    rows = []
    for name in args.only or NAMES:
        t0 = time.perf_counter()
        got = BENCHES[name](args, device)
        rows += got
        print(table(got).split("\n", 2)[2] + f"   <!-- {name}: {time.perf_counter() - t0:.1f} s -->", flush=True)
    text = (f"{machine(device)}; load average {os.getloadavg()[0]:.2f} at the end\n\n" + table(rows) + "\n")
    print()
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    run_main(main)
