"""The default chest findings file and the findings loader."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.errors import ConfigError
from export.findings import default_findings_path, load_findings


def test_default_cxr_findings_cover_the_issue() -> None:
    findings = {f.code: f for f in load_findings(default_findings_path())}
    assert {"pneumothorax", "pleural_effusion", "lung_nodule", "consolidation",
            "pneumoperitoneum"} <= set(findings)  # fmt: skip
    for code in ("pneumothorax", "pleural_effusion", "pneumoperitoneum"):
        assert findings[code].urgent_threshold is not None, f"{code} is urgent"
    for code in ("lung_nodule", "consolidation"):
        assert findings[code].urgent_threshold is None, f"{code} is review only"
    assert "apical pneumothorax" in findings["pneumothorax"].prompts.present
    assert "no evidence of pleural effusion" in findings["pleural_effusion"].prompts.absent
    for f in findings.values():
        assert f.prompts.present and f.prompts.absent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "f.toml"
    path.write_text(text)
    return path


FINDING = '[[finding]]\ncode = "x"\nlabel = "X"\npresent = ["x"]\nreview_threshold = 0.2\n'


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (FINDING + "urgent_threshold = 0.1\n", "findings(f.toml).x"),
        (FINDING.replace("0.2", "1.5"), "findings(f.toml).x.review_threshold"),
        (FINDING + "colour = 1\n", "findings(f.toml).x.colour"),
        (FINDING.replace('present = ["x"]', "present = []"), "findings(f.toml).x.present"),
        (FINDING + FINDING, "findings(f.toml).x"),
        (FINDING.replace('"x"\nlabel', '"Bad Code"\nlabel'), "findings(f.toml).Bad Code.code"),
        ('title = "x"\n' + FINDING, "findings(f.toml).title"),
    ],
)
def test_errors_name_the_finding_and_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_findings(write(tmp_path, text))
    assert info.value.key == key


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_findings(tmp_path / "none.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_findings(write(tmp_path, "[[finding]\n"))


def test_shipped_ct_findings_have_their_ct_section() -> None:
    from export.findings import default_findings_path, load_findings_file

    findings, ct = load_findings_file(default_findings_path("ct-chest"))
    assert ct is not None and ct.convention == "three_windows" and ct.stride_mm <= ct.slab_mm
    assert all(f.modalities == ("CT",) for f in findings)
    cxr, none = load_findings_file(default_findings_path())
    assert none is None and all("CT" not in f.modalities for f in cxr)


def test_a_finding_without_a_concept_warns_at_export(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    coded = """
[[finding]]
code = "pneumothorax"
label = "Pneumothorax"
present = ["pneumothorax"]
review_threshold = 0.5
concept = { scheme = "SCT", value = "36118008", meaning = "Pneumothorax" }

[[finding]]
code = "rib_fracture"
label = "Rib fracture"
present = ["rib fracture"]
review_threshold = 0.5
"""
    with caplog.at_level("WARNING", logger="export.findings"):
        findings = load_findings(write(tmp_path, coded))
    assert findings[0].concept is not None and findings[0].concept.value == "36118008"
    assert findings[1].concept is None
    assert "rib_fracture: no concept" in caplog.text
    assert "pneumothorax: no concept" not in caplog.text


def test_a_radlex_concept_loads(tmp_path: Path) -> None:
    text = """
[[finding]]
code = "consolidation"
label = "Consolidation"
present = ["consolidation"]
review_threshold = 0.5
concept = { scheme = "RADLEX", value = "RID43255", meaning = "Consolidation" }
"""
    (finding,) = load_findings(write(tmp_path, text))
    assert finding.concept is not None
    assert (finding.concept.scheme, finding.concept.value) == ("RADLEX", "RID43255")


def test_every_shipped_finding_is_coded(caplog: pytest.LogCaptureFixture) -> None:
    # each with a verified SNOMED CT / RadLex code (docs/pacs.md says where it was checked)
    with caplog.at_level("WARNING", logger="export.findings"):
        cxr = load_findings(default_findings_path())
        ct = load_findings(default_findings_path("ct-chest"))
    assert [f.code for f in cxr + ct if f.concept is None] == []
    assert "no concept" not in caplog.text


@pytest.mark.parametrize(
    "concept",
    [
        '{ scheme = "ICD10", value = "J93", meaning = "Pneumothorax" }',
        '{ scheme = "SCT", value = "36118008" }',
        '{ scheme = "SCT", value = "3611 8008", meaning = "Pneumothorax" }',
    ],
)
def test_a_bad_concept_names_its_key(tmp_path: Path, concept: str) -> None:
    text = f"""
[[finding]]
code = "pneumothorax"
label = "Pneumothorax"
present = ["pneumothorax"]
review_threshold = 0.5
concept = {concept}
"""
    with pytest.raises(ConfigError) as err:
        load_findings(write(tmp_path, text))
    assert "findings(f.toml).pneumothorax.concept" in str(err.value)


def test_the_demo_bundle_names_its_findings_as_the_shipped_findings_do() -> None:
    """Its SRs carry the same codes (``edge-export demo`` takes label and code from
    cxr.toml; the shipped bundle was given them without a change to its model sha256)."""
    from edge_agent.bundle import load_bundle
    from edge_agent.service import demo_bundle_path

    shipped = {f.code: f for f in load_findings(default_findings_path())}
    for f in load_bundle(demo_bundle_path()).manifest.findings:
        assert f.concept is not None, f.code
        assert (f.label, f.concept) == (shipped[f.code].label, shipped[f.code].concept)
