"""Stage 1 (steps/make_fbank.sh) under faults: bad audio, a killed run, changed inputs, a full disk, two
data dirs of one name.

Bad audio costs its utterance only: each is named with its reason in its job's log (no traceback) and in
bad_utts; above --max-bad-frac the step fails in one line naming them, the data dir's feats.scp left as it
was; within it the data dir is fixed and a re-run redoes only the jobs whose part of wav.scp changed."""
import os
import shutil
import signal
import subprocess
import time

import kaldiio
import numpy as np
import pytest
import soundfile as sf

from capsv.bin.compute_fbank import job_of

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


def fbank(d, tmp, nj=2, *opts, **kw):
    return subprocess.run(["bash", STEP, "--nj", str(nj), *opts, str(d), str(tmp / "fbank")], cwd=ROOT,
                          capture_output=True, text=True, **kw)


def folder(tmp):
    """The data dir's own feature folder (fbank/<set>-<hash of its path>)."""
    [f] = (tmp / "fbank").glob("t-*")
    return f


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
    """Six kinds of bad audio in one job: each named with its reason; past --max-bad-frac the step stops
    naming them and changes nothing, within it they are left out and the data dir is fixed."""
    bad = {"s1-c": (corrupt, "cannot read audio file {wav}"),
           "s1-d": (truncated_header, "cannot read audio file {wav}"),
           "s2-c": (empty, "{wav} holds no audio samples"),
           "s2-d": (nan_samples, "its features hold NaN or Inf"),
           "s3-a": ("false |", "command 'false' failed with exit status 1"),
           "s3-b": ("true |", "command 'true' wrote no audio")}
    utts = sorted(UTTS + list(bad))
    d = make_dir(tmp_path, utts=utts)
    assert fbank(d, tmp_path, 1).returncode == 0
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
    r = fbank(d, tmp_path, 1)                       # --max-bad-frac 0, the default
    [line] = r.stderr.strip().splitlines()
    assert r.returncode == 1 and line.startswith(f"{STEP}: ERROR: {d}: 6 of 10 utterances could not be used")
    assert "s1-c (cannot read audio file" in line and f"all in {d}/log/bad_utts.t" in line
    listed = dict(l.split(" ", 1) for l in (d / "log/bad_utts.t").read_text().splitlines())
    assert sorted(listed) == sorted(bad)
    log = (d / "log/make_fbank_t.1.log").read_text()
    assert "Traceback" not in log
    for u, (_, reason) in bad.items():
        assert reason.format(wav=tmp_path / f"{u}.wav") in listed[u] and f"left out {u}: {listed[u]}" in log
    assert (d / "feats.scp").read_text() == before and not (d / "bad_utts").exists()
    feats(d)   # the arks it points at are intact

    r = fbank(d, tmp_path, 1, "--max-bad-frac", "0.6")
    assert r.returncode == 0, r.stderr
    assert f"{d}: left out 6 of 10 utterances that could not be used (--max-bad-frac 0.6 allows 6)" in r.stdout
    assert dict(l.split(" ", 1) for l in (d / "bad_utts").read_text().splitlines()) == listed
    assert sorted(feats(d)) == UTTS
    for f in ("wav.scp", "utt2spk", "utt2num_frames"):
        assert [l.split()[0] for l in (d / f).read_text().splitlines()] == UTTS, f
    assert (d / "spk2utt").read_text() == "s1 s1-a s1-b\ns2 s2-a s2-b\n"
    assert [l.split()[0] for l in (d / ".backup/wav.scp").read_text().splitlines()] == utts


def test_bad_files_cost_their_jobs_only(tmp_path):
    """Two corrupt files among 24 in different jobs of 4: --max-bad-frac 0 stops naming both (and trial
    lists naming one stop it too, untouched); 0.1 leaves them out; then one file is repaired and the
    other's lines removed: the re-run redoes the repaired one's job only and keeps every other."""
    utts = [f"s{k}-{c}" for k in range(1, 5) for c in "abcdef"]
    by_job = {}
    for u in utts:
        by_job.setdefault(job_of(u, 4), []).append(u)
    assert len(by_job) == 4
    broken, removed = by_job[1][0], by_job[3][0]
    d = make_dir(tmp_path, utts=utts)
    good_audio = (tmp_path / f"{broken}.wav").read_bytes()
    corrupt(tmp_path / f"{broken}.wav")
    corrupt(tmp_path / f"{removed}.wav")
    (d / "trials").write_text(f"{removed} {utts[-1]} nontarget\n")
    r = fbank(d, tmp_path, 4, "--max-bad-frac", "0.1")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"{d}/trials: 1 trials name utterances that could not be used (e.g. {removed})" in r.stderr
    assert not (d / "feats.scp").exists() and not (d / ".backup").exists()
    (d / "trials").unlink()
    r = fbank(d, tmp_path, 4)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"2 of 24 utterances could not be used, more than --max-bad-frac 0 allows (0): {broken} (" in r.stderr
    assert f"; {removed} (" in r.stderr and not (d / "feats.scp").exists()
    r = fbank(d, tmp_path, 4, "--max-bad-frac", "0.1")
    assert r.returncode == 0, r.stderr
    assert sorted(l.split()[0] for l in (d / "bad_utts").read_text().splitlines()) == sorted([broken, removed])
    assert len(feats(d)) == 22 and broken not in (d / "utt2spk").read_text()
    arks = {p.name: p.stat().st_mtime_ns for p in folder(tmp_path).glob("*.ark")}
    assert len(arks) == 4
    kept = {f: (d / f).stat().st_mtime_ns for f in ("feats.scp", "utt2num_frames", "bad_utts", "wav.scp")}
    assert fbank(d, tmp_path, 4, "--max-bad-frac", "0.1").returncode == 0   # unchanged: nothing is rewritten
    assert {f: (d / f).stat().st_mtime_ns for f in kept} == kept

    # the user's fix: one file repaired (its line back in the data dir), the other utterance removed
    (tmp_path / f"{broken}.wav").write_bytes(good_audio)
    make_dir(tmp_path, utts=[u for u in utts if u != removed])
    r = fbank(d, tmp_path, 4, "--max-bad-frac", "0.1")
    assert r.returncode == 0, r.stderr
    logs = {j: (d / f"log/make_fbank_t.{j}.log").read_text() for j in range(1, 5)}
    assert "complete from an earlier run" not in logs[1]
    assert all("complete from an earlier run" in logs[j] for j in (2, 3, 4))
    now = {p.name: p.stat().st_mtime_ns for p in folder(tmp_path).glob("*.ark")}
    assert len(now) == 4 and {k: v for k, v in now.items() if not k.startswith("raw_fbank.1.")} == \
        {k: v for k, v in arks.items() if not k.startswith("raw_fbank.1.")}
    assert sorted(feats(d)) == sorted(u for u in utts if u != removed)
    assert [l.split()[0] for l in (d / "bad_utts").read_text().splitlines()] == [removed]   # left out before


def test_wav_scp_without_final_newline_keeps_its_last_line(tmp_path):
    d = make_dir(tmp_path, final_newline=False)
    r = fbank(d, tmp_path, nj=3)
    assert r.returncode == 0, r.stderr
    assert sorted(feats(d)) == UTTS


def test_killed_part_way_rerun_redoes_only_unfinished_jobs(tmp_path):
    """Job 2 reads one utterance through a command that waits for a flag; SIGKILL the whole step once job 1
    is done (job 2 has its temporaries open), then set the flag and re-run: the dead run's partial files
    are removed, job 1 is kept, and the features equal a clean run's."""
    flag = tmp_path / "go"
    slow = f"while [ ! -e {flag} ]; do sleep 0.1; done; cat {tmp_path}/s2-b.wav |"
    assert [job_of(u, 2) for u in UTTS] == [1, 1, 2, 2]
    d = make_dir(tmp_path, scp={**{u: str(tmp_path / f"{u}.wav") for u in UTTS}, "s2-b": slow})
    p = subprocess.Popen(["bash", STEP, "--nj", "2", str(d), str(tmp_path / "fbank")], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    done = lambda: list((tmp_path / "fbank").glob("t-*/raw_fbank.1.*.done"))
    partial = lambda: list((tmp_path / "fbank").glob("t-*/.raw_fbank.2.*.tmp"))
    deadline = time.time() + 120
    while not (done() and partial()) and time.time() < deadline:
        time.sleep(0.2)
    assert done() and partial(), "job 1 did not finish, or job 2 did not start writing"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (d / "feats.scp").exists()
    lock = (folder(tmp_path) / ".lock").read_text()
    assert lock.startswith(f"make_fbank.sh pid {p.pid} ")            # the dead run's, left behind
    [job1] = folder(tmp_path).glob("raw_fbank.1.*.ark")
    mtime = job1.stat().st_mtime_ns

    flag.touch()
    r = fbank(d, tmp_path)                  # the same inputs
    assert r.returncode == 0, r.stderr
    assert f"partial files left by a killed run ({lock.strip()})" in r.stdout
    assert [p.name for p in folder(tmp_path).iterdir() if p.name.startswith(".")] == [".lock"]
    assert not [p for p in d.iterdir() if p.name.startswith(".")]
    assert "complete from an earlier run" in (d / "log" / "make_fbank_t.1.log").read_text()
    assert "complete from an earlier run" not in (d / "log" / "make_fbank_t.2.log").read_text()
    assert job1.stat().st_mtime_ns == mtime
    clean = tmp_path / "clean"
    clean.mkdir()
    for u in UTTS:
        os.link(tmp_path / f"{u}.wav", clean / f"{u}.wav")
    c = make_dir(clean)
    assert fbank(c, clean).returncode == 0
    ref, got = feats(c), feats(d)
    assert sorted(ref) == sorted(got) and all(np.array_equal(ref[u], got[u]) for u in ref)


def test_two_data_dirs_of_one_name_keep_their_own_features(tmp_path):
    """Two data roots with a `t` each, one --fbankdir: each gets its own folder, and re-running one with
    changed inputs (its old arks removed) leaves the other's features intact."""
    a = make_dir(tmp_path)
    b = tmp_path / "other" / "t"
    shutil.copytree(a, b)
    lines = (b / "wav.scp").read_text().splitlines()
    (b / "wav.scp").write_text("".join(f"{l.split()[0]} {tmp_path}/s1-a.wav\n" for l in lines))
    fb = ["--nj", "2"]
    for d in (a, b):
        r = subprocess.run(["bash", STEP, *fb, str(d), str(tmp_path / "fbank")], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    folders = sorted((tmp_path / "fbank").iterdir())
    assert len(folders) == 2 and all(f.name.startswith("t-") for f in folders)
    assert sorted((f / "data_dir").read_text().strip() for f in folders) == sorted(str(d.resolve()) for d in (a, b))
    ref = feats(a)
    (b / "wav.scp").write_text("".join(f"{l.split()[0]} {tmp_path}/s2-a.wav\n" for l in lines))
    r = subprocess.run(["bash", STEP, *fb, str(b), str(tmp_path / "fbank")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = feats(a)
    assert all(np.array_equal(ref[u], got[u]) for u in UTTS)
    assert not np.array_equal(feats(b)["s1-b"], got["s1-b"])


def test_changed_inputs_failing_leave_the_old_features_intact(tmp_path):
    d = make_dir(tmp_path)
    assert fbank(d, tmp_path).returncode == 0
    before, old = (d / "feats.scp").read_text(), feats(d)
    os.remove(tmp_path / "s1-a.wav")
    r = fbank(d, tmp_path, 3)               # another split, and a job that fails
    assert r.returncode == 1
    assert (d / "feats.scp").read_text() == before
    now = feats(d)
    assert all(np.array_equal(old[u], now[u]) for u in UTTS)
    make_dir(tmp_path)                      # restored: the new arks replace the old ones
    assert fbank(d, tmp_path, nj=3).returncode == 0
    arks = sorted(p.name for p in folder(tmp_path).glob("*.ark"))
    assert [a.split(".")[1] for a in arks] == ["1", "2", "3"]


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
        assert line.startswith(f"ERROR: no space left on the device of {folder(tmp_path)}/raw_fbank.1.")
        assert not (d / "feats.scp").exists()
        assert not [p for p in folder(tmp_path).iterdir() if p.name.endswith(".tmp")]   # no partial file left
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
