"""The TAP / SAP / CAP ablation table (the paper's Table 2 form) over several seeds, and a paired
bootstrap over test speakers of each pair's EER difference."""
import csv
import itertools
import os

import numpy as np
import yaml

from capsv.metrics import compute_eer, compute_min_dcf
from capsv.trials import read_scores, read_trials
from capsv.utils import UserError

# Table 2 of the paper: VoxCeleb1 test (original list), 500 epochs on VoxCeleb2 dev, NP + softmax.
PAPER = {"tap": (2.13, 0.164), "sap": (2.08, 0.161), "cap": (1.93, 0.143)}


class Run:
    """One trained and scored experiment dir of the ablation."""

    def __init__(self, pooling, seed, exp_dir, list_name):
        self.pooling, self.seed, self.dir = pooling, int(seed), exp_dir
        self.scores_path = os.path.join(exp_dir, "scores", f"{list_name}.score")
        for f in ("config.yaml", "train_log.csv", "results.txt"):
            if not os.path.exists(os.path.join(exp_dir, f)):
                raise UserError(f"{exp_dir}/{f} is missing: that run has not finished; re-run local/run_ablation.sh")
        with open(os.path.join(exp_dir, "config.yaml")) as f:
            cfg = yaml.safe_load(f)
        if cfg["model"]["pooling"] != pooling or int(cfg["seed"]) != self.seed:
            raise UserError(f"{exp_dir}/config.yaml is pooling {cfg['model']['pooling']} seed {cfg['seed']}, "
                            f"not {pooling} seed {seed}; move that dir away and re-run")
        self.loss = "NP + softmax" if cfg["train"]["softmax_weight"] > 0 else "NP"
        with open(os.path.join(exp_dir, "train_log.csv")) as f:
            rows = list(csv.DictReader(f))
        self.epochs = len(rows)
        self.train_seconds = sum(float(r["seconds"]) for r in rows)


def bootstrap_pairs(runs, trials, utt2spk, n_boot=1000, seed=0):
    """Paired bootstrap over test speakers of the EER difference of every pair of poolings.

    A replicate draws the test speakers with replacement and keeps the trials whose enrollment
    utterance belongs to a drawn speaker (as often as it was drawn); every system is scored on the same
    replicate, and a pooling's EER is the mean over its seeds. Returns {(p1, p2): (delta, lo, hi, p)} with
    delta = EER(p2) - EER(p1) in points on all trials, the 95 % percentile interval, and the two-sided
    bootstrap p-value of "no difference".
    """
    labels = np.array([t[2] for t in trials])
    scores = {r: read_scores(r.scores_path, trials, trials_path=r.scores_path) for r in runs}
    by_pool = {}
    for r in runs:
        by_pool.setdefault(r.pooling, []).append(r)
    spk_of_trial = np.array([utt2spk[e] for e, _, _ in trials])
    speakers, spk_index = np.unique(spk_of_trial, return_inverse=True)
    members = [np.flatnonzero(spk_index == k) for k in range(len(speakers))]

    def eers(idx):
        return {p: np.mean([compute_eer(scores[r][idx], labels[idx])[0] for r in rs]) * 100
                for p, rs in by_pool.items()}

    full = eers(np.arange(len(trials)))
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        idx = np.concatenate([members[k] for k in rng.integers(0, len(speakers), len(speakers))])
        if labels[idx].all() or not labels[idx].any():
            continue
        reps.append(eers(idx))
    out = {}
    for p1, p2 in itertools.combinations(by_pool, 2):
        d = np.round([e[p2] - e[p1] for e in reps], 9)     # seed means differ by float noise where equal
        lo, hi = np.percentile(d, [2.5, 97.5])
        p = min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean()))
        out[(p1, p2)] = (full[p2] - full[p1], lo, hi, p)
    return out


def mean_sd(values, fmt):
    v = np.asarray(values, dtype=float)
    sd = v.std(ddof=1) if len(v) > 1 else float("nan")
    return f"{fmt.format(v.mean())} ± {fmt.format(sd)}" if len(v) > 1 else fmt.format(v.mean())


def table(runs, trials_path, utt2spk, n_boot=1000):
    """The Markdown text: per pooling mean ± sd over seeds, then the paired bootstrap."""
    trials = read_trials(trials_path)
    labels = np.array([t[2] for t in trials])
    pools = list(dict.fromkeys(r.pooling for r in runs))
    lines = ["| loss | aggregation | minDCF (p=0.05) | EER (%) | EER per seed (%) | training time (s) | epochs | "
             "paper minDCF | paper EER (%) |", "|---|---|---|---|---|---|---|---|---|"]
    for p in pools:
        rs = sorted((r for r in runs if r.pooling == p), key=lambda r: r.seed)
        eer, dcf = [], []
        for r in rs:
            s = read_scores(r.scores_path, trials, trials_path=trials_path)
            eer.append(compute_eer(s, labels)[0] * 100)
            dcf.append(compute_min_dcf(s, labels, p_target=0.05)[0])
        paper_eer, paper_dcf = PAPER.get(p, ("–", "–"))
        per_seed = ", ".join(f"{e:.2f} (seed {r.seed})" for e, r in zip(eer, rs))
        lines.append(f"| {rs[0].loss} | {p.upper()} | {mean_sd(dcf, '{:.3f}')} | {mean_sd(eer, '{:.2f}')} | "
                     f"{per_seed} | {mean_sd([r.train_seconds for r in rs], '{:.0f}')} | {rs[0].epochs} | "
                     f"{paper_dcf} | {paper_eer} |")
    n_tar = int(labels.sum())
    seeds = sorted({r.seed for r in runs})
    lines += ["", f"{len(trials)} trials ({n_tar} target) of `{trials_path}`; mean ± sample standard deviation over "
              f"seeds {', '.join(map(str, seeds))}. The paper's columns: VoxCeleb1 test, 500 epochs on VoxCeleb2 "
              "(Table 2).", "",
              "| pair | ΔEER (points) | 95 % interval | p | difference |", "|---|---|---|---|---|"]
    for (p1, p2), (d, lo, hi, p) in bootstrap_pairs(runs, trials, utt2spk, n_boot).items():
        verdict = "significant (α = 0.05)" if p < 0.05 else "not significant"
        lines.append(f"| {p2.upper()} − {p1.upper()} | {d:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {p:.3f} | {verdict} |")
    lines += ["", f"Paired bootstrap over the {len(set(utt2spk[e] for e, _, _ in trials))} test speakers "
              f"({n_boot} replicates): each replicate redraws the enrollment speakers with replacement and scores "
              "every system on the same trials; ΔEER is the difference of the seed-mean EERs."]
    return "\n".join(lines) + "\n"
