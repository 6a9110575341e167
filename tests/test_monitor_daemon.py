"""Watching the model with the real daemon: it scores simulated studies (real Mosquitto, the
demo bundle), is SIGKILLed while a second batch is being scored and started again; then
``edge-agent status --json`` and ``/metrics`` count each study exactly once, with the scores
and levels the dashboard received, and carry no UID or patient data."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.daemon import (
    MATRIX,
    PHI_MARKERS,
    Collector,
    Daemon,
    running_agent,
)
from helpers.metrics import samples, served
from helpers.polling import wait_until
from helpers.status import cli_status

from edge_agent.devbroker import free_port
from edge_agent.simulate import simulate

pytestmark = pytest.mark.slow


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[Path, Daemon, Collector, int]]:
    port = free_port()
    with running_agent(tmp_path, f"[metrics]\nport = {port}\n") as (config, daemon, collector, _):
        yield config, daemon, collector, port


def serving(port: int) -> bool:
    try:
        served(port)
    except OSError:  # not listening yet (URLError is an OSError)
        return False
    return True


def first_results(collector: Collector) -> dict[str, dict[str, Any]]:
    """Each study's first result as the dashboard received it."""
    first: dict[str, dict[str, Any]] = {}
    for r in collector.results():
        uid = r["study_instance_uid"]
        if uid not in first or r["revision"] < first[uid]["revision"]:
            first[uid] = r
    return first


def test_status_and_metrics_count_each_scored_study_once_across_a_sigkill(
    agent: tuple[Path, Daemon, Collector, int], tmp_path: Path
) -> None:
    config, daemon, collector, port = agent
    watch = tmp_path / "incoming"
    first = {s.study_instance_uid for s in simulate(watch, studies=3, seed=31, **MATRIX)}
    collector.wait(lambda: set(first_results(collector)) >= first, 90, "the first 3 results")
    second = {
        s.study_instance_uid for s in simulate(watch, studies=4, abnormal=0.6, seed=32, **MATRIX)
    }
    collector.wait(lambda: bool(set(first_results(collector)) & second), 90, "a second result")
    daemon.kill()  # while the rest of the second batch is being scored or published
    daemon.start()
    wait_until(lambda: serving(port), 60, "the restarted agent's /metrics", poll=0.2)
    wanted = first | second
    collector.wait(lambda: set(first_results(collector)) >= wanted, 120, "all 7 results")

    results = first_results(collector)
    levels = {level: 0 for level in ("urgent", "review", "routine", "not_scored")}
    for r in results.values():
        levels[r["triage"]] += 1
    scored = [r for r in results.values() if r["findings"]]
    flagged = sum(f["flagged"] for r in scored for f in r["findings"] if f["code"] == "lung_nodule")

    # The database: each study's first result counted once, the kill notwithstanding.
    with sqlite3.connect(f"file:{tmp_path / 'state' / 'state.sqlite3'}?mode=ro", uri=True) as db:
        (n,) = db.execute("SELECT SUM(studies) FROM tally_levels").fetchone()
        (stored,) = db.execute("SELECT COUNT(DISTINCT study_instance_uid) FROM results").fetchone()
        tables = [
            json.dumps(db.execute(f"SELECT * FROM {t}").fetchall())
            for t in ("tally_levels", "tally_findings", "tally_bins")
        ]
    assert n == stored == len(wanted) == 7

    scores = cli_status(config)["scores"]
    week = {level: sum(d[level] for d in scores["levels_by_day"]) for level in levels}
    assert week == levels
    nodule = scores["findings"]["lung_nodule"]["last_7_days"]
    assert nodule["studies"] == len(scored)
    assert nodule["over_review_share"] == round(flagged / len(scored), 4)
    mean = sum(f["score"] for r in scored for f in r["findings"] if f["code"] == "lung_nodule")
    assert nodule["mean_score"] == pytest.approx(mean / len(scored), abs=1e-4)

    text = served(port)
    got = samples(text)
    by_level = {
        dict(k[1])["triage"]: v for k, v in got.items() if k[0] == "edge_triage_studies_last_7_days"
    }
    assert by_level == {level: float(v) for level, v in levels.items()}
    nodule_labels = (("finding", "lung_nodule"),)
    assert got[("edge_triage_score_gcount", nodule_labels)] == len(scored)
    assert got[("edge_triage_score_bucket", (*nodule_labels, ("le", "+Inf")))] == len(scored)
    assert got[("edge_triage_over_review_share", (*nodule_labels, ("window", "7d")))] == (
        pytest.approx(flagged / len(scored))
    )

    # The retained P/status carries the same tallies (refreshed every 2 s here).
    def status_scores() -> dict[str, Any] | None:
        statuses = collector.on("status")
        return statuses[-1].get("scores") if statuses else None

    def status_week() -> dict[str, int] | None:
        s = status_scores()
        if s is None:
            return None
        return {level: sum(d[level] for d in s["levels_by_day"]) for level in levels}

    wait_until(lambda: status_week() == levels, 30, "P/status counting all 7 studies", poll=0.2)
    on_mqtt = status_scores()
    assert on_mqtt is not None
    assert on_mqtt["findings"] == scores["findings"]
    assert on_mqtt["model_sha256"] == scores["model_sha256"]

    # No UID, no patient data in the tallies, the status's scores or the metrics.
    published = json.dumps(scores) + json.dumps(on_mqtt) + text + "".join(tables)
    for uid in wanted:
        assert uid not in published
    for marker in PHI_MARKERS:
        assert marker not in published
