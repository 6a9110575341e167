"""``edge-export siglip``: a local MedSigLIP (SigLIP) checkpoint → a verified engine bundle.

Stages, each with progress and timing:

1. load the checkpoint offline (a folder written by ``save_pretrained``; never the hub);
2. text tower, once: every finding's present (and absent) prompts, lower-cased, padded to
   the model's 64 positions, embedded, normalised, averaged, normalised again; the device
   never needs the text tower or a tokenizer;
3. images for calibration and parity: DICOM from ``--calibration`` (or simulated chest
   radiographs for fp32/fp16 when none are given), through the daemon's own
   :func:`edge_agent.imaging.preprocess`; split by a hash of the SOP Instance UID into a
   calibration half and a held-out half;
4. the PyTorch fp32 reference embeddings of the held-out images;
5. the vision tower → ONNX fp32 (:func:`export.onnx_export.export_image_encoder`), then
   fp16 or int8 (:mod:`export.quantize`);
6. the parity gate on the held-out images; below the bar nothing is written;
7. the bundle, written atomically and verified by the daemon's own loader.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from edge_agent.bundle import (
    CTInput,
    Finding,
    ModelInfo,
    Preprocessing,
    ZeroShotHead,
    head_arrays,
)
from edge_agent.errors import ConfigError, ResourceMissing

from . import quantize
from .checkpoint import (
    CheckpointError,
    go_offline,
    image_normalisation,
    load_model,
    load_tokenizer,
    read_config,
    refuse_remote_code,
    require_tokenizer,
    weight_paths,
    weights_sha256,
)
from .onnx_export import torch_embeddings
from .parity import Parity, ParityBar, ParityFailed, compare

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
Int8Mode = Literal["dynamic", "qdq"]
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer.model")


@dataclass
class SiglipSettings:
    checkpoint: Path
    findings: list[Finding]
    out: Path
    ct: CTInput | None = None
    precision: Precision = "fp32"
    int8_mode: Int8Mode = "dynamic"
    calibration: Path | None = None
    calibration_limit: int = 64
    search_images: int = 8
    int8_target_cosine: float = 0.999
    bar: ParityBar = field(default_factory=ParityBar)
    name: str | None = None
    version: str | None = None
    notice: Path | None = None
    overwrite: bool = False
    threads: int = 0


@dataclass
class Checkpoint:
    path: Path
    model: Any
    tokenizer: Any
    preprocessing: Preprocessing
    text_positions: int
    weights_sha256: str


@dataclass
class SiglipResult:
    bundle: Path
    parity: Parity
    fp32_bytes: int
    bundle_bytes: int
    stages: list[tuple[str, float]]
    int8: quantize.Int8Report | None = None


# --- progress -------------------------------------------------------------------------------


class Progress:
    """A tqdm bar per stage on a terminal, a log line per stage everywhere; stage timings."""

    def __init__(self) -> None:
        self.stages: list[tuple[str, float]] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        logger.info("%s…", name)
        start = time.monotonic()
        yield
        seconds = time.monotonic() - start
        self.stages.append((name, seconds))
        logger.info("%s: done in %.1f s", name, seconds)

    def bar(self, desc: str, total: int) -> Callable[[int, int], None]:
        """A callback ``(done, total)`` that drives a bar (hidden when stderr is no tty)."""
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm comes with the export extra; progress is not essential
            return lambda done, total: None
        bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, disable=None)
        state = {"n": 0}

        def update(done: int, total_now: int) -> None:
            if total_now != bar.total:
                bar.total = total_now
                bar.refresh()
            bar.update(done - state["n"])
            state["n"] = done
            if done >= total_now:
                bar.close()

        return update


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization narrates through the root logger; keep it to warnings."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


# --- 1. checkpoint --------------------------------------------------------------------------


def check_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's config.json, after checking the folder has what an offline load needs.

    Raises :class:`CheckpointError` (or :class:`ResourceMissing` for a missing folder) with a
    message that names the missing or wrong file.
    """
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type != "siglip":
        raise CheckpointError(
            f"checkpoint {path}: model_type is {model_type!r}, not 'siglip' "
            "(MedSigLIP is a SigLIP model; the folder must hold the joint image-text model)"
        )
    refuse_remote_code(path, config)
    weight_paths(path)
    require_tokenizer(path, TOKENIZER_FILES, "the text prompts cannot be embedded without it")
    return config


def load_checkpoint(path: Path) -> Checkpoint:
    """Load a SigLIP checkpoint folder offline: model (fp32, eval) and tokenizer."""
    path = Path(path)
    config = check_checkpoint(path)
    go_offline()
    try:
        import torch
        from transformers import SiglipModel
    except ImportError as exc:
        from edge_agent.errors import ExtraMissing

        raise ExtraMissing(exc.name or "transformers", "export") from exc
    weights = weight_paths(path)
    model = load_model(path, SiglipModel, dtype=torch.float32)
    tokenizer = load_tokenizer(path)
    if tokenizer.pad_token_id is None:
        raise CheckpointError(f"checkpoint {path}: the tokenizer has no pad token")
    vision: Any = model.config.vision_config
    text: Any = model.config.text_config
    positions = int(config.get("text_config", {}).get("max_position_embeddings", 64))
    # Any length other than 3 is refused by Preprocessing's validation, as before.
    mean, std = cast(Any, image_normalisation(path, int(vision.image_size)))
    return Checkpoint(
        path=path,
        model=model,
        tokenizer=tokenizer,
        preprocessing=Preprocessing(
            input_size=int(vision.image_size),
            mean=mean,
            std=std,
            pad_to_square=True,
        ),
        text_positions=int(text.max_position_embeddings or positions),
        weights_sha256=weights_sha256(weights),
    )


# --- 2. text tower --------------------------------------------------------------------------


def embed_texts(ckpt: Checkpoint, texts: list[str]) -> np.ndarray:
    """L2-normalised text embeddings, tokenised exactly as SigLIP was trained: lower-case,
    ``padding="max_length"`` to the model's positions (64). ``padding=True`` would silently
    change the embeddings: SigLIP pools the last position."""
    import torch

    batch = ckpt.tokenizer(
        [t.lower() for t in texts],
        padding="max_length",
        max_length=ckpt.text_positions,
        truncation=True,
        return_tensors="pt",
    )
    ids = batch["input_ids"]
    if ids.shape[1] != ckpt.text_positions:
        raise CheckpointError(
            f"tokenizer gave {ids.shape[1]} positions, the text tower has {ckpt.text_positions}"
        )
    with torch.inference_mode():
        pooled = ckpt.model.text_model(input_ids=ids).pooler_output
    out = pooled.numpy().astype(np.float64)
    return np.asarray(out / np.linalg.norm(out, axis=-1, keepdims=True))


def _mean_direction(vectors: np.ndarray) -> list[float]:
    mean = vectors.mean(axis=0)
    return [float(x) for x in mean / np.linalg.norm(mean)]


def zero_shot_head(
    ckpt: Checkpoint, findings: list[Finding], progress: Callable[[int, int], None] | None = None
) -> ZeroShotHead:
    """The zero-shot head: averaged present (and, where every finding has them, absent)
    prompt embeddings with the model's logit scale and bias."""
    contrast = all(f.prompts.absent for f in findings)
    if not contrast and any(f.prompts.absent for f in findings):
        logger.warning(
            "some findings have absent-prompts and some do not: scoring all of them with "
            "present-prompts only (SigLIP's pairwise sigmoid)"
        )
    present: dict[str, list[float]] = {}
    absent: dict[str, list[float]] = {}
    for i, finding in enumerate(findings):
        present[finding.code] = _mean_direction(embed_texts(ckpt, finding.prompts.present))
        if contrast:
            absent[finding.code] = _mean_direction(embed_texts(ckpt, finding.prompts.absent))
        if progress is not None:
            progress(i + 1, len(findings))
    return ZeroShotHead(
        logit_scale=float(ckpt.model.logit_scale.detach().reshape(-1)[0]),
        logit_bias=float(ckpt.model.logit_bias.detach().reshape(-1)[0]),
        text_embeddings=present,
        absent_embeddings=absent if contrast else None,
    )


# --- 3. images ------------------------------------------------------------------------------


@dataclass
class Images:
    calibration: np.ndarray
    held_out: np.ndarray
    source: str


def _split_key(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()


def dicom_images(
    folder: Path,
    spec: Preprocessing,
    *,
    limit: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[tuple[str, np.ndarray]], dict[str, int]]:
    """(SOP Instance UID, preprocessed image) for the CR/DX images under ``folder`` that the
    daemon would score (frontal or unmarked view), at most ``limit``, chosen by UID hash;
    plus counts of what was left out and why. Reads with the daemon's own header reader and
    preprocessing."""
    import pydicom

    from edge_agent import imaging
    from edge_agent.errors import InputRejected
    from edge_agent.intake.header import read_header
    from edge_agent.scoring import PROJECTION_MODALITIES

    if not folder.is_dir():
        raise ResourceMissing(f"calibration folder {folder} does not exist")
    skipped: dict[str, int] = {}
    usable: list[tuple[str, Path]] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        try:
            record = read_header(path)
        except InputRejected as exc:
            skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
            continue
        if record.modality not in PROJECTION_MODALITIES:
            key = f"modality {record.modality} is not scored"
            skipped[key] = skipped.get(key, 0) + 1
            continue
        if record.view == "lateral":
            skipped["lateral view (not scored)"] = skipped.get("lateral view (not scored)", 0) + 1
            continue
        usable.append((record.sop_instance_uid, path))
    usable = sorted(dict(usable).items(), key=lambda item: _split_key(item[0]))[:limit]
    images: list[tuple[str, np.ndarray]] = []
    for i, (uid, path) in enumerate(usable):
        try:
            images.append((uid, imaging.preprocess(pydicom.dcmread(path), spec)))
        except InputRejected as exc:
            skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
        if progress is not None:
            progress(i + 1, len(usable))
    return images, skipped


def collect_images(settings: SiglipSettings, spec: Preprocessing, progress: Progress) -> Images:
    """Calibration and held-out images for the export's quantization and parity gate."""
    if settings.calibration is None:
        if settings.precision == "int8":
            raise ConfigError(
                "--calibration",
                "int8 needs calibration images: a folder of this site's own CR/DX DICOM "
                "(de-identified is fine), at least 4 images",
            )
        from .demo import simulate_studies

        n = 8
        logger.warning(
            "no --calibration folder: measuring parity on %d simulated chest radiographs; "
            "pass real studies for a parity figure that means something clinically",
            n,
        )
        pixels = simulate_studies(0, 11, n, spec, matrix=max(2 * spec.input_size, 256)).pixels
        return Images(pixels[:0], pixels, f"{n} simulated chest radiographs")
    found, skipped = dicom_images(
        settings.calibration,
        spec,
        limit=settings.calibration_limit,
        progress=progress.bar("reading calibration DICOM", 1),
    )
    for reason, count in sorted(skipped.items()):
        logger.info("calibration: %d file(s) left out: %s", count, reason)
    minimum = 4 if settings.precision == "int8" else 1
    if len(found) < minimum:
        raise ConfigError(
            "--calibration",
            f"{settings.calibration} holds {len(found)} usable CR/DX image(s); "
            f"{settings.precision} needs at least {minimum}",
        )
    pixels = np.stack([p for _, p in found]).astype(np.float32)
    if settings.precision != "int8":
        return Images(pixels[:0], pixels, f"{len(found)} calibration DICOM images")
    half = len(found) // 2  # already in UID-hash order: a stable, content-blind split
    return Images(
        pixels[:half],
        pixels[half:],
        f"{len(found) - half} held-out calibration DICOM images ({half} others used to calibrate)",
    )


# --- 4.–7. ----------------------------------------------------------------------------------


def _model_info(settings: SiglipSettings, ckpt: Checkpoint, version: str) -> ModelInfo:
    return ModelInfo(
        name=settings.name or ckpt.path.resolve().name,
        version=version,
        source=f"checkpoint {ckpt.path.resolve().name}, weights sha256 {ckpt.weights_sha256}",
        demo=False,
        notice=settings.notice.name if settings.notice else None,
    )


def build_siglip_bundle(settings: SiglipSettings) -> SiglipResult:
    """Run every stage; write the bundle only if the parity gate passes."""
    from .bundle_writer import write_bundle
    from .onnx_export import export_image_encoder

    if settings.out.exists() and not settings.overwrite:
        raise FileExistsError(f"{settings.out} already exists (pass --overwrite to replace it)")
    if settings.notice is not None and not settings.notice.is_file():
        raise ResourceMissing(f"notice file {settings.notice} does not exist")
    # Fail fast, before minutes of work: the checkpoint's files and the calibration folder.
    check_checkpoint(settings.checkpoint)
    if settings.precision == "int8" and settings.calibration is None:
        raise ConfigError(
            "--calibration",
            "int8 needs calibration images: a folder of this site's own CR/DX DICOM "
            "(de-identified is fine), at least 4 images",
        )
    if settings.calibration is not None and not settings.calibration.is_dir():
        raise ResourceMissing(f"calibration folder {settings.calibration} does not exist")
    progress = Progress()
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)

    with progress.stage("loading checkpoint"):
        ckpt = load_checkpoint(settings.checkpoint)
        vision = ckpt.model.config.vision_config
        logger.info(
            "SigLIP vision: %d layers, hidden %d, %d px, patch %d; text positions %d",
            vision.num_hidden_layers,
            vision.hidden_size,
            vision.image_size,
            vision.patch_size,
            ckpt.text_positions,
        )
    with progress.stage("text prompts → embeddings"):
        head = zero_shot_head(
            ckpt, settings.findings, progress.bar("text prompts", len(settings.findings))
        )
    spec = ckpt.preprocessing
    with progress.stage("preprocessing calibration images"):
        images = collect_images(settings, spec, progress)
        logger.info("parity images: %s", images.source)
    with progress.stage("PyTorch fp32 reference embeddings"):
        reference = torch_embeddings(
            ckpt.model, images.held_out, progress.bar("reference", len(images.held_out))
        )
        search = images.calibration[: settings.search_images]
        search_ref = (
            torch_embeddings(ckpt.model, search, progress.bar("search ref", len(search)))
            if settings.precision == "int8"
            else None
        )

    parent = settings.out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{settings.out.name}.export-", dir=parent) as tmp:
        work = Path(tmp)
        fp32 = work / "fp32" / "encoder.onnx"
        with progress.stage("exporting vision tower to ONNX (fp32)"):
            exported = export_image_encoder(ckpt.model.vision_model, spec.input_size, fp32)
        del ckpt.model.text_model  # free what the rest does not need
        encoder = fp32
        int8_report = None
        if settings.precision != "fp32":
            encoder = work / settings.precision / "encoder.onnx"
            with progress.stage(f"converting to {settings.precision}"), _quiet_root_logger():
                if settings.precision == "fp16":
                    quantize.to_fp16(fp32, encoder)
                else:
                    assert search_ref is not None
                    bars: dict[str, Callable[[int, int], None]] = {}

                    def report(stage: str, done: int, total: int) -> None:
                        if stage not in bars:
                            bars[stage] = progress.bar(stage, total)
                        bars[stage](done, total)

                    int8_report = quantize.mixed_int8(
                        fp32,
                        encoder,
                        search_ref,
                        search,
                        form=settings.int8_mode,
                        target_cosine=settings.int8_target_cosine,
                        threads=settings.threads,
                        progress=report,
                    )
        with progress.stage("parity gate (ONNX Runtime CPU vs PyTorch fp32)"):
            candidate = quantize.embed_onnx(encoder, images.held_out, threads=settings.threads)
            codes = [f.code for f in settings.findings]
            weights, biases = head_arrays(head, codes)
            parity = compare(reference, candidate, weights, biases, settings.findings)
            failures = parity.failures(settings.bar)
            logger.info(
                "parity on %d images: cosine mean %.5f min %.5f, max |score delta| %.4f, "
                "triage agreement %.4f",
                parity.images,
                parity.cosine_mean,
                parity.cosine_min,
                parity.max_score_delta,
                parity.triage_agreement,
            )
            if failures:
                raise ParityFailed(
                    f"parity gate: the {settings.precision} encoder does not reproduce the "
                    f"fp32 model ({'; '.join(failures)}); no bundle written"
                )
        figures: dict[str, float | int | str | bool] = {
            "reference": "pytorch fp32",
            "runtime": "onnxruntime CPUExecutionProvider",
            "image_source": images.source,
            **parity.figures(),
            "bar_cosine_mean": settings.bar.cosine_mean,
            "bar_triage_agreement": settings.bar.triage_agreement,
            "export_max_abs_diff": exported.max_abs_diff,
            "exporter": f"torch.onnx {exported.exporter}, opset {exported.opset}",
        }
        if int8_report is not None:
            figures.update(int8_report.manifest())
        fp32_bytes = quantize.file_size(fp32)
        version = settings.version or datetime.now(timezone.utc).strftime("%Y.%m.%d")
        with progress.stage("writing bundle"):
            write_bundle(
                settings.out,
                encoder_onnx=encoder,
                model=_model_info(settings, ckpt, version),
                precision=settings.precision,
                preprocessing=spec,
                head=head,
                findings=settings.findings,
                parity=figures,
                ct=settings.ct,
                extra_files=[settings.notice] if settings.notice else [],
                overwrite=settings.overwrite,
                move=True,
            )
    bundle_bytes = sum(
        p.stat().st_size for p in settings.out.rglob("*") if p.is_file() and p.suffix != ".json"
    )
    return SiglipResult(
        bundle=settings.out,
        parity=parity,
        fp32_bytes=fp32_bytes,
        bundle_bytes=bundle_bytes,
        stages=progress.stages,
        int8=int8_report,
    )


def summary(result: SiglipResult, precision: str) -> str:
    """The table printed at the end of ``edge-export siglip``."""
    p = result.parity
    lines = [
        f"bundle     {result.bundle}",
        f"precision  {precision}" + (f" ({result.int8.mode})" if result.int8 is not None else ""),
        f"size       {result.bundle_bytes / 1e6:.1f} MB "
        f"({result.bundle_bytes / max(result.fp32_bytes, 1):.0%} of fp32's "
        f"{result.fp32_bytes / 1e6:.1f} MB)",
        f"parity     {p.images} images: cosine mean {p.cosine_mean:.5f}, min "
        f"{p.cosine_min:.5f}; max |score delta| {p.max_score_delta:.4f}; triage agreement "
        f"{p.triage_agreement:.1%}",
    ]
    if result.int8 is not None and result.int8.excluded_labels:
        lines.append(
            f"int8       {result.int8.quantized} MatMuls int8, kept in fp32: "
            + ", ".join(result.int8.excluded_labels)
        )
    lines.append("")
    lines.append(f"{'stage':<48} {'seconds':>8}")
    for name, seconds in result.stages:
        lines.append(f"{name:<48} {seconds:8.1f}")
    lines.append(f"{'total':<48} {sum(s for _, s in result.stages):8.1f}")
    return "\n".join(lines)
