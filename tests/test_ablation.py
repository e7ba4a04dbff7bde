"""local/run_ablation.sh: the runs, the table's numbers against each run's results.txt, resumption, and
the paired bootstrap against cases whose answer is known."""
import os
import statistics
import subprocess

import numpy as np
import pytest

from capsv.ablation import bootstrap_pairs
from conftest import ROOT


class FakeRun:
    def __init__(self, pooling, seed, path):
        self.pooling, self.seed, self.scores_path = pooling, seed, str(path)


def write_scores(path, trials, scores):
    path.write_text("".join(f"{e} {t} {s:.6f}\n" for (e, t, _), s in zip(trials, scores)))


def speaker_trials(n_spk=30, per_spk=20, seed=0):
    rng = np.random.default_rng(seed)
    utt2spk, trials = {}, []
    for k in range(n_spk):
        for i in range(per_spk):
            utt2spk[f"s{k:02d}-u{i:02d}"] = f"s{k:02d}"
    for k in range(n_spk):
        for i in range(per_spk // 2):
            other = (k + 1 + rng.integers(n_spk - 1)) % n_spk
            trials.append((f"s{k:02d}-u{i:02d}", f"s{k:02d}-u{i + per_spk // 2:02d}", True))
            trials.append((f"s{k:02d}-u{i:02d}", f"s{other:02d}-u{i:02d}", False))
    return utt2spk, trials


def test_bootstrap_separates_a_clear_difference_and_not_a_tie(tmp_path):
    utt2spk, trials = speaker_trials()
    labels = np.array([t[2] for t in trials])
    rng = np.random.default_rng(1)
    good = labels * 2.0 + rng.normal(size=len(trials))            # EER about 16 %
    bad = labels * 0.3 + rng.normal(size=len(trials))             # EER about 44 %
    runs = []
    for name, s in (("tap", bad), ("cap", good), ("sap", good)):
        write_scores(tmp_path / f"{name}.score", trials, s)
        runs.append(FakeRun(name, 1, tmp_path / f"{name}.score"))
    out = bootstrap_pairs(runs, trials, utt2spk, n_boot=300)
    d, lo, hi, p = out[("tap", "cap")]
    assert -40 < d < -15 and hi < 0 and p < 0.01
    d, lo, hi, p = out[("cap", "sap")]                           # identical scores: no difference at all
    assert d == 0 and lo == 0 and hi == 0 and p == 1


def test_bootstrap_averages_seeds_of_a_pooling(tmp_path):
    utt2spk, trials = speaker_trials(n_spk=10)
    labels = np.array([t[2] for t in trials])
    perfect, reversed_ = labels * 1.0, labels * -1.0
    runs = []
    for name, seed, s in (("tap", 1, perfect), ("tap", 2, reversed_), ("cap", 1, perfect), ("cap", 2, perfect)):
        write_scores(tmp_path / f"{name}{seed}.score", trials, s)
        runs.append(FakeRun(name, seed, tmp_path / f"{name}{seed}.score"))
    d, lo, hi, _ = bootstrap_pairs(runs, trials, utt2spk, n_boot=100)[("tap", "cap")]
    assert d == pytest.approx(-50.0) and lo == pytest.approx(-50.0) and hi == pytest.approx(-50.0)   # (0 + 100) / 2 vs 0


def results_row(exp_dir):
    line = (exp_dir / "results.txt").read_text().splitlines()[2].split()
    return float(line[1]), float(line[2])


def test_one_command_trains_scores_tabulates_and_resumes(tmp_path):
    """The data dirs hold features of another corpus (made with 6 training speakers, as a run.sh with other
    settings leaves them): the ablation makes the corpus it is asked for instead of training on those. A
    re-run skips every finished run; after the features change it refuses the runs made on the old ones."""
    root = tmp_path
    sh = lambda cmd: subprocess.run(["bash", "-c", f". ./path.sh && {cmd}"], cwd=ROOT, capture_output=True, text=True)
    r = sh(f"local/prepare_synth.sh --size tiny --train-speakers 6 {root}/corpus/synth {root}/data && "
           f"steps/make_fbank.sh {root}/data/synth_train {root}/fbank && steps/make_fbank.sh {root}/data/synth_test {root}/fbank")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    exp = tmp_path / "ablation"
    cmd = ["bash", "local/run_ablation.sh", "--seeds", "1 2", "--poolings", "tap cap", "--synth-size", "tiny",
           "--data", f"{root}/data", "--fbankdir", f"{root}/fbank", "--corpusdir", f"{root}/corpus",
           "--exp", str(exp), "--boot", "200",
           "--train-opts", "train.epochs=1 train.speakers_per_batch=4 train.num_workers=0 eval.num_crops=2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"{root}/data/synth_train was made with train_speakers 6, not 8: generating again" in r.stdout
    assert "32 utterances, 8 speakers" in (exp / "seed1/mini_cap/log/train.log").read_text()
    table = (exp / "ablation.md").read_text()
    rows = {l.split("|")[2].strip(): [c.strip() for c in l.split("|")[1:-1]]
            for l in table.splitlines() if l.startswith("| NP")}
    assert set(rows) == {"TAP", "CAP"}
    for pooling in ("tap", "cap"):
        eers, dcfs = zip(*(results_row(exp / f"seed{s}/mini_{pooling}") for s in (1, 2)))
        row = rows[pooling.upper()]
        (eer_mean, eer_sd), (dcf_mean, dcf_sd) = ([float(v) for v in row[i].split(" ± ")] for i in (3, 2))
        # results.txt holds rounded values; the table is computed from the scores
        assert abs(eer_mean - statistics.mean(eers)) < 0.006 and abs(eer_sd - statistics.stdev(eers)) < 0.011
        assert abs(dcf_mean - statistics.mean(dcfs)) < 6e-4 and abs(dcf_sd - statistics.stdev(dcfs)) < 1.1e-3
        assert row[4] == f"{eers[0]:.2f} (seed 1), {eers[1]:.2f} (seed 2)" and row[6] == "1"
    assert "| CAP − TAP |" in table and "paper" in table

    before = {p: os.stat(p).st_mtime_ns for p in exp.glob("seed*/mini_*/models/*.pt")}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "and are intact: skipped" in r.stdout                   # stage 0: the corpus asked for is there
    assert r.stdout.count("finished with these inputs (ablation.signature), skipped") == 4
    assert "training and scoring" not in r.stdout
    assert {p: os.stat(p).st_mtime_ns for p in exp.glob("seed*/mini_*/models/*.pt")} == before
    assert (exp / "ablation.md").read_text() == table

    # an audio file rewritten: stage 1 remakes its job's features, and the runs made on the old ones are refused
    wav = next((root / "corpus/synth/wav/train").rglob("*.wav"))
    os.utime(wav, ns=(wav.stat().st_atime_ns, wav.stat().st_mtime_ns + 10**9))
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 1 and lines == [
        f"local/run_ablation.sh: ERROR: {exp}/seed1/mini_tap was made on another synth_train/feats.scp than "
        f"{root}/data/synth_train/feats.scp is now (see {exp}/seed1/mini_tap/ablation.signature); move it away "
        f"or give another --exp"], r.stderr[-3000:]
