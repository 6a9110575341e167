"""A revision of an existing bundle with some of its manifest changed, written the way
``edge-export probe`` and ``evaluate --write-bundle`` write theirs (a new folder through
:func:`export.bundle_writer.write_bundle`, the source never touched): a second bundle that
disagrees with the first in a known way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_agent.bundle import LinearProbeHead, ModelInfo, load_bundle


def revise_bundle(source: Path, out: Path, *, version: str, **changes: Any) -> Path:
    """Write ``source`` again at ``out`` with model version ``version`` and any of the
    manifest's ``head``, ``findings``, ``preprocessing`` and ``ct`` replaced by ``changes``."""
    from export.bundle_writer import write_bundle  # the export extra

    unknown = set(changes) - {"head", "findings", "preprocessing", "ct"}
    if unknown:
        raise TypeError(f"cannot change {sorted(unknown)}")
    bundle = load_bundle(source)
    spec = bundle.manifest
    return write_bundle(
        out,
        encoder_onnx=bundle.encoder_path,
        model=ModelInfo(
            name=spec.model.name,
            version=version,
            source=f"revised by tests from {spec.model.name} {spec.model.version}",
            demo=spec.model.demo,
        ),
        precision=spec.precision,
        preprocessing=changes.get("preprocessing", spec.encoder.preprocessing),
        ct=changes.get("ct", spec.ct),
        head=changes.get("head", spec.head),
        findings=changes.get("findings", spec.findings),
        parity=spec.parity,
        metrics=spec.metrics,
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
