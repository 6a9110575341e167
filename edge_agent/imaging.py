"""Pixel data → model tensor, exactly as MedSigLIP was trained on chest radiographs.

The chain (Google-Health/medsiglip ``generic_dicom_handler``, for CR/DX):

    stored values ─▶ Modality LUT (RescaleSlope/Intercept or Modality LUT Sequence)
                  ─▶ VOI LUT Sequence or the first WindowCenter/WindowWidth (VOILUTFunction
                     LINEAR, LINEAR_EXACT or SIGMOID), when present
                  ─▶ min–max stretch to [0, 1] ─▶ 1 - x for MONOCHROME1
                  ─▶ zero-pad to square (centred; the odd pixel goes at the end)
                  ─▶ cv2.resize INTER_AREA to the bundle's input size
                  ─▶ (x - mean) / std per channel, grey copied to 3 channels

The LUT semantics are pydicom's own (:func:`pydicom.pixels.apply_modality_lut`,
:func:`pydicom.pixels.apply_voi_lut`). Two things make it fast without changing the result
(``benchmarks/preprocess.py`` measures both against the straightforward pipeline):

- Everything up to the stretch depends on the stored value alone, so it is evaluated once
  per stored value between the image's minimum and maximum (a few thousand entries for a
  12-bit image), and the image goes through that table instead of through float64 LUT maths.
- INTER_AREA is separable. Its vertical pass is done here, a band of rows at a time right
  after the table lookup while the band is in cache, with cv2's own weights
  (``computeResizeAreaTab``); cv2.resize then does the horizontal pass on the few remaining
  rows. The padded full-size float image is never built. The result equals cv2.resize on the
  padded image to float32 rounding (about 1e-7; the tests hold it to cv2).

Every input that cannot be used raises :class:`~edge_agent.errors.ImageRejected` with a short,
PHI-free reason.
"""

from __future__ import annotations

import logging
import math
import struct
from functools import lru_cache
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from .bundle import Preprocessing
from .errors import ImageRejected

logger = logging.getLogger(__name__)

GREYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})

# Native little-endian encodings: their PixelData bytes are the pixel array as stored.
_NATIVE_LITTLE_ENDIAN = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)
_NATIVE = _NATIVE_LITTLE_ENDIAN | {ExplicitVRBigEndian}

# What pydicom and its decoder plugins raise on data they cannot decode. RuntimeError is
# pydicom's "all plugins failed", NotImplementedError "no plugin for this syntax",
# AttributeError a missing element the decoder needs.
_DECODE_ERRORS = (
    ValueError,
    RuntimeError,
    NotImplementedError,
    AttributeError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    EOFError,
    struct.error,
)

# What the LUT functions raise on malformed LUT/window elements (e.g. LINEAR window width < 1,
# an unknown VOILUTFunction, a LUT descriptor with an unsupported depth, short LUT data).
_LUT_ERRORS = (
    ValueError,
    NotImplementedError,
    AttributeError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    struct.error,
)

# Stored-value ranges wider than this (only possible with 32-bit pixel data) are tabulated
# over the values actually present instead of over [min, max].
_MAX_TABLE = 1 << 20

# Pixels per chunk when pushing a whole image through the table (to_unit_range): the int
# index chunk stays in cache, so converting stored values to indices costs almost nothing.
_CHUNK_PIXELS = 1 << 16

# Output rows per band in the fused table lookup + vertical INTER_AREA pass. 8 rows of a
# 3000 -> 448 resize read ~54 source rows (0.5 MB as float32).
_BAND = 8


def decode_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """Stored pixel values of a single-frame greyscale image, 2-D (rows, cols), integer dtype.

    Native little-endian pixel data is returned as a read-only view of ``ds.PixelData``
    (no copy) when the unused high bits are clean, which is what ``ds.pixel_array`` would
    return after masking them; everything else is decoded by pydicom and its plugins.

    Raises :class:`ImageRejected` for: no pixel data, more than one frame, colour images,
    pixel data shorter than the header says, decoder failures and constant images (a decoder
    that silently zero-fills gives one).
    """
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise ImageRejected("float pixel data is not supported")
        raise ImageRejected("no pixel data")
    frames = _number_of_frames(ds)
    if frames > 1:
        raise ImageRejected(f"multi-frame image ({frames} frames); only single frames are used")
    samples = _int_element(ds, "SamplesPerPixel", default=1)
    photometric = _photometric(ds)
    if samples != 1:
        raise ImageRejected(
            f"colour image (SamplesPerPixel {samples}, {photometric or 'no'} "
            "PhotometricInterpretation) is not supported yet"
        )
    _check_greyscale(photometric)
    rows = _int_element(ds, "Rows")
    columns = _int_element(ds, "Columns")
    bits_allocated = _int_element(ds, "BitsAllocated")
    bits_stored = _int_element(ds, "BitsStored", default=bits_allocated)
    signed = _int_element(ds, "PixelRepresentation") == 1
    if rows < 1 or columns < 1:
        raise ImageRejected(f"image has {rows}x{columns} pixels")
    if not 1 <= bits_stored <= bits_allocated:
        raise ImageRejected(f"BitsStored {bits_stored} does not fit BitsAllocated {bits_allocated}")

    syntax = _transfer_syntax(ds)
    pixels = None
    if syntax in _NATIVE and bits_allocated >= 8:
        pixels = _native_view(ds, rows, columns, bits_allocated, signed, syntax)
    if pixels is not None:
        lo, hi = _min_max(pixels)
        # pydicom masks unused high bits (and sign-extends); values inside the BitsStored
        # range are unchanged by that, so the view is only usable when all of them are.
        first = -(1 << (bits_stored - 1)) if signed else 0
        if lo < first or hi > first + (1 << bits_stored) - 1:
            logger.debug("unused high bits are set; letting pydicom mask them")
            pixels = None
    if pixels is None:
        pixels = _decode_with_pydicom(ds, syntax)
        if pixels.shape != (rows, columns):
            raise ImageRejected(
                f"decoded pixel array has shape {pixels.shape}, Rows/Columns say {rows}x{columns}"
            )
        if not np.issubdtype(pixels.dtype, np.integer):
            raise ImageRejected(f"decoded pixel array has non-integer type {pixels.dtype}")
        lo, hi = _min_max(pixels)
    if lo == hi:
        raise ImageRejected("all pixels have the same stored value (blank or failed decode)")
    return pixels


def to_unit_range(ds: pydicom.Dataset, pixels: np.ndarray) -> np.ndarray:
    """float32 (rows, cols) in [0, 1]: Modality LUT, VOI LUT/window, min–max stretch and
    MONOCHROME1 inversion (the image before pad and resize)."""
    _check_pixels(pixels)
    table, offset, index = _unit_table(ds, pixels)
    out = np.empty(pixels.shape, dtype=np.float32)
    _apply_table(table, index, offset, out)
    return out


def preprocess(
    ds: pydicom.Dataset, spec: Preprocessing, pixels: np.ndarray | None = None
) -> np.ndarray:
    """float32 (3, spec.input_size, spec.input_size), C-contiguous, ready for the encoder.

    ``pixels``: stored values already decoded by :func:`decode_pixels` (or an equivalent);
    decoded from ``ds`` when omitted. A ``pixels`` that is not a 2-D integer array is a
    programming error (TypeError), not a rejected image.
    """
    if pixels is None:
        pixels = decode_pixels(ds)
    else:
        _check_pixels(pixels)
    table, offset, index = _unit_table(ds, pixels)

    rows, columns = pixels.shape
    if spec.pad_to_square:
        height = width = max(rows, columns)
        top, left = (height - rows) // 2, (width - columns) // 2  # odd pixel at the end
    else:
        height, width, top, left = rows, columns, 0, 0
    n = spec.input_size
    if height >= n and width >= n:
        image = _area_downscale(table, index, offset, (height, width), (top, left), n)
    else:  # enlarging (INTER_AREA is then not an area average): build the padded image
        padded = np.zeros((height, width), dtype=np.float32)
        padded[top : top + rows, left : left + columns] = _lookup(table, index, offset)
        image = cv2.resize(padded, (n, n), interpolation=cv2.INTER_AREA)

    out = np.empty((3, n, n), dtype=np.float32)
    for channel, (mean, std) in enumerate(zip(spec.mean, spec.std, strict=True)):
        np.subtract(image, np.float32(mean), out=out[channel])
        out[channel] /= np.float32(std)
    return out


# --- decoding ---------------------------------------------------------------------------


def _element(ds: pydicom.Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except (ValueError, TypeError, OverflowError, KeyError) as exc:  # raised on first access
        raise ImageRejected(f"malformed {keyword}") from exc


def _int_element(ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
    value = _element(ds, keyword)
    if value is None or value == "":
        if default is None:
            raise ImageRejected(f"missing {keyword}")
        return default
    try:
        return int(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ImageRejected(f"malformed {keyword}") from exc


def _number_of_frames(ds: pydicom.Dataset) -> int:
    return _int_element(ds, "NumberOfFrames", default=1)


def _photometric(ds: pydicom.Dataset) -> str:
    return str(_element(ds, "PhotometricInterpretation") or "").strip().upper()


def _check_greyscale(photometric: str) -> None:
    if photometric not in GREYSCALE:
        raise ImageRejected(
            f"PhotometricInterpretation {photometric or '(missing)'} is not greyscale"
        )


def _transfer_syntax(ds: pydicom.Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(value)) if value else None


def _native_view(
    ds: pydicom.Dataset, rows: int, columns: int, bits_allocated: int, signed: bool, syntax: UID
) -> np.ndarray | None:
    """A zero-copy view of native pixel data, or None where pydicom must decode it."""
    if bits_allocated % 8:
        return None
    itemsize = bits_allocated // 8
    data = ds.PixelData
    needed = rows * columns * itemsize
    if len(data) < needed:
        raise ImageRejected(
            f"pixel data is {len(data)} bytes; Rows x Columns x BitsAllocated need {needed}"
        )
    if syntax not in _NATIVE_LITTLE_ENDIAN or itemsize not in (1, 2, 4):
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{itemsize}")
    view = np.frombuffer(data, dtype=dtype, count=rows * columns).reshape(rows, columns)
    return view.astype(dtype.newbyteorder("="), copy=False)  # no-op on little-endian hosts


def _decode_with_pydicom(ds: pydicom.Dataset, syntax: UID | None) -> np.ndarray:
    name = syntax.name if syntax is not None else "no transfer syntax"
    try:
        pixels = ds.pixel_array
    except _DECODE_ERRORS as exc:
        logger.debug("decoding %s failed: %s", name, exc)
        raise ImageRejected(f"cannot decode pixel data ({name}): {type(exc).__name__}") from exc
    if pixels.ndim != 2:
        raise ImageRejected(f"decoded pixel array has {pixels.ndim} dimensions ({name})")
    return pixels


def _check_pixels(pixels: np.ndarray) -> None:
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 2:
        raise TypeError("pixels must be a 2-D numpy array of stored values")
    if not np.issubdtype(pixels.dtype, np.integer):
        raise TypeError(f"pixels must hold stored (integer) values, not {pixels.dtype}")
    if pixels.size == 0:
        raise ImageRejected("image has no pixels")


def _min_max(pixels: np.ndarray) -> tuple[int, int]:
    if pixels.dtype in (np.uint8, np.int8, np.uint16, np.int16, np.int32):
        lo, hi, _, _ = cv2.minMaxLoc(pixels)  # one pass, SIMD, ~0.3 ms for 7.5 Mpixel
        return int(lo), int(hi)
    return int(pixels.min()), int(pixels.max())


# --- the value table ---------------------------------------------------------------------


def _unit_table(ds: pydicom.Dataset, pixels: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """(table, offset, index): ``table[index - offset]`` is each pixel's value in [0, 1].

    ``index`` is ``pixels`` itself with ``offset`` its minimum or, for a stored-value range
    too wide to tabulate, the position of each pixel's value among the values present.
    """
    photometric = _photometric(ds)
    _check_greyscale(photometric)
    lo, hi = _min_max(pixels)
    if hi - lo + 1 <= max(_MAX_TABLE, pixels.size):
        values = np.arange(lo, hi + 1, dtype=np.int64).astype(pixels.dtype)
        index, offset, all_present = pixels, lo, False
    else:  # 32-bit pixel data spread over a huge range
        values, inverse = np.unique(pixels, return_inverse=True)
        index, offset, all_present = inverse.reshape(pixels.shape), 0, True

    raw = _lut_chain(ds, values)
    if not np.all(np.isfinite(raw)):
        raise ImageRejected("Modality LUT / VOI window give non-finite values")
    steps = np.diff(raw)
    if all_present or np.all(steps >= 0) or np.all(steps <= 0):
        # Monotonic: the extremes sit at the ends, at lo and hi, which are present.
        low, high = float(raw.min()), float(raw.max())
    else:  # a LUT that goes up and down: only the values present count
        used = _present(index, offset, len(raw))
        low, high = float(raw[used].min()), float(raw[used].max())
    if high <= low:
        raise ImageRejected("no contrast left after the Modality LUT and VOI window")

    unit = (raw - low) / (high - low)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return unit.astype(np.float32), offset, index


def _lut_chain(ds: pydicom.Dataset, values: np.ndarray) -> np.ndarray:
    """Modality LUT then VOI LUT/window (pydicom's semantics) over ``values``, as float64."""
    try:
        # SIGMOID far from its centre overflows exp() to inf, which gives the right limit.
        with np.errstate(over="ignore"):
            out = apply_modality_lut(values, ds)
            if ds.get("VOILUTSequence") and out.dtype.kind == "f" and np.all(out == np.floor(out)):
                # A VOI LUT indexes integers (pydicom warns on float input): a rescale with
                # integral results goes in as integers, which gives the identical result.
                out = out.astype(np.int64)
            out = apply_voi_lut(out, ds)
    except _LUT_ERRORS as exc:
        raise ImageRejected(f"cannot apply the Modality LUT / VOI window: {exc}") from exc
    return np.asarray(out, dtype=np.float64)


def _present(index: np.ndarray, offset: int, n: int) -> np.ndarray:
    """Which of the n table entries the image uses."""
    used = np.zeros(n, dtype=bool)
    step = max(1, _CHUNK_PIXELS // index.shape[1])
    for start in range(0, index.shape[0], step):
        used[np.subtract(index[start : start + step], offset, dtype=np.intp)] = True
    return used


def _lookup(table: np.ndarray, index: np.ndarray, offset: int) -> np.ndarray:
    """table[index - offset] as float32. np.take with native intp indices is about twice as
    fast as with uint16 ones (or fancy indexing); converting a band at a time is cheap."""
    return np.take(table, np.subtract(index, offset, dtype=np.intp))


def _apply_table(table: np.ndarray, index: np.ndarray, offset: int, out: np.ndarray) -> None:
    """out[...] = table[index - offset], a chunk of rows at a time (out C-contiguous)."""
    step = max(1, _CHUNK_PIXELS // index.shape[1])
    for start in range(0, index.shape[0], step):
        rows = slice(start, start + step)
        np.take(table, np.subtract(index[rows], offset, dtype=np.intp), out=out[rows])


# --- INTER_AREA --------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _area_weights(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cv2's INTER_AREA weights for shrinking ``source`` pixels to ``target`` (source >= target).

    A port of ``computeResizeAreaTab`` (opencv modules/imgproc/src/resize.cpp): entries
    (output index, source index, weight), sorted by output index, each output's sources
    consecutive. Fractions of a pixel under 1e-3 are dropped, as cv2 does.
    """
    scale = 1.0 / (target / source)  # cv2: scale = 1 / inv_scale, inv_scale = dsize / ssize
    entries: list[tuple[int, int, float]] = []
    for d in range(target):
        start = d * scale
        end = start + scale
        cell = min(scale, source - start)
        last = min(math.floor(end), source - 1)
        first = min(math.ceil(start), last)
        if first - start > 1e-3:
            entries.append((d, first - 1, (first - start) / cell))
        entries.extend((d, s, 1.0 / cell) for s in range(first, last))
        if end - last > 1e-3:
            entries.append((d, last, min(end - last, 1.0, cell) / cell))
    outputs, sources, weights = zip(*entries, strict=True)
    arrays = (
        np.asarray(outputs, dtype=np.intp),
        np.asarray(sources, dtype=np.intp),
        np.asarray(weights, dtype=np.float32),  # cv2 keeps them as float
    )
    for array in arrays:
        array.flags.writeable = False
    return arrays


def _area_downscale(
    table: np.ndarray,
    index: np.ndarray,
    offset: int,
    shape: tuple[int, int],
    origin: tuple[int, int],
    n: int,
) -> np.ndarray:
    """cv2.resize(padded, (n, n), interpolation=INTER_AREA) without building ``padded``.

    ``padded`` would be a zero image of ``shape`` holding ``table[index - offset]`` with its
    top-left corner at ``origin``; both sides of ``shape`` are at least ``n``. The vertical
    pass runs here over bands of image rows (padding rows contribute nothing), the horizontal
    pass is cv2's on the (n, width) result.
    """
    height, width = shape
    top, left = origin
    rows, columns = index.shape
    outputs, sources, weights = _area_weights(height, n)
    sources = sources - top
    inside = (sources >= 0) & (sources < rows)
    outputs, sources, weights = outputs[inside], sources[inside], weights[inside]
    bounds = np.searchsorted(outputs, np.arange(n + 1))  # output d: entries bounds[d]:bounds[d+1]

    reduced = np.zeros((n, width), dtype=np.float32)
    image_columns = reduced[:, left : left + columns]
    for band in range(0, n, _BAND):
        band_end = min(band + _BAND, n)
        first, last = bounds[band], bounds[band_end]
        if first == last:
            continue  # all padding
        r0, r1 = sources[first], sources[last - 1] + 1
        unit = _lookup(table, index[r0:r1], offset)
        for d in range(band, band_end):
            a, b = bounds[d], bounds[d + 1]
            if a < b:
                # sources[a:b] are consecutive rows; einsum's own loop, no BLAS threads
                np.einsum(
                    "k,kw->w",
                    weights[a:b],
                    unit[sources[a] - r0 : sources[b - 1] + 1 - r0],
                    out=image_columns[d],
                )
    return cv2.resize(reduced, (n, n), interpolation=cv2.INTER_AREA)
