"""The attention picture: CAP's weights against the literal eq. 9-12, SAP's against its logits, the alignment of
trunk frames to utterance frames, and capsv.bin.plot_attention on the trained CAP and SAP runs of tests/conftest.py."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from capsv.attention import (cap_trial_weights, crop_to_trunk_frame, load_exp, model_view, trunk_time_stride,
                             utterance_curve)
from capsv.data import ArkReader, read_data_dir
from capsv.models.pooling import CAP, SAP, cap_cross_weights, cap_pair_direct
from capsv.models.trunk import FastResNet34
from capsv.scoring import utterance_crops

ROOT = Path(__file__).resolve().parent.parent


def literal_weights(cap, s, q):
    """Eq. 9-11 for one pair, from the meta-projection: (w_s [Ts], w_q [Tq])."""
    S, Q = torch.relu(cap.proj(s)), torch.relu(cap.proj(q))
    R = torch.stack([torch.stack([F.cosine_similarity(S[i], Q[j], dim=0) for j in range(len(Q))])
                     for i in range(len(S))])                                  # R_ij = cos(S_i, Q_j)
    mu_s, mu_q = R.mean(0), R.mean(1)                                          # [Tq], [Ts]
    return torch.softmax(R @ mu_s / cap.tau, 0), torch.softmax(R.T @ mu_q / cap.tau, 0)


def check_against_literal(cap, a, b):
    """cap_cross_weights of crops a [Ka, Ta, C] and b [Kb, Tb, C], both ways, against eq. 9-12 for every pair."""
    wa, wb = cap_cross_weights(cap, a, b), cap_cross_weights(cap, b, a)
    assert wa.shape == (len(a), len(b), a.shape[1]) and wb.shape == (len(b), len(a), b.shape[1])
    for i in range(len(a)):
        for j in range(len(b)):
            ws, wq = literal_weights(cap, a[i], b[j])
            torch.testing.assert_close(wa[i, j], ws, atol=1e-6, rtol=0)
            torch.testing.assert_close(wb[j, i], wq, atol=1e-6, rtol=0)
            # the same weights give the embeddings of the recipe's own oracle
            es, eq = cap_pair_direct(cap, a[i], b[j])
            torch.testing.assert_close(((1 + wa[i, j])[:, None] * a[i]).sum(0) / a.shape[1], es, atol=1e-10, rtol=0)
            torch.testing.assert_close(((1 + wb[j, i])[:, None] * b[j]).sum(0) / b.shape[1], eq, atol=1e-10, rtol=0)
    torch.testing.assert_close(wa.sum(-1), torch.ones(len(a), len(b), dtype=wa.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close(wb.sum(-1), torch.ones(len(b), len(a), dtype=wb.dtype), atol=1e-12, rtol=0)


def test_cap_weights_equal_literal_eq_9_to_12_on_random_frames():
    torch.manual_seed(0)
    cap = CAP(12, proj_dim=7, tau=0.05).double()
    g = torch.Generator().manual_seed(1)
    check_against_literal(cap, torch.randn(3, 9, 12, dtype=torch.float64, generator=g),
                          torch.randn(4, 23, 12, dtype=torch.float64, generator=g))


def test_sap_weights_are_the_softmax_of_its_logits_and_pool_as_single():
    torch.manual_seed(0)
    sap = SAP(12).double()
    x = torch.randn(5, 17, 12, dtype=torch.float64)
    logits = torch.tanh(x @ sap.attention.weight.T + sap.attention.bias) @ sap.context[:, 0]     # [5, 17]
    w = sap.weights(x)
    torch.testing.assert_close(w, torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True), atol=1e-12, rtol=0)
    torch.testing.assert_close(w.sum(-1), torch.ones(5, dtype=w.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close((w[..., None] * x).sum(-2), sap.single(x), atol=1e-12, rtol=0)


def test_trunk_frame_k_is_centred_on_crop_frame_stride_times_k():
    """The alignment the picture draws: each trunk frame's receptive field (convolutions only: the instance norm
    and squeeze-excite, which see the whole crop, taken out) is centred on crop frame stride * k."""
    torch.manual_seed(0)
    # one block a stage: the strided layers are all there, and the other blocks (stride 1, 3x3, padding 1) are
    # symmetric, so they widen the field without moving its centre
    trunk = FastResNet34(40, (4, 4, 8, 8), (1, 1, 1, 1)).double().eval()
    trunk.instance_norm = nn.Identity()
    for block in trunk.blocks:
        block.se = nn.Identity()
    stride, length = trunk_time_stride(trunk), 120
    assert stride == 4
    x = torch.randn(1, length, 40, dtype=torch.float64, requires_grad=True)
    y = trunk(x)
    t_out = y.shape[1]
    k_of = crop_to_trunk_frame(length, t_out, stride)
    centres = stride * np.arange(t_out)
    nearest = np.abs(np.arange(length)[:, None] - centres[None, :]).argmin(1)      # ties to the earlier frame
    np.testing.assert_array_equal(k_of, nearest)
    interior = 0
    for k in range(0, t_out, 3):
        g, = torch.autograd.grad(y[0, k].sum(), x, retain_graph=True)
        support = torch.nonzero(g[0].abs().sum(1)).flatten()
        lo, hi = support.min().item(), support.max().item()
        if lo > 0 and hi < length - 1:      # a field not cut by the crop's edges
            assert (lo + hi) / 2 == stride * k, (k, lo, hi)
            interior += 1
    assert interior >= 5


def brute_curve(weights, starts, length, num_frames, stride):
    t_out = weights.shape[1]
    got = [[] for _ in range(num_frames)]
    for w, s in zip(weights, starts):
        for c in range(length):
            k = min(range(t_out), key=lambda k: abs(c - stride * k))
            got[(s + c) if num_frames >= length else c % num_frames].append(w[k])
    return np.array([np.mean(v) if v else np.nan for v in got])


@pytest.mark.parametrize("num_frames,starts", [(700, [0, 150, 300, 330]), (90, [0, 0, 0])])
def test_utterance_curve_averages_the_crops_covering_each_frame(num_frames, starts):
    length, stride = 100, 4
    w = np.random.default_rng(0).random((len(starts), 25))
    got = utterance_curve(w, starts, length, num_frames, stride)
    want = brute_curve(w, starts, length, num_frames, stride)
    np.testing.assert_allclose(got, want, atol=1e-12, equal_nan=True)
    assert np.isnan(got).any() == (num_frames == 700)        # 430..699 and nothing else uncovered when long


def first_trial(root):
    e, t, _ = (root / "data/synth_test/trials").read_text().split("\n")[0].split()
    return e, t


def stage3_score(exp, e, t):
    for line in (exp / "scores/synth_test.score").read_text().splitlines():
        a, b, s = line.split()
        if (a, b) == (e, t):
            return float(s)
    raise AssertionError(f"{e} {t} not scored")


def test_weights_of_the_trained_cap_equal_the_literal_form_and_its_score_stage_3s(trained_recipe):
    root = Path(trained_recipe)
    net, cfg, _ = load_exp(str(root / "exp/small_cap"), "cap", "--exp")
    _, nframes, scp = read_data_dir(str(root / "data/synth_test"))
    reader = ArkReader(scp)
    e, t = first_trial(root)
    view = model_view(net, cfg, reader, nframes, e, t, torch.device("cpu"))
    assert abs(view["score"] - stage3_score(root / "exp/small_cap", e, t)) < 2e-6

    net = net.double()
    ecfg = cfg["eval"]
    with torch.no_grad():
        fe, ft = (net.frames(torch.from_numpy(utterance_crops(reader, u, nframes[u], ecfg["crop_frames"],
                                                              ecfg["num_crops"])).double()) for u in (e, t))
        check_against_literal(net.pool, fe[:3], ft[:2])
        ws, wq = cap_trial_weights(net, fe, ft)
    # what the picture draws (float32, from stage 3's trunk batches) is these weights, to float32's precision:
    # the logits reach T'/tau = 1760, where float32 rounding moves a weight by ~1e-4 of itself (measured 6e-4)
    np.testing.assert_allclose(view["weights"][0], ws.numpy(), rtol=3e-3, atol=1e-6)
    np.testing.assert_allclose(view["weights"][1], wq.numpy(), rtol=3e-3, atol=1e-6)


def run_cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "pysrc") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "capsv.bin.plot_attention", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd)


def check_png(path):
    import matplotlib.image as mpimg
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30_000
    img = mpimg.imread(path)
    assert img.shape[0] > 600 and img.shape[1] > 900
    assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 100      # an fbank image, not a blank page


def test_entry_point_writes_the_picture(trained_recipe, tmp_path):
    root = Path(trained_recipe)
    e, t = first_trial(root)
    out = tmp_path / "pic.png"
    r = run_cli("--exp", root / "exp/small_cap", "--sap-exp", root / "exp/small_sap", "--trial", f"{e} {t}",
                "--out", out)         # --data from the exp's score records
    assert r.returncode == 0, r.stderr
    check_png(out)
    # the default name, beside a copy of the exp, one crop pair on a log axis
    exp = tmp_path / "small_cap"
    shutil.copytree(root / "exp/small_cap", exp)
    r = run_cli("--exp", exp, "--trial", f"{e} {t} target", "--data", root / "data/synth_test",
                "--crop-pair", 2, 10, "--yscale", "log")
    assert r.returncode == 0, r.stderr
    check_png(exp / f"attention_{e}_{t}_crops2-10.png")


@pytest.mark.parametrize("case", ["unknown_utt", "sap_as_exp", "cap_as_sap", "crop_out_of_range", "no_scores"])
def test_entry_point_errors_are_one_line(trained_recipe, tmp_path, case):
    root = Path(trained_recipe)
    e, t = first_trial(root)
    cap, sap = root / "exp/small_cap", root / "exp/small_sap"
    args = {"unknown_utt": ["--exp", cap, "--trial", f"{e} nobody-u999"],
            "sap_as_exp": ["--exp", sap, "--trial", f"{e} {t}"],
            "cap_as_sap": ["--exp", cap, "--sap-exp", cap, "--trial", f"{e} {t}"],
            "crop_out_of_range": ["--exp", cap, "--trial", f"{e} {t}", "--crop-pair", 0, 11],
            "no_scores": ["--exp", tmp_path / "exp", "--trial", f"{e} {t}"]}[case]
    if case == "no_scores":      # an exp never scored: --data cannot be guessed
        (tmp_path / "exp").mkdir()
        shutil.copytree(cap / "models", tmp_path / "exp/models")
        shutil.copy(cap / "config.yaml", tmp_path / "exp/config.yaml")
    out = tmp_path / "pic.png"
    r = run_cli(*args, "--out", out)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("ERROR: "), r.stderr
    assert {"unknown_utt": "nobody-u999", "sap_as_exp": "SAP pooling", "cap_as_sap": "--sap-exp",
            "crop_out_of_range": "1..10", "no_scores": "--data"}[case] in lines[0]
    assert not out.exists()
