"""Axial chest CT: which series, its slices as a volume in HU, slabs, encoder tensors.

The road a CT study takes (:class:`edge_agent.scoring.Scorer` drives it):

    slice headers ─▶ series (SeriesInstanceUID) ─▶ geometry: ImagePositionPatient projected
        on the normal of ImageOrientationPatient, sorted; mixed orientations, duplicate
        positions, gaps and too few slices are refused with a reason
    ─▶ selection: axial, slice thickness in range, enough slices; a lung kernel preferred,
        then original images, then the thinnest slices (``selection`` in the config)
    ─▶ HU from each slice's Modality LUT (RescaleSlope/Intercept)
    ─▶ slabs: maximum-intensity projections over ``slab_mm`` along the normal, one every
        ``stride_mm`` (the bundle's ``ct`` section)
    ─▶ window ─▶ [0, 1] ─▶ the bundle's preprocessing (pad, resize, normalise), done by
        :func:`edge_agent.imaging.preprocess` itself
    ─▶ encoder ─▶ slab scores ─▶ study score (max, or mean of the top k), and the slab that
        drove it

Two window conventions (``ct.convention`` in the bundle):

``lung_window``
    one lung window, centre -600 HU, width 1500 HU, as grey in all three channels.
``three_windows``
    MedGemma's CT convention: three windows as the RGB channels, (width/centre) 2250/-100,
    350/40 and 80/40 (Google-Health/medgemma#27).

The window is DICOM's LINEAR_EXACT, (HU - lower) / width clipped to [0, 1], followed by
:mod:`edge_agent.imaging`'s min-max stretch as Google's MedSigLIP serving code applies it to
every image (for chest slabs, which always hold air and bone, the stretch leaves the narrow
windows unchanged). ``docs/benchmarks.md`` ("CT slabs") compares the two conventions.

Every reason given is short and PHI-free: series are named by SeriesNumber (or the end of
their UID), never by their description.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pydicom
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut

from . import imaging
from .bundle import CTInput, Preprocessing
from .config import SelectionSettings
from .dicom.errors import reading
from .dicom.uid import valid_uid
from .errors import ImageRejected, InputRejected

logger = logging.getLogger(__name__)

Convention = Literal["lung_window", "three_windows"]

# (centre, width) in HU
LUNG_WINDOW: tuple[float, float] = (-600.0, 1500.0)
THREE_WINDOWS: tuple[tuple[float, float], ...] = ((-100.0, 2250.0), (40.0, 350.0), (40.0, 80.0))

# Two slices closer than this along the normal are at the same position.
DUPLICATE_MM = 0.01
# A step between neighbouring slices more than this many times the usual one is a gap.
GAP_FACTOR = 1.5
# Direction cosines that differ by more than this are another orientation.
ORIENTATION_TOLERANCE = 1e-3


class SeriesRejected(InputRejected):
    """A CT series that cannot be scored as a volume (the reason says why)."""


@dataclass(frozen=True)
class CTSlice:
    """What selection and geometry need from one CT instance's header."""

    sop_instance_uid: str
    series_instance_uid: str | None
    path: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    thickness_mm: float | None
    kernel: str
    image_type: tuple[str, ...]
    rows: int
    columns: int
    pixel_spacing: tuple[float, float] | None
    series_number: int | None


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    if value is None or isinstance(value, str | bytes) or not isinstance(value, Sequence):
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError, OverflowError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def _number(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return out if math.isfinite(out) else None


def slice_from_dataset(ds: pydicom.Dataset, path: str = "") -> CTSlice:
    """A CT header as a :class:`CTSlice` (tolerant: malformed optional values become None).

    Raises :class:`InputRejected` when the SOPInstanceUID or the image size is missing.
    """
    with reading("corrupt DICOM element ({error})"):  # values are parsed on first access
        sop = valid_uid(ds.get("SOPInstanceUID"))
        series = valid_uid(ds.get("SeriesInstanceUID"))
        position = _floats(ds.get("ImagePositionPatient"), 3)
        orientation = _floats(ds.get("ImageOrientationPatient"), 6)
        spacing = _floats(ds.get("PixelSpacing"), 2)
        thickness = _number(ds.get("SliceThickness"))
        kernel_value = ds.get("ConvolutionKernel")
        image_type_value = ds.get("ImageType")
        rows, columns = ds.get("Rows"), ds.get("Columns")
        series_number = _number(ds.get("SeriesNumber"))
    if sop is None:
        raise InputRejected("missing or malformed SOPInstanceUID")
    if not rows or not columns:
        raise InputRejected("missing Rows/Columns")
    if isinstance(kernel_value, MultiValue):
        kernel = "\\".join(str(k) for k in kernel_value)
    else:
        kernel = str(kernel_value or "")
    if isinstance(image_type_value, MultiValue | list | tuple):
        image_type = tuple(str(v).strip().upper() for v in image_type_value)
    else:
        image_type = tuple(p.strip().upper() for p in str(image_type_value or "").split("\\") if p)
    return CTSlice(
        sop_instance_uid=sop,
        series_instance_uid=series,
        path=path,
        position=position,  # type: ignore[arg-type]
        orientation=orientation,  # type: ignore[arg-type]
        thickness_mm=thickness if thickness is not None and thickness > 0 else None,
        kernel=kernel.strip(),
        image_type=image_type,
        rows=int(rows),
        columns=int(columns),
        pixel_spacing=spacing,  # type: ignore[arg-type]
        series_number=int(series_number) if series_number is not None else None,
    )


def series_name(slices: Sequence[CTSlice]) -> str:
    """'series 3' (SeriesNumber), else the end of the SeriesInstanceUID; never its description."""
    first = slices[0]
    if first.series_number is not None:
        return f"series {first.series_number}"
    uid = first.series_instance_uid or ""
    return f"series …{uid[-12:]}" if uid else "series without SeriesInstanceUID"


# --- geometry --------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Slices of one series in order along the slice normal (ascending projection)."""

    slices: tuple[CTSlice, ...]
    normal: tuple[float, float, float]
    positions_mm: tuple[float, ...]
    spacing_mm: float

    @property
    def axial_angle_degrees(self) -> float:
        """Angle between the slice normal and the patient's head-foot (z) axis."""
        return math.degrees(math.acos(min(1.0, abs(self.normal[2]))))


def geometry(slices: Sequence[CTSlice]) -> Geometry:
    """Order one series' slices along its normal; raise :class:`SeriesRejected` when they do not
    form a regular volume (missing or mixed orientation, duplicate positions, gaps, mixed image
    sizes, fewer than 2 slices)."""
    if len(slices) < 2:
        raise SeriesRejected(f"only {len(slices)} slice")
    if any(s.orientation is None for s in slices):
        raise SeriesRejected("slices without ImageOrientationPatient")
    if any(s.position is None for s in slices):
        raise SeriesRejected("slices without ImagePositionPatient")
    if len({(s.rows, s.columns) for s in slices}) > 1:
        raise SeriesRejected("slices of different sizes")
    orientations = np.asarray([s.orientation for s in slices], dtype=np.float64)
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        raise SeriesRejected("mixed slice orientations")
    row, col = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row, col)
    length = float(np.linalg.norm(normal))
    if not 0.9 < length < 1.1 or abs(float(row @ col)) > 0.05:
        raise SeriesRejected("ImageOrientationPatient is not two orthogonal unit vectors")
    normal /= length
    projected = np.asarray([s.position for s in slices], dtype=np.float64) @ normal
    order = np.argsort(projected, kind="stable")
    positions = projected[order]
    steps = np.diff(positions)
    duplicates = int((steps < DUPLICATE_MM).sum())
    if duplicates:
        raise SeriesRejected(
            f"{duplicates} duplicate slice position(s) (several acquisitions in one series?)"
        )
    spacing = float(np.median(steps))
    big = steps > GAP_FACTOR * spacing
    if big.any():
        worst = float(steps.max())
        raise SeriesRejected(
            f"gap of {worst:.1f} mm between slices (usual spacing {spacing:.2f} mm)"
        )
    return Geometry(
        slices=tuple(slices[i] for i in order),
        normal=(float(normal[0]), float(normal[1]), float(normal[2])),
        positions_mm=tuple(float(p) for p in positions),
        spacing_mm=spacing,
    )


# --- selection -------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesChoice:
    """A CT series that passed the selection rules, with what ranked it."""

    series_instance_uid: str
    geometry: Geometry
    thickness_mm: float
    kernel: str
    lung_kernel: bool
    original: bool

    @property
    def name(self) -> str:
        return series_name(self.geometry.slices)

    def rank(self) -> tuple[bool, bool, float, int, str]:
        return (
            not self.lung_kernel,
            not self.original,
            self.thickness_mm,
            -len(self.geometry.slices),
            self.series_instance_uid,
        )


def is_lung_kernel(kernel: str, patterns: Sequence[str]) -> bool:
    """Whether a ConvolutionKernel (any of its values) matches a lung-kernel pattern."""
    values = [k.strip().upper() for k in kernel.split("\\") if k.strip()]
    return any(fnmatch.fnmatchcase(v, p.upper()) for v in values for p in patterns)


def _check_series(slices: Sequence[CTSlice], rules: SelectionSettings) -> SeriesChoice:
    first = slices[0]
    if first.series_instance_uid is None:
        raise SeriesRejected("slices without SeriesInstanceUID")
    if any("LOCALIZER" in s.image_type for s in slices):
        raise SeriesRejected("localizer (scout) images")
    geo = geometry(slices)
    if geo.axial_angle_degrees > rules.ct_axial_tolerance_degrees:
        raise SeriesRejected(
            f"not axial (slice normal {geo.axial_angle_degrees:.0f} degrees from head-foot)"
        )
    if len(slices) < rules.ct_min_slices:
        raise SeriesRejected(f"{len(slices)} slices, at least {rules.ct_min_slices} needed")
    thicknesses = {s.thickness_mm for s in slices}
    thickness = max((t for t in thicknesses if t is not None), default=None)
    if thickness is None:
        thickness = geo.spacing_mm  # no SliceThickness: the spacing is the best guess
    lo, hi = rules.ct_min_slice_thickness_mm, rules.ct_max_slice_thickness_mm
    if not lo <= thickness <= hi:
        raise SeriesRejected(f"slice thickness {thickness:g} mm outside {lo:g}-{hi:g} mm")
    kernel = first.kernel
    return SeriesChoice(
        series_instance_uid=first.series_instance_uid,
        geometry=geo,
        thickness_mm=thickness,
        kernel=kernel,
        lung_kernel=is_lung_kernel(kernel, rules.ct_lung_kernels),
        original=all(s.image_type[:1] != ("DERIVED",) for s in slices),
    )


def select_series(
    slices: Sequence[CTSlice], rules: SelectionSettings
) -> tuple[list[SeriesChoice], list[str]]:
    """(usable series, best first; one 'series N: why not' line per unusable series)."""
    by_series: dict[str | None, list[CTSlice]] = defaultdict(list)
    for s in slices:
        by_series[s.series_instance_uid].append(s)
    usable: list[SeriesChoice] = []
    refused: list[str] = []
    for members in by_series.values():
        try:
            usable.append(_check_series(members, rules))
        except SeriesRejected as exc:
            refused.append(f"{series_name(members)}: {exc.reason}")
    usable.sort(key=SeriesChoice.rank)
    return usable, sorted(refused)


def no_series_reason(refused: Sequence[str], limit: int = 3) -> str:
    """The not_scored reason when no CT series is suitable."""
    if not refused:
        return "no CT series suitable for lung nodules"
    shown = "; ".join(refused[:limit])
    more = f"; {len(refused) - limit} more" if len(refused) > limit else ""
    return f"no CT series suitable for lung nodules ({shown}{more})"


# --- pixels ----------------------------------------------------------------------------


def slice_hu(ds: pydicom.Dataset) -> np.ndarray:
    """One slice in Hounsfield units, int16 (rows, cols): its Modality LUT (RescaleSlope and
    RescaleIntercept, or a Modality LUT Sequence) applied to the stored values, rounded.
    Raises :class:`ImageRejected` for pixel data that cannot be used."""
    samples = ds.get("SamplesPerPixel", 1)
    if samples not in (1, None) or str(ds.get("PhotometricInterpretation", "")).strip() not in (
        "MONOCHROME1",
        "MONOCHROME2",
        "",
    ):
        raise ImageRejected("colour CT slice: its values are not Hounsfield units")
    pixels = imaging.decode_pixels(ds)
    with reading("cannot apply the Modality LUT: {message}", rejected=ImageRejected):
        hu = apply_modality_lut(pixels, ds)
    hu = np.asarray(hu, dtype=np.float64)
    if not np.all(np.isfinite(hu)):
        raise ImageRejected("Modality LUT gives non-finite values")
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)


# --- slabs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Slab:
    """Slices ``first``..``last`` (inclusive, in geometry order) projected into one image."""

    index: int
    first: int
    last: int
    start_mm: float
    end_mm: float


def plan_slabs(positions_mm: Sequence[float], slab_mm: float, stride_mm: float) -> list[Slab]:
    """Slabs over sorted slice positions: a slab starting at ``p0 + k * stride_mm`` holds the
    slices with positions in ``[start, start + slab_mm)`` (at least one). A slab that would
    add no slice beyond the previous one (the tail of the series) is left out, so no slab is
    a subset of its predecessor, and with ``stride_mm <= slab_mm`` (the bundle's ``ct``
    section requires it) every slice is in at least one slab."""
    if not positions_mm:
        return []
    p = np.asarray(positions_mm, dtype=np.float64)
    # Positions are rounded in headers (often to 0.1 mm or less): slab edges get a tolerance
    # of a tenth of the spacing, so a rounded position does not shift a slice out of a slab.
    tol = 0.1 * float(np.median(np.diff(p))) if len(p) > 1 else 0.0
    slabs: list[Slab] = []
    previous_last = -1
    k = 0
    while previous_last < len(p) - 1:
        start = p[0] + k * stride_mm
        k += 1
        first = int(np.searchsorted(p, start - tol, side="left"))
        last = int(np.searchsorted(p, start + slab_mm - tol, side="left")) - 1
        last = max(last, first)  # a slab thinner than the spacing still holds one slice
        if first >= len(p):
            break
        if last <= previous_last:
            continue
        slabs.append(Slab(len(slabs), first, last, float(p[first]), float(p[last])))
        previous_last = last
    return slabs


def iter_slab_images(
    slabs: Sequence[Slab], read: Callable[[int], np.ndarray]
) -> Iterator[tuple[Slab, np.ndarray]]:
    """(slab, maximum-intensity projection in HU) for each slab in order; ``read(i)`` gives
    slice ``i`` in HU. Only the slices of the current slab are held in memory."""
    held: dict[int, np.ndarray] = {}
    for slab in slabs:
        for i in [i for i in held if i < slab.first]:
            del held[i]
        for i in range(slab.first, slab.last + 1):
            if i not in held:
                held[i] = read(i)
        yield slab, max_projection(held[i] for i in range(slab.first, slab.last + 1))


def max_projection(slices: Iterable[np.ndarray]) -> np.ndarray:
    """The maximum-intensity projection of ``slices`` (HU, one shape), as a new array.
    InputRejected when there are none."""
    mip: np.ndarray | None = None
    for image in slices:
        if mip is None:
            mip = image.copy()
        else:
            np.maximum(mip, image, out=mip)
    if mip is None:
        raise InputRejected("the CT slab has no slices")
    return mip


def _window_dataset(rows: int, columns: int, centre: float, width: float) -> pydicom.Dataset:
    """A header for a slab image whose 'stored values' are HU: no rescale, one window."""
    ds = pydicom.Dataset()
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = f"{centre:g}"
    ds.WindowWidth = f"{width:g}"
    ds.VOILUTFunction = "LINEAR_EXACT"
    return ds


def _windowed_channel(
    hu: np.ndarray, window: tuple[float, float], spec: Preprocessing
) -> np.ndarray:
    """(3, N, N): the slab through one window and the bundle's preprocessing."""
    centre, width = window
    lower = centre - width / 2
    lo = float(np.clip((float(hu.min()) - lower) / width, 0.0, 1.0))
    hi = float(np.clip((float(hu.max()) - lower) / width, 0.0, 1.0))
    if hi - lo > 1e-6:
        try:
            return imaging.preprocess(
                _window_dataset(hu.shape[0], hu.shape[1], centre, width), spec, pixels=hu
            )
        except ImageRejected:
            logger.debug("no contrast left in window %s/%s; constant channel", width, centre)
    # Everything on one side of the window: a constant image (the window's own output).
    n = spec.input_size
    out = np.empty((3, n, n), dtype=np.float32)
    for channel, (mean, std) in enumerate(zip(spec.mean, spec.std, strict=True)):
        out[channel] = (np.float32(hi) - np.float32(mean)) / np.float32(std)
    return out


def slab_tensor(hu: np.ndarray, convention: Convention, spec: Preprocessing) -> np.ndarray:
    """float32 (3, N, N) encoder input for a slab image in HU (int16 2-D)."""
    if convention == "lung_window":
        return _windowed_channel(hu, LUNG_WINDOW, spec)
    n = spec.input_size
    out = np.empty((3, n, n), dtype=np.float32)
    for channel, window in enumerate(THREE_WINDOWS):
        out[channel] = _windowed_channel(hu, window, spec)[channel]
    return out


def aggregate(slab_scores: np.ndarray, ct: CTInput) -> tuple[float, int]:
    """(study score, index of the slab that drove it) from one finding's slab scores.

    ``max``: the best slab. ``top_k_mean``: the mean of the ``top_k`` best slabs (all of them
    when fewer); the slab named is the best one.
    """
    if slab_scores.ndim != 1 or len(slab_scores) == 0:
        raise ValueError("aggregate needs a non-empty 1-D array of slab scores")
    best = int(np.argmax(slab_scores))
    if ct.aggregate == "max":
        return float(slab_scores[best]), best
    k = min(ct.top_k, len(slab_scores))
    top = np.sort(slab_scores)[::-1][:k]
    return float(top.mean()), best
