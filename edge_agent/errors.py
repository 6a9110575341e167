"""Every error the agent raises on purpose, in one place.

    EdgeTriageError                 base; carries ``exit_code`` for the CLI
    ├── ConfigError                 a setting is wrong (exit 2); names the key path
    ├── ResourceMissing             something needed is absent (exit 3)
    │   ├── BundleError             bundle missing, malformed or hashes do not match
    │   ├── ProviderUnavailable     no usable ONNX Runtime execution provider / runtime
    │   ├── BrokerUnreachable       the MQTT broker cannot be reached
    │   ├── CorruptState            the state database is damaged (``run`` sets it aside)
    │   └── ExtraMissing            an optional dependency (an ``[extra]``) is not installed
    ├── InputRejected               one input file cannot be used; ``reason`` says why
    │   └── ImageRejected           pixel data decodes to something unusable
    └── InferenceError              the runner failed on one study

Third-party exceptions (pydicom, onnxruntime, paho) are translated at the boundary with
``raise ... from exc`` so callers only need to know this hierarchy.
"""

from __future__ import annotations


class EdgeTriageError(Exception):
    """Base of all intended errors. ``exit_code`` follows the CLI contract."""

    exit_code = 1


class ConfigError(EdgeTriageError):
    """A configuration value is invalid. ``key`` is the dotted key path (``mqtt.port``)."""

    exit_code = 2

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class ResourceMissing(EdgeTriageError):
    exit_code = 3


class BundleError(ResourceMissing):
    """The engine bundle cannot be used; the message names the file at fault."""


class ProviderUnavailable(ResourceMissing):
    pass


class BrokerUnreachable(ResourceMissing):
    pass


class PacsUnreachable(ResourceMissing):
    """The PACS ([pacs]) does not answer C-ECHO or refuses what the agent sends."""


class CorruptState(ResourceMissing):
    """The state database file is damaged; ``detail`` is SQLite's word for it."""

    def __init__(self, path: object, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(
            f"state_dir: the state database {path} is damaged ({detail}); edge-agent run sets "
            "it aside (renamed .corrupt-<time>, never deleted) and starts with an empty state"
        )


class ExtraMissing(ResourceMissing):
    """An optional dependency is missing; the message says what to install."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"Python module {module!r} is missing: install it with "
            f"pip install 'edge-triage[{extra}]'"
        )


class InputRejected(EdgeTriageError):
    """One input cannot be used. ``reason`` is short, human-readable and free of PHI."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class ImageRejected(InputRejected):
    pass


class InferenceError(EdgeTriageError):
    pass


def describe(exc: BaseException) -> str:
    """A short, PHI-free account of ``exc`` for the status that goes out on MQTT.

    Our own errors and SQLite's say what went wrong without naming files ("database is
    locked"). An ``OSError`` says its ``strerror`` only: its ``str()`` carries the file
    name, and folders are often named after the patient. Anything else is a bug whose text
    could hold anything: its type only (the traceback is in the local log)."""
    import sqlite3  # here, not at import: errors.py is imported by everything

    if isinstance(exc, (EdgeTriageError, sqlite3.Error)):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or 'error'}"
    return f"{type(exc).__name__} (see the log)"
