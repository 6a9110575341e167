"""``edge-export verify``: re-check a bundle's hashes and re-run its parity on given images.

The candidate is the bundle's encoder run the way the daemon runs it (its runner, with the
chosen profile: CPU here, CUDA/TensorRT on a device). The reference is the PyTorch fp32
checkpoint (``--checkpoint``) or another bundle run on ONNX Runtime's CPU provider
(``--reference``, e.g. the fp32 bundle; no torch needed, so it works on the device).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.bundle import Bundle, load_bundle
from edge_agent.errors import ConfigError

from .parity import Parity, ParityBar, ParityFailed, compare

logger = logging.getLogger(__name__)


@dataclass
class VerifyResult:
    bundle: Bundle
    parity: Parity | None
    reference: str | None
    provider: str | None


def _embed_with_runner(
    bundle: Bundle, profile_name: str, pixels: np.ndarray
) -> tuple[np.ndarray, str]:
    from edge_agent.profiles import resolve_profile
    from edge_agent.runners import open_runner

    profile, _why = resolve_profile(profile_name)
    runner = open_runner(bundle, profile)
    out = [runner.embed(pixels[i : i + 1]) for i in range(len(pixels))]
    return np.concatenate(out), str(runner.provider)


def verify_bundle(
    path: Path,
    *,
    images: Path | None = None,
    checkpoint: Path | None = None,
    reference: Path | None = None,
    profile: str = "x86-cpu",
    limit: int = 64,
    bar: ParityBar | None = None,
) -> VerifyResult:
    """Verify hashes; with ``images``, re-run parity against the reference and enforce
    ``bar``. Raises BundleError, ConfigError or ParityFailed."""
    bundle = load_bundle(path)
    logger.info(
        "bundle %s: %d files match their sha256 (model sha256 %s)",
        path,
        len(bundle.manifest.files),
        bundle.sha256[:12],
    )
    if images is None:
        if checkpoint is not None or reference is not None:
            raise ConfigError("--images", "a reference needs images to compare on")
        return VerifyResult(bundle, None, None, None)
    if (checkpoint is None) == (reference is None):
        raise ConfigError(
            "--checkpoint",
            "parity needs exactly one reference: --checkpoint (PyTorch fp32) or --reference "
            "(another bundle, e.g. the fp32 one)",
        )
    from .siglip import dicom_images

    spec = bundle.manifest.encoder.preprocessing
    found, skipped = dicom_images(images, spec, limit=limit)
    for reason, count in sorted(skipped.items()):
        logger.info("images: %d file(s) left out: %s", count, reason)
    if not found:
        raise ConfigError("--images", f"{images} holds no usable CR/DX image")
    pixels = np.stack([p for _, p in found]).astype(np.float32)
    candidate, provider = _embed_with_runner(bundle, profile, pixels)

    if checkpoint is not None:
        from .onnx_export import torch_embeddings
        from .siglip import load_checkpoint

        ckpt = load_checkpoint(checkpoint)
        if ckpt.preprocessing.input_size != spec.input_size:
            raise ConfigError(
                "--checkpoint",
                f"checkpoint takes {ckpt.preprocessing.input_size} px, the bundle "
                f"{spec.input_size} px",
            )
        ref = torch_embeddings(ckpt.model, pixels)
        described = f"pytorch fp32 ({checkpoint.name})"
    else:
        assert reference is not None
        other = load_bundle(reference)
        if other.manifest.encoder.preprocessing != spec:
            raise ConfigError("--reference", "the reference bundle preprocesses images differently")
        ref, _ = _embed_with_runner(other, "x86-cpu", pixels)
        described = f"bundle {reference.name} ({other.manifest.precision}, CPU)"
    weights, biases = bundle.head_arrays()
    parity = compare(ref, candidate, weights, biases, list(bundle.manifest.findings))
    failures = parity.failures(bar or ParityBar())
    if failures:
        raise ParityFailed(f"bundle {path} fails parity against {described}: {'; '.join(failures)}")
    return VerifyResult(bundle, parity, described, provider)
