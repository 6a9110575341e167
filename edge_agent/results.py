"""The study result: the payload dashboards and worklists consume (schema v1).

The pydantic model is the single source of truth; the JSON Schema shipped in
``edge_agent/schemas/study-result.v1.json`` is generated from it (``edge-agent schema``) and a
test keeps the two identical. Every payload is validated by constructing this model before it
is written to the outbox (strict writer).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_ID = "edge-triage.study-result.v1"
SCHEMA_FILE = Path(__file__).parent / "schemas" / "study-result.v1.json"

TriageLevel = Literal["urgent", "review", "routine", "not_scored"]


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SlabRef(_Payload):
    """The CT slab whose score drove a CT finding's study score (its highest-scoring slab)."""

    series_instance_uid: str = Field(description="The axial series that was scored.")
    index: int = Field(ge=0, description="Slab number, 0 at the series' lowest position.")
    count: int = Field(ge=1, description="Slabs the series was cut into.")
    position_mm: tuple[float, float] = Field(
        description="Where the slab starts and ends along the slice normal (mm, the "
        "ImagePositionPatient projection; for axial head-first series the z coordinate)."
    )
    first_sop_instance_uid: str = Field(description="First slice in the slab.")
    last_sop_instance_uid: str = Field(description="Last slice in the slab.")
    score: float = Field(ge=0.0, le=1.0, description="The finding's score on this slab.")


class FindingResult(_Payload):
    code: str = Field(description="Finding code from the bundle, e.g. 'pneumothorax'.")
    label: str = Field(description="Human-readable finding name.")
    score: float = Field(ge=0.0, le=1.0, description="Model score in [0, 1].")
    urgent_threshold: float | None = Field(
        description="Score at or above which the study is urgent; null: never urgent."
    )
    review_threshold: float = Field(description="Score at or above which the study needs review.")
    flagged: bool = Field(description="score >= review_threshold.")
    slab: SlabRef | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="CT findings only (absent otherwise): the slab and series that drove the "
        "score. Added in schema v1 as an optional field.",
    )


class ModelRef(_Payload):
    name: str
    version: str
    sha256: str = Field(description="Identity of encoder weights, head and thresholds.")
    precision: str
    provider: str = Field(description="Execution provider that computed the scores.")
    demo: bool = Field(description="True when the model is a demo model, not for clinical use.")


class InstanceCounts(_Payload):
    received: int = Field(ge=0, description="Instances received for this study so far.")
    scored: int = Field(ge=0, description="Instances whose images were scored.")
    rejected: int = Field(ge=0, description="Instances that could not be used.")


class Timing(_Payload):
    first_instance_at: str = Field(description="UTC ISO 8601: first instance read.")
    complete_at: str = Field(description="UTC ISO 8601: quiet period over, study complete.")
    scored_at: str = Field(description="UTC ISO 8601: scores computed.")
    published_at: str = Field(
        description=(
            "UTC ISO 8601: result committed to the durable outbox for publication. Re-deliveries "
            "carry the same payload byte for byte."
        )
    )
    inference_ms: float = Field(ge=0, description="Encoder time for this study, milliseconds.")


class StudyResult(_Payload):
    schema_: Literal["edge-triage.study-result.v1"] = Field(
        default="edge-triage.study-result.v1",
        alias="schema",
        description="Payload schema identifier.",
    )
    alert_id: str = Field(
        description="Stable for (StudyInstanceUID, revision, model sha256): dedup on it."
    )
    revision: int = Field(ge=1, description="1, 2, ... when late instances re-open a study.")
    notify_count: int = Field(
        default=1,
        ge=1,
        description="1 on the first publication; 2, 3, ... when an unacknowledged urgent result "
        "is published again (same alert_id, otherwise the same content). Added in schema v1 as "
        "an optional field: absent means 1.",
    )
    study_instance_uid: str
    accession_number: str | None = Field(
        description="Null unless the site's PHI policy allows publishing it."
    )
    modality: str
    triage: TriageLevel
    reason: str | None = Field(description="Why not_scored, else null.")
    findings: list[FindingResult]
    model: ModelRef
    instances: InstanceCounts
    timing: Timing

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        json_schema_serialization_defaults_required=True,
    )

    def to_json_bytes(self) -> bytes:
        return json.dumps(
            self.model_dump(mode="json", by_alias=True), separators=(",", ":")
        ).encode()

    def renotification(self, notify_count: int) -> StudyResult:
        """The same result, published again as notification number ``notify_count``."""
        return StudyResult.model_validate(
            {**self.model_dump(by_alias=True), "notify_count": notify_count}
        )


# Fields added to v1 after its first release: always written, but optional for receivers
# (payloads from earlier agents lack them).
_ADDED_IN_V1 = ("notify_count",)


def alert_id(study_instance_uid: str, revision: int, model_sha256: str) -> str:
    """Deterministic: the same study, revision and model always give the same id."""
    digest = hashlib.sha256(f"{study_instance_uid}|{revision}|{model_sha256}".encode()).hexdigest()
    return digest[:32]


def json_schema() -> dict:
    schema = StudyResult.model_json_schema(by_alias=True, mode="serialization")
    schema["required"] = [k for k in schema["required"] if k not in _ADDED_IN_V1]
    schema["$id"] = SCHEMA_ID
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


class RejectedFile(_Payload):
    """Payload on P/rejected: one input file that could not be used."""

    path: str = Field(
        description="Path relative to watch_dir, or received/<study>/<sop>.dcm for an "
        "instance received over C-STORE."
    )
    sop_instance_uid: str | None = Field(default=None)
    reason: str = Field(description="Why the file could not be used; never holds PHI.")

    def to_json_bytes(self) -> bytes:
        return json.dumps(
            self.model_dump(mode="json", exclude_none=True), separators=(",", ":")
        ).encode()


def iso(ts: float) -> str:
    """UTC ISO 8601 with milliseconds, e.g. 2026-11-29T16:21:46.123Z."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
