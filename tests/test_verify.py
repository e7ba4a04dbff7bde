"""capsv.bin.verify: audio files scored as stages 1 and 3 score them, decided at stage 4's calibrated thresholds and
by the Bayes decision on stage 4's calibrated LLR."""
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml
from scipy.signal import resample_poly

from capsv import checkpoint
from capsv.calibration import FILE, file_features, fit_llr_map, read_files, score_files
from capsv.metrics import compute_eer, compute_min_dcf
from capsv.models.speaker_net import SpeakerNet
from capsv.trials import read_scores, read_trials

ROOT = Path(__file__).resolve().parent.parent


def python_m(module, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "pysrc") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=ROOT)


def verify(*args):
    return python_m("capsv.bin.verify", *args)


def stage3(root, system):
    """(trials, stage-3 scores, {utt: wav path}) of the fixture's test list."""
    data = root / "data/synth_test"
    trials = read_trials(data / "trials")
    scores = read_scores(root / "exp" / system / "scores/synth_test.score", trials)
    wav = dict(line.split(maxsplit=1) for line in (data / "wav.scp").read_text().splitlines())
    return trials, scores, wav


def run(module, *args):
    r = python_m(module, *args)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def live_sap(trained_recipe, tmp_path_factory):
    """Root of a copy of the fixture's SAP exp that gives informative scores, re-scored by stages 3 and 4.

    After 2 epochs the SAP head's BatchNorm running mean lies above every test crop's pooled vector, so the
    ReLU is dead and stage 3 scores every trial 0, which any scorer would match. Zeroing that mean revives it.
    Its crops are 200 frames: the small corpus's test utterances (2.2-3 s) are shorter than the usual
    350, so only crops shorter than them start at 10 different offsets, as on real data.
    """
    root = tmp_path_factory.mktemp("live_sap")
    exp = root / "exp/small_sap"
    shutil.copytree(trained_recipe / "exp/small_sap", exp, ignore=shutil.ignore_patterns("models", "scores"))
    cfg = yaml.safe_load((exp / "config.yaml").read_text())
    cfg["eval"]["crop_frames"] = 200
    (exp / "config.yaml").write_text(yaml.safe_dump(cfg))
    state = checkpoint.load_for_inference(trained_recipe / "exp/small_sap")
    state["model"]["head.0.running_mean"].zero_()
    checkpoint.save_checkpoint(exp / "models", state["epoch"], state)
    (root / "data").symlink_to(trained_recipe / "data")
    data, score = root / "data/synth_test", exp / "scores/synth_test.score"
    run("capsv.bin.score", "--exp", exp, "--data", data, "--trials", data / "trials", "--out", score)
    run("capsv.bin.compute_metrics", "--trials", data / "trials", "--scores", score, "--results", exp / "results.txt",
        "--exp", exp, "--data", data, "--name", "small_sap")
    assert len(set(read_scores(score, read_trials(data / "trials")))) > 40   # of 300 trials
    return root


def some_trials(trials):
    """Three target trials and the first non-target one."""
    return [*range(3), next(i for i, t in enumerate(trials) if not t[2])]


def output_rows(r):
    assert r.returncode == 0, r.stderr
    return [line.split() for line in r.stdout.splitlines()]


def test_calibrated_thresholds_are_the_stage3_scores_eer_and_min_dcf_thresholds(trained_recipe):
    for system in ("small_cap", "small_sap"):
        trials, scores, _ = stage3(trained_recipe, system)
        cal = json.loads((trained_recipe / "exp" / system / FILE).read_text())
        labels = [t[2] for t in trials]
        for key, (_, want) in (("eer", compute_eer(scores, labels)), ("min_dcf_0.05", compute_min_dcf(scores, labels))):
            assert cal["thresholds"][key] == (None if np.isinf(want) else want)   # null: reject every trial
        assert cal["epoch"] == 10 and cal["score_kind"] == "raw" and cal["list"] == "synth_test"
        assert cal["fbank"]["checked_against"]["utterance"] in {u for t in trials for u in t[:2]}
        # the LLR map is the fit of these scores; the checkpoint, precision and device are those that scored them
        m = cal["map"]
        assert (m["a"], m["b"]) == fit_llr_map(scores, labels, 0.05) and m["p_target"] == 0.05
        assert m["list"] == "synth_test" and m["trials_sha256"] == cal["trials_sha256"]
        newest = checkpoint.load_for_inference(trained_recipe / "exp" / system)
        assert cal["checkpoint_sha256"] == newest["sha256"] == hashlib.sha256(Path(newest["file"]).read_bytes()).hexdigest()
        info = json.loads((trained_recipe / "exp" / system / "scores/synth_test.score.json").read_text())
        assert (cal["precision"], cal["device_type"]) == (info["precision"], info["device_type"]) == ("fp32", "cpu")


@pytest.mark.parametrize("system", ["small_cap", "small_sap"])
def test_scores_equal_stage3_and_decisions_follow_the_thresholds(trained_recipe, live_sap, tmp_path, system):
    root = trained_recipe if system == "small_cap" else live_sap
    trials, scores, wav = stage3(root, system)
    picked = some_trials(trials)
    pairs = [(wav[trials[i][0]], wav[trials[i][1]]) for i in picked]
    extra = []
    if system == "small_cap":
        # the first trial's test file at 22.05 kHz in stereo: resampled and averaged as stage 1 does
        x, sr = soundfile.read(pairs[0][1], dtype="float32")
        y = resample_poly(x, 441, 320).astype(np.float32)
        soundfile.write(tmp_path / "b22k.wav", np.stack([y, 0.5 * y], 1), 22050, subtype="PCM_16")
        extra = [(pairs[0][0], str(tmp_path / "b22k.wav"))]
    (tmp_path / "pairs.txt").write_text("".join(f"{a} {b}\n" for a, b in pairs + extra))
    rows = output_rows(verify("--exp", root / "exp" / system, "--pairs", tmp_path / "pairs.txt"))
    assert [tuple(r[:2]) for r in rows] == pairs + extra
    got = np.array([float(r[2]) for r in rows])
    np.testing.assert_allclose(got[:len(pairs)], scores[picked], rtol=0, atol=1e-5)
    cal = json.loads((root / "exp" / system / FILE).read_text())
    t, m = cal["thresholds"], cal["map"]
    for r, s in zip(rows, got):
        assert r[3:5] == ["accept" if t[k] is not None and s >= t[k] else "reject" for k in ("eer", "min_dcf_0.05")]
        assert len(r) == 7 and r[6] == ("accept" if float(r[5]) > math.log(0.95 / 0.05) else "reject")
    # the LLR is a * score + b of stage 3's score, and what stage 4's LLR file holds for the trial
    llr = np.array([float(r[5]) for r in rows])
    np.testing.assert_allclose(llr[:len(pairs)], m["a"] * scores[picked] + m["b"], rtol=0, atol=2e-5 * abs(m["a"]) + 1e-6)
    llr_file = read_scores(root / "exp" / system / "scores/synth_test.llr.score", trials)
    np.testing.assert_allclose(llr[:len(pairs)], llr_file[picked], rtol=0, atol=2e-5 * abs(m["a"]) + 1e-6)
    if extra:   # the resampled copy scores as its original, far within the list's spread
        assert abs(got[-1] - got[0]) < 0.1 * scores.std()


def test_resampled_file_gives_the_original_frames(trained_recipe, tmp_path):
    _, _, wav = stage3(trained_recipe, "small_cap")
    opts = json.loads((trained_recipe / "exp/small_cap" / FILE).read_text())["fbank"]["options"]
    src = next(iter(wav.values()))
    x, _ = soundfile.read(src, dtype="float32")
    soundfile.write(tmp_path / "r.flac", resample_poly(x, 441, 320), 22050)
    a, b = file_features(src, opts), file_features(str(tmp_path / "r.flac"), opts)
    assert a.shape == b.shape                                 # not 22050/16000 times as many frames
    assert np.abs(a - b).mean() < 0.05 * np.abs(a - a[::-1]).mean()


def test_each_distinct_file_runs_through_the_trunk_once(live_sap):
    _, _, wav = stage3(live_sap, "small_sap")
    a, b = list(wav.values())[:2]
    exp = live_sap / "exp/small_sap"
    cal = json.loads((exp / FILE).read_text())
    reader, trials = read_files([(a, b), (b, a), (a, a), (a, b)], cal["fbank"]["options"])
    assert len(reader.mats) == 2 and trials[0] == trials[3] and trials[2][0] == trials[2][1]
    state = checkpoint.load_for_inference(exp)
    net = SpeakerNet.from_config(state["config"])
    net.load_state_dict(state["model"])
    net.eval()
    seen, frames = [], net.frames
    net.frames = lambda x: seen.append(len(x)) or frames(x)
    scores = score_files(net, reader, trials, cal["eval"], torch.device("cpu"), 8)
    assert sum(seen) == 2 * cal["eval"]["num_crops"]
    assert scores[0] == scores[3] and abs(scores[0] - scores[1]) < 1e-6   # (b, a) is (a, b)


def test_verify_decides_with_the_recorded_fbank_options_and_says_when_precision_differs(trained_recipe, tmp_path):
    """calibration.json's options are the ones used (not conf/fbank.conf as it may be now); thresholds set by
    scores of another precision (here: a bf16 GPU run) are used with a one-line warning."""
    trials, scores, wav = stage3(trained_recipe, "small_cap")
    exp = tmp_path / "small_cap"
    shutil.copytree(trained_recipe / "exp/small_cap", exp)
    cal = json.loads((exp / FILE).read_text())
    cal["fbank"]["options"]["frame_shift"] = 12.5
    cal["precision"], cal["device_type"] = "bf16", "cuda"
    (exp / FILE).write_text(json.dumps(cal))
    r = verify("--exp", exp, "--p-target", "0.5", wav[trials[0][0]], wav[trials[0][1]])
    [row] = output_rows(r)
    assert row[:2] == [wav[trials[0][0]], wav[trials[0][1]]] and abs(float(row[2]) - scores[0]) > 1e-5
    assert row[6] == ("accept" if float(row[5]) > 0 else "reject")       # the Bayes threshold at prior 0.5
    assert [line for line in r.stderr.splitlines() if not line.startswith("# ")] == [
        "WARNING: scoring at fp32 on cpu, but the scores that set the thresholds were computed at bf16 on cuda: "
        "scores may differ slightly (set eval.precision / --device to match)"]
    assert "Bayes decision at P_target 0.5: accept iff llr > 0.000000" in r.stderr


def one_error_line(r, *needles):
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: "), r.stderr
    for n in needles:
        assert str(n) in lines[0], lines[0]


def test_bad_input_is_one_line(trained_recipe, tmp_path):
    _, _, wav = stage3(trained_recipe, "small_cap")
    good = next(iter(wav.values()))
    exp = trained_recipe / "exp/small_cap"
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(bytes(range(256)) * 16)
    one_error_line(verify("--exp", exp, good, garbage), garbage, "not audio that stage 1 can read")
    one_error_line(verify("--exp", exp, good, tmp_path / "absent.wav"), tmp_path / "absent.wav", "no such audio file")
    (tmp_path / "bad_pairs.txt").write_text(f"{good} {good}\n{good}\n")
    one_error_line(verify("--exp", exp, "--pairs", tmp_path / "bad_pairs.txt"), "bad_pairs.txt:2", "two audio paths")
    one_error_line(verify("--exp", exp, good), "give two audio files")

    copy = tmp_path / "small_cap"
    shutil.copytree(exp, copy)
    cal = json.loads((copy / FILE).read_text())
    cal["epoch"] = 1                     # scores of an older checkpoint than the newest
    (copy / FILE).write_text(json.dumps(cal))
    one_error_line(verify("--exp", copy, good, good), "epoch 1", "newest checkpoint is epoch 10",
                   "re-run stages 3 and 4")
    # a retrained experiment: a checkpoint of the same epoch with other weights
    cal["epoch"] = 10
    (copy / FILE).write_text(json.dumps(cal))
    state = checkpoint.load_for_inference(copy)
    state["model"]["head.0.running_mean"] += 0.01
    checkpoint.save_checkpoint(copy / "models", 10, {k: v for k, v in state.items() if k not in ("file", "sha256")})
    one_error_line(verify("--exp", copy, good, good), "another checkpoint", cal["checkpoint_sha256"][:12],
                   "the same epoch 10", "re-run stages 3 and 4")
    # a calibration.json of an earlier version of stage 4: no map, no checkpoint hash
    for k in ("map", "checkpoint_sha256"):
        del cal[k]
    (copy / FILE).write_text(json.dumps(cal))
    one_error_line(verify("--exp", copy, good, good), copy / FILE, "map, checkpoint_sha256", "re-run stage 4")
    (copy / FILE).unlink()
    one_error_line(verify("--exp", copy, good, good), copy / FILE, "run stage 4")
