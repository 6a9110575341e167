"""One mapping from what pydicom and its pixel decoders raise to our errors.

pydicom parses lazily and its decoder plugins are third-party code: a corrupt or truncated
file can raise from :func:`pydicom.dcmread`, from the first access to an element, from a
LUT function or from a decoder, with any of the built-in exceptions in :data:`MAPPED`
(found by fuzzing, ``tests/test_decoding.py``). Every read of DICOM data is wrapped in
:func:`reading`, which turns exactly these into :class:`~edge_agent.errors.InputRejected`
(or the caller's subclass, e.g. :class:`~edge_agent.errors.ImageRejected`) with a short
reason, as httpx maps httpcore's exceptions in one table (``map_exceptions``). A file that
raises one is rejected, never retried for ever; anything else (an ``OSError``, our own
bug) passes through unchanged. A reason names the exception's type; only the LUT functions'
messages are passed on (``{message}``, shortened), because they name the window or LUT
element at fault, which a type name cannot.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

from pydicom.errors import BytesLengthException, InvalidDicomError

from ..errors import InputRejected

MAPPED: dict[type[Exception], str] = {
    InvalidDicomError: "no DICM preamble and no recognisable data set: not DICOM",
    BytesLengthException: "a value whose length does not fit its VR",
    EOFError: "the data ends inside an element (a truncated file)",
    struct.error: "bytes that do not unpack as their VR says",
    zlib.error: "a truncated or corrupt deflated data set",
    ValueError: "a malformed value, length or LUT (pydicom's most common complaint)",
    TypeError: "a value of the wrong type for the VR or the decoder",
    KeyError: "an element (or a private dictionary entry) that is missing",
    AttributeError: "an element a decoder needs is missing",
    IndexError: "a sequence, LUT or frame shorter than the header says",
    OverflowError: "a number too large for its type",
    NotImplementedError: "an unknown VR, or a transfer syntax without a decoder",
    RuntimeError: "every decoder plugin failed on the pixel data",
}
"""The exception types a DICOM read may raise on bad data, with what each one means."""

MAPPED_TYPES: tuple[type[Exception], ...] = tuple(MAPPED)

MESSAGE_LIMIT = 120
"""The longest part of an exception's own text a reason quotes (``{message}``)."""

DECODER_PANIC = "PanicException"
"""A Rust decoder (pylibjpeg-rle, via PyO3) panics on some corrupt data with
``pyo3_runtime.PanicException``, a ``BaseException`` (it cannot be imported by name)."""


def failure_name(exc: BaseException) -> str | None:
    """How a reason names ``exc`` when it is what a DICOM read raises on bad data (its type's
    name; ``decoder panic`` for a decoder's panic), else None: not ours to map."""
    if isinstance(exc, InputRejected):
        return None  # already worded (e.g. by a check inside the read)
    if isinstance(exc, MAPPED_TYPES):
        return type(exc).__name__
    if type(exc).__name__ == DECODER_PANIC:
        return "decoder panic"
    return None


@contextmanager
def reading(
    reason: str,
    *,
    rejected: type[InputRejected] = InputRejected,
    not_dicom: str | None = None,
) -> Iterator[None]:
    """Turn what the block raises on bad DICOM data into ``rejected(reason)``.

    ``reason`` may hold ``{error}``, replaced by :func:`failure_name`
    (``"unreadable DICOM header ({error})"``), or ``{message}``, the exception's own text cut
    to :data:`MESSAGE_LIMIT` characters; without either the reason is used as it is.
    ``not_dicom``: the reason when the file is not DICOM at all (``InvalidDicomError``).
    The original exception is kept as ``__cause__``."""
    try:
        yield
    except BaseException as exc:
        name = failure_name(exc)
        if name is None:
            raise
        if not_dicom is not None and isinstance(exc, InvalidDicomError):
            raise rejected(not_dicom) from exc
        if "{message}" in reason:
            message = " ".join(str(exc).split())[:MESSAGE_LIMIT] or name
            reason = reason.replace("{message}", message)
        raise rejected(reason.replace("{error}", name)) from exc
