"""Checkpoints: plain data only (a crafted file cannot run code), checksums, fallback, pruning, RNG round trip."""
import hashlib
import os
import pickle
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from capsv import checkpoint
from capsv.utils import UserError
from test_train import make_data_dir, run_train

REFUSED = "is not a plain-data checkpoint of this recipe and was not loaded"


def fake_state(epoch):
    """What train.py saves, at toy size."""
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.95)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    return {"epoch": epoch, "config": {"seed": 1, "model": {"channels": [4, 4, 8, 8]}}, "speakers": ["a", "b"],
            "model": m.state_dict(), "loss": {}, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": checkpoint.rng_state()}


def save_epochs(models, epochs, keep=0):
    for e in epochs:
        checkpoint.save_checkpoint(str(models), e, fake_state(e), keep=keep)


class WritesMarker:
    """Unpickling this creates `path`: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def craft(path, marker, how):
    if how == "torch.save":      # a torch zip whose data.pkl calls open() while unpickling
        state = fake_state(3)
        state["model"] = {"w": torch.zeros(2), "x": WritesMarker(marker)}
        torch.save(state, path)
    else:                        # a bare pickle (torch's legacy format path), protocol 2 as torch writes
        with open(path, "wb") as f:
            pickle.dump({"epoch": 3, "model": WritesMarker(marker)}, f, protocol=2)


def write_matching_sidecar(path):
    """What an attacker can do too: a checksum proves integrity, not safety."""
    data = open(path, "rb").read()
    with open(checkpoint.sidecar_path(path), "w") as f:
        f.write(f"sha256 {hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n")


def test_rng_state_is_plain_and_round_trips_exactly():
    random.seed(5)
    np.random.seed(3)
    torch.manual_seed(7)
    np.random.randn(1)      # leaves numpy's cached second gaussian set
    random.gauss(0, 1)      # and python's gauss_next
    state = checkpoint.rng_state()
    assert checkpoint.plain_data_error(state) is None
    draws = lambda: (np.random.randn(3), np.random.randint(0, 2 ** 31, 5), random.random(), random.gauss(0, 1),
                     torch.rand(4))
    first = draws()
    checkpoint.set_rng_state(state)
    again = draws()
    for a, b in zip(first, again):
        assert np.array_equal(np.asarray(a), np.asarray(b))


class FakeGpus:
    """torch.cuda's RNG calls recorded, standing in for a machine with 4 GPUs: which device each touches."""

    def __init__(self, monkeypatch):
        self.got, self.set = [], []
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.got.append(device) or
                            torch.full((8,), torch.device(device).index or 0, dtype=torch.uint8))
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": self.set.append(
            (torch.device(device).index, int(state[0]))))
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state was asked for"))


def test_cuda_rng_state_of_the_own_gpu_only(monkeypatch):
    """A rank saves and restores its own GPU's state, and creates no context on the other ranks' GPUs; a checkpoint
    of older versions (one state per visible GPU) restores the own GPU's entry."""
    gpus = FakeGpus(monkeypatch)
    before = torch.get_rng_state()
    try:
        state = checkpoint.rng_state(torch.device("cuda", 2))
        assert gpus.got == [torch.device("cuda", 2)] and int(state["cuda"][0]) == 2
        assert checkpoint.plain_data_error(state) is None
        checkpoint.set_rng_state(state, torch.device("cuda", 3))    # resumed on another GPU: to that one alone
        assert gpus.set == [(3, 2)]
        older = {**state, "cuda": [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]}
        checkpoint.set_rng_state(older, torch.device("cuda", 1))
        assert gpus.set[1:] == [(1, 1)]
        checkpoint.set_rng_state(older, torch.device("cpu"))        # a CPU run leaves the GPUs alone
        assert checkpoint.rng_state(torch.device("cpu"))["cuda"] is None and len(gpus.set) == 2
    finally:
        torch.set_rng_state(before)


def test_round_trip_through_weights_only_load_with_sidecar(tmp_path):
    save_epochs(tmp_path, [1])
    path = checkpoint.checkpoint_path(tmp_path, 1)
    side = open(checkpoint.sidecar_path(path)).read().split()
    data = open(path, "rb").read()
    assert side == ["sha256", hashlib.sha256(data).hexdigest(), "size", str(len(data))]
    torch.load(path, weights_only=True)             # plain data: torch's safe loader reads it as is
    state = checkpoint.load_latest(tmp_path)
    assert state["epoch"] == 1 and state["rng"]["torch"].device.type == "cpu"
    assert sorted(os.listdir(tmp_path)) == ["epoch_0001.pt", "epoch_0001.pt.sha256"]   # no temporaries left


def test_saving_anything_but_plain_data_is_refused(tmp_path):
    state = fake_state(1)
    state["rng"]["numpy"] = np.random.get_state()    # holds an ndarray
    with pytest.raises(TypeError, match=r"checkpoint\['rng'\]\['numpy'\]\[1\] is a numpy.ndarray"):
        checkpoint.save_checkpoint(tmp_path, 1, state)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, how):
    probe, marker = tmp_path / "probe_marker", tmp_path / "marker"
    craft(tmp_path / "probe.pt", probe, how)          # the payload is real: an unsafe load runs it
    with open(tmp_path / "probe.pt", "rb") as f:
        torch.load(f, weights_only=False) if how == "torch.save" else pickle.load(f)
    assert probe.exists()

    models = tmp_path / "models"
    save_epochs(models, [1, 2])
    bad = checkpoint.checkpoint_path(models, 3)
    craft(bad, marker, how)
    write_matching_sidecar(bad)
    for load in (lambda: checkpoint.load_latest(models), lambda: checkpoint.load_for_inference(tmp_path)):
        with pytest.raises(UserError) as e:
            load()
        assert str(e.value).startswith(f"{bad} {REFUSED}") and "\n" not in str(e.value)
        assert "io.open" in str(e.value) or "builtins.open" in str(e.value)
    assert not marker.exists()
    assert os.path.exists(bad)                         # refused, not deleted or skipped


def test_plain_file_that_is_not_a_recipe_checkpoint_is_refused(tmp_path):
    save_epochs(tmp_path, [1])
    torch.save({"w": torch.zeros(3)}, checkpoint.checkpoint_path(tmp_path, 2))    # a bare state_dict
    with pytest.raises(UserError, match=f"epoch_0002.pt {REFUSED} \\(it lacks the keys"):
        checkpoint.load_latest(tmp_path)


def flip_middle_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("damage", ["bit flip", "truncation"])
def test_damaged_newest_falls_back_with_one_warning(tmp_path, capsys, damage):
    save_epochs(tmp_path, [1, 2])
    newest = checkpoint.checkpoint_path(tmp_path, 2)
    if damage == "bit flip":
        flip_middle_byte(newest)
        why = "sha256 differs"
    else:
        with open(newest, "r+b") as f:
            f.truncate(os.path.getsize(newest) - 100)
        why = "bytes where"
    state = checkpoint.load_latest(tmp_path)
    assert state["epoch"] == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"WARNING: checkpoint {newest} is damaged") and why in err[0]


def test_without_sidecar_old_checkpoints_load_and_damage_still_falls_back(tmp_path, capsys):
    save_epochs(tmp_path, [1, 2])
    for e in (1, 2):
        os.remove(checkpoint.sidecar_path(checkpoint.checkpoint_path(tmp_path, e)))
    assert checkpoint.load_latest(tmp_path)["epoch"] == 2          # an older run's files
    with open(checkpoint.checkpoint_path(tmp_path, 2), "r+b") as f:
        f.truncate(100)
    assert checkpoint.load_latest(tmp_path)["epoch"] == 1          # torch cannot read it: the previous one
    assert "is damaged" in capsys.readouterr().err


def test_all_damaged_means_none_and_inference_says_so(tmp_path):
    save_epochs(tmp_path / "models", [1])
    flip_middle_byte(checkpoint.checkpoint_path(tmp_path / "models", 1))
    assert checkpoint.load_latest(tmp_path / "models") is None
    with pytest.raises(UserError, match="no readable checkpoint"):
        checkpoint.load_for_inference(tmp_path)


def test_pruning_removes_sidecars_too(tmp_path):
    save_epochs(tmp_path, [1, 2, 3, 4], keep=2)
    assert sorted(os.listdir(tmp_path)) == ["epoch_0003.pt", "epoch_0003.pt.sha256",
                                            "epoch_0004.pt", "epoch_0004.pt.sha256"]
    os.remove(tmp_path / "epoch_0003.pt")            # a prune interrupted between the two removals
    save_epochs(tmp_path, [5], keep=2)
    assert sorted(os.listdir(tmp_path)) == ["epoch_0004.pt", "epoch_0004.pt.sha256",
                                            "epoch_0005.pt", "epoch_0005.pt.sha256"]


def test_crafted_checkpoint_stops_training_through_the_entry_point(tmp_path):
    make_data_dir(tmp_path / "data")
    assert run_train(tmp_path / "data", tmp_path / "exp", "train.epochs=1").returncode == 0
    models = tmp_path / "exp/models"
    bad = checkpoint.checkpoint_path(models, 2)
    craft(bad, tmp_path / "marker", "torch.save")
    r = run_train(tmp_path / "data", tmp_path / "exp", "train.epochs=3")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    # the user-error convention: one ERROR line, after any timestamped log lines of the start-up
    err = [l for l in r.stderr.strip().splitlines() if not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", l)]
    assert len(err) == 1 and err[0].startswith(f"ERROR: {bad} {REFUSED}"), r.stderr
    assert not (tmp_path / "marker").exists()
    assert sorted(os.listdir(models)) == ["epoch_0001.pt", "epoch_0001.pt.sha256", "epoch_0002.pt"]


def test_bit_flip_through_the_entry_point_retrains_that_epoch_identically(tmp_path):
    make_data_dir(tmp_path / "data")
    assert run_train(tmp_path / "data", tmp_path / "exp", "train.epochs=2").returncode == 0
    newest = checkpoint.checkpoint_path(tmp_path / "exp/models", 2)
    shutil.copy(newest, tmp_path / "good.pt")
    flip_middle_byte(newest)
    r = run_train(tmp_path / "data", tmp_path / "exp", "train.epochs=2")
    assert r.returncode == 0, r.stderr
    assert f"WARNING: checkpoint {newest} is damaged" in r.stderr and "resuming from" in r.stderr
    good = torch.load(tmp_path / "good.pt", weights_only=True)
    redone = checkpoint.load_latest(tmp_path / "exp/models")
    assert redone["epoch"] == 2
    for k, v in good["model"].items():
        torch.testing.assert_close(redone["model"][k], v, rtol=0, atol=0)


def test_torch_force_no_weights_only_env_does_not_reopen_the_hole(tmp_path):
    # torch lets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turn the safe loader off unless weights_only is
    # passed explicitly: loading with it set must still refuse
    save_epochs(tmp_path, [1])
    craft(checkpoint.checkpoint_path(tmp_path, 2), tmp_path / "marker", "torch.save")
    code = ("import sys; from capsv import checkpoint; from capsv.utils import UserError\n"
            "try: checkpoint.load_latest(sys.argv[1])\nexcept UserError as e: print(e)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                       env={**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert REFUSED in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "marker").exists()


def test_older_numpy_rng_checkpoint_is_refused_then_converted(tmp_path):
    # what this recipe wrote before checkpoints were plain data: numpy's state tuple (an ndarray)
    # and python's tuple, saved as they were
    np.random.seed(11)
    random.seed(12)
    state = fake_state(1)
    state["rng"] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": None}
    path = checkpoint.checkpoint_path(tmp_path, 1)
    torch.save(state, path)
    with pytest.raises(UserError, match="it holds numpy arrays.*python -m capsv.checkpoint --convert-trusted"):
        checkpoint.load_latest(tmp_path)
    r = subprocess.run([sys.executable, "-m", "capsv.checkpoint", "--convert-trusted", path],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    converted = checkpoint.load_latest(tmp_path)
    assert os.path.exists(checkpoint.sidecar_path(path))
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    expect = (np.random.randn(4), random.random())       # the draws the old tuples give
    checkpoint.set_rng_state(converted["rng"])
    assert np.array_equal(np.random.randn(4), expect[0]) and random.random() == expect[1]
    r = subprocess.run([sys.executable, "-m", "capsv.checkpoint", "--convert-trusted", str(tmp_path / "none.pt")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("ERROR: ") and r.stderr.count("\n") == 1
