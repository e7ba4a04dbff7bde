"""data/prepared on the embedded corpus: what stage 0 writes, and --synth-size checked against it at a later stage
(VoxCeleb and your own data: tests/test_voxceleb.py, tests/test_own_data.py)."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_sh(tmp, *args):
    return subprocess.run(["bash", "run.sh", "--data", f"{tmp}/data", "--exp", f"{tmp}/exp", "--fbankdir",
                           f"{tmp}/fbank", "--corpusdir", f"{tmp}/corpus", "--nj", "1", *args],
                          cwd=ROOT, capture_output=True, text=True)


def test_stage0_records_the_embedded_corpus_and_a_later_size_must_agree(tmp_path):
    r = run_sh(tmp_path, "--synth-size", "tiny", "--stop-stage", "0")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data/prepared").read_text().splitlines()[1:] == [
        "corpus=synth", "synth_size=tiny", "train_sets=", "train_set=", "test_set=", "train=synth_train",
        "test=synth_test", "fbank_conf="]                 # no features yet: stage 1 records its conf
    r = run_sh(tmp_path, "--stage", "2", "--synth-size", "mini")
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode != 0 and lines == [
        f"run.sh: ERROR: --synth-size mini disagrees with {tmp_path}/data/prepared: stage 0 prepared the embedded "
        f"corpus (--corpus synth --synth-size tiny) into {tmp_path}/data/synth_train and {tmp_path}/data/synth_test; "
        f"leave the option out to use those, or prepare the data you name from --stage 0 (or under another --data)"]
    assert not (tmp_path / "exp").exists()
