"""``edge-export evaluate`` on simulated studies with known truth and the shipped demo bundle,
through the real CLI; the page checked in headless Chromium with the network cut."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("sklearn")
pytest.importorskip("onnxruntime")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")
pytest.importorskip("jsonschema")

import jsonschema
from helpers.export_cli import Run, run_cli, write_labels
from helpers.revised_bundle import revise_bundle, shifted_biases
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from edge_agent.bundle import (
    RADIOGRAPH_MODALITIES,
    Bundle,
    CTInput,
    LinearProbeHead,
    load_bundle,
)
from edge_agent.errors import ConfigError
from edge_agent.service import demo_bundle_path
from edge_agent.simulate import FINDINGS, simulate
from export.cli import main
from export.evaluation import stats
from export.evaluation.command import EvaluateSettings, score_studies

pytestmark = pytest.mark.export

DEMO = demo_bundle_path()
HEADER = ["study_instance_uid", *FINDINGS]
SCHEMA = Path(__file__).parents[1] / "export" / "evaluation" / "report.schema.json"
CHROMIUM = Path("/usr/bin/chromium")


@dataclass(frozen=True)
class Dataset:
    data: Path
    labels: Path
    rows: list[list[str]]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """40 simulated studies; three labels per finding flipped against the simulator's truth
    so that the demo bundle is not perfect on them (AUROC below 1, misses to list)."""
    root = tmp_path_factory.mktemp("evaluate-data")
    sims = simulate(
        root / "dicom", studies=40, abnormal=0.5, seed=3, rows=256, cols=256, layout="nested"
    )
    rows = [[s.study_instance_uid, *("1" if s.truth[c] else "0" for c in FINDINGS)] for s in sims]
    for j in range(len(FINDINGS)):
        for i in (j, 10 + j, 20 + j):
            rows[i][1 + j] = "0" if rows[i][1 + j] == "1" else "1"
    rows[-1][1] = ""  # unknown: left out for that finding only
    return Dataset(root / "dicom", write_labels(root / "labels.csv", HEADER, rows), rows)


def evaluate_demo(dataset: Dataset, out: Path, *options: object) -> tuple[Run, dict[str, Any]]:
    """``edge-export evaluate`` of the demo bundle on the fixture's studies into ``out`` with
    ``options``: it must succeed, and its report.json validate against the schema."""
    run = run_cli(
        [
            "evaluate", "--bundle", DEMO, "--data", dataset.data, "--labels", dataset.labels,
            "--out", out, *options,
        ]
    )  # fmt: skip
    assert run.code == 0, run.err
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, json.loads(SCHEMA.read_text()))
    return run, report


@dataclass(frozen=True)
class Evaluated:
    run: Run
    out: Path
    report: dict[str, Any]


@pytest.fixture(scope="module")
def evaluated(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Evaluated:
    out = tmp_path_factory.mktemp("evaluate-out") / "report"
    run = run_cli(
        [
            "evaluate", "--bundle", DEMO, "--data", dataset.data, "--labels", dataset.labels,
            "--out", out, "--threads", "1", "--prevalence", "pneumothorax=0.02",
        ]
    )  # fmt: skip
    assert run.code == 0, run.err
    return Evaluated(run, out, json.loads((out / "report.json").read_text()))


def test_report_has_the_fixed_fields_and_validates_against_its_schema(
    evaluated: Evaluated,
) -> None:
    report = evaluated.report
    jsonschema.validate(report, json.loads(SCHEMA.read_text()))
    assert report["model"]["sha256"] == load_bundle(DEMO).sha256
    assert str(report["command"]).startswith("edge-export evaluate --bundle ")
    findings = report["findings"]
    assert set(findings) == set(FINDINGS)
    for code in FINDINGS:
        f = findings[code]
        for key in (
            "auroc",
            "auroc_ci95",
            "n_positive",
            "n_negative",
            "sensitivity",
            "specificity",
        ):
            assert key in f
    assert findings["pneumothorax"]["n_positive"] + findings["pneumothorax"]["n_negative"] == 39
    assert findings["lung_nodule"]["n_positive"] + findings["lung_nodule"]["n_negative"] == 40
    assert findings["pneumothorax"]["review"]["at_prevalence"]["prevalence"] == 0.02
    assert "pneumothorax" in evaluated.run.out and "AUROC" in evaluated.run.out
    timings = report["timings_s"]
    assert 0 < timings["bootstrap"] <= timings["statistics"]


def test_figures_are_written_as_png(evaluated: Evaluated) -> None:
    pngs = sorted((evaluated.out / "figures").glob("*.png"))
    assert len(pngs) == len(FINDINGS)
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)


def test_auroc_equals_scikit_learn_and_the_interval_holds_it(
    evaluated: Evaluated, dataset: Dataset
) -> None:
    bundle = load_bundle(DEMO)
    scored = score_studies(bundle, dataset.labels, dataset.data, EvaluateSettings(threads=1))
    for j, code in enumerate(scored.codes):
        keep = ~np.isnan(scored.truth[:, j])
        truth, scores = scored.truth[keep, j].astype(bool), scored.scores[keep, j]
        f = evaluated.report["findings"][code]
        assert f["auroc"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-4)
        assert f["auroc"] < 1.0  # the flipped labels
        lo, hi = f["auroc_ci95"]
        assert lo <= f["auroc"] <= hi
        assert [round(x, 4) for x in stats.bootstrap_auroc(scores, truth, seed=0)] == [lo, hi]
        review = bundle.manifest.findings[j].review_threshold
        assert f["sensitivity"] == pytest.approx(float((scores[truth] >= review).mean()), abs=1e-4)
        assert f["specificity"] == pytest.approx(float((scores[~truth] < review).mean()), abs=1e-4)
        for op in f["operating_points"]:
            assert op["sensitivity"] >= op["target_sensitivity"]
        assert f["worst_false_negatives"] or f["worst_false_positives"]


def test_confusion_table_counts_every_scored_study(evaluated: Evaluated, dataset: Dataset) -> None:
    table = evaluated.report["triage_confusion"]
    assert sum(sum(c.values()) for c in table.values()) == 40
    # the study with a blank label is unknown only when its other label is negative
    unknown = 1 if dataset.rows[-1][2] == "0" else 0
    assert sum(c["unknown"] for c in table.values()) == unknown
    abnormal = sum(1 for r in dataset.rows if "1" in r[1:])
    assert sum(c["abnormal"] for c in table.values()) == abnormal


def test_page_opens_offline_in_chromium_with_its_figures(evaluated: Evaluated) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing (Debian: apt-get install chromium)")
    page_html = (evaluated.out / "index.html").read_text()
    assert "http://" not in page_html and "https://" not in page_html
    requests: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            context = browser.new_context(offline=True)
            page = context.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.goto((evaluated.out / "index.html").as_uri())
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
            assert len(widths) == len(FINDINGS)
            assert all(w > 500 for w in widths)
            assert "pneumothorax" in page.inner_text("h2#pneumothorax")
            page.screenshot(path=str(evaluated.out / "screenshot.png"), full_page=True)
        finally:
            browser.close()
    assert all(u.startswith(("file:", "data:")) for u in requests), requests


# --------------------------------------------------------------------------- bad input


def _bad(dataset: Dataset, tmp_path: Path, labels: Path, data: Path | None = None) -> Run:
    out = tmp_path / "report"
    run = run_cli(
        [
            "evaluate", "--bundle", DEMO, "--data", data or dataset.data, "--labels", labels,
            "--out", out,
        ]
    )  # fmt: skip
    assert run.code == 2, run.err
    assert not (out / "report.json").exists()
    return run


def test_labels_for_studies_not_in_the_folder_are_listed(dataset: Dataset, tmp_path: Path) -> None:
    stray = "1.2.3.4.5.6.7"
    labels = write_labels(tmp_path / "l.csv", HEADER, [*dataset.rows, [stray, "1", "0"]])
    run = _bad(dataset, tmp_path, labels)
    assert "1 labelled studies have no instance" in run.err and stray in run.err


def test_studies_without_labels_are_listed(dataset: Dataset, tmp_path: Path) -> None:
    labels = write_labels(tmp_path / "l.csv", HEADER, dataset.rows[1:])
    run = _bad(dataset, tmp_path, labels)
    assert "1 studies in" in run.err and dataset.rows[0][0] in run.err


def test_a_column_that_is_not_a_finding_is_named(dataset: Dataset, tmp_path: Path) -> None:
    labels = write_labels(
        tmp_path / "l.csv", [*HEADER, "fracture"], [[*r, "0"] for r in dataset.rows]
    )
    assert "'fracture' is not a finding" in _bad(dataset, tmp_path, labels).err


def test_a_value_that_is_not_a_label_is_named(dataset: Dataset, tmp_path: Path) -> None:
    rows = [list(r) for r in dataset.rows]
    rows[4][2] = "2"
    run = _bad(dataset, tmp_path, write_labels(tmp_path / "l.csv", HEADER, rows))
    assert "line 6, column 'lung_nodule': '2' is not a label" in run.err


def test_an_empty_folder_is_refused(dataset: Dataset, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "no usable DICOM" in _bad(dataset, tmp_path, dataset.labels, tmp_path / "empty").err


def test_a_prevalence_for_an_unknown_finding_is_refused(dataset: Dataset, tmp_path: Path) -> None:
    run = run_cli(
        [
            "evaluate", "--bundle", DEMO, "--data", dataset.data, "--labels", dataset.labels,
            "--out", tmp_path / "r", "--prevalence", "fracture=0.1",
        ]
    )  # fmt: skip
    assert run.code == 2 and "fracture is not a finding" in run.err


def test_a_bad_prevalence_is_refused_by_the_parser(dataset: Dataset, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(io.StringIO()):
        main(["evaluate", "--bundle", str(DEMO), "--data", "d", "--labels", "l", "--out", "o",
              "--prevalence", "pneumothorax=1.5"])  # fmt: skip
    assert exc.value.code == 2


def test_not_scored_studies_are_counted_with_their_reason(dataset: Dataset, tmp_path: Path) -> None:
    data = tmp_path / "dicom"
    shutil.copytree(dataset.data, data)
    import pydicom

    lateral_only = dataset.rows[0][0]
    for p in (data / lateral_only).rglob("*.dcm"):
        if pydicom.dcmread(p, stop_before_pixels=True).ViewPosition in ("PA", "AP"):
            ds = pydicom.dcmread(p)
            ds.ViewPosition = "LL"
            ds.save_as(p)
    run = run_cli(
        ["evaluate", "--bundle", DEMO, "--data", data, "--labels", dataset.labels,
         "--out", tmp_path / "r", "--threads", "1"]
    )  # fmt: skip
    assert run.code == 0, run.err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["studies"]["scored"] == 39
    assert sum(report["studies"]["not_scored"].values()) == 1
    assert "not scored: 1 ×" in run.out


# --------------------------------------------------------------------------- options


def test_reference_against_itself_agrees_on_every_study(dataset: Dataset, tmp_path: Path) -> None:
    run, report = evaluate_demo(
        dataset, tmp_path / "r", "--threads", "1", "--reference", DEMO, "--resamples", "200"
    )  # fmt: skip
    ref = report["reference"]
    assert ref["model"]["sha256"] == load_bundle(DEMO).sha256
    assert (ref["studies"], ref["agreement"], ref["kappa"], ref["changed"]) == (40, 1.0, 1.0, [])
    assert "triage agreement 1.0" in run.out
    assert "Against the reference" in (tmp_path / "r" / "index.html").read_text()


SHIFTS = {"pneumothorax": -3.0, "lung_nodule": 3.0}
"""Logit moves of the disagreeing bundle: on the fixture's studies some urgent pneumothoraces
drop to review or routine and some routine studies rise to review for a nodule."""


@pytest.fixture(scope="module")
def shifted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo bundle with its head's biases moved by SHIFTS (same encoder, thresholds):
    every study's score for a finding moves by exactly that many logits."""
    out = tmp_path_factory.mktemp("shifted") / "bundle"
    return revise_bundle(DEMO, out, version="0.1.0+shifted", head=shifted_biases(DEMO, SHIFTS))


def _logit(p: np.ndarray) -> np.ndarray:
    return np.asarray(np.log(p / (1 - p)))


def test_a_reference_that_disagrees_names_exactly_the_studies_whose_level_changes(
    dataset: Dataset, shifted: Path, tmp_path: Path
) -> None:
    before = _digest(DEMO)
    out = tmp_path / "r"
    run = run_cli(
        [
            "evaluate", "--bundle", shifted, "--data", dataset.data, "--labels", dataset.labels,
            "--out", out, "--threads", "1", "--reference", DEMO, "--resamples", "200",
        ]
    )  # fmt: skip
    assert run.code == 0, run.err
    assert _digest(DEMO) == before
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, json.loads(SCHEMA.read_text()))
    ref = report["reference"]
    assert ref["model"]["sha256"] == load_bundle(DEMO).sha256 != report["model"]["sha256"]

    # each bundle's per-study levels and scores, computed here run by run
    ours = score_studies(load_bundle(shifted), dataset.labels, dataset.data, EvaluateSettings())
    theirs = score_studies(load_bundle(DEMO), dataset.labels, dataset.data, EvaluateSettings())
    assert ours.study_uids == theirs.study_uids and ours.codes == theirs.codes
    uids = ours.study_uids
    old, new = theirs.levels, ours.levels
    changed = {u: (a, b) for u, a, b in zip(uids, old, new, strict=True) if a != b}
    assert 0 < len(changed) < len(uids)
    assert {(a, b) for a, b in changed.values()} >= {("urgent", "review"), ("routine", "review")}
    listed = {c["study_instance_uid"]: (c["reference"], c["level"]) for c in ref["changed"]}
    assert listed == changed and len(ref["changed"]) == len(changed)

    assert ref["studies"] == len(uids) == 40
    agreement = 1 - len(changed) / len(uids)
    assert ref["agreement"] == pytest.approx(agreement, abs=1e-4)
    lo, hi = ref["agreement_ci95"]
    assert lo < agreement < hi
    assert ref["kappa"] == pytest.approx(cohen_kappa_score(old, new), abs=1e-4)
    assert ref["kappa"] < 1
    assert sum(n for row in ref["levels"].values() for n in row.values()) == len(uids)
    unchanged = sum(row.get(x, 0) for x, row in ref["levels"].items())
    assert unchanged == len(uids) - len(changed)

    for j, code in enumerate(ours.codes):
        d = ours.scores[:, j] - theirs.scores[:, j]
        # the construction: every study moved SHIFTS[code] logits (where rounding allows)
        mid = (np.minimum(ours.scores[:, j], theirs.scores[:, j]) > 1e-3) & (
            np.maximum(ours.scores[:, j], theirs.scores[:, j]) < 1 - 1e-3
        )
        assert mid.sum() >= 5
        moved = _logit(ours.scores[mid, j]) - _logit(theirs.scores[mid, j])
        assert moved == pytest.approx(SHIFTS[code], abs=0.01)
        diff = ref["score_differences"][code]
        assert diff["studies"] == len(uids)
        assert diff["mean"] == pytest.approx(float(d.mean()), abs=1e-4)
        assert diff["mean_abs"] == pytest.approx(float(np.abs(d).mean()), abs=1e-4)
        assert diff["max_abs"] == pytest.approx(float(np.abs(d).max()), abs=1e-4)
        assert np.sign(diff["mean"]) == np.sign(SHIFTS[code])
        assert np.all(np.sign(d) * np.sign(SHIFTS[code]) >= 0)
    for c in ref["changed"]:
        i = uids.index(c["study_instance_uid"])
        assert c["scores"] == {code: float(ours.scores[i, j]) for j, code in enumerate(ours.codes)}
        assert c["reference_scores"] == {
            code: float(theirs.scores[i, j]) for j, code in enumerate(ours.codes)
        }

    assert f"triage agreement {ref['agreement']} (95% CI {lo:.3f}–{hi:.3f})" in run.out
    assert f"{len(changed)} studies change level" in run.out
    page = (out / "index.html").read_text()
    assert "Against the reference" in page and "Score differences" in page
    assert all(u in page for u in changed)


def test_a_reference_listing_the_same_findings_in_another_order_agrees(
    dataset: Dataset, tmp_path: Path
) -> None:
    """Findings are matched by code, not by position."""
    spec = load_bundle(DEMO).manifest
    reordered = revise_bundle(
        DEMO, tmp_path / "reordered", version="0.1.0+reordered", findings=spec.findings[::-1]
    )
    _, report = evaluate_demo(
        dataset, tmp_path / "r", "--threads", "1", "--reference", reordered, "--resamples", "100"
    )  # fmt: skip
    ref = report["reference"]
    assert (ref["agreement"], ref["kappa"], ref["changed"]) == (1.0, 1.0, [])
    for code in FINDINGS:
        assert ref["score_differences"][code] == {
            "studies": 40,
            "mean": 0.0,
            "mean_abs": 0.0,
            "max_abs": 0.0,
        }


def test_a_reference_with_its_own_preprocessing_is_scored_with_it(
    dataset: Dataset, tmp_path: Path
) -> None:
    """Preprocessing is part of what is compared (a new model may take other inputs): each
    bundle scores the studies as the daemon would run it."""
    pre = load_bundle(DEMO).manifest.encoder.preprocessing
    reference = revise_bundle(
        DEMO,
        tmp_path / "other-mean",
        version="0.1.0+mean",
        preprocessing=pre.model_copy(update={"mean": (0.4, 0.4, 0.4)}),
    )
    _, report = evaluate_demo(
        dataset, tmp_path / "r", "--threads", "1", "--reference", reference, "--resamples", "100"
    )  # fmt: skip
    ref = report["reference"]
    ours = score_studies(load_bundle(DEMO), dataset.labels, dataset.data, EvaluateSettings())
    theirs = score_studies(load_bundle(reference), dataset.labels, dataset.data, EvaluateSettings())
    for j, code in enumerate(ours.codes):
        d = ours.scores[:, j] - theirs.scores[:, j]
        assert ref["score_differences"][code]["mean_abs"] == pytest.approx(
            float(np.abs(d).mean()), abs=1e-4
        )
        assert ref["score_differences"][code]["mean_abs"] > 0
    assert ours.study_uids == theirs.study_uids
    levels = zip(ours.study_uids, ours.levels, theirs.levels, strict=True)
    changed = {u for u, a, b in levels if a != b}
    assert {c["study_instance_uid"] for c in ref["changed"]} == changed


def _unlike(source: Path, out: Path, **changes: object) -> Path:
    return revise_bundle(source, out, version="0.1.0+unlike", **changes)


def _refused_reference(dataset: Dataset, tmp_path: Path, reference: Path) -> Run:
    out = tmp_path / "r"
    run = run_cli(
        [
            "evaluate", "--bundle", DEMO, "--data", dataset.data, "--labels", dataset.labels,
            "--out", out, "--threads", "1", "--reference", reference, "--resamples", "100",
        ]
    )  # fmt: skip
    assert run.code == 2, (run.code, run.err)
    assert "--reference" in run.err
    assert not out.exists()
    return run


def test_a_reference_with_other_findings_is_refused_before_any_work(
    dataset: Dataset, tmp_path: Path
) -> None:
    spec = load_bundle(DEMO).manifest
    head = spec.head
    assert isinstance(head, LinearProbeHead)
    only = spec.findings[0].code
    reference = _unlike(
        DEMO,
        tmp_path / "one-finding",
        findings=[spec.findings[0]],
        head=head.model_copy(
            update={"weights": {only: head.weights[only]}, "biases": {only: head.biases[only]}}
        ),
    )
    run = _refused_reference(dataset, tmp_path, reference)
    assert "lung_nodule" in run.err and "cannot be compared" in run.err, run.err


def test_a_reference_scoring_a_finding_on_other_images_is_refused(
    dataset: Dataset, tmp_path: Path
) -> None:
    spec = load_bundle(DEMO).manifest
    findings = [spec.findings[0], spec.findings[1].model_copy(update={"modalities": ("CT",)})]
    reference = _unlike(
        DEMO, tmp_path / "ct-nodule", findings=findings, ct=CTInput(convention="lung_window")
    )
    run = _refused_reference(dataset, tmp_path, reference)
    assert "lung_nodule" in run.err and "CT" in run.err, run.err


def _timed_state(folder: Path) -> Path:
    """A state database of four studies with known times (the agent's clock), all of whose
    results go to the PACS:
    1.2.3 urgent: instances at 100 and 103, result 110, PUBACK 115, acknowledged 145, SR
    stored 112;
    1.2.4 routine: instance 200, result 205, PUBACK 206, SR stored 207;
    1.2.5 urgent: instance 300, result 301, PUBACK 309, not acknowledged, SR stored 311;
    1.2.6 review: instance 400, result 404, no PUBACK yet, SR waiting."""
    from helpers.status import result_payload

    from edge_agent.store import InstanceRecord, Message, Store

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "state.sqlite3"
    levels = ("urgent", "review", "routine", "not_scored")
    store = Store(path, pacs_levels=levels)
    plan = {
        "1.2.3": ("urgent", [100.0, 103.0], 110.0, 115.0, 145.0, 112.0),
        "1.2.4": ("routine", [200.0], 205.0, 206.0, None, 207.0),
        "1.2.5": ("urgent", [300.0], 301.0, 309.0, None, 311.0),
        "1.2.6": ("review", [400.0], 404.0, None, None, None),
    }
    try:
        for uid, (level, received, stored, puback, ack, in_pacs) in plan.items():
            for n, t in enumerate(received):
                record = InstanceRecord(f"{uid}.{n}", uid, f"{uid}.9", "CR", "frontal")  # type: ignore[arg-type]
                store.add_instance(f"{uid}.{n}.dcm", 10, 1, record, now=t)
            (done,) = store.complete_quiet_studies(1.0, now=received[-1] + 1)
            study = store.study(done)
            assert study is not None
            alert = f"alert-{uid}"
            message = Message("result", f"p/study/{uid}", result_payload(level), alert)
            states = {f"{uid}.{n}": ("scored", None) for n in range(len(received))}
            assert store.commit_result(study, level, message, states, [], stored)  # type: ignore[arg-type]
            if puback is not None:
                (queued,) = [m for m in store.outbox_messages() if m.topic.endswith(uid)]
                store.outbox_delete(queued.id)
            if ack is not None:
                assert store.acknowledge(uid, alert, "dr", "t") == "acknowledged"
            if in_pacs is not None:
                store.pacs_stored(alert, in_pacs)
            conn = store._conn()
            with conn:  # the clock of this test, not the wall clock
                conn.execute(
                    "UPDATE results SET published_at = ? WHERE alert_id = ?", (puback, alert)
                )
                conn.execute("UPDATE alerts SET ack_taken_at = ? WHERE alert_id = ?", (ack, alert))
    finally:
        store.close()
    return path


def test_time_to_notification_and_acknowledgement_from_the_state_database(
    dataset: Dataset, tmp_path: Path
) -> None:
    state = _timed_state(tmp_path)
    run, report = evaluate_demo(
        dataset, tmp_path / "r", "--threads", "1", "--state", state, "--resamples", "200"
    )  # fmt: skip
    ttn = report["time_to_notification"]
    # last instance received -> PUBACK: 12, 6 and 9 s; 1.2.6 has no PUBACK yet
    assert (ttn["studies"], ttn["p50_s"], ttn["max_s"]) == (3, 9.0, 12.0)
    assert ttn["p95_s"] == pytest.approx(float(np.percentile([12.0, 6.0, 9.0], 95)))
    assert ttn["not_published"] == 1
    received = ttn["stages"]["received_to_result"]  # 7, 5, 1, 4 s
    assert (received["studies"], received["p50_s"], received["max_s"]) == (4, 4.5, 7.0)
    puback = ttn["stages"]["result_to_puback"]  # 5, 1, 8 s
    assert (puback["studies"], puback["p50_s"], puback["max_s"]) == (3, 5.0, 8.0)
    assert ttn["by_level"]["urgent"]["studies"] == 2
    assert ttn["by_level"]["urgent"]["max_s"] == 12.0
    assert ttn["by_level"]["routine"]["p50_s"] == 6.0
    tta = report["time_to_acknowledgement"]  # 1.2.3: PUBACK 115 -> ack 145
    assert (tta["studies"], tta["p50_s"], tta["max_s"], tta["unacknowledged"]) == (1, 30.0, 30.0, 1)
    assert "time to notification over 3 studies: p50 9.0 s" in run.out
    assert "(1 not published yet)" in run.out
    assert "time to acknowledgement over 1 urgent studies: p50 30.0 s" in run.out
    ttp = report["time_to_pacs"]  # last instance received -> SR stored: 9, 7 and 11 s
    assert (ttp["studies"], ttp["p50_s"], ttp["max_s"], ttp["waiting"]) == (3, 9.0, 11.0, 1)
    in_pacs = ttp["stages"]["result_to_pacs"]  # 2, 2, 10 s
    assert (in_pacs["studies"], in_pacs["p50_s"], in_pacs["max_s"]) == (3, 2.0, 10.0)
    assert "time to PACS over 3 studies: p50 9.0 s, p95" in run.out
    assert "(1 SRs waiting)" in run.out
    page = (tmp_path / "r" / "index.html").read_text()
    assert "urgent: PUBACK → acknowledged" in page and "received → result stored" in page
    assert "result stored → SR stored in PACS" in page
    assert "1 studies&#x27; SR still waiting for the PACS" in page


def test_a_state_database_of_an_older_agent_gives_what_it_can(
    dataset: Dataset, tmp_path: Path
) -> None:
    """Schema 6 had no PACS times: the SRs stored are not timed, the one waiting is counted.
    Schema 5 had no PUBACK or ack times either: the stage it has is given, the rest is
    counted as not published. Neither database is changed."""
    from helpers.old_state import as_schema

    state = as_schema(_timed_state(tmp_path / "six"), 6)
    _, report = evaluate_demo(
        dataset, tmp_path / "r6", "--threads", "1", "--state", state, "--resamples", "200"
    )  # fmt: skip
    ttp = report["time_to_pacs"]
    assert (ttp["studies"], ttp["waiting"], ttp["p50_s"]) == (0, 1, None)
    assert report["time_to_notification"]["studies"] == 3

    state = as_schema(_timed_state(tmp_path / "five"), 5)
    before = state.read_bytes()
    _, report = evaluate_demo(
        dataset, tmp_path / "r", "--threads", "1", "--state", state, "--resamples", "200"
    )  # fmt: skip
    ttn = report["time_to_notification"]
    assert (ttn["studies"], ttn["not_published"]) == (0, 4)
    assert ttn["stages"]["received_to_result"]["studies"] == 4
    assert report["time_to_acknowledgement"]["studies"] == 0
    assert report["time_to_pacs"]["studies"] == 0
    assert state.read_bytes() == before


def test_a_missing_state_database_is_refused_before_any_work(
    dataset: Dataset, tmp_path: Path
) -> None:
    run = run_cli(
        [
            "evaluate", "--bundle", DEMO, "--data", dataset.data, "--labels", dataset.labels,
            "--out", tmp_path / "r", "--state", tmp_path / "nope.sqlite3",
        ]
    )  # fmt: skip
    assert run.code == 3 and "no state database" in run.err
    assert not (tmp_path / "r").exists()


def _digest(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_operating_points_written_into_a_new_revision_give_the_claimed_sensitivity(
    dataset: Dataset, tmp_path: Path
) -> None:
    before = _digest(DEMO)
    new = tmp_path / "bundle-sens98"
    run = run_cli(
        [
            "evaluate", "--bundle", DEMO, "--data", dataset.data, "--labels", dataset.labels,
            "--out", tmp_path / "r", "--threads", "1", "--resamples", "200",
            "--write-bundle", new, "--at-sensitivity", "0.98",
        ]
    )  # fmt: skip
    assert run.code == 0, run.err
    assert _digest(DEMO) == before  # the source is never touched
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    jsonschema.validate(report, json.loads(SCHEMA.read_text()))
    bundle = load_bundle(new)
    assert report["revision"]["model_sha256"] == bundle.sha256 != load_bundle(DEMO).sha256
    assert bundle.manifest.model.version.endswith("sens98")
    for finding in bundle.manifest.findings:
        (point,) = [
            p
            for p in report["findings"][finding.code]["operating_points"]
            if p["target_sensitivity"] == 0.98
        ]
        assert finding.review_threshold == point["threshold"]
        if finding.urgent_threshold is not None:
            assert finding.urgent_threshold >= finding.review_threshold
    # evaluated again, the new revision flags what the report claimed at its review threshold
    again = run_cli(
        [
            "evaluate", "--bundle", new, "--data", dataset.data, "--labels", dataset.labels,
            "--out", tmp_path / "r2", "--threads", "1", "--resamples", "200",
        ]
    )  # fmt: skip
    assert again.code == 0, again.err
    for code, f in json.loads((tmp_path / "r2" / "report.json").read_text())["findings"].items():
        assert f["sensitivity"] >= 0.98, code


def test_a_revision_over_the_source_bundle_is_refused_before_any_work(
    dataset: Dataset, tmp_path: Path
) -> None:
    copy = tmp_path / "demo"
    shutil.copytree(DEMO, copy)
    before = _digest(copy)
    run = run_cli(
        [
            "evaluate", "--bundle", copy, "--data", dataset.data, "--labels", dataset.labels,
            "--out", tmp_path / "r", "--write-bundle", copy,
        ]
    )  # fmt: skip
    assert run.code == 2 and "is the source bundle" in run.err
    assert _digest(copy) == before
    assert not (tmp_path / "r").exists()


def test_progress_bars_on_request(dataset: Dataset, tmp_path: Path) -> None:
    run = run_cli(
        [
            "evaluate", "--bundle", DEMO, "--data", dataset.data, "--labels", dataset.labels,
            "--out", tmp_path / "r", "--threads", "1", "--resamples", "100", "--progress",
        ]
    )  # fmt: skip
    assert run.code == 0, run.err
    assert "reading headers" in run.err and "embedding" in run.err and "100%" in run.err


@given(st.text(max_size=30))
@settings(max_examples=300, deadline=None)
def test_prevalence_parser_takes_code_equals_fraction_or_says_why(text: str) -> None:
    import argparse

    from export.evaluation.command import _prevalence

    try:
        code, p = _prevalence(text)
    except argparse.ArgumentTypeError as exc:
        assert str(exc)
        return
    assert code and code == code.strip() and 0 < p < 1
    assert text.split("=", 1)[0].strip() == code


def test_a_report_folder_that_is_not_empty_is_refused_before_any_work(
    dataset: Dataset, tmp_path: Path
) -> None:
    """A validation report a hospital signed is not replaced by a second run by accident."""
    out = tmp_path / "signed"
    out.mkdir()
    (out / "report.json").write_text("{}")
    run = run_cli(
        ["evaluate", "--bundle", DEMO, "--data", dataset.data, "--labels", dataset.labels,
         "--out", out]
    )  # fmt: skip
    assert run.code == 2 and "--out" in run.err and "--overwrite" in run.err, run.err
    assert (out / "report.json").read_text() == "{}"


_KINDS = {"radiographs": RADIOGRAPH_MODALITIES, "ct": ("CT",)}
_CODES = st.sampled_from(["q1", "q2", "q3", "q4", "q5"])


@functools.cache
def _demo() -> Bundle:
    return load_bundle(DEMO)


def _with_findings(name: str, kinds: dict[str, str]) -> Bundle:
    """The demo bundle's manifest with these finding codes, each on these images (not
    validated: only what check_comparable reads)."""
    demo = _demo()
    finding = demo.manifest.findings[0]
    findings = [
        finding.model_copy(update={"code": c, "modalities": _KINDS[k]}) for c, k in kinds.items()
    ]
    manifest = demo.manifest.model_copy(update={"findings": findings})
    return Bundle(root=Path(name), manifest=manifest, sha256=demo.sha256)


@given(
    st.dictionaries(_CODES, st.sampled_from(sorted(_KINDS)), min_size=1),
    st.dictionaries(_CODES, st.sampled_from(sorted(_KINDS)), min_size=1),
)
@settings(max_examples=300, deadline=None)
def test_a_reference_is_comparable_exactly_when_findings_and_their_images_match(
    ours: dict[str, str], theirs: dict[str, str]
) -> None:
    from export.evaluation.command import check_comparable

    differ = (set(ours) ^ set(theirs)) | {
        c for c in set(ours) & set(theirs) if ours[c] != theirs[c]
    }
    try:
        check_comparable(_with_findings("b", ours), _with_findings("b0", theirs))
    except ConfigError as exc:
        assert exc.key == "--reference"
        assert differ, "refused a reference that matches"
        named = set(re.findall(r"\bq\d\b", exc.message))
        assert named == differ, exc.message
        return
    assert not differ
