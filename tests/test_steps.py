"""The shell steps: parse_options.sh, launch_local.sh, validate_data_dir.sh, make_fbank.sh."""
import os
import signal
import subprocess
import time

import kaldiio
import numpy as np
import pytest
import soundfile as sf

from conftest import live_commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = os.path.join(ROOT, "steps")
ENV = dict(os.environ, LC_ALL="C")


def sh(*args, cwd=ROOT):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=ENV)


# ---------------------------------------------------------------- parse_options.sh

CALLER = """#!/usr/bin/env bash
set -euo pipefail
stage=0
stop_stage=100
use_gpu=true
help_message="usage: caller.sh [options] <a> <b>"
{extra}
. {steps}/parse_options.sh || exit 1
echo "stage=$stage stop_stage=$stop_stage use_gpu=$use_gpu{show} args=$#:$*"
"""


def caller(tmp_path, *args, extra="", show=""):
    script = tmp_path / "caller.sh"
    script.write_text(CALLER.format(extra=extra, steps=STEPS, show=show))
    return sh("bash", script, *args)


def test_parse_options_known(tmp_path):
    r = caller(tmp_path, "--stage", "3", "--stop-stage=4", "--use-gpu", "false", "x", "--not-an-option", "y")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "stage=3 stop_stage=4 use_gpu=false args=3:x --not-an-option y"


def test_parse_options_no_args_and_double_dash(tmp_path):
    assert caller(tmp_path).stdout.strip() == "stage=0 stop_stage=100 use_gpu=true args=0:"
    assert caller(tmp_path, "--", "--stage", "1").stdout.strip().endswith("args=2:--stage 1")


@pytest.mark.parametrize("args,msg", [
    (["--stgae", "3"], "unknown option --stgae"),
    (["--stage"], "option --stage needs a value"),
    (["--use-gpu", "yes"], "option --use-gpu expects true or false"),
])
def test_parse_options_errors(tmp_path, args, msg):
    r = caller(tmp_path, *args)
    assert r.returncode == 1 and r.stdout == ""
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_parse_options_help(tmp_path):
    r = caller(tmp_path, "--help")
    assert r.returncode == 0 and r.stdout.strip() == "usage: caller.sh [options] <a> <b>"


def test_parse_options_config_file(tmp_path):
    """--config sources var=value lines; the command line wins wherever it appears."""
    (tmp_path / "opts").write_text("stage=7\nstop_stage=8\n")
    r = caller(tmp_path, "--stop-stage", "9", "--config", tmp_path / "opts", "a")
    assert r.stdout.strip() == "stage=7 stop_stage=9 use_gpu=true args=1:a"
    r = caller(tmp_path, "--stop-stage=9", f"--config={tmp_path / 'opts'}", "a")
    assert r.stdout.strip() == "stage=7 stop_stage=9 use_gpu=true args=1:a"
    r = caller(tmp_path, "--config", tmp_path / "missing")
    assert r.returncode == 1 and "missing" in r.stderr


def test_parse_options_own_config_variable(tmp_path):
    """A caller with its own `config` (run.sh's YAML) just gets the value set."""
    r = caller(tmp_path, "--config", "conf/cap.yaml", extra="config=conf/tap.yaml", show=" config=$config")
    assert r.returncode == 0, r.stderr
    assert "config=conf/cap.yaml args=0:" in r.stdout


# ---------------------------------------------------------------- launch_local.sh

def test_launch_local_jobs(tmp_path):
    r = sh(f"{STEPS}/launch_local.sh", "JOB=1:3", tmp_path / "log" / "x.JOB.log",
           "bash", "-c", f"echo job JOB > {tmp_path}/out.JOB")
    assert r.returncode == 0, r.stderr
    for j in (1, 2, 3):
        assert (tmp_path / f"out.{j}").read_text() == f"job {j}\n"
        log = (tmp_path / "log" / f"x.{j}.log").read_text().splitlines()
        assert log[0].startswith("# bash -c") and f"out.{j}" in log[0]
        assert log[-1].startswith("# Ended (code 0)")


def test_launch_local_single_and_pipe(tmp_path):
    r = sh(f"{STEPS}/launch_local.sh", tmp_path / "one.log", "echo", "a b", "|", "tr", "a", "x")
    assert r.returncode == 0, r.stderr
    assert "x b" in (tmp_path / "one.log").read_text().splitlines()


def test_launch_local_failure(tmp_path):
    r = sh(f"{STEPS}/launch_local.sh", "JOB=1:3", tmp_path / "log" / "y.JOB.log",
           "bash", "-c", "echo last words of JOB; [ JOB != 2 ]")
    assert r.returncode == 1
    log2 = tmp_path / "log" / "y.2.log"
    assert f"launch_local.sh: job 2 failed, see {log2}" in r.stderr
    assert "last words of 2" in r.stderr and "job 1 failed" not in r.stderr
    assert log2.read_text().splitlines()[-1].startswith("# Ended (code 1)")


def test_launch_local_max_jobs(tmp_path):
    r = sh(f"{STEPS}/launch_local.sh", "--max-jobs-run", "2", "--mem", "4G", "JOB=1:4",
           tmp_path / "z.JOB.log", "true")
    assert r.returncode == 0, r.stderr
    assert len(list(tmp_path.glob("z.*.log"))) == 4


def running(marker):
    """Pids of live (not zombie) processes whose command line starts with `marker`."""
    return [p for p, cmd in live_commands() if cmd.startswith(marker)]


@pytest.mark.parametrize("sig,parent_ignores_int", [
    (signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGTERM, False), (signal.SIGHUP, False)])
def test_launch_local_signal_stops_jobs(tmp_path, sig, parent_ignores_int):
    """INT, TERM or HUP stop every job, pipelines included, and end the launcher with that signal; the
    logs still get their footers. The launcher is started with SIGINT at its default action even when
    this process ignores it (as pytest in the background of a non-interactive shell does)."""
    marker = f"{time.time() % 1000:.6f}"   # a sleep only this test runs
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if parent_ignores_int else None
    try:
        p = subprocess.Popen([f"{STEPS}/launch_local.sh", "JOB=1:2", str(tmp_path / "s.JOB.log"), "bash", "-c",
                              f"sleep 3{marker} | cat"], cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    finally:
        if parent_ignores_int:
            signal.signal(signal.SIGINT, previous)
    deadline = time.time() + 30
    while len(running(f"sleep 3{marker}")) < 2:
        assert time.time() < deadline, "the jobs did not start"
        time.sleep(0.05)
    p.send_signal(sig)
    _, err = p.communicate(timeout=20)
    assert p.returncode == -sig, err
    assert f"interrupted (SIG{sig.name[3:]}); stopped the jobs" in err
    assert not running(f"sleep 3{marker}")
    for j in (1, 2):
        assert (tmp_path / f"s.{j}.log").read_text().splitlines()[-1].startswith("# Ended (code 143)")


# ---------------------------------------------------------------- validate_data_dir.sh

def make_data(d, utts=("s1-a", "s1-b", "s2-a"), wav=True):
    d.mkdir(parents=True, exist_ok=True)
    (d / "utt2spk").write_text("".join(f"{u} {u.split('-')[0]}\n" for u in utts))
    spk = {}
    for u in utts:
        spk.setdefault(u.split("-")[0], []).append(u)
    (d / "spk2utt").write_text("".join(f"{s} {' '.join(us)}\n" for s, us in sorted(spk.items())))
    if wav:
        (d / "wav.scp").write_text("".join(f"{u} /nowhere/{u}.wav\n" for u in utts))
    return d


def validate(d, *opts):
    return sh(f"{STEPS}/validate_data_dir.sh", *opts, d)


def test_validate_ok(tmp_path):
    d = make_data(tmp_path / "d")
    (d / "trials").write_text("s1-a s1-b target\ns1-a s2-a nontarget\n")
    r = validate(d, "--no-feats")
    assert r.returncode == 0, r.stderr
    assert "OK (3 utterances, 2 speakers, 2 trials)" in r.stdout


def one_error(r, *words):
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("validate_data_dir.sh: ERROR: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_validate_unsorted(tmp_path):
    d = make_data(tmp_path / "d")
    (d / "wav.scp").write_text("s1-b /x\ns1-a /y\ns2-a /z\n")
    one_error(validate(d, "--no-feats"), "wav.scp: not sorted", "LC_ALL=C sort")


def test_validate_duplicate(tmp_path):
    d = make_data(tmp_path / "d")
    (d / "utt2spk").write_text("s1-a s1\ns1-a s1\ns1-b s1\ns2-a s2\n")
    one_error(validate(d, "--no-feats"), "utt2spk: duplicate id s1-a")


def test_validate_mismatch(tmp_path):
    d = make_data(tmp_path / "d")
    (d / "spk2utt").write_text("s1 s1-a\ns2 s2-a\n")
    one_error(validate(d, "--no-feats"), "spk2utt: does not describe the same mapping as utt2spk", "s1-b")


def test_validate_speaker_prefix(tmp_path):
    d = make_data(tmp_path / "d")
    (d / "utt2spk").write_text("s1-a s1\ns1-b s2\ns2-a s2\n")
    (d / "spk2utt").write_text("s1 s1-a\ns2 s1-b s2-a\n")
    one_error(validate(d, "--no-feats"), "s1-b (speaker s2) does not start with its speaker id")


def test_validate_trials_unknown_utt(tmp_path):
    d = make_data(tmp_path / "d")
    (d / "trials").write_text("s1-a s1-b target\ns1-a s9-z nontarget\n")
    one_error(validate(d, "--no-feats"), "trials: line 2: unknown utterance s9-z")
    (d / "trials").write_text("s1-a s1-b 1\n")
    one_error(validate(d, "--no-feats"), "label 1 is not target or nontarget")
    (d / "trials").write_text("s1-a s1-b target\ns1-a s2-a nontarget\ns1-a s1-b target\n")
    one_error(validate(d, "--no-feats"), "trials: line 3 repeats the trial of line 1")


def test_validate_wav_and_feats(tmp_path):
    d = make_data(tmp_path / "d")
    (d / "wav.scp").write_text("s1-a /x\ns2-a /z\n")
    one_error(validate(d, "--no-feats"), "wav.scp: utterance s1-b of utt2spk is missing")
    d = make_data(tmp_path / "e", wav=False)
    one_error(validate(d, "--no-feats"), "wav.scp: missing")
    assert validate(d, "--no-feats", "--no-wav").returncode == 0
    one_error(validate(d, "--no-wav"), "feats.scp: missing", "stage 1")


# ---------------------------------------------------------------- make_fbank.sh

def test_make_fbank(tmp_path):
    lengths = {"s1-a": 16000, "s1-b": 7001, "s2-a": 12345}
    d = make_data(tmp_path / "data" / "t", utts=list(lengths))
    rng = np.random.default_rng(0)
    for u, n in lengths.items():
        sf.write(str(tmp_path / f"{u}.wav"), (0.1 * rng.standard_normal(n)).astype(np.float32), 16000,
                 subtype="PCM_16")
    (d / "wav.scp").write_text("".join(f"{u} {tmp_path}/{u}.wav\n" for u in lengths))

    r = sh(f"{STEPS}/make_fbank.sh", "--nj", "2", d, tmp_path / "fbank")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK (3 utterances, 2 speakers, features checked)" in r.stdout
    scp = (d / "feats.scp").read_text().splitlines()
    assert [line.split()[0] for line in scp] == sorted(lengths)
    assert all(line.split()[1].startswith(f"{tmp_path}/fbank/t-") and "/raw_fbank." in line for line in scp)
    want = {u: 1 + (n - 400) // 160 for u, n in lengths.items()}
    assert (d / "utt2num_frames").read_text() == "".join(f"{u} {want[u]}\n" for u in sorted(lengths))
    for u, m in kaldiio.load_scp(str(d / "feats.scp")).items():
        assert m.dtype == np.float32 and m.shape == (want[u], 40)
    assert (d / "log" / "make_fbank_t.2.log").exists()

    # Missing wavs (one in each job's part: s1-a in job 1, s2-a in job 2): one clear line per job
    # log, non-zero exit, feats.scp and utt2num_frames untouched.
    before = (d / "feats.scp").read_text(), (d / "utt2num_frames").read_text()
    (tmp_path / "s1-a.wav").unlink()
    (tmp_path / "s2-a.wav").unlink()
    r = sh(f"{STEPS}/make_fbank.sh", "--nj", "2", d, tmp_path / "fbank")
    assert r.returncode != 0
    for job, utt in ((1, "s1-a"), (2, "s2-a")):
        log = d / "log" / f"make_fbank_t.{job}.log"
        assert f"job {job} failed, see {log}" in r.stderr
        errors = [line for line in log.read_text().splitlines() if "ERROR" in line]
        assert errors == [f"ERROR: utterance {utt}: audio file {tmp_path}/{utt}.wav not found; "
                          f"fix wav.scp or restore the file"]
        assert "Traceback" not in log.read_text()
    assert ((d / "feats.scp").read_text(), (d / "utt2num_frames").read_text()) == before
    assert not list(d.glob(".*tmp")) and not list((tmp_path / "fbank").glob(".*tmp"))


def test_make_fbank_usage_and_nj_cap(tmp_path):
    r = sh(f"{STEPS}/make_fbank.sh", tmp_path)
    assert r.returncode == 1 and "usage:" in r.stderr
    r = sh(f"{STEPS}/make_fbank.sh", tmp_path / "nodata", tmp_path / "f")
    assert r.returncode == 1 and "wav.scp not found" in r.stderr
    # nj above the number of utterances is capped; a launcher that records its job range
    # stands in for the real one (so no feature job runs), and its failure stops the step.
    d = make_data(tmp_path / "d")
    fake = tmp_path / "fake_cmd.sh"
    fake.write_text('#!/usr/bin/env bash\necho "launched $1" >&2\nexit 1\n')
    fake.chmod(0o755)
    r = sh(f"{STEPS}/make_fbank.sh", "--nj", "8", "--cmd", fake, d, tmp_path / "f")
    assert r.returncode == 1 and "using nj=3 instead of 8" in r.stdout
    assert "launched JOB=1:3" in r.stderr and "feature extraction failed" in r.stderr
    assert not (d / "feats.scp").exists()
    r = sh(f"{STEPS}/make_fbank.sh", "--nj", "0", d, tmp_path / "f")
    assert r.returncode == 1 and "--nj must be a positive integer" in r.stderr
