"""export.evaluation.stats against scikit-learn and values worked out by hand."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

from sklearn.metrics import cohen_kappa_score, roc_auc_score

from export.evaluation import stats

pytestmark = pytest.mark.export


def _sample(n: int, seed: int, separation: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < 0.3
    truth[0], truth[1] = True, False
    scores = 1 / (1 + np.exp(-(rng.normal(size=n) + separation * truth)))
    return np.round(scores, 2), truth  # rounded: ties on purpose


@given(
    st.lists(
        st.tuples(st.integers(0, 20).map(lambda x: x / 20), st.booleans()), min_size=2, max_size=60
    ).filter(lambda xs: len({t for _, t in xs}) == 2)
)
@settings(max_examples=200, deadline=None)
def test_auroc_equals_scikit_learn_with_ties(pairs: list[tuple[float, bool]]) -> None:
    scores = np.array([s for s, _ in pairs])
    truth = np.array([t for _, t in pairs])
    assert stats.auroc(scores, truth) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)


def test_auroc_refuses_one_class() -> None:
    with pytest.raises(ValueError, match="positive and negative"):
        stats.auroc(np.array([0.1, 0.2]), np.array([True, True]))


def test_bootstrap_interval_contains_the_auroc_and_is_reproducible() -> None:
    scores, truth = _sample(300, seed=3)
    area = stats.auroc(scores, truth)
    lo, hi = stats.bootstrap_auroc(scores, truth, resamples=2000, seed=7)
    assert lo < area < hi
    assert 0.02 < hi - lo < 0.3
    assert stats.bootstrap_auroc(scores, truth, resamples=2000, seed=7) == (lo, hi)
    assert stats.bootstrap_auroc(scores, truth, resamples=2000, seed=8) != (lo, hi)


def test_bootstrap_of_500_studies_takes_well_under_a_second() -> None:
    scores, truth = _sample(500, seed=4)
    start = time.perf_counter()
    stats.bootstrap_auroc(scores, truth, resamples=2000, seed=0)
    assert time.perf_counter() - start < 3.0  # ~0.2 s alone; generous for a shared machine


def test_bootstrap_redraws_single_class_resamples() -> None:
    # 1 positive in 3 studies: about 30 % of resamples draw no positive and are redrawn
    lo, hi = stats.bootstrap_auroc(
        np.array([0.9, 0.1, 0.2]), np.array([True, False, False]), resamples=200
    )
    assert lo == hi == 1.0


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        # p = k/n, z = 1.96: centre (p + z²/2n)/(1 + z²/n) ± z sqrt(p(1-p)/n + z²/4n²)/(1 + z²/n)
        (8, 10, 0.4902, 0.9433),
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (45, 50, 0.7864, 0.9565),
    ],
)
def test_wilson_interval_by_hand(k: int, n: int, lo: float, hi: float) -> None:
    got = stats.wilson(k, n)
    assert got is not None
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_of_nothing_is_none() -> None:
    assert stats.wilson(0, 0) is None
    with pytest.raises(ValueError):
        stats.wilson(3, 2)


def test_predictive_values_at_a_prevalence_by_hand() -> None:
    # sens .9, spec .8, prevalence .1: PPV = .09/(.09+.18); NPV = .72/(.72+.01)
    ppv, npv = stats.predictive_values(0.9, 0.8, 0.1)
    assert ppv == pytest.approx(1 / 3)
    assert npv == pytest.approx(0.72 / 0.73)
    assert stats.predictive_values(0.0, 1.0, 0.1)[0] is None  # nothing flagged


def test_predictive_values_at_the_sample_prevalence_equal_the_counts() -> None:
    scores, truth = _sample(200, seed=5)
    at = stats.at_threshold(scores, truth, 0.6)
    sens, spec = at.sensitivity.value, at.specificity.value
    assert sens is not None and spec is not None
    ppv, npv = stats.predictive_values(sens, spec, float(truth.mean()))
    assert ppv == pytest.approx(at.ppv.value)
    assert npv == pytest.approx(at.npv.value)
    ppv_ci, npv_ci = stats.predictive_values_ci(at.sensitivity, at.specificity, 0.05)
    point = stats.predictive_values(sens, spec, 0.05)
    assert ppv_ci is not None and npv_ci is not None
    assert ppv_ci[0] <= point[0] <= ppv_ci[1]  # type: ignore[operator]
    assert npv_ci[0] <= point[1] <= npv_ci[1]  # type: ignore[operator]


def test_confusion_counts_flag_at_or_above_the_threshold() -> None:
    at = stats.at_threshold(np.array([0.5, 0.49, 0.7, 0.2]), np.array([1, 1, 0, 0]), 0.5)
    assert (at.tp, at.fn, at.fp, at.tn) == (1, 1, 1, 1)
    assert at.sensitivity.as_json() == {"value": 0.5, "k": 1, "n": 2, "ci95": [*stats.wilson(1, 2)]}  # type: ignore[misc]


@pytest.mark.parametrize("target", [0.90, 0.95, 0.98])
def test_operating_points_give_the_claimed_sensitivity(target: float) -> None:
    scores, truth = _sample(500, seed=6)
    threshold = stats.operating_point(scores, truth, target)
    assert stats.at_threshold(scores, truth, threshold).sensitivity.value >= target  # type: ignore[operator]
    # the highest such threshold, on the 4-decimal grid
    above = stats.at_threshold(scores, truth, threshold + 1e-4).sensitivity.value
    assert above is not None
    assert above < target or threshold + 1e-4 > scores[truth].min()


def test_roc_curve_area_is_the_auroc() -> None:
    scores, truth = _sample(200, seed=8)
    fpr, tpr = stats.roc_curve(scores, truth)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert float(np.trapezoid(tpr, fpr)) == pytest.approx(stats.auroc(scores, truth))


def test_calibration_bins_cover_every_study() -> None:
    scores, truth = _sample(100, seed=9)
    bins = stats.calibration(scores, truth)
    assert sum(n for _, _, n in bins) == 100
    assert all(0 <= rate <= 1 for _, rate, _ in bins)


@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from("abc")), min_size=1))
@settings(max_examples=100, deadline=None)
def test_kappa_equals_scikit_learn(pairs: list[tuple[str, str]]) -> None:
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    ours = stats.cohen_kappa(a, b)
    if len(set(a) | set(b)) == 1:
        assert ours == 1.0
        return
    expected = cohen_kappa_score(a, b)
    if np.isnan(expected):
        return
    assert ours == pytest.approx(expected, abs=1e-12)


def test_kappa_by_hand() -> None:
    # 10 items, agree on 7; marginals a: 5 x, 5 y; b: 6 x, 4 y; pe = .5*.6 + .5*.4 = .5
    a = list("xxxxxyyyyy")
    b = list("xxxxyxxyyy")
    assert stats.cohen_kappa(a, b) == pytest.approx((0.7 - 0.5) / 0.5)
    assert stats.cohen_kappa([], []) is None


def test_histogram_counts_every_score_in_its_bin() -> None:
    """Bins closed on the right, as the agent's tallies and Prometheus' ``le``: 0.05 is in
    the first bin, 0.051 in the second, 0.15 in the third, 0.29 in the sixth (though
    0.29 * 100 is 28.999999999999996 in floating point)."""
    scores = np.array([0.0, 0.04, 0.05, 0.051, 0.15, 0.29, 0.99, 1.0])
    assert stats.histogram(scores, bins=20) == [3, 1, 1, 0, 0, 1, *([0] * 13), 2]


def test_psi_by_hand() -> None:
    # shares (.5, .5) -> (.25, .75): (.25-.5) ln(.5) + (.75-.5) ln(1.5)
    expected = -0.25 * np.log(0.5) + 0.25 * np.log(1.5)
    assert stats.psi([50, 50], [25, 75]) == pytest.approx(expected)
    assert stats.psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0)
    assert stats.psi([10, 0], [5, 5]) > 1  # an emptied bin filled: large but finite
    with pytest.raises(ValueError):
        stats.psi([0, 0], [1, 1])


def test_sparse_bins_are_merged_until_each_holds_five_percent() -> None:
    base, cur = stats.merge_sparse_bins([88, 1, 1, 1, 1, 1, 5, 2], [80, 0, 0, 0, 5, 5, 4, 6])
    assert (base, cur) == ([88, 5, 7], [80, 10, 10])  # the short last bin joins the one before
    assert sum(base) == 100 and sum(cur) == 100


def test_two_proportion_p_value_by_hand() -> None:
    # 50/100 vs 30/100: pooled .4, se sqrt(.4 * .6 * .02) = .069282, z = 2.8868, p = .00389
    assert stats.two_proportion_p_value(50, 100, 30, 100) == pytest.approx(0.00389, abs=1e-5)
    assert stats.two_proportion_p_value(0, 0, 3, 10) == 1.0


def test_psi_p_value_is_large_for_one_distribution_and_tiny_for_a_shift() -> None:
    rng = np.random.default_rng(0)
    a = stats.histogram(rng.beta(2, 5, 400), bins=10)
    b = stats.histogram(rng.beta(2, 5, 400), bins=10)
    c = stats.histogram(rng.beta(5, 2, 400), bins=10)
    assert stats.psi_p_value(stats.psi(a, b), a, b) > 0.01
    assert stats.psi_p_value(stats.psi(a, c), a, c) < 1e-6
