"""Stage 4's results page (RESULTS.md), score histograms, calibration record, calibrated LLR files and measures, and
AS-norm lines, through run.sh and capsv.bin.compute_metrics."""
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import torch
import torchaudio

from capsv.calibration import fit_llr_map
from capsv.metrics import compute_act_dcf, compute_cllr, compute_eer, compute_min_cllr, compute_min_dcf
from capsv.trials import read_scores, read_trials, write_scores

ROOT = Path(__file__).resolve().parent.parent


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def results_rows(exp):
    return [line.split() for line in (exp / "results.txt").read_text().splitlines() if not line.startswith("#")]


def page_table(page, heading):
    """The cells of the first Markdown table after `heading`, header and rule left out."""
    lines = page.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().strip("`") for c in line.strip("|").split("|")])
    return rows


def brute_rates(scores, labels, t):
    """Miss and false-alarm rates of `accept iff score >= t` (None: accept nothing), by counting."""
    acc = [t is not None and s >= t for s in scores]
    tar = [a for a, y in zip(acc, labels) if y]
    non = [a for a, y in zip(acc, labels) if not y]
    return 1 - sum(tar) / len(tar), sum(non) / len(non)


def check_llr_columns(exp, rows, maps):
    """results.txt's calibrated columns (Cllr, minCllr, actDCF(0.05), actDCF(0.01), calibrated_on) of each list:
    its LLR file holds a * score + b of its stage-3 scores, with the map of `maps` ({list: (a, b)}, fitted here
    on the calibration list), and the measures are those of that file's LLRs."""
    for r in rows:
        if r[13] == "-":
            assert r[9:13] == ["-"] * 4 and not (exp / "scores" / f"{r[0]}.llr.score").exists()
            continue
        trials = read_trials(r[8])
        labels = np.array([t[2] for t in trials])
        raw = read_scores(exp / "scores" / f"{r[0]}.score", trials)
        llr = read_scores(exp / "scores" / f"{r[0]}.llr.score", trials)      # same pairs, same order
        a, b = maps[r[13]]
        np.testing.assert_allclose(llr, a * raw + b, rtol=0, atol=5e-7)
        info = json.loads((exp / "scores" / f"{r[0]}.llr.score.json").read_text())
        assert (info["map"]["a"], info["map"]["b"], info["map"]["list"]) == (a, b, r[13])
        assert info["raw_scores_sha256"] == sha(exp / "scores" / f"{r[0]}.score") and info["score_kind"] == "llr"
        assert r[9:13] == [f"{compute_cllr(llr, labels):.4f}", f"{compute_min_cllr(llr, labels):.4f}",
                           f"{compute_act_dcf(llr, labels, 0.05):.4f}", f"{compute_act_dcf(llr, labels, 0.01):.4f}"]


def check_page(exp):
    """RESULTS.md of `exp` against results.txt, config.yaml, calibration.json and the stage-3 scores."""
    page = (exp / "RESULTS.md").read_text()
    cal = json.loads((exp / "calibration.json").read_text())
    rows = results_rows(exp)
    assert all(len(r) == 14 for r in rows)
    # list, path, sha256, trials, targets, epoch, EER, minDCF(0.05), minDCF(0.01): results.txt's own fields
    assert page_table(page, "## Trial lists") == [[r[0], r[8], r[7], r[4], r[5], r[6], r[1], r[2], r[3]] for r in rows]
    # list, calibrated on, Cllr, minCllr, actDCF and minDCF at 0.05, then at 0.01
    assert page_table(page, "## Calibrated log-likelihood ratios") == [
        [r[0], r[13], r[9], r[10], r[11], r[2], r[12], r[3]] for r in rows]
    m = cal["map"]
    assert f"a = {m['a']:.6g}, b = {m['b']:.6g}" in page and f"On {m['list']} itself Cllr and actDCF are optimistic" in page
    assert f"SHA-256 `{sha(exp / 'config.yaml')}`" in page
    ckpt = Path(cal["checkpoint"])
    shown = os.path.relpath(ckpt, exp) if ckpt.resolve().is_relative_to(exp.resolve()) else str(ckpt)
    assert ckpt.is_file() and f"`{shown}`, epoch {cal['epoch']}" in page and cal["epoch"] == 10
    assert f"python {platform.python_version()}, torch {torch.__version__}, torchaudio {torchaudio.__version__}" in page
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page)
    assert sorted(links) == ["det.png", "score_hist.png", "train_curves.png"]   # stage 2 drew the curves
    for link in links:
        assert (exp / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # what the calibrated thresholds do on each raw list, counted
    decisions = page_table(page, "## Calibrated thresholds")
    for row in decisions:
        [r] = [r for r in rows if r[0] == row[0]]
        trials = read_trials(r[8])
        scores = read_scores(exp / "scores" / f"{r[0]}.score", trials)
        labels = [t[2] for t in trials]
        want = [f"{p * 100:.2f} %" for k in ("eer", "min_dcf_0.05")
                for p in brute_rates(scores, labels, cal["thresholds"][k])]
        assert row[1:] == want
    return page, rows, decisions


def test_results_page_of_the_recipe(trained_recipe):
    for system in ("small_cap", "small_sap"):
        exp = trained_recipe / "exp" / system
        page, rows, decisions = check_page(exp)
        assert [r[0] for r in rows] == ["synth_test"] and [d[0] for d in decisions] == ["synth_test"]
        cal = json.loads((exp / "calibration.json").read_text())
        check_llr_columns(exp, rows, {"synth_test": (cal["map"]["a"], cal["map"]["b"])})
        assert rows[0][13] == "synth_test" and float(rows[0][10]) <= float(rows[0][9])   # minCllr <= Cllr
        assert f"# Results: {system}" in page and f"({system[-3:].upper()} pooling)" in page
        assert "optimistic" in page and "optimistic" in json.loads((exp / "calibration.json").read_text())["note"]
        assert matplotlib.image.imread(exp / "score_hist.png").shape[1] == 420    # one panel


def run_sh(root, tmp, *args):
    """run.sh's stage 4 on copies under tmp of the fixture's test data dir and CAP exp dir."""
    return subprocess.run(["bash", "run.sh", "--synth-size", "small", "--data", f"{tmp}/data", "--exp", f"{tmp}/exp",
                           "--fbankdir", f"{root}/fbank", "--corpusdir", f"{root}/corpus",
                           "--config", f"{root}/small_cap.yaml", "--stage", "4", *args],
                          cwd=ROOT, capture_output=True, text=True)


def compute_metrics(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "pysrc") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "capsv.bin.compute_metrics", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT)


def test_asnorm_scores_are_reported_beside_the_raw_ones(trained_recipe, tmp_path):
    shutil.copytree(trained_recipe / "data/synth_test", tmp_path / "data/synth_test")
    exp = tmp_path / "exp/small_cap"
    shutil.copytree(trained_recipe / "exp/small_cap", exp, ignore=shutil.ignore_patterns("models"))
    os.symlink(trained_recipe / "exp/small_cap/models", exp / "models")
    raw_cal = json.loads((exp / "calibration.json").read_text())
    for f in ("results.txt", "RESULTS.md", "calibration.json", "det.png", "score_hist.png"):
        (exp / f).unlink()
    # stand-in AS-norm scores (the contract: <list>.asnorm.score and its .json beside <list>.score)
    trials = read_trials(tmp_path / "data/synth_test/trials")
    raw = read_scores(exp / "scores/synth_test.score", trials)
    labels = np.array([t[2] for t in trials])
    norm = (raw - raw.mean()) / raw.std() + 0.7 * labels * np.cos(np.arange(len(raw)))
    write_scores(exp / "scores/synth_test.asnorm.score", trials, norm)
    shutil.copy(exp / "scores/synth_test.score.json", exp / "scores/synth_test.asnorm.score.json")
    norm = read_scores(exp / "scores/synth_test.asnorm.score", trials)   # as written: 6 decimals

    r = run_sh(trained_recipe, tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # calibrating on the test set's own trials (the default) is said to be optimistic, once
    assert r.stdout.count("optimistic") == 1 and "calibrating on synth_test's own trials" in r.stdout
    rows = results_rows(exp)
    assert [r[0] for r in rows] == ["synth_test", "synth_test.asnorm"]
    for row, s in zip(rows, (raw, norm)):
        assert row[1:4] == [f"{compute_eer(s, labels)[0] * 100:.2f}", f"{compute_min_dcf(s, labels, 0.05)[0]:.4f}",
                            f"{compute_min_dcf(s, labels, 0.01)[0]:.4f}"]
    # the raw and the AS-norm scores each get the map fitted on their own kind of scores of the calibration list
    maps = {"synth_test": fit_llr_map(raw, labels), "synth_test.asnorm": fit_llr_map(norm, labels)}
    check_llr_columns(exp, rows, maps)
    assert [r[13] for r in rows] == ["synth_test", "synth_test.asnorm"]
    base = results_rows(tmp_path / "exp/baseline_mean_fbank")                  # the baseline gets them too
    assert [r[0] for r in base] == ["synth_test"] and base[0][13] == "synth_test"
    page, _, decisions = check_page(exp)
    assert [d[0] for d in decisions] == ["synth_test"]          # the thresholds are raw scores'
    cal = json.loads((exp / "calibration.json").read_text())
    assert cal["list"] == "synth_test" and cal["thresholds"] == raw_cal["thresholds"]
    assert matplotlib.image.imread(exp / "score_hist.png").shape[1] == 840    # a panel per list

    # calibrating on normalised scores, or on a list that is not there, is refused in one line
    r = compute_metrics("--trials", tmp_path / "data/synth_test/trials", "--scores",
                        exp / "scores/synth_test.asnorm.score", "--results", tmp_path / "r.txt", "--exp", exp,
                        "--calibrate", "synth_test.asnorm")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "calibrate on synth_test" in r.stderr
    assert not (tmp_path / "r.txt").exists()
    r = run_sh(trained_recipe, tmp_path, "--calibration-list", "trials_dev")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"run.sh: ERROR: --calibration-list trials_dev: no such trial list in {tmp_path}/data/synth_test; "
        f"name one of its trials, trials_<x> (stage 0 makes them)"]


def test_calibration_on_a_development_list_and_on_a_list_of_one_class(trained_recipe, tmp_path):
    data = tmp_path / "data/synth_test"
    shutil.copytree(trained_recipe / "data/synth_test", data)
    exp = tmp_path / "exp/small_cap"
    shutil.copytree(trained_recipe / "exp/small_cap", exp, ignore=shutil.ignore_patterns("models"))
    trials = read_trials(data / "trials")
    raw = read_scores(exp / "scores/synth_test.score", trials)
    labels = np.array([t[2] for t in trials])
    write_scores(exp / "scores/synth_test.asnorm.score", trials, raw - raw.mean())     # stand-in AS-norm scores
    shutil.copy(exp / "scores/synth_test.score.json", exp / "scores/synth_test.asnorm.score.json")
    (exp / "scores/synth_test.asnorm.llr.score").write_text("an earlier run's file\n")

    # a development list (every other trial), scored by stage 3: it calibrates the raw scores of every list;
    # the AS-norm list has no AS-norm scores of it to be calibrated on, so it gets none (its old LLR file goes)
    dev = [t for i, t in enumerate(trials) if i % 2]
    (data / "trials_dev").write_text("".join(f"{e} {t} {'target' if y else 'nontarget'}\n" for e, t, y in dev))
    write_scores(exp / "scores/synth_test_dev.score", dev, raw[1::2])
    info = json.loads((exp / "scores/synth_test.score.json").read_text())
    info.update(trials=str(data / "trials_dev"), n_trials=len(dev), trials_sha256=sha(data / "trials_dev"))
    (exp / "scores/synth_test_dev.score.json").write_text(json.dumps(info))
    lists = ["--trials", data / "trials", "--scores", exp / "scores/synth_test.score",
             "--trials", data / "trials", "--scores", exp / "scores/synth_test.asnorm.score",
             "--trials", data / "trials_dev", "--scores", exp / "scores/synth_test_dev.score"]
    r = compute_metrics(*lists, "--results", exp / "results.txt", "--exp", exp, "--data", data, "--name", "small_cap",
                        "--calibrate", "synth_test_dev")
    assert r.returncode == 0, r.stderr
    rows = results_rows(exp)
    assert [r[0] for r in rows] == ["synth_test", "synth_test.asnorm", "synth_test_dev"]
    check_llr_columns(exp, rows, {"synth_test_dev": fit_llr_map(raw[1::2], labels[1::2])})
    assert [r[13] for r in rows] == ["synth_test_dev", "-", "synth_test_dev"]
    assert not (exp / "scores/synth_test.asnorm.llr.score").exists()
    cal = json.loads((exp / "calibration.json").read_text())
    assert cal["list"] == cal["map"]["list"] == "synth_test_dev"
    check_page(exp)

    # a calibration list of one class: refused in one line before anything is written
    (data / "trials_tar").write_text("".join(f"{e} {t} target\n" for e, t, y in trials if y))
    before = {f: (exp / f).read_bytes() for f in ("results.txt", "calibration.json", "scores/synth_test.llr.score")}
    r = compute_metrics("--trials", data / "trials_tar", "--scores", exp / "scores/synth_test_tar.score",
                        "--results", exp / "results.txt", "--exp", exp, "--data", data)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"ERROR: the calibration list synth_test_tar ({data}/trials_tar) has only target trials (150): a calibration "
        f"needs both target and non-target trials; calibrate on a list with both (run.sh --calibration-list trials_<x>)"]
    assert {f: (exp / f).read_bytes() for f in before} == before


def test_fbank_options_changed_since_stage1_are_refused(trained_recipe, tmp_path):
    exp = tmp_path / "small_cap"
    shutil.copytree(trained_recipe / "exp/small_cap", exp, ignore=shutil.ignore_patterns("models"))
    before = {f: (exp / f).read_bytes() for f in ("results.txt", "calibration.json", "RESULTS.md")}
    conf = tmp_path / "fbank.conf"
    conf.write_text((ROOT / "conf/fbank.conf").read_text().replace("--frame-shift=10", "--frame-shift=12"))
    data = trained_recipe / "data/synth_test"
    args = ["--trials", data / "trials", "--scores", exp / "scores/synth_test.score", "--results",
            exp / "results.txt", "--exp", exp, "--data", data, "--name", "small_cap"]
    r = compute_metrics(*args, "--fbank-config", conf)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert f"{conf} does not give the features stage 1 made for {data}" in r.stderr
    assert "re-run stages 1 and 3" in r.stderr
    assert {f: (exp / f).read_bytes() for f in before} == before       # nothing written
    # the options as they were: accepted, recorded with their text, and the same files come out
    r = compute_metrics(*args, "--fbank-config", ROOT / "conf/fbank.conf")
    assert r.returncode == 0, r.stderr
    fbank = json.loads((exp / "calibration.json").read_text())["fbank"]
    assert fbank["text"] == (ROOT / "conf/fbank.conf").read_text() and fbank["options"]["frame_shift"] == 10.0
    assert (exp / "results.txt").read_bytes() == before["results.txt"]
