"""The score bins every score distribution of the project is counted in: the agent's daily
tallies (:mod:`edge_agent.state.tallies`), the score buckets of ``/metrics``, and the
histograms of ``edge-export evaluate``'s report that ``--drift`` compares them with.

:data:`FINE_BINS` equal-width *fine* bins of 0.01, closed on the right as Prometheus'
``le`` buckets are: bin i holds the scores in (i/100, (i+1)/100], the first one also 0, so a
score on an edge is in the bin that edge closes (a review threshold of 0.3 and a score of
0.3 are on the same side of the edge as ``le="0.3"`` says). ``s * 100`` is rounded to 6
places first: 0.29 * 100 is 28.999999999999996 in floating point, and a score is never
finer than 1e-6 (results round scores to 6 places). A coarser histogram (the report's
:data:`REPORT_BINS` bins of 0.05) is made by adding consecutive fine bins
(:func:`coarsen`), never by counting the scores again, so a score is in the same coarse bin
whether the agent counted it or the report did. (Reports written before this module
closed their bins on the left: a score exactly on a 0.05 edge sat one bin higher there.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

FINE_BINS = 100
"""Equal-width bins on [0, 1] the agent counts scores in (0.01 wide: a median to 0.01)."""

REPORT_BINS = 20
"""Bins of the report's ``score_histogram`` and of ``/metrics``' score buckets (0.05 wide;
a divisor of FINE_BINS)."""


def fine_bin(score: float) -> int:
    """The fine bin of ``score`` (clamped to [0, 1]; raises ValueError for NaN)."""
    if math.isnan(score):
        raise ValueError("a score is a number in [0, 1], not NaN")
    return min(max(math.ceil(round(score * FINE_BINS, 6)) - 1, 0), FINE_BINS - 1)


def fine_histogram(scores: Iterable[float]) -> list[int]:
    """How many of ``scores`` fall in each fine bin."""
    counts = [0] * FINE_BINS
    for score in scores:
        counts[fine_bin(float(score))] += 1
    return counts


def coarsen(fine: Sequence[int], bins: int) -> list[int]:
    """A fine histogram as ``bins`` equal-width bins (``bins`` divides FINE_BINS)."""
    if len(fine) != FINE_BINS:
        raise ValueError(f"a fine histogram has {FINE_BINS} bins, not {len(fine)}")
    if bins < 1 or FINE_BINS % bins:
        raise ValueError(f"{bins} bins cannot be made of {FINE_BINS} fine bins (not a divisor)")
    width = FINE_BINS // bins
    return [sum(fine[i : i + width]) for i in range(0, FINE_BINS, width)]


def upper_edges(bins: int) -> list[float]:
    """The upper edge of each of ``bins`` equal-width bins on [0, 1] (the last is 1.0)."""
    return [round((i + 1) / bins, 10) for i in range(bins)]


def quantile(fine: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile of the scores a fine histogram counts: where the count reaches
    ``q`` of the total, interpolated linearly inside that bin (the median of an even count
    lies between the two middle scores, within a bin of them); None for an empty one."""
    total = sum(fine)
    if total == 0:
        return None
    target = q * total
    seen = 0
    for i, n in enumerate(fine):
        if n and seen + n >= target:
            return round((i + (target - seen) / n) / FINE_BINS, 4)
        seen += n
    return 1.0
