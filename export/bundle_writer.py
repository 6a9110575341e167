"""Write an engine bundle: the encoder's files, the manifest, verified, moved into place whole.

The bundle is assembled in a temporary folder beside its destination, checked with the
daemon's own :func:`edge_agent.bundle.load_bundle`, and only then renamed into place, so a
reader never sees a half-written bundle and a failed export leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from edge_agent import __version__
from edge_agent.bundle import (
    MANIFEST,
    Bundle,
    CTInput,
    Encoder,
    Finding,
    Head,
    Manifest,
    ModelInfo,
    Preprocessing,
    file_entries,
    invalid,
    load_bundle,
    write_manifest,
)
from edge_agent.errors import BundleError

from .onnx_export import INPUT_NAME, OUTPUT_NAME, _import_onnx, onnx_files

logger = logging.getLogger(__name__)

CREATED_BY = f"edge-export {__version__}"


def _encoder_signature(onnx_path: Path) -> tuple[list[int | str], list[int | str]]:
    """Input and output shapes of the encoder graph (symbolic dims as their names)."""
    onnx = _import_onnx()
    model = onnx.load(str(onnx_path), load_external_data=False)

    def shape(values: Iterable[object], name: str) -> list[int | str]:
        for value in values:
            if value.name == name:  # type: ignore[attr-defined]
                dims = value.type.tensor_type.shape.dim  # type: ignore[attr-defined]
                return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
        raise BundleError(f"encoder {onnx_path.name} has no tensor named {name!r}")

    return shape(model.graph.input, INPUT_NAME), shape(model.graph.output, OUTPUT_NAME)


def _place(src: Path, dst: Path, *, move: bool) -> None:
    if move:
        shutil.move(src, dst)
    else:
        shutil.copy2(src, dst)


def _swap_into_place(staging: Path, out_dir: Path, *, overwrite: bool) -> None:
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file()):
        raise FileExistsError(f"{out_dir} exists and is not a bundle: refusing to replace it")
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, retired / out_dir.name)
    os.replace(staging, out_dir)
    shutil.rmtree(retired, ignore_errors=True)


def write_bundle(
    out_dir: Path | str,
    *,
    encoder_onnx: Path,
    model: ModelInfo,
    precision: Literal["fp32", "fp16", "int8"],
    preprocessing: Preprocessing,
    head: Head,
    findings: list[Finding],
    parity: Mapping[str, float | int | str | bool] | None = None,
    metrics: Mapping[str, float | int | str] | None = None,
    ct: CTInput | None = None,
    extra_files: Iterable[Path] = (),
    overwrite: bool = False,
    move: bool = False,
    created_by: str = CREATED_BY,
) -> Path:
    """Assemble, verify and atomically place a bundle at ``out_dir``; return its path.

    ``encoder_onnx`` keeps its file name in the bundle, and its external data files (if any)
    come along. ``extra_files`` (a NOTICE, a licence) are copied to the bundle's top level.
    ``move=True`` moves the files instead of copying them (for freshly exported temporaries).
    An existing ``out_dir`` is replaced only with ``overwrite=True`` and only if it holds a
    bundle (or nothing).
    """
    out_dir = Path(out_dir)
    encoder_onnx = Path(encoder_onnx)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    if not encoder_onnx.is_file():
        raise BundleError(f"encoder {encoder_onnx} does not exist")

    inputs, outputs = _encoder_signature(encoder_onnx)
    n = preprocessing.input_size
    if inputs[1:] != [3, n, n]:
        raise BundleError(
            f"encoder {encoder_onnx.name} takes {INPUT_NAME} {inputs}, "
            f"but preprocessing.input_size is {n}"
        )
    if len(outputs) != 2 or not isinstance(outputs[1], int) or outputs[1] <= 0:
        raise BundleError(f"encoder {encoder_onnx.name} gives {OUTPUT_NAME} {outputs}, not (B, D)")
    if isinstance(inputs[0], int) or isinstance(outputs[0], int):
        logger.warning("encoder %s has a fixed batch size", encoder_onnx.name)

    encoder_names = onnx_files(encoder_onnx)
    extra = [Path(p) for p in extra_files]
    names = [*encoder_names, *(p.name for p in extra)]
    if len(set(names)) != len(names) or MANIFEST in names:
        raise BundleError(f"bundle file names collide: {names}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for name in encoder_names:
            _place(encoder_onnx.parent / name, staging / name, move=move)
        for path in extra:
            shutil.copy2(path, staging / path.name)
        try:
            manifest = Manifest(
                model=model,
                created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                created_by=created_by,
                precision=precision,
                encoder=Encoder(
                    file=encoder_names[0],
                    input_name=INPUT_NAME,
                    output_name=OUTPUT_NAME,
                    embedding_dim=outputs[1],
                    preprocessing=preprocessing,
                ),
                head=head,
                findings=findings,
                parity=dict(parity) if parity is not None else None,
                metrics=dict(metrics) if metrics is not None else None,
                ct=ct,
                files=file_entries(staging, names),
            )
        except ValidationError as exc:
            raise invalid(exc, f"bundle {out_dir}") from exc
        write_manifest(staging, manifest)
        # The daemon's own check, before anyone can see the bundle. The rename below moves
        # the verified files as they are, so they are not hashed again afterwards.
        bundle = load_bundle(staging)
        staging.chmod(0o755)  # mkdtemp makes it 0700
        _swap_into_place(staging, out_dir, overwrite=overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    size = sum(e.size for e in bundle.manifest.files.values())
    logger.info(
        "bundle %s written and verified (%s, %.1f MB, model sha256 %s)",
        out_dir,
        ", ".join(bundle.manifest.files),
        size / 1e6,
        bundle.sha256[:12],
    )
    return out_dir


def revise_bundle(
    source: Bundle,
    out_dir: Path | str,
    *,
    version: str,
    model_source: str | None = None,
    head: Head | None = None,
    findings: list[Finding] | None = None,
    preprocessing: Preprocessing | None = None,
    ct: CTInput | None = None,
    metrics: Mapping[str, float | int | str] | None = None,
    overwrite: bool = False,
) -> Path:
    """A new revision of ``source`` at ``out_dir`` (``edge-export probe``, ``evaluate
    --write-bundle``): what is given replaces the source's; the encoder, its precision and
    parity, the model's name, demo flag and NOTICE, and what is not given come from the
    source. The source is never touched. Device engines and the narrative report section
    are not carried over (both are built for one model file): each is said in the log with
    the command that adds it again."""
    spec = source.manifest
    if spec.engines:
        logger.warning(
            "source device engines are not carried over (%s): rebuild them with "
            "edge-export tensorrt",
            ", ".join(spec.engines),
        )
    if spec.report is not None:
        logger.warning(
            "the source's narrative report section is not carried over: add it again with "
            "edge-export add-report"
        )
    notice = spec.model.notice
    return write_bundle(
        out_dir,
        encoder_onnx=source.encoder_path,
        model=ModelInfo(
            name=spec.model.name,
            version=version,
            source=spec.model.source if model_source is None else model_source,
            demo=spec.model.demo,
            notice=Path(notice).name if notice else None,
        ),
        precision=spec.precision,
        preprocessing=spec.encoder.preprocessing if preprocessing is None else preprocessing,
        ct=spec.ct if ct is None else ct,
        head=spec.head if head is None else head,
        findings=spec.findings if findings is None else findings,
        parity=spec.parity,
        metrics=spec.metrics if metrics is None else metrics,
        extra_files=[source.root / notice] if notice else [],
        overwrite=overwrite,
    )
