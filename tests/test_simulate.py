"""edge_agent.simulate: synthetic chest studies written the way a modality writes them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)

from edge_agent.simulate import (
    FINDINGS,
    SimulatedStudy,
    chest_instance,
    dicom_writer,
    new_study,
    render_chest,
    simulate,
    synth_chest,
    synth_ct_volume,
    truth_line,
    write_instance,
    write_study,
)

SMALL = {"rows": 256, "cols": 256}
NORMAL = dict.fromkeys(FINDINGS, False)
PTX = {**NORMAL, "pneumothorax": True}
NODULE = {**NORMAL, "lung_nodule": True}

REQUIRED_RADIOGRAPH_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
    "StudyDate", "StudyTime", "SeriesNumber", "InstanceNumber", "AccessionNumber",
    "BodyPartExamined", "ViewPosition", "PatientOrientation", "PhotometricInterpretation",
    "Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "PixelSpacing",
    "ImagerPixelSpacing", "Manufacturer", "PatientName", "PatientID", "PatientBirthDate",
    "PatientSex", "PixelData",
]  # fmt: skip


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def band_pass(image: np.ndarray) -> np.ndarray:
    """Structure at the scale of lung markings (a difference of Gaussians)."""
    f = image.astype(np.float32)
    return cv2.GaussianBlur(f, (0, 0), 0.7) - cv2.GaussianBlur(f, (0, 0), 2.0)


def erode(mask: np.ndarray, size: int) -> np.ndarray:
    return cv2.erode(mask.astype(np.uint8), np.ones((size, size), np.uint8)).astype(bool)


# --------------------------------------------------------------------------- images


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(48, 320),
    cols=st.integers(48, 320),
    view=st.sampled_from(["PA", "AP", "LL"]),
    ptx=st.booleans(),
    nodule=st.booleans(),
)
def test_synth_chest_shape_dtype_and_range(seed, rows, cols, view, ptx, nodule):
    findings = {"pneumothorax": ptx, "lung_nodule": nodule}
    image = synth_chest(rng(seed), rows=rows, cols=cols, findings=findings, view=view)
    assert image.shape == (rows, cols)
    assert image.dtype == np.uint16
    assert int(image.max()) <= 4095


def test_image_looks_like_a_frontal_chest():
    r = render_chest(rng(1), findings=NORMAL, masks=True, **SMALL)
    image, lungs = r.image.astype(np.float32), r.lung_mask
    assert lungs is not None and 0.15 < lungs.mean() < 0.6
    # Air (corners) darkest, lungs darker than the mediastinum and the abdomen below.
    air = np.median(image[:10, :10])
    lung = np.median(image[lungs])
    mediastinum = np.median(image[100:160, 120:136])
    abdomen = np.median(image[235:, 100:156])
    assert air < lung < mediastinum
    assert lung < abdomen
    # Two lung fields, one each side of the midline.
    assert lungs[:, :120].sum() > 1000 and lungs[:, 136:].sum() > 1000


def test_same_seed_same_image_other_seed_other_image():
    a = synth_chest(rng(7), findings=NORMAL, **SMALL)
    b = synth_chest(rng(7), findings=NORMAL, **SMALL)
    c = synth_chest(rng(8), findings=NORMAL, **SMALL)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 20


@pytest.mark.parametrize("seed", range(6))
def test_pneumothorax_is_darker_and_without_lung_markings(seed):
    normal = render_chest(rng(seed), findings=NORMAL, masks=True, **SMALL)
    ptx = render_chest(rng(seed), findings=PTX, masks=True, **SMALL)
    region = ptx.pneumothorax_mask
    assert region is not None and region.sum() > 300, "a pneumothorax visible at 256 px"
    assert not normal.pneumothorax_mask.any()
    # Same patient: away from the affected lung the images are identical.
    cols = np.flatnonzero(region.any(axis=0))
    side = slice(0, 128) if cols.mean() > 128 else slice(128, 256)
    np.testing.assert_array_equal(normal.image[:, side], ptx.image[:, side])
    # The crescent: darker than the lung was there, and flat: the vessels are gone.
    inner = erode(region, 3)
    n, p = normal.image[inner].astype(float), ptx.image[inner].astype(float)
    assert p.mean() < n.mean() - 80
    core = erode(region, 9)  # away from its edges
    assert core.sum() > 100
    assert band_pass(ptx.image)[core].std() < band_pass(normal.image)[core].std()
    removed = band_pass(normal.image.astype(np.float32) - ptx.image)[inner]
    assert removed.max() > 40, "bright thin lines (vessels) in the normal, not in the crescent"


@pytest.mark.parametrize("seed", range(6))
def test_nodule_is_a_brighter_round_spot_inside_a_lung(seed):
    normal = render_chest(rng(seed), findings=NORMAL, masks=True, **SMALL)
    nodule = render_chest(rng(seed), findings=NODULE, masks=True, **SMALL)
    spot = nodule.nodule_mask
    assert spot is not None and spot.sum() >= 4
    assert (spot & nodule.lung_mask).sum() >= 0.8 * spot.sum(), "inside a lung field"
    diff = nodule.image.astype(int) - normal.image.astype(int)
    assert diff[spot].mean() > 150
    around = cv2.dilate(spot.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    assert np.abs(diff[~around]).max() <= 2, "the same patient everywhere else"


def test_nodule_size_in_millimetres():
    sizes = []
    for seed in range(30):
        r = render_chest(rng(seed), findings=NODULE, masks=True, rows=1024, cols=832)
        n_labels, _, stats, _ = cv2.connectedComponentsWithStats(r.nodule_mask.astype(np.uint8))
        for label in range(1, n_labels):
            width_px = max(stats[label, cv2.CC_STAT_WIDTH], stats[label, cv2.CC_STAT_HEIGHT])
            sizes.append(width_px * r.pixel_spacing_mm)
    assert sizes and min(sizes) >= 16 and max(sizes) <= 56


def test_pixel_spacing_is_realistic_at_full_size():
    r = render_chest(rng(3), findings=NORMAL, rows=2048, cols=1664)
    assert 0.14 <= r.pixel_spacing_mm <= 0.23


def test_unknown_finding_or_view_is_refused():
    with pytest.raises(ValueError, match="unknown finding"):
        synth_chest(rng(), findings={"fracture": True}, **SMALL)
    with pytest.raises(ValueError, match="view"):
        synth_chest(rng(), findings=NORMAL, view="OBL", **SMALL)


# --------------------------------------------------------------------------- DICOM instances


def roundtrip(ds: pydicom.FileDataset, folder: Path) -> pydicom.FileDataset:
    return pydicom.dcmread(write_instance(ds, folder))  # no force: must be a proper file


@pytest.mark.parametrize(
    ("modality", "sop_class"),
    [("CR", ComputedRadiographyImageStorage), ("DX", DigitalXRayImageStorageForPresentation)],
)
def test_radiograph_instance_is_valid_dicom(tmp_path, modality, sop_class):
    ds = roundtrip(chest_instance(rng(), findings=PTX, modality=modality, **SMALL), tmp_path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPClassUID == sop_class == ds.SOPClassUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.preamble == b"\0" * 128
    for keyword in REQUIRED_RADIOGRAPH_TAGS:
        assert keyword in ds, keyword
    assert ds.Modality == modality
    assert ds.BodyPartExamined == "CHEST"
    assert ds.Manufacturer == "edge-triage simulator"
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    assert ds.PhotometricInterpretation in ("MONOCHROME1", "MONOCHROME2")
    pixels = ds.pixel_array
    assert pixels.shape == (256, 256) and pixels.dtype == np.uint16
    assert int(pixels.max()) < 2**12
    assert str(ds.PatientName).startswith("SIMULATED^PATIENT^")
    if modality == "DX":
        assert ds.PresentationIntentType == "FOR PRESENTATION"
        expected = "INVERSE" if ds.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY"
        assert ds.PresentationLUTShape == expected


def test_monochrome1_stores_the_inverted_image(tmp_path):
    m2 = roundtrip(chest_instance(rng(5), findings=NORMAL, photometric="MONOCHROME2", **SMALL),
                   tmp_path / "m2")  # fmt: skip
    m1 = roundtrip(chest_instance(rng(5), findings=NORMAL, photometric="MONOCHROME1", **SMALL),
                   tmp_path / "m1")  # fmt: skip
    assert m1.PhotometricInterpretation == "MONOCHROME1"
    a2, a1 = m2.pixel_array.astype(int), m1.pixel_array.astype(int)
    np.testing.assert_array_equal(a1, 4095 - a2)
    # In MONOCHROME1 the lungs (air) are the *high* stored values.
    assert np.median(a1[:10, :10]) > np.median(a1[100:160, 120:136])


def test_about_a_fifth_are_monochrome1_and_most_have_a_window():
    photometric, windowed, rescaled = [], [], []
    for seed in range(80):
        ds = chest_instance(rng(seed), findings=NORMAL, rows=32, cols=32)
        photometric.append(ds.PhotometricInterpretation == "MONOCHROME1")
        windowed.append("WindowCenter" in ds)
        rescaled.append((float(ds.RescaleSlope), float(ds.RescaleIntercept)) != (1.0, 0.0))
    assert 0.08 < np.mean(photometric) < 0.35
    assert 0.7 < np.mean(windowed) < 0.97
    assert 0.05 < np.mean(rescaled) < 0.4


def test_window_is_in_output_units_and_covers_the_image(tmp_path):
    for seed in range(40):
        ds = chest_instance(rng(seed), findings=NORMAL, rows=64, cols=64)
        if "WindowCenter" not in ds:
            continue
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        out = ds.pixel_array.astype(float) * slope + intercept
        centre = ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter
        width = ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth
        assert out.min() <= float(centre) <= out.max()
        assert 0.3 * np.ptp(out) < float(width) < 1.5 * np.ptp(out)


def test_study_header_is_shared_and_views_are_set(tmp_path):
    study = new_study(rng(), "DX")
    frontal = chest_instance(rng(1), findings=NORMAL, view="PA", modality="DX", study=study,
                             **SMALL)  # fmt: skip
    lateral = chest_instance(rng(2), findings=NORMAL, view="LL", modality="DX", study=study,
                             **SMALL)  # fmt: skip
    assert frontal.StudyInstanceUID == lateral.StudyInstanceUID == study.study_instance_uid
    assert frontal.AccessionNumber == lateral.AccessionNumber == study.accession_number
    assert frontal.PatientID == lateral.PatientID
    assert frontal.SOPInstanceUID != lateral.SOPInstanceUID
    assert (frontal.ViewPosition, list(frontal.PatientOrientation)) == ("PA", ["L", "F"])
    assert (lateral.ViewPosition, list(lateral.PatientOrientation)) == ("LL", ["P", "F"])
    other = chest_instance(rng(3), findings=NORMAL, modality="CR", study=study, rows=32, cols=32)
    assert (other.Modality, other.SOPClassUID) == ("CR", ComputedRadiographyImageStorage)


def test_write_study_frontal_and_lateral(tmp_path):
    views, series_counts = set(), set()
    for seed in range(16):
        study = write_study(tmp_path / str(seed), rng(seed), abnormal=False, **SMALL)
        datasets = [pydicom.dcmread(p) for p in study.paths]
        assert {d.StudyInstanceUID for d in datasets} == {study.study_instance_uid}
        assert datasets[0].ViewPosition in ("PA", "AP")
        if len(datasets) == 2:
            assert datasets[0].ViewPosition == "PA" and datasets[1].ViewPosition == "LL"
            series_counts.add(len({d.SeriesInstanceUID for d in datasets}))
        views.add(tuple(d.ViewPosition for d in datasets))
    assert ("PA", "LL") in views and (("PA",) in views or ("AP",) in views)
    assert series_counts == {1, 2}, "laterals in the frontal's series and in their own"


# --------------------------------------------------------------------------- CT


def test_ct_series_is_valid_dicom_with_geometry(tmp_path):
    study = write_study(tmp_path, rng(), modality="CT", abnormal=True, rows=64, cols=64,
                        slices=8)  # fmt: skip
    assert study.truth == {"pneumothorax": False, "lung_nodule": True}
    datasets = sorted((pydicom.dcmread(p) for p in study.paths), key=lambda d: d.InstanceNumber)
    assert len(datasets) == 8
    assert len({d.SeriesInstanceUID for d in datasets}) == 1
    z = [float(d.ImagePositionPatient[2]) for d in datasets]
    steps = np.diff(z)
    assert np.allclose(steps, -float(datasets[0].SliceThickness))
    for d in datasets:
        assert d.SOPClassUID == CTImageStorage and d.Modality == "CT"
        assert [float(v) for v in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert (d.PixelRepresentation, float(d.RescaleIntercept), d.RescaleType) == (1, -1024, "HU")
        assert d.ConvolutionKernel and d.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
        assert len(d.PixelSpacing) == 2
    hu = np.stack([d.pixel_array.astype(float) + float(d.RescaleIntercept) for d in datasets])
    assert hu.min() >= -1024 and hu.max() > 300  # bone
    middle = hu[4]
    assert np.median(middle[:5, :5]) < -900  # air outside the body
    assert ((middle > -950) & (middle < -700)).mean() > 0.05  # lungs


def test_ct_nodules_are_small_spheres_spanning_a_few_slices():
    normal = synth_ct_volume(rng(4), slices=48, rows=128, cols=128, findings=NORMAL,
                             pixel_spacing_mm=2.8)  # fmt: skip
    nodule = synth_ct_volume(rng(4), slices=48, rows=128, cols=128, findings=NODULE,
                             pixel_spacing_mm=2.8)  # fmt: skip
    changed = (nodule.astype(int) - normal.astype(int)) > 300  # lung -860 -> soft tissue +30
    slices = np.flatnonzero(changed.any(axis=(1, 2)))
    assert 1 <= len(slices) <= 12
    assert (normal[changed] < -600).all(), "inside a lung"
    assert nodule[changed].max() > 0, "soft tissue at the core"


# --------------------------------------------------------------------------- writing


def test_files_appear_only_under_final_names(tmp_path, monkeypatch):
    renames: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def spy(src, dst):
        src, dst = Path(src), Path(dst)
        assert src.parent == dst.parent, "renamed within one folder (atomic)"
        assert src.name.startswith(".") and src.name.endswith(".part")
        assert not dst.exists()
        complete = pydicom.dcmread(src)  # fully written before the rename
        assert dst.name == f"{complete.SOPInstanceUID}.dcm"
        visible = [p.name for p in dst.parent.iterdir() if not p.name.startswith(".")]
        assert all(name.endswith(".dcm") for name in visible)
        renames.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(dicom_writer.os, "replace", spy)
    studies = list(simulate(tmp_path, studies=4, seed=3, **SMALL))
    paths = [p for s in studies for p in s.paths]
    assert [dst for _, dst in renames] == paths
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(fp, ds, **kwargs):
        fp.write(b"\0" * 1000)
        raise OSError("disk full")

    monkeypatch.setattr(dicom_writer, "dcmwrite", broken)
    with pytest.raises(OSError, match="disk full"):
        write_study(tmp_path, rng(), abnormal=False, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_nested_layout_puts_each_study_in_its_folder(tmp_path):
    for study in simulate(tmp_path, studies=3, layout="nested", **SMALL):
        assert {p.parent for p in study.paths} == {tmp_path / study.study_instance_uid}
    assert not [p for p in tmp_path.rglob(".*")], "no temporary files left"


def test_same_seed_writes_the_same_files(tmp_path):
    def files(folder: Path) -> dict[str, bytes]:
        list(simulate(folder, studies=3, seed=11, abnormal=0.5, **SMALL))
        return {p.name: p.read_bytes() for p in folder.iterdir()}

    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert a == b
    c = {p.name for s in simulate(tmp_path / "c", studies=3, seed=12, **SMALL) for p in s.paths}
    assert not c & set(a)
    ct = next(simulate(tmp_path / "ct", studies=1, seed=11, modality="CT", rows=32, cols=32,
                       slices=2))  # fmt: skip
    assert ct.study_instance_uid not in {pydicom.dcmread(tmp_path / "a" / n).StudyInstanceUID
                                         for n in a}  # fmt: skip


def test_truth_follows_the_abnormal_fraction(tmp_path):
    studies = list(simulate(tmp_path, studies=100, abnormal=0.3, seed=5, rows=32, cols=32))
    abnormal = [any(s.truth.values()) for s in studies]
    assert 0.18 < np.mean(abnormal) < 0.42
    kinds = {tuple(sorted(k for k, v in s.truth.items() if v)) for s in studies}
    assert kinds == {(), ("pneumothorax",), ("lung_nodule",), ("lung_nodule", "pneumothorax")}
    assert all(set(s.truth) == set(FINDINGS) for s in studies)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_abnormal_extremes(tmp_path, fraction):
    studies = list(simulate(tmp_path, studies=10, abnormal=fraction, rows=40, cols=40))
    assert all(any(s.truth.values()) == bool(fraction) for s in studies)


def test_simulate_yields_each_study_once_written_and_waits_between(tmp_path):
    started = time.monotonic()
    seen = 0
    for study in simulate(tmp_path, studies=2, interval_seconds=0.2, **SMALL):
        assert isinstance(study, SimulatedStudy)
        assert all(p.is_file() for p in study.paths)
        seen += len(study.paths)
        assert len(list(tmp_path.iterdir())) == seen
    assert time.monotonic() - started >= 0.2


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="modality"):
        next(simulate(tmp_path, modality="MR"))
    with pytest.raises(ValueError, match="abnormal"):
        next(simulate(tmp_path, abnormal=1.5))
    with pytest.raises(ValueError, match="layout"):
        write_study(tmp_path, rng(), abnormal=False, layout="deep", **SMALL)  # type: ignore[arg-type]


def test_truth_line_is_the_contract_json(tmp_path):
    study = write_study(tmp_path, rng(), modality="DX", abnormal=True, **SMALL)
    line = truth_line(study)
    assert "\n" not in line
    data = json.loads(line)
    assert list(data) == ["study_instance_uid", "modality", "truth"]
    assert data["study_instance_uid"] == study.study_instance_uid
    assert data["modality"] == "DX"
    assert list(data["truth"]) == list(FINDINGS)
    assert any(data["truth"].values())


def test_fake_patient_is_shaped_like_phi(tmp_path):
    study = new_study(rng(9), "CR")
    assert study.patient_name.startswith("SIMULATED^PATIENT^")
    assert study.patient_id and study.patient_sex in ("F", "M", "O")
    assert study.accession == study.accession_number
    ds = chest_instance(rng(9), findings=NORMAL, study=study, rows=48, cols=48)
    assert str(ds.PatientName) == study.patient_name
    assert ds.PatientBirthDate == study.patient_birth_date.strftime("%Y%m%d")


# --------------------------------------------------------------------------- real peers


@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmtk (dcmdump) not installed")
@pytest.mark.parametrize("modality", ["CR", "DX", "CT"])
def test_dcmtk_reads_what_we_write(tmp_path, modality):
    kwargs = {"rows": 64, "cols": 64, "slices": 2} if modality == "CT" else SMALL
    study = write_study(tmp_path, rng(), modality=modality, abnormal=True, **kwargs)
    for path in study.paths:
        dump = subprocess.run(["dcmdump", "-q", str(path)], capture_output=True, text=True)
        assert dump.returncode == 0, dump.stderr
        assert "E:" not in dump.stderr and "W:" not in dump.stderr, dump.stderr
        assert "SIMULATED^PATIENT^" in dump.stdout
        if shutil.which("dcmftest"):
            ftest = subprocess.run(["dcmftest", str(path)], capture_output=True, text=True)
            assert ftest.stdout.startswith("yes:"), ftest.stdout
