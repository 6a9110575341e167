"""The parity gate: does a lower-precision encoder still give the fp32 model's answers?

Compared on the same images: the embeddings (cosine), the per-finding scores after the
bundle's head, and the triage level each image would get on its own (the daemon's own
:func:`edge_agent.triage.triage_level` over the findings' thresholds). The figures go into
the manifest; below the bar the export refuses to write the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_agent.bundle import Finding
from edge_agent.errors import EdgeTriageError
from edge_agent.results import FindingResult
from edge_agent.triage import sigmoid, triage_level

from .onnx_export import cosines


class ParityFailed(EdgeTriageError):
    """The candidate encoder does not reproduce the reference closely enough."""

    exit_code = 1


@dataclass(frozen=True)
class ParityBar:
    cosine_mean: float = 0.99
    triage_agreement: float = 0.98


@dataclass(frozen=True)
class Parity:
    images: int
    cosine_min: float
    cosine_mean: float
    max_score_delta: float
    triage_agreement: float
    disagreements: int

    def figures(self) -> dict[str, float | int]:
        return {
            "images": self.images,
            "cosine_min": round(self.cosine_min, 6),
            "cosine_mean": round(self.cosine_mean, 6),
            "max_score_delta": round(self.max_score_delta, 6),
            "triage_agreement": round(self.triage_agreement, 6),
        }

    def failures(self, bar: ParityBar) -> list[str]:
        """Why this does not pass ``bar`` (empty when it does). NaN fails every test."""
        why = []
        if not self.cosine_mean >= bar.cosine_mean:
            why.append(f"mean cosine {self.cosine_mean:.5f} < {bar.cosine_mean}")
        if not self.triage_agreement >= bar.triage_agreement:
            why.append(
                f"triage agreement {self.triage_agreement:.4f} < {bar.triage_agreement} "
                f"({self.disagreements} of {self.images} images change level)"
            )
        return why


def levels(scores: np.ndarray, findings: list[Finding]) -> list[str]:
    """The triage level each row of (N, F) ``scores`` gives on its own."""
    out: list[str] = []
    for row in scores:
        results = [
            FindingResult(
                code=f.code,
                label=f.label,
                score=float(s),
                urgent_threshold=f.urgent_threshold,
                review_threshold=f.review_threshold,
                flagged=bool(s >= f.review_threshold),
            )
            for f, s in zip(findings, row, strict=True)
        ]
        out.append(triage_level(results))
    return out


def compare(
    reference: np.ndarray,
    candidate: np.ndarray,
    weights: np.ndarray,
    biases: np.ndarray,
    findings: list[Finding],
) -> Parity:
    """Parity of ``candidate`` (N, D) embeddings against ``reference`` under the head (W, b)."""
    if reference.shape != candidate.shape or len(reference) == 0:
        raise ValueError(f"cannot compare {candidate.shape} with {reference.shape}")
    ref = reference.astype(np.float64)
    got = candidate.astype(np.float64)
    cos = cosines(ref, got)
    cos = np.where(np.isfinite(cos), cos, -1.0)  # NaN/inf output is as wrong as it gets
    w = weights.astype(np.float64).T
    ref_scores = sigmoid(ref @ w + biases)
    got_scores = sigmoid(np.nan_to_num(got, nan=0.0) @ w + biases)
    got_scores = np.where(np.isfinite(got).all(-1, keepdims=True), got_scores, np.nan)
    delta = np.nan_to_num(np.abs(got_scores - ref_scores), nan=1.0)
    ref_levels = levels(ref_scores, findings)
    got_levels = [
        "invalid" if np.isnan(row).any() else level
        for row, level in zip(got_scores, levels(np.nan_to_num(got_scores), findings), strict=True)
    ]
    agree = sum(a == b for a, b in zip(ref_levels, got_levels, strict=True))
    return Parity(
        images=len(ref),
        cosine_min=float(cos.min()),
        cosine_mean=float(cos.mean()),
        max_score_delta=float(delta.max()),
        triage_agreement=agree / len(ref),
        disagreements=len(ref) - agree,
    )
