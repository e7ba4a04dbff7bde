"""Trials parsing, VoxCeleb list conversion, score files, and the compute_metrics CLI."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from capsv.metrics import compute_eer, compute_min_dcf
from capsv.trials import (read_scores, read_trials, voxceleb_to_kaldi_trials, voxceleb_utt_id,
                          write_scores)
from capsv.utils import UserError

ROOT = Path(__file__).resolve().parents[1]
VOX_LIST = ROOT.parent / "shared" / "data" / "voxceleb1" / "veri_test.txt"


def write(path, text):
    path.write_text(text)
    return path


def test_read_trials(tmp_path):
    p = write(tmp_path / "trials", "a-1 b-1 target\na-1 c-2 nontarget\n\nb-1 c-2 nontarget\n")
    assert read_trials(p) == [("a-1", "b-1", True), ("a-1", "c-2", False), ("b-1", "c-2", False)]
    assert len(read_trials(p, known_utts={"a-1", "b-1", "c-2"})) == 3


def test_read_trials_bad_label(tmp_path):
    p = write(tmp_path / "trials", "a b target\na c 1\n")
    with pytest.raises(UserError, match=r"trials:2: label must be `target` or `nontarget`, got '1'"):
        read_trials(p)


def test_read_trials_bad_field_count(tmp_path):
    p = write(tmp_path / "trials", "a b target\na c\n")
    with pytest.raises(UserError, match=r"trials:2: expected 3 fields"):
        read_trials(p)


def test_read_trials_unknown_utt(tmp_path):
    p = write(tmp_path / "trials", "a b target\na x nontarget\ny x nontarget\n")
    with pytest.raises(UserError) as e:
        read_trials(p, known_utts={"a", "b"})
    msg = str(e.value)
    assert str(p) in msg and "'x'" in msg and "2 unknown" in msg
    assert "regenerate the trials or the data dir" in msg


def test_read_trials_missing_file(tmp_path):
    with pytest.raises(UserError, match="trials file not found"):
        read_trials(tmp_path / "nope")


def test_voxceleb_utt_id():
    assert voxceleb_utt_id("id10270/x6uYqmx31kE/00001.wav") == "id10270-x6uYqmx31kE-00001"
    assert voxceleb_utt_id("id10270/GWXujl-xAVM/00017.m4a") == "id10270-GWXujl-xAVM-00017"


@pytest.mark.skipif(not VOX_LIST.exists(), reason=f"VoxCeleb1 trial list not found at {VOX_LIST}")
def test_voxceleb_conversion_real_list(tmp_path):
    dst = tmp_path / "data" / "voxceleb1_test" / "trials"
    utts = voxceleb_to_kaldi_trials(VOX_LIST, dst)
    assert len(utts) == 4715
    assert len({u.split("-")[0] for u in utts}) == 40
    trials = read_trials(dst, known_utts=utts)
    assert len(trials) == 37720
    assert trials[0] == ("id10270-x6uYqmx31kE-00001", "id10270-8jEAjG6SegY-00008", True)
    assert trials[1] == ("id10270-x6uYqmx31kE-00001", "id10300-ize_eiCFEg0-00003", False)
    # order and labels kept, line for line
    src = [line.split() for line in VOX_LIST.read_text().splitlines() if line.strip()]
    assert [t[2] for t in trials] == [s[0] == "1" for s in src]
    assert all(t[0] == voxceleb_utt_id(s[1]) and t[1] == voxceleb_utt_id(s[2]) for t, s in zip(trials, src))
    # every trial's speakers agree with its label
    assert all((e.split("-")[0] == t.split("-")[0]) == lab for e, t, lab in trials)
    # an utterance missing from the data dir is named
    missing = trials[5][1]
    with pytest.raises(UserError, match=f"'{missing}'.*1 unknown.*regenerate the trials or the data dir"):
        read_trials(dst, known_utts=utts - {missing})


def test_voxceleb_bad_list(tmp_path):
    src = write(tmp_path / "list.txt", "1 a/b/c.wav a/b/d.wav\n2 a/b/c.wav a/b/d.wav\n")
    with pytest.raises(UserError, match=r"list.txt:2: expected `1\|0"):
        voxceleb_to_kaldi_trials(src, tmp_path / "trials")
    assert not (tmp_path / "trials").exists()


def test_scores_round_trip(tmp_path):
    trials = [("a", "b", True), ("a", "c", False), ("b", "c", False)]
    scores = np.array([0.123456, -0.5, 3.0])
    p = tmp_path / "scores" / "trials.score"
    write_scores(p, trials, scores)
    assert p.read_text().splitlines()[0] == "a b 0.123456"
    np.testing.assert_allclose(read_scores(p, trials), scores, atol=1e-6)


def test_scores_mismatch(tmp_path):
    trials = [("a", "b", True), ("a", "c", False), ("b", "c", False)]
    p = write(tmp_path / "s.score", "a b 0.1\nb c 0.2\na c 0.3\n")
    with pytest.raises(UserError) as e:
        read_scores(p, trials, trials_path="data/x/trials")
    msg = str(e.value)
    assert f"{p}:2" in msg and "data/x/trials" in msg and "re-run stage 3" in msg
    with pytest.raises(UserError, match="has 2 lines but .* has 3 trials"):
        read_scores(write(tmp_path / "short.score", "a b 0.1\na c 0.2\n"), trials)
    with pytest.raises(UserError, match="more lines than the 3 trials"):
        read_scores(write(tmp_path / "long.score", "a b 1\na c 2\nb c 3\nb d 4\n"), trials)
    with pytest.raises(UserError, match=r"bad.score:1: score 'x' is not a finite number"):
        read_scores(write(tmp_path / "bad.score", "a b x\na c 2\nb c 3\n"), trials)


def run_cli(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "pysrc") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "capsv.bin.compute_metrics", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT)


def make_set(tmp_path, name, n, d, seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    trials = [(f"s{i % 7}-u{i}", f"s{(i + 3) % 7}-v{i}", bool(y)) for i, y in enumerate(labels)]
    tp = tmp_path / "data" / name / "trials"
    tp.parent.mkdir(parents=True)
    tp.write_text("".join(f"{e} {t} {'target' if y else 'nontarget'}\n" for e, t, y in trials))
    scores = rng.normal(size=n) + d * labels
    sp = tmp_path / "exp" / "cap" / "scores" / f"{name}.score"
    write_scores(sp, trials, scores)
    return tp, sp, read_scores(sp, trials), labels


def test_compute_metrics_cli(tmp_path):
    tp, sp, scores, labels = make_set(tmp_path, "synth_test", 400, 2.5, 0)
    res = tmp_path / "exp" / "cap" / "results.txt"
    det = tmp_path / "exp" / "cap" / "det.png"
    r = run_cli("--trials", tp, "--scores", sp, "--results", res, "--det", det, "--name", "cap")
    assert r.returncode == 0, r.stderr
    text = res.read_text()
    assert r.stdout == text
    eer, _ = compute_eer(scores, labels)
    dcf5, _ = compute_min_dcf(scores, labels, 0.05)
    dcf1, _ = compute_min_dcf(scores, labels, 0.01)
    [row] = [l.split() for l in text.splitlines() if not l.startswith("#")]
    assert row[:9] == ["synth_test", f"{eer * 100:.2f}", f"{dcf5:.4f}", f"{dcf1:.4f}", "400", str(labels.sum()),
                       "-", hashlib.sha256(tp.read_bytes()).hexdigest(), str(tp)]   # "-": no .json beside the scores
    assert len(row) == 14 and row[13] == "synth_test"     # then Cllr, minCllr, actDCF x 2, calibrated on itself
    assert det.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compute_metrics_cli_several_lists(tmp_path):
    a = make_set(tmp_path, "test_a", 300, 2.0, 1)
    b = make_set(tmp_path, "test_b", 200, 3.0, 2)
    res = tmp_path / "results.txt"
    r = run_cli("--trials", a[0], "--scores", a[1], "--trials", b[0], "--scores", b[1],
                "--results", res, "--det", tmp_path / "det.png")
    assert r.returncode == 0, r.stderr
    rows = [l.split() for l in res.read_text().splitlines() if not l.startswith("#")]
    assert [r[0] for r in rows] == ["test_a", "test_b"] and [r[8] for r in rows] == [str(a[0]), str(b[0])]
    assert [r[4] for r in rows] == ["300", "200"]


def test_compute_metrics_refuses_scores_of_another_trials_version(tmp_path):
    tp, sp, _, _ = make_set(tmp_path, "synth_test", 50, 2.0, 0)
    sp.with_name(sp.name + ".json").write_text('{"epoch": 7, "trials_sha256": "0000"}')
    r = run_cli("--trials", tp, "--scores", sp, "--results", tmp_path / "res.txt")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert f"{sp} was scored on another version of {tp}; re-run stage 3" in r.stderr
    sp.with_name(sp.name + ".json").write_text(
        '{"epoch": 7, "trials_sha256": "%s"}' % hashlib.sha256(tp.read_bytes()).hexdigest())
    r = run_cli("--trials", tp, "--scores", sp, "--results", tmp_path / "res.txt")
    assert r.returncode == 0 and (tmp_path / "res.txt").read_text().splitlines()[2].split()[6] == "7"


def test_compute_metrics_cli_mismatch(tmp_path):
    tp, sp, _, _ = make_set(tmp_path, "synth_test", 50, 2.0, 0)
    lines = sp.read_text().splitlines(keepends=True)
    lines[3], lines[4] = lines[4], lines[3]
    sp.write_text("".join(lines))
    res = tmp_path / "results.txt"
    res.write_text("previous results\n")
    r = run_cli("--trials", tp, "--scores", sp, "--results", res, "--det", tmp_path / "det.png")
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR: ")
    assert f"{sp}:4" in err[0] and str(tp) in err[0] and "re-run stage 3" in err[0]
    assert res.read_text() == "previous results\n"  # nothing already written is lost
    assert not (tmp_path / "det.png").exists()


def test_compute_metrics_cli_one_class(tmp_path):
    tp = write(tmp_path / "trials", "a b target\na c target\n")
    sp = write(tmp_path / "s.score", "a b 0.1\na c 0.2\n")
    r = run_cli("--trials", tp, "--scores", sp, "--results", tmp_path / "res.txt")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "only target trials" in r.stderr and str(tp) in r.stderr
