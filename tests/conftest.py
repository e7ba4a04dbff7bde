"""Fixtures shared by the modules that need a trained model (the learning check, verify, export, AS-norm,
the pictures).

`trained_recipe` runs run.sh once per test session on the small embedded corpus (40 training speakers, 10 test
speakers, 300 trials): stages 0-4 with the mini CAP config at 10 speakers a batch for 10 epochs, then
stages 2-4 with the same config but SAP pooling, on the same features. That is enough for both to learn
(tests/test_recipe.py checks CAP against the no-training baseline). Tests read its outputs and must not
change them; they write into their own tmp_path. CAPSV_TRAINED_RECIPE=<root of an earlier session's
fixture> skips the training (about two minutes) while iterating on one module.
"""
import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def live_commands():
    """(pid, command line) of every live, not zombie, process: what a test looks for after a signal."""
    out = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode()
            with open(f"/proc/{p}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            continue
        if state != "Z":
            out.append((int(p), cmd))
    return out


def recipe_cmd(tmp, *args, size="small"):
    """run.sh on the embedded corpus of `size` with every output under `tmp`."""
    return ["bash", "run.sh", "--synth-size", size, "--data", f"{tmp}/data", "--exp", f"{tmp}/exp",
            "--fbankdir", f"{tmp}/fbank", "--corpusdir", f"{tmp}/corpus", *args]


def small_config(tmp, pooling, epochs=10, speakers_per_batch=10):
    """The mini config of `pooling` at the small corpus's scale, written to tmp/small_<pooling>.yaml."""
    cfg = yaml.safe_load((ROOT / "conf/mini" / f"{pooling}.yaml").read_text())
    cfg["train"].update(epochs=epochs, speakers_per_batch=speakers_per_batch, num_workers=0)
    path = Path(tmp) / f"small_{pooling}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def trained_recipe(tmp_path_factory):
    """Root of a finished small run: data/synth_{train,test}, exp/small_cap and exp/small_sap (scored)."""
    reuse = os.environ.get("CAPSV_TRAINED_RECIPE")   # while iterating on one module: a root a session left
    if reuse:
        return Path(reuse)
    tmp = tmp_path_factory.mktemp("trained_recipe")
    for pooling, first_stage in (("cap", "0"), ("sap", "2")):
        r = subprocess.run(recipe_cmd(tmp, "--config", str(small_config(tmp, pooling)), "--stage", first_stage),
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp
