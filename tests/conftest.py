"""Fixtures shared by the modules that need a trained model (verify, export, AS-norm, the pictures).

`tiny_recipe` runs run.sh once per test session on the tiny embedded corpus: stages 0-4 with a small
CAP config, then stages 2-4 with the same config but SAP pooling, on the same features. Tests read its
outputs and must not change them; they write into their own tmp_path.
"""
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def recipe_cmd(tmp, *args):
    """run.sh on the tiny corpus with every output under `tmp`."""
    return ["bash", "run.sh", "--synth-size", "tiny", "--data", f"{tmp}/data", "--exp", f"{tmp}/exp",
            "--fbankdir", f"{tmp}/fbank", "--corpusdir", f"{tmp}/corpus", *args]


def tiny_config(tmp, pooling, epochs=2):
    """The mini config of `pooling` at the tiny corpus's scale, written to tmp/tiny_<pooling>.yaml."""
    cfg = yaml.safe_load((ROOT / "conf/mini" / f"{pooling}.yaml").read_text())
    cfg["train"].update(epochs=epochs, speakers_per_batch=4, num_workers=0)
    path = Path(tmp) / f"tiny_{pooling}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory):
    """Root of a finished tiny run: data/synth_{train,test}, exp/tiny_cap and exp/tiny_sap (scored)."""
    tmp = tmp_path_factory.mktemp("tiny_recipe")
    for pooling, first_stage in (("cap", "0"), ("sap", "2")):
        r = subprocess.run(recipe_cmd(tmp, "--config", str(tiny_config(tmp, pooling)), "--stage", first_stage),
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp
