"""EER / minDCF against a brute-force threshold sweep; DET plot output."""
import numpy as np
import pytest

from capsv.metrics import compute_eer, compute_min_dcf, error_rates, plot_det
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
