"""Verification metrics: error-rate curves, EER, minDCF and DET plots; actDCF, Cllr and minCllr of calibrated
log-likelihood ratios (LLRs).

Conventions used throughout:

- decision rule: a trial is accepted iff `score >= threshold`;
- operating points: one per distinct score value u (threshold u), plus threshold +inf
  (everything rejected). The lowest distinct score accepts everything. Equal scores are
  therefore always on the same side of a threshold: a tie is never split;
- p_miss(t) = #{target trials with score < t} / #targets,
  p_fa(t)   = #{nontarget trials with score >= t} / #nontargets.

All curves come from a single argsort of the scores (O(n log n)). The Bayes decision of an LLR, unlike a threshold
decision, accepts iff LLR > log((1 - P) / P) (strictly).
"""
import numpy as np

from capsv.utils import UserError, atomic_path


def _check(scores, labels):
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if scores.size == 0:
        raise UserError("empty trial set: there are no trials to score; check the trials file")
    if labels.dtype != np.bool_:
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("labels must be booleans or 0/1")
        labels = labels.astype(np.bool_)
    n_tar = int(labels.sum())
    if n_tar == 0 or n_tar == labels.size:
        which = "nontarget" if n_tar == 0 else "target"
        raise UserError(f"the trial set has only {which} trials ({labels.size}); EER/minDCF need both "
                        f"target and nontarget trials")
    if not np.isfinite(scores).all():
        raise UserError("scores contain NaN or infinite values; re-run scoring")
    return scores, labels


def error_rates(scores, labels):
    """Miss and false-alarm rates at every distinct threshold.

    Returns (thresholds, p_miss, p_fa), arrays of length (#distinct scores + 1):
    thresholds are the distinct scores in increasing order followed by +inf, so the first
    point accepts everything (p_miss = 0, p_fa = 1) and the last rejects everything
    (p_miss = 1, p_fa = 0). p_miss is non-decreasing, p_fa non-increasing.
    """
    scores, labels = _check(scores, labels)
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    lab = labels[order]
    n = s.size
    n_tar = int(lab.sum())
    n_non = n - n_tar
    # counts of trials strictly below position k in sorted order, k = 0..n
    tar_below = np.concatenate(([0], np.cumsum(lab)))
    non_below = np.arange(n + 1) - tar_below
    # start of each group of equal scores, plus n (the +inf threshold)
    starts = np.concatenate(([0], np.flatnonzero(s[1:] != s[:-1]) + 1, [n]))
    thresholds = np.concatenate((s[starts[:-1]], [np.inf]))
    p_miss = tar_below[starts] / n_tar
    p_fa = (n_non - non_below[starts]) / n_non
    return thresholds, p_miss, p_fa


def _eer_index(p_miss, p_fa):
    return int(np.argmin(np.abs(p_miss - p_fa)))


def compute_eer(scores, labels):
    """Equal error rate, as a fraction, and its threshold.

    Definition: over the operating points of `error_rates` (every distinct score as a
    threshold, plus +inf), take the point that minimises |p_miss - p_fa| (the first, i.e.
    the lowest threshold, if several tie) and report EER = (p_miss + p_fa) / 2 at that point,
    with that point's threshold. No interpolation: the EER is always attained by a real
    threshold, and the gap |p_miss - p_fa| there is at most one trial's worth of either rate.
    Perfectly separated scores give 0; fully reversed scores give 1.
    """
    return eer_from_rates(*error_rates(scores, labels))


def eer_from_rates(thr, p_miss, p_fa):
    """compute_eer on the curves of `error_rates`, for callers that need several metrics of one sort."""
    i = _eer_index(p_miss, p_fa)
    return float((p_miss[i] + p_fa[i]) / 2), float(thr[i])


def compute_min_dcf(scores, labels, p_target=0.05, c_miss=1.0, c_fa=1.0):
    """Normalised minimum detection cost and its threshold.

    DCF(t) = c_miss * p_target * p_miss(t) + c_fa * (1 - p_target) * p_fa(t), minimised over the
    operating points of `error_rates` (the first, lowest threshold on ties) and divided by
    min(c_miss * p_target, c_fa * (1 - p_target)), the cost of the best trivial system (NIST).
    The result is therefore at most 1; the threshold is +inf when rejecting everything is best.
    """
    return min_dcf_from_rates(*error_rates(scores, labels), p_target, c_miss, c_fa)


def min_dcf_from_rates(thr, p_miss, p_fa, p_target=0.05, c_miss=1.0, c_fa=1.0):
    """compute_min_dcf on the curves of `error_rates`."""
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    dcf = c_miss * p_target * p_miss + c_fa * (1 - p_target) * p_fa
    i = int(np.argmin(dcf))
    return float(dcf[i] / min(c_miss * p_target, c_fa * (1 - p_target))), float(thr[i])


_TICKS = [0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9,
          0.95, 0.98, 0.99]


def _tick_label(p):
    pct = p * 100
    return f"{pct:g}"


def plot_det(curves, path, title=None):
    """Write a DET plot (PNG, atomically) of `curves`: dict name -> (p_miss, p_fa).

    Axes are on the normal-deviate scale (probit), ticks labelled in %; each curve's EER
    point (as in `compute_eer`) is marked and given in the legend.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    if not curves:
        raise ValueError("plot_det: no curves")
    eps = 1e-6
    lo, hi = 0.01, 0.4  # axis range in probability: widened to fit the data, down to 0.1 %
    eer_min = 1.0
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    try:
        for name, (p_miss, p_fa) in curves.items():
            p_miss = np.asarray(p_miss, dtype=np.float64)
            p_fa = np.asarray(p_fa, dtype=np.float64)
            i = _eer_index(p_miss, p_fa)
            eer = (p_miss[i] + p_fa[i]) / 2
            nz = np.concatenate((p_miss[p_miss > 0], p_fa[p_fa > 0]))
            if nz.size:
                lo = min(lo, max(0.001, float(nz.min())))
            eer_min = min(eer_min, eer)
            hi = max(hi, min(0.99, 2 * eer))
            x = norm.ppf(np.clip(p_fa, eps, 1 - eps))
            y = norm.ppf(np.clip(p_miss, eps, 1 - eps))
            (line,) = ax.plot(x, y, label=f"{name} (EER {eer * 100:.2f} %)")
            e = norm.ppf(np.clip(eer, eps, 1 - eps))
            ax.plot([e], [e], "o", color=line.get_color(), markersize=6)
        if eer_min > 0:
            lo = min(lo, eer_min / 2)  # a very low EER stays on the plot
        lo = max([t for t in _TICKS if t <= lo], default=_TICKS[0])
        hi = min([t for t in _TICKS if t >= hi], default=_TICKS[-1])
        ticks = [t for t in _TICKS if lo <= t <= hi]
        d = norm.ppf(ticks)
        ax.plot(norm.ppf([lo, hi]), norm.ppf([lo, hi]), ":", color="0.6", linewidth=0.8)
        ax.set_xticks(d)
        ax.set_xticklabels([_tick_label(t) for t in ticks])
        ax.set_yticks(d)
        ax.set_yticklabels([_tick_label(t) for t in ticks])
        ax.set_xlim(norm.ppf(lo), norm.ppf(hi))
        ax.set_ylim(norm.ppf(lo), norm.ppf(hi))
        ax.set_xlabel("False alarm probability (%)")
        ax.set_ylabel("Miss probability (%)")
        if title:
            ax.set_title(title)
        ax.grid(True, linestyle=":", linewidth=0.5)
        ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def rates_at_threshold(scores, labels, threshold):
    """(p_miss, p_fa) of the decision `score >= threshold` (None: reject everything) on these trials.

    What a fixed, calibrated threshold actually does on a list, as opposed to the best threshold
    for that list that EER and minDCF report.
    """
    scores, labels = _check(scores, labels)
    accept = scores >= (np.inf if threshold is None else threshold)
    return float((~accept & labels).sum() / labels.sum()), float((accept & ~labels).sum() / (~labels).sum())


def plot_score_histograms(panels, path, title=None, bins=50):
    """Write a PNG (atomically) with one panel per list: target and non-target score histograms.

    `panels`: dict name -> (scores, labels, {threshold name: value}); each threshold (None or +inf:
    nothing is accepted, not drawn) is a vertical line. Histograms are densities, so lists of very
    different sizes and class balances read alike.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("plot_score_histograms: no panels")
    n = len(panels)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), squeeze=False)
    try:
        for ax, (name, (scores, labels, thresholds)) in zip(axes.flat, panels.items()):
            scores, labels = _check(scores, labels)
            edges = np.histogram_bin_edges(scores, bins=bins)
            ax.hist(scores[~labels], bins=edges, density=True, alpha=0.55, color="tab:red",
                    label=f"non-target ({int((~labels).sum())})")
            ax.hist(scores[labels], bins=edges, density=True, alpha=0.55, color="tab:blue",
                    label=f"target ({int(labels.sum())})")
            for (tname, t), style in zip((thresholds or {}).items(), ("--", ":", "-.")):
                if t is not None and np.isfinite(t):
                    ax.axvline(t, color="k", linestyle=style, linewidth=1, label=f"{tname} threshold {t:.4f}")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("score")
            ax.set_ylabel("density")
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.set_visible(False)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


# Calibrated scores: log-likelihood ratios (LLRs), judged by the costs of the decisions they make.

def bayes_threshold(p_target):
    """The LLR above which the Bayes decision at prior p_target (C_miss = C_fa = 1) accepts: log((1 - P) / P)."""
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    return float(np.log((1 - p_target) / p_target))


def compute_act_dcf(llrs, labels, p_target=0.05):
    """Normalised DCF (C_miss = C_fa = 1) of the Bayes decisions of these LLRs: accept iff LLR > log((1 - P) / P).

    Unlike minDCF, no threshold is chosen on the list: the LLRs decide, so a badly calibrated system pays.
    Normalised as minDCF is, by min(P, 1 - P); a system that accepts or rejects everything scores 1.
    """
    llrs, labels = _check(llrs, labels)
    accept = llrs > bayes_threshold(p_target)
    p_miss = (~accept & labels).sum() / labels.sum()
    p_fa = (accept & ~labels).sum() / (~labels).sum()
    return float((p_target * p_miss + (1 - p_target) * p_fa) / min(p_target, 1 - p_target))


def _cllr(llrs, labels):
    # log2(1 + e^x) as logaddexp(0, x) / ln 2: exact at +-inf and without overflow for large |x|
    tar = np.logaddexp(0.0, -llrs[labels]).mean()
    non = np.logaddexp(0.0, llrs[~labels]).mean()
    return float((tar + non) / (2 * np.log(2)))


def compute_cllr(llrs, labels):
    """Cllr in bits: ½[mean over targets of log2(1 + e^-LLR) + mean over non-targets of log2(1 + e^LLR)].

    0 for perfect, confident LLRs; 1 for LLRs that are all 0 (a system that says nothing); unbounded above
    for confident wrong ones.
    """
    return _cllr(*_check(llrs, labels))


def pav_llrs(scores, labels):
    """The LLRs of the optimal monotone (non-decreasing) map of `scores` on this list (pool adjacent violators).

    Equal scores are one point (a map cannot tell them apart), so a tie is never split. Each pool's LLR is
    log(its targets / its non-targets) minus the list's log(#targets / #non-targets): exact counts, so a pool
    of targets only is +inf and one of non-targets only -inf.
    """
    from scipy.optimize import isotonic_regression

    scores, labels = _check(scores, labels)
    uniq, group = np.unique(scores, return_inverse=True)          # sorted distinct scores
    count = np.bincount(group, minlength=uniq.size)
    tar = np.bincount(group, weights=labels, minlength=uniq.size)
    blocks = isotonic_regression(tar / count, weights=count).blocks
    pool = np.repeat(np.arange(blocks.size - 1), np.diff(blocks))  # distinct score -> its pool
    pool_tar = np.add.reduceat(tar, blocks[:-1])
    pool_non = np.add.reduceat(count, blocks[:-1]) - pool_tar
    n_tar = labels.sum()
    with np.errstate(divide="ignore"):
        pool_llr = np.log(pool_tar) - np.log(pool_non) - np.log(n_tar / (labels.size - n_tar))
    return pool_llr[pool][group]


def compute_min_cllr(scores, labels):
    """minCllr: the Cllr of `pav_llrs`, the best any monotone recalibration of these scores achieves on this list.

    At most 1 (the constant map is monotone); Cllr - minCllr is the cost of miscalibration.
    """
    scores, labels = _check(scores, labels)
    return _cllr(pav_llrs(scores, labels), labels)
