"""Adaptive symmetric score normalisation (AS-norm; Matejka et al., "Analysis of score normalization in
multilingual speaker recognition", Interspeech 2017), the option of stage 3 behind `--cohort-data`.

    s' = ½ [(s − μ_e) / σ_e + (s − μ_t) / σ_t]

μ_x, σ_x: mean and standard deviation (ddof 0, as numpy's np.std) of the K = eval.asnorm_top_k highest
scores of utterance x against the cohort. The cohort is one utterance per training speaker (the first of
each, sorted), of at most eval.cohort_size speakers spread evenly over the sorted speaker list. It goes
through the same trunk and crops as the test utterances once, into its own archive
(steps/extract_embeddings.sh --cohort true: exp/<name>/embeddings/<train-set>_cohort/), which every scoring
job reads into an in-memory ScoringCache.

Each utterance of a job's trials is scored against every cohort utterance once (not once per trial),
block by block, with the scorer of the raw scores (capsv.scoring.score_trials; TAP/SAP: a matrix product
of the mean unit crop embeddings); only its top-K mean and std are kept, so memory is one block's scores,
never N_utterances x N_cohort. For CAP every cohort score is a full trial (10 x 10 crop pairs), so a job
costs N_utterances x N_cohort pair scores on top of its N_trials: for Vox1-O 4,715 x N_cohort / 37,720
pair scores per trial (749 with all 5,994 VoxCeleb2 speakers).
"""
import time

import numpy as np
import torch

from capsv.scoring import ScoringCache, score_trials
from capsv.utils import UserError, progress, sha256

# Cohort pair scores per block: bounds the scores and pair lists held at once (CAP: 0.5 MB of float64, each
# call's start-up negligible next to its pairs; TAP/SAP: 8 MB, so each matrix product reads the cohort rarely).
PAIRS_PER_BLOCK = 1 << 16
DOT_PAIRS_PER_BLOCK = 1 << 20
# A zero spread (all K cohort scores equal, e.g. a silent utterance) would divide by zero.
STD_FLOOR = 1e-8


def asnorm_path(score_path):
    """Where the AS-norm scores of a raw score file go: <list>.score -> <list>.asnorm.score."""
    base = score_path[:-len(".score")] if score_path.endswith(".score") else score_path
    return base + ".asnorm.score"


def top_k_stats(scores, k):
    """Mean and std (ddof 0) of the k highest scores of each row of scores [n, C] (float64)."""
    scores = np.asarray(scores, dtype=np.float64)
    top = np.partition(scores, scores.shape[1] - k, axis=1)[:, scores.shape[1] - k:]
    return top.mean(axis=1), top.std(axis=1)


def as_norm(raw, mean_e, std_e, mean_t, std_t):
    """½[(s − μ_e)/σ_e + (s − μ_t)/σ_t], elementwise."""
    return 0.5 * ((raw - mean_e) / np.maximum(std_e, STD_FLOOR) + (raw - mean_t) / np.maximum(std_t, STD_FLOOR))


def select_cohort(utt2spk, size):
    """The first utterance (sorted) of each of at most `size` speakers, spread evenly over the sorted speakers."""
    first = {}
    for utt in sorted(utt2spk):
        first.setdefault(utt2spk[utt], utt)
    speakers = sorted(first)
    if len(speakers) > size:
        speakers = [speakers[i * len(speakers) // size] for i in range(size)]
    return [first[s] for s in speakers]


def cohort_utterances(data_dir, utt2spk, cohort_size):
    """The cohort of a (training) data dir with utterances `utt2spk`: (its utterances, a record of it)."""
    utts = select_cohort(utt2spk, cohort_size)
    if len(utts) < 2:
        raise UserError(f"--cohort-data {data_dir}: {len(utts)} speaker; AS-norm needs a cohort of at least 2 "
                        f"speakers (give the training data dir)")
    return utts, {"data": data_dir, "utt2spk_sha256": sha256(f"{data_dir}/utt2spk"),
                  "speakers": len(set(utt2spk.values())), "size": len(utts)}


class Cohort:
    """The AS-norm cohort's rows, read into memory from its archive (a capsv.embeddings.EmbeddingArchive made
    with --cohort), and the K of its top-K statistics."""

    def __init__(self, archive, ecfg, device, mem_bytes=None):
        record = archive.meta.get("cohort")
        if not record:
            raise UserError(f"{archive.dir}: not the embeddings of an AS-norm cohort; extract one with "
                            f"steps/extract_embeddings.sh --cohort true <exp-dir> <training-data-dir>")
        self.utts = archive.utts
        self.top_k = min(ecfg["asnorm_top_k"], len(self.utts))
        self.warning = None
        if self.top_k < ecfg["asnorm_top_k"]:
            # K = cohort size is plain symmetric normalisation (S-norm): said, not refused
            self.warning = (f"WARNING: eval.asnorm_top_k={ecfg['asnorm_top_k']} is more than the cohort's "
                            f"{len(self.utts)} utterances; using all {self.top_k} (S-norm)")
        self.info = {k: record[k] for k in ("data", "utt2spk_sha256", "speakers", "size")}
        self.info["top_k"] = self.top_k
        self.cache = archive.cache(self.utts, device, mem_bytes)
        if not self.cache.in_memory:
            need, budget = self.cache.nbytes / 2**30, self.cache.mem_bytes / 2**30
            raise UserError(f"eval.cohort_size: a cohort of {len(self.utts)} utterances needs {need:.1f} GiB, more "
                            f"than the scoring memory budget ({budget:.1f} GiB); lower eval.cohort_size")


def _rows_in_memory(cache, utts):
    """`cache` itself when in memory; else an in-memory copy of the rows of `utts` (consecutive, in order)."""
    if cache.in_memory:
        return cache
    sub = ScoringCache(utts, cache.shapes, cache.device, mem_bytes=float("inf"), dtype=cache.dtype)
    sub.put(utts, cache.load(np.array([cache.row[u] for u in utts])))
    return sub


def cohort_scores(net, cache, utts, cohort_cache, trial_batch):
    """Scores [len(utts), N_cohort] (float64) of `utts` (rows of an in-memory `cache`) against every cohort row."""
    if net.pair_dependent:
        pairs = [(u, c) for u in utts for c in cohort_cache.utts]
        return score_trials(net, cache, pairs, trial_batch, test_cache=cohort_cache).reshape(len(utts), -1)
    # TAP/SAP: the mean crop-pair cosine is the dot product of mean unit crop embeddings (as score_trials)
    rows = torch.as_tensor([cache.row[u] for u in utts], device=cache.device)
    return (cache.data["e"][rows] @ cohort_cache.data["e"].T).double().cpu().numpy()


def cohort_stats(net, cache, utts, cohort_cache, top_k, trial_batch):
    """{utt: (μ, σ)} of the top_k scores of each of `utts` (rows of `cache`) against the cohort."""
    utts = sorted(set(utts), key=cache.row.__getitem__)       # cache order: a spilled cache is read forwards
    per = max(1, (PAIRS_PER_BLOCK if net.pair_dependent else DOT_PAIRS_PER_BLOCK) // len(cohort_cache.utts))
    mean, std = np.empty(len(utts)), np.empty(len(utts))
    for i in progress(range(0, len(utts), per), desc="AS-norm cohort", leave=False):
        block = utts[i:i + per]
        scores = cohort_scores(net, _rows_in_memory(cache, block), block, cohort_cache, trial_batch)
        mean[i:i + len(block)], std[i:i + len(block)] = top_k_stats(scores, top_k)
    return {u: (m, s) for u, m, s in zip(utts, mean, std)}


def normalise_trials(trials, raw, stats):
    """AS-norm scores of (enroll, test, ...) trials with raw scores `raw`, from per-utterance cohort stats."""
    if not trials:
        return np.zeros(0)
    me, se = np.array([stats[e] for e, *_ in trials]).T
    mt, st = np.array([stats[t] for _, t, *_ in trials]).T
    return as_norm(np.asarray(raw, dtype=np.float64), me, se, mt, st)


@torch.no_grad()
def measure_cost(pooling="cap", n_utts=32, n_cohort=256, n_trials=2048, vox1o=(4715, 5994, 37720), seed=0):
    """What AS-norm adds per trial, measured from random trunk outputs of the paper's sizes (10 crops x 88 frames
    x 128 channels, fc 512) with the paper's network: ms per raw trial and per cohort pair score (through
    cohort_stats, as stage 3 runs it), and the Vox1-O figure (utterances x cohort / trials pair scores per trial).

        python -c "from capsv.asnorm import measure_cost; print(measure_cost('cap'))"
    """
    import os

    from capsv.config import load_config
    from capsv.models.speaker_net import SpeakerNet
    from capsv.scoring import cache_from_frames

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "conf", f"{pooling}.yaml"))
    torch.manual_seed(seed)
    net = SpeakerNet.from_config(cfg).eval()
    net.head[0].running_mean.uniform_(0.0, 1.0)     # BN statistics of a trained model, roughly (as the bench)
    net.head[0].running_var.uniform_(0.1, 1.0)
    ecfg, g = cfg["eval"], torch.Generator().manual_seed(seed + 1)
    shape = (ecfg["num_crops"], -(-ecfg["crop_frames"] // 4), net.trunk.out_dim)
    test = cache_from_frames(net, {f"t{i:05d}": torch.rand(*shape, generator=g) for i in range(n_utts)})
    cohort = cache_from_frames(net, {f"c{i:05d}": torch.rand(*shape, generator=g) for i in range(n_cohort)})
    # raw trials among the cohort's rows: as many utterances as the cohort, more than the L3 holds (as Vox1-O's)
    rng = np.random.default_rng(seed)
    trials = [(cohort.utts[a], cohort.utts[b]) for a, b in rng.integers(0, n_cohort, (n_trials, 2))]
    score_trials(net, cohort, trials[:64], ecfg["trial_batch"])             # warm-up
    t0 = time.perf_counter()
    score_trials(net, cohort, trials, ecfg["trial_batch"])
    t1 = time.perf_counter()
    cohort_stats(net, test, test.utts, cohort, min(ecfg["asnorm_top_k"], n_cohort), ecfg["trial_batch"])
    t2 = time.perf_counter()
    per_pair = (t2 - t1) / (n_utts * n_cohort)
    utts, size, n = vox1o
    return {"pooling": pooling, "threads": torch.get_num_threads(), "ms_per_raw_trial": (t1 - t0) / n_trials * 1e3,
            "ms_per_cohort_pair": per_pair * 1e3, "measured_pairs": n_utts * n_cohort,
            "vox1o_pairs_per_trial": utts * size / n, "vox1o_asnorm_ms_per_trial": utts * size / n * per_pair * 1e3,
            "vox1o_asnorm_total_s": utts * size * per_pair}
