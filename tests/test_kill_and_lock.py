"""run.sh killed anywhere resumes to the same result; one run per experiment; run.sh's own bad options.

A run is SIGKILLed mid-epoch (the whole process group, as a scheduler or the OOM killer would) and,
on the re-run, inside a checkpoint write; the final weights and score file must be bit-identical
to an uninterrupted run's (CPU, fixed seed). The checkpoint-write kill comes from a
sitecustomize.py put on the training process's PYTHONPATH: an audit hook that SIGKILLs the
process when it opens the temporary file of a chosen epoch's checkpoint for writing.
"""
import os
import signal
import subprocess
import time

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KILL_HOOK = '''
import os, signal, sys
_want = os.environ.get("CAPSV_TEST_KILL_IN_WRITE")
def _hook(event, args):
    if event == "open" and _want and isinstance(args[0], str) and _want in args[0] and args[0].endswith(".tmp") \\
            and isinstance(args[1], str) and "w" in args[1]:
        os.kill(os.getpid(), signal.SIGKILL)
if _want:
    sys.addaudithook(_hook)
'''


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    with open(f"{ROOT}/conf/mini/cap.yaml") as f:
        cfg = yaml.safe_load(f)
    cfg["train"].update(epochs=4, speakers_per_batch=2, num_workers=0)
    (tmp / "k.yaml").write_text(yaml.safe_dump(cfg))
    r = recipe(tmp, "exp_ref", "--stop-stage", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    (tmp / "hook").mkdir()
    (tmp / "hook" / "sitecustomize.py").write_text(KILL_HOOK)
    return tmp


def recipe(tmp, exp, *args, env=None, **kw):
    cmd = ["bash", "run.sh", "--synth-size", "tiny", "--data", f"{tmp}/data", "--exp", f"{tmp}/{exp}",
           "--fbankdir", f"{tmp}/fbank", "--corpusdir", f"{tmp}/corpus", "--config", f"{tmp}/k.yaml", *args]
    if kw.pop("background", False):
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)


def wait_for(cond, what, timeout=120):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def kill_all(p):
    """SIGKILL the run and everything it started, and wait until they are all gone."""
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()

    def gone():
        try:
            os.killpg(p.pid, 0)
            return False
        except ProcessLookupError:
            return True
    wait_for(gone, "the killed processes to end", timeout=30)


def one_error_line(r):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode != 0 and len(lines) == 1, r.stdout[-2000:] + r.stderr
    return lines[0]


def final_state(exp):
    return torch.load(f"{exp}/k/models/epoch_0004.pt", weights_only=True, map_location="cpu")


def test_killed_mid_epoch_and_in_checkpoint_write_gives_identical_results(corpus):
    tmp = corpus
    ref = recipe(tmp, "exp_ref", "--stage", "2", "--stop-stage", "3")
    assert ref.returncode == 0, ref.stderr[-3000:]

    models = tmp / "exp_b" / "k" / "models"
    p = recipe(tmp, "exp_b", "--stage", "2", "--stop-stage", "3", background=True)
    wait_for(lambda: (models / "epoch_0001.pt.sha256").exists(), "epoch 1's checkpoint")
    time.sleep(0.2)                                     # into epoch 2
    kill_all(p)
    assert not (models / "epoch_0002.pt").exists(), "the kill came too late to be mid-epoch"

    env = dict(os.environ, PYTHONPATH=f"{tmp}/hook", CAPSV_TEST_KILL_IN_WRITE=".epoch_0003.pt.")
    r = recipe(tmp, "exp_b", "--stage", "2", "--stop-stage", "3", env=env)
    assert r.returncode != 0                          # killed while writing epoch 3's checkpoint
    assert "resuming from" in r.stdout and (models / "epoch_0002.pt").exists()
    assert not (models / "epoch_0003.pt").exists()
    assert "taking over the lock" in r.stdout          # the mid-epoch kill left its lock behind

    r = recipe(tmp, "exp_b", "--stage", "2", "--stop-stage", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = final_state(tmp / "exp_ref"), final_state(tmp / "exp_b")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert (tmp / "exp_ref/k/scores/synth_test.score").read_bytes() == \
        (tmp / "exp_b/k/scores/synth_test.score").read_bytes()
    assert not list(models.glob(".*.tmp"))             # the killed write's temporary is not trusted or left

    # stage 3 killed part way (scoring job 2 of 2 dies writing its part): the re-run removes what it left,
    # keeps the archives, scores again, same scores
    scores = tmp / "exp_b/k/scores/synth_test.score"
    scores.unlink()
    env = dict(os.environ, PYTHONPATH=f"{tmp}/hook", CAPSV_TEST_KILL_IN_WRITE=".synth_test.score.2.")
    r = recipe(tmp, "exp_b", "--stage", "3", "--stop-stage", "3", "--nj", "2", env=env)
    assert r.returncode != 0 and "job 2 failed" in r.stderr and not scores.exists()
    assert list(scores.parent.glob(".synth_test.score.2.*.tmp"))           # the dead job's partial file
    r = recipe(tmp, "exp_b", "--stage", "3", "--stop-stage", "3", "--nj", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trunk ran on 0 crops" in r.stdout                              # the archives were kept
    assert scores.read_bytes() == (tmp / "exp_ref/k/scores/synth_test.score").read_bytes()
    assert sorted(os.listdir(scores.parent)) == [".score.lock", "synth_test.score", "synth_test.score.json"]


def test_second_run_on_the_same_exp_stops_at_once(corpus):
    """One run per exp dir. A training shares its data dir's lock with other readers (another training
    starts), but stage 1 cannot replace the features under it."""
    tmp = corpus
    lock = tmp / "exp_c" / "k" / ".run.lock"
    p = recipe(tmp, "exp_c", "--stage", "2", "--stop-stage", "2", "--train-opts", "train.epochs=500", background=True)
    try:
        wait_for(lambda: lock.exists() and "pid" in lock.read_text(), "the first run's lock")
        holder = lock.read_text().strip()
        assert holder.startswith(f"run.sh pid {p.pid} on host {os.uname().nodename} since ")
        r = recipe(tmp, "exp_c", "--stage", "3")
        line = one_error_line(r)
        assert f"{tmp}/exp_c/k is in use by {holder}" in line
        feats = (tmp / "data/synth_train/feats.scp").read_text()
        line = one_error_line(recipe(tmp, "exp_d", "--stage", "1", "--stop-stage", "1"))
        assert f"{tmp}/data/synth_train is in use by {holder}" in line
        assert (tmp / "data/synth_train/feats.scp").read_text() == feats
        # another training on the same features gets past the data dir's lock (to its own config error)
        line = one_error_line(recipe(tmp, "exp_d", "--stage", "2", "--stop-stage", "2", "--train-opts", "train.epoch=1"))
        assert "unknown config key 'train.epoch'" in line
        assert p.poll() is None, "the first run ended before the checks were done"
    finally:
        kill_all(p)
    r = recipe(tmp, "exp_c", "--stage", "2", "--stop-stage", "2", "--train-opts", "train.epochs=1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"taking over the lock of {tmp}/exp_c/k from {holder}, which is no longer running" in r.stdout
    assert lock.read_text() == ""                       # a clean end names no holder


def test_scoring_before_training_and_stop_before_start(corpus):
    tmp = corpus
    line = one_error_line(recipe(tmp, "exp_none", "--stage", "3"))
    assert f"{tmp}/exp_none/k/config.yaml not found; run stage 2 (training) first" in line
    line = one_error_line(recipe(tmp, "exp_none", "--stage", "3", "--stop-stage", "2"))
    assert "--stop-stage 2 is below --stage 3" in line
