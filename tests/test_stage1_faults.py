"""Stage 1 (steps/make_fbank.sh) under faults: bad audio, a killed run, changed inputs, a full disk.

Each bad input must fail its job with one ERROR line in the job's log naming the utterance (no
traceback), a non-zero exit of the step, and the data dir's feats.scp left as it was."""
import os
import signal
import subprocess
import time

import kaldiio
import numpy as np
import pytest
import soundfile as sf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = os.path.join(ROOT, "steps", "make_fbank.sh")
UTTS = ["s1-a", "s1-b", "s2-a", "s2-b"]


def make_dir(tmp, scp=None, final_newline=True, utts=UTTS):
    d = tmp / "data" / "t"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for u in utts:
        if not (tmp / f"{u}.wav").exists():
            sf.write(str(tmp / f"{u}.wav"), (0.1 * rng.standard_normal(8000)).astype(np.float32), 16000,
                     subtype="PCM_16")
    scp = scp or {u: str(tmp / f"{u}.wav") for u in utts}
    text = "".join(f"{u} {scp[u]}\n" for u in utts)
    (d / "wav.scp").write_text(text if final_newline else text[:-1])
    (d / "utt2spk").write_text("".join(f"{u} {u[:2]}\n" for u in utts))
    spk = sorted({u[:2] for u in utts})
    (d / "spk2utt").write_text("".join(f"{s} {' '.join(u for u in utts if u[:2] == s)}\n" for s in spk))
    return d


def fbank(d, tmp, nj=2, **kw):
    return subprocess.run(["bash", STEP, "--nj", str(nj), str(d), str(tmp / "fbank")], cwd=ROOT,
                          capture_output=True, text=True, **kw)


def feats(d):
    return {u: np.array(m) for u, m in kaldiio.load_scp(str(d / "feats.scp")).items()}


def job_errors(d, job):
    text = (d / "log" / f"make_fbank_t.{job}.log").read_text()
    assert "Traceback" not in text
    return [l for l in text.splitlines() if "ERROR" in l]


def corrupt(path):
    path.write_bytes(b"this is not audio at all" * 50)


def truncated_header(path):
    path.write_bytes(path.read_bytes()[:30])


def empty(path):
    sf.write(str(path), np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")


def nan_samples(path):
    x = np.full(8000, 0.1, dtype=np.float32)
    x[4000] = np.nan
    sf.write(str(path), x, 16000, subtype="FLOAT")


def test_bad_audio(tmp_path):
    """Six kinds of bad audio, one per job of one run: each job's log names its utterance."""
    bad = {"s1-c": (corrupt, "cannot read audio file {wav}"),
           "s1-d": (truncated_header, "cannot read audio file {wav}"),
           "s2-c": (empty, "{wav} holds no audio samples"),
           "s2-d": (nan_samples, "its features hold NaN or Inf"),
           "s3-a": ("false |", "command 'false' failed with exit status 1"),
           "s3-b": ("true |", "command 'true' wrote no audio")}
    utts = sorted(UTTS + list(bad))
    d = make_dir(tmp_path, utts=utts)
    assert fbank(d, tmp_path, nj=1).returncode == 0
    before = (d / "feats.scp").read_text()
    scp = {}
    for u in utts:
        wav = tmp_path / f"{u}.wav"
        damage = bad.get(u, (None,))[0]
        if isinstance(damage, str):
            scp[u] = damage
        else:
            scp[u] = str(wav)
            if damage:
                damage(wav)
    make_dir(tmp_path, scp=scp, utts=utts)
    r = fbank(d, tmp_path, nj=len(utts))
    assert r.returncode == 1
    for job, u in enumerate(utts, 1):
        if u not in bad:
            assert job_errors(d, job) == []
            continue
        assert f"job {job} failed" in r.stderr
        [line] = job_errors(d, job)
        assert line.startswith(f"ERROR: utterance {u}: ") and bad[u][1].format(wav=tmp_path / f"{u}.wav") in line
    assert (d / "feats.scp").read_text() == before
    feats(d)   # the arks it points at are intact


def test_wav_scp_without_final_newline_keeps_its_last_line(tmp_path):
    d = make_dir(tmp_path, final_newline=False)
    r = fbank(d, tmp_path, nj=3)
    assert r.returncode == 0, r.stderr
    assert sorted(feats(d)) == UTTS


def test_killed_part_way_rerun_redoes_only_unfinished_jobs(tmp_path):
    """Job 2 reads one utterance through a command that waits for a flag; kill the whole step once
    job 1 is done, then set the flag and re-run."""
    flag = tmp_path / "go"
    slow = f"while [ ! -e {flag} ]; do sleep 0.1; done; cat {tmp_path}/s2-b.wav |"
    d = make_dir(tmp_path, scp={**{u: str(tmp_path / f"{u}.wav") for u in UTTS}, "s2-b": slow})
    p = subprocess.Popen(["bash", STEP, "--nj", "2", str(d), str(tmp_path / "fbank")], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    done = lambda: list((tmp_path / "fbank" / "t").glob("raw_fbank.*.1.scp.done"))
    deadline = time.time() + 60
    while not done() and time.time() < deadline:
        time.sleep(0.2)
    assert done(), "job 1 did not finish"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (d / "feats.scp").exists()
    job1 = [p for p in (tmp_path / "fbank" / "t").glob("raw_fbank.*.1.ark")]
    mtime = job1[0].stat().st_mtime_ns

    flag.touch()
    r = fbank(d, tmp_path)                  # the same inputs
    assert r.returncode == 0, r.stderr
    assert "complete from an earlier run" in (d / "log" / "make_fbank_t.1.log").read_text()
    assert "complete from an earlier run" not in (d / "log" / "make_fbank_t.2.log").read_text()
    assert job1[0].stat().st_mtime_ns == mtime
    clean = tmp_path / "clean"
    clean.mkdir()
    for u in UTTS:
        os.link(tmp_path / f"{u}.wav", clean / f"{u}.wav")
    c = make_dir(clean)
    assert fbank(c, clean).returncode == 0
    ref, got = feats(c), feats(d)
    assert sorted(ref) == sorted(got) and all(np.array_equal(ref[u], got[u]) for u in ref)


def test_changed_inputs_failing_leave_the_old_features_intact(tmp_path):
    d = make_dir(tmp_path)
    assert fbank(d, tmp_path).returncode == 0
    before, old = (d / "feats.scp").read_text(), feats(d)
    os.remove(tmp_path / "s1-a.wav")
    r = fbank(d, tmp_path, nj=3)            # another split, and a job that fails
    assert r.returncode == 1
    assert (d / "feats.scp").read_text() == before
    now = feats(d)
    assert all(np.array_equal(old[u], now[u]) for u in UTTS)
    make_dir(tmp_path)                      # restored: the new arks replace the old ones
    assert fbank(d, tmp_path, nj=3).returncode == 0
    arks = sorted(p.name for p in (tmp_path / "fbank" / "t").glob("*.ark"))
    assert len(arks) == 3 and len({a.split(".")[1] for a in arks}) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_out_of_disk_is_one_clear_line(tmp_path):
    d = make_dir(tmp_path)
    full = tmp_path / "fbank"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(full)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        r = fbank(d, tmp_path, nj=1)
        assert r.returncode == 1
        [line] = job_errors(d, 1)
        assert line.startswith(f"ERROR: no space left on the device of {full}/t/raw_fbank.")
        assert not (d / "feats.scp").exists()
        assert not [p for p in (full / "t").iterdir() if p.name.endswith(".tmp")]   # no partial file left
    finally:
        subprocess.run(["umount", str(full)])


@pytest.mark.parametrize("case,message", [
    ("no path", "wav.scp: line 2 has 1 fields, expected at least 2"),
    ("disagree", "wav.scp: utterance s2-a of utt2spk is missing"),
    ("empty", "utt2spk: empty file"),
])
def test_bad_data_dir_stops_before_any_job(tmp_path, case, message):
    d = make_dir(tmp_path)
    if case == "no path":
        (d / "wav.scp").write_text(f"s1-a {tmp_path}/s1-a.wav\ns1-b\ns2-a {tmp_path}/s2-a.wav\n")
    elif case == "disagree":
        (d / "wav.scp").write_text("".join(f"{u} {tmp_path}/{u}.wav\n" for u in UTTS if u != "s2-a"))
    else:
        for f in ("wav.scp", "utt2spk", "spk2utt"):
            (d / f).write_text("")
    r = fbank(d, tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and message in lines[0], r.stderr
    assert not (d / "log").exists()   # no job was launched
