"""Scoring protocol: crop offsets, and batched trial scores equal to the literal 10x10 mean."""
import numpy as np
import torch
import torch.nn.functional as F

from capsv.models.pooling import cap_pair_direct
from capsv.models.speaker_net import SpeakerNet
from capsv.scoring import crop_starts, score_trials


def test_crop_starts_even_and_cover_the_utterance():
    s = crop_starts(800, 350, 10)
    assert s[0] == 0 and s[-1] == 450 and len(s) == 10 and np.all(np.diff(s) > 0)
    assert list(crop_starts(200, 350, 10)) == [0] * 10       # short: repeated, every crop the same


def small_net(pooling):
    torch.manual_seed(0)
    net = SpeakerNet(n_mels=40, channels=[4, 4, 8, 8], layers=[1, 1, 1, 1], pooling=pooling,
                     embed_dim=6, cap_proj_dim=5, cap_tau=0.05).double().eval()
    with torch.no_grad():    # non-trivial BN statistics for the head
        net.head[0].running_mean.uniform_(-0.5, 0.5)
        net.head[0].running_var.uniform_(0.5, 2.0)
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


def test_batched_scores_equal_literal_protocol():
    g = torch.Generator().manual_seed(1)
    frames = {u: torch.randn(4, 9, 8, dtype=torch.float64, generator=g) for u in "abcde"}
    trials = [("a", "b", True), ("a", "c", False), ("d", "e", True), ("e", "a", False), ("b", "b", True)]
    for pooling in ["tap", "sap", "cap"]:
        net = small_net(pooling)
        with torch.no_grad():
            got = score_trials(net, frames, trials, trial_batch=2)
            want = [literal_score(net, frames[e], frames[t]) for e, t, _ in trials]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
