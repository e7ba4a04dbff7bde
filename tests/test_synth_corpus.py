"""Stage 0, embedded synthetic corpus: determinism, Kaldi formats, trials, the shell wrapper."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
GEN = ROOT / "local" / "make_synth_corpus.py"
SMALL = ["--train-speakers", "3", "--train-utts", "2", "--test-speakers", "3", "--test-utts", "3",
         "--min-dur", "0.6", "--max-dur", "0.9", "--seed", "5"]
SETS = {"synth_train": ["wav.scp", "utt2spk", "spk2utt"],
        "synth_test": ["wav.scp", "utt2spk", "spk2utt", "trials"]}


def _env():
    env = dict(os.environ, LC_ALL="C")
    env["PYTHONPATH"] = str(ROOT / "pysrc") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def generate(out, *opts, nj=2):
    r = subprocess.run([sys.executable, str(GEN), *SMALL, "--nj", str(nj), *opts,
                        str(out / "corpus"), str(out / "data")],
                       env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


def lines(path):
    return Path(path).read_text().splitlines()


def snapshot(out):
    """Every data-dir file (corpus root replaced, since wav.scp paths are absolute) and wav bytes."""
    root = str((out / "corpus").resolve())
    files = {f"{s}/{f}": (out / "data" / s / f).read_text().replace(root, "<ROOT>")
             for s, fs in SETS.items() for f in fs}
    wavs = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "corpus" / "wav").rglob("*.wav"))}
    return files, wavs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(out, nj=2)
    return out


def test_deterministic_and_independent_of_nj(corpus, tmp_path):
    generate(tmp_path / "b", nj=1)
    a, b = snapshot(corpus), snapshot(tmp_path / "b")
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys() and len(a[1]) == 3 * 2 + 3 * 3
    assert all(a[1][k] == b[1][k] for k in a[1])
    # a re-run over existing outputs gives the same corpus, and leaves no temporary files
    generate(corpus, nj=2)
    assert snapshot(corpus) == a
    assert not [p for p in corpus.rglob("*") if p.name.startswith(".")]


def test_seed_changes_the_corpus(corpus, tmp_path):
    generate(tmp_path, "--seed", "6", nj=2)
    a, b = snapshot(corpus)[1], snapshot(tmp_path)[1]
    assert a.keys() == b.keys() and all(a[k] != b[k] for k in a)


def test_kaldi_formats(corpus):
    for s, fs in SETS.items():
        for f in fs:
            ls = lines(corpus / "data" / s / f)
            assert ls and ls == sorted(ls), f"{s}/{f} not sorted (LC_ALL=C)"
        u2s = dict(line.split() for line in lines(corpus / "data" / s / "utt2spk"))
        assert len(u2s) == len(lines(corpus / "data" / s / "utt2spk"))
        prefix = "tr" if s == "synth_train" else "te"
        for u, spk in u2s.items():
            assert u.startswith(spk + "-") and spk.startswith(prefix) and len(spk) == 6
        # spk2utt is utt2spk inverted
        s2u = {t[0]: t[1:] for t in (line.split() for line in lines(corpus / "data" / s / "spk2utt"))}
        assert sorted((u, spk) for spk, us in s2u.items() for u in us) == sorted(u2s.items())
        assert all(us == sorted(us) for us in s2u.values())
        # wav.scp: the same utterances, absolute paths to 16 kHz mono int16 files within the duration range
        scp = [line.split() for line in lines(corpus / "data" / s / "wav.scp")]
        assert [t[0] for t in scp] == sorted(u2s) and all(len(t) == 2 for t in scp)
        for u, p in scp:
            assert os.path.isabs(p) and p.endswith(f"/{u2s[u]}/{u}.wav")
            info = sf.info(p)
            assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
            assert 0.6 - 1e-3 <= info.duration <= 0.9 + 1e-3
            x = sf.read(p, dtype="int16")[0]
            assert x.dtype == np.int16 and np.abs(x).max() > 1000  # not silent, not clipped to nothing


def test_speakers_disjoint_and_trials(corpus):
    tr = set(t.split()[0] for t in lines(corpus / "data/synth_train/spk2utt"))
    te_u2s = dict(line.split() for line in lines(corpus / "data/synth_test/utt2spk"))
    assert len(tr) == 3 and len(set(te_u2s.values())) == 3 and not tr & set(te_u2s.values())
    trials = [t.split() for t in lines(corpus / "data/synth_test/trials")]
    assert all(len(t) == 3 and t[2] in ("target", "nontarget") for t in trials)
    assert all(a in te_u2s and b in te_u2s and a != b for a, b, _ in trials)
    assert len({(a, b) for a, b, _ in trials}) == len(trials)
    assert all((te_u2s[a] == te_u2s[b]) == (k == "target") for a, b, k in trials)
    ntar = sum(k == "target" for _, _, k in trials)
    assert ntar == 3 * 3  # every same-speaker pair i<j
    assert ntar == len(trials) - ntar  # as many nontarget pairs


def test_bad_options_are_one_line_errors(tmp_path):
    r = subprocess.run([sys.executable, str(GEN), "--test-speakers", "1", str(tmp_path / "c"), str(tmp_path / "d")],
                       env=_env(), capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("ERROR: --test-speakers") and r.stderr.count("\n") == 1
    assert not (tmp_path / "d").exists()


def test_prepare_synth_sh(tmp_path):
    """The stage-0 wrapper; a re-run with the same settings is skipped (stage0.signature), one that asks for
    other settings, or finds a data file edited or audio gone, says what differs and generates again."""
    def prepare(*opts):
        r = subprocess.run(["bash", "local/prepare_synth.sh", "--size", "tiny", "--nj", "2", *SMALL, *opts,
                            str(tmp_path / "corpus"), str(tmp_path / "data")],
                           cwd=ROOT, env=_env(), capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout
    prepare()
    assert (tmp_path / "corpus/log/make_synth_corpus.log").read_text().strip()
    assert len(lines(tmp_path / "data/synth_test/trials")) == 18
    sig = lines(tmp_path / "data/synth_train/stage0.signature")
    assert sig[1:4] == ["size tiny", "seed 5", "max_dur 0.9"] and sig[-3].startswith("wav.scp ")
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file() and "log" not in p.parts)
    before = {p: p.stat().st_mtime_ns for p in files}
    assert "were made from these settings (size tiny, seed 5; stage0.signature) and are intact: skipped" in prepare()
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert f"{tmp_path}/data/synth_train was made with seed 5, not 6: generating again" in prepare("--seed", "6")
    assert lines(tmp_path / "data/synth_test/stage0.signature")[2] == "seed 6"
    (tmp_path / "data/synth_test/trials").write_text("te0001-u001 te0002-u001 target\n")
    assert "synth_test was changed since it was made (its files differ from stage0.signature)" in prepare("--seed", "6")
    assert len(lines(tmp_path / "data/synth_test/trials")) == 18
    next((tmp_path / "corpus/wav/train").rglob("*.wav")).unlink()
    assert "synth_train: 1 audio files are missing" in prepare("--seed", "6")
    # wrong usage and unknown options fail
    r = subprocess.run(["bash", "local/prepare_synth.sh", str(tmp_path / "corpus")], cwd=ROOT, env=_env(),
                       capture_output=True, text=True)
    assert r.returncode != 0 and "usage:" in r.stderr
    r = subprocess.run(["bash", "local/prepare_synth.sh", "--no-such-opt", "1", "a", "b"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True)
    assert r.returncode != 0 and "unknown option" in r.stderr
