"""capsv.bin.export: the exported files alone reproduce stage 3's scores.

The check runs in a subprocess that cannot import capsv: it reads export.json, the features (kaldiio) and
the trials, crops as export.json says, and scores every trial with torch.jit.load or onnxruntime.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from capsv import checkpoint
from capsv.data import ArkReader, read_data_dir
from capsv.export import load_net
from capsv.scoring import utterance_crops
from capsv.utils import sha256

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a user without capsv writes: numpy, kaldiio and torch or onnxruntime.
STANDALONE = r'''
import json, sys
import numpy as np


def crops(feats, num_crops, crop_frames):
    n = len(feats)
    starts = np.linspace(0, max(n - crop_frames, 0), num_crops).round().astype(int)
    return np.stack([feats[np.arange(s, s + crop_frames) % n] for s in starts]).astype(np.float32)


if __name__ == "__main__":
    import kaldiio
    fmt, export_dir, data_dir = sys.argv[1:4]
    try:
        import capsv
        sys.exit("capsv is importable here: this check would not be standalone")
    except ImportError:
        pass
    rec = json.load(open(f"{export_dir}/export.json"))
    ev, parts = rec["eval"], rec["parts"]
    path = lambda part: f"{export_dir}/{parts[part]['files'][fmt]}"
    if fmt == "torchscript":
        import torch
        torch.set_num_threads(1)
        torch.set_grad_enabled(False)
        models = {p: torch.jit.load(path(p)) for p in parts}

        def run(part, *xs):
            out = models[part](*[torch.from_numpy(x) for x in xs])
            return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
    else:
        import onnxruntime as ort
        models = {p: ort.InferenceSession(path(p), providers=["CPUExecutionProvider"]) for p in parts}
        run = lambda p, *xs: models[p].run(None, dict(zip(parts[p]["inputs"], xs)))
    feats = kaldiio.load_scp(f"{data_dir}/feats.scp")
    trials = [line.split() for line in open(f"{data_dir}/trials")]
    utts = sorted({u for t in trials for u in t[:2]})
    frames = {u: run("trunk", crops(feats[u], ev["num_crops"], ev["crop_frames"]))[0] for u in utts}
    emb = {u: run("embed", f)[0] for u, f in frames.items()} if "embed" in parts else None
    for e, t, _ in trials:
        s = float(run("score", frames[e], frames[t])[0])
        dot = float(emb[e] @ emb[t]) if emb else s
        print(e, t, repr(s), repr(dot))
'''


def export_cmd(exp, out, *extra):
    return [sys.executable, "-m", "capsv.bin.export", "--exp", str(exp), "--out", str(out), *extra]


def run_export(exp, out, *extra):
    r = subprocess.run(export_cmd(exp, out, *extra), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def standalone_scores(tmp_path, fmt, export_dir, data_dir):
    script = tmp_path / "score_without_capsv.py"
    script.write_text(STANDALONE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(script), fmt, str(export_dir), str(data_dir)], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return [(e, t, float(s), float(d)) for e, t, s, d in (line.split() for line in r.stdout.splitlines())]


def stage3_scores(exp):
    """(enroll, test, score) of stage 3's score file, in trial order."""
    rows = (line.split() for line in open(exp / "scores/synth_test.score"))
    return [(e, t, float(s)) for e, t, s in rows]


def assert_same_as_stage3(got, want):
    assert [(e, t) for e, t, *_ in got] == [(e, t) for e, t, _ in want]
    s, d, ref = (np.array(c) for c in zip(*[(g[2], g[3], w[2]) for g, w in zip(got, want)]))
    assert np.abs(s - ref).max() < 1e-5, np.abs(s - ref).max()
    assert np.abs(d - ref).max() < 1e-5, np.abs(d - ref).max()
    assert ref.std() > 1e-2        # the scores differ between trials: a constant would not pass by chance


def live_copy(root, name, tmp, **eval_cfg):
    """A copy of exp/<name> whose head BatchNorm has the statistics of the test crops' pooled vectors,
    scored by stage 3 (capsv.bin.score) into its scores/synth_test.score.

    A short training can leave the head's running statistics far from what evaluation crops give (after two
    tiny epochs every SAP embedding was 0 after the ReLU, so every score 0.000000, which an export of anything
    would match); re-estimating them keeps the comparison meaningful whatever the fixture's training. `eval_cfg` changes its eval.* settings (stage 3's and the export's).
    """
    net, state, _ = load_net(str(root / f"exp/{name}"))
    data = root / "data/synth_test"
    _, nframes, scp = read_data_dir(str(data))
    reader = ArkReader(scp)
    with torch.no_grad():
        x = torch.from_numpy(np.concatenate([utterance_crops(reader, u, n, 350, 2) for u, n in nframes.items()]))
        f = net.frames(x)
        pooled = net.pool.single(f) if not net.pair_dependent else net.pool.grid(f, f)[0].flatten(0, 1)
    model = dict(state["model"])
    model["head.0.running_mean"], model["head.0.running_var"] = pooled.mean(0), pooled.var(0)
    exp = tmp / f"exp/{name}_live"
    checkpoint.save_checkpoint(str(exp / "models"), state["epoch"], {**state, "model": model})
    cfg = yaml.safe_load((root / f"exp/{name}/config.yaml").read_text())
    cfg["eval"].update(eval_cfg)
    (exp / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "capsv.bin.score", "--exp", str(exp), "--data", str(data),
                        "--trials", str(data / "trials"), "--out", str(exp / "scores/synth_test.score")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return exp


@pytest.fixture(scope="module")
def cap_export(trained_recipe, tmp_path_factory):
    """(live copy of exp/small_cap, its export with --onnx).

    The test utterances have 226-291 frames: 350-frame crops repeat each one from its start, so this copy
    scores 5 crops of 150 frames at distinct offsets, not the export's example size either.
    """
    tmp = tmp_path_factory.mktemp("cap_export")
    exp = live_copy(trained_recipe, "small_cap", tmp, num_crops=5, crop_frames=150)
    run_export(exp, tmp / "export", "--onnx")
    return exp, tmp / "export"


def test_cap_export_scores_equal_stage3_torchscript_and_onnx(trained_recipe, cap_export, tmp_path):
    exp, out = cap_export
    rec = json.loads((out / "export.json").read_text())
    assert rec["pooling"] == "cap" and rec["eval"] == {"num_crops": 5, "crop_frames": 150}
    assert rec["fbank"]["torchaudio_kaldi_fbank_kwargs"]["num_mel_bins"] == 40
    assert rec["sha256"] == {f: sha256(out / f) for f in ("trunk.pt", "trunk.onnx", "score.pt", "score.onnx")}
    want = stage3_scores(exp)
    for fmt in ("torchscript", "onnx"):
        assert_same_as_stage3(standalone_scores(tmp_path, fmt, out, trained_recipe / "data/synth_test"), want)


def test_sap_export_embed_and_score_equal_stage3(trained_recipe, tmp_path):
    exp = live_copy(trained_recipe, "small_sap", tmp_path)
    out = tmp_path / "sap_export"
    out.mkdir()
    (out / "score.onnx").write_text("an earlier export's file")     # not part of this export: removed
    # thresholds set by scores of a bf16 GPU run: the fp32 export says so in one line
    (exp / "calibration.json").write_text(json.dumps({"precision": "bf16", "device_type": "cuda"}))
    r = run_export(exp, out)
    assert [line for line in r.stderr.splitlines() if "WARNING" in line] == [
        f"WARNING: the exported model computes in fp32, but the scores that set the thresholds in {exp}/calibration.json "
        f"were computed at bf16 on cuda: its scores may differ slightly from theirs"]
    assert sorted(p.name for p in out.iterdir()) == ["embed.pt", "export.json", "score.pt", "trunk.pt"]
    rec = json.loads((out / "export.json").read_text())
    assert rec["eval"] == {"num_crops": 10, "crop_frames": 350} and rec["precision"] == "fp32"
    got = standalone_scores(tmp_path, "torchscript", out, trained_recipe / "data/synth_test")
    assert_same_as_stage3(got, stage3_scores(exp))


def test_other_crop_counts_and_lengths_match_the_model(trained_recipe, cap_export):
    """The files were exported at one size; unequal crop counts and lengths give the model's values."""
    exp, out = cap_export
    net, _, _ = load_net(str(exp))
    trunk, score = torch.jit.load(str(out / "trunk.pt")), torch.jit.load(str(out / "score.pt"))
    import onnxruntime
    onnx_score = onnxruntime.InferenceSession(str(out / "score.onnx"), providers=["CPUExecutionProvider"])
    _, nframes, scp = read_data_dir(str(trained_recipe / "data/synth_test"))
    reader, (u, v) = ArkReader(scp), sorted(nframes)[:2]
    xa = torch.from_numpy(utterance_crops(reader, u, nframes[u], 137, 3))
    xb = torch.from_numpy(utterance_crops(reader, v, nframes[v], 222, 7))
    with torch.no_grad():
        fa, fb = net.frames(xa), net.frames(xb)
        assert (trunk(xa) - fa).abs().max() < 1e-5 and trunk(xb).shape == fb.shape == (7, 56, 128)
        ea, eb = net.embed_grid(fa, fb)                 # the model's own pair embeddings, [7, 3, 512]
        cos = torch.nn.functional.cosine_similarity(ea, eb, dim=-1).mean()
        s, ga, gb = score(fa, fb)
    assert abs(float(s) - float(cos)) < 1e-5
    big = ea.abs().max()           # the live head scales the embeddings up: compare relative to it
    assert (ga - ea).abs().max() < 1e-5 * big and (gb - eb).abs().max() < 1e-5 * big
    o = onnx_score.run(None, {"frames_a": fa.numpy(), "frames_b": fb.numpy()})
    assert abs(float(o[0]) - float(cos)) < 1e-5 and np.abs(o[1] - ea.numpy()).max() < 1e-5 * float(big)


def test_standalone_crops_are_stage3_crops(trained_recipe):
    ns = {"__name__": "not_main"}
    exec(STANDALONE, ns)
    _, nframes, scp = read_data_dir(str(trained_recipe / "data/synth_test"))
    reader = ArkReader(scp)
    u = sorted(nframes)[0]
    feats = reader.read(u, 0, nframes[u])
    for length in (nframes[u] + 50, nframes[u] - 7, 40):     # shorter than a crop (repeated), and not
        assert np.array_equal(ns["crops"](feats, 4, length), utterance_crops(reader, u, nframes[u], length, 4))


def test_no_checkpoint_is_one_line(trained_recipe, tmp_path):
    exp = tmp_path / "exp/untrained"
    (exp / "models").mkdir(parents=True)
    (exp / "config.yaml").write_text((trained_recipe / "exp/small_cap/config.yaml").read_text())
    for bad, why in ((exp, "no readable checkpoint"), (tmp_path / "exp/none", "no such directory")):
        r = subprocess.run(export_cmd(bad, tmp_path / "out"), cwd=ROOT, capture_output=True, text=True)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("ERROR: "), r.stderr
        assert str(bad) in lines[0] and why in lines[0] and "stage 2" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
