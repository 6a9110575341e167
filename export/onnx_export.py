"""Image encoder → ONNX, shared by every model the export stage handles (demo and MedSigLIP).

The exported graph is what the daemon runs: ``pixel_values`` float32 (B, 3, N, N), already
preprocessed, → ``image_embeds`` float32 (B, D), L2-normalised. The batch axis is dynamic.

Models whose weights fit a protobuf (< 2 GiB) are written as one self-contained ``.onnx``
file; larger ones keep their weights in one ``<name>.onnx.data`` file beside it.
:func:`onnx_files` lists every file an exported model needs, for the bundle manifest.

torch, transformers and onnx are imported inside functions: this module is importable (and
``edge-export --help`` works) without the ``[export]`` extra.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeds"
# Protobuf refuses messages over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

Exporter = Literal["dynamo", "legacy"]


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_image_encoder` wrote and how well it matches PyTorch."""

    onnx_path: Path
    files: list[str] = field(default_factory=list)
    """Every file the model needs, relative to ``onnx_path.parent`` (the .onnx first)."""
    exporter: Exporter = "dynamo"
    opset: int = 18
    embedding_dim: int = 0
    seconds: float = 0.0
    max_abs_diff: float = float("nan")
    """Largest |onnx - torch| over a random batch of 2."""
    cosine_min: float = float("nan")
    """Smallest cosine between onnx and torch embeddings over that batch."""

    def parity(self) -> dict[str, float | int | str | bool]:
        """The figures as recorded in a bundle manifest's ``parity``."""
        return {
            "reference": "pytorch fp32",
            "exporter": f"torch.onnx {self.exporter}",
            "opset": self.opset,
            "batch": 2,
            "max_abs_diff": self.max_abs_diff,
            "cosine_min": self.cosine_min,
        }


def _import_torch() -> Any:
    from edge_agent.errors import ExtraMissing

    try:
        import torch
    except ImportError as exc:
        raise ExtraMissing("torch", "export") from exc
    return torch


def _import_onnx() -> Any:
    from edge_agent.errors import ExtraMissing

    try:
        import onnx
    except ImportError as exc:
        raise ExtraMissing("onnx", "export") from exc
    return onnx


def _import_ort() -> Any:
    from edge_agent.errors import ExtraMissing

    try:
        import onnxruntime
    except ImportError as exc:
        raise ExtraMissing("onnxruntime", "cpu") from exc
    return onnxruntime


def _embedding_module(vision_model: Any) -> torch.nn.Module:
    """``vision_model`` wrapped so that it maps pixel_values to normalised pooled embeddings."""
    th = _import_torch()
    import torch.nn.functional as F

    class ImageEncoder(th.nn.Module):  # type: ignore[name-defined]
        def __init__(self, vision: Any) -> None:
            super().__init__()
            self.vision = vision

        def forward(self, pixel_values: Any) -> Any:
            # transformers 5 returns an output object; pooler_output is the MAP-head embedding.
            pooled = self.vision(pixel_values=pixel_values).pooler_output
            return F.normalize(pooled, dim=-1)

    return ImageEncoder(vision_model)


def _vision_tower(model: Any) -> Any:
    """Accept a SiglipVisionModel, a SiglipVisionTransformer or a whole SiglipModel."""
    if hasattr(model, "text_model") and hasattr(model, "vision_model"):
        return model.vision_model
    return model


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity in float64 (NaN rows stay NaN)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(
            (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        )


def torch_embeddings(
    model: Any,
    pixels: np.ndarray,
    progress: Callable[[int, int], None] | None = None,
    *,
    batch: int = 1,
) -> np.ndarray:
    """PyTorch fp32 L2-normalised embeddings (what the exported graph computes) of
    ``pixels`` (N, 3, H, W), ``batch`` images at a time. ``model``: a SigLIP vision tower or a
    whole SiglipModel."""
    torch = _import_torch()
    module = _embedding_module(_vision_tower(model))
    out = []
    with torch.inference_mode():
        for i in range(0, len(pixels), batch):
            out.append(module(torch.from_numpy(pixels[i : i + batch])).numpy())
            if progress is not None:
                progress(min(i + batch, len(pixels)), len(pixels))
    return np.concatenate(out).astype(np.float32)


def onnx_files(onnx_path: Path) -> list[str]:
    """Every file an ONNX model needs (itself first, then its external data files), as names
    relative to its folder."""
    onnx = _import_onnx()
    model = onnx.load(str(onnx_path), load_external_data=False)
    external: set[str] = set()

    def visit(graph: Any) -> None:
        tensors = list(graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                tensors.extend([attr.t] if attr.HasField("t") else [])
                tensors.extend(attr.tensors)
                for sub in [attr.g] if attr.HasField("g") else []:
                    visit(sub)
                for sub in attr.graphs:
                    visit(sub)
        for tensor in tensors:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                external.update(e.value for e in tensor.external_data if e.key == "location")

    visit(model.graph)
    return [onnx_path.name, *sorted(external)]


def remove_onnx(onnx_path: Path) -> None:
    """Delete an ONNX model and its external data files, if it exists."""
    for name in onnx_files(onnx_path) if onnx_path.exists() else []:
        (onnx_path.parent / name).unlink(missing_ok=True)


def _param_bytes(module: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def _export(
    module: torch.nn.Module,
    example: torch.Tensor,
    out_path: Path,
    *,
    opset: int,
    exporter: Exporter,
    external: bool,
) -> None:
    torch = _import_torch()
    # torch's exporters warn about their own internals (FutureWarning, TracerWarning); the
    # parity check below is what tells whether the graph is right. Keep them in the debug log.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.onnx.export(
                module,
                (example,),
                str(out_path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"pixel_values": {0: batch}},
                opset_version=opset,
                dynamo=True,
                external_data=external,
                verbose=False,
            )
        else:
            torch.onnx.export(
                module,
                (example,),
                str(out_path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=min(opset, 17),
                dynamo=False,
            )
    for w in caught:
        logger.debug("torch.onnx (%s) warned: %s: %s", exporter, w.category.__name__, w.message)


def _normalise_layout(out_path: Path, *, external: bool) -> None:
    """Rewrite the model as one file, or as one file plus one ``.data`` file (the legacy
    exporter writes one file per tensor for big models)."""
    onnx = _import_onnx()
    before = onnx_files(out_path)
    wanted = [out_path.name, f"{out_path.name}.data"] if external else [out_path.name]
    if before == wanted or (not external and len(before) == 1):
        return
    model = onnx.load(str(out_path), load_external_data=True)
    if external:
        onnx.save_model(
            model,
            str(out_path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{out_path.name}.data",
        )
    else:
        onnx.save_model(model, str(out_path))
    for name in before[1:]:
        if name not in wanted:
            (out_path.parent / name).unlink(missing_ok=True)


def _strip_debug_metadata(onnx_path: Path) -> None:
    """Drop the exporter's per-node debug metadata: Python stack traces with the local paths
    of torch, transformers and this package, FX node dumps, class hierarchies. They made
    the encoder's bytes (and so the bundle's model sha256) depend on where the exporter was
    installed, and were a fifth of the demo encoder. External data files are left alone."""
    onnx = _import_onnx()
    model = onnx.load(str(onnx_path), load_external_data=False)

    def visit(nodes: Any) -> None:
        for node in nodes:
            del node.metadata_props[:]
            for attr in node.attribute:
                for graph in [attr.g] if attr.HasField("g") else []:
                    visit(graph.node)
                for graph in attr.graphs:
                    visit(graph.node)

    visit(model.graph.node)
    for function in model.functions:
        visit(function.node)
    onnx.save_model(model, str(onnx_path))


def check_parity(
    module: torch.nn.Module, onnx_path: Path, pixel_values: np.ndarray
) -> tuple[float, float]:
    """(max |onnx - torch|, min cosine) of the embeddings of ``pixel_values`` (B, 3, N, N)."""
    torch = _import_torch()
    ort = _import_ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(
        str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    got = session.run([OUTPUT_NAME], {INPUT_NAME: pixel_values.astype(np.float32)})[0]
    with torch.inference_mode():
        ref = module(torch.from_numpy(pixel_values.astype(np.float32))).numpy()
    if got.shape != ref.shape:
        raise RuntimeError(f"onnx output shape {got.shape} != torch output shape {ref.shape}")
    max_abs = float(np.abs(got - ref).max())
    return max_abs, float(cosines(got, ref).min())


def export_image_encoder(
    vision_model: Any,
    input_size: int,
    out_path: Path,
    *,
    opset: int = 18,
    exporter: Exporter | Literal["auto"] = "auto",
    seed: int = 0,
) -> ExportResult:
    """Export a SigLIP vision tower as ``pixel_values`` → L2-normalised ``image_embeds``.

    ``exporter="auto"`` uses ``torch.onnx.export(dynamo=True)`` and falls back to the legacy
    TorchScript exporter only if that fails. The result is checked with ONNX Runtime (CPU)
    against PyTorch on a random batch of 2; the figures are in the returned
    :class:`ExportResult`. Raises ``RuntimeError`` if the export does not match
    (cosine < 0.999).
    """
    torch = _import_torch()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tower = _vision_tower(vision_model)
    first = next(tower.parameters())
    if first.dtype != torch.float32 or first.device.type != "cpu":
        raise ValueError(
            f"export an fp32 model on the CPU (got {first.dtype} on {first.device}); "
            "lower precision is a later, separate step"
        )
    config = getattr(tower, "config", None)
    trained_size = getattr(config, "image_size", None)
    if trained_size is not None and trained_size != input_size:
        raise ValueError(f"input_size {input_size} != the model's image_size {trained_size}")

    module = _embedding_module(tower)
    was_training = tower.training
    module.eval()
    try:
        rng = np.random.default_rng(seed)
        sample = rng.uniform(-1.0, 1.0, size=(2, 3, input_size, input_size)).astype(np.float32)
        example = torch.from_numpy(sample)
        external = _param_bytes(module) > EXTERNAL_DATA_THRESHOLD
        remove_onnx(out_path)

        order: list[Exporter] = ["dynamo", "legacy"] if exporter == "auto" else [exporter]
        used: Exporter | None = None
        started = time.monotonic()
        for candidate in order:
            logger.info(
                "exporting image encoder with torch.onnx %s (opset %d, %s)…",
                candidate,
                opset if candidate == "dynamo" else min(opset, 17),
                "external data" if external else "single file",
            )
            t0 = time.monotonic()
            try:
                _export(
                    module, example, out_path, opset=opset, exporter=candidate, external=external
                )
            except Exception as exc:  # the exporters raise many unrelated types
                if candidate == order[-1]:
                    raise RuntimeError(f"ONNX export failed ({candidate}): {exc}") from exc
                logger.warning(
                    "torch.onnx %s export failed (%s: %s); falling back to the legacy exporter",
                    candidate,
                    type(exc).__name__,
                    exc,
                )
                continue
            logger.info("exported with %s in %.1f s", candidate, time.monotonic() - t0)
            used = candidate
            break
        assert used is not None
        seconds = time.monotonic() - started
        _normalise_layout(out_path, external=external)
        _strip_debug_metadata(out_path)
        files = onnx_files(out_path)

        logger.info("checking ONNX Runtime (CPU) against PyTorch on a random batch of 2…")
        max_abs, cos_min = check_parity(module, out_path, sample)
        with torch.inference_mode():
            dim = int(module(example[:1]).shape[-1])
    finally:
        tower.train(was_training)
    logger.info("parity: max |onnx - torch| = %.3g, min cosine = %.7f", max_abs, cos_min)
    if not cos_min >= 0.999:
        raise RuntimeError(
            f"exported encoder does not match PyTorch: min cosine {cos_min:.6f}, "
            f"max abs diff {max_abs:.3g}"
        )
    size = sum((out_path.parent / n).stat().st_size for n in files)
    logger.info("wrote %s (%s, %.1f MB)", out_path, ", ".join(files), size / 1e6)
    return ExportResult(
        onnx_path=out_path,
        files=files,
        exporter=used,
        opset=opset if used == "dynamo" else min(opset, 17),
        embedding_dim=dim,
        seconds=seconds,
        max_abs_diff=max_abs,
        cosine_min=cos_min,
    )
