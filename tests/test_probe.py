"""``edge-export probe``: a linear probe fitted on the shipped demo bundle's embeddings of
simulated studies, through the real CLI, judged with the daemon's own loader and scorer."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("tqdm")

from helpers.export_cli import Run, run_cli, write_labels

from edge_agent.bundle import LinearProbeHead, load_bundle
from edge_agent.profiles import Profile
from edge_agent.runners import open_runner
from edge_agent.scoring import Scorer
from edge_agent.service import demo_bundle_path
from edge_agent.simulate import FINDINGS, simulate
from edge_agent.store import StudyRow
from edge_agent.triage import Head
from export.probe import scan_data

pytestmark = pytest.mark.export

DEMO = demo_bundle_path()
STUDIES = 40
HEADER = ["study_instance_uid", *FINDINGS]


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    return {
        p.relative_to(root).as_posix(): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@dataclass(frozen=True)
class Dataset:
    data: Path
    labels: Path
    truth: dict[str, dict[str, bool]]
    rows: list[list[str]]
    """The labels CSV's data rows (as written)."""
    corrupt_study: str


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """40 simulated CR/DX studies (nested folders, laterals in about half), a stray text
    file, a second frontal with truncated pixel data in one study, and labels from the
    simulator's truth in every accepted spelling, one nodule label left blank."""
    root = tmp_path_factory.mktemp("probe-data")
    data = root / "dicom"
    truth = {
        s.study_instance_uid: s.truth
        for s in simulate(
            data, studies=STUDIES, abnormal=0.6, seed=1, rows=256, cols=256, layout="nested"
        )
    }
    (data / "README.txt").write_text("not DICOM\n")
    # A second frontal image the daemon cannot decode (short pixel data): rejected, not fatal.
    corrupt_study = next(iter(truth))
    frontal = next(
        p
        for p in (data / corrupt_study).glob("*.dcm")
        if pydicom.dcmread(p, stop_before_pixels=True).ViewPosition in ("PA", "AP")
    )
    ds = pydicom.dcmread(frontal)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(data / corrupt_study / "broken.dcm", enforce_file_format=True)

    spellings = [("1", "0"), ("true", "false"), ("YES", "no")]
    rows = []
    for i, (uid, t) in enumerate(truth.items()):
        yes, no = spellings[i % len(spellings)]
        rows.append([uid, *(yes if t[code] else no for code in FINDINGS)])
    rows[-1][HEADER.index("lung_nodule")] = ""  # unknown: left out for that finding only
    labels = write_labels(root / "labels.csv", HEADER, rows)
    return Dataset(data, labels, truth, rows, corrupt_study)


@dataclass(frozen=True)
class Probed:
    run: Run
    out: Path
    source_before: dict[str, tuple[str, int]]


@pytest.fixture(scope="module")
def probed(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Probed:
    before = tree_digest(DEMO)
    out = tmp_path_factory.mktemp("probe-out") / "bundle"
    args = ["probe", "--bundle", DEMO, "--labels", dataset.labels, "--data", dataset.data]
    run = run_cli([*args, "--out", out, "--threads", "1", "--workers", "2"])
    return Probed(run, out, before)


def cpu_profile() -> Profile:
    return Profile.model_validate(
        {"name": "test-cpu", "description": "tests", "runtime": {"intra_op_threads": 1}}
    )


# --------------------------------------------------------------------------- the bundle


def test_probe_writes_a_bundle_with_a_cross_validated_linear_probe(
    probed: Probed, dataset: Dataset
) -> None:
    assert probed.run.code == 0, probed.run.err
    source, new = load_bundle(DEMO), load_bundle(probed.out)
    spec = new.manifest
    assert isinstance(spec.head, LinearProbeHead)
    assert set(spec.head.weights) == set(FINDINGS)
    # Same encoder and preprocessing, new identity.
    assert spec.encoder == source.manifest.encoder
    enc = spec.encoder.file
    assert spec.files[enc].sha256 == source.manifest.files[enc].sha256
    assert new.sha256 != source.sha256
    assert spec.parity == source.manifest.parity
    assert spec.model.name == source.manifest.model.name
    assert spec.model.version == source.manifest.model.version + ".probe"  # "0.1.0+seed.0"
    assert source.sha256[:12] in spec.model.source
    assert spec.model.demo is True

    metrics = spec.metrics
    assert metrics is not None
    counts = {code: sum(t[code] for t in dataset.truth.values()) for code in FINDINGS}
    assert metrics["positives_pneumothorax"] == counts["pneumothorax"]
    assert metrics["negatives_pneumothorax"] == STUDIES - counts["pneumothorax"]
    # One nodule label is blank: that study is left out for the nodule only.
    blank = dataset.rows[-1][0]
    nodule_pos = counts["lung_nodule"] - dataset.truth[blank]["lung_nodule"]
    assert metrics["positives_lung_nodule"] + metrics["negatives_lung_nodule"] == STUDIES - 1
    assert metrics["positives_lung_nodule"] == nodule_pos
    assert metrics["studies"] == STUDIES
    assert metrics["images"] == STUDIES  # one frontal each; laterals and the broken one unused
    for code in FINDINGS:  # chance is 0.5; the demo encoder knows the simulator's findings
        assert metrics[f"cv_auroc_{code}"] >= 0.9, metrics
    assert metrics["cv_auroc_study_abnormal"] >= 0.9
    assert metrics["source_model_sha256"] == source.sha256
    assert metrics["cv_folds"] == 5


def test_probe_chooses_thresholds_from_cross_validated_scores(probed: Probed) -> None:
    spec = load_bundle(probed.out).manifest
    source = {f.code: f for f in load_bundle(DEMO).manifest.findings}
    metrics = spec.metrics
    assert metrics is not None
    for f in spec.findings:
        assert (f.label, f.prompts) == (source[f.code].label, source[f.code].prompts)
        assert 0 < f.review_threshold < 1
        assert metrics[f"cv_review_sensitivity_{f.code}"] >= 0.9
        # urgent only where the source finding can be urgent
        if source[f.code].urgent_threshold is None:
            assert f.urgent_threshold is None
            assert f"cv_urgent_specificity_{f.code}" not in metrics
        else:
            assert f.urgent_threshold is not None
            assert f.urgent_threshold >= f.review_threshold
            assert metrics[f"cv_urgent_specificity_{f.code}"] >= 0.95
    assert {f.code for f in spec.findings if f.urgent_threshold is not None} == {"pneumothorax"}


def test_probe_leaves_the_source_bundle_untouched(probed: Probed) -> None:
    assert tree_digest(DEMO) == probed.source_before


def test_probe_reports_progress_counts_and_a_summary_table(probed: Probed) -> None:
    out, err = probed.run.out, probed.run.err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["finding", "n+", "n-", "images"]
    assert any(line.startswith("pneumothorax") for line in lines)
    assert any(line.startswith("lung_nodule") for line in lines)
    assert "study: normal vs abnormal, CV AUROC" in out
    assert f"bundle {probed.out}" in out
    assert "1 not DICOM (ignored)" in err
    assert "images rejected: 1 ×" in err


def test_the_daemon_scores_a_study_with_the_probe_bundle(probed: Probed, dataset: Dataset) -> None:
    bundle = load_bundle(probed.out)
    runner = open_runner(bundle, cpu_profile())
    scorer = Scorer(bundle, runner, dataset.data)
    assert isinstance(scorer.head, Head)
    scan = scan_data(dataset.data)

    def score(uid: str) -> tuple[str, dict[str, float]]:
        study = StudyRow(uid, "CR", None, "complete", 1, 0.0, 0.0, 0.0, None)
        result = scorer.score(study, scan.studies[uid], 0)
        assert result is not None
        return result.result.triage, {f.code: f.score for f in result.result.findings}

    ptx = next(u for u, t in dataset.truth.items() if t["pneumothorax"])
    normal = next(u for u, t in dataset.truth.items() if not any(t.values()))
    ptx_triage, ptx_scores = score(ptx)
    normal_triage, normal_scores = score(normal)
    assert ptx_triage == "urgent"
    assert normal_triage == "routine"
    assert ptx_scores["pneumothorax"] > normal_scores["pneumothorax"]
    # The study with the broken second frontal is still scored, from its good image.
    result = scorer.score(
        StudyRow(dataset.corrupt_study, "CR", None, "complete", 1, 0.0, 0.0, 0.0, None),
        scan.studies[dataset.corrupt_study],
        0,
    )
    assert result is not None and result.result.instances.scored == 1


def test_keep_thresholds_version_and_overwrite(probed: Probed, dataset: Dataset) -> None:
    out = probed.out.parent / "kept"
    shutil.copytree(probed.out, out)
    run = run_cli(
        ["probe", "--bundle", DEMO, "--labels", dataset.labels, "--data", dataset.data,
         "--out", out, "--overwrite", "--keep-thresholds", "--version", "site-7", "--folds",
         "3", "--C", "0.5", "--class-weight", "none", "--threads", "1"]
    )  # fmt: skip
    assert run.code == 0, run.err
    spec = load_bundle(out).manifest
    assert spec.findings == load_bundle(DEMO).manifest.findings
    assert spec.model.version == "site-7"
    assert spec.metrics is not None
    assert spec.metrics["thresholds"] == "kept from the source bundle"
    assert (spec.metrics["cv_folds"], spec.metrics["probe_C"]) == (3, 0.5)
    assert spec.metrics["probe_class_weight"] == "none"


# --------------------------------------------------------------------------- refusals


@pytest.fixture
def probe_args(dataset: Dataset, tmp_path: Path) -> list[object]:
    return ["probe", "--bundle", DEMO, "--data", dataset.data, "--out", tmp_path / "out"]


def labels_with(tmp_path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Path:
    return write_labels(tmp_path / "labels.csv", header, rows)


def test_unknown_column_is_named(
    probe_args: list[object], dataset: Dataset, tmp_path: Path
) -> None:
    rows = [[*r, "0"] for r in dataset.rows]
    labels = labels_with(tmp_path, [*HEADER, "effusion"], rows)
    run = run_cli([*probe_args, "--labels", labels])
    assert run.code == 2
    assert "column 'effusion' is not a finding of the bundle" in run.err
    assert len(run.err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_finding_column_is_named(
    probe_args: list[object], dataset: Dataset, tmp_path: Path
) -> None:
    labels = labels_with(tmp_path, HEADER[:2], [r[:2] for r in dataset.rows])
    run = run_cli([*probe_args, "--labels", labels])
    assert run.code == 2
    assert "no column for the bundle's finding 'lung_nodule'" in run.err


def test_bad_value_names_line_and_column(
    probe_args: list[object], dataset: Dataset, tmp_path: Path
) -> None:
    rows = [list(r) for r in dataset.rows]
    rows[2][1] = "maybe"  # data row 3 = line 4 of the file
    labels = labels_with(tmp_path, HEADER, rows)
    run = run_cli([*probe_args, "--labels", labels])
    assert run.code == 2
    assert "line 4, column 'pneumothorax': 'maybe' is not a label" in run.err


def test_duplicate_study_is_refused(
    probe_args: list[object], dataset: Dataset, tmp_path: Path
) -> None:
    labels = labels_with(tmp_path, HEADER, [*dataset.rows, dataset.rows[0]])
    run = run_cli([*probe_args, "--labels", labels])
    assert run.code == 2
    assert f"study {dataset.rows[0][0]} is listed again (first on line 2)" in run.err


def test_a_finding_without_positives_is_refused(
    probe_args: list[object], dataset: Dataset, tmp_path: Path
) -> None:
    rows = [[r[0], "0", r[2]] for r in dataset.rows]
    labels = labels_with(tmp_path, HEADER, rows)
    run = run_cli([*probe_args, "--labels", labels])
    assert run.code == 2
    assert "pneumothorax has 0 positive and 40 negative" in run.err
    assert "5-fold" in run.err


def test_empty_data_folder_is_refused(dataset: Dataset, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("nothing here")
    run = run_cli(
        ["probe", "--bundle", DEMO, "--labels", dataset.labels, "--data", empty,
         "--out", tmp_path / "out"]
    )  # fmt: skip
    assert run.code == 2
    assert f"--data: {empty} holds no usable DICOM instance (1 file looked at" in run.err


def test_data_without_the_labelled_studies_is_refused(tmp_path: Path, dataset: Dataset) -> None:
    other = tmp_path / "other"
    for _ in simulate(other, studies=1, seed=99, rows=64, cols=64):
        pass
    run = run_cli(
        ["probe", "--bundle", DEMO, "--labels", dataset.labels, "--data", other,
         "--out", tmp_path / "out"]
    )  # fmt: skip
    assert run.code == 2
    assert "none of the 40 studies in labels.csv has an instance" in run.err


def test_existing_out_needs_overwrite(probed: Probed, dataset: Dataset) -> None:
    before = tree_digest(probed.out)
    run = run_cli(
        ["probe", "--bundle", DEMO, "--labels", dataset.labels, "--data", dataset.data,
         "--out", probed.out]
    )  # fmt: skip
    assert run.code == 2
    assert "already exists (use --overwrite to replace it)" in run.err
    assert tree_digest(probed.out) == before


def test_out_equal_to_the_source_bundle_is_refused(tmp_path: Path, dataset: Dataset) -> None:
    source = tmp_path / "source"
    shutil.copytree(DEMO, source)
    before = tree_digest(source)
    run = run_cli(
        ["probe", "--bundle", source, "--labels", dataset.labels, "--data", dataset.data,
         "--out", source]
    )  # fmt: skip
    assert run.code == 2
    assert "is the source bundle" in run.err
    inside = run_cli(
        ["probe", "--bundle", source, "--labels", dataset.labels, "--data", dataset.data,
         "--out", source / "probe"]
    )  # fmt: skip
    assert inside.code == 2
    assert "inside the source bundle" in inside.err
    assert tree_digest(source) == before


def test_missing_bundle_is_a_missing_resource(tmp_path: Path, dataset: Dataset) -> None:
    run = run_cli(
        ["probe", "--bundle", tmp_path / "nope", "--labels", dataset.labels, "--data",
         dataset.data, "--out", tmp_path / "out"]
    )  # fmt: skip
    assert run.code == 3
    assert "does not exist" in run.err


def test_keep_thresholds_conflicts_with_targets(probe_args: list[object], dataset: Dataset) -> None:
    run = run_cli(
        [*probe_args, "--labels", dataset.labels, "--keep-thresholds", "--review-sensitivity",
         "0.8"]
    )  # fmt: skip
    assert run.code == 2
    assert "--keep-thresholds: cannot be combined" in run.err


def test_scan_groups_instances_by_study(
    dataset: Dataset, capsys: pytest.CaptureFixture[str]
) -> None:
    """The scan groups instances by study as intake does: every simulated study, laterals
    included, nothing from the stray text file; with progress on, tqdm reports on stderr."""
    scan = scan_data(dataset.data, progress=True)
    assert set(scan.studies) == set(dataset.truth)
    assert scan.not_dicom == 1
    assert scan.instances == scan.files - 1
    assert np.mean([len(v) for v in scan.studies.values()]) > 1  # laterals are there
    err = capsys.readouterr().err
    assert "reading headers" in err
    assert f"{scan.files}/{scan.files}" in err
