"""Calibrated accept/reject decisions: the thresholds and the LLR map stage 4 fixes, and `verify`'s scoring of
audio files.

Stage 4 (`capsv.bin.compute_metrics --exp DIR`) writes DIR/calibration.json from the score file of one
trial list (the calibration list; by default the test set's `trials`):

- `thresholds`: the EER threshold and the minDCF(p_target 0.05) threshold of that list's raw scores
  (decision: accept iff score >= threshold; null means "reject everything" was the cheapest point);
- `map`: the linear calibration LLR = a * score + b, fitted on that list by prior-weighted logistic
  regression at p_target 0.05 (`fit_llr_map`), with the list's name and SHA-256; the Bayes decision at
  prior P accepts iff LLR > log((1 - P) / P);
- the list's name, path, SHA-256 and counts, its EER / minDCF and the miss / false-alarm rates at
  each threshold; the checkpoint epoch, path and SHA-256 that scored it and the precision and device
  type it ran at (from the score file's .json);
- `fbank`: the fbank options (text and parsed) that stage 1 used, checked at stage 4 by recomputing
  one test utterance's features and comparing them with its feats.scp matrix, so `verify` computes
  its features with the options the model was scored with even if conf/fbank.conf is edited later;
- `eval`: the crops stage 3 scored with.

Thresholds fixed on a list are the best ones for that list: accept/reject rates measured with them on
the same list are optimistic. Calibrate on a development list (run.sh --calibration-list trials_<dev>)
to use them on other data.

`score_files` scores pairs of audio files exactly as stages 1 and 3 do: stage 1's reader and fbank,
then stage 3's crops, trunk batches, cache and trial scoring; each distinct file once.
"""
import json
import os
import sys

import numpy as np

from capsv.metrics import bayes_threshold, eer_from_rates, min_dcf_from_rates, rates_at_threshold
from capsv.trials import open_input
from capsv.utils import UserError, atomic_open, sha256

FILE = "calibration.json"
P_TARGET = 0.05
THRESHOLDS = ("eer", "min_dcf_0.05")            # the order of verify's decision columns
FEATURE_ATOL = 1e-3                             # log-mel units; a changed option moves features by far more
# what verify needs that older versions of stage 4 did not record
NEEDED = ("thresholds", "epoch", "fbank", "eval", "list", "map", "checkpoint_sha256")


def check_both_classes(labels, what, fix):
    """A UserError unless `labels` hold target and non-target trials: a calibration needs both."""
    n_tar = int(np.sum(labels))
    if n_tar == 0 or n_tar == len(labels):
        only = "target" if n_tar else "non-target"
        raise UserError(f"{what} has only {only} trials ({len(labels)}): a calibration needs both target and "
                        f"non-target trials; {fix}")


def fit_llr_map(scores, labels, p_target=P_TARGET, name="the calibration list"):
    """(a, b) of the calibration LLR = a * score + b: prior-weighted logistic regression (Brümmer).

    Minimises the cross-entropy of the posteriors at prior p_target,
        P / N_tar * sum over targets of log(1 + e^-(LLR + logit P))
        + (1 - P) / N_non * sum over non-targets of log(1 + e^(LLR + logit P)),
    a convex function of (a, b), so each class weighs as the prior says whatever the list's balance. Fitted on
    standardised scores (Newton steps in a trust region), then mapped back. Scores that separate the classes
    completely have no finite optimum: the slope grows until the gradient vanishes numerically (a warning).
    """
    from scipy.optimize import minimize
    from scipy.special import expit

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    check_both_classes(y, name, "give a list with both")
    mu, sd = s.mean(), s.std()
    z = (s - mu) / (sd if sd > 0 else 1.0)
    w = np.where(y, p_target / y.sum(), (1 - p_target) / (~y).sum())   # each trial's weight
    sign = np.where(y, -1.0, 1.0)                                        # targets pay for low LLRs
    offset = np.log(p_target / (1 - p_target))

    def cost(x):
        t = sign * (x[0] * z + x[1] + offset)
        g = w * sign * expit(t)                      # d cost / d LLR of each trial
        return np.sum(w * np.logaddexp(0.0, t)), np.array([g @ z, g.sum()])

    def hess(x):
        t = x[0] * z + x[1] + offset
        h = w * expit(t) * expit(-t)                 # even in t: the targets' sign drops out
        return np.array([[h @ (z * z), h @ z], [h @ z, h.sum()]])

    res = minimize(cost, np.zeros(2), jac=True, hess=hess, method="trust-exact", options={"gtol": 1e-10})
    if not np.all(np.isfinite(res.x)):
        raise RuntimeError(f"calibration fit failed: {res.message}")
    if s[y].min() > s[~y].max():
        print(f"WARNING: the scores of {name} separate targets from non-targets completely, so a calibration "
              f"on it is overconfident (its slope is bounded only by the optimiser's tolerance); calibrate on a "
              f"larger or harder list", file=sys.stderr)
    a = res.x[0] / (sd if sd > 0 else 1.0)
    return float(a), float(res.x[1] - a * mu)


def llr_map_record(a, b, label, trials_path, digest, scores_path, labels, p_target=P_TARGET):
    """The map as calibration.json and the LLR score files' .json record it."""
    return {"a": a, "b": b, "p_target": p_target, "list": label, "trials": trials_path, "trials_sha256": digest,
            "scores": scores_path, "n_trials": int(len(labels)), "n_targets": int(np.sum(labels)),
            "llr": "a * score + b",
            "bayes_decision": f"accept iff llr > log((1 - P) / P), {bayes_threshold(p_target):.6f} at P = {p_target}"}


def apply_map(llr_map, scores):
    return llr_map["a"] * np.asarray(scores, dtype=np.float64) + llr_map["b"]


def bayes_decide(llr, p_target):
    """The Bayes decision (C_miss = C_fa = 1) of a calibrated LLR at prior p_target."""
    return "accept" if llr > bayes_threshold(p_target) else "reject"


def _threshold(t):
    return None if not np.isfinite(t) else float(t)


def make_calibration(system, label, trials_path, scores_path, info, rates, scores, labels, fbank, eval_cfg, llr_map):
    """The calibration record of one list's raw scores (`rates` from metrics.error_rates; `llr_map` from
    llr_map_record); `info` is the score file's .json."""
    eer, t_eer = eer_from_rates(*rates)
    dcf, t_dcf = min_dcf_from_rates(*rates, p_target=P_TARGET)
    thresholds = {"eer": _threshold(t_eer), "min_dcf_0.05": _threshold(t_dcf)}
    at = {}
    for name, t in thresholds.items():
        p_miss, p_fa = rates_at_threshold(scores, labels, t)
        at[name] = {"p_miss": p_miss, "p_fa": p_fa}
    return {
        "system": system,
        "score_kind": "raw",
        "decision": "accept iff score >= threshold; a null threshold rejects every trial",
        "thresholds": thresholds,
        "list": label,
        "trials": trials_path,
        "trials_sha256": info["trials_sha256"],
        "scores": scores_path,
        "n_trials": int(len(labels)),
        "n_targets": int(np.sum(labels)),
        "eer": eer,
        "min_dcf_0.05": dcf,
        "rates_at_thresholds": at,
        "epoch": info["epoch"],
        "checkpoint": info.get("checkpoint"),
        "checkpoint_sha256": info["checkpoint_sha256"],
        "precision": info.get("precision"),
        "device_type": info.get("device_type"),
        "map": llr_map,
        "note": (f"thresholds and map calibrated on {label}: error rates, actDCF and Cllr measured with them on "
                 f"{label} itself are optimistic (they are fitted to that list); calibrate on a development "
                 f"list to judge other data"),
        "fbank": fbank,
        "eval": eval_cfg,
    }


def write_calibration(path, cal):
    with atomic_open(path) as f:
        json.dump(cal, f, indent=1)
        f.write("\n")


def fbank_record(conf_path, data_dir=None):
    """The fbank options of `conf_path` (text and parsed), checked against stage 1's features of `data_dir`.

    One utterance of the data dir is read and featurised again with these options; features that differ
    from its feats.scp matrix mean the options changed since stage 1 (a UserError). When the audio
    cannot be read any more, the record says it was not checked (a warning, not an error).
    """
    from capsv.features import read_fbank_conf

    opts = read_fbank_conf(conf_path)
    with open(conf_path) as f:
        text = f.read()
    rec = {"path": os.fspath(conf_path), "sha256": sha256(conf_path), "text": text, "options": opts,
           "checked_against": None}
    if data_dir is not None:
        rec["checked_against"] = _check_stage1(opts, conf_path, data_dir)
    return rec


def _check_stage1(opts, conf_path, data_dir):
    from capsv.trials import read_wav_scp
    from capsv.data import ArkReader, read_data_dir
    from capsv.features import compute_fbank, load_audio

    _, _, scp = read_data_dir(data_dir)
    utt, spec = next(((u, s) for u, s in read_wav_scp(os.path.join(data_dir, "wav.scp")) if u in scp), (None, None))
    if utt is None:
        raise UserError(f"{data_dir}: no utterance of wav.scp is in feats.scp; re-run stage 1 for it")
    stored = ArkReader(scp).read(utt)
    try:
        feats = compute_fbank(*load_audio(spec, utt), opts, utt)
    except UserError as e:
        print(f"WARNING: could not check {conf_path} against stage 1's features ({e}); "
              f"recording it unchecked", file=sys.stderr)
        return None
    if feats.shape != stored.shape or not np.allclose(feats, stored, rtol=0, atol=FEATURE_ATOL):
        diff = (f"{feats.shape[0]} frames instead of {stored.shape[0]}" if feats.shape != stored.shape else
                f"differ by up to {np.abs(feats - stored).max():.3g}")
        raise UserError(f"{conf_path} does not give the features stage 1 made for {data_dir} (utterance {utt}: "
                        f"{diff}): the fbank options changed since stage 1; restore them, or re-run stages 1 and 3")
    return {"data": os.fspath(data_dir), "utterance": utt}


def load_calibration(exp):
    """The calibration record of an experiment dir, or a UserError saying how to make it."""
    path = os.path.join(exp, FILE)
    try:
        with open(path) as f:
            cal = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} not found: {exp} has no calibrated thresholds; run stage 4 for it "
                        f"(bash run.sh --stage 4 --config <its config>)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}); re-run stage 4 for {exp}") from None
    if not isinstance(cal, dict) or any(k not in cal for k in NEEDED) or \
            any(k not in cal["thresholds"] for k in THRESHOLDS) or \
            any(k not in (cal["map"] or {}) for k in ("a", "b", "p_target")):
        missing = [k for k in NEEDED if k not in cal] if isinstance(cal, dict) else list(NEEDED)
        raise UserError(f"{path} lacks {', '.join(missing) or 'some fields'} (written by an older version of "
                        f"stage 4, or damaged); re-run stage 4 for {exp} (bash run.sh --stage 4 ...)")
    return cal


def check_checkpoint(cal, state, exp):
    """A UserError unless the calibration was made on the scores of this checkpoint (by content, not epoch)."""
    if cal["epoch"] != state["epoch"]:
        raise UserError(f"{exp}/{FILE} was calibrated on the scores of epoch {cal['epoch']}, but the newest "
                        f"checkpoint is epoch {state['epoch']}; re-run stages 3 and 4 (bash run.sh --stage 3 ...)")
    if cal["checkpoint_sha256"] != state["sha256"]:
        raise UserError(f"{exp}/{FILE} was calibrated on the scores of another checkpoint (SHA-256 "
                        f"{cal['checkpoint_sha256'][:12]}...) than {state['file']} (SHA-256 {state['sha256'][:12]}..., "
                        f"the same epoch {state['epoch']}: a retrained experiment?); re-run stages 3 and 4 "
                        f"(bash run.sh --stage 3 ...)")


def decide(score, threshold):
    return "accept" if threshold is not None and score >= threshold else "reject"


class _InMemoryFeatures:
    """Feature matrices held in memory, read like data.ArkReader (what stage 3's crops read)."""

    def __init__(self):
        self.mats, self.scp = {}, {}

    def add(self, key, source, feats):
        self.mats[key], self.scp[key] = feats, source

    def read(self, utt, start=0, count=None):
        m = self.mats[utt]
        return m[start:] if count is None else m[start:start + count]


def check_file(path):
    """A UserError unless `path` is audio that stage 1's reader opens (before any slow import)."""
    import soundfile

    if not os.path.isfile(path):
        raise UserError(f"{path}: no such audio file; give the path of a recording")
    try:
        soundfile.info(path)   # a clearer line than the data-dir wording of load_audio's
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise UserError(f"{path}: not audio that stage 1 can read ({e}); give a recording in a format "
                        f"libsndfile reads (wav, flac, ogg, ...)") from None


def file_features(path, opts):
    """Stage 1's features of one audio file: its reader (any rate, channels averaged) and fbank."""
    from capsv.features import compute_fbank, load_audio

    check_file(path)
    return compute_fbank(*load_audio(path, path), opts, path)


def read_files(pairs, opts):
    """Stage 1's features of each distinct file of (path_a, path_b) pairs (by real path), read once.

    Returns (reader, trials): an ArkReader-like reader of the features and the pairs as (key_a, key_b).
    Every file is checked before any is read, and all before the model is loaded: a bad one is reported at once.
    """
    key = {}
    for path in (p for pair in pairs for p in pair):
        real = os.path.realpath(path)
        if real not in key:
            check_file(path)
            key[real] = (f"f{len(key):07d}", path)
    reader = _InMemoryFeatures()
    for k, path in key.values():
        reader.add(k, path, file_features(path, opts))
    return reader, [(key[os.path.realpath(a)][0], key[os.path.realpath(b)][0]) for a, b in pairs]


def score_files(net, reader, trials, ecfg, device, trial_batch):
    """Scores (float64, in order) of `read_files`'s trials: stage 3's crops, trunk batches, cache and scoring."""
    from capsv.scoring import score_trials, utterance_cache

    utts = sorted(reader.mats)
    nframes = {u: len(m) for u, m in reader.mats.items()}
    cache = utterance_cache(net, reader, nframes, utts, ecfg, device)
    return score_trials(net, cache, trials, trial_batch)


def read_pairs(path):
    """`<a> <b>` lines of audio paths (relative to the current directory), in order."""
    pairs = []
    with open_input(path, "--pairs file", "give a file of `<a> <b>` lines of audio paths") as f:
        for n, line in enumerate(f, 1):
            toks = line.split()
            if not toks:
                continue
            if len(toks) != 2:
                raise UserError(f"{path}:{n}: expected `<a> <b>` (two audio paths), got {len(toks)} fields; "
                                f"fix the line")
            pairs.append((toks[0], toks[1]))
    if not pairs:
        raise UserError(f"--pairs {path}: no pairs in it; give `<a> <b>` lines of audio paths")
    return pairs
