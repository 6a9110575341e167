"""ONNX Runtime runner: TensorRT, CUDA or CPU execution provider, chosen by the profile."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import ExtraMissing, InferenceError, ProviderUnavailable
from ..profiles import Profile

logger = logging.getLogger(__name__)


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ExtraMissing("onnxruntime", "cpu") from exc
    return onnxruntime


def available_providers() -> list[str]:
    return list(_import_ort().get_available_providers())


def choose_providers(profile: Profile, available: list[str]) -> tuple[list[str], list[str]]:
    """(usable providers in the profile's order, skipped ones). Raises if none is usable."""
    wanted: list[str] = list(profile.runtime.providers)
    usable = [p for p in wanted if p in available]
    skipped = [p for p in wanted if p not in available]
    if not usable:
        raise ProviderUnavailable(
            f"profile {profile.name}: none of the execution providers {wanted} is available in "
            f"this ONNX Runtime build (it has {available})"
        )
    return usable, skipped


class OnnxRuntimeRunner:
    def __init__(self, bundle: Bundle, profile: Profile) -> None:
        ort = _import_ort()
        self.bundle = bundle
        self.profile = profile
        usable, skipped = choose_providers(profile, available_providers())
        for name in skipped:
            logger.warning("execution provider %s is not available here; skipped", name)
        if profile.runtime.precision != bundle.manifest.precision:
            logger.warning(
                "profile %s expects a %s bundle, this bundle is %s",
                profile.name,
                profile.runtime.precision,
                bundle.manifest.precision,
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = profile.runtime.intra_op_threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(bundle.encoder_path), sess_options=options, providers=usable
            )
        except Exception as exc:  # onnxruntime raises its own untyped Fail/InvalidGraph errors
            raise ProviderUnavailable(
                f"ONNX Runtime cannot open {bundle.encoder_path.name} with {usable}: {exc}"
            ) from exc
        self.provider = self.session.get_providers()[0]
        self.input_name = bundle.manifest.encoder.input_name
        self.output_name = bundle.manifest.encoder.output_name
        size = bundle.manifest.encoder.preprocessing.input_size
        start = time.perf_counter()
        self.embed(np.zeros((1, 3, size, size), dtype=np.float32))
        logger.info(
            "encoder %s loaded on %s, warm-up %.0f ms",
            bundle.manifest.model.name,
            self.provider,
            (time.perf_counter() - start) * 1000,
        )

    def embed(self, images: np.ndarray) -> np.ndarray:
        try:
            (out,) = self.session.run([self.output_name], {self.input_name: images})
        except Exception as exc:  # onnxruntime's errors have no common base class
            raise InferenceError(f"encoder failed on a batch of {len(images)}: {exc}") from exc
        out = np.asarray(out, dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != images.shape[0] or not np.all(np.isfinite(out)):
            raise InferenceError(f"encoder returned an unusable output of shape {out.shape}")
        return out
