"""Training/scoring configuration: YAML files merged over DEFAULTS, then `key.sub=value` overrides.

Every key a config may hold is in DEFAULTS; an unknown key is an error naming the nearest
valid one (a misspelt key must never be silently ignored). The command line wins over YAML.
"""
import copy
import difflib

import yaml

from capsv.utils import UserError

# The paper's VoxCeleb settings (DESIGN §2); conf/*.yaml spell them out, conf/mini/*.yaml
# change only SCALE_KEYS.
DEFAULTS = {
    "seed": 1,
    "device": "auto",            # auto | cpu | cuda
    "model": {
        "n_mels": 40,
        "channels": [16, 32, 64, 128],
        "layers": [3, 4, 6, 3],
        "pooling": "cap",        # tap | sap | cap
        "embed_dim": 512,
        "cap_proj_dim": 128,     # width of the meta-projection g
        "cap_tau": 0.05,         # softmax temperature of CAP (authors' code)
    },
    "train": {
        "epochs": 500,
        "speakers_per_batch": 200,   # N; no speaker twice in a batch
        "utts_per_speaker": 3,       # M = 1 support + (M-1) queries
        "crop_frames": 200,          # random 2 s crops
        "lr": 0.001,
        "lr_decay": 0.95,
        "lr_decay_every": 10,        # epochs
        "softmax_weight": 1.0,       # NP + softmax, equal weights
        "amp": True,                 # mixed precision on GPU (ignored on CPU)
        "num_workers": 4,
        "keep_checkpoints": 5,       # newest epochs kept in models/ (0 keeps all)
    },
    "eval": {
        "num_crops": 10,
        "crop_frames": 350,
        "trial_batch": 128,          # trials scored together (CAP)
    },
}

# Keys that conf/mini/*.yaml may change relative to conf/*.yaml: sizes and schedule length,
# never the method.
SCALE_KEYS = {
    "train.epochs", "train.speakers_per_batch", "train.lr_decay_every", "train.num_workers",
    "eval.trial_batch",
}

CHOICES = {"device": {"auto", "cpu", "cuda"}, "model.pooling": {"tap", "sap", "cap"}}


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set(cfg, dotted, value, source):
    valid = flatten(DEFAULTS)
    if dotted not in valid:
        near = difflib.get_close_matches(dotted, list(valid), n=1, cutoff=0.5)
        hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(sorted(valid))}"
        raise UserError(f"{source}: unknown config key '{dotted}'{hint}")
    default = valid[dotted]
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list) and len(value) == len(default) and all(isinstance(v, int) for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise UserError(f"{source}: '{dotted}' must be like {default!r}, got {value!r}")
    if dotted in CHOICES and value not in CHOICES[dotted]:
        raise UserError(f"{source}: '{dotted}' must be one of {sorted(CHOICES[dotted])}, got {value!r}")
    node = cfg
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


def load_config(path=None, overrides=()):
    """DEFAULTS <- YAML file <- overrides ("train.epochs=3"); returns a validated nested dict."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise UserError(f"config file not found: {path}")
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})")
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping of config keys")
        for key, value in flatten(data).items():
            _set(cfg, key, value, path)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"override '{item}' must look like key=value, e.g. train.epochs=3")
        _set(cfg, key.strip(), yaml.safe_load(text), "command line")
    t = cfg["train"]
    if t["utts_per_speaker"] < 2:
        raise UserError("train.utts_per_speaker must be >= 2 (one support and at least one query)")
    if t["speakers_per_batch"] < 2:
        raise UserError("train.speakers_per_batch must be >= 2 for the prototypical loss")
    return cfg


def dump_config(cfg):
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
