"""The simulated studies as DICOM: study and patient modules (every patient attribute made up),
CR/DX instances, CT series, and the atomic write (temporary name, fsync, rename)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)

from .. import __version__
from ..fsutil import fsync_dir
from .common import (
    CT_MATRIX,
    CT_SLICES,
    MANUFACTURER,
    MAX_STORED,
    RADIOGRAPH_MATRIX,
    Modality,
    Photometric,
    View,
    _streams,
    _uid,
)
from .ct import synth_ct_volume
from .cxr import render_chest

# --------------------------------------------------------------------------- DICOM


@dataclass(frozen=True)
class StudyHeader:
    """What the instances of one study share: the study and a fake patient.

    Every patient attribute is made up (``SIMULATED^PATIENT^N``) but shaped like the real
    thing, so the agent's PHI handling is exercised: none of it may ever leave the agent."""

    study_instance_uid: str
    accession_number: str
    study_id: str
    study_datetime: datetime
    modality: str
    patient_name: str  # fake PHI
    patient_id: str
    patient_birth_date: date
    patient_sex: str

    @property
    def accession(self) -> str:
        return self.accession_number

    @property
    def patient_age(self) -> str:
        d, b = self.study_datetime.date(), self.patient_birth_date
        years = d.year - b.year - ((d.month, d.day) < (b.month, b.day))
        return f"{max(0, years):03d}Y"


@dataclass
class SimulatedStudy:
    """A study written to disk, with its ground truth (one bool per code in FINDINGS)."""

    study_instance_uid: str
    modality: str
    truth: dict[str, bool]
    paths: list[Path]


def new_study(rng: np.random.Generator, modality: Modality) -> StudyHeader:
    """A new study of ``modality`` for a new simulated patient."""
    _check_modality(modality)
    number = int(rng.integers(1, 1_000_000))
    when = datetime(2025, 1, 1, 7) + timedelta(
        days=int(rng.integers(0, 365)), seconds=int(rng.integers(0, 12 * 3600))
    )
    born = date(1935, 1, 1) + timedelta(days=int(rng.integers(0, 70 * 365)))
    return StudyHeader(
        study_instance_uid=_uid(rng),
        accession_number=f"SIM{int(rng.integers(10**7, 10**8))}",
        study_id=str(int(rng.integers(1, 100_000))),
        study_datetime=when,
        modality=modality,
        patient_name=f"SIMULATED^PATIENT^{number}",  # fake PHI
        patient_id=f"SIM-{number:06d}",
        patient_birth_date=born,
        patient_sex=str(rng.choice(["F", "M", "O"], p=[0.49, 0.49, 0.02])),
    )


def _check_modality(modality: str) -> None:
    if modality not in ("CR", "DX", "CT"):
        raise ValueError(f"modality must be CR, DX or CT, not {modality!r}")


def _dataset(sop_class_uid: str, sop_instance_uid: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "EDGETRIAGE_SIM"
    ds = FileDataset(
        "",
        Dataset(),
        preamble=b"\0" * 128,
        file_meta=meta,
        is_implicit_VR=False,
        is_little_endian=True,
    )
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    return ds


def _study_modules(ds: Dataset, study: StudyHeader, modality: str, acquired: datetime) -> None:
    """Patient, General Study, General Equipment and the dates of one instance."""
    ds.PatientName = study.patient_name  # fake PHI
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date.strftime("%Y%m%d")  # fake PHI
    ds.PatientSex = study.patient_sex
    ds.PatientAge = study.patient_age
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = study.study_datetime.strftime("%Y%m%d")
    ds.StudyTime = study.study_datetime.strftime("%H%M%S")
    ds.AccessionNumber = study.accession_number
    ds.StudyID = study.study_id
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = acquired.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = acquired.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "synthetic chest"
    ds.SoftwareVersions = __version__
    ds.DeviceSerialNumber = "SIM0001"
    ds.InstitutionName = "Simulated General Hospital"
    ds.StationName = "SIMCT01" if modality == "CT" else "SIMXR01"
    ds.BodyPartExamined = "CHEST"


def _ds_value(v: float) -> str:
    """A DS string of at most 16 characters."""
    return f"{v:.6g}"


def chest_instance(
    rng: np.random.Generator,
    *,
    findings: Mapping[str, bool],
    view: View = "PA",
    modality: Modality = "CR",
    rows: int = RADIOGRAPH_MATRIX[0],
    cols: int = RADIOGRAPH_MATRIX[1],
    study: StudyHeader | None = None,
    photometric: Photometric | None = None,
    series_instance_uid: str | None = None,
    series_number: int = 1,
    instance_number: int = 1,
) -> FileDataset:
    """One chest radiograph (CR, or DX For Presentation) as a complete DICOM instance.

    ``study`` lets several instances share a study (a new one is made when None);
    ``photometric`` None picks MONOCHROME2 80% of the time, else MONOCHROME1 (stored values
    inverted). ``view`` is PA or AP (frontal) or LL (lateral)."""
    if modality not in ("CR", "DX"):
        raise ValueError(f"chest radiographs are CR or DX, not {modality!r}")
    img_rng, hdr_rng = _streams(rng, 2)
    if study is None:
        study = new_study(hdr_rng, modality)
    rendering = render_chest(img_rng, rows=rows, cols=cols, findings=findings, view=view)
    image, spacing = rendering.image, rendering.pixel_spacing_mm
    if photometric is None:
        photometric = "MONOCHROME1" if hdr_rng.random() < 0.2 else "MONOCHROME2"

    sop_class = (
        ComputedRadiographyImageStorage
        if modality == "CR"
        else (DigitalXRayImageStorageForPresentation)
    )
    ds = _dataset(sop_class, _uid(hdr_rng))
    acquired = study.study_datetime + timedelta(seconds=30 * instance_number)
    _study_modules(ds, study, modality, acquired)
    ds.SeriesInstanceUID = series_instance_uid or _uid(hdr_rng)
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    lateral = view == "LL"
    ds.SeriesDescription = "CHEST LAT" if lateral else f"CHEST {view}"
    ds.StudyDescription = "XR CHEST"
    ds.ProtocolName = "CHEST"
    ds.ViewPosition = view
    ds.PatientOrientation = ["P", "F"] if lateral else ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.KVP = _ds_value(round(float(hdr_rng.uniform(110, 125)), 1))
    ds.ExposureTime = int(hdr_rng.integers(4, 20))
    ds.XRayTubeCurrent = int(hdr_rng.integers(200, 400))
    ds.DistanceSourceToDetector = "1800" if view != "AP" else "1000"

    # Image Pixel: 12 bits stored in 16.
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    stored = (MAX_STORED - image) if photometric == "MONOCHROME1" else image
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    spacing_ds = [_ds_value(round(spacing, 6))] * 2
    ds.ImagerPixelSpacing = spacing_ds
    ds.PixelSpacing = spacing_ds
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"

    # Modality LUT: mostly identity, sometimes not (readers must apply it).
    slope, intercept = [(1.0, 0.0), (2.0, 0.0), (1.0, -1024.0)][
        int(hdr_rng.choice(3, p=[0.8, 0.1, 0.1]))
    ]
    ds.RescaleSlope = _ds_value(slope)
    ds.RescaleIntercept = _ds_value(intercept)
    if modality == "DX":
        ds.RescaleType = "US"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
        ds.ImageLaterality = "U"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME1" else -1
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"

    # VOI LUT: a window on most images (sometimes two), none on some.
    if hdr_rng.random() < 0.85:
        sample = image[:: max(1, rows // 128), :: max(1, cols // 128)]
        lo, hi = np.percentile(sample, [8.0, 99.5])
        centres, widths = [(lo + hi) / 2], [(hi - lo) * 1.1]
        if hdr_rng.random() < 0.15:
            centres.append(lo + (hi - lo) * 0.35)
            widths.append((hi - lo) * 0.7)
        if photometric == "MONOCHROME1":
            centres = [MAX_STORED - c for c in centres]
        centres_out = [_ds_value(round(c * slope + intercept, 1)) for c in centres]
        widths_out = [_ds_value(round(max(2.0, w * slope), 1)) for w in widths]
        ds.WindowCenter = centres_out if len(centres_out) > 1 else centres_out[0]
        ds.WindowWidth = widths_out if len(widths_out) > 1 else widths_out[0]
        explanation = ["STANDARD", "LUNG"][: len(centres_out)]
        ds.WindowCenterWidthExplanation = explanation if len(explanation) > 1 else explanation[0]
    return ds


def ct_series(
    rng: np.random.Generator,
    *,
    findings: Mapping[str, bool],
    study: StudyHeader | None = None,
    rows: int = CT_MATRIX[0],
    cols: int = CT_MATRIX[1],
    slices: int = CT_SLICES,
) -> list[FileDataset]:
    """An axial chest CT series (CT Image Storage), one instance per slice, head first:
    instance 1 is the most superior slice."""
    vol_rng, hdr_rng = _streams(rng, 2)
    if study is None:
        study = new_study(hdr_rng, "CT")
    fov = float(hdr_rng.uniform(320, 400))
    ps = fov / cols
    # The series always spans apices to upper abdomen (~240 mm for 48 slices of 5 mm).
    thickness = 5.0 if slices <= 64 else 2.5 if slices <= 128 else 1.25
    volume = synth_ct_volume(
        vol_rng,
        slices=slices,
        rows=rows,
        cols=cols,
        findings=findings,
        pixel_spacing_mm=ps,
        slice_thickness_mm=thickness,
    )
    series_uid, frame_uid = _uid(hdr_rng), _uid(hdr_rng)
    kernel = str(hdr_rng.choice(["STANDARD", "LUNG", "B30f", "B70f", "FC13"]))
    window = (-600, 1500) if kernel in ("LUNG", "B70f") else (40, 400)
    z_top = float(hdr_rng.uniform(-80, -40))
    acquired = study.study_datetime + timedelta(seconds=45)
    x0 = -(cols - 1) / 2 * ps
    y0 = -(rows - 1) / 2 * ps
    out = []
    for i in range(slices):
        ds = _dataset(CTImageStorage, _uid(hdr_rng))
        _study_modules(ds, study, "CT", acquired)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 2
        ds.SeriesDescription = "CHEST AXIAL"
        ds.StudyDescription = "CT CHEST"
        ds.ProtocolName = "CHEST"
        ds.InstanceNumber = i + 1
        ds.AcquisitionNumber = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        z = z_top - i * thickness
        ds.ImagePositionPatient = [
            _ds_value(round(x0, 4)),
            _ds_value(round(y0, 4)),
            _ds_value(round(z, 4)),
        ]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = _ds_value(round(z, 4))
        ds.SliceThickness = _ds_value(thickness)
        ds.SpacingBetweenSlices = _ds_value(thickness)
        ds.PixelSpacing = [_ds_value(round(ps, 6))] * 2
        ds.ReconstructionDiameter = _ds_value(round(fov, 2))
        ds.ConvolutionKernel = kernel
        ds.KVP = "120"
        ds.XRayTubeCurrent = 200
        ds.GantryDetectorTilt = "0"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = str(window[0])
        ds.WindowWidth = str(window[1])
        stored = volume[i].astype(np.int32) + 1024
        ds.PixelData = stored.astype("<i2").tobytes()
        out.append(ds)
    return out


# --------------------------------------------------------------------------- writing


def write_instance(ds: FileDataset, folder: Path) -> Path:
    """Writes ``ds`` as ``folder/<SOPInstanceUID>.dcm`` the way a modality does: into a
    hidden temporary name in the same folder, flushed and fsynced, then renamed. Readers
    never see a partial file under the final name."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{ds.SOPInstanceUID}.dcm"
    part = folder / f".{final.name}.part"
    try:
        with open(part, "wb") as f:
            dcmwrite(f, ds, enforce_file_format=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, final)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    return final
