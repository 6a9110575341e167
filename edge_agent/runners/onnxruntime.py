"""ONNX Runtime runner: TensorRT, CUDA or CPU execution provider, chosen by the profile.

With ``TensorrtExecutionProvider`` ONNX Runtime builds TensorRT engines itself and keeps them
in an engine cache (``tensorrt.engine = "ort-cache"``): a folder per model, precision and
ONNX Runtime version under the daemon's ``state_dir``, so that a new bundle or an upgrade
never picks up a stale engine. Its options come from the profile's ``[tensorrt]`` section
(:func:`tensorrt_provider_options`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import ConfigError, ExtraMissing, InferenceError, ProviderUnavailable
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


def ort_engine_cache_dir(
    cache_root: Path, bundle: Bundle, profile: Profile, ort_version: str
) -> Path:
    """Where the TensorRT provider caches engines for this model, precision and ONNX Runtime.

    ONNX Runtime does not notice when the model, the build settings, its own version or
    TensorRT's change under a cache, so each combination gets its own folder (a TensorRT
    upgrade comes with a new onnxruntime-gpu build in practice; delete the folder after
    upgrading TensorRT alone)."""
    trt = profile.tensorrt
    settings = trt.model_dump(mode="json") if trt is not None else {}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    precision = trt.precision if trt is not None else "fp32"
    name = f"{bundle.sha256[:16]}-{precision}-{digest}-ort{ort_version}"
    return cache_root / "tensorrt" / name


def tensorrt_provider_options(
    bundle: Bundle, profile: Profile, cache_dir: Path | None
) -> dict[str, str]:
    """TensorrtExecutionProvider options from the profile's ``[tensorrt]`` section.

    ``cache_dir`` None disables the engine and timing caches (engines are then rebuilt at
    every start). Raises ConfigError when the profile cannot run this bundle."""
    trt = profile.tensorrt
    if trt is None:
        raise ConfigError(
            f"profile({profile.name}).tensorrt", "TensorrtExecutionProvider needs this section"
        )
    bundle_precision = bundle.manifest.precision
    if (trt.precision == "int8") != (bundle_precision == "int8"):
        raise ConfigError(
            f"profile({profile.name}).tensorrt.precision",
            f"is {trt.precision} but the bundle is {bundle_precision}: int8 on TensorRT means a "
            "bundle quantized with explicit Q/DQ nodes, and such a bundle needs int8",
        )
    encoder = bundle.manifest.encoder
    n = encoder.preprocessing.input_size

    def shape(batch: int) -> str:
        return f"{encoder.input_name}:{batch}x3x{n}x{n}"

    def flag(on: bool) -> str:
        return "True" if on else "False"

    options = {
        "device_id": "0",
        "trt_max_workspace_size": str(trt.workspace_mib * 1024 * 1024),
        # int8: the Q/DQ layers run in int8, the rest may use fp16 kernels.
        "trt_fp16_enable": flag(trt.precision in ("fp16", "int8")),
        "trt_int8_enable": flag(trt.precision == "int8"),
        "trt_builder_optimization_level": str(trt.builder_optimization_level),
        "trt_profile_min_shapes": shape(trt.min_batch),
        "trt_profile_opt_shapes": shape(trt.opt_batch),
        "trt_profile_max_shapes": shape(trt.max_batch),
        "trt_dla_enable": "False",  # DLA is for CNNs; transformer layers would fall back
        "trt_engine_cache_enable": flag(cache_dir is not None),
        "trt_timing_cache_enable": flag(cache_dir is not None and trt.timing_cache),
    }
    if cache_dir is not None:
        options["trt_engine_cache_path"] = str(cache_dir)
        if trt.timing_cache:
            options["trt_timing_cache_path"] = str(cache_dir)
    return options


def cuda_provider_options() -> dict[str, str]:
    """CUDAExecutionProvider options: grow the memory arena only by what is asked (a Jetson
    shares its memory with the CPU) and pick convolution algorithms by heuristics (the
    encoder's one convolution, the patch embedding, is not worth an exhaustive search at
    every start)."""
    return {
        "device_id": "0",
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
    }


def session_providers(
    bundle: Bundle, profile: Profile, usable: list[str], cache_dir: Path | None, ort_version: str
) -> list[str | tuple[str, dict[str, str]]]:
    """The ``providers`` argument of ONNX Runtime's InferenceSession for the usable providers,
    each with its options; makes the TensorRT engine cache folder. ``cache_dir`` is the
    daemon's ``state_dir/engine-cache``."""
    providers: list[str | tuple[str, dict[str, str]]] = []
    for name in usable:
        if name == "TensorrtExecutionProvider":
            engines = None
            if cache_dir is not None:
                engines = ort_engine_cache_dir(cache_dir, bundle, profile, ort_version)
                engines.mkdir(parents=True, exist_ok=True)
                fresh = not any(engines.iterdir())
                logger.info(
                    "TensorRT execution provider: engine cache %s%s",
                    engines,
                    " (empty: building the engines takes minutes)" if fresh else "",
                )
            else:
                logger.warning(
                    "TensorRT execution provider without an engine cache: "
                    "engines are rebuilt at every start"
                )
            providers.append((name, tensorrt_provider_options(bundle, profile, engines)))
        elif name == "CUDAExecutionProvider":
            providers.append((name, cuda_provider_options()))
        else:
            providers.append(name)
    return providers


def _log_skipped(profile: Profile, skipped: list[str], available: list[str], using: str) -> None:
    """One line that says what the profile wanted, what this ONNX Runtime has and why."""
    if not skipped:
        return
    from ..platform import ort_build

    build = ort_build()
    installed = ", ".join(f"{n} {v}" for n, v in sorted(build.distributions.items())) or "?"
    hint = ""
    if {"TensorrtExecutionProvider", "CUDAExecutionProvider"} & set(skipped):
        hint = (
            "; the GPU providers need onnxruntime-gpu (on a Jetson: NVIDIA's onnxruntime-gpu "
            "wheel for its JetPack, installed without the cpu extra)"
        )
    logger.warning(
        "profile %s: %s not in this ONNX Runtime build (%s; it has %s): running on %s%s",
        profile.name,
        " and ".join(skipped),
        installed,
        ", ".join(available),
        using,
        hint,
    )


class OnnxRuntimeRunner:
    def __init__(self, bundle: Bundle, profile: Profile, *, cache_dir: Path | None = None) -> None:
        ort = _import_ort()
        self.bundle = bundle
        self.profile = profile
        available = available_providers()
        usable, skipped = choose_providers(profile, available)
        _log_skipped(profile, skipped, available, usable[0])
        providers = session_providers(bundle, profile, usable, cache_dir, ort.__version__)
        if (
            profile.runtime.precision != bundle.manifest.precision
            and not bundle.manifest.model.demo
        ):
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
                str(bundle.encoder_path), sess_options=options, providers=providers
            )
        except Exception as exc:  # onnxruntime raises its own untyped Fail/InvalidGraph errors
            raise ProviderUnavailable(
                f"ONNX Runtime cannot open {bundle.encoder_path.name} with {usable}: {exc}"
            ) from exc
        self.provider = self.session.get_providers()[0]
        if self.provider != usable[0]:
            # ONNX Runtime drops a provider whose libraries fail to load (TensorRT's or CUDA's
            # on a box where they are missing or of another version) and goes on with the next.
            logger.warning(
                "ONNX Runtime could not start %s (its libraries are missing or of another "
                "version); running on %s",
                usable[0],
                self.provider,
            )
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
