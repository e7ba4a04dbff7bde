"""Where the network runs and at what precision: one policy for training, scoring, verify, export and the
benchmarks, so a score file, a calibration and a training log all say the same thing about the same run.

Precision (`train.amp` for training, `eval.precision` for scoring and verify), one of:

  auto   bf16 autocast on a GPU with native bf16 (compute capability >= 8.0: A100, H100, L4, RTX 30xx and
         later); fp16 autocast with a gradient scaler on older GPUs (V100 7.0, T4 7.5), where bf16 is emulated
         and slow; fp32 on the CPU
  bf16   bf16 autocast on any device, the CPU included (so the tests run the GPU's code path)
  fp16   fp16 autocast (and, in training, a gradient scaler) on any device
  off    fp32

Autocast covers the trunk only: pooling, softmax, cosines and the loss run in fp32.

Throughput switches (`train.tf32`, `train.channels_last`, `train.compile`): `auto` is on on a GPU and off on
the CPU; `true` and `false` hold on any device.
"""
import contextlib
from dataclasses import dataclass

import torch

from capsv.config import PRECISIONS
from capsv.utils import UserError
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name):
    """torch.device for a config's `device` (auto | cpu | cuda); cuda without a GPU is a UserError."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda was asked for but no GPU is visible (torch.cuda.is_available() is False); "
                        "set device=auto or device=cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cuda_capability(device):
    """(major, minor) compute capability of a CUDA device (tests fake it by patching this function)."""
    return torch.cuda.get_device_capability(device)


def native_bf16(device):
    """True on GPUs whose tensor cores do bf16 natively (compute capability >= 8.0)."""
    return device.type == "cuda" and tuple(cuda_capability(device)) >= (8, 0)


@dataclass(frozen=True)
class Precision:
    """The precision a run uses: `name` bf16 | fp16 | fp32 on `device_type` (cuda | cpu)."""
    name: str
    device_type: str
    setting: str = "auto"      # what the config asked for

    @property
    def dtype(self):
        """The autocast dtype, or None for fp32 (no autocast)."""
        return _DTYPES.get(self.name)

    def autocast(self):
        """A context in which the trunk runs at this precision (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def scaled(self):
        """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none."""
        return self.name == "fp16"

    def grad_scaler(self):
        """A torch.amp.GradScaler, enabled for fp16 only (disabled it passes the loss and step through)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.scaled)

    def record(self):
        """What a score file's or calibration's .json records about how its numbers were computed."""
        return {"precision": self.name, "device_type": self.device_type}

    def __str__(self):
        how = f"{self.setting} -> " if self.setting not in (self.name, "off") else ""
        return f"{how}{self.name} on {self.device_type}"


def resolve_precision(setting, device):
    """The Precision of a `train.amp` / `eval.precision` setting on `device` (see the module docstring)."""
    if setting not in PRECISIONS:
        raise UserError(f"precision '{setting}' is not one of {', '.join(PRECISIONS)}")
    if setting == "off":
        name = "fp32"
    elif setting != "auto":
        name = setting
    elif device.type != "cuda":
        name = "fp32"
    else:
        name = "bf16" if native_bf16(device) else "fp16"
    return Precision(name, device.type, setting)


def resolve_switch(value, device):
    """A throughput switch's value (true | false | auto) on `device`: auto is on on a GPU only."""
    return device.type == "cuda" if value == "auto" else bool(value)


def same_precision(recorded, used):
    """None if a record ({'precision', 'device_type'} or None for files from before precisions were recorded)
    matches the Precision `used`; else one line saying what differs, for verify and the exported model."""
    if not recorded or "precision" not in recorded:
        return None
    if recorded["precision"] == used.name:
        return None
    return (f"scoring at {used.name} on {used.device_type}, but the scores that set the thresholds were computed at "
            f"{recorded['precision']} on {recorded.get('device_type', '?')}: scores may differ slightly "
            f"(set eval.precision / --device to match)")
