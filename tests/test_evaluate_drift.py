"""``edge-export evaluate --drift``: a stream of results in a real state database (the
agent's Store commits them and keeps its daily tallies, which --drift reads; scores from
the daemon's scorer on simulated studies) against a baseline report; a planted shift is
reported, an unchanged stream is not; an older agent's database (no tallies) gives the same
answer, counted from its results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("onnxruntime")
pytest.importorskip("matplotlib")

from helpers.export_cli import run_cli, write_labels
from helpers.old_state import as_schema

from edge_agent.bundle import load_bundle
from edge_agent.service import demo_bundle_path
from edge_agent.simulate import FINDINGS, simulate
from edge_agent.store import InstanceRecord, Message, Store
from export.evaluation.command import EvaluateSettings, read_input, score_scan

pytestmark = pytest.mark.export

DEMO = demo_bundle_path()
DAY = 86400.0


def simulated(folder: Path, studies: int, abnormal: float, seed: int) -> tuple[Path, Path]:
    sims = simulate(
        folder / "dicom", studies=studies, abnormal=abnormal, seed=seed, rows=256, cols=256
    )
    rows = [[s.study_instance_uid, *("1" if s.truth[c] else "0" for c in FINDINGS)] for s in sims]
    return folder / "dicom", write_labels(
        folder / "labels.csv", ["study_instance_uid", *FINDINGS], rows
    )


def state_with_results(folder: Path, data: Path, labels: Path) -> Path:
    """A state database whose results are the demo bundle's on the studies of ``data``,
    as the daemon would have published them, spread over three days."""
    bundle = load_bundle(DEMO)
    settings = EvaluateSettings(threads=1)
    read_labels, scan, _ = read_input(bundle, labels, data, settings)
    scored = score_scan(bundle, read_labels, scan, settings)
    thresholds = {f.code: f.review_threshold for f in bundle.manifest.findings}
    folder.mkdir()
    store = Store(folder / "state.sqlite3")
    try:
        for i, (uid, level) in enumerate(zip(scored.study_uids, scored.levels, strict=True)):
            t = 20_000 * DAY + i * 3 * DAY / len(scored.study_uids)  # three UTC days
            sop = f"{uid}.1"
            store.add_instance(
                f"{i}.dcm", 10, 1, InstanceRecord(sop, uid, f"{uid}.9", "CR", "frontal"), now=t
            )
            store.complete_quiet_studies(5.0, now=t + 10)
            study = store.study(uid)
            assert study is not None
            findings = [
                {
                    "code": code,
                    "score": float(scored.scores[i, j]),
                    "review_threshold": thresholds[code],
                    "flagged": bool(scored.scores[i, j] >= thresholds[code]),
                }
                for j, code in enumerate(scored.codes)
            ]
            payload = json.dumps(
                {"triage": level, "model": {"sha256": bundle.sha256}, "findings": findings}
            ).encode()
            message = Message("result", f"p/study/{uid}", payload, f"alert-{i}")
            assert store.commit_result(study, level, message, {sop: ("scored", None)}, [], t + 11)
    finally:
        store.close()
    return folder / "state.sqlite3"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("drift-baseline")
    data, labels = simulated(root, 150, 0.3, seed=21)
    out = root / "report"
    code, _, err = run_cli(
        ["evaluate", "--bundle", DEMO, "--data", data, "--labels", labels, "--out", out,
         "--threads", "1", "--resamples", "200"]
    )  # fmt: skip
    assert code == 0, err
    return out


@pytest.mark.slow
def test_an_unchanged_stream_is_not_drift(baseline: Path, tmp_path: Path) -> None:
    data, labels = simulated(tmp_path, 150, 0.3, seed=22)
    state = state_with_results(tmp_path / "state", data, labels)
    code, out, err = run_cli(["evaluate", "--drift", state, "--baseline", baseline])
    assert code == 0, out + err
    assert out.strip().splitlines()[-1].startswith("stable: 150 studies")


@pytest.mark.slow
def test_a_planted_shift_is_reported_as_drift(baseline: Path, tmp_path: Path) -> None:
    data, labels = simulated(tmp_path, 150, 0.9, seed=23)  # three times the abnormal share
    state = state_with_results(tmp_path / "state", data, labels)
    code, out, err = run_cli(["evaluate", "--drift", state, "--baseline", baseline, "--json"])
    assert code == 1, out + err
    result = json.loads(out)
    assert result["moved"] and result["verdict"].startswith("MOVED: ")
    assert any(f["psi"] >= 0.25 for f in result["findings"].values())
    days = result["findings"]["pneumothorax"]["daily_flag_rate"]
    assert len(days) == 3 and sum(d["studies"] for d in days.values()) == 150


def test_results_of_another_model_are_left_out(baseline: Path, tmp_path: Path) -> None:
    report = json.loads((baseline / "report.json").read_text())
    report["model"]["sha256"] = "0" * 64
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.json").write_text(json.dumps(report))
    data, labels = simulated(tmp_path, 10, 0.3, seed=24)
    state = state_with_results(tmp_path / "state", data, labels)
    code, out, _ = run_cli(["evaluate", "--drift", state, "--baseline", other])
    assert code == 0
    assert "left out: 10 × scored by another model" in out
    assert "nothing to compare" in out


def test_an_older_agents_database_gives_the_same_answer_unchanged(
    baseline: Path, tmp_path: Path
) -> None:
    """Schema 5 had no tallies: they are counted from its results, in memory."""
    data, labels = simulated(tmp_path, 12, 0.3, seed=25)
    state = state_with_results(tmp_path / "state", data, labels)
    code, kept, err = run_cli(["evaluate", "--drift", state, "--baseline", baseline, "--json"])
    assert code == 0, err
    assert json.loads(kept)["studies"] == 12
    as_schema(state, 5)
    before = state.read_bytes()
    code, old, err = run_cli(["evaluate", "--drift", state, "--baseline", baseline, "--json"])
    assert code == 0, err
    assert json.loads(old) == json.loads(kept)
    assert state.read_bytes() == before


def test_days_limits_the_comparison_to_the_last_utc_days(baseline: Path, tmp_path: Path) -> None:
    """The 12 studies are spread over three UTC days; --days 1 on the third compares its
    own; --days counts back from today (here years after them: nothing to compare)."""
    from export.evaluation.drift import drift

    data, labels = simulated(tmp_path, 12, 0.3, seed=26)
    state = state_with_results(tmp_path / "state", data, labels)
    whole = drift(state, baseline)
    last = drift(state, baseline, days=1, now=20_002.5 * DAY)
    assert whole["since"] is None and last["since"] == "2024-10-06"
    third = whole["findings"]["pneumothorax"]["daily_flag_rate"]["2024-10-06"]["studies"]
    assert 0 < last["studies"] == third < whole["studies"] == 12
    assert list(last["findings"]["pneumothorax"]["daily_flag_rate"]) == ["2024-10-06"]
    code, out, err = run_cli(["evaluate", "--drift", state, "--baseline", baseline, "--days", "7"])
    assert code == 0, err
    assert out.strip().endswith("since " + last_week() + ": nothing to compare")
    code, _, err = run_cli(["evaluate", "--bundle", DEMO, "--days", "7"])
    assert code == 2 and "--days" in err and "--drift" in err


def last_week() -> str:
    import time

    from edge_agent.state.tallies import window

    return window(time.time(), 7)[0]


def test_a_baseline_whose_bins_the_agents_do_not_add_up_to_is_refused(
    baseline: Path, tmp_path: Path
) -> None:
    report = json.loads((baseline / "report.json").read_text())
    report["findings"]["pneumothorax"]["score_histogram"] = [1] * 30
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "report.json").write_text(json.dumps(report))
    code, _, err = run_cli(["evaluate", "--drift", tmp_path / "s", "--baseline", tmp_path / "odd"])
    assert code == 2 and "pneumothorax has 30 bins" in err


def test_drift_needs_a_baseline_report(tmp_path: Path) -> None:
    code, _, err = run_cli(["evaluate", "--drift", tmp_path / "s", "--baseline", tmp_path])
    assert code == 2 and "holds no report.json" in err
    code, _, err = run_cli(["evaluate", "--drift", tmp_path / "s"])
    assert code == 2 and "--baseline" in err


def test_evaluate_without_drift_needs_its_four_arguments(tmp_path: Path) -> None:
    code, _, err = run_cli(["evaluate", "--bundle", DEMO])
    assert code == 2 and "--data" in err and "--labels" in err and "--out" in err


def test_drift_refuses_the_evaluation_arguments(tmp_path: Path) -> None:
    code, _, err = run_cli(
        ["evaluate", "--drift", tmp_path / "s", "--baseline", tmp_path, "--bundle", DEMO]
    )
    assert code == 2 and "drop --bundle" in err
