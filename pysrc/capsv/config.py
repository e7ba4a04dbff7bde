"""Training/scoring configuration: YAML files merged over DEFAULTS, then `key.sub=value` overrides.

Every key a config may hold is in DEFAULTS; an unknown key is an error naming the nearest
valid one (a misspelt key must never be silently ignored). The command line wins over YAML.
"""
import copy
import difflib
import math

import yaml

from capsv.utils import UserError

# Precisions of train.amp and eval.precision (what each means: capsv.device).
PRECISIONS = ("auto", "bf16", "fp16", "off")

# The paper's VoxCeleb settings (doc/design.md); conf/*.yaml spell them out, conf/mini/*.yaml
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
        # Precision and throughput switches (capsv.device): none changes the objective, so each may change
        # when a run is resumed. amp: auto | bf16 | fp16 | off (auto: bf16 on GPUs of compute capability
        # >= 8.0, fp16 + gradient scaler on older ones, fp32 on the CPU). The switches: auto (on on a GPU,
        # off on the CPU) | true | false (on any device). Defaults are reasoned, not measured on a GPU
        # (local/gpu_check.sh measures each): TF32 for the fp32 matmuls and convolutions left outside
        # autocast; channels_last because NHWC is cuDNN's native layout for tensor-core convolutions;
        # compile off until it is shown to pay for its start-up.
        "amp": "auto",               # autocast of the trunk in training
        "tf32": "auto",              # TF32 matmuls and cuDNN convolutions
        "channels_last": "auto",     # NHWC memory format for the trunk's 4-D weights and activations
        "compile": False,            # torch.compile of the trunk
        "sync_bn": True,             # several GPUs: SyncBatchNorm, so BN sees the global batch as one GPU does
        "dist_timeout_s": 900,       # several ranks: a collective waiting longer ends the job (a rank hung)
        "num_workers": 4,
        "prefetch_factor": 2,        # batches each loader worker reads ahead
        "keep_checkpoints": 5,       # newest epochs kept in models/ (0 keeps all)
        # Validation during training (capsv.trainer.Validation): monitoring only, it never changes what is
        # trained. Every validate_every epochs (0: never) the trials of --valid-data are scored at the eval
        # settings; validate_trials > 0 scores a fixed random subset of that many (chosen by the seed).
        "validate_every": 10,
        "validate_trials": 0,
    },
    "eval": {
        "num_crops": 10,
        "crop_frames": 350,
        "trial_batch": 128,          # trials scored together (CAP)
        "precision": "auto",         # the trunk's autocast when scoring: auto | bf16 | fp16 | off, as train.amp
        # AS-norm (stage 3 with --cohort-data / run.sh --asnorm true): one utterance per training speaker, at most
        # cohort_size speakers (all 5,994 of VoxCeleb2 dev); top-K scores of each side
        "cohort_size": 6000,
        "asnorm_top_k": 300,
    },
}

# Keys that conf/mini/*.yaml may change relative to conf/*.yaml: sizes and schedule length,
# never the method.
SCALE_KEYS = {
    "train.epochs", "train.speakers_per_batch", "train.lr_decay_every", "train.num_workers",
    "train.validate_every", "train.validate_trials", "eval.trial_batch", "eval.asnorm_top_k",
}

CHOICES = {"device": {"auto", "cpu", "cuda"}, "model.pooling": {"tap", "sap", "cap"},
           "train.amp": set(PRECISIONS), "eval.precision": set(PRECISIONS)}
# Switches take true, false or auto (on on a GPU, off on the CPU; capsv.device.resolve_switch).
SWITCHES = {"train.tf32", "train.channels_last", "train.compile"}
# Precision keys written as booleans by older configs (and YAML reads `off` as false): true meant mixed
# precision where the device has it, false none.
_LEGACY_PRECISION = {True: "auto", False: "off"}

# The allowed range of every numeric key (of each element, for lists), (low, low_open, high, high_open),
# None for no bound: a bad value fails when the config is read, not an epoch into training.
RANGES = {
    "seed": (0, False, 2 ** 32 - 1, False),        # numpy seeds are unsigned 32-bit
    "model.n_mels": (1, False, None, False),
    "model.channels": (1, False, None, False),
    "model.layers": (1, False, None, False),
    "model.embed_dim": (1, False, None, False),
    "model.cap_proj_dim": (1, False, None, False),
    "model.cap_tau": (0, True, None, False),       # a softmax temperature
    "train.epochs": (1, False, None, False),
    "train.speakers_per_batch": (2, False, None, False),   # the prototypical loss needs other speakers
    "train.utts_per_speaker": (2, False, None, False),     # one support and at least one query
    "train.crop_frames": (1, False, None, False),
    "train.lr": (0, True, None, False),
    "train.lr_decay": (0, True, 1, False),
    "train.lr_decay_every": (1, False, None, False),
    "train.softmax_weight": (0, False, None, False),
    "train.num_workers": (0, False, None, False),
    "train.prefetch_factor": (1, False, None, False),
    "train.dist_timeout_s": (1, False, None, False),
    "train.keep_checkpoints": (0, False, None, False),   # 0 keeps all
    "train.validate_every": (0, False, None, False),     # 0: no validation
    "train.validate_trials": (0, False, None, False),    # 0: every trial
    "eval.num_crops": (1, False, None, False),
    "eval.crop_frames": (1, False, None, False),
    "eval.trial_batch": (1, False, None, False),
    "eval.cohort_size": (2, False, None, False),     # a spread needs two scores
    "eval.asnorm_top_k": (2, False, None, False),
}


def _describe(dotted, default):
    """What a key accepts, in words: 'an integer >= 1', 'a number in (0, 1]', ..."""
    if dotted in SWITCHES:
        return "true, false or auto"
    if isinstance(default, bool):
        return "true or false"
    if dotted in CHOICES:
        return f"one of {', '.join(sorted(CHOICES[dotted]))}"
    if isinstance(default, str):
        return f"like {default!r}"
    lo, lo_open, hi, hi_open = RANGES[dotted]
    kind = "a number" if isinstance(default, float) else "an integer"
    if hi is None:
        what = f"{kind} {'>' if lo_open else '>='} {lo}"
    else:
        what = f"{kind} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if isinstance(default, list):
        what = f"a list of {len(default)} {what.replace('an integer', 'integers', 1)}"
    return what


def _in_range(dotted, x):
    lo, lo_open, hi, hi_open = RANGES[dotted]
    if isinstance(x, float) and not math.isfinite(x):
        return False
    return ((x > lo if lo_open else x >= lo) and
            (hi is None or (x < hi if hi_open else x <= hi)))


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

    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    if dotted in CHOICES and CHOICES[dotted] == set(PRECISIONS) and isinstance(value, bool):
        value = _LEGACY_PRECISION[value]
    if dotted in SWITCHES:
        ok = isinstance(value, bool) or value == "auto"
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):   # YAML 1.1 reads 1e-4 (no dot) as a string; it is meant as a number
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        ok = ok and _in_range(dotted, value)
    elif isinstance(default, int):
        ok = is_int(value) and _in_range(dotted, value)
    elif isinstance(default, list):
        ok = (isinstance(value, list) and len(value) == len(default) and
              all(is_int(v) and _in_range(dotted, v) for v in value))
    else:
        ok = isinstance(value, str)
    if not ok:
        raise UserError(f"{source}: '{dotted}' must be {_describe(dotted, default)}, got {value!r}")
    if dotted in CHOICES and value not in CHOICES[dotted]:
        raise UserError(f"{source}: '{dotted}' must be {_describe(dotted, default)}, got {value!r}")
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
        except OSError as e:   # a directory, no permission, ...
            raise UserError(f"cannot read config file {path}: {e.strerror}")
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
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:   # e.g. model.channels=[16,32
            raise UserError(f"override '{item}': '{text}' is not a valid YAML value")
        _set(cfg, key.strip(), value, "command line")
    return cfg


def load_exp_config(exp, overrides, what):
    """The config experiment `exp` was trained with, for `what` (extraction, scoring) with only the eval.* and
    device overrides that cannot change the trained model."""
    import os

    path = os.path.join(exp, "config.yaml")
    if not os.path.exists(path):
        raise UserError(f"{path} is missing; run stage 2 (training) for this experiment first")
    for o in overrides:
        if not (o.startswith("eval.") or o.startswith("device=")):
            raise UserError(f"override '{o}': {what} takes only eval.* and device overrides")
    return load_config(path, overrides)


def dump_config(cfg):
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
