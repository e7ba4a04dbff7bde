"""Kaldi text files of utterances: wav.scp, trial lists and score files (Kaldi conventions, doc/design.md).

- wav.scp: `<utt> <path>` or `<utt> <command> |`, one recording per line;
- trials: `<enroll-utt> <test-utt> target|nontarget`, one trial per line;
- VoxCeleb lists: `1|0 <path> <path>` (e.g. veri_test.txt), converted to Kaldi trials;
- score files: `<enroll> <test> <score>`, one line per trial, in trial order.
"""
import math
import os

import numpy as np

from capsv.utils import UserError, atomic_open

_LABELS = {"target": True, "nontarget": False}


def open_input(path, what, fix):
    """`path` opened for reading, or one UserError line naming it, what it is and the fix."""
    try:
        return open(path)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found; {fix}") from None
    except (IsADirectoryError, PermissionError) as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror}); {fix}") from None


def read_wav_scp(path):
    """(utt, spec) pairs of a wav.scp; spec may contain spaces (a command ending in `|`)."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; run data preparation (stage 0) first")
    entries = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.strip().split(maxsplit=1)
            if not parts:
                continue
            if len(parts) < 2:
                raise UserError(f"{path}:{n}: expected '<utt> <path-or-command |>', got '{line.strip()}'")
            entries.append((parts[0], parts[1]))
    return entries


def read_trials(path, known_utts=None):
    """Read a Kaldi trials file into a list of (enroll, test, is_target) in file order.

    If `known_utts` (a set of utterance ids) is given, every utterance the trials name
    must be in it; otherwise a UserError names the first unknown one and the count.
    """
    trials = []
    first_line = {}
    with open_input(path, "trials file", "run stage 0 (data preparation) first") as f:
        for n, line in enumerate(f, 1):
            toks = line.split()
            if not toks:
                continue
            if len(toks) != 3:
                raise UserError(f"{path}:{n}: expected 3 fields `<enroll> <test> target|nontarget`, "
                                f"got {len(toks)}; fix or regenerate the trials")
            label = _LABELS.get(toks[2])
            if label is None:
                raise UserError(f"{path}:{n}: label must be `target` or `nontarget`, got {toks[2]!r}; "
                                f"fix or regenerate the trials")
            pair = (toks[0], toks[1])
            if pair in first_line:
                raise UserError(f"{path}:{n}: trial `{toks[0]} {toks[1]}` repeats line {first_line[pair]}; "
                                f"keep each trial once (fix or regenerate the trials)")
            first_line[pair] = n
            trials.append((toks[0], toks[1], label))
    if known_utts is not None:
        unknown = []
        seen = set()
        for e, t, _ in trials:
            for u in (e, t):
                if u not in known_utts and u not in seen:
                    seen.add(u)
                    unknown.append(u)
        if unknown:
            raise UserError(f"{path}: trials name utterance {unknown[0]!r} that is not in the data dir "
                            f"({len(unknown)} unknown utterance(s) in all); regenerate the trials or the data dir")
    return trials


def voxceleb_utt_id(relpath):
    """VoxCeleb relative path to utterance id: `id10270/x6uYqmx31kE/00001.wav` -> `id10270-x6uYqmx31kE-00001`."""
    return os.path.splitext(relpath)[0].replace("/", "-")


def read_voxceleb_list(src):
    """A VoxCeleb list (`1|0 <path> <path>`) as [(is_target, (enroll_path, test_path))], in file order."""
    rows = []
    with open_input(src, "VoxCeleb trial list", "give the path of veri_test.txt") as f:
        for n, line in enumerate(f, 1):
            toks = line.split()
            if not toks:
                continue
            if len(toks) != 3 or toks[0] not in ("0", "1"):
                raise UserError(f"{src}:{n}: expected `1|0 <enroll-path> <test-path>`, got {line.strip()!r}; "
                                f"give a VoxCeleb trial list such as veri_test.txt")
            rows.append((toks[0] == "1", (toks[1], toks[2])))
    if not rows:
        raise UserError(f"{src}: the VoxCeleb trial list is empty; give a VoxCeleb trial list such as veri_test.txt")
    return rows


def write_trials(dst, trials):
    """Write (enroll, test, is_target) triples as a Kaldi trials file, atomically, in order."""
    with atomic_open(dst) as f:
        f.writelines(f"{e} {t} {'target' if label else 'nontarget'}\n" for e, t, label in trials)


def voxceleb_to_kaldi_trials(src, dst):
    """Convert a VoxCeleb list (`1|0 <path> <path>`) to Kaldi trials at `dst` (atomic), keeping order.

    Returns the set of utterance ids the trials name.
    """
    trials = [(voxceleb_utt_id(e), voxceleb_utt_id(t), label) for label, (e, t) in read_voxceleb_list(src)]
    write_trials(dst, trials)
    return {u for e, t, _ in trials for u in (e, t)}


def write_scores(path, trials, scores):
    """Write `<enroll> <test> <score>` lines in trial order, atomically."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(trials):
        raise ValueError(f"write_scores: {len(scores)} scores for {len(trials)} trials")
    with atomic_open(path) as f:
        f.writelines(f"{e} {t} {s:.6f}\n" for (e, t, *_), s in zip(trials, scores))


def read_scores(path, trials, trials_path="the trials"):
    """Read a score file and return a float64 array aligned to `trials`.

    The score file's (enroll, test) pairs must match the trials line for line; otherwise a
    UserError names both files and the line, and says to re-run stage 3.
    """
    fix = "re-run stage 3 (scoring) for these trials"
    out = np.empty(len(trials), dtype=np.float64)
    i = 0
    with open_input(path, "score file", fix) as f:
        for n, line in enumerate(f, 1):
            toks = line.split()
            if not toks:
                continue
            if len(toks) != 3:
                raise UserError(f"{path}:{n}: expected 3 fields `<enroll> <test> <score>`, got {len(toks)}; {fix}")
            if i >= len(trials):
                raise UserError(f"{path}:{n}: score file has more lines than the {len(trials)} trials in "
                                f"{trials_path}; {fix}")
            e, t = trials[i][0], trials[i][1]
            if toks[0] != e or toks[1] != t:
                raise UserError(f"{path}:{n}: pair `{toks[0]} {toks[1]}` does not match trial {i + 1} "
                                f"`{e} {t}` of {trials_path}; {fix}")
            try:
                s = float(toks[2])
            except ValueError:
                s = math.nan
            if not math.isfinite(s):
                raise UserError(f"{path}:{n}: score {toks[2]!r} is not a finite number; {fix}")
            out[i] = s
            i += 1
    if i != len(trials):
        raise UserError(f"{path}: score file has {i} lines but {trials_path} has {len(trials)} trials; {fix}")
    return out
