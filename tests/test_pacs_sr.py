"""The DICOM SR sent to the PACS: valid for dciodvfy (dicom3tools), readable by dcmtk's dsrdump,
and its content tree says what the result says."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers.delivery import make_result
from hypothesis import given
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset

from edge_agent.bundle import Concept
from edge_agent.dicom.uid import uid_problem
from edge_agent.pacs import sr as srmod
from edge_agent.pacs.sr import SRError, build_sr, derived_uid, sop_instance_uid
from edge_agent.results import FindingResult, Narrative, StudyResult
from edge_agent.simulate.dicom_writer import chest_instance, new_study
from export.findings import default_findings_path, load_findings

needs_tools = pytest.mark.skipif(
    shutil.which("dciodvfy") is None or shutil.which("dsrdump") is None,
    reason="needs dicom3tools (dciodvfy) and dcmtk (dsrdump): make system-deps-test",
)

CXR_FINDINGS = load_findings(default_findings_path())
CONCEPTS = {f.code: f.concept for f in CXR_FINDINGS}
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
# The codes the shipped findings carry, each verified with its name in a terminology source
# (docs/pacs.md says which).
SHIPPED_CODES = {
    "pneumothorax": ("36118008", "SCT", "Pneumothorax"),
    "pleural_effusion": ("60046008", "SCT", "Pleural effusion"),
    "pneumoperitoneum": ("RID4803", "RADLEX", "Pneumoperitoneum"),
    "lung_nodule": ("309529002", "SCT", "Lung mass"),
    "consolidation": ("RID43255", "RADLEX", "Consolidation"),
}


def sources(n: int = 2, seed: int = 1) -> list[Dataset]:
    rng = np.random.default_rng(seed)
    study = new_study(rng, "CR")
    return [
        chest_instance(rng, findings={}, study=study, rows=64, cols=64, instance_number=i + 1)
        for i in range(n)
    ]


def result_for(images: list[Dataset], triage: str = "urgent", **changes: object) -> StudyResult:
    base = make_result(images[0].StudyInstanceUID, 1, triage)
    return StudyResult.model_validate({**base.model_dump(by_alias=True), **changes})


def save(sr: Dataset, tmp_path: Path, name: str = "sr.dcm") -> Path:
    path = tmp_path / name
    sr.save_as(path, enforce_file_format=True)
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def dsrdump(path: Path) -> str:
    run = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    return run.stdout


def walk(items: object, depth: int = 0) -> list[tuple[int, str, str, str]]:
    """(depth, value type, concept name meaning, value) for every content item."""
    out: list[tuple[int, str, str, str]] = []
    for item in items or []:  # type: ignore[attr-defined]
        name = (
            item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        )
        kind = item.ValueType
        if kind == "CODE":
            c = item.ConceptCodeSequence[0]
            value = f"{c.CodeValue}|{c.CodingSchemeDesignator}|{c.CodeMeaning}"
        elif kind == "NUM":
            value = str(item.MeasuredValueSequence[0].NumericValue)
        elif kind == "TEXT":
            value = item.TextValue
        elif kind == "IMAGE":
            value = item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        else:
            value = ""
        out.append((depth, kind, name, value))
        out.extend(walk(item.get("ContentSequence"), depth + 1))
    return out


@needs_tools
def test_urgent_sr_is_valid_and_says_what_the_result_says(tmp_path: Path) -> None:
    images = sources()
    result = result_for(images)
    path = save(build_sr(result, images, concepts=CONCEPTS, agent="box-1"), tmp_path)

    assert dciodvfy_errors(path) == []
    dump = dsrdump(path)
    assert "Enhanced SR Document" in dump
    assert '(36118008,SCT,"Pneumothorax")' in dump

    sr = dcmread(path)
    assert sr.SOPClassUID == ENHANCED_SR
    assert sr.SeriesDescription == "AI triage"
    assert sr.StudyInstanceUID == images[0].StudyInstanceUID
    # Patient and study modules copied from the source images.
    for key in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyID"):
        assert sr.get(key) == images[0].get(key), key
    assert sr.SOPInstanceUID == sop_instance_uid(result)
    assert sr.ConceptNameCodeSequence[0].CodeMeaning.startswith("DEMO")
    # Evidence: the scored images, in this study.
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == result.study_instance_uid
    referenced = {
        ref.ReferencedSOPInstanceUID
        for series in evidence.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in images}

    tree = walk(sr.ContentSequence)
    values = [(k, n, v) for _, k, n, v in tree]
    assert ("CODE", "Finding", "36118008|SCT|Pneumothorax") in values
    assert ("CODE", "Pneumothorax", "52101004|SCT|Present") in values
    assert ("NUM", "AI triage score", "0.93") in values
    assert ("NUM", "Review threshold", "0.3") in values
    assert ("NUM", "Urgent threshold", "0.6") in values
    assert ("CODE", "AI triage level", "urgent|99EDGETRIAGE|Urgent") in values
    assert ("TEXT", "Algorithm Name", "delivery-test") in values
    assert ("TEXT", "Algorithm Version", "1") in values
    assert ("TEXT", "Algorithm Parameters", f"sha256={result.model.sha256}") in values
    assert ("TEXT", "Notice", srmod.DISCLAIMER) in values
    assert ("TEXT", "Notice", srmod.DEMO_NOTICE) in values
    measured = {v for _, k, n, v in tree if k == "IMAGE" and n == "Source of Measurement"}
    assert measured == {ds.SOPInstanceUID for ds in images}


@needs_tools
def test_clinical_model_has_no_demo_and_a_standard_title(tmp_path: Path) -> None:
    images = sources()
    base = result_for(images, "review")
    result = StudyResult.model_validate(
        {
            **base.model_dump(by_alias=True),
            "model": {**base.model.model_dump(), "demo": False},
        }
    )
    path = save(build_sr(result, images, concepts=CONCEPTS, agent="box-1"), tmp_path)
    assert dciodvfy_errors(path) == []
    sr = dcmread(path)
    title = sr.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("126000", "DCM")
    assert "DEMO" not in dsrdump(path)
    assert ("TEXT", "Notice", srmod.DISCLAIMER) in [
        (k, n, v) for _, k, n, v in walk(sr.ContentSequence)
    ]


@needs_tools
def test_unknown_finding_gets_a_private_code_and_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = sources()
    odd = FindingResult(
        code="rib_fracture",
        label="Rib fracture",
        score=0.8,
        urgent_threshold=None,
        review_threshold=0.5,
        flagged=True,
    )
    result = result_for(images, "review", findings=[odd])
    with caplog.at_level(logging.WARNING, logger="edge_agent.pacs.sr"):
        path = save(build_sr(result, images, concepts=CONCEPTS, agent="box-1"), tmp_path)
    assert "rib_fracture" in caplog.text
    assert dciodvfy_errors(path) == []
    values = [(k, n, v) for _, k, n, v in walk(dcmread(path).ContentSequence)]
    assert ("CODE", "Finding", "rib_fracture|99EDGETRIAGE|Rib fracture") in values
    assert not any(n == "Urgent threshold" for _, n, _ in values)


@needs_tools
def test_narrative_revision_carries_machine_drafted_text(tmp_path: Path) -> None:
    images = sources()
    first = result_for(images)
    later = first.with_narrative(
        revision=2,
        alert_id="b" * 32,
        status="ok",
        published_at=first.timing.published_at,
        narrative=Narrative(
            text="Right apical lucency.",
            model="tiny",
            provider="CPUExecutionProvider",
            source="radiograph 1.2.3",
            tokens=4,
            generation_ms=1.0,
        ),
    )
    one = build_sr(first, images, concepts=CONCEPTS, agent="box-1")
    two = build_sr(later, images, concepts=CONCEPTS, agent="box-1")
    path = save(two, tmp_path)
    assert dciodvfy_errors(path) == []
    assert one.SOPInstanceUID != two.SOPInstanceUID  # one per revision
    assert one.SeriesInstanceUID == two.SeriesInstanceUID  # one series per agent and study
    assert two.InstanceNumber == 2
    texts = [
        v for _, k, n, v in walk(dcmread(path).ContentSequence) if n == "Machine-drafted narrative"
    ]
    assert texts == [srmod.NARRATIVE_PREFIX + "Right apical lucency."]
    assert "Machine-drafted narrative" in dsrdump(path)


def test_retries_build_the_same_uids() -> None:
    images = sources()
    result = result_for(images)
    a = build_sr(result, images, concepts=CONCEPTS, agent="box-1")
    b = build_sr(result, images, concepts=CONCEPTS, agent="box-1")
    other_agent = build_sr(result, images, concepts=CONCEPTS, agent="box-2")
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert a.ContentDate == b.ContentDate and a.ContentTime == b.ContentTime
    assert other_agent.SeriesInstanceUID != a.SeriesInstanceUID


def test_a_retry_builds_the_same_object_byte_for_byte(tmp_path: Path) -> None:
    """The PACS may already hold the first copy (the agent was killed before the row left):
    what it receives again is the very same object, not one dated by the clock."""
    images = sources()
    result = result_for(images)
    first = save(build_sr(result, images, concepts=CONCEPTS, agent="box-1"), tmp_path, "a.dcm")
    again = save(build_sr(result, images, concepts=CONCEPTS, agent="box-1"), tmp_path, "b.dcm")
    assert first.read_bytes() == again.read_bytes()
    sr = dcmread(first)
    scored = result.timing.scored_at  # 2026-12-07T01:02:03...Z
    day, time = scored[:10].replace("-", ""), scored[11:19].replace(":", "")
    assert (sr.InstanceCreationDate, sr.InstanceCreationTime) == (day, time)
    dated = [e for e in sr.ContributingEquipmentSequence if "ContributionDateTime" in e]
    assert dated and {e.ContributionDateTime for e in dated} == {day + time}


def test_refuses_without_sources_or_with_another_study() -> None:
    images = sources()
    result = result_for(images)
    with pytest.raises(SRError, match="no source image"):
        build_sr(result, [], concepts=CONCEPTS, agent="box-1")
    with pytest.raises(SRError, match="another study"):
        build_sr(result, sources(seed=2), concepts=CONCEPTS, agent="box-1")


def test_shipped_findings_carry_verified_codes() -> None:
    assert set(CONCEPTS) == set(SHIPPED_CODES)
    for f in CXR_FINDINGS:
        value, scheme, meaning = SHIPPED_CODES[f.code]
        assert f.concept == Concept(scheme=scheme, value=value, meaning=meaning), f.code
    # A finding shipped for CT and for radiographs is the same finding: the same code.
    for f in load_findings(default_findings_path("ct-chest")):
        assert f.concept == CONCEPTS[f.code], f.code


@needs_tools
def test_every_shipped_finding_is_named_by_its_code_in_the_sr(tmp_path: Path) -> None:
    images = sources()
    findings = [
        FindingResult(
            code=f.code,
            label=f.label,
            score=score,
            urgent_threshold=f.urgent_threshold,
            review_threshold=f.review_threshold,
            flagged=score >= f.review_threshold,
        )
        for f, score in zip(CXR_FINDINGS, (0.9, 0.1, 0.2, 0.7, 0.65), strict=True)
    ]
    result = result_for(images, "urgent", findings=findings)
    path = save(build_sr(result, images, concepts=CONCEPTS, agent="box-1"), tmp_path)

    # RadLex (RADLEX) and SNOMED CT (SCT) are designators dciodvfy knows: no error, and the
    # only unrecognised scheme it warns about is our private one.
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    assert [line for line in lines if line.startswith("Error")] == []
    unknown = [line for line in lines if "Unrecognized defined term" in line]
    assert unknown and all(srmod.PRIVATE_SCHEME in line for line in unknown)
    # dciodvfy warns about any private designator; the SR names ours where DICOM says
    (identified,) = dcmread(path).CodingSchemeIdentificationSequence
    assert identified.CodingSchemeDesignator == srmod.PRIVATE_SCHEME
    assert identified.CodingSchemeResponsibleOrganization == "edge-triage"
    dump = dsrdump(path)
    assert '(RID43255,RADLEX,"Consolidation")' in dump
    assert '(309529002,SCT,"Lung mass")' in dump
    assert '(RID4803,RADLEX,"Pneumoperitoneum")' in dump

    values = [(k, n, v) for _, k, n, v in walk(dcmread(path).ContentSequence)]
    for f in findings:
        value, scheme, meaning = SHIPPED_CODES[f.code]
        assert ("CODE", "Finding", f"{value}|{scheme}|{meaning}") in values, f.code
        present = "52101004|SCT|Present" if f.flagged else "272519000|SCT|Absent"
        assert ("CODE", meaning, present) in values, f.code


@given(st.lists(st.text(max_size=80), min_size=1, max_size=4))
def test_derived_uids_are_valid(parts: list[str]) -> None:
    uid = derived_uid(*parts)
    assert uid_problem(uid) is None
    assert len(uid) <= 64
