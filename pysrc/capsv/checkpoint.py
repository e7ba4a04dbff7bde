"""Per-epoch checkpoints holding everything needed to continue a run identically.

A checkpoint holds tensors and plain containers only (dict, list, tuple, str, int, float,
bool, None), RNG states included, and is read with torch.load(weights_only=True): a file
handed to a user cannot run code when it is loaded. A file that needs anything else to
unpickle is refused with a UserError, never skipped, so a planted file is noticed.

Beside each epoch_NNNN.pt lies epoch_NNNN.pt.sha256 (its sha256 and size, written after it):
a file that does not match (a flipped bit, a truncated copy, a disk that lost a write) is
reported in one line and the previous checkpoint is used. Files without one (older runs)
load if torch can read them; those of versions that stored numpy RNG state are refused, and
`python -m capsv.checkpoint --convert-trusted FILE` rewrites one you made yourself.
"""
import argparse
import errno
import glob
import hashlib
import io
import os
import pickle
import random
import re
import sys
import warnings

import numpy as np
import torch

from capsv.utils import UserError, atomic_open, atomic_path, run_main

# What training writes (capsv.trainer); a file without these is not a checkpoint of this recipe. Newer
# checkpoints also hold "precision" (the training precision's record), "scaler" (the fp16 gradient scaler's
# state, else None) and "log" (the epoch's train_log.csv row); older ones without them still load.
REQUIRED = {"epoch": int, "config": dict, "speakers": list, "model": dict, "loss": dict,
            "optimizer": dict, "scheduler": dict, "rng": dict}


def checkpoint_path(models_dir, epoch):
    return os.path.join(models_dir, f"epoch_{epoch:04d}.pt")


def sidecar_path(path):
    return os.fspath(path) + ".sha256"


def list_checkpoints(models_dir):
    """(epoch, path) pairs, newest first."""
    found = []
    for path in glob.glob(os.path.join(models_dir, "epoch_*.pt")):
        m = re.fullmatch(r"epoch_(\d+)\.pt", os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def rng_state(device=None):
    """Every RNG's state as tensors and plain values (numpy's and python's tuples converted).

    CUDA: the state of `device` alone (this process's own GPU), None on the CPU. Asking for every visible
    GPU's state would create a CUDA context on each, on GPUs that other ranks use.
    """
    name, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # uint32 words held as int64 so the round trip is exact whatever torch does with uint32
        "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "cuda": torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None,
    }


def set_rng_state(state, device=None):
    """Restore what rng_state saved; a CUDA state goes to `device` (this process's own GPU) only."""
    # torch.set_rng_state takes only a CPU ByteTensor: checkpoints are therefore loaded on the CPU
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["key"].numpy(), dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    if isinstance(cuda, (list, tuple)):   # older checkpoints: one state per GPU visible to the saving process
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def plain_data_error(obj, where="checkpoint"):
    """None if `obj` is tensors and plain containers only, else where the first other thing is."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return None
    if isinstance(obj, dict):   # OrderedDict (state_dict) included
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                return f"{where} has a key of type {type(k).__name__}"
            err = plain_data_error(v, f"{where}[{k!r}]")
            if err:
                return err
        return None
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            err = plain_data_error(v, f"{where}[{i}]")
            if err:
                return err
        return None
    return f"{where} is a {type(obj).__module__}.{type(obj).__name__}"


def _digest(data):
    return hashlib.sha256(data).hexdigest()


def _write(path, state):
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    side = sidecar_path(path)
    if os.path.exists(side):   # a stale sidecar of an epoch being re-done would only cause a false alarm
        os.remove(side)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    with atomic_open(side) as f:
        f.write(f"sha256 {_digest(data)}\nsize {len(data)}\n")


def save_checkpoint(models_dir, epoch, state, keep=0):
    """Write epoch_NNNN.pt, then its .sha256, each atomically; then drop all but the newest `keep` (0 keeps all)."""
    err = plain_data_error(state)
    if err:   # a programming error: never write what load_latest would refuse
        raise TypeError(f"checkpoints hold tensors and plain containers only: {err}")
    # temporaries of writes that were killed (the run holds the exp dir's lock: no other writer)
    for tmp in glob.glob(os.path.join(models_dir, ".epoch_*.tmp")):
        os.remove(tmp)
    try:
        _write(checkpoint_path(models_dir, epoch), state)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        kept = [os.path.basename(p) for _, p in list_checkpoints(models_dir)[:1]]
        raise UserError(f"no space left on the device of {models_dir} writing epoch {epoch}'s checkpoint; "
                        f"{'the newest complete one, ' + kept[0] + ', is intact' if kept else 'nothing was kept'}: "
                        f"free some space and re-run stage 2, which resumes from it") from None
    if keep > 0:
        for _, old in list_checkpoints(models_dir)[keep:]:
            os.remove(old)
    # then every sidecar whose checkpoint is gone: those just pruned, and any an interrupted prune left
    for side in glob.glob(os.path.join(models_dir, "epoch_*.pt.sha256")):
        if not os.path.exists(side[:-len(".sha256")]):
            os.remove(side)


def _mismatch(path, data):
    """Why `data` (the bytes of `path`) does not match its sidecar; None if it matches or has none."""
    side = sidecar_path(path)
    try:
        with open(side) as f:
            fields = dict(line.split(None, 1) for line in f.read().splitlines() if line.strip())
        want_sha, want_size = fields["sha256"].strip(), int(fields["size"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, UnicodeDecodeError):
        return f"its checksum file {side} is unreadable"
    if len(data) != want_size:
        return f"{len(data)} bytes where {want_size} were written"
    if _digest(data) != want_sha:
        return f"sha256 differs from {side}"
    return None


def _refuse(path, why):
    return UserError(f"{path} is not a plain-data checkpoint of this recipe and was not loaded ({why}); "
                     f"unless you know where it came from, delete it (the previous epoch is then used)")


def read_checkpoint(path):
    """One checkpoint on the CPU. Raises UserError if it is not plain data of this recipe,
    ValueError if it is damaged (checksum mismatch, or unreadable when it has no checksum)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read it: {e.strerror}") from None
    bad = _mismatch(path, data)
    if bad:
        raise ValueError(bad)
    try:
        # CPU, always: RNG states must stay CPU ByteTensors, and load_state_dict moves the
        # model's and optimiser's tensors to wherever the parameters live.
        with warnings.catch_warnings():   # torch's multi-line remarks on odd files; we say it in one line
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:   # the restricted unpickler met something other than plain data
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found and "multiarray._reconstruct" in found.group(1):   # numpy arrays: what older runs stored
            raise _refuse(path, "it holds numpy arrays, as checkpoints of older versions of this recipe did; "
                                f"if you made it, convert it: python -m capsv.checkpoint --convert-trusted {path}")
        raise _refuse(path, f"unpickling it needs {found.group(1)}" if found else
                      "unpickling it needs more than tensors and plain containers") from None
    except RuntimeError as e:
        if "TorchScript" in str(e):
            raise _refuse(path, "it is a TorchScript archive") from None
        raise ValueError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    except Exception as e:   # truncated or corrupt: the caller falls back to an older epoch
        raise ValueError(f"{type(e).__name__}") from None
    if not isinstance(state, dict) or not all(isinstance(state.get(k), t) for k, t in REQUIRED.items()):
        raise _refuse(path, f"it lacks the keys {', '.join(sorted(REQUIRED))}")
    err = plain_data_error(state)
    if err:   # torch's allow-list is wider than ours (torch.Size, dtypes, ...)
        raise _refuse(path, err)
    # what the file is, for the records of what it made (score files, calibration, embeddings); not saved
    state["file"], state["sha256"] = os.fspath(path), _digest(data)
    return state


def load_latest(models_dir):
    """The newest checkpoint that loads, on the CPU, or None; a damaged newer one is reported and skipped."""
    for _, path in list_checkpoints(os.fspath(models_dir)):
        try:
            return read_checkpoint(path)
        except ValueError as e:
            print(f"WARNING: checkpoint {path} is damaged ({e}); using an older one "
                  f"(delete it to silence this)", file=sys.stderr)
    return None


def load_for_inference(exp_dir):
    """The newest readable checkpoint of an experiment (with `file` and `sha256`: its path and its bytes' SHA-256)."""
    state = load_latest(os.path.join(exp_dir, "models"))
    if state is None:
        raise UserError(f"no readable checkpoint in {exp_dir}/models; run stage 2 (training) first")
    return state


def _plain_rng(rng):
    """RNG states as older versions of this recipe saved them (numpy's and python's tuples) in today's form."""
    out = dict(rng)
    if isinstance(rng.get("numpy"), tuple):
        name, key, pos, has_gauss, cached = rng["numpy"]
        out["numpy"] = {"name": name, "key": torch.from_numpy(np.asarray(key).astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if isinstance(rng.get("python"), tuple):
        version, internal, gauss_next = rng["python"]
        out["python"] = {"version": version, "state": list(internal), "gauss_next": gauss_next}
    return out


def convert_trusted(path):
    """Rewrite a checkpoint of an older version of this recipe as plain data, with its sidecar.

    This unpickles the file with torch's full unpickler, which can run code: only for files
    you made yourself. The result is checked to be plain data before it replaces the file.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:   # missing, truncated, ...
        raise UserError(f"{path} cannot be read ({type(e).__name__}); not converted") from None
    if not isinstance(state, dict) or not isinstance(state.get("rng"), dict):
        raise UserError(f"{path} is not a checkpoint of this recipe; not converted")
    state["rng"] = _plain_rng(state["rng"])
    err = plain_data_error(state)
    if err:
        raise UserError(f"{path}: {err}, which a plain-data checkpoint cannot hold; not converted")
    _write(os.fspath(path), state)


def main():
    p = argparse.ArgumentParser(description="Rewrite checkpoints of older versions of this recipe (numpy RNG "
                                            "state inside) as plain data. Loading them runs their pickle: "
                                            "convert only files you made yourself.")
    p.add_argument("--convert-trusted", nargs="+", required=True, metavar="FILE", help="epoch_NNNN.pt files")
    args = p.parse_args()

    def convert():
        for path in args.convert_trusted:
            convert_trusted(path)
            print(f"converted {path} (and wrote {sidecar_path(path)})")
    run_main(convert)


if __name__ == "__main__":
    main()
