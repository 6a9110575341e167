"""CT: volume geometry, slabs, windows, CT scoring through the Scorer, and the study lifecycle.

Real DICOM files (the simulator's CT series and hand-made ones written by pydicom), real ONNX
Runtime sessions, a real state database.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers.ct import (
    AXIAL,
    chest_phantom,
    ct_bundle,
    ct_datasets,
    ingest,
    score,
    scorer_for,
)
from pydicom.dataset import Dataset
from pydicom.uid import (
    generate_uid,
)

from edge_agent import ct
from edge_agent.bundle import (
    CTInput,
    Manifest,
    Preprocessing,
    load_bundle,
)
from edge_agent.config import SelectionSettings
from edge_agent.service import demo_bundle_path
from edge_agent.simulate import simulate, write_instance
from edge_agent.store import InstanceRecord, Message, Store

# -- helpers ------------------------------------------------------------------------------


def header(
    z: float,
    *,
    series: str = "1.2.3.4",
    orientation: tuple[float, ...] = AXIAL,
    thickness: float | None = 2.5,
    kernel: str = "LUNG",
    number: int = 2,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
) -> ct.CTSlice:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    position = tuple(float(v) for v in (np.array([-100.0, -100.0, 0.0]) + z * normal))
    return ct.CTSlice(
        sop_instance_uid=f"{series}.{z:g}",
        series_instance_uid=series,
        path=f"{z}.dcm",
        position=position,  # type: ignore[arg-type]
        orientation=orientation,  # type: ignore[arg-type]
        thickness_mm=thickness,
        kernel=kernel,
        image_type=image_type,
        rows=512,
        columns=512,
        pixel_spacing=(0.7, 0.7),
        series_number=number,
    )


def stack(n: int, spacing: float = 2.5, **kwargs: object) -> list[ct.CTSlice]:
    return [header(-i * spacing, **kwargs) for i in range(n)]  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "state" / "state.sqlite3")
    yield s
    s.close()


# -- geometry -----------------------------------------------------------------------------


def test_slices_are_ordered_along_the_normal_whatever_the_file_order() -> None:
    slices = stack(10)
    shuffled = [slices[i] for i in (3, 9, 0, 5, 1, 8, 2, 7, 4, 6)]
    geo = ct.geometry(shuffled)
    assert geo.positions_mm == tuple(sorted(geo.positions_mm))
    assert [s.sop_instance_uid for s in geo.slices] == [s.sop_instance_uid for s in slices[::-1]]
    assert geo.spacing_mm == pytest.approx(2.5)
    assert geo.axial_angle_degrees == pytest.approx(0.0)


def test_a_tilted_series_is_ordered_along_its_own_normal() -> None:
    tilt = np.radians(20)
    orientation = (1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), float(np.sin(tilt)))
    geo = ct.geometry(stack(8, orientation=orientation)[::-1])
    assert geo.spacing_mm == pytest.approx(2.5)
    assert geo.axial_angle_degrees == pytest.approx(20.0)


@pytest.mark.parametrize(
    ("slices", "reason"),
    [
        ([*stack(5), header(-5.0)], "duplicate slice position"),
        ([s for i, s in enumerate(stack(10)) if i not in (4, 5)], "gap of 7.5 mm"),
        ([*stack(5), header(-20.0, orientation=(1.0, 0, 0, 0, 0, -1.0))], "mixed slice orient"),
        (stack(1), "only 1 slice"),
        (
            [*stack(4), ct.CTSlice(**{**vars(header(-30.0)), "position": None})],
            "without ImagePositionPatient",
        ),
    ],
)
def test_inconsistent_series_are_refused_with_a_reason(
    slices: list[ct.CTSlice], reason: str
) -> None:
    with pytest.raises(ct.SeriesRejected, match=reason):
        ct.geometry(slices)


# -- slabs, windows, aggregation ----------------------------------------------------------


def test_slab_plan_covers_every_slice_without_redundant_tail() -> None:
    positions = [2.5 * i for i in range(48)]
    slabs = ct.plan_slabs(positions, slab_mm=10.0, stride_mm=5.0)
    assert [(s.first, s.last) for s in slabs[:3]] == [(0, 3), (2, 5), (4, 7)]
    assert slabs[-1].last == 47
    covered = set().union(*(range(s.first, s.last + 1) for s in slabs))
    assert covered == set(range(48))
    assert all(b.last > a.last for a, b in itertools.pairwise(slabs))
    assert [s.index for s in slabs] == list(range(len(slabs)))
    # slabs thinner than the spacing hold one slice each
    thin = ct.plan_slabs([5.0 * i for i in range(6)], slab_mm=2.0, stride_mm=5.0)
    assert [(s.first, s.last) for s in thin] == [(i, i) for i in range(6)]


def test_slab_images_are_maximum_intensity_projections() -> None:
    slices = [np.full((4, 4), v, dtype=np.int16) for v in (-900, 50, -100, 20)]
    slices[3][0, 0] = 500
    slabs = ct.plan_slabs([0.0, 2.5, 5.0, 7.5], slab_mm=5.0, stride_mm=5.0)
    images = list(ct.iter_slab_images(slabs, lambda i: slices[i]))
    assert [s.first for s, _ in images] == [0, 2]
    assert np.all(images[0][1] == 50)
    assert images[1][1][0, 0] == 500 and images[1][1][1, 1] == 20


def _spec(n: int = 8) -> Preprocessing:
    return Preprocessing(input_size=n, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_lung_window_maps_hu_linearly_into_the_model_range() -> None:
    # -1350 and +150 bound the lung window (centre -600, width 1500): both present, so the
    # min-max stretch after the window changes nothing.
    hu = np.array([[-1350, 150], [-600, 2000]], dtype=np.int16).repeat(4, 0).repeat(4, 1)
    t = ct.slab_tensor(hu, "lung_window", _spec())
    assert t.shape == (3, 8, 8) and t.dtype == np.float32
    unit = t * 0.5 + 0.5
    assert np.allclose(unit[:, 0, 0], 0.0, atol=1e-6)
    assert np.allclose(unit[:, 0, 7], 1.0, atol=1e-6)
    assert np.allclose(unit[:, 7, 0], 0.5, atol=1e-6)
    assert np.allclose(unit[:, 7, 7], 1.0, atol=1e-6)  # clipped above the window


def test_three_windows_are_the_rgb_channels() -> None:
    # air, fat, soft tissue 40 HU, bone 1100 HU: every window sees both of its ends
    hu = np.array([[-1300, -100], [40, 1100]], dtype=np.int16).repeat(4, 0).repeat(4, 1)
    unit = ct.slab_tensor(hu, "three_windows", _spec()) * 0.5 + 0.5
    expected = {
        (0, 0): (0.0, 0.0, 0.0),
        (0, 7): ((-100 + 1225) / 2250, (-100 + 135) / 350, 0.0),
        (7, 0): ((40 + 1225) / 2250, (40 + 135) / 350, 0.5),
        (7, 7): (1.0, 1.0, 1.0),
    }
    for (r, c), rgb in expected.items():
        assert np.allclose(unit[:, r, c], rgb, atol=1e-5), (r, c, unit[:, r, c])


def test_a_window_with_nothing_inside_gives_a_constant_channel() -> None:
    hu = np.full((8, 8), -1000, dtype=np.int16)
    hu[0, 0] = -990  # contrast in HU, none inside the 80/40 window
    unit = ct.slab_tensor(hu, "three_windows", _spec()) * 0.5 + 0.5
    assert np.allclose(unit[2], 0.0)


def test_aggregation_max_and_top_k_mean_name_the_best_slab() -> None:
    scores = np.array([0.1, 0.9, 0.3, 0.7, 0.2])
    assert ct.aggregate(scores, CTInput(convention="lung_window")) == (0.9, 1)
    top = CTInput(convention="lung_window", aggregate="top_k_mean", top_k=3)
    value, best = ct.aggregate(scores, top)
    assert value == pytest.approx((0.9 + 0.7 + 0.3) / 3) and best == 1
    assert ct.aggregate(np.array([0.4]), top) == (pytest.approx(0.4), 0)


def test_hu_comes_from_the_rescale_of_each_slice(tmp_path: Path) -> None:
    hu = chest_phantom(n=2, nodule_slice=None, size=16)
    (ds,) = ct_datasets(hu[:1], study_uid=generate_uid(), slope=2.0, intercept=-2048.0)
    path = write_instance(ds, tmp_path)
    got = ct.slice_hu(pydicom.dcmread(path))
    assert got.dtype == np.int16
    assert np.abs(got.astype(int) - hu[0]).max() <= 1  # stored at 2 HU steps


# -- bundles ------------------------------------------------------------------------------


def test_ct_findings_need_a_ct_section_and_old_bundles_keep_their_identity(
    tmp_path: Path,
) -> None:
    bundle = load_bundle(demo_bundle_path())
    m = bundle.manifest
    assert m.ct is None and all(f.modalities == ("CR", "DX") for f in m.findings)
    # the identity formula before CT existed: added fields must not change alert ids
    identity = {
        "encoder": m.encoder.model_dump(mode="json"),
        "encoder_sha256": m.files[m.encoder.file].sha256,
        "head": m.head.model_dump(mode="json"),
        "findings": [
            {
                k: v
                for k, v in f.model_dump(mode="json").items()
                if k not in ("modalities", "concept")
            }
            for f in m.findings
        ],
    }
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
    assert bundle.sha256 == hashlib.sha256(blob).hexdigest()

    data = m.model_dump(mode="json")
    # A finding's SNOMED CT code (for the PACS's SR) decides no score: same identity.
    data["findings"][0]["concept"] = {
        "scheme": "SCT",
        "value": "36118008",
        "meaning": "Pneumothorax",
    }
    assert Manifest.model_validate(data).model_sha256() == bundle.sha256
    data["findings"][1]["modalities"] = ["CT"]
    with pytest.raises(ValueError, match="no 'ct' section"):
        Manifest.model_validate(data)
    data["ct"] = {"convention": "lung_window"}
    with_ct = Manifest.model_validate(data)
    assert with_ct.model_sha256() != bundle.sha256
    data["findings"][1]["modalities"] = ["CR", "DX"]
    with pytest.raises(ValueError, match="no finding for CT"):
        Manifest.model_validate(data)


# -- scoring CT studies -------------------------------------------------------------------


def test_a_bundle_not_built_for_ct_gives_not_scored(tmp_path: Path, store: Store) -> None:
    watch = tmp_path / "in"
    list(simulate(watch, studies=1, modality="CT", abnormal=1.0, seed=4, rows=48, cols=48))
    uid = ingest(store, watch)
    result, states = score(scorer_for(demo_bundle_path(), watch), store, uid)
    assert result.triage == "not_scored" and result.findings == []
    assert result.reason is not None and "not built for CT" in result.reason
    assert result.instances.scored == 0
    assert {s for s, _ in states.values()} == {"unused"}


def test_simulated_ct_is_scored_through_slabs_naming_the_slab(tmp_path: Path, store: Store) -> None:
    watch = tmp_path / "in"
    (study,) = simulate(watch, studies=1, modality="CT", abnormal=1.0, seed=4, rows=48, cols=48)
    uid = ingest(store, watch)
    bundle = ct_bundle(tmp_path / "bundle")
    result, states = score(scorer_for(bundle, watch), store, uid)
    assert result.modality == "CT" and result.reason is None
    assert [f.code for f in result.findings] == ["dense"]  # CT findings only
    (finding,) = result.findings
    assert finding.slab is not None
    series = {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in study.paths}
    assert finding.slab.series_instance_uid in series
    assert finding.slab.count == 47  # 48 slices of 5 mm, 10 mm slabs every 5 mm
    assert finding.slab.score == finding.score  # aggregate "max"
    assert result.instances.scored == 48
    assert {s for s, _ in states.values()} == {"scored"}
    body = json.loads(result.to_json_bytes())
    assert set(body["findings"][0]["slab"]) == {
        "series_instance_uid",
        "index",
        "count",
        "position_mm",
        "first_sop_instance_uid",
        "last_sop_instance_uid",
        "score",
    }


@pytest.mark.parametrize("convention", ["lung_window", "three_windows"])
def test_the_slab_holding_the_nodule_drives_the_score(
    tmp_path: Path, store: Store, convention: str
) -> None:
    watch = tmp_path / "in"
    study_uid = generate_uid()
    datasets = ct_datasets(chest_phantom(nodule_slice=25), study_uid=study_uid)
    rng = np.random.default_rng(1)
    for i in rng.permutation(len(datasets)):  # files arrive in any order
        write_instance(datasets[i], watch)
    uid = ingest(store, watch)
    bundle = ct_bundle(tmp_path / "bundle", convention=convention)
    result, _ = score(scorer_for(bundle, watch), store, uid)
    (finding,) = result.findings
    assert finding.slab is not None
    nodule_z = -25 * 2.5
    lo, hi = finding.slab.position_mm
    assert lo <= nodule_z <= hi, (finding.slab, nodule_z)
    sops = [d.SOPInstanceUID for d in datasets]
    inside = (
        sops.index(finding.slab.first_sop_instance_uid),
        sops.index(finding.slab.last_sop_instance_uid),
    )
    assert max(inside) >= 25 >= min(inside)


def test_the_lung_kernel_series_is_chosen_and_unsuitable_series_are_named(
    tmp_path: Path, store: Store
) -> None:
    watch = tmp_path / "in"
    study_uid = generate_uid()
    soft = ct_datasets(chest_phantom(nodule_slice=None), study_uid=study_uid, kernel="B30f")
    lung = ct_datasets(chest_phantom(), study_uid=study_uid, kernel="B70f", series_number=4)
    thick = ct_datasets(chest_phantom(n=12), study_uid=study_uid, spacing=10, series_number=5)
    for ds in soft + lung + thick:
        write_instance(ds, watch)
    uid = ingest(store, watch)
    bundle = ct_bundle(tmp_path / "bundle")
    result, states = score(scorer_for(bundle, watch), store, uid)
    assert result.findings[0].slab is not None
    assert result.findings[0].slab.series_instance_uid == lung[0].SeriesInstanceUID
    assert {states[d.SOPInstanceUID][0] for d in lung} == {"scored"}
    assert {states[d.SOPInstanceUID][0] for d in soft + thick} == {"unused"}

    strict = SelectionSettings(ct_max_slice_thickness_mm=2.0)
    result, _ = score(scorer_for(bundle, watch, selection=strict), store, uid)
    assert result.triage == "not_scored"
    assert result.reason is not None
    assert result.reason.startswith("no CT series suitable for lung nodules (series 3:")
    assert "series 5: 12 slices, at least 30 needed" in result.reason


def test_a_broken_slice_falls_back_to_the_next_series(tmp_path: Path, store: Store) -> None:
    watch = tmp_path / "in"
    study_uid = generate_uid()
    soft = ct_datasets(chest_phantom(), study_uid=study_uid, kernel="STANDARD")
    lung = ct_datasets(chest_phantom(), study_uid=study_uid, kernel="LUNG", series_number=4)
    paths = [write_instance(ds, watch) for ds in soft + lung]
    uid = ingest(store, watch)
    broken = paths[len(soft) + 7]
    broken.write_bytes(b"overwritten after intake read it")
    result, states = score(scorer_for(ct_bundle(tmp_path / "bundle"), watch), store, uid)
    assert result.findings[0].slab is not None
    assert result.findings[0].slab.series_instance_uid == soft[0].SeriesInstanceUID
    assert states[lung[7].SOPInstanceUID][0] == "rejected"
    assert result.instances.rejected == 1


def test_radiographs_get_only_radiograph_findings_from_a_ct_capable_bundle(
    tmp_path: Path, store: Store
) -> None:
    watch = tmp_path / "in"
    list(simulate(watch, studies=1, modality="CR", seed=2, rows=96, cols=80))
    uid = ingest(store, watch)
    result, _ = score(scorer_for(ct_bundle(tmp_path / "bundle"), watch), store, uid)
    assert [f.code for f in result.findings] == ["bright"]
    assert "slab" not in json.loads(result.to_json_bytes())["findings"][0]


# -- the study lifecycle ------------------------------------------------------------------


def _record(sop: str, view: str = "frontal") -> InstanceRecord:
    return InstanceRecord(sop, "1.2.3", "1.2.3.4", "CR", view)  # type: ignore[arg-type]


def _message(alert: str, triage: str) -> Message:
    return Message("result", "p/study/1.2.3", json.dumps({"triage": triage}).encode(), alert)


def _outbox(store: Store) -> list[str]:
    return [json.loads(m.payload)["triage"] for m in store.outbox_messages()]


def test_urgent_never_drops_without_a_new_published_revision(store: Store) -> None:
    store.add_instance("a.dcm", 1, 1, _record("1.1"), now=100.0)
    store.complete_quiet_studies(1.0, now=110.0)
    first = store.study("1.2.3")
    assert first is not None
    assert store.commit_result(first, "urgent", _message("A1", "urgent"), {}, [], 111.0)
    # The same revision scored again (a duplicate queue entry, a second scorer) cannot
    # overwrite the published level, and nothing new is published.
    assert not store.commit_result(first, "routine", _message("A1", "routine"), {}, [], 112.0)
    study = store.study("1.2.3")
    assert study is not None and (study.triage, study.revision) == ("urgent", 1)
    assert _outbox(store) == ["urgent"]
    # A late instance re-opens the study as revision 2; only its result can lower the level,
    # and that result is published as its own message.
    store.add_instance("b.dcm", 1, 2, _record("1.2", "lateral"), now=200.0)
    store.complete_quiet_studies(1.0, now=210.0)
    second = store.study("1.2.3")
    assert second is not None and second.revision == 2 and second.triage == "urgent"
    assert store.commit_result(second, "routine", _message("A2", "routine"), {}, [], 211.0)
    study = store.study("1.2.3")
    assert study is not None and (study.triage, study.revision) == ("routine", 2)
    assert _outbox(store) == ["urgent", "routine"]


def test_a_colour_slice_labelled_ct_is_refused_not_read_as_hounsfield() -> None:
    ds = Dataset()
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.Rows, ds.Columns = 4, 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PlanarConfiguration = 0
    ds.PixelData = bytes(range(48))
    with pytest.raises(ct.ImageRejected, match="colour CT slice"):
        ct.slice_hu(ds)
