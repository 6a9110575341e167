"""Pixel data → model tensor, exactly as MedSigLIP was trained on chest radiographs.

The chain (Google-Health/medsiglip ``generic_dicom_handler``, for CR/DX):

    stored values (one frame; colour → BT.601 luma, see :func:`decode_pixels`)
                  ─▶ Modality LUT (RescaleSlope/Intercept or Modality LUT Sequence)
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
from functools import lru_cache
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from .bundle import Preprocessing
from .dicom.errors import failure_name, reading
from .dicom.uid import valid_uid
from .errors import ImageRejected

logger = logging.getLogger(__name__)

GREYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})
# Three-sample colour images, converted to grey (BT.601 luma) by decode_pixels.
COLOUR = frozenset(
    {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422"}
)

# Native little-endian encodings: their PixelData bytes are the pixel array as stored.
_NATIVE_LITTLE_ENDIAN = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)
_NATIVE = _NATIVE_LITTLE_ENDIAN | {ExplicitVRBigEndian}

# Decoder plugins never used in-process (see _decode_with_pydicom).
_UNSAFE_PLUGINS = frozenset({"gdcm"})

# More pixels per frame than this (8192 x 8192) is no radiograph: a corrupt Rows/Columns,
# refused before a decoder allocates memory for it.
_MAX_FRAME_PIXELS = 1 << 26

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
    """One image's stored values, 2-D (rows, cols), integer dtype: what the model sees as grey.

    - Greyscale (MONOCHROME1/2, one sample per pixel): the stored values. Native
      little-endian pixel data is returned as a read-only view of ``ds.PixelData`` (no copy)
      when the unused high bits are clean, which is what ``ds.pixel_array`` would return
      after masking them; everything else (big endian, deflate, JPEG baseline/extended/
      lossless, JPEG-LS, JPEG 2000, RLE) is decoded by pydicom and its plugins (pylibjpeg,
      GDCM).
    - Colour (RGB or YBR_*, three samples): converted to grey as ITU-R BT.601 luma,
      Y = 0.299 R + 0.587 G + 0.114 B rounded to the stored integer type (what
      ``cv2.COLOR_RGB2GRAY`` and PIL's ``convert("L")`` compute, i.e. how an RGB image
      becomes grey in a PIL/cv2 training pipeline). YBR data that the decoder leaves in
      YBR (YBR_FULL, YBR_FULL_422, YBR_ICT, YBR_PARTIAL_*) already carries that luma as
      its Y channel, which is used as is. The Modality LUT and VOI window are greyscale
      concepts in DICOM and are not applied to colour images (:func:`to_unit_range`
      stretches their luma min–max).
    - Multi-frame: NumberOfFrames 1 is a single image. With more frames the first frame
      is used only when every frame holds exactly the same pixels (one image stored as
      several frames); any other multi-frame object (cine, tomosynthesis, dual energy, a
      stack of slices) is rejected, because which frame is the projection to triage cannot
      be told from the header.

    Raises :class:`ImageRejected` for: no pixel data, other photometric interpretations
    (PALETTE COLOR) or sample counts, frames that differ, pixel data shorter than the
    header says, images too large to be real (more than 2**26 pixels per frame), decoder
    failures and constant images (a decoder that silently zero-fills gives one).
    """
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise ImageRejected("float pixel data is not supported")
        raise ImageRejected("no pixel data")
    _check_pixel_element(ds)
    frames = _number_of_frames(ds)
    samples, photometric, _ = _pixel_kind(ds)
    rows = _int_element(ds, "Rows")
    columns = _int_element(ds, "Columns")
    bits_allocated = _int_element(ds, "BitsAllocated")
    bits_stored = _int_element(ds, "BitsStored", default=bits_allocated)
    signed = _int_element(ds, "PixelRepresentation") == 1
    if rows < 1 or columns < 1:
        raise ImageRejected(f"image has {rows}x{columns} pixels")
    if rows * columns > _MAX_FRAME_PIXELS:
        raise ImageRejected(f"image has {rows}x{columns} pixels, too many to be a radiograph")
    if bits_allocated not in (1, 8, 16, 32):
        raise ImageRejected(f"BitsAllocated {bits_allocated} is not supported")
    if not 1 <= bits_stored <= bits_allocated:
        raise ImageRejected(f"BitsStored {bits_stored} does not fit BitsAllocated {bits_allocated}")

    syntax = _transfer_syntax(ds)
    if syntax in _NATIVE:
        _check_native_length(ds, rows, columns, frames, samples, bits_allocated, photometric)
    pixels = None
    if syntax in _NATIVE_LITTLE_ENDIAN and samples == 1 and frames == 1 and bits_allocated >= 8:
        pixels = _native_view(ds, rows, columns, bits_allocated, signed)
        lo, hi = _min_max(pixels)
        # pydicom masks unused high bits (and sign-extends); values inside the BitsStored
        # range are unchanged by that, so the view is only usable when all of them are.
        first = -(1 << (bits_stored - 1)) if signed else 0
        if lo < first or hi > first + (1 << bits_stored) - 1:
            logger.debug("unused high bits are set; letting pydicom mask them")
            pixels = None
    if pixels is None:
        pixels = _decode_with_pydicom(ds, syntax, frames, samples, photometric)
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


def rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an (rows, cols, 3) RGB array, rounded to its integer dtype.

    Y = 0.299 R + 0.587 G + 0.114 B: cv2's ``COLOR_RGB2GRAY`` for 8- and 16-bit samples,
    the same formula in floating point (rounded half to even) for other integer types.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise TypeError("rgb must be a (rows, cols, 3) array")
    if rgb.dtype in (np.uint8, np.uint16):
        return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    luma = np.rint(rgb @ np.array([0.299, 0.587, 0.114]))
    info = np.iinfo(rgb.dtype)
    return np.clip(luma, info.min, info.max).astype(rgb.dtype)


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
    with reading(f"malformed {keyword}", rejected=ImageRejected):  # raised on first access
        return ds.get(keyword)


def _int_element(ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
    value = _element(ds, keyword)
    if value is None or value == "":
        if default is None:
            raise ImageRejected(f"missing {keyword}")
        return default
    with reading(f"malformed {keyword}", rejected=ImageRejected):
        return int(value)


def _number_of_frames(ds: pydicom.Dataset) -> int:
    frames = _int_element(ds, "NumberOfFrames", default=1)
    if frames < 1:
        raise ImageRejected(f"NumberOfFrames {frames}")
    return frames


def _photometric(ds: pydicom.Dataset) -> str:
    return str(_element(ds, "PhotometricInterpretation") or "").strip().upper()


def _check_greyscale(photometric: str) -> None:
    if photometric not in GREYSCALE:
        raise ImageRejected(
            f"PhotometricInterpretation {photometric or '(missing)'} is not greyscale"
        )


def _pixel_kind(ds: pydicom.Dataset) -> tuple[int, str, bool]:
    """(SamplesPerPixel, PhotometricInterpretation, colour?) for the images we can use."""
    samples = _int_element(ds, "SamplesPerPixel", default=1)
    photometric = _photometric(ds)
    if samples == 1:
        _check_greyscale(photometric)
        return samples, photometric, False
    if samples == 3:
        if photometric not in COLOUR:
            raise ImageRejected(
                f"PhotometricInterpretation {photometric or '(missing)'} with 3 samples "
                "per pixel is not supported"
            )
        return samples, photometric, True
    raise ImageRejected(f"SamplesPerPixel {samples} is not supported (1 or 3)")


def _transfer_syntax(ds: pydicom.Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    if value:
        return UID(str(value))
    # Tolerant reader: a file without (0002,0010) that pydicom could still parse has a
    # known encoding, and for native pixel data that is all the transfer syntax says.
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None or little is None:
        return None
    if little:
        return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return None if implicit else ExplicitVRBigEndian


def _check_pixel_element(ds: pydicom.Dataset) -> None:
    """Pixel Data is parsed lazily: a corrupt element (an unknown VR such as 'OT', a value of
    the wrong type) raises from pydicom on first access. Access it once here, so that it is a
    reason, not a crash; later accesses get the parsed value."""
    with reading("unreadable Pixel Data element ({error})", rejected=ImageRejected):
        ds.PixelData  # noqa: B018 - the access is the check


def _check_native_length(
    ds: pydicom.Dataset,
    rows: int,
    columns: int,
    frames: int,
    samples: int,
    bits_allocated: int,
    photometric: str,
) -> None:
    """Reject native pixel data shorter than the header says (never pad it with zeros)."""
    data = ds.PixelData or b""
    needed = (rows * columns * frames * samples * bits_allocated + 7) // 8
    if samples == 3 and photometric == "YBR_FULL_422":
        needed = needed // 3 * 2  # two luma samples share one Cb and one Cr
    if len(data) < needed:
        factors = "Rows x Columns"
        if frames > 1:
            factors += " x NumberOfFrames"
        if samples > 1:
            factors += " x SamplesPerPixel"
        raise ImageRejected(
            f"pixel data is {len(data)} bytes; {factors} x BitsAllocated need {needed}"
        )


def _native_view(
    ds: pydicom.Dataset, rows: int, columns: int, bits_allocated: int, signed: bool
) -> np.ndarray:
    """A zero-copy view of native little-endian single-frame greyscale pixel data (its
    length already checked)."""
    itemsize = bits_allocated // 8
    dtype = np.dtype(f"<{'i' if signed else 'u'}{itemsize}")
    view = np.frombuffer(ds.PixelData, dtype=dtype, count=rows * columns).reshape(rows, columns)
    return view.astype(dtype.newbyteorder("="), copy=False)  # no-op on little-endian hosts


def _decode_options(ds: pydicom.Dataset, samples: int, photometric: str) -> dict[str, Any]:
    """Decoder options that stand in for optional elements that are missing or odd."""
    options: dict[str, Any] = {"photometric_interpretation": photometric}
    if _element(ds, "BitsStored") in (None, ""):
        options["bits_stored"] = _int_element(ds, "BitsAllocated")
    if samples > 1 and _element(ds, "PlanarConfiguration") in (None, ""):
        options["planar_configuration"] = 0  # the only value JPEG-family data can have
    return options


def _decode_with_pydicom(
    ds: pydicom.Dataset, syntax: UID | None, frames: int, samples: int, photometric: str
) -> np.ndarray:
    """Decode with pydicom's decoder for the transfer syntax; one 2-D grey image.

    The plugins are tried in pydicom's order, leaving out GDCM: it calls abort() on some
    corrupt JPEG data (found by fuzzing), which would end the whole daemon and, because
    the study is scored again at the next start, keep ending it. pylibjpeg (libjpeg,
    openjpeg, rle) and pydicom's own RLE decoder cover every syntax GDCM does here.
    """
    if syntax is None:
        raise ImageRejected("cannot decode pixel data (no transfer syntax)")
    # The registered name, or the UID itself; a value that is no UID came from outside and
    # is never quoted (it could be anything written into the wrong element).
    name = syntax.name if valid_uid(syntax) == syntax else "malformed transfer syntax UID"
    with reading(f"cannot decode pixel data ({name}): {{error}}", rejected=ImageRejected):
        decoder = get_decoder(syntax)
    if decoder.is_native:
        plugins = [""]
    else:
        plugins = [p for p in decoder.available_plugins if p not in _UNSAFE_PLUGINS]
        if not plugins:
            raise ImageRejected(f"cannot decode pixel data ({name}): no decoder installed")
    options = _decode_options(ds, samples, photometric)
    failure = ""
    cause: BaseException | None = None
    for plugin in plugins:
        try:
            array, meta = _decode_first_frame(decoder, ds, frames, plugin, options)
        except BaseException as exc:
            # The next plugin may decode what this one could not; a decoder's panic (a
            # BaseException) must not end the scoring thread either (dicom/errors.py).
            failed = failure_name(exc)
            if failed is None:
                raise
            logger.debug("decoding %s with %r failed: %s", name, plugin, failed)
            failure, cause = failed, exc
        else:
            return _to_grey(array, meta, samples, name)
    raise ImageRejected(f"cannot decode pixel data ({name}): {failure}") from cause


def _decode_first_frame(
    decoder: Any, ds: pydicom.Dataset, frames: int, plugin: str, options: dict[str, Any]
) -> tuple[np.ndarray, dict[str, Any]]:
    """The first frame and its pixel properties; for several frames, only if all are equal."""
    if frames == 1:
        array, meta = decoder.as_array(ds, index=0, as_rgb=False, decoding_plugin=plugin, **options)
        return array, meta
    first: tuple[np.ndarray, dict[str, Any]] | None = None
    for array, meta in decoder.iter_array(ds, as_rgb=False, decoding_plugin=plugin, **options):
        if first is None:
            first = array, meta
        elif not np.array_equal(array, first[0]):
            raise ImageRejected(
                f"multi-frame image ({frames} frames) whose frames differ; "
                "only single images are used"
            )
    if first is None:
        raise ValueError("no frame decoded")
    return first


def _to_grey(array: np.ndarray, meta: dict[str, Any], samples: int, name: str) -> np.ndarray:
    if samples == 1:
        if array.ndim != 2:
            raise ImageRejected(f"decoded pixel array has {array.ndim} dimensions ({name})")
        return array
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageRejected(f"decoded colour array has shape {array.shape} ({name})")
    colour_space = str(meta.get("photometric_interpretation", "")).upper()
    if colour_space == "RGB":
        return rgb_to_grey(array)
    if colour_space.startswith("YBR_") and colour_space != "YBR_RCT":
        return np.ascontiguousarray(array[:, :, 0])  # Y is the BT.601 luma
    raise ImageRejected(f"decoded colour space {colour_space or '(unknown)'} is not supported")


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
    _, photometric, colour = _pixel_kind(ds)
    lo, hi = _min_max(pixels)
    if hi - lo + 1 <= max(_MAX_TABLE, pixels.size):
        values = np.arange(lo, hi + 1, dtype=np.int64).astype(pixels.dtype)
        index, offset, all_present = pixels, lo, False
    else:  # 32-bit pixel data spread over a huge range
        values, inverse = np.unique(pixels, return_inverse=True)
        index, offset, all_present = inverse.reshape(pixels.shape), 0, True

    # Colour images (already grey: luma) have no Modality LUT or VOI window in DICOM.
    raw = values.astype(np.float64) if colour else _lut_chain(ds, values)
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
    # SIGMOID far from its centre overflows exp() to inf, which gives the right limit.
    lut = "cannot apply the Modality LUT / VOI window: {message}"
    with reading(lut, rejected=ImageRejected), np.errstate(over="ignore"):
        out = apply_modality_lut(values, ds)
        if ds.get("VOILUTSequence") and out.dtype.kind == "f" and np.all(out == np.floor(out)):
            # A VOI LUT indexes integers (pydicom warns on float input): a rescale with
            # integral results goes in as integers, which gives the identical result.
            out = out.astype(np.int64)
        out = apply_voi_lut(out, ds)
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
