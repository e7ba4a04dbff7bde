"""EER / minDCF against a brute-force threshold sweep; DET plot output; Cllr, minCllr, actDCF and the calibration map
against direct sums over trials, a PAV of its own and closed-form cases."""
import math

import numpy as np
import pytest
from scipy.optimize import minimize

from capsv.calibration import fit_llr_map
from capsv.metrics import compute_act_dcf, compute_cllr, compute_eer, compute_min_cllr, compute_min_dcf, error_rates, \
    pav_llrs, plot_det
from capsv.utils import UserError


def brute_force(scores, labels, p_target=0.05, c_miss=1.0, c_fa=1.0):
    """Loop over every candidate threshold (each distinct score, then +inf); accept iff score >= t.

    EER: the first point minimising |p_miss - p_fa|, reported as (p_miss + p_fa) / 2.
    minDCF: the first point minimising the DCF, normalised by min(c_miss*p_t, c_fa*(1-p_t)).
    """
    scores = [float(s) for s in scores]
    labels = [bool(x) for x in labels]
    n_tar = sum(labels)
    n_non = len(labels) - n_tar
    best_gap = best_eer = best_dcf = None
    for t in sorted(set(scores)) + [float("inf")]:
        misses = sum(1 for s, y in zip(scores, labels) if y and s < t)
        fas = sum(1 for s, y in zip(scores, labels) if not y and s >= t)
        pm, pf = misses / n_tar, fas / n_non
        gap = abs(pm - pf)
        if best_gap is None or gap < best_gap:
            best_gap, best_eer = gap, ((pm + pf) / 2, t)
        dcf = c_miss * p_target * pm + c_fa * (1 - p_target) * pf
        if best_dcf is None or dcf < best_dcf[0]:
            best_dcf = (dcf, t)
    norm = min(c_miss * p_target, c_fa * (1 - p_target))
    return best_eer, (best_dcf[0] / norm, best_dcf[1])


CASES = [(seed, n, decimals) for seed in range(6) for n, decimals in ((7, None), (60, 1), (300, None), (400, 1))]


@pytest.mark.parametrize("seed,n,decimals", CASES)
def test_against_brute_force(seed, n, decimals):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    labels[0], labels[1] = True, False
    scores = rng.normal(size=n) + 1.2 * labels
    if decimals is not None:  # heavy ties
        scores = np.round(scores, decimals)
    eer, thr = compute_eer(scores, labels)
    (b_eer, b_thr), _ = brute_force(scores, labels)
    assert eer == pytest.approx(b_eer, abs=1e-12)
    assert thr == b_thr
    for p_target, c_miss, c_fa in ((0.05, 1, 1), (0.01, 1, 1), (0.5, 1, 1), (0.2, 10, 1)):
        dcf, dthr = compute_min_dcf(scores, labels, p_target, c_miss, c_fa)
        _, (b_dcf, b_dthr) = brute_force(scores, labels, p_target, c_miss, c_fa)
        assert dcf == pytest.approx(b_dcf, abs=1e-12)
        assert dthr == b_dthr
        assert 0 <= dcf <= 1


def test_error_rates_curve_with_ties():
    scores = np.array([0.1, 0.5, 0.5, 0.5, 0.9])
    labels = np.array([0, 1, 0, 1, 1])
    thr, pm, pf = error_rates(scores, labels)
    np.testing.assert_array_equal(thr, [0.1, 0.5, 0.9, np.inf])
    # a tie at 0.5 is never split: all three move together
    np.testing.assert_allclose(pm, [0, 0, 2 / 3, 1])
    np.testing.assert_allclose(pf, [1, 0.5, 0, 0])
    assert np.all(np.diff(pm) >= 0) and np.all(np.diff(pf) <= 0)


def test_all_scores_tied():
    thr, pm, pf = error_rates([0.3] * 4, [1, 0, 1, 0])
    np.testing.assert_array_equal(thr, [0.3, np.inf])
    np.testing.assert_array_equal(pm, [0, 1])
    np.testing.assert_array_equal(pf, [1, 0])
    assert compute_eer([0.3] * 4, [1, 0, 1, 0]) == (0.5, 0.3)
    assert compute_min_dcf([0.3] * 4, [1, 0, 1, 0])[0] == pytest.approx(1.0)


def test_perfectly_separated():
    scores = [0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.15]
    labels = [1, 1, 1, 0, 0, 0, 0]
    eer, thr = compute_eer(scores, labels)
    assert eer == 0.0
    assert 0.3 < thr <= 0.7
    assert compute_min_dcf(scores, labels)[0] == 0.0
    assert compute_min_dcf(scores, labels, p_target=0.01)[0] == 0.0


def test_fully_reversed():
    scores = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]
    labels = [1, 1, 1, 0, 0, 0]
    eer, thr = compute_eer(scores, labels)
    assert eer == 1.0
    # no threshold beats a trivial system: normalised minDCF is exactly 1
    assert compute_min_dcf(scores, labels)[0] == pytest.approx(1.0)


def test_hand_checked_eer_and_dcf():
    # 4 targets, 4 nontargets; one nontarget above one target
    scores = [0.9, 0.8, 0.6, 0.4, 0.5, 0.3, 0.2, 0.1]
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    eer, thr = compute_eer(scores, labels)
    # t=0.5: miss 1/4, fa 1/4 -> EER 25 %
    assert eer == pytest.approx(0.25)
    assert thr == 0.5
    # p=0.5: DCF at t=0.6 is 0.5*1/4 + 0.5*0 = 0.125 -> /0.5 = 0.25
    dcf, dthr = compute_min_dcf(scores, labels, p_target=0.5)
    assert dcf == pytest.approx(0.25)


def test_monotone_transform_invariance():
    rng = np.random.default_rng(7)
    labels = rng.random(500) < 0.4
    scores = np.round(rng.normal(size=500) + labels, 2)
    eer, thr = compute_eer(scores, labels)
    dcf, dthr = compute_min_dcf(scores, labels)
    for f in (lambda x: 3.0 * x + 5.0, lambda x: 0.001 * x, np.exp, lambda x: x ** 3):
        e2, t2 = compute_eer(f(scores), labels)
        d2, dt2 = compute_min_dcf(f(scores), labels)
        assert e2 == pytest.approx(eer, abs=1e-12)
        assert d2 == pytest.approx(dcf, abs=1e-12)
        assert t2 == pytest.approx(f(thr))
        assert dt2 == pytest.approx(f(dthr))


def test_order_invariance():
    rng = np.random.default_rng(3)
    labels = rng.random(200) < 0.5
    scores = np.round(rng.normal(size=200) + labels, 1)
    perm = rng.permutation(200)
    assert compute_eer(scores, labels) == compute_eer(scores[perm], labels[perm])
    assert compute_min_dcf(scores, labels) == compute_min_dcf(scores[perm], labels[perm])


def test_large_gaussian_eer():
    # d' = 2 between unit Gaussians: EER = Phi(-1) = 15.87 %
    rng = np.random.default_rng(0)
    labels = np.arange(40000) % 2 == 0
    scores = rng.normal(size=40000) + 2 * labels
    eer, _ = compute_eer(scores, labels)
    assert eer == pytest.approx(0.1587, abs=0.006)


@pytest.mark.parametrize("scores,labels,msg", [
    ([], [], "empty trial set"),
    ([0.1, 0.2], [1, 1], "only target"),
    ([0.1, 0.2], [False, False], "only nontarget"),
    ([0.1, float("nan")], [1, 0], "NaN"),
])
def test_bad_input(scores, labels, msg):
    with pytest.raises(UserError, match=msg):
        compute_eer(scores, labels)
    with pytest.raises(UserError, match=msg):
        compute_min_dcf(scores, labels)


def test_det_png(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.random(2000) < 0.5
    curves = {}
    for name, d in (("tap", 1.5), ("cap", 3.0)):
        _, pm, pf = error_rates(rng.normal(size=2000) + d * labels, labels)
        curves[name] = (pm, pf)
    out = tmp_path / "sub" / "det.png"
    plot_det(curves, out, title="test")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000
    assert [p.name for p in out.parent.iterdir()] == ["det.png"]  # no temporary left behind


# Calibrated measures (Cllr, minCllr, actDCF) and the calibration map, against direct computations.

def direct_cllr(llrs, labels):
    """Cllr by a sum over trials, in bits (|LLR| kept small enough here for exp not to overflow)."""
    tar = [math.log2(1 + math.exp(-x)) for x, y in zip(llrs, labels) if y]
    non = [math.log2(1 + math.exp(x)) for x, y in zip(llrs, labels) if not y]
    return (sum(tar) / len(tar) + sum(non) / len(non)) / 2


def brute_act_dcf(llrs, labels, p):
    """Count the Bayes decisions' errors trial by trial: accept iff llr > log((1 - p) / p)."""
    t = math.log((1 - p) / p)
    n_tar = sum(1 for y in labels if y)
    misses = sum(1 for x, y in zip(llrs, labels) if y and not x > t)
    fas = sum(1 for x, y in zip(llrs, labels) if not y and x > t)
    return (p * misses / n_tar + (1 - p) * fas / (len(labels) - n_tar)) / min(p, 1 - p)


def naive_pav_llrs(scores, labels):
    """PAV on (targets, non-targets) counts with exact integer comparisons; equal scores start as one pool."""
    groups = {}
    for s, y in zip(scores, labels):
        g = groups.setdefault(float(s), [0, 0, []])
        g[0 if y else 1] += 1
    pools = []   # [targets, non-targets, scores]
    for s in sorted(groups):
        pools.append([groups[s][0], groups[s][1], [s]])
        # merge while the pool before has a target rate at least this one's: t1/(t1+n1) >= t2/(t2+n2)
        while len(pools) > 1 and pools[-2][0] * (pools[-1][0] + pools[-1][1]) >= \
                pools[-1][0] * (pools[-2][0] + pools[-2][1]):
            t, n, ss = pools.pop()
            pools[-1][0] += t
            pools[-1][1] += n
            pools[-1][2] += ss
    n_tar = sum(1 for y in labels if y)
    prior = math.log(n_tar / (len(labels) - n_tar))
    llr = {}
    for t, n, ss in pools:
        v = math.inf if n == 0 else -math.inf if t == 0 else math.log(t / n) - prior
        llr.update(dict.fromkeys(ss, v))
    return [llr[float(s)] for s in scores]


def cllr_with_infinities(llrs, labels):
    """direct_cllr where an LLR may be infinite on the side that costs nothing."""
    tar = [0.0 if x == math.inf else math.log2(1 + math.exp(-x)) for x, y in zip(llrs, labels) if y]
    non = [0.0 if x == -math.inf else math.log2(1 + math.exp(x)) for x, y in zip(llrs, labels) if not y]
    return (sum(tar) / len(tar) + sum(non) / len(non)) / 2


@pytest.mark.parametrize("seed,n,decimals", CASES)
def test_calibrated_measures_against_direct_computation(seed, n, decimals):
    rng = np.random.default_rng(100 + seed)
    labels = rng.random(n) < 0.3
    labels[0], labels[1] = True, False
    llrs = 2.5 * rng.normal(size=n) + 3.0 * labels - 1.0
    if decimals is not None:  # heavy ties, some of them on the Bayes thresholds' sides
        llrs = np.round(llrs, decimals)
    assert compute_cllr(llrs, labels) == pytest.approx(direct_cllr(llrs, labels), rel=1e-12)
    for p in (0.05, 0.01, 0.5, 0.2):
        assert compute_act_dcf(llrs, labels, p) == pytest.approx(brute_act_dcf(llrs, labels, p), abs=1e-12)
    want = naive_pav_llrs(llrs, labels)
    got = pav_llrs(llrs, labels)
    assert np.array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[np.isfinite(got)], np.array(want)[np.isfinite(got)], rtol=0, atol=1e-9)
    assert compute_min_cllr(llrs, labels) == pytest.approx(cllr_with_infinities(want, labels), rel=1e-9)


def test_act_dcf_decides_strictly_above_the_bayes_threshold():
    t = math.log(19)                       # P_target 0.05
    labels = [1, 1, 0, 0]
    # a target exactly at the threshold is rejected (a miss), a non-target just above accepted (a false alarm)
    assert compute_act_dcf([t, 10, t + 1e-9, -10], labels, 0.05) == pytest.approx((0.05 * 0.5 + 0.95 * 0.5) / 0.05)
    assert compute_act_dcf([0, 0, 0, 0], labels, 0.05) == pytest.approx(1.0)        # rejects all: miss rate 1
    assert compute_act_dcf([0, 0, 0, 0], labels, 0.5) == pytest.approx(1.0)         # 0 is not > 0: rejects all


def test_min_cllr_closed_form_cases():
    # separated: the PAV map is +inf for targets and -inf for non-targets, which costs nothing
    assert compute_min_cllr([0.1, 0.2, 0.3, 0.7, 0.8], [0, 0, 0, 1, 1]) == 0.0
    # all tied, or fully reversed: the best monotone map is a constant, the list's own prior: LLR 0, Cllr 1
    assert compute_min_cllr([0.5] * 6, [1, 0, 0, 1, 0, 0]) == pytest.approx(1.0)
    assert compute_min_cllr([0.9, 0.8, 0.7, 0.1, 0.2], [0, 0, 0, 1, 1]) == pytest.approx(1.0)
    assert compute_cllr([0.0] * 5, [1, 1, 0, 0, 0]) == pytest.approx(1.0)
    # a tie of both classes between pure pools: 2 targets and 2 non-targets at 0.5 pool to LLR 0 (list prior 1:1)
    llrs = pav_llrs([0.1, 0.5, 0.5, 0.5, 0.5, 0.9], [0, 1, 0, 1, 0, 1])
    assert llrs.tolist() == [-math.inf, 0.0, 0.0, 0.0, 0.0, math.inf]
    # = ½[(2 · 1 + 0) / 3 + (2 · 1 + 0) / 3] bits
    assert compute_min_cllr([0.1, 0.5, 0.5, 0.5, 0.5, 0.9], [0, 1, 0, 1, 0, 1]) == pytest.approx(2 / 3)


def test_min_cllr_bounds_every_monotone_recalibration():
    rng = np.random.default_rng(5)
    labels = rng.random(500) < 0.2
    scores = np.round(rng.normal(size=500) + 1.5 * labels, 2)
    best = compute_min_cllr(scores, labels)
    assert 0 < best < 1
    for f in (lambda x: 2 * x - 1, lambda x: 4 * x - 3, lambda x: np.sinh(x) - 2, lambda x: 3 * np.tanh(x)):
        assert compute_cllr(f(scores), labels) >= best
        assert compute_min_cllr(f(scores), labels) == pytest.approx(best, abs=1e-12)   # depends on the order only


def prior_weighted_cost(x, scores, labels, p):
    """The calibration objective written out: P · mean over targets of -log σ(LLR + logit P) + (1 - P) · mean over
    non-targets of -log σ(-(LLR + logit P)), LLR = a·s + b."""
    lo = math.log(p / (1 - p))
    t = [x[0] * s + x[1] + lo for s in scores]
    tar = [math.log1p(math.exp(-v)) for v, y in zip(t, labels) if y]
    non = [math.log1p(math.exp(v)) for v, y in zip(t, labels) if not y]
    return p * sum(tar) / len(tar) + (1 - p) * sum(non) / len(non)


def test_llr_map_is_the_prior_weighted_logistic_regression():
    rng = np.random.default_rng(11)
    labels = rng.random(300) < 0.4
    scores = 0.1 * rng.normal(size=300) + 0.12 * labels + 0.4      # cosine-like: small spread, offset
    a, b = fit_llr_map(scores, labels, 0.05)
    # an independent minimiser (derivative-free, from another start) of the objective written out above
    ref = minimize(prior_weighted_cost, [1.0, 0.0], args=(scores.tolist(), labels.tolist(), 0.05),
                   method="Nelder-Mead", options={"xatol": 1e-7, "fatol": 1e-12, "maxiter": 20000})
    assert a == pytest.approx(ref.x[0], rel=1e-4) and b == pytest.approx(ref.x[1], abs=1e-4 * abs(ref.x[1]) + 1e-5)
    # affine changes of the raw score move the map with them
    a2, b2 = fit_llr_map(3 * scores + 5, labels, 0.05)
    assert a2 == pytest.approx(a / 3, rel=1e-6) and b2 == pytest.approx(b - 5 * a / 3, rel=1e-6, abs=1e-6)
    # another prior is another fit (the classes weigh differently), not the same line
    assert fit_llr_map(scores, labels, 0.5) != pytest.approx((a, b), rel=1e-3)


def test_llr_map_recovers_the_gaussian_llr():
    # equal-variance Gaussian classes: the true LLR is linear, (m1 - m0)/σ² · s - (m1² - m0²)/(2σ²)
    rng = np.random.default_rng(2)
    n = 40000
    labels = np.arange(n) % 4 == 0
    m1, m0, sd = 1.5, -0.5, 1.2
    scores = np.where(labels, rng.normal(m1, sd, n), rng.normal(m0, sd, n))
    a, b = fit_llr_map(scores, labels, 0.05)
    assert a == pytest.approx((m1 - m0) / sd ** 2, rel=0.05)
    assert b == pytest.approx(-(m1 ** 2 - m0 ** 2) / (2 * sd ** 2), abs=0.1)
    llrs = a * scores + b
    # well calibrated: Cllr close to its PAV bound, actDCF close to minDCF
    assert compute_cllr(llrs, labels) - compute_min_cllr(llrs, labels) < 0.01
    for p in (0.05, 0.01):
        assert compute_act_dcf(llrs, labels, p) - compute_min_dcf(llrs, labels, p)[0] < 0.03


def test_llr_map_needs_both_classes():
    with pytest.raises(UserError, match="only target trials .*both target and non-target"):
        fit_llr_map([0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(UserError, match="only non-target trials"):
        fit_llr_map([0.1, 0.2, 0.3], [0, 0, 0])
