"""steps/launch_slurm.sh and conf/cmd_slurm.sh.

Two kinds of tests. The first run everywhere: fake `sbatch`/`squeue`/`scancel` scripts on PATH
record what the launcher asks for and run the job script here, which checks the option mapping,
the job script and the error paths. The second need a working Slurm (sbatch on PATH and a node
idle or mixed in `sinfo`); without one they are skipped: start one with
local/slurm/start_local_cluster.sh (as root).
"""
import os
import re
import shutil
import signal
import subprocess
import time

import kaldiio
import numpy as np
import pytest
import torch
import yaml

from conftest import live_commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "steps", "launch_slurm.sh")
ENV = dict(os.environ, LC_ALL="C")


def slurm_works():
    if shutil.which("sbatch") is None:
        return False
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and bool({"idle", "mix"} & set(r.stdout.split()))


SLURM = slurm_works()
needs_slurm = pytest.mark.skipif(
    not SLURM, reason="no working Slurm (start one with local/slurm/start_local_cluster.sh)")


def launch(*args, env=ENV, cwd=ROOT, timeout=120):
    return subprocess.run([LAUNCH, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


# ---------------------------------------------------------------- fake Slurm (no cluster needed)

FAKE_SBATCH = r"""#!/usr/bin/env bash
# records its arguments, then runs the job script once per array task, here and now (twice, as a
# requeued job's second start, with FAKE_RESTART set); prints FAKE_SBATCH_OUT (default 4242) as its id
printf '%s\n' "$@" > "$FAKE_DIR/sbatch.args"
[ -z "${FAKE_SBATCH_SLEEP:-}" ] || sleep "$FAKE_SBATCH_SLEEP"
if [ -n "${FAKE_REFUSE:-}" ]; then
  echo "sbatch: error: Batch job submission failed: $FAKE_REFUSE" >&2; exit 1
fi
array=""; cpus=""; script=""
for a in "$@"; do
  case $a in
    --array=*) array=${a#--array=} ;;
    --cpus-per-task=*) cpus=${a#*=} ;;
    --*) ;;
    *) script=$a ;;
  esac
done
echo "${FAKE_SBATCH_OUT:-4242}"
for start in 0 ${FAKE_RESTART:+1}; do
  if [ -n "$array" ]; then
    range=${array%\%*}
    for i in $(seq "${range%-*}" "${range#*-}"); do
      SLURM_RESTART_COUNT=$start SLURM_JOB_ID=4242 SLURM_ARRAY_TASK_ID=$i SLURM_CPUS_PER_TASK=$cpus bash "$script" > /dev/null 2>&1 || true
    done
  else
    SLURM_RESTART_COUNT=$start SLURM_JOB_ID=4242 SLURM_CPUS_PER_TASK=$cpus bash "$script" > /dev/null 2>&1 || true
  fi
done
"""
# squeue: the lines of $FAKE_DIR/states one call at a time (the last one repeated; ERROR: a failing
# call), else every task finished (nothing listed), the state in FAKE_STATE for task 1, or the job
# already forgotten by the controller (FAKE_STATE=purged). Asked for a user's jobs (-u), it lists
# FAKE_SWEEP_ID with the token sbatch was given.
FAKE_SQUEUE = r"""#!/usr/bin/env bash
echo "$@" >> "$FAKE_DIR/squeue.args"
if [[ " $* " == *" -u "* ]]; then
  [ -z "${FAKE_SWEEP_ID:-}" ] || echo "$FAKE_SWEEP_ID $(sed -n 's/^--comment=//p' "$FAKE_DIR/sbatch.args")"
  exit 0
fi
[ -z "${FAKE_SQUEUE_SLEEP:-}" ] || sleep "$FAKE_SQUEUE_SLEEP"
states=$FAKE_DIR/states
if [ -s "$states" ]; then
  line=$(head -n 1 "$states")
  [ "$(wc -l < "$states")" -le 1 ] || sed -i 1d "$states"
  if [ "$line" = ERROR ]; then echo "squeue: error: Socket timed out on send/recv operation" >&2; exit 1; fi
  echo "$line"; exit 0
fi
case ${FAKE_STATE:-} in
  '') ;;
  purged) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1 ;;
  *) echo "1 $FAKE_STATE" ;;
esac
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
echo "$@" >> "$FAKE_DIR/scancel.args"
"""


@pytest.fixture
def fake(tmp_path):
    """A bin dir with fake sbatch/squeue/scancel first on PATH; returns (env, record dir)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, text in [("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE), ("scancel", FAKE_SCANCEL)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(ENV, PATH=f"{bin_dir}:{ENV['PATH']}", FAKE_DIR=str(tmp_path))
    return env, tmp_path


def sbatch_args(rec):
    return (rec / "sbatch.args").read_text().splitlines()


def calls(rec, what):
    f = rec / f"{what}.args"
    return f.read_text().splitlines() if f.exists() else []


def test_fake_option_mapping(fake):
    env, rec = fake
    log = rec / "log" / "x.JOB.log"
    r = launch("--mem", "4G", "--gpu", "2", "--time", "1:00:00", "--num-threads", "3", "--max-jobs-run", "2",
               "--partition", "p1", "--account=acct", "--sbatch-opt", "--qos=high", "--sbatch-opt", "--exclusive",
               "JOB=1:3", log, "bash", "-c", "echo job JOB threads $SLURM_CPUS_PER_TASK", env=env)
    assert r.returncode == 0, r.stderr
    args = sbatch_args(rec)
    for want in ["--mem=4G", "--gres=gpu:2", "--time=1:00:00", "--cpus-per-task=3", "--array=1-3%2",
                 "--partition=p1", "--account=acct", "--qos=high", "--exclusive", "--export=ALL",
                 f"--chdir={ROOT}", "--job-name=x", f"--output={rec}/log/slurm/x.%A_%a.out",
                 "--requeue", "--open-mode=append"]:
        assert want in args, (want, args)
    assert [a for a in args if a.startswith("--comment=capsv-launch:")], args   # the token of this launch
    assert args[-1] == f"{rec}/log/slurm/x.sh"
    for j in (1, 2, 3):   # the job script wrote each log in launch_local.sh's format
        lines = (rec / "log" / f"x.{j}.log").read_text().splitlines()
        assert lines[0] == f"# bash -c echo\\ job\\ {j}\\ threads\\ \\$SLURM_CPUS_PER_TASK"
        assert lines[1].startswith("# Started at ") and lines[2] == "#"
        assert lines[3] == f"job {j} threads 3"
        assert lines[-2].startswith("# Accounting: time=") and lines[-2].endswith(" threads=3")
        assert lines[-1].startswith("# Ended (code 0) at ")


def test_fake_single_job_no_gpu(fake):
    env, rec = fake
    r = launch("--gpu", "0", "--mem=1G", rec / "one.log", "echo", "a b", "|", "tr", "a", "x", env=env)
    assert r.returncode == 0, r.stderr
    args = sbatch_args(rec)
    assert not any(a.startswith(("--gres", "--array", "--cpus-per-task", "--time", "--nodes")) for a in args), args
    assert "--mem=1G" in args and f"--output={rec}/slurm/one.%j.out" in args
    assert "x b" in (rec / "one.log").read_text().splitlines()


@pytest.mark.parametrize("gpu,want,unwanted", [
    ("2", ["--gres=gpu:2", "--cpus-per-gpu=9", "--mem-per-gpu=12G", "--nodes=3", "--ntasks-per-node=1"],
     ("--cpus-per-task", "--mem=")),
    # without a GPU the job gets one GPU's share, as CPUs and memory of its own
    ("0", ["--cpus-per-task=9", "--mem=12G"], ("--gres", "--cpus-per-gpu", "--mem-per-gpu", "--nodes")),
])
def test_fake_per_gpu_resources(fake, gpu, want, unwanted):
    env, rec = fake
    nodes = ["--nodes", "3"] if gpu != "0" else []
    r = launch("--cpus-per-gpu", "9", "--mem-per-gpu", "12G", "--gpu", gpu, *nodes, rec / "t.log", "true", env=env)
    assert r.returncode == 0, r.stderr
    args = sbatch_args(rec)
    assert all(w in args for w in want), args
    assert not any(a.startswith(unwanted) for a in args), args


def test_fake_stale_log_is_not_success(fake):
    """A log left by an earlier run must not count for a job that never ran."""
    env, rec = fake
    old = rec / "s.1.log"
    old.write_text("# true\n# Started at then\n#\n# Ended (code 0) at then\n")
    env = dict(env, FAKE_STATE="CANCELLED")
    (rec / "fakebin" / "sbatch").write_text("#!/usr/bin/env bash\necho 77\n")   # accepts, runs nothing
    r = launch("JOB=1:1", rec / "s.JOB.log", "true", env=env)
    assert r.returncode == 1
    assert f"job 1 failed (Slurm: CANCELLED), see {old}" in r.stderr
    assert f"Slurm's output: {rec}/slurm/s.77_1.out" in r.stderr


def test_fake_purged_job(fake):
    """A job the controller has already forgotten is judged by its logs."""
    env, rec = fake
    r = launch("JOB=1:2", rec / "p.JOB.log", "bash", "-c", "[ JOB = 1 ]", env=dict(env, FAKE_STATE="purged"))
    assert r.returncode == 1
    assert f"job 2 failed, see {rec}/p.2.log" in r.stderr and "job 1 failed" not in r.stderr


def test_fake_sbatch_refuses(fake):
    env, rec = fake
    env = dict(env, FAKE_REFUSE="Requested node configuration is not available")
    r = launch("--gpu", "8", rec / "t.log", "true", env=env)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("launch_slurm.sh: ERROR: sbatch refused the submission")
    assert "Requested node configuration is not available" in lines[0]


def start_launcher(args, env, cwd=ROOT):
    """The launcher in the background with SIGINT at its default action, whatever this process has:
    a process started with SIGINT ignored passes that on, and bash cannot trap a signal ignored on
    entry (pytest in the background of a non-interactive shell has it ignored)."""
    return subprocess.Popen([LAUNCH, *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_until(cond, what, timeout=60):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_fake_signal_while_polling_cancels(fake, sig):
    """A signal while squeue runs (a slow one) cancels the job at once and ends the launcher with it."""
    env, rec = fake
    env = dict(env, FAKE_STATE="RUNNING", FAKE_SQUEUE_SLEEP="30")
    p = start_launcher(["JOB=1:2", rec / "u.JOB.log", "true"], env)
    wait_until(lambda: calls(rec, "squeue"), "the first squeue")
    t = time.time()
    p.send_signal(sig)
    _, err = p.communicate(timeout=20)
    assert time.time() - t < 5, "the slow squeue delayed the cancel"
    assert p.returncode == -sig, err          # died of the signal: a shell sees 128 + its number
    assert calls(rec, "scancel") == ["4242"]
    assert f"interrupted (SIG{sig.name[3:]}); cancelled Slurm job 4242" in err


def test_fake_signal_during_sbatch_cancels_what_it_submitted(fake):
    """sbatch cut short by Ctrl-C: the job it submitted all the same is found by its token and cancelled."""
    env, rec = fake
    env = dict(env, FAKE_SBATCH_SLEEP="30", FAKE_SWEEP_ID="4343")
    p = start_launcher([rec / "b.log", "true"], env)
    wait_until(lambda: (rec / "sbatch.args").exists(), "sbatch")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=20)
    assert p.returncode == -signal.SIGINT, err
    assert calls(rec, "scancel") == ["4343"], err
    assert "cancelled Slurm job 4343" in err


def test_fake_requeued_job_is_followed(fake):
    """Preempted, then pending and running again: the launcher waits for the second start, whose log
    continues the first one's."""
    env, rec = fake
    (rec / "states").write_text("1 PREEMPTED\n1 PENDING\n1 COMPLETED\n")
    prog = f"[ -e {rec}/first ] || {{ touch {rec}/first; echo first start; exit 143; }}; echo second start"
    r = launch("JOB=1:1", rec / "q.JOB.log", "bash", "-c", prog, env=dict(env, FAKE_RESTART="1"))
    assert r.returncode == 0, r.stderr
    lines = (rec / "q.1.log").read_text().splitlines()
    assert "first start" in lines and lines[lines.index("first start") + 2].startswith("# Ended (code 143)")
    restarted = [l for l in lines if l.startswith("# Restarted at ")]
    assert len(restarted) == 1 and restarted[0].endswith("(start 2: Slurm requeued the job)")
    assert lines[-2:][0].startswith("# Accounting") and lines[-1].startswith("# Ended (code 0)")
    assert lines[-3] == "second start"
    assert not calls(rec, "scancel")


def test_fake_preempted_for_good_fails(fake):
    """A task that stays PREEMPTED (not requeued) is a failure once the grace time is over."""
    env, rec = fake
    (rec / "states").write_text("1 PREEMPTED\n")
    r = launch("JOB=1:1", rec / "e.JOB.log", "bash", "-c", "exit 143",
               env=dict(env, CAPSV_SLURM_REQUEUE_GRACE="2"))
    assert r.returncode == 1
    assert f"job 1 failed (Slurm: PREEMPTED), see {rec}/e.1.log" in r.stderr
    assert len(calls(rec, "squeue")) >= 2   # it waited for a requeue before giving up


def test_fake_held_after_requeue_is_cancelled(fake):
    env, rec = fake
    (rec / "states").write_text("1 RUNNING\n1 REQUEUE_HOLD\n")
    r = launch("JOB=1:1", rec / "h.JOB.log", "bash", "-c", "exit 1", env=env)
    assert r.returncode == 1
    assert calls(rec, "scancel") == ["4242"] and "holds task(s) 1 after a requeue" in r.stderr


def test_fake_controller_errors_cancel(fake):
    """squeue failing again and again: the job is cancelled, not left running unwatched."""
    env, rec = fake
    (rec / "states").write_text("ERROR\n")
    r = launch("JOB=1:1", rec / "c.JOB.log", "true", env=dict(env, CAPSV_SLURM_MAX_ERRORS="3"))
    assert r.returncode == 1
    assert calls(rec, "scancel") == ["4242"]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "squeue failed 3 times in a row" in err[0] and "Socket timed out" in err[0]
    assert "cancelled it rather than leave it running unwatched" in err[0]


def test_fake_other_cluster_followed_with_M(fake):
    """A job id of another cluster (<id>;<cluster>) is followed and cancelled with -M <cluster>."""
    env, rec = fake
    env = dict(env, FAKE_SBATCH_OUT="4242;gpu2", FAKE_STATE="RUNNING")
    p = start_launcher(["--sbatch-opt", "--clusters=gpu2", rec / "m.log", "true"], env)
    wait_until(lambda: calls(rec, "squeue"), "the first squeue")
    assert calls(rec, "squeue")[0].startswith("-M gpu2 -h -t all -j 4242 ")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=20)
    assert p.returncode == -signal.SIGTERM, err
    assert calls(rec, "scancel") == ["-M gpu2 4242"]


# ---------------------------------------------------------------- what stage 2 asks a cluster for

def tiny_feats_dir(d, n_spk=4, n_utt=3):
    """A training data dir of random 40-dim features (feats, utt2spk, utt2num_frames)."""
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    utts = sorted(f"spk{s}-u{u}" for s in range(n_spk) for u in range(n_utt))
    with kaldiio.WriteHelper(f"ark,scp:{d}/feats.ark,{d}/feats.scp") as w:
        for u in utts:
            w(u, rng.standard_normal((250, 40)).astype(np.float32))
    (d / "utt2spk").write_text("".join(f"{u} {u.split('-')[0]}\n" for u in utts))
    (d / "utt2num_frames").write_text("".join(f"{u} 250\n" for u in utts))


RECORDING_LAUNCHER = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$(dirname "$0")/launcher.args"
"""


@pytest.mark.parametrize("opts,launcher_opts,program", [
    # a cluster launcher: one GPU by default, and the pre-flight passes with device=cuda on a host without one
    ([], ["--gpu", "1"], ["python", "-m", "capsv.bin.train"]),
    (["--ngpu", "0"], ["--gpu", "0"], ["python", "-m", "capsv.bin.train"]),
    # (M nodes x N GPUs as one job: test_slurm_srun_torchrun on a real cluster)
])
def test_train_asks_cluster_for_gpus(tmp_path, opts, launcher_opts, program):
    tiny_feats_dir(tmp_path / "data")
    (tmp_path / "launcher").write_text(RECORDING_LAUNCHER)
    (tmp_path / "launcher").chmod(0o755)
    cpu_only = opts == ["--ngpu", "0"]
    cfg = yaml.safe_load(open(f"{ROOT}/conf/mini/cap.yaml"))
    cfg["device"] = "auto" if cpu_only else "cuda"   # a GPU config, checked on this host without a GPU
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run(["steps/train.sh", "--cluster", "slurm", "--cmd", str(tmp_path / "launcher"), *opts,
                        "--config", str(tmp_path / "gpu.yaml"), str(tmp_path / "data"), str(tmp_path / "exp"),
                        "train.speakers_per_batch=4"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    args = (tmp_path / "launcher.args").read_text().splitlines()
    log = args.index(str(tmp_path / "exp" / "log" / "train.log"))
    assert args[:log] == launcher_opts
    assert args[log + 1:log + 1 + len(program)] == program
    # a job without GPUs trains on the CPU rather than on a GPU it did not ask for
    assert ("device=cpu" in args) == cpu_only


@pytest.mark.parametrize("opts,gpu", [([], True), (["--ngpu", "0"], False), (["--score-gpu", "false"], False),
                                      (["--ngpu", "0", "--score-gpu", "true"], True)])
def test_score_jobs_ask_for_a_gpu_as_training_did(tmp_path, opts, gpu):
    """Stage 3 on a cluster: each job asks for a GPU when training did (or as --score-gpu says); a job
    without one scores with device=cpu."""
    (tmp_path / "launcher").write_text(RECORDING_LAUNCHER + "exit 1\n")
    (tmp_path / "launcher").chmod(0o755)
    (tmp_path / "cmd.sh").write_text(f"cluster=slurm\ntrain_cmd=steps/launch_slurm.sh\nfeat_cmd=$train_cmd\n"
                                     f"score_cmd='{tmp_path}/launcher --mem 2G'\n")
    (tmp_path / "data/synth_test").mkdir(parents=True)
    (tmp_path / "data/synth_test/trials").write_text("a b target\n")
    (tmp_path / "data/synth_test/feats.scp").write_text("a x.ark:10\nb x.ark:20\n")  # the launcher fails first
    (tmp_path / "exp/mini_cap").mkdir(parents=True)
    (tmp_path / "exp/mini_cap/config.yaml").write_text("{}\n")
    r = subprocess.run(["bash", "run.sh", "--cmd-conf", str(tmp_path / "cmd.sh"), "--stage", "3", "--stop-stage", "3",
                        "--data", str(tmp_path / "data"), "--exp", str(tmp_path / "exp"), *opts],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 1 and "extraction failed" in r.stderr, r.stderr
    args = (tmp_path / "launcher.args").read_text().splitlines()
    assert args[:2] == ["--mem", "2G"] and (args[2:4] == ["--gpu", "1"]) == gpu
    assert ("device=cpu" in args) == (not gpu)


def test_sbatch_missing(tmp_path):
    """PATH with every usual command except Slurm's: one clear line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in ENV["PATH"].split(":"):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if name not in ("sbatch", "squeue", "scancel") and not (bin_dir / name).exists():
                os.symlink(os.path.join(d, name), bin_dir / name)
    r = launch("JOB=1:2", tmp_path / "v.JOB.log", "true", env=dict(ENV, PATH=str(bin_dir)))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch_slurm.sh: ERROR: sbatch not found"), r.stderr


@pytest.mark.parametrize("args,msg", [
    (["--memory", "4G", "x.log", "true"], "unknown option --memory"),
    (["--gpu", "two", "x.log", "true"], "--gpu two is not a non-negative integer"),
    (["JOB=1:3", "x.log", "true"], "must contain JOB"),
    (["JOB=3:1", "x.JOB.log", "true"], "empty job range"),
])
def test_usage_errors(fake, args, msg):
    env, rec = fake
    r = launch(*args, env=env, cwd=rec)
    assert r.returncode == 1 and msg in r.stderr
    assert not (rec / "sbatch.args").exists()   # nothing was submitted


def test_cmd_slurm_conf():
    """conf/cmd_slurm.sh: Slurm launchers stating CPUs, memory and time for each kind of job; conf/cmd.sh: local."""
    show = '. {} && echo "$cluster" && echo "$feat_cmd" && echo "$train_cmd" && echo "$score_cmd"'
    r = subprocess.run(["bash", "-c", show.format("conf/cmd_slurm.sh")], capture_output=True, text=True, cwd=ROOT)
    cluster, feat, train, score = r.stdout.splitlines()
    assert cluster == "slurm"
    for c in (feat, train, score):
        assert c.split()[0] == "steps/launch_slurm.sh" and "--time" in c.split()
    assert "--mem" in feat.split()
    assert {"--cpus-per-gpu", "--mem-per-gpu"} <= set(train.split()) and "--time 48:00:00" in train
    assert {"--num-threads", "--mem"} <= set(score.split())
    r = subprocess.run(["bash", "-c", show.format("conf/cmd.sh")], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.split() == ["none"] + ["steps/launch_local.sh"] * 3


def test_cmd_conf_without_cluster(tmp_path):
    """A cmd conf that does not say whether its launchers submit to a cluster: known launchers are
    recognised by name, another is one line asking for cluster=."""
    (tmp_path / "cmd.sh").write_text('export train_cmd="my_queue.pl --mem 4G"\nexport feat_cmd="$train_cmd"\n')
    r = subprocess.run(["bash", "run.sh", "--cmd-conf", str(tmp_path / "cmd.sh"), "--stage", "4",
                        "--data", str(tmp_path / "data")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"run.sh: ERROR: {tmp_path}/cmd.sh: set cluster=none (jobs run on this machine) or cluster=slurm "
        "(jobs are submitted to Slurm) for train_cmd 'my_queue.pl --mem 4G'"]


# ---------------------------------------------------------------- a real Slurm

@needs_slurm
def test_slurm_jobs_logs(tmp_path):
    r = launch("JOB=1:3", tmp_path / "log" / "x.JOB.log", "bash", "-c",
               f"echo job JOB on $SLURMD_NODENAME > {tmp_path}/out.JOB")
    assert r.returncode == 0, r.stderr
    for j in (1, 2, 3):
        assert (tmp_path / f"out.{j}").read_text().startswith(f"job {j} on ")
        log = (tmp_path / "log" / f"x.{j}.log").read_text().splitlines()
        assert log[0].startswith("# bash -c") and f"out.{j}" in log[0]
        assert log[1].startswith("# Started at") and log[2] == "#"
        assert log[-1].startswith("# Ended (code 0)")
    assert len(list((tmp_path / "log" / "slurm").glob("x.*_[123].out"))) == 3


@needs_slurm
def test_slurm_pipe_and_environment(tmp_path):
    """`|` stays a pipe; the job runs in the submitting dir with the caller's environment."""
    env = dict(ENV, CAPSV_SLURM_TEST="carried over")
    r = launch(tmp_path / "one.log", "echo", "a b", "|", "tr", "a", "x", env=env)
    assert r.returncode == 0, r.stderr
    assert "x b" in (tmp_path / "one.log").read_text().splitlines()
    r = launch(tmp_path / "env.log", "bash", "-c", 'echo "$PWD|$CAPSV_SLURM_TEST|$LC_ALL"', env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"{tmp_path}|carried over|C" in (tmp_path / "env.log").read_text().splitlines()


@needs_slurm
def test_slurm_failure_names_log(tmp_path):
    r = launch("JOB=1:3", tmp_path / "log" / "y.JOB.log", "bash", "-c", "echo last words of JOB; [ JOB != 2 ]")
    assert r.returncode == 1
    log2 = tmp_path / "log" / "y.2.log"
    assert f"launch_slurm.sh: job 2 failed (Slurm: FAILED), see {log2}" in r.stderr
    assert "last words of 2" in r.stderr and "job 1 failed" not in r.stderr and "job 3 failed" not in r.stderr
    assert log2.read_text().splitlines()[-1].startswith("# Ended (code 1)")


@needs_slurm
def test_slurm_killed_job_names_slurm_output(tmp_path):
    """A job that dies without its footer is named with Slurm's own output file."""
    r = launch("JOB=1:2", tmp_path / "k.JOB.log", "bash", "-c", "echo about to die JOB; [ JOB = 1 ] || kill -9 $PPID")
    assert r.returncode == 1
    assert f"job 2 failed (Slurm: FAILED), see {tmp_path}/k.2.log" in r.stderr
    assert "ended without a footer" in r.stderr and f"{tmp_path}/slurm/k." in r.stderr
    assert "job 1 failed" not in r.stderr


@needs_slurm
def test_slurm_resources_are_requested(tmp_path):
    # in a file, as the launcher would turn the JOB in $SLURM_JOB_ID into the job index
    show = tmp_path / "show.sh"
    show.write_text('echo cpus=$SLURM_CPUS_PER_TASK mem=$SLURM_MEM_PER_NODE\nscontrol show job "$SLURM_JOB_ID"\n')
    r = launch("--num-threads", "2", "--mem", "1500M", "--time", "0:05:00", "--max-jobs-run", "1", "JOB=1:2",
               tmp_path / "r.JOB.log", "bash", show)
    assert r.returncode == 0, r.stderr
    for j in (1, 2):
        text = (tmp_path / f"r.{j}.log").read_text()
        assert "cpus=2 mem=1500" in text.splitlines()
        assert f"ArrayTaskId={j} ArrayTaskThrottle=1 " in text, text
        for want in ["TimeLimit=00:05:00", "CPUs/Task=2", "MinMemoryNode=1500M"]:
            assert want in text, want
        assert text.splitlines()[-2].endswith("threads=2")


def in_queue(jobid):
    r = subprocess.run(["squeue", "-h", "-j", str(jobid), "-o", "%i %T"], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""   # an unknown (purged) id is not in the queue


def assert_gone_within(jobid, t0, seconds=10):
    while in_queue(jobid):
        assert time.time() - t0 < seconds, f"job {jobid} still in squeue {seconds}s after the signal: {in_queue(jobid)}"
        time.sleep(0.2)


def slow_wrapper(tmp_path, name, text):
    """A `name` first on PATH that runs `text` (with REAL set to the real command)."""
    bin_dir = tmp_path / "slowbin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(f"#!/usr/bin/env bash\nREAL={shutil.which(name)}\n{text}")
    (bin_dir / name).chmod(0o755)
    return dict(ENV, PATH=f"{bin_dir}:{ENV['PATH']}")


@needs_slurm
@pytest.mark.parametrize("sig,parent_ignores_int,slow_squeue", [
    (signal.SIGINT, False, False),   # Ctrl-C between polls
    (signal.SIGINT, True, False),    # the same with this process ignoring SIGINT (pytest in a script's background)
    (signal.SIGHUP, False, True),    # a dropped ssh session while squeue hangs
])
def test_slurm_interrupt_cancels(tmp_path, sig, parent_ignores_int, slow_squeue):
    env = slow_wrapper(tmp_path, "squeue", 'sleep 30; exec "$REAL" "$@"\n') if slow_squeue else ENV
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if parent_ignores_int else None
    try:
        p = start_launcher(["JOB=1:2", tmp_path / "c.JOB.log", "sleep", "300"], env)
    finally:
        if parent_ignores_int:
            signal.signal(signal.SIGINT, previous)
    wait_until(lambda: all((tmp_path / f"c.{j}.log").exists() for j in (1, 2)), "both tasks to run")
    t0 = time.time()
    p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    assert p.returncode == -sig, err
    jobid = err.split("cancelled Slurm job ")[1].split()[0]
    assert_gone_within(jobid, t0)
    for j in (1, 2):   # the jobs were stopped, and said so in their logs
        wait_until(lambda: (tmp_path / f"c.{j}.log").read_text().splitlines()[-1].startswith("# Ended"),
                   "the job's footer", timeout=10)


@needs_slurm
def test_slurm_interrupt_during_sbatch_cancels(tmp_path):
    """Ctrl-C while sbatch has submitted but not yet answered: the job is found by its token and cancelled."""
    env = slow_wrapper(tmp_path, "sbatch", f'id=$("$REAL" "$@") || exit\necho "$id" > {tmp_path}/submitted\n'
                                          'sleep 30\necho "$id"\n')
    p = start_launcher([tmp_path / "d.log", "sleep", "300"], env)
    wait_until(lambda: (tmp_path / "submitted").exists(), "the submission")
    jobid = (tmp_path / "submitted").read_text().strip().split(";")[0]
    t0 = time.time()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == -signal.SIGINT, err
    assert f"cancelled Slurm job {jobid}" in err
    assert_gone_within(jobid, t0)


# The recipe on the local cluster: stages 0-4 through Slurm (local/slurm/cmd_local_cluster.sh, conf/cmd_slurm.sh
# sized for 2 CPUs); the training job is requeued (scontrol requeue) in the middle of epoch 2.
LOCAL_CONF = "local/slurm/cmd_local_cluster.sh"


def pids_of(*parts):
    """Pids of live processes whose command line holds every one of `parts`."""
    return [p for p, cmd in live_commands() if all(x in cmd for x in parts)]


def argv(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode(errors="replace").split("\0")


def slurm_run_sh(tmp, exp, *args, conf=LOCAL_CONF, **kw):
    cmd = ["bash", "run.sh", "--synth-size", "tiny", "--cmd-conf", conf, "--config", f"{tmp}/tiny_cap.yaml",
           "--data", f"{tmp}/data", "--exp", f"{tmp}/{exp}", "--fbankdir", f"{tmp}/fbank",
           "--corpusdir", f"{tmp}/corpus", *args]
    if kw.get("background"):   # Ctrl-C reaches it however this process was started (see start_launcher)
        return subprocess.Popen(cmd, cwd=ROOT, stdout=kw["out"], stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def slurm_recipe(tmp_path_factory):
    """Root of a tiny recipe run on the local cluster whose training job was requeued mid-epoch."""
    if not SLURM:
        pytest.skip("no working Slurm (start one with local/slurm/start_local_cluster.sh)")
    tmp = tmp_path_factory.mktemp("slurm_recipe")
    with open(f"{ROOT}/conf/mini/cap.yaml") as f:
        cfg = yaml.safe_load(f)
    cfg["train"].update(epochs=2, speakers_per_batch=4, num_workers=0)
    (tmp / "tiny_cap.yaml").write_text(yaml.safe_dump(cfg))
    out = open(tmp / "run.out", "w")
    p = slurm_run_sh(tmp, "exp", background=True, out=out)
    models = tmp / "exp" / "tiny_cap" / "models"
    training = []
    try:
        wait_until(lambda: (models / "epoch_0001.pt.sha256").exists() or p.poll() is not None, "epoch 1", timeout=400)
        assert p.poll() is None, (tmp / "run.out").read_text()[-3000:]
        # freeze the training where it is (inside epoch 2), then have Slurm requeue its job
        training = [q for q in pids_of("capsv.bin.train", str(models.parent))
                    if argv(q)[0].rsplit("/", 1)[-1].startswith("python") and "--check" not in argv(q)]
        for q in training:
            os.kill(q, signal.SIGSTOP)
        assert training and not (models / "epoch_0002.pt").exists(), "not stopped inside epoch 2"
        jobid = next((models.parent / "log" / "slurm").glob("train.*.out")).name.split(".")[1]
        r = subprocess.run(["scontrol", "requeue", jobid], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        p.wait(timeout=600)
    except BaseException:
        for q in training:   # nothing stopped or running is left behind: Ctrl-C cancels the job
            try:
                os.kill(q, signal.SIGCONT)
            except ProcessLookupError:
                pass
        os.killpg(p.pid, signal.SIGINT)   # as Ctrl-C in a terminal
        p.wait(timeout=60)
        raise
    finally:
        out.close()
    return tmp, p.returncode, (tmp / "run.out").read_text(), jobid


def gpus_asked(slurm_out):
    """The GPUs per node in the job's own view (scontrol show job, at the top of Slurm's output file)."""
    m = re.search(r"TresPerNode=(?:gres[:/])?gpu[:=](\d+)", slurm_out)
    return int(m.group(1)) if m else 0


@needs_slurm
def test_slurm_tiny_recipe(slurm_recipe):
    """run.sh stages 0-4 through Slurm: features, training (one GPU asked for, by default) and scoring
    (a GPU each, as training had) are Slurm jobs; the requeued training job was followed to its end."""
    tmp, rc, out, jobid = slurm_recipe
    assert rc == 0, out[-4000:]
    exp = tmp / "exp"
    assert "steps/launch_slurm.sh" in out
    # each stage's jobs left Slurm's output files beside their logs, and their logs ended well
    for pattern in ["make_fbank/synth_train/slurm/make_fbank_synth_train.*_1.out",
                    "make_fbank/synth_test/slurm/make_fbank_synth_test.*_2.out",
                    "tiny_cap/log/slurm/train.*.out", "tiny_cap/log/slurm/score_synth_test.*_1.out"]:
        assert list(exp.glob(pattern)), pattern
    for log in ["tiny_cap/log/train.log", "tiny_cap/log/score_synth_test.1.log",
                "make_fbank/synth_train/make_fbank_synth_train.2.log"]:
        assert (exp / log).read_text().splitlines()[-1].startswith("# Ended (code 0)"), log
    train_out = (exp / "tiny_cap/log/slurm" / f"train.{jobid}.out").read_text()
    assert gpus_asked(train_out) == 1
    assert "start 1," in train_out and "start 2," in train_out and "DUE TO JOB REQUEUE" in train_out
    train_log = (exp / "tiny_cap/log/train.log").read_text()
    restarted = train_log.index("(start 2: Slurm requeued the job)")
    assert "resuming from" in train_log[restarted:] and "epoch 1:" not in train_log[restarted:]
    for j in (1, 2):
        assert gpus_asked(next((exp / "tiny_cap/log/slurm").glob(f"score_synth_test.*_{j}.out")).read_text()) == 1
    assert not gpus_asked(next((exp / "make_fbank/synth_train/slurm").glob("*_1.out")).read_text())
    assert (exp / "tiny_cap/models/epoch_0002.pt").is_file()
    assert "EER" in (exp / "tiny_cap/results.txt").read_text()


@needs_slurm
def test_slurm_requeued_training_is_identical(slurm_recipe):
    """The training requeued in the middle of epoch 2 ends with the weights of an uninterrupted run
    (here, on the same CPUs; training on one machine is bit-deterministic)."""
    tmp, rc, out, _ = slurm_recipe
    assert rc == 0, out[-4000:]
    # the same training in one go here, as the job runs it
    r = subprocess.run(["python", "-m", "capsv.bin.train", "--config", f"{tmp}/tiny_cap.yaml", "--data",
                        f"{tmp}/data/synth_train", "--exp", f"{tmp}/exp_ref/tiny_cap"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(tmp / "exp_ref/tiny_cap/models/epoch_0002.pt", weights_only=True, map_location="cpu")
    b = torch.load(tmp / "exp/tiny_cap/models/epoch_0002.pt", weights_only=True, map_location="cpu")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


@needs_slurm
def test_slurm_dropped_session_cancels_training(slurm_recipe):
    """The ssh session of a run in stage 2 drops (HUP to its process group, as the terminal's hangup sends):
    run.sh, train.sh and the launcher end, and the training job is cancelled."""
    tmp, rc, out, _ = slurm_recipe
    assert rc == 0, out[-4000:]
    with open(tmp / "hup.out", "w") as f:
        p = slurm_run_sh(tmp, "exp_hup", "--stage", "2", "--stop-stage", "2", "--train-opts", "train.epochs=50",
                         background=True, out=f)
    log = tmp / "exp_hup/tiny_cap/log/train.log"
    wait_until(lambda: log.exists() and "# Started at" in log.read_text() or p.poll() is not None, "training to start",
               timeout=120)
    assert p.poll() is None, (tmp / "hup.out").read_text()[-3000:]
    jobid = next((log.parent / "slurm").glob("train.*.out")).name.split(".")[1]
    t0 = time.time()
    os.killpg(p.pid, signal.SIGHUP)
    p.wait(timeout=30)
    assert_gone_within(jobid, t0)
    wait_until(lambda: not pids_of(str(tmp / "exp_hup")), "the run's processes to end", timeout=10)
    assert "interrupted (SIGHUP); cancelled Slurm job" in (tmp / "hup.out").read_text()


def slurm_nodes():
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True)
    return sorted(set(r.stdout.split()))


@needs_slurm
@pytest.mark.parametrize("ngpu,nnodes", [(2, 1), (1, 2)])
def test_slurm_srun_torchrun(slurm_recipe, ngpu, nnodes):
    """Several ranks through Slurm: one job of nnodes x ngpu GPUs, srun starting one torchrun per node, the
    rendezvous on the allocation's first host; 2 ranks train (on the CPU here)."""
    if nnodes > len(slurm_nodes()):
        pytest.skip(f"the cluster has {len(slurm_nodes())} node(s)")
    tmp, rc, out, _ = slurm_recipe
    assert rc == 0, out[-4000:]
    exp = f"exp_ddp{nnodes}"
    r = slurm_run_sh(tmp, exp, "--stage", "2", "--stop-stage", "2", "--ngpu", str(ngpu), "--nnodes", str(nnodes),
                     "--train-opts", "train.epochs=1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (tmp / exp / "tiny_cap/log/train.log").read_text()
    job_view = next((tmp / exp / "tiny_cap/log/slurm").glob("train.*.out")).read_text()
    assert gpus_asked(job_view) == ngpu and f"NumNodes={nnodes} " in job_view
    first = re.search(r"\bNodeList=(\S+)", job_view).group(1)
    first = subprocess.run(["scontrol", "show", "hostnames", first], capture_output=True, text=True).stdout.split()[0]
    assert re.search(rf"srun_torchrun.sh: {nnodes} node\(s\) x {ngpu} ranks, rendezvous at \S+:\d+ on {first} ", log), log
    assert f"x 2 ranks" in log and log.splitlines()[-1].startswith("# Ended (code 0)")
    assert (tmp / exp / "tiny_cap/models/epoch_0001.pt").is_file()
