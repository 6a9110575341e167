"""The engine bundle: the one thing the export stage and the daemon share.

A bundle is a folder holding ``manifest.json`` and the files it names. The manifest records
the sha256 of every file; :func:`load_bundle` refuses a bundle whose files do not match,
naming the file. ``edge-export`` writes bundles with :func:`write_manifest`; nothing else
writes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import BundleError
from .fsutil import fsync_dir

logger = logging.getLogger(__name__)

FORMAT = "edge-triage-bundle/1"
MANIFEST = "manifest.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelInfo(_Strict):
    name: str = Field(description="Model name, e.g. 'medsiglip-448'.")
    version: str = Field(description="Bundle version chosen by whoever exported it.")
    source: str = Field(description="Where the weights came from (checkpoint folder name, hash).")
    demo: bool = Field(description="True for a model that is not for clinical use.")
    notice: str | None = Field(
        default=None, description="Licence NOTICE file in the bundle, if the weights need one."
    )


class FileEntry(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Preprocessing(_Strict):
    input_size: int = Field(gt=0, description="Square side in pixels the encoder takes.")
    mean: tuple[float, float, float] = Field(description="Per-channel mean after scaling to [0,1].")
    std: tuple[float, float, float] = Field(description="Per-channel std after scaling to [0,1].")
    pad_to_square: bool = Field(default=True, description="Zero-pad to square before resizing.")


class Encoder(_Strict):
    file: str = Field(description="ONNX file: image batch -> L2-normalised embedding batch.")
    input_name: str = "pixel_values"
    output_name: str = "image_embeds"
    embedding_dim: int = Field(gt=0)
    preprocessing: Preprocessing


class ZeroShotHead(_Strict):
    """SigLIP zero-shot scores from text embeddings computed at export.

    Without ``absent_embeddings``: score = sigmoid(cos(image, present_f) * exp(logit_scale) +
    logit_bias), SigLIP's own pairwise probability. With them, the two-way softmax of the
    present and absent prompt logits (how MedSigLIP's zero-shot figures are computed):
    score = sigmoid(exp(logit_scale) * (cos(image, present_f) - cos(image, absent_f))); the
    bias cancels. Both are linear in the embedding (see :meth:`Bundle.head_arrays`).
    """

    kind: Literal["zero_shot"] = "zero_shot"
    logit_scale: float = Field(description="Log of the temperature, as stored by SigLIP.")
    logit_bias: float
    text_embeddings: dict[str, list[float]] = Field(
        description="Per finding code: the normalised mean of its present-prompt embeddings."
    )
    absent_embeddings: dict[str, list[float]] | None = Field(
        default=None,
        description="Per finding code: the normalised mean of its absent-prompt embeddings; "
        "when given, the score contrasts present against absent.",
    )


class LinearProbeHead(_Strict):
    """score = sigmoid(w_f . embedding + b_f), one logistic regression per finding."""

    kind: Literal["linear_probe"] = "linear_probe"
    weights: dict[str, list[float]]
    biases: dict[str, float]


Head = Annotated[ZeroShotHead | LinearProbeHead, Field(discriminator="kind")]


class Prompts(_Strict):
    present: list[str] = Field(default_factory=list)
    absent: list[str] = Field(default_factory=list)


ImageModality = Literal["CR", "DX", "CT"]
RADIOGRAPH_MODALITIES: tuple[ImageModality, ...] = ("CR", "DX")


class Concept(_Strict):
    """A coded concept for a finding (SNOMED CT ``SCT`` or RadLex ``RADLEX``): what the DICOM
    Structured Report sent to the PACS names the finding with (see edge_agent/pacs/sr.py)."""

    scheme: Literal["SCT", "RADLEX"]
    value: str = Field(pattern=r"^[A-Za-z0-9.]{1,64}$")
    meaning: str = Field(min_length=1, max_length=64)


class Finding(_Strict):
    code: str = Field(pattern=r"^[a-z0-9_]+$")
    label: str
    concept: Concept | None = Field(
        default=None,
        description="The finding's SNOMED CT / RadLex code for DICOM SR; None: the SR names it "
        "with a private-scheme code. Not part of the model's identity (it decides no score).",
    )
    prompts: Prompts = Field(default_factory=Prompts)
    review_threshold: float = Field(ge=0.0, le=1.0)
    urgent_threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, description="None: this finding never makes a study urgent."
    )
    modalities: tuple[ImageModality, ...] = Field(
        default=RADIOGRAPH_MODALITIES,
        min_length=1,
        description="Images the finding's head was built for: CR/DX radiographs (default) or "
        "CT, whose studies are scored through axial slabs as the manifest's 'ct' section says.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> Finding:
        if self.urgent_threshold is not None and self.urgent_threshold < self.review_threshold:
            raise ValueError(f"finding {self.code}: urgent_threshold must be >= review_threshold")
        return self


class CTInput(_Strict):
    """How a bundle built for CT turns an axial series into encoder inputs and a study score.

    The series becomes slabs: maximum-intensity projections over ``slab_mm`` along the slice
    normal, one every ``stride_mm``; each slab is windowed (``convention``) and goes through
    the encoder's preprocessing; a CT finding's study score aggregates its slab scores. All of
    it decides the scores, so it is part of the model's identity (see ``edge_agent/ct.py``).
    """

    convention: Literal["lung_window", "three_windows"] = Field(
        description="'lung_window': one lung window (-600/1500) as grey; 'three_windows': "
        "MedGemma's three HU windows (2250/-100, 350/40, 80/40) as RGB."
    )
    slab_mm: float = Field(default=10.0, gt=0, le=100, description="Slab thickness in mm.")
    stride_mm: float = Field(default=5.0, gt=0, le=100, description="Slab start every ... mm.")
    aggregate: Literal["max", "top_k_mean"] = Field(
        default="max", description="Study score of a CT finding from its slab scores."
    )
    top_k: int = Field(default=3, ge=1, le=64, description="Slabs averaged by top_k_mean.")

    @model_validator(mode="after")
    def _no_slice_skipped(self) -> CTInput:
        if self.stride_mm > self.slab_mm:
            raise ValueError("ct.stride_mm must not exceed ct.slab_mm (slices would be skipped)")
        return self


class Engine(_Strict):
    """A device-specific engine built from the encoder (``edge-export tensorrt``).

    Engines only run on the GPU and TensorRT version they were built with, so the manifest
    keys them by :func:`engine_key` of (device, compute capability, TensorRT version); they
    never change the model's identity (:meth:`Manifest.model_sha256`)."""

    file: str = Field(description="Serialized engine, listed in files.")
    builder: Literal["tensorrt"] = "tensorrt"
    device: str = Field(description="GPU name as the driver reports it.")
    compute_capability: str = Field(description="e.g. '8.7' for Jetson Orin.")
    tensorrt_version: str
    precision: Literal["fp32", "fp16", "int8"]
    profile: str = Field(description="Profile the engine was built for.")
    min_batch: int = Field(ge=1)
    opt_batch: int = Field(ge=1)
    max_batch: int = Field(ge=1)
    workspace_mib: int = Field(ge=0)
    built_at: str
    build_seconds: float = Field(ge=0)

    @model_validator(mode="after")
    def _batches_ordered(self) -> Engine:
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError("engine batches must satisfy min_batch <= opt_batch <= max_batch")
        return self

    @property
    def key(self) -> str:
        return engine_key(self.device, self.compute_capability, self.tensorrt_version)


def engine_key(device: str, compute_capability: str, tensorrt_version: str) -> str:
    """The key an engine is recorded under: one per (GPU, architecture, TensorRT version)."""
    return f"{device} sm{compute_capability} trt{tensorrt_version}"


def engine_slug(key: str) -> str:
    """A file-name-safe form of an engine key: 'NVIDIA H200 sm9.0 trt10.3.0' ->
    'nvidia-h200-sm9.0-trt10.3.0'."""
    slug = re.sub(r"[^a-z0-9.]+", "-", key.lower()).strip("-.")
    return slug or "engine"


REPORT_FORMAT: Literal["edge-triage-medgemma/1"] = "edge-triage-medgemma/1"


class ReportGraph(_Strict):
    file: str = Field(description="ONNX file in the bundle (listed in files).")
    precision: str = Field(description="Weights and compute, in words.")


class ReportGraphs(_Strict):
    vision: ReportGraph = Field(description="pixel_values (B,3,N,N) -> image_features (B,T,D).")
    embed: ReportGraph = Field(description="input_ids (B,S) -> inputs_embeds (B,S,D).")
    decoder: ReportGraph = Field(description="inputs_embeds, positions, masks, past KV -> logits.")


class ReportImage(_Strict):
    size: int = Field(gt=0, description="Square side of the vision input (896 for MedGemma).")
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tokens_per_image: int = Field(gt=0)


class ReportText(_Strict):
    """What the generation loop needs to know about the decoder."""

    hidden_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    layer_types: list[Literal["sliding_attention", "full_attention"]] = Field(min_length=1)
    sliding_window: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    image_token_id: int = Field(ge=0)
    tokens_per_image: int = Field(gt=0)
    eos_token_ids: list[int] = Field(min_length=1, description="Generation stops at these.")


class ReportTokens(_Strict):
    """The special tokens the prompt is written with (Gemma 3's processor conventions)."""

    bos: str
    boi: str = Field(description="Start of image, as the chat template writes it.")
    image: str = Field(description="The image soft token, repeated tokens_per_image times.")
    eoi: str = Field(description="End of image.")


class ReportPrompts(_Strict):
    radiograph: str = Field(min_length=1, description="Question asked with a CR/DX image.")
    ct: str = Field(min_length=1, description="Question asked with a CT slab (three windows).")


class Report(_Strict):
    """MedGemma (or a distilled Gemma 3 student): a draft narrative for urgent studies.

    Written by ``edge-export add-report`` from an ``edge-export medgemma`` export. It never
    changes the scores, so it is not part of :meth:`Manifest.model_sha256`."""

    format: Literal["edge-triage-medgemma/1"] = REPORT_FORMAT
    name: str = Field(description="Model name published with each narrative.")
    source: str = Field(description="Checkpoint folder name the graphs were exported from.")
    weights_sha256: str | None = Field(default=None, description="Digest of its weight files.")
    graphs: ReportGraphs
    tokenizer: str = Field(description="tokenizer.json (Hugging Face tokenizers) in the bundle.")
    chat_template: str = Field(description="The checkpoint's chat template (Jinja) in the bundle.")
    notice: str | None = Field(
        default=None, description="The weights' licence NOTICE in the bundle, if given."
    )
    tokens: ReportTokens
    image: ReportImage
    text: ReportText
    prompts: ReportPrompts
    max_new_tokens: int = Field(default=96, ge=1, le=1024)
    parity: dict[str, float | int | str | bool | None] | None = None

    def files(self) -> list[str]:
        g = self.graphs
        named = [g.vision.file, g.embed.file, g.decoder.file, self.tokenizer, self.chat_template]
        return named + ([self.notice] if self.notice else [])


class Manifest(_Strict):
    format: Literal["edge-triage-bundle/1"] = "edge-triage-bundle/1"
    model: ModelInfo
    created_at: str
    created_by: str = Field(description="Tool and version that wrote the bundle.")
    precision: Literal["fp32", "fp16", "int8"]
    encoder: Encoder
    head: Head
    findings: list[Finding] = Field(min_length=1)
    parity: dict[str, float | int | str | bool] | None = Field(
        default=None, description="Figures measured at export against the fp32 reference."
    )
    metrics: dict[str, float | int | str] | None = Field(
        default=None, description="Quality figures measured at export (e.g. demo AUROC)."
    )
    ct: CTInput | None = Field(
        default=None,
        description="How CT studies are scored; None: the bundle was not built for CT and CT "
        "studies are published as not_scored. Needs at least one finding for CT, and back.",
    )
    report: Report | None = Field(
        default=None,
        description="MedGemma's draft narrative for urgent studies; None: no narrative.",
    )
    engines: dict[str, Engine] = Field(
        default_factory=dict,
        description="Device engines by engine_key(); not part of the model's identity.",
    )
    files: dict[str, FileEntry]

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        codes = [f.code for f in self.findings]
        if len(set(codes)) != len(codes):
            raise ValueError("finding codes must be unique")
        for_ct = [f.code for f in self.findings if "CT" in f.modalities]
        if for_ct and self.ct is None:
            raise ValueError(f"findings {for_ct} are for CT but the manifest has no 'ct' section")
        if self.ct is not None and not for_ct:
            raise ValueError("the manifest has a 'ct' section but no finding for CT")
        head_codes = set(
            self.head.text_embeddings if isinstance(self.head, ZeroShotHead) else self.head.weights
        )
        if head_codes != set(codes):
            raise ValueError(f"head covers {sorted(head_codes)} but findings are {sorted(codes)}")
        if isinstance(self.head, LinearProbeHead) and set(self.head.biases) != set(codes):
            raise ValueError("linear probe biases must cover every finding")
        vectors = (
            self.head.text_embeddings.values()
            if isinstance(self.head, ZeroShotHead)
            else self.head.weights.values()
        )
        for v in vectors:
            if len(v) != self.encoder.embedding_dim:
                raise ValueError(
                    f"head vectors must have embedding_dim={self.encoder.embedding_dim} values"
                )
            if not all(math.isfinite(x) for x in v):
                raise ValueError("head vectors must be finite")
        if isinstance(self.head, ZeroShotHead) and self.head.absent_embeddings is not None:
            absent = self.head.absent_embeddings
            if set(absent) != set(codes):
                raise ValueError("absent embeddings must cover every finding")
            for v in absent.values():
                if len(v) != self.encoder.embedding_dim or not all(math.isfinite(x) for x in v):
                    raise ValueError(
                        f"absent embeddings must be {self.encoder.embedding_dim} finite values"
                    )
        if self.encoder.file not in self.files:
            raise ValueError(f"encoder file {self.encoder.file} is not listed in files")
        if self.report is not None:
            for name in self.report.files():
                if name not in self.files:
                    raise ValueError(f"report file {name} is not listed in files")
        for key, engine in self.engines.items():
            if engine.file not in self.files:
                raise ValueError(f"engine {key}: file {engine.file} is not listed in files")
            if key != engine.key:
                raise ValueError(f"engine {key}: key does not match its device ({engine.key})")
            if engine.file == self.encoder.file:
                raise ValueError(f"engine {key}: file {engine.file} is the encoder")
        return self

    def model_sha256(self) -> str:
        """Identity of what decides the scores: encoder weights, preprocessing, head, thresholds.

        Adding a device engine or re-measuring parity leaves it unchanged, so alert ids stay
        stable across such bundle revisions.
        """
        identity = {
            "encoder": self.encoder.model_dump(mode="json"),
            "encoder_sha256": self.files[self.encoder.file].sha256,
            "head": self.head.model_dump(mode="json"),
            # Fields added later count only when set, so older bundles keep their identity.
            "findings": [
                f.model_dump(
                    mode="json",
                    exclude={"concept", "modalities"}
                    if f.modalities == RADIOGRAPH_MODALITIES
                    else {"concept"},
                )
                for f in self.findings
            ],
        }
        if self.ct is not None:
            identity["ct"] = self.ct.model_dump(mode="json")
        blob = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(root: Path, names: Iterable[str]) -> dict[str, FileEntry]:
    """Hash the named files (relative to ``root``) for a manifest."""
    return {
        name: FileEntry(sha256=sha256_file(root / name), size=(root / name).stat().st_size)
        for name in sorted(names)
    }


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically after checking every listed file's hash."""
    verify_files(root, manifest)
    target = root / MANIFEST
    tmp = target.with_suffix(".json.tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(target)
    fsync_dir(root)
    return target


def verify_files(root: Path, manifest: Manifest) -> None:
    for name, entry in manifest.files.items():
        path = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"bundle {root}: file name {name!r} leaves the bundle folder")
        if not path.is_file():
            raise BundleError(f"bundle {root}: {name} is listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry.size:
            raise BundleError(
                f"bundle {root}: {name} is {size} bytes, the manifest says {entry.size}"
            )
        if sha256_file(path) != entry.sha256:
            raise BundleError(f"bundle {root}: sha256 of {name} does not match the manifest")


def invalid(exc: ValidationError, where: str, what: str = "manifest") -> BundleError:
    """A one-line BundleError for the first problem pydantic found: '<where>: <what>
    <field path>: <message>'."""
    first = exc.errors()[0]
    path = ".".join(str(p) for p in first["loc"]) or f"({what})"
    return BundleError(f"{where}: {what} {path}: {first['msg']}")


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle {root} does not exist or is not a folder")
    if not path.is_file():
        raise BundleError(f"bundle {root}: {MANIFEST} is missing")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle {root}: {MANIFEST} is not readable JSON: {exc}") from exc
    if isinstance(raw, dict) and raw.get("format") != FORMAT:
        raise BundleError(
            f"bundle {root}: format {raw.get('format')!r} is not supported (expected {FORMAT})"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise invalid(exc, f"bundle {root}", MANIFEST) from exc


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its folder, manifest and the head as arrays ready to apply."""

    root: Path
    manifest: Manifest
    sha256: str

    @property
    def encoder_path(self) -> Path:
        return self.root / self.manifest.encoder.file

    @property
    def finding_codes(self) -> list[str]:
        return [f.code for f in self.manifest.findings]

    def head_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) such that scores = sigmoid(embeddings @ W.T + b), one row per finding."""
        return head_arrays(self.manifest.head, self.finding_codes)


def head_arrays(
    head: ZeroShotHead | LinearProbeHead, codes: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """A head as (W, b) such that scores = sigmoid(embeddings @ W.T + b), rows in ``codes``
    order."""
    if isinstance(head, ZeroShotHead):
        text = np.asarray([head.text_embeddings[c] for c in codes], dtype=np.float32)
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        scale = np.float32(math.exp(head.logit_scale))
        if head.absent_embeddings is None:
            return text * scale, np.full(len(codes), head.logit_bias, dtype=np.float32)
        absent = np.asarray([head.absent_embeddings[c] for c in codes], dtype=np.float32)
        absent /= np.linalg.norm(absent, axis=1, keepdims=True)
        return (text - absent) * scale, np.zeros(len(codes), dtype=np.float32)
    weights = np.asarray([head.weights[c] for c in codes], dtype=np.float32)
    biases = np.asarray([head.biases[c] for c in codes], dtype=np.float32)
    return weights, biases


def load_bundle(root: Path | str) -> Bundle:
    """Read and verify a bundle. Raises :class:`BundleError` naming the file at fault."""
    root = Path(root)
    manifest = read_manifest(root)
    verify_files(root, manifest)
    extra = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file()
        and p.name != MANIFEST
        and p.relative_to(root).as_posix() not in manifest.files
    )
    if extra:
        logger.warning("bundle %s holds files the manifest does not name: %s", root, extra)
    return Bundle(root=root, manifest=manifest, sha256=manifest.model_sha256())
