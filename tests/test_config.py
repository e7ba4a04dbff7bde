"""Configs: paper vs mini and own differ only in scale keys; TAP/SAP/CAP differ only in the pooling."""
import os
import subprocess

import pytest
import torch
import yaml

from capsv.config import DEFAULTS, RANGES, SCALE_KEYS, flatten, load_config
from capsv.data import EpisodicBatches
from capsv.utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POOLINGS = ["tap", "sap", "cap"]


def flat(path):
    with open(path) as f:
        return flatten(yaml.safe_load(f))


@pytest.mark.parametrize("folder", ["conf/mini", "conf/own"])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_scaled_configs_differ_from_paper_only_in_scale_keys(folder, pooling):
    paper, scaled = flat(f"{ROOT}/conf/{pooling}.yaml"), flat(f"{ROOT}/{folder}/{pooling}.yaml")
    assert paper.keys() == scaled.keys() == flatten(DEFAULTS).keys()   # every key spelt out
    changed = {k for k in paper if paper[k] != scaled[k]}
    assert changed <= SCALE_KEYS and changed, changed


def test_own_config_arithmetic_as_its_comment_states():
    """conf/own for 300 speakers x 10 utterances: 8 batches an epoch (the training sampler's), 4,000 steps in
    500 epochs, and the last 10 epochs at 0.001 x 0.95^49 (StepLR as training builds it); exp/own_cap."""
    c = load_config(f"{ROOT}/conf/own/cap.yaml")["train"]
    utt2spk = {f"s{s:03d}-u{u:02d}": f"s{s:03d}" for s in range(300) for u in range(10)}
    batches = EpisodicBatches(utt2spk, c["speakers_per_batch"], c["utts_per_speaker"], seed=1)
    per_epoch = [len(batches.epoch(e)) for e in (1, 2, 3)]
    assert per_epoch == [8, 8, 8] and c["epochs"] * per_epoch[0] == 4000
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=c["lr"])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=c["lr_decay_every"], gamma=c["lr_decay"])
    for _ in range(c["epochs"] - 1):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(8.1e-5, rel=0.01)       # the last epoch's
    name = subprocess.run(["bash", "steps/exp_name.sh", "conf/own/cap.yaml"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert name == "own_cap"


@pytest.mark.parametrize("folder", ["conf", "conf/mini", "conf/own"])
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
    with pytest.raises(UserError, match=r"'train.lr' must be a number > 0, got 'fast'"):
        load_config(None, ["train.lr=fast"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  poolng: cap\n")
    with pytest.raises(UserError, match=r"bad.yaml: unknown config key 'model.poolng'; did you mean 'model.pooling'"):
        load_config(bad)


# (override, message): wrong types and out-of-range values, each named with its allowed range
BAD_VALUES = [
    ("train.epochs=ten", "'train.epochs' must be an integer >= 1, got 'ten'"),
    ("train.epochs=2.5", "'train.epochs' must be an integer >= 1, got 2.5"),
    ("train.epochs=true", "'train.epochs' must be an integer >= 1, got True"),
    ("train.epochs=0", "'train.epochs' must be an integer >= 1, got 0"),
    ("train.lr=-1", "'train.lr' must be a number > 0, got -1.0"),
    ("train.lr=0", "'train.lr' must be a number > 0, got 0.0"),
    ("train.lr=.nan", "'train.lr' must be a number > 0, got nan"),
    ("train.lr=.inf", "'train.lr' must be a number > 0, got inf"),
    ("train.lr_decay=0", "'train.lr_decay' must be a number in (0, 1], got 0.0"),
    ("train.lr_decay=1.5", "'train.lr_decay' must be a number in (0, 1], got 1.5"),
    ("train.lr_decay_every=0", "'train.lr_decay_every' must be an integer >= 1, got 0"),
    ("eval.num_crops=0", "'eval.num_crops' must be an integer >= 1, got 0"),
    ("eval.crop_frames=0", "'eval.crop_frames' must be an integer >= 1, got 0"),
    ("eval.trial_batch=-3", "'eval.trial_batch' must be an integer >= 1, got -3"),
    ("model.cap_tau=0", "'model.cap_tau' must be a number > 0, got 0.0"),
    ("model.channels=[16, 0, 64, 128]", "'model.channels' must be a list of 4 integers >= 1, got [16, 0, 64, 128]"),
    ("model.layers=[3, 4, 6]", "'model.layers' must be a list of 4 integers >= 1, got [3, 4, 6]"),
    ("train.keep_checkpoints=-1", "'train.keep_checkpoints' must be an integer >= 0, got -1"),
    ("train.num_workers=-1", "'train.num_workers' must be an integer >= 0, got -1"),
    ("train.softmax_weight=-0.5", "'train.softmax_weight' must be a number >= 0, got -0.5"),
    ("train.crop_frames=0", "'train.crop_frames' must be an integer >= 1, got 0"),
    ("train.speakers_per_batch=1", "'train.speakers_per_batch' must be an integer >= 2, got 1"),
    ("train.utts_per_speaker=1", "'train.utts_per_speaker' must be an integer >= 2, got 1"),
    ("seed=-1", "'seed' must be an integer in [0, 4294967295], got -1"),
    ("train.amp=3", "'train.amp' must be one of auto, bf16, fp16, off, got 3"),
    ("train.amp=fp8", "'train.amp' must be one of auto, bf16, fp16, off, got 'fp8'"),
    ("eval.precision=half", "'eval.precision' must be one of auto, bf16, fp16, off, got 'half'"),
    ("train.tf32=yes please", "'train.tf32' must be true, false or auto, got 'yes please'"),
    ("train.channels_last=1", "'train.channels_last' must be true, false or auto, got 1"),
    ("train.compile=sometimes", "'train.compile' must be true, false or auto, got 'sometimes'"),
    ("train.sync_bn=0", "'train.sync_bn' must be true or false, got 0"),
    ("train.dist_timeout_s=0", "'train.dist_timeout_s' must be an integer >= 1, got 0"),
    ("train.prefetch_factor=0", "'train.prefetch_factor' must be an integer >= 1, got 0"),
    ("model.channels=[16, 32", "override 'model.channels=[16, 32': '[16, 32' is not a valid YAML value"),
]


def test_precision_keys_read_older_booleans_and_yaml_off():
    """Configs of earlier versions wrote amp: true/false; YAML reads `off` as false."""
    assert load_config(None, ["train.amp=true"])["train"]["amp"] == "auto"
    assert load_config(None, ["train.amp=false"])["train"]["amp"] == "off"
    assert load_config(None, ["train.amp=off", "eval.precision=off"])["eval"]["precision"] == "off"
    c = load_config(None, ["train.amp=fp16", "eval.precision=bf16", "train.channels_last=true", "train.compile=auto"])
    assert (c["train"]["amp"], c["eval"]["precision"], c["train"]["channels_last"], c["train"]["compile"]) == \
        ("fp16", "bf16", True, "auto")


@pytest.mark.parametrize("override,message", BAD_VALUES)
def test_bad_values_name_key_value_and_range(override, message):
    with pytest.raises(UserError) as e:
        load_config(f"{ROOT}/conf/mini/cap.yaml", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_value_in_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr_decay_every: 0\n")
    with pytest.raises(UserError, match=r"bad.yaml: 'train.lr_decay_every' must be an integer >= 1, got 0"):
        load_config(bad)


def test_every_numeric_key_has_a_range_and_the_defaults_are_in_it():
    numeric = {k for k, v in flatten(DEFAULTS).items() if not isinstance(v, (bool, str))}
    assert numeric == set(RANGES)
    for k, v in flatten(DEFAULTS).items():   # the defaults, and both configs, pass their own checks
        load_config(None, [f"{k}={v}"])
    load_config(f"{ROOT}/conf/cap.yaml")
    load_config(f"{ROOT}/conf/mini/cap.yaml")


def test_unreadable_config_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match="cannot read config file"):
        load_config(tmp_path)          # a directory


def test_exponent_without_dot_is_a_number(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; a float key takes it as the number it is meant to be
    assert load_config(None, ["train.lr=1e-4"])["train"]["lr"] == 1e-4
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  cap_tau: 5e-2\n")
    assert load_config(f)["model"]["cap_tau"] == 0.05
    with pytest.raises(UserError, match="'train.epochs' must be an integer >= 1, got '1e3'"):
        load_config(None, ["train.epochs=1e3"])
