"""Per-epoch checkpoints holding everything needed to continue a run identically."""
import glob
import os
import random
import re
import sys

import numpy as np
import torch

from capsv.utils import UserError, atomic_path


def checkpoint_path(models_dir, epoch):
    return os.path.join(models_dir, f"epoch_{epoch:04d}.pt")


def list_checkpoints(models_dir):
    """(epoch, path) pairs, newest first."""
    found = []
    for path in glob.glob(os.path.join(models_dir, "epoch_*.pt")):
        m = re.fullmatch(r"epoch_(\d+)\.pt", os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(models_dir, epoch, state, keep=0):
    """Write epoch_NNNN.pt atomically, then drop all but the newest `keep` (0 keeps all)."""
    with atomic_path(checkpoint_path(models_dir, epoch)) as tmp:
        torch.save(state, tmp)
    if keep > 0:
        for _, old in list_checkpoints(models_dir)[keep:]:
            os.remove(old)


def load_latest(models_dir, map_location="cpu"):
    """The newest checkpoint that loads, or None; a damaged newer one is reported and skipped."""
    for epoch, path in list_checkpoints(models_dir):
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as e:  # truncated or corrupt file: fall back to the previous epoch
            print(f"WARNING: checkpoint {path} is unreadable ({type(e).__name__}); "
                  f"using an older one (delete it to silence this)", file=sys.stderr)
    return None


def load_for_inference(exp_dir):
    state = load_latest(os.path.join(exp_dir, "models"))
    if state is None:
        raise UserError(f"no readable checkpoint in {exp_dir}/models; run stage 2 (training) first")
    return state
