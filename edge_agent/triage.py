"""From embeddings to scores to a triage level.

A study is ``urgent`` when any finding that can be urgent scores at or above its urgent
threshold, ``review`` when any finding scores at or above its review threshold, else
``routine``. ``not_scored`` is decided before scoring (no usable image).
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from .bundle import RADIOGRAPH_MODALITIES, Bundle, Finding
from .results import FindingResult, SlabRef, TriageLevel, reaches


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, stable for large |x|."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class Head:
    """The bundle's head as arrays: scores = sigmoid(embeddings @ W.T + b)."""

    def __init__(self, bundle: Bundle) -> None:
        self.findings: list[Finding] = list(bundle.manifest.findings)
        self.weights, self.biases = bundle.head_arrays()

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """(B, D) embeddings -> (B, F) scores in [0, 1]."""
        logits = embeddings.astype(np.float64) @ self.weights.T.astype(np.float64) + self.biases
        return sigmoid(logits)

    def columns(self, modalities: Collection[str]) -> list[int]:
        """Indices of the findings built for any of ``modalities`` (score columns)."""
        return [j for j, f in enumerate(self.findings) if set(f.modalities) & set(modalities)]

    def study_findings(
        self, image_scores: np.ndarray, modalities: Collection[str] = RADIOGRAPH_MODALITIES
    ) -> list[FindingResult]:
        """Aggregate per-image scores (max over the study's images) into results for the
        findings built for ``modalities`` (radiographs by default)."""
        columns = self.columns(modalities)
        study = image_scores[:, columns].max(axis=0)
        return [
            finding_result(self.findings[j], float(s)) for j, s in zip(columns, study, strict=True)
        ]


def finding_result(finding: Finding, score: float, slab: SlabRef | None = None) -> FindingResult:
    """A finding's study score (rounded to 6 places) against its thresholds."""
    s = round(score, 6)
    return FindingResult(
        code=finding.code,
        label=finding.label,
        score=s,
        urgent_threshold=finding.urgent_threshold,
        review_threshold=finding.review_threshold,
        flagged=reaches(s, finding.review_threshold),
        slab=slab,
    )


def triage_level(findings: list[FindingResult]) -> TriageLevel:
    if any(reaches(f.score, f.urgent_threshold) for f in findings):
        return "urgent"
    if any(f.flagged for f in findings):
        return "review"
    return "routine"
