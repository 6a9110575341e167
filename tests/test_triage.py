"""Scores to triage levels, and the result payload contract."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_agent.results import SCHEMA_FILE, FindingResult, alert_id, json_schema_text
from edge_agent.triage import sigmoid, triage_level


def finding(score: float, review: float = 0.5, urgent: float | None = 0.8) -> FindingResult:
    return FindingResult(
        code="x",
        label="X",
        score=score,
        urgent_threshold=urgent,
        review_threshold=review,
        flagged=score >= review,
    )


@pytest.mark.parametrize(
    ("findings", "level"),
    [
        ([finding(0.1), finding(0.2)], "routine"),
        ([finding(0.6), finding(0.1)], "review"),
        ([finding(0.1), finding(0.8)], "urgent"),
        ([finding(0.95, urgent=None)], "review"),  # a review-only finding never makes urgent
        ([finding(0.5)], "review"),  # thresholds are inclusive
    ],
)
def test_triage_level(findings: list[FindingResult], level: str) -> None:
    assert triage_level(findings) == level


def test_sigmoid_is_stable_at_extremes() -> None:
    x = np.array([-1000.0, -10.0, 0.0, 10.0, 1000.0])
    y = sigmoid(x)
    assert np.all(np.isfinite(y))
    assert y[0] == 0.0 and y[2] == 0.5 and y[4] == 1.0
    assert y[1] == pytest.approx(1 / (1 + np.exp(10)))


def test_alert_id_is_stable_and_distinct() -> None:
    a = alert_id("1.2.3", 1, "ab" * 32)
    assert a == alert_id("1.2.3", 1, "ab" * 32)
    assert a != alert_id("1.2.3", 2, "ab" * 32)
    assert a != alert_id("1.2.3", 1, "cd" * 32)


def test_shipped_schema_matches_the_model() -> None:
    """The JSON Schema file receivers validate against is generated from the model."""
    assert SCHEMA_FILE.read_text() == json_schema_text(), "run: edge-agent schema --out " + str(
        SCHEMA_FILE
    )
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema["$id"] == "edge-triage.study-result.v1"
    for field in (
        "schema",
        "alert_id",
        "revision",
        "study_instance_uid",
        "accession_number",
        "modality",
        "triage",
        "reason",
        "findings",
        "model",
        "instances",
        "timing",
    ):
        assert field in schema["properties"]
        assert field in schema["required"]
