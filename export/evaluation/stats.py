"""The statistics of ``edge-export evaluate``: one place for each figure the report shows.

Conventions shared with the daemon: a study is *flagged* for a finding when its score is at
or above the threshold (:func:`edge_agent.triage.finding_result`); a ``truth`` array is
boolean, one entry per study. Operating-point thresholds follow the rule the demo and the
probe use to choose a review threshold (:func:`export.demo.choose_thresholds`), so a
threshold the report claims is the one a new bundle revision would carry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_agent.histogram import REPORT_BINS, coarsen, fine_histogram

Z95 = 1.959963984540054
"""The standard normal's 97.5 % quantile: two-sided 95 % intervals."""


def _check(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truth, dtype=bool)
    if s.shape != t.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and truth {t.shape} must be 1-D of one length")
    return s, t


def _midranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties sharing their mean rank (works on 2-D rows)."""
    from scipy.stats import rankdata

    return np.asarray(rankdata(values, axis=-1), dtype=np.float64)


def auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney U statistic over n+ n-, ties count 1/2).

    Raises ValueError when ``truth`` holds only one class (the area is undefined).
    """
    s, t = _check(scores, truth)
    pos, neg = int(t.sum()), int((~t).sum())
    if pos == 0 or neg == 0:
        raise ValueError(f"AUROC needs positive and negative studies ({pos}+/{neg}-)")
    ranks = _midranks(s)
    return float((ranks[t].sum() - pos * (pos + 1) / 2) / (pos * neg))


def bootstrap_auroc(
    scores: np.ndarray,
    truth: np.ndarray,
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUROC, resampling studies with replacement.

    Resamples that draw a single class (no AUROC) are drawn again, so every interval rests
    on ``resamples`` areas; the same ``seed`` gives the same interval. Vectorised: one
    (resamples, n) rank matrix, a fraction of a second for 2,000 x 500.
    """
    s, t = _check(scores, truth)
    n = len(s)
    auroc(s, t)  # the same refusal for one class
    rng = np.random.default_rng(seed)
    areas: list[np.ndarray] = []
    need = resamples
    while need > 0:
        idx = rng.integers(0, n, size=(need, n))
        ts = t[idx]
        pos = ts.sum(axis=1)
        ok = (pos > 0) & (pos < n)
        idx, ts, pos = idx[ok], ts[ok], pos[ok]
        ranks = _midranks(s[idx])
        neg = n - pos
        area = ((ranks * ts).sum(axis=1) - pos * (pos + 1) / 2) / (pos * neg)
        areas.append(area)
        need -= len(area)
    all_areas = np.concatenate(areas)[:resamples]
    alpha = (1 - level) / 2
    lo, hi = np.quantile(all_areas, [alpha, 1 - alpha])
    return float(lo), float(hi)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of the proportion k/n (None when n is 0)."""
    if n == 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"{k} successes out of {n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Proportion:
    """k of n, the rate and its Wilson 95 % interval (None where n is 0)."""

    k: int
    n: int

    @property
    def value(self) -> float | None:
        return self.k / self.n if self.n else None

    @property
    def ci95(self) -> tuple[float, float] | None:
        return wilson(self.k, self.n)

    def as_json(self) -> dict[str, object]:
        ci = self.ci95
        return {"value": self.value, "k": self.k, "n": self.n, "ci95": list(ci) if ci else None}


@dataclass(frozen=True)
class AtThreshold:
    """Confusion counts of one finding at one threshold (flagged: score >= threshold)."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def sensitivity(self) -> Proportion:
        return Proportion(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> Proportion:
        return Proportion(self.tn, self.tn + self.fp)

    @property
    def ppv(self) -> Proportion:
        return Proportion(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> Proportion:
        return Proportion(self.tn, self.tn + self.fn)


def at_threshold(scores: np.ndarray, truth: np.ndarray, threshold: float) -> AtThreshold:
    s, t = _check(scores, truth)
    flagged = s >= threshold
    return AtThreshold(
        threshold=float(threshold),
        tp=int((flagged & t).sum()),
        fp=int((flagged & ~t).sum()),
        tn=int((~flagged & ~t).sum()),
        fn=int((~flagged & t).sum()),
    )


def predictive_values(
    sensitivity: float, specificity: float, prevalence: float
) -> tuple[float | None, float | None]:
    """(PPV, NPV) at a given prevalence by Bayes' rule (None where undefined: nothing
    flagged, or nothing left unflagged)."""
    if not 0.0 <= prevalence <= 1.0:
        raise ValueError(f"prevalence {prevalence} is not between 0 and 1")
    flagged = sensitivity * prevalence + (1 - specificity) * (1 - prevalence)
    unflagged = (1 - sensitivity) * prevalence + specificity * (1 - prevalence)
    ppv = sensitivity * prevalence / flagged if flagged > 0 else None
    npv = specificity * (1 - prevalence) / unflagged if unflagged > 0 else None
    return ppv, npv


def predictive_values_ci(
    sensitivity: Proportion, specificity: Proportion, prevalence: float
) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
    """95 % intervals of PPV and NPV at a given prevalence: PPV rises with sensitivity and
    specificity, NPV too, so the Wilson bounds of both, put through Bayes' rule, bound it
    (a conservative interval; the prevalence is taken as known)."""
    sci, pci = sensitivity.ci95, specificity.ci95
    if sci is None or pci is None:
        return None, None
    lo = predictive_values(sci[0], pci[0], prevalence)
    hi = predictive_values(sci[1], pci[1], prevalence)
    ppv = (lo[0], hi[0]) if lo[0] is not None and hi[0] is not None else None
    npv = (lo[1], hi[1]) if lo[1] is not None and hi[1] is not None else None
    return ppv, npv


def operating_point(scores: np.ndarray, truth: np.ndarray, target_sensitivity: float) -> float:
    """The highest threshold (4 decimals, rounded down) that flags at least
    ``target_sensitivity`` of the positives: the probe's and the demo's review rule."""
    from export.demo import choose_thresholds

    s, t = _check(scores, truth)
    review, _ = choose_thresholds(s, t, urgent=False, review_sensitivity=target_sensitivity)
    return review


def roc_curve(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0)
    to (1, 1)."""
    s, t = _check(scores, truth)
    thresholds = np.unique(s)[::-1]
    pos, neg = max(int(t.sum()), 1), max(int((~t).sum()), 1)
    tpr = [0.0] + [float((s[t] >= x).sum() / pos) for x in thresholds]
    fpr = [0.0] + [float((s[~t] >= x).sum() / neg) for x in thresholds]
    return np.asarray(fpr), np.asarray(tpr)


def calibration(
    scores: np.ndarray, truth: np.ndarray, bins: int = 10
) -> list[tuple[float, float, int]]:
    """(mean score, observed positive rate, studies) per equal-width score bin with studies."""
    s, t = _check(scores, truth)
    which = np.minimum((s * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        m = which == b
        if m.any():
            out.append((float(s[m].mean()), float(t[m].mean()), int(m.sum())))
    return out


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters' categories over the same items (None when there are no
    items; 1.0 when both put every item in one and the same category)."""
    if len(a) != len(b):
        raise ValueError("the two ratings must be of equal length")
    n = len(a)
    if n == 0:
        return None
    cats = sorted(set(a) | set(b))
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    expected = sum((list(a).count(c) / n) * (list(b).count(c) / n) for c in cats)
    if expected == 1.0:
        return 1.0
    return (observed - expected) / (1 - expected)


HISTOGRAM_BINS = REPORT_BINS
"""Equal-width score bins on [0, 1] of the report's score histograms (drift's baseline):
the agent's bins (:mod:`edge_agent.histogram`), so its tallies compare bin for bin."""


def histogram(scores: np.ndarray, bins: int = HISTOGRAM_BINS) -> list[int]:
    """Studies per equal-width score bin on [0, 1] (a score of 1 in the last bin), counted
    as the agent counts them: in its fine bins, added up (``bins`` divides FINE_BINS)."""
    return coarsen(fine_histogram(np.asarray(scores, dtype=np.float64).tolist()), bins)


PSI_FLOOR = 1e-4
"""Share given to an empty bin so that PSI stays finite (a common convention)."""


def psi(baseline: Sequence[int], current: Sequence[int]) -> float:
    """Population stability index of two histograms over the same bins:
    sum((c - b) * ln(c / b)) over the bins' shares, empty bins floored at PSI_FLOOR.
    Rules of thumb: < 0.1 stable, 0.1-0.25 some shift, > 0.25 a shift to act on."""
    b = np.asarray(baseline, dtype=np.float64)
    c = np.asarray(current, dtype=np.float64)
    if b.shape != c.shape or b.sum() == 0 or c.sum() == 0:
        raise ValueError("PSI needs two non-empty histograms over the same bins")
    pb = np.maximum(b / b.sum(), PSI_FLOOR)
    pc = np.maximum(c / c.sum(), PSI_FLOOR)
    return float(np.sum((pc - pb) * np.log(pc / pb)))


def psi_p_value(value: float, baseline: Sequence[int], current: Sequence[int]) -> float:
    """How likely a PSI this large is between two samples of one distribution: PSI is the
    symmetrised Kullback-Leibler divergence, and PSI / (1/n1 + 1/n2) is close to chi-square
    with (bins used - 1) degrees of freedom when nothing moved. Its expected value,
    (bins - 1)(1/n1 + 1/n2), is why a fixed PSI limit alone cries wolf on small samples."""
    from scipy.stats import chi2

    b, c = np.asarray(baseline), np.asarray(current)
    df = int(np.sum((b > 0) | (c > 0))) - 1
    if df < 1:
        return 1.0
    return float(chi2.sf(value / (1 / b.sum() + 1 / c.sum()), df))


def two_proportion_p_value(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p-value of the pooled two-proportion z-test (1.0 when undefined)."""
    from scipy.stats import norm

    if n1 == 0 or n2 == 0:
        return 1.0
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    return float(2 * norm.sf(abs(k1 / n1 - k2 / n2) / se))


def merge_sparse_bins(
    baseline: Sequence[int], current: Sequence[int], min_share: float = 0.05
) -> tuple[list[int], list[int]]:
    """Adjacent bins merged until each holds at least ``min_share`` of the baseline (and at
    least 5 studies): PSI over near-empty bins measures sampling noise, not drift."""
    b_total = sum(baseline)
    need = max(5.0, min_share * b_total)
    mb: list[int] = []
    mc: list[int] = []
    acc_b = acc_c = 0
    for x, y in zip(baseline, current, strict=True):
        acc_b += x
        acc_c += y
        if acc_b >= need:
            mb.append(acc_b)
            mc.append(acc_c)
            acc_b = acc_c = 0
    if acc_b or acc_c:
        if mb:
            mb[-1] += acc_b
            mc[-1] += acc_c
        else:
            mb, mc = [acc_b], [acc_c]
    return mb, mc
