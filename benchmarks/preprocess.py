"""Preprocessing benchmark: DICOM file → model tensor, ours against the straightforward pipeline.

    .venv/bin/python benchmarks/preprocess.py [--repeat 25] [--size 448]

Writes a synthetic 3000x2500 12-bit CR (uncompressed, structured: gradients and ellipses)
into a temporary folder in three variants (MONOCHROME2 with a window, MONOCHROME1 with a
window, MONOCHROME2 without one) and times, interleaved in the same run, from file path to
(3, 448, 448) tensor:

  baseline  pydicom.dcmread, ds.pixel_array, astype(float32), apply_modality_lut,
            apply_voi_lut, min–max stretch, MONOCHROME1 inversion, np.pad to square,
            cv2.resize INTER_AREA, (x - mean) / std, 3 channels stacked
  ours      pydicom.dcmread + edge_agent.imaging.preprocess

A second table splits ours into stages (decoding with ds.pixel_array vs the zero-copy view;
the geometry done with copyMakeBorder + cv2.resize vs fused with the table lookup).
Thread counts stay at their defaults. Exits 1 when the outputs differ by more than 1e-3.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent import imaging
from edge_agent.bundle import Preprocessing

ROWS, COLUMNS = 3000, 2500
TOLERANCE = 1e-3
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def synthetic_chest(rows: int = ROWS, columns: int = COLUMNS, seed: int = 0) -> np.ndarray:
    """A 12-bit chest-like image: exposure gradient, body, lungs, mediastinum, ribs, noise."""
    y, x = np.mgrid[-1.0 : 1.0 : rows * 1j, -1.0 : 1.0 : columns * 1j]

    def ellipse(cx: float, cy: float, rx: float, ry: float, edge: float = 0.04) -> np.ndarray:
        r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
        return np.clip((1.0 - r) / edge, 0.0, 1.0)

    image = 500.0 + 300.0 * (y + 1.0) + 150.0 * np.cos(2.0 * x)
    image += 1900.0 * ellipse(0.0, 0.05, 0.85, 0.95, edge=0.15)
    lungs = ellipse(-0.38, -0.1, 0.28, 0.55, 0.1) + ellipse(0.38, -0.1, 0.28, 0.55, 0.1)
    image -= 1100.0 * lungs
    image += 350.0 * lungs * (0.5 + 0.5 * np.sin(y * 38.0 + 4.0 * x**2)) ** 4  # ribs
    image += 700.0 * ellipse(0.1, 0.3, 0.28, 0.25, 0.2)  # heart
    image += 600.0 * np.clip(1.0 - np.abs(x) / 0.07, 0.0, 1.0)  # spine
    image += 400.0 * ellipse(0.55, 0.75, 0.05, 0.04, 0.3)  # a nodule-like blob
    image += np.random.default_rng(seed).normal(0.0, 12.0, image.shape)
    return np.clip(np.rint(image), 0, 4095).astype(np.uint16)


def write_cr(path: Path, pixels: np.ndarray, *, monochrome1: bool, window: bool) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.PatientName = "Benchmark^Synthetic"
    ds.PatientID = "BENCH-0001"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleSlope = "1.0"
    ds.RescaleIntercept = "-1024"
    ds.RescaleType = "US"
    if window:
        ds.WindowCenter = "1000"
        ds.WindowWidth = "3000"
    stored = (4095 - pixels) if monochrome1 else pixels
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def baseline(path: Path, spec: Preprocessing) -> np.ndarray:
    """The straightforward pipeline, as one would first write it."""
    ds = pydicom.dcmread(path)
    image = ds.pixel_array.astype(np.float32)
    image = apply_modality_lut(image, ds)
    image = apply_voi_lut(image, ds)
    image = (image - image.min()) / (image.max() - image.min())
    if ds.PhotometricInterpretation == "MONOCHROME1":
        image = 1.0 - image
    image = image.astype(np.float32)
    rows, columns = image.shape
    side = max(rows, columns)
    top, left = (side - rows) // 2, (side - columns) // 2
    image = np.pad(image, ((top, side - rows - top), (left, side - columns - left)))
    n = spec.input_size
    image = cv2.resize(image, (n, n), interpolation=cv2.INTER_AREA)
    return np.stack([(image - m) / s for m, s in zip(spec.mean, spec.std, strict=True)]).astype(
        np.float32
    )


def ours(path: Path, spec: Preprocessing) -> np.ndarray:
    return imaging.preprocess(pydicom.dcmread(path), spec)


def read_only(path: Path, spec: Preprocessing) -> None:
    pydicom.dcmread(path)


def table_then_cv2_resize(
    ds: pydicom.Dataset, spec: Preprocessing, pixels: np.ndarray
) -> np.ndarray:
    """Ours with the plain geometry: the value table over the whole image into a float32
    array, cv2.copyMakeBorder to square, cv2.resize INTER_AREA (the stage comparison)."""
    table, offset, index = imaging._unit_table(ds, pixels)
    unit = np.empty(pixels.shape, dtype=np.float32)
    imaging._apply_table(table, index, offset, unit)
    rows, columns = unit.shape
    side = max(rows, columns)
    top, left = (side - rows) // 2, (side - columns) // 2
    padded = cv2.copyMakeBorder(
        unit, top, side - rows - top, left, side - columns - left, cv2.BORDER_CONSTANT, value=0
    )
    n = spec.input_size
    image = cv2.resize(padded, (n, n), interpolation=cv2.INTER_AREA)
    return np.stack([(image - m) / s for m, s in zip(spec.mean, spec.std, strict=True)])


def stages(path: Path, spec: Preprocessing, repeat: int) -> None:
    """Where the time goes: decoding, and the two ways of doing the geometry."""
    ds = pydicom.dcmread(path)
    pixels = imaging.decode_pixels(ds)
    fused = imaging.preprocess(ds, spec, pixels)
    diff = float(np.max(np.abs(fused - table_then_cv2_resize(ds, spec, pixels))))
    runs = {
        "dcmread": lambda: pydicom.dcmread(path),
        "dcmread + ds.pixel_array": lambda: pydicom.dcmread(path).pixel_array,
        "dcmread + imaging.decode_pixels (zero-copy view)": lambda: imaging.decode_pixels(
            pydicom.dcmread(path)
        ),
        "decoded -> tensor: value table, full image, copyMakeBorder, cv2.resize": lambda: (
            table_then_cv2_resize(ds, spec, pixels)
        ),
        "decoded -> tensor: value table fused with the vertical pass (ours)": lambda: (
            imaging.preprocess(ds, spec, pixels)
        ),
    }
    medians = interleaved(runs, repeat)
    print("\n| stage (MONOCHROME2, window) | median ms |\n| --- | --- |")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds * 1e3:.1f} |")
    print(f"the two geometries differ by at most {diff:.1e}")


def interleaved(
    runs: dict[str, Callable[[], object]], repeat: int, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per function, the functions taking turns so load hits them alike."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=25, help="timed runs of each (default 25)")
    parser.add_argument("--size", type=int, default=448, help="model input size (default 448)")
    args = parser.parse_args(argv)
    spec = Preprocessing(input_size=args.size, mean=(0.5,) * 3, std=(0.5,) * 3)

    variants = {
        "MONOCHROME2, window": dict(monochrome1=False, window=True),
        "MONOCHROME1, window": dict(monochrome1=True, window=True),
        "MONOCHROME2, no window": dict(monochrome1=False, window=False),
    }
    print(
        f"{ROWS}x{COLUMNS} 12-bit CR, uncompressed -> (3, {args.size}, {args.size}); "
        f"{args.repeat} interleaved runs each after 3 warm-up; {os.cpu_count()} CPUs, "
        f"cv2 threads {cv2.getNumThreads()}; load average {os.getloadavg()[0]:.1f}"
    )
    header = "| variant | baseline ms | ours ms | speed-up | dcmread alone ms | max abs diff |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    worst, slowest = 0.0, float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        pixels = synthetic_chest()
        for name, options in variants.items():
            path = write_cr(Path(tmp) / "cr.dcm", pixels, **options)
            diff = float(np.max(np.abs(baseline(path, spec) - ours(path, spec))))
            medians = interleaved(
                {
                    "baseline": lambda p=path: baseline(p, spec),
                    "ours": lambda p=path: ours(p, spec),
                    "dcmread": lambda p=path: read_only(p, spec),
                },
                args.repeat,
            )
            ratio = medians["baseline"] / medians["ours"]
            worst, slowest = max(worst, diff), min(slowest, ratio)
            print(
                f"| {name} | {medians['baseline'] * 1e3:.1f} | {medians['ours'] * 1e3:.1f} "
                f"| {ratio:.1f}x | {medians['dcmread'] * 1e3:.1f} | {diff:.1e} |"
            )
        stages(
            write_cr(Path(tmp) / "cr.dcm", pixels, **variants["MONOCHROME2, window"]),
            spec,
            args.repeat,
        )
    print(
        f"lowest speed-up {slowest:.1f}x (goal >= 2.5x); largest difference {worst:.1e} "
        f"(tolerance {TOLERANCE}); load average now {os.getloadavg()[0]:.1f}"
    )
    if worst > TOLERANCE:
        print(f"FAIL: outputs differ by more than {TOLERANCE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
