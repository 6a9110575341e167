"""Runners execute the bundle's image encoder; one module per runtime family.

:func:`open_runner` picks the implementation the profile names. Every runner warms up once
at load so the first study (and systemd's watchdog) never waits for a compile.
"""

from __future__ import annotations

from pathlib import Path

from ..bundle import Bundle
from ..profiles import Profile
from .base import Runner


def open_runner(bundle: Bundle, profile: Profile, *, cache_dir: Path | None = None) -> Runner:
    """The runner the profile names, loaded and warmed up.

    ``cache_dir`` (the daemon passes a folder in ``state_dir``) is where ONNX Runtime's
    TensorRT execution provider keeps the engines it builds; without it they are rebuilt at
    every start. The native TensorRT runner (``runner = "tensorrt"``) is imported only here.
    """
    if profile.runtime.runner == "onnxruntime":
        from .onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(bundle, profile, cache_dir=cache_dir)
    if profile.runtime.runner == "tensorrt":
        from .tensorrt import TensorRTRunner

        return TensorRTRunner(bundle, profile)
    raise NotImplementedError(profile.runtime.runner)  # pragma: no cover - Literal guards this


__all__ = ["Runner", "open_runner"]
