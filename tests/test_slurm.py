"""steps/launch_slurm.sh and conf/cmd_slurm.sh.

Two kinds of tests. The first run everywhere: fake `sbatch`/`squeue`/`scancel` scripts on PATH
record what the launcher asks for and run the job script here, which checks the option mapping,
the job script and the error paths. The second need a working Slurm (sbatch on PATH and a node
idle or mixed in `sinfo`); without one they are skipped: start one with
local/slurm/start_local_cluster.sh (as root).
"""
import os
import shutil
import signal
import subprocess
import time

import pytest
import yaml

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
# records its arguments, then runs the job script once per array task, here and now
printf '%s\n' "$@" > "$FAKE_DIR/sbatch.args"
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
echo 4242
if [ -n "$array" ]; then
  range=${array%\%*}
  for i in $(seq "${range%-*}" "${range#*-}"); do
    SLURM_ARRAY_TASK_ID=$i SLURM_CPUS_PER_TASK=$cpus bash "$script" > /dev/null 2>&1 || true
  done
else
  SLURM_CPUS_PER_TASK=$cpus bash "$script" > /dev/null 2>&1 || true
fi
"""
# squeue: every task finished (nothing listed), the state in FAKE_STATE for task 1, or the job
# already forgotten by the controller (FAKE_STATE=purged)
FAKE_SQUEUE = """#!/usr/bin/env bash
echo "$@" >> "$FAKE_DIR/squeue.args"
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
                 f"--chdir={ROOT}", "--job-name=x", f"--output={rec}/log/slurm/x.%A_%a.out"]:
        assert want in args, (want, args)
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
    assert not any(a.startswith(("--gres", "--array", "--cpus-per-task", "--time")) for a in args), args
    assert "--mem=1G" in args and f"--output={rec}/slurm/one.%j.out" in args
    assert "x b" in (rec / "one.log").read_text().splitlines()


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


def test_fake_interrupt_cancels(fake):
    env, rec = fake
    env = dict(env, FAKE_STATE="RUNNING")
    p = subprocess.Popen([LAUNCH, "JOB=1:2", str(rec / "u.JOB.log"), "sleep", "1"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(100):   # until it polls the queue
        if (rec / "squeue.args").exists():
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 130
    assert (rec / "scancel.args").read_text().split() == ["4242"]
    assert "cancelled Slurm job 4242" in err


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
    """conf/cmd_slurm.sh sets both launchers to launch_slurm.sh with memory and time."""
    r = subprocess.run(["bash", "-c", '. conf/cmd_slurm.sh && echo "$feat_cmd" && echo "$train_cmd"'],
                       capture_output=True, text=True, cwd=ROOT)
    feat, train = r.stdout.splitlines()
    for c in (feat, train):
        assert c.split()[0] == "steps/launch_slurm.sh" and "--mem" in c and "--time" in c


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


@needs_slurm
def test_slurm_interrupt_cancels(tmp_path):
    p = subprocess.Popen([LAUNCH, "JOB=1:2", str(tmp_path / "c.JOB.log"), "sleep", "300"], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(300):   # until both tasks run
        if all((tmp_path / f"c.{j}.log").exists() for j in (1, 2)):
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    jobid = err.split("cancelled Slurm job ")[1].split()[0]
    for _ in range(100):
        q = subprocess.run(["squeue", "-h", "-j", jobid], capture_output=True, text=True).stdout
        if not q.strip():
            break
        time.sleep(0.2)
    assert not q.strip(), q


def cmd_conf_in_run_sh():
    r = subprocess.run(["bash", "run.sh", "--help"], capture_output=True, text=True, cwd=ROOT)
    return "--cmd-conf" in r.stdout


@needs_slurm
def test_slurm_tiny_recipe(tmp_path):
    """run.sh stages 0-4 with conf/cmd_slurm.sh: features, training and scoring are Slurm jobs."""
    if not cmd_conf_in_run_sh():
        pytest.skip("run.sh has no --cmd-conf option yet")
    with open(f"{ROOT}/conf/mini/cap.yaml") as f:
        cfg = yaml.safe_load(f)
    cfg["train"].update(epochs=2, speakers_per_batch=4, num_workers=0)
    (tmp_path / "tiny_cap.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run(["bash", "run.sh", "--synth-size", "tiny", "--cmd-conf", "conf/cmd_slurm.sh",
                        "--config", str(tmp_path / "tiny_cap.yaml"), "--data", f"{tmp_path}/data",
                        "--exp", f"{tmp_path}/exp", "--fbankdir", f"{tmp_path}/fbank",
                        "--corpusdir", f"{tmp_path}/corpus"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exp = tmp_path / "exp"
    assert "steps/launch_slurm.sh" in r.stdout
    # each stage's jobs left Slurm's output files beside their logs, and their logs ended well
    for pattern in ["make_fbank/synth_train/slurm/make_fbank_synth_train.*_1.out",
                    "make_fbank/synth_test/slurm/make_fbank_synth_test.*_2.out",
                    "tiny_cap/log/slurm/train.*.out", "tiny_cap/log/slurm/score_synth_test.*_1.out"]:
        assert list(exp.glob(pattern)), pattern
    for log in ["tiny_cap/log/train.log", "tiny_cap/log/score_synth_test.1.log",
                "make_fbank/synth_train/make_fbank_synth_train.2.log"]:
        assert (exp / log).read_text().splitlines()[-1].startswith("# Ended (code 0)"), log
    assert (exp / "tiny_cap/models/epoch_0002.pt").is_file()
    assert "EER" in (exp / "tiny_cap/results.txt").read_text()
