"""From embeddings to scores to a triage level.

A study is ``urgent`` when any finding that can be urgent scores at or above its urgent
threshold, ``review`` when any finding scores at or above its review threshold, else
``routine``. ``not_scored`` is decided before scoring (no usable image).
"""

from __future__ import annotations

import numpy as np

from .bundle import Bundle, Finding
from .results import FindingResult, TriageLevel


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

    def study_findings(self, image_scores: np.ndarray) -> list[FindingResult]:
        """Aggregate per-image scores (max over the study's images) into finding results."""
        study = [round(float(s), 6) for s in image_scores.max(axis=0)]
        return [
            FindingResult(
                code=f.code,
                label=f.label,
                score=s,
                urgent_threshold=f.urgent_threshold,
                review_threshold=f.review_threshold,
                flagged=s >= f.review_threshold,
            )
            for f, s in zip(self.findings, study, strict=True)
        ]


def triage_level(findings: list[FindingResult]) -> TriageLevel:
    if any(f.urgent_threshold is not None and f.score >= f.urgent_threshold for f in findings):
        return "urgent"
    if any(f.flagged for f in findings):
        return "review"
    return "routine"
