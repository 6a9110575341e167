"""Runners execute the bundle's image encoder; one module per runtime family.

:func:`open_runner` picks the implementation the profile names. Every runner warms up once
at load so the first study (and systemd's watchdog) never waits for a compile.
"""

from __future__ import annotations

from ..bundle import Bundle
from ..profiles import Profile
from .base import Runner


def open_runner(bundle: Bundle, profile: Profile) -> Runner:
    if profile.runtime.runner == "onnxruntime":
        from .onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(bundle, profile)
    raise NotImplementedError(profile.runtime.runner)  # pragma: no cover - Literal guards this


__all__ = ["Runner", "open_runner"]
