"""CT test material: synthetic slices and phantoms, a CT bundle with a mean encoder, and a
scorer over a store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from edge_agent.bundle import (
    CTInput,
    Encoder,
    Finding,
    LinearProbeHead,
    Manifest,
    ModelInfo,
    Preprocessing,
    file_entries,
    load_bundle,
    write_manifest,
)
from edge_agent.intake.header import read_header
from edge_agent.profiles import resolve_profile
from edge_agent.results import StudyResult
from edge_agent.runners import open_runner
from edge_agent.scoring import Scorer
from edge_agent.store import Store

SIZE = 32


AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def ct_datasets(
    volume_hu: np.ndarray,
    *,
    study_uid: str,
    spacing: float = 2.5,
    kernel: str = "LUNG",
    series_number: int = 3,
    slope: float = 1.0,
    intercept: float = -1024.0,
) -> list[FileDataset]:
    """One axial series, head first: slice i at z = -i * spacing."""
    series_uid = generate_uid()
    out = []
    for i, hu in enumerate(volume_hu):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = FileDataset(
            "",
            Dataset(),
            file_meta=meta,
            preamble=b"\0" * 128,
            is_implicit_VR=False,
            is_little_endian=True,
        )
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.InstanceNumber = i + 1
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-50, -50, -i * spacing]
        ds.ImageOrientationPatient = list(AXIAL)
        ds.PixelSpacing = [1, 1]
        ds.SliceThickness = spacing
        ds.ConvolutionKernel = kernel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = hu.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        stored = np.rint((hu.astype(np.float64) - intercept) / slope).astype("<i2")
        ds.PixelData = stored.tobytes()
        out.append(ds)
    return out


def chest_phantom(n: int = 40, nodule_slice: int | None = 25, size: int = 48) -> np.ndarray:
    """Air, a soft-tissue body, two lungs, a spine, and a 10 mm sphere of +30 HU in a lung."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    c = (size - 1) / 2
    body = ((x - c) / (0.45 * size)) ** 2 + ((y - c) / (0.38 * size)) ** 2 < 1
    lungs = (
        ((np.abs(x - c) - 0.2 * size) / (0.13 * size)) ** 2 + ((y - c) / (0.25 * size)) ** 2
    ) < 1
    spine = (x - c) ** 2 + (y - c - 0.3 * size) ** 2 < (0.06 * size) ** 2
    rng = np.random.default_rng(0)
    vol = np.empty((n, size, size), dtype=np.float64)
    for i in range(n):
        hu = np.full((size, size), -1000.0)
        hu[body] = 40.0
        hu[lungs] = -850.0
        hu[spine] = 700.0
        if nodule_slice is not None and abs(i - nodule_slice) <= 2:  # 2.5 mm slices: r = 5 mm
            r = 0.12 * size * np.sqrt(max(0.0, 1 - ((i - nodule_slice) / 2.5) ** 2))
            hu[(x - c - 0.2 * size) ** 2 + (y - c) ** 2 < r * r] = 30.0
        vol[i] = hu + rng.normal(0, 5, (size, size))
    return np.clip(np.rint(vol), -1024, 3071)


def mean_encoder(root: Path) -> None:
    """Embedding = per-channel mean of the image (not normalised): brightness, by hand."""
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])
    y = helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["batch", 3])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    node = helper.make_node("ReduceMean", ["pixel_values", "axes"], ["image_embeds"], keepdims=0)
    graph = helper.make_graph([node], "mean", [x], [y], initializer=[axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, root / "encoder.onnx")


def ct_bundle(root: Path, *, convention: str = "lung_window", aggregate: str = "max") -> Path:
    """A bundle with one radiograph finding and one CT finding on the mean encoder."""
    root.mkdir(parents=True)
    mean_encoder(root)
    manifest = Manifest(
        model=ModelInfo(name="ct-test", version="1", source="tests", demo=True),
        created_at="2026-12-04T00:00:00Z",
        created_by="tests",
        precision="fp32",
        encoder=Encoder(
            file="encoder.onnx",
            embedding_dim=3,
            preprocessing=Preprocessing(input_size=SIZE, mean=(0.5,) * 3, std=(0.5,) * 3),
        ),
        head=LinearProbeHead(
            weights={"bright": [4.0, 4.0, 4.0], "dense": [40.0, 0.0, 0.0]},
            biases={"bright": -4.0, "dense": 0.0},
        ),
        findings=[
            Finding(code="bright", label="Bright", review_threshold=0.5, urgent_threshold=0.9),
            Finding(code="dense", label="Dense", review_threshold=0.5, modalities=("CT",)),
        ],
        ct=CTInput(convention=convention, aggregate=aggregate),  # type: ignore[arg-type]
        files=file_entries(root, ["encoder.onnx"]),
    )
    write_manifest(root, manifest)
    return root


def scorer_for(bundle_root: Path, watch: Path, **kwargs: object) -> Scorer:
    bundle = load_bundle(bundle_root)
    runner = open_runner(bundle, resolve_profile("x86-cpu")[0])
    return Scorer(bundle, runner, watch, batch_size=4, **kwargs)  # type: ignore[arg-type]


def ingest(store: Store, watch: Path) -> str:
    """Every DICOM file in ``watch`` through intake's header reader into the store; the one
    study is then complete. Returns its StudyInstanceUID."""
    uids = set()
    for n, path in enumerate(sorted(watch.rglob("*.dcm"))):
        record = read_header(path)
        store.add_instance(path.relative_to(watch).as_posix(), 1, n, record, now=100.0)
        uids.add(record.study_instance_uid)
    (uid,) = uids
    assert store.complete_quiet_studies(1.0, now=200.0) == [uid]
    return uid


def score(scorer: Scorer, store: Store, uid: str) -> tuple[StudyResult, dict[str, tuple]]:
    study = store.study(uid)
    assert study is not None
    scored = scorer.score(study, store.instances(uid), 0)
    assert scored is not None
    payload = json.loads(scored.result.to_json_bytes())
    assert StudyResult.model_validate(payload) == scored.result  # strict writer round trip
    return scored.result, scored.instance_states
