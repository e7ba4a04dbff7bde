"""The GPU switches on the CPU (train.amp bf16/fp16, train.channels_last, train.compile), through the functions a
GPU run uses (capsv.trainer.build_training, TrainStep, backward, train_epoch; capsv.scoring) and through
capsv.bin.train, so what fails only under autocast, NHWC or compile fails here and not on the first GPU.

Tolerances, each against the same step in fp32 from the same initial weights and batch:

- channels_last and compile keep fp32 arithmetic and only reorder sums: fp32's unit roundoff 2^-24 = 6e-8 times
  sums of up to ~5,000 terms (BatchNorm over 6 crops x 20 x 40 positions) bounds the frames' relative change by
  3e-4; the loss and every gradient may move by a few times that (the loss's gradient moves about 5x its input,
  measured): REORDER_TOL = 1e-3, for the loss and for every gradient tensor (measured: at most 5e-5).
- autocast rounds each convolution's input and output to bf16 (8-bit significand: unit roundoff u = 2^-8) or fp16
  (11 bits: u = 2^-11). The tiny trunk has 11 convolutions, so L = 22 roundings; independent, they move the
  trunk's output by about sqrt(L) u: FRAMES_TOL bf16 1.8e-2, fp16 2.3e-3 (measured 7.7e-3 and 9.8e-4), and the
  loss, a mean of smooth functions of the frames, by no more (measured at most 2.0e-3 and 4.2e-4).
  Everything after the trunk runs in fp32: given the trunk's frames it is exact (loss, gradient of the frames,
  every pooling, head and classifier gradient within 1e-6).
  The trunk's own gradients are not bounded by rounding: BatchNorm's training-mode backward subtracts batch
  means from the incoming gradient, leaving a small difference of rounded numbers, and ReLU gates near zero
  flip; per tensor they move by 5-80 % (measured, seeds 0-4), and with BatchNorm in eval mode by about 1 %. The
  whole trunk gradient, given the same incoming gradient, is held to TRUNK_GRAD_TOL: bf16 0.4, fp16 0.2, twice
  the largest of 20 measured draws (seeds 0-4, CAP and TAP: 0.20 and 0.09), and every tensor to point the same
  way (cosine > 0.5; measured >= 0.85); a dropped term, a wrong layout or a missing unscale (x 2^16) break these.
- stage 3 with a bf16 trunk: a score is a mean of cosines, and a cosine moves by at most the sum of its two
  embeddings' relative errors; with sqrt(L) u for the full trunk (37 convolutions, L = 74) that is
  2 sqrt(74) 2^-8 = 0.067 (measured on the trained fixture, all 300 trials: CAP 0.006, SAP 0.009).

Compile tests use one tiny model and batch shape, so inductor compiles one graph (its cache serves the runs
through capsv.bin.train).
"""
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from capsv import checkpoint, trainer
from capsv.config import load_config
from capsv.data import ArkReader, read_data_dir
from capsv.models.speaker_net import SpeakerNet
from capsv.scoring import score_trials, utterance_cache
from test_train import ROOT, SMALL, make_data_dir

CPU = torch.device("cpu")
N_SPK, N_UTT, CROP = 3, 2, 40          # SMALL's batch: one compiled graph shape for every test here
ALL_ON = ["train.amp=bf16", "train.channels_last=true", "train.compile=true"]
U = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
REORDER_TOL = 1e-3
FRAMES_TOL = {k: math.sqrt(22) * u for k, u in U.items()}
TRUNK_GRAD_TOL = {"bf16": 0.4, "fp16": 0.2}
SCORE_TOL = 2 * math.sqrt(74) * U["bf16"]


def config(pooling, *switches):
    return load_config(f"{ROOT}/conf/mini/cap.yaml", SMALL + [f"model.pooling={pooling}", *switches])


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N_SPK, N_UTT, CROP, 40, generator=g), torch.arange(N_SPK)


def rel(a, b):
    """Relative 2-norm difference of a from the reference b."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def grads(net, loss_fn):
    out = {f"net.{k}": p.grad for k, p in net.named_parameters()}
    out.update({f"loss.{k}": p.grad for k, p in loss_fn.named_parameters()})
    return {k: g.detach().clone() for k, g in out.items() if g is not None}


def training_step(cfg, feats, speakers, hooks=()):
    """One step's forward and backward as train_epoch runs it; the loss, the frames the loss received (fp32)
    with their gradient, every parameter's gradient (unscaled), and the pieces."""
    net, loss_fn, opt, sched, step = trainer.build_training(cfg, 5, CPU)
    seen = {}

    def keep(module, args):   # the loss's input: the trunk's frames, after TrainStep's cast to fp32
        seen["frames"] = args[1]
        args[1].register_hook(lambda g: seen.__setitem__("frames_grad", g))
    loss_fn.register_forward_pre_hook(keep)
    for h in hooks:
        h(net)
    scaler = trainer.unwrap(step).scaler
    for _ in range(20):   # fp16: the scaler halves its scale until no gradient overflows, as in training
        loss, _ = step(feats, speakers)
        opt.zero_grad(set_to_none=True)
        trainer.backward(step, opt, loss)
        if all(torch.isfinite(g).all() for g in grads(net, loss_fn).values()):
            break
        scaler.update()
    # the frames' gradient as the loss gave it (fp16: before the scaler's unscale)
    return {"loss": loss.item(), "frames": seen["frames"].detach(), "frames_grad": seen["frames_grad"] / scaler.get_scale(),
            "grads": grads(net, loss_fn), "net": net, "loss_fn": loss_fn, "step": step, "opt": opt}


def nhwc_probe(seen):
    """Hooks recording, for every convolution, whether its input and output are NHWC (channels_last)."""
    def install(net):
        net.trunk.register_forward_hook(lambda mod, args, out: seen.append(("trunk", args[0].dim(), out.dim())))
        for name, m in net.trunk.named_modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(lambda mod, args, out, name=name: seen.append(
                    (name, args[0].dim(), args[0].shape[1] == 1 or args[0].is_contiguous(memory_format=torch.channels_last),
                     out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous())))
    return install


@pytest.mark.parametrize("pooling", ["cap", "tap"])
def test_channels_last_reaches_every_convolution_and_agrees_with_fp32(pooling):
    feats, speakers = batch()
    ref = training_step(config(pooling), feats, speakers)
    seen_off, seen = [], []
    training_step(config(pooling), feats, speakers, [nhwc_probe(seen_off)])
    got = training_step(config(pooling, "train.channels_last=true"), feats, speakers, [nhwc_probe(seen)])
    convs = [c for c in seen if c[0] != "trunk"]
    assert len(convs) == 11 and all(dim == 4 and nhwc_in and nhwc_out for _, dim, nhwc_in, nhwc_out in convs), seen
    assert not any(c[-1] for c in seen_off if c[0] != "trunk")   # the probe tells the layouts apart
    assert ("trunk", 3, 3) in seen and got["frames"].shape == ref["frames"].shape   # [B, T, F] in, [B, T', C] out
    assert abs(got["loss"] - ref["loss"]) <= REORDER_TOL * abs(ref["loss"])
    for k, g in ref["grads"].items():
        assert (got["grads"][k] - g).norm() <= REORDER_TOL * g.norm() + 1e-12, k


def post_trunk_is_exact_fp32(got, pooling, speakers):
    """The loss and every gradient outside the trunk, recomputed in fp32 from the step's own frames."""
    net = SpeakerNet.from_config(config(pooling))
    net.load_state_dict(got["net"].state_dict())
    loss_fn = type(got["loss_fn"])(16, 5)
    loss_fn.load_state_dict(got["loss_fn"].state_dict())
    frames = got["frames"].clone().requires_grad_()
    loss, _ = loss_fn(net, frames, speakers)
    loss.backward()
    assert loss.item() == pytest.approx(got["loss"], rel=1e-6)
    assert rel(got["frames_grad"], frames.grad) <= 1e-6
    ref = grads(net, loss_fn)
    outside = [k for k in ref if not k.startswith("net.trunk.")]
    assert outside and all(rel(got["grads"][k], ref[k]) <= 1e-6 for k in outside if ref[k].norm() > 0)


def trunk_grads_agree(got, feats, pooling, tol):
    """The trunk's gradients against fp32's given the same incoming gradient: see the module docstring."""
    net = SpeakerNet.from_config(config(pooling))
    net.load_state_dict(got["net"].state_dict())
    net.train()
    net.frames(feats.view(-1, CROP, 40)).backward(got["frames_grad"].reshape(N_SPK * N_UTT, *got["frames_grad"].shape[2:]))
    names = [k for k, _ in net.trunk.named_parameters()]
    ref = {k: p.grad for k, p in net.trunk.named_parameters()}
    mine = {k: got["grads"][f"net.trunk.{k}"] for k in names}
    flat = torch.cat([ref[k].flatten() for k in names])
    whole = rel(torch.cat([mine[k].flatten() for k in names]), flat)
    assert whole <= tol, whole
    rms = flat.norm() / math.sqrt(flat.numel())   # a typical gradient element: the scale of tiny tensors' errors
    for k in names:
        assert (mine[k] - ref[k]).norm() <= tol * (ref[k].norm() + rms * math.sqrt(ref[k].numel())), k
    return whole


@pytest.mark.parametrize("pooling", ["cap", "tap"])
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_step_agrees_with_fp32(pooling, amp):
    feats, speakers = batch()
    ref = training_step(config(pooling), feats, speakers)
    got = training_step(config(pooling, f"train.amp={amp}"), feats, speakers)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    # the trunk ran in the autocast dtype (its values are exactly representable there), the loss in fp32
    assert got["frames"].dtype == torch.float32 and torch.equal(got["frames"], got["frames"].to(dtype).float())
    assert not torch.equal(ref["frames"], ref["frames"].to(dtype).float())
    assert rel(got["frames"], ref["frames"]) <= FRAMES_TOL[amp]
    assert abs(got["loss"] - ref["loss"]) <= FRAMES_TOL[amp] * abs(ref["loss"])
    if amp == "fp16":   # training's scaler: the gradients arrive unscaled
        assert trainer.unwrap(got["step"]).scaler.is_enabled()
    post_trunk_is_exact_fp32(got, pooling, speakers)
    trunk_grads_agree(got, feats, pooling, TRUNK_GRAD_TOL[amp])


needs_cxx = pytest.mark.skipif(not shutil.which("g++") and not shutil.which("c++"),
                               reason="torch.compile on the CPU needs a C++ compiler (.ci/run installs g++)")


@needs_cxx
def test_all_switches_together_compile_to_one_graph_agree_and_learn():
    """bf16 + channels_last + compile: one graph, no graph break; agrees with the same step uncompiled and with
    fp32; a few steps on one batch lower its loss."""
    from torch._dynamo.utils import counters
    counters.clear()
    feats, speakers = batch()
    eager = training_step(config("cap", "train.amp=bf16", "train.channels_last=true"), feats, speakers)
    ref = training_step(config("cap"), feats, speakers)
    got = training_step(config("cap", *ALL_ON, "train.lr=0.01"), feats, speakers)
    assert trainer.compile_counts() == (1, 0)
    # compiled against uncompiled at the same precision: inductor may round at other places (fusions)
    assert rel(got["frames"], eager["frames"]) <= FRAMES_TOL["bf16"]
    assert abs(got["loss"] - eager["loss"]) <= FRAMES_TOL["bf16"] * abs(eager["loss"])
    # and against fp32, as any bf16 step
    assert rel(got["frames"], ref["frames"]) <= FRAMES_TOL["bf16"]
    post_trunk_is_exact_fp32(got, "cap", speakers)
    trunk_grads_agree(got, feats, "cap", TRUNK_GRAD_TOL["bf16"])
    # a few steps of train_epoch on the same batch: the loss goes down, and no batch recompiles
    step, opt = got["step"], got["opt"]
    first = trainer.train_epoch(step, opt, [(feats, speakers)], CPU, "first")["loss"]
    trainer.train_epoch(step, opt, [(feats, speakers)] * 6, CPU, "steps")
    last = trainer.train_epoch(step, opt, [(feats, speakers)], CPU, "last")["loss"]
    assert last < 0.8 * first, (first, last)
    assert trainer.compile_counts() == (1, 0)


def run_train(data, exp, *overrides):
    return subprocess.run([sys.executable, "-m", "capsv.bin.train", "--config", f"{ROOT}/conf/mini/cap.yaml",
                           "--data", str(data), "--exp", str(exp), *SMALL, *overrides],
                          capture_output=True, text=True)


@needs_cxx
def test_entry_point_with_every_switch_resumes_with_them_changed(tmp_path):
    make_data_dir(tmp_path / "data")
    exp = tmp_path / "exp"
    r = run_train(tmp_path / "data", exp, "train.epochs=2", *ALL_ON)
    assert r.returncode == 0, r.stderr
    assert "precision bf16 on cpu; tf32 false, channels_last true, compile true" in r.stderr
    # two epochs of same-shaped batches: one graph, compiled once, no graph break
    assert "torch.compile: the trunk is 1 graph(s), 0 graph break(s)" in r.stderr, r.stderr
    assert "compiled the trunk again" not in r.stderr
    first = checkpoint.load_latest(exp / "models")
    assert first["precision"] == {"precision": "bf16", "device_type": "cpu"} and first["scaler"] is None

    r = run_train(tmp_path / "data", exp, "train.epochs=3", "train.amp=fp16", "train.channels_last=false",
                  "train.compile=false")
    assert r.returncode == 0, r.stderr
    assert re.search(r"changed since the last run of this experiment \(the objective is the same\): "
                     r"train.amp bf16 -> fp16, train.channels_last true -> false, train.compile true -> false, "
                     r"train.epochs 2 -> 3\n", r.stderr), r.stderr
    assert "resuming from" in r.stderr and "epoch 3: loss" in r.stderr
    assert "fp16 gradient scaler: starts afresh (epoch 2 was trained at bf16 precision)" in r.stderr
    saved = checkpoint.load_latest(exp / "models")
    assert saved["precision"]["precision"] == "fp16" and saved["scaler"]["scale"] > 0

    # (that the saved scaler continues at fp16: test_resume_restores_the_fp16_scaler_...)
    r = run_train(tmp_path / "data", exp, "train.epochs=4", "train.lr=0.01")
    assert r.returncode == 1 and "was trained with different train.lr" in r.stderr.strip().splitlines()[-1]


def test_resume_restores_the_fp16_scaler_and_starts_afresh_after_another_precision(tmp_path):
    cfg = config("cap", "train.amp=fp16")
    net, loss_fn, opt, sched, step = trainer.build_training(cfg, 5, CPU)
    scaler = trainer.unwrap(step).scaler
    feats, speakers = batch()
    trainer.train_epoch(step, opt, [(feats, speakers)] * 3, CPU, "fp16")
    state = trainer.checkpoint_state(1, cfg, ["a"], net, loss_fn, opt, sched, step, CPU, {"epoch": 1})
    assert state["scaler"] == scaler.state_dict() and state["precision"]["precision"] == "fp16"
    models = tmp_path / "models"
    checkpoint.save_checkpoint(str(models), 1, state)
    for amp, expect in (("fp16", scaler.state_dict()), ("bf16", None)):
        net2, loss2, opt2, sched2, step2 = trainer.build_training(config("cap", f"train.amp={amp}"), 5, CPU)
        fresh = trainer.unwrap(step2).scaler
        before = fresh.state_dict()
        trainer.resume(str(models), net2, loss2, opt2, sched2, ["a"], "data", scaler=fresh, device=CPU)
        assert fresh.state_dict() == (expect if expect is not None else before)


def test_scoring_with_a_bf16_trunk_is_close_to_fp32(trained_recipe):
    """Stage 3's scorer (utterance_cache + score_trials) on the trained CAP model, trunk in bf16 vs fp32, on every
    pair of 12 test utterances of 12 speakers."""
    _, nframes, scp = read_data_dir(trained_recipe / "data/synth_test")
    utts = sorted(scp)[::5][:12]
    pairs = [(a, b, True) for i, a in enumerate(utts) for b in utts[i + 1:]]
    state = checkpoint.load_for_inference(trained_recipe / "exp/small_cap")
    net = SpeakerNet.from_config(state["config"])
    net.load_state_dict(state["model"])
    net.eval()
    scores = {}
    for precision in ("off", "bf16"):
        ecfg = {**state["config"]["eval"], "precision": precision}
        cache = utterance_cache(net, ArkReader(scp), nframes, utts, ecfg, CPU)
        assert cache.dtype == torch.float32
        scores[precision] = score_trials(net, cache, pairs, ecfg["trial_batch"])
    diff = np.abs(scores["bf16"] - scores["off"])
    assert 0 < diff.max() <= SCORE_TOL, diff.max()
