"""run.sh end to end on a tiny corpus (stages 0-4), re-entry at stage 3, and bad input at the top."""
import hashlib
import os
import shutil
import subprocess

import pytest
import yaml

from capsv import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_recipe(tmp, *args):
    cmd = ["bash", "run.sh", "--synth-size", "tiny", "--data", f"{tmp}/data", "--exp", f"{tmp}/exp",
           "--fbankdir", f"{tmp}/fbank", "--corpusdir", f"{tmp}/corpus", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def mtimes(paths):
    return {p: os.stat(p).st_mtime_ns for p in paths}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """One full run with a tiny CAP config: the mini config with fewer speakers per batch and 2 epochs."""
    tmp = tmp_path_factory.mktemp("recipe")
    with open(f"{ROOT}/conf/mini/cap.yaml") as f:
        cfg = yaml.safe_load(f)
    cfg["train"].update(epochs=2, speakers_per_batch=4, num_workers=0)
    with open(tmp / "tiny_cap.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    r = run_recipe(tmp, "--config", str(tmp / "tiny_cap.yaml"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp, r


def test_full_run_writes_every_stage(recipe):
    tmp, r = recipe
    exp = tmp / "exp/tiny_cap"
    for f in ["data/synth_train/feats.scp", "data/synth_test/trials", "data/synth_test/utt2num_frames",
              "exp/tiny_cap/config.yaml", "exp/tiny_cap/train_log.csv", "exp/tiny_cap/log/train.log",
              "exp/tiny_cap/models/epoch_0002.pt", "exp/tiny_cap/det.png"]:
        assert (tmp / f).is_file(), f
    trials = (tmp / "data/synth_test/trials").read_text().split("\n")[:-1]
    scores = (exp / "scores/synth_test.score").read_text().split("\n")[:-1]
    assert [t.split()[:2] for t in trials] == [s.split()[:2] for s in scores]
    assert "epoch 2: loss" in (exp / "log/train.log").read_text() and "epoch 2: loss" in r.stdout
    lines = (exp / "results.txt").read_text().splitlines()
    assert lines[0] == "# system: tiny_cap" and lines[1].split() == [
        "#", "list", "EER(%)", "minDCF(0.05)", "minDCF(0.01)", "trials", "targets", "epoch", "sha256", "path",
        "Cllr", "minCllr", "actDCF(0.05)", "actDCF(0.01)", "calibrated_on"]
    row = lines[2].split()
    assert len(lines) == 3 and row[0] == "synth_test" and row[4:7] == ["48", "24", "2"]
    assert 0 <= float(row[1]) <= 100 and 0 <= float(row[2]) <= 1 and 0 <= float(row[3]) <= 1
    assert row[7] == hashlib.sha256((tmp / "data/synth_test/trials").read_bytes()).hexdigest()
    assert row[8] == str(tmp / "data/synth_test/trials") and lines[2] in r.stdout
    assert (tmp / "exp/baseline_mean_fbank/results.txt").is_file()


def test_rerun_from_stage_3_keeps_stages_0_to_2(recipe):
    tmp, _ = recipe
    kept = [tmp / "data/synth_train/wav.scp", tmp / "data/synth_train/feats.scp",
            tmp / "exp/tiny_cap/models/epoch_0002.pt", tmp / "exp/tiny_cap/train_log.csv",
            next((tmp / "corpus/synth/wav").rglob("*.wav"))]
    before = mtimes(kept)
    score = tmp / "exp/tiny_cap/scores/synth_test.score"
    score_before = os.stat(score).st_mtime_ns
    r = run_recipe(tmp, "--config", str(tmp / "tiny_cap.yaml"), "--stage", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stage 0" not in r.stdout and "stage 1" not in r.stdout and "stage 2" not in r.stdout
    assert "stage 3" in r.stdout and "stage 4" in r.stdout
    assert mtimes(kept) == before
    # stage 3 ran again, found its archives and score file made from the same checkpoint and list, and kept them
    assert "trunk ran on 0 crops" in r.stdout and "synth_test.score up to date" in r.stdout
    assert os.stat(score).st_mtime_ns == score_before


def test_second_config_trains_into_its_own_exp(recipe):
    """The ablation is a --config swap: SAP on the same features, its own exp dir."""
    tmp, _ = recipe
    cfg = yaml.safe_load((tmp / "tiny_cap.yaml").read_text())
    cfg["model"]["pooling"] = "sap"
    cfg["train"]["epochs"] = 1
    (tmp / "tiny_sap.yaml").write_text(yaml.safe_dump(cfg))
    r = run_recipe(tmp, "--config", str(tmp / "tiny_sap.yaml"), "--stage", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp / "exp/tiny_sap/results.txt").is_file() and (tmp / "exp/tiny_cap/results.txt").is_file()


def test_stage_4_refuses_scores_of_an_earlier_checkpoint(recipe, tmp_path):
    """Training went on after stage 3 (a newer checkpoint): stage 4 stops in one line naming the stale score
    file, and writes nothing."""
    tmp, _ = recipe
    exp = tmp_path / "exp/tiny_cap"
    shutil.copytree(tmp / "exp/tiny_cap", exp)
    state = checkpoint.load_for_inference(exp)
    state = {k: v for k, v in state.items() if k not in ("file", "sha256")}
    state["epoch"] = 3
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    checkpoint.save_checkpoint(exp / "models", 3, state)
    before = (exp / "results.txt").read_bytes()
    r = subprocess.run(["bash", "run.sh", "--stage", "4", "--config", str(tmp / "tiny_cap.yaml"),
                        "--data", str(tmp / "data"), "--exp", str(tmp_path / "exp")], cwd=ROOT, capture_output=True, text=True)
    line = one_error_line(r)
    assert f"{exp}/scores/synth_test.score was scored with epoch 2's checkpoint, not with the newest one of {exp} " \
           f"(epoch_0003.pt): the scores are stale; re-run stage 3, then stage 4" in line
    assert (exp / "results.txt").read_bytes() == before


def one_error_line(r):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    return lines[0]


def test_unknown_option_and_stage(tmp_path):
    assert "--stgae" in one_error_line(run_recipe(tmp_path, "--stgae", "2"))
    assert "not a stage" in one_error_line(run_recipe(tmp_path, "--stage", "7"))
    assert not (tmp_path / "data").exists()


def test_unknown_config_key_from_run_sh(recipe):
    tmp, _ = recipe
    r = run_recipe(tmp, "--config", str(tmp / "tiny_cap.yaml"), "--stage", "2", "--stop-stage", "2",
                   "--train-opts", "train.epoch=3")
    line = one_error_line(r)
    assert "unknown config key 'train.epoch'" in line and "train.epochs" in line


@pytest.mark.parametrize("bad_line,message", [
    ("te0001-u001 nosuchspk-u009 target", "trials name utterance 'nosuchspk-u009' that is not in the data dir"),
    ("te0001-u001 te0001-u002", ":4: expected 3 fields `<enroll> <test> target|nontarget`, got 2"),
    ("te0001-u001 te0002-u002 1", ":4: label must be `target` or `nontarget`, got '1'"),
    (None, ":4: trial `{0}` repeats line 1"),
])
def test_bad_trials_stop_scoring(recipe, bad_line, message):
    """Stage 3's entry point on a trials file with one bad line: one line naming file and line, no score file."""
    tmp, _ = recipe
    bad = tmp / "bad_trials"
    good = (tmp / "data/synth_test/trials").read_text().splitlines()
    first = " ".join(good[0].split()[:2])
    bad.write_text("\n".join(good[:3] + [bad_line or good[0]]) + "\n")
    out = tmp / "exp/tiny_cap/scores/bad.score"
    r = subprocess.run(["bash", "-c", ". ./path.sh && python -m capsv.bin.score --exp $0 --data $1 --trials $2 --out $3",
                        str(tmp / "exp/tiny_cap"), str(tmp / "data/synth_test"), str(bad), str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    line = one_error_line(r)
    assert str(bad) in line and message.format(first) in line
    assert not out.exists()


def test_missing_wav_stops_stage_1(recipe, tmp_path):
    """A wav.scp naming a missing file: stage 1 fails naming it, and the old feats.scp survives."""
    tmp, _ = recipe
    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(tmp / "data"), str(data)], check=True)
    wav = data / "synth_test/wav.scp"
    lines = wav.read_text().splitlines()
    lines[1] = lines[1].split()[0] + " /nonexistent/missing.wav"
    wav.write_text("\n".join(lines) + "\n")
    feats_before = (data / "synth_test/feats.scp").read_text()
    r = subprocess.run(["bash", "run.sh", "--stage", "1", "--stop-stage", "1", "--data", str(data),
                        "--exp", str(tmp_path / "exp"), "--fbankdir", str(tmp_path / "fbank")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    assert "/nonexistent/missing.wav" in r.stdout + r.stderr
    assert (data / "synth_test/feats.scp").read_text() == feats_before


def test_train_opts_with_spaces_and_config_paths_name_the_exp(recipe):
    """`model.channels=[4, 4, 8, 8]` stays one override (here it differs from the trained exp, which
    says so by name); ./conf/mini/x.yaml and an absolute path into conf/ name the exp like conf/mini/x.yaml."""
    tmp, _ = recipe
    r = run_recipe(tmp, "--config", str(tmp / "tiny_cap.yaml"), "--stage", "2", "--stop-stage", "2",
                   "--train-opts", "model.channels=[4, 4, 8, 8] train.epochs=3")
    line = one_error_line(r)
    assert "was trained with different model.channels" in line and "train.epochs" not in line
    for config, name in [("./conf/mini/cap.yaml", "mini_cap"), (f"{ROOT}/conf/mini/sap.yaml", "mini_sap")]:
        line = one_error_line(run_recipe(tmp, "--config", config, "--stage", "3"))
        assert f"{tmp}/exp/{name}/config.yaml not found" in line, line


def results_eer(path):
    rows = [l.split() for l in path.read_text().splitlines() if not l.startswith("#")]
    return {r[0]: float(r[1]) for r in rows}


def train_loss(exp):
    rows = [l.split(",") for l in (exp / "train_log.csv").read_text().splitlines()]
    col = rows[0].index("loss")
    return [float(r[col]) for r in rows[1:]]


def test_training_learns(trained_recipe):
    """The recipe end to end (tests/conftest.py: run.sh stages 0-4 on the small corpus, 10 epochs, seed 1): CAP's
    EER on the 300 unseen-speaker trials is well below the no-training baseline's (46.00 %, the same everywhere).

    CPU training is bit-deterministic on one machine only, and another CPU or torch build moves a 10-epoch run
    as another seed does. CAP's EER over seeds 1-3 on AMD (30.67, 36.67, 33.33), seed 1 on Intel (32.00) and
    seed 1 under torch 2.11 (35.33): mean 33.6, sd 2.4; the bound, mean + 3 sd = 40.8, is 5 points under the
    baseline, and the worst run seen is 4.3 points inside it. SAP's spread at this budget reaches the baseline
    (28.00, 42.00, 45.33 on AMD seeds 1-3, 36.00 on Intel): its seed 3 barely trains in 10 epochs (loss 7.69 ->
    5.47, NP accuracy 0.26; seed 1: 7.04 -> 3.80, 0.61). So SAP is held to training: its loss falls by more than
    1 (over seeds 1-3 it fell by 3.24, 2.72 and 2.22)."""
    cap = results_eer(trained_recipe / "exp/small_cap/results.txt")["synth_test"]
    baseline = results_eer(trained_recipe / "exp/baseline_mean_fbank/results.txt")["synth_test"]
    assert baseline > 40, baseline               # utterance-mean fbank says next to nothing about the speaker
    assert cap < baseline - 5, (cap, baseline)
    sap = train_loss(trained_recipe / "exp/small_sap")
    assert len(sap) == 10 and sap[-1] < sap[0] - 1, sap
