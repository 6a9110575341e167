"""A revision of an existing bundle with some of its manifest changed, written the way
``edge-export probe`` and ``evaluate --write-bundle`` write theirs
(:func:`export.bundle_writer.revise_bundle`, the source never touched): a second bundle that
disagrees with the first in a known way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_agent.bundle import LinearProbeHead, load_bundle


def revise_bundle(source: Path, out: Path, *, version: str, **changes: Any) -> Path:
    """Write ``source`` again at ``out`` with model version ``version`` and any of the
    manifest's ``head``, ``findings``, ``preprocessing`` and ``ct`` replaced by ``changes``."""
    from export.bundle_writer import revise_bundle as write_revision  # the export extra

    unknown = set(changes) - {"head", "findings", "preprocessing", "ct"}
    if unknown:
        raise TypeError(f"cannot change {sorted(unknown)}")
    spec = load_bundle(source).manifest
    return write_revision(
        load_bundle(source),
        out,
        version=version,
        model_source=f"revised by tests from {spec.model.name} {spec.model.version}",
        **changes,
    )


def shifted_biases(source: Path, shifts: dict[str, float]) -> LinearProbeHead:
    """``source``'s linear-probe head with each finding's bias moved by ``shifts[code]``:
    every image's logit for that finding moves by exactly that much, so does a study's (the
    maximum over its images)."""
    head = load_bundle(source).manifest.head
    if not isinstance(head, LinearProbeHead):
        raise TypeError(f"{source} has a {head.kind} head, not a linear probe")
    biases = {code: b + shifts.get(code, 0.0) for code, b in head.biases.items()}
    return head.model_copy(update={"biases": biases})
