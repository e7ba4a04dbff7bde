"""Configs: paper vs mini differ only in scale keys; TAP/SAP/CAP differ only in the pooling."""
import os

import pytest
import yaml

from capsv.config import DEFAULTS, SCALE_KEYS, flatten, load_config
from capsv.utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POOLINGS = ["tap", "sap", "cap"]


def flat(path):
    with open(path) as f:
        return flatten(yaml.safe_load(f))


@pytest.mark.parametrize("pooling", POOLINGS)
def test_mini_differs_from_paper_only_in_scale_keys(pooling):
    paper, mini = flat(f"{ROOT}/conf/{pooling}.yaml"), flat(f"{ROOT}/conf/mini/{pooling}.yaml")
    assert paper.keys() == mini.keys() == flatten(DEFAULTS).keys()   # every key spelt out
    changed = {k for k in paper if paper[k] != mini[k]}
    assert changed <= SCALE_KEYS and changed, changed


@pytest.mark.parametrize("folder", ["conf", "conf/mini"])
def test_poolings_differ_only_in_pooling(folder):
    cfgs = {p: flat(f"{ROOT}/{folder}/{p}.yaml") for p in POOLINGS}
    for p in POOLINGS:
        assert cfgs[p]["model.pooling"] == p
        diff = {k for k in cfgs[p] if cfgs[p][k] != cfgs["cap"][k]}
        assert diff <= {"model.pooling"}


def test_paper_values():
    c = load_config(f"{ROOT}/conf/cap.yaml")
    assert c["train"]["lr"] == 0.001 and c["train"]["lr_decay"] == 0.95 and c["train"]["lr_decay_every"] == 10
    assert c["train"]["epochs"] == 500 and c["train"]["crop_frames"] == 200
    assert c["eval"]["num_crops"] == 10 and c["eval"]["crop_frames"] == 350
    assert c["model"]["embed_dim"] == 512 and c["model"]["cap_tau"] == 0.05


def test_overrides_win_and_are_checked(tmp_path):
    c = load_config(f"{ROOT}/conf/mini/cap.yaml", ["train.epochs=2", "model.pooling=sap"])
    assert c["train"]["epochs"] == 2 and c["model"]["pooling"] == "sap"
    with pytest.raises(UserError, match="did you mean 'train.epochs'"):
        load_config(f"{ROOT}/conf/mini/cap.yaml", ["train.epoch=2"])
    with pytest.raises(UserError, match="one of"):
        load_config(None, ["model.pooling=xap"])
    with pytest.raises(UserError, match="must be like"):
        load_config(None, ["train.lr=fast"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  poolng: cap\n")
    with pytest.raises(UserError, match=r"bad.yaml: unknown config key 'model.poolng'; did you mean 'model.pooling'"):
        load_config(bad)
