"""The Prometheus endpoint: scraped over real HTTP, figures read from the state database."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.metrics import samples, served
from helpers.status import make_state

from edge_agent.devbroker import free_port
from edge_agent.metrics import start_metrics_server


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state database: one urgent result, an open study, one rejected file."""
    return make_state(tmp_path / "state")


def test_metrics_endpoint_serves_the_state_database(state: Path) -> None:
    port = free_port()
    info = {"model": "demo", "version": "1", "precision": "fp32", "provider": "CPU"}
    server = start_metrics_server(state / "state.sqlite3", port, "127.0.0.1", info)
    try:
        got = samples(served(port))
    finally:
        server.shutdown()
        server.server_close()
    assert got[("edge_triage_state_readable", ())] == 1.0
    assert got[("edge_triage_studies", (("state", "scored"),))] == 1.0
    assert got[("edge_triage_studies", (("state", "complete"),))] == 1.0
    assert got[("edge_triage_results_total", (("triage", "urgent"),))] == 1.0
    assert got[("edge_triage_results_total", (("triage", "routine"),))] == 0.0
    assert got[("edge_triage_outbox_messages", ())] == 1.0
    assert got[("edge_triage_outbox_urgent_messages", ())] == 1.0
    assert got[("edge_triage_rejected_files_total", ())] == 1.0
    assert got[("edge_triage_model_info", tuple(sorted(info.items())))] == 1.0
    assert ("process_resident_memory_bytes", ()) in got
    assert not any("1.2.3" in str(key) for key in got)  # no UIDs in labels


def test_an_unreadable_database_is_a_metric_not_an_error(tmp_path: Path) -> None:
    port = free_port()
    server = start_metrics_server(tmp_path / "missing.sqlite3", port, "127.0.0.1")
    try:
        got = samples(served(port))
    finally:
        server.shutdown()
        server.server_close()
    assert got[("edge_triage_state_readable", ())] == 0.0


def test_the_daemon_serves_metrics_when_a_port_is_configured(tmp_path: Path) -> None:
    import time

    from helpers.daemon import Daemon

    from edge_agent.devbroker import Mosquitto

    port = free_port()
    with Mosquitto(tmp_path / "broker") as broker:
        (tmp_path / "in").mkdir()
        config = tmp_path / "agent.toml"
        config.write_text(
            f'watch_dir = "{tmp_path / "in"}"\nstate_dir = "{tmp_path / "state"}"\n'
            f'profile = "x86-cpu"\n[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
            f"[metrics]\nport = {port}\n"
        )
        daemon = Daemon(config, tmp_path / "agent.log")
        daemon.start()
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    got = samples(served(port))
                    break
                except OSError:
                    assert time.monotonic() < deadline, (tmp_path / "agent.log").read_text()
                    time.sleep(0.2)
        finally:
            daemon.kill()
    assert got[("edge_triage_state_readable", ())] == 1.0
    info = [k for k in got if k[0] == "edge_triage_model_info"]
    assert info and ("demo", "true") in info[0][1]


def test_metrics_show_the_daily_tallies_as_status_does(tmp_path: Path) -> None:
    """The last 7 UTC days' score buckets per finding, studies by level today and in the 7
    days, shares over the thresholds: the figures ``edge-agent status`` shows."""
    import time

    from helpers.delivery import Injector

    from edge_agent.state.tallies import utc_day
    from edge_agent.status import read_status
    from edge_agent.store import Store

    now = time.time()
    if utc_day(now) != utc_day(now + 60):  # the test must not straddle midnight UTC
        time.sleep(61)
        now = time.time()
    database = tmp_path / "state" / "state.sqlite3"
    store = Store(database)
    inject = Injector(store)
    try:
        inject.result("1.2.3.1", "urgent", now=now)  # pneumothorax 0.93
        inject.result("1.2.3.2", "routine", now=now)  # 0.05: on the 0.05 edge, le="0.05"
        inject.result("1.2.3.3", "review", now=now - 86400)  # 0.45
        inject.result("1.2.3.4", "not_scored", now=now - 86400)
        inject.result("1.2.3.5", "review", now=now - 8 * 86400)  # outside the window
    finally:
        store.close()
    port = free_port()
    server = start_metrics_server(database, port, "127.0.0.1")
    try:
        got = samples(served(port))
    finally:
        server.shutdown()
        server.server_close()
    f = ("finding", "pneumothorax")

    def bucket(le: str) -> float:
        return got[("edge_triage_score_bucket", (f, ("le", le)))]

    assert bucket("0.05") == 1.0 and bucket("0.4") == 1.0 and bucket("0.45") == 2.0
    assert bucket("0.9") == 2.0 and bucket("0.95") == 3.0 and bucket("+Inf") == 3.0
    assert got[("edge_triage_score_gcount", (f,))] == 3.0
    assert got[("edge_triage_score_gsum", (f,))] == pytest.approx(0.93 + 0.05 + 0.45)
    today = {k[1][0][1]: v for k, v in got.items() if k[0] == "edge_triage_studies_today"}
    assert today == {"urgent": 1.0, "review": 0.0, "routine": 1.0, "not_scored": 0.0}
    week = {k[1][0][1]: v for k, v in got.items() if k[0] == "edge_triage_studies_last_7_days"}
    assert week == {"urgent": 1.0, "review": 1.0, "routine": 1.0, "not_scored": 1.0}
    status = read_status(database, now=now).scores
    assert status is not None
    for window, key in (("today", "today"), ("7d", "last_7_days")):
        figures = status["findings"]["pneumothorax"][key]
        labels = (f, ("window", window))
        assert got[("edge_triage_over_review_share", labels)] == pytest.approx(
            figures["over_review_share"], abs=1e-4
        )
        assert got[("edge_triage_over_urgent_share", labels)] == pytest.approx(
            figures["over_urgent_share"], abs=1e-4
        )
    assert got[("edge_triage_over_review_share", (f, ("window", "today")))] == 0.5
    assert not any("1.2.3" in str(key) for key in got)  # no UIDs in labels


def test_the_tally_metrics_and_status_fields_are_documented(tmp_path: Path) -> None:
    """Each metric family the tallies give, and each field of status's ``scores``, is named
    in the README's "Watching the model after go-live"."""
    import time

    from helpers.delivery import Injector

    from edge_agent.metrics import _tally_metrics
    from edge_agent.state import tallies
    from edge_agent.status import scores_section
    from edge_agent.store import Store

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### Watching the model after go-live")[1].split("\n## ")[0]
    store = Store(tmp_path / "state.sqlite3")
    try:
        Injector(store).result("1.2.3.1", "urgent")
        recent = tallies.recent(store._conn(), time.time())
    finally:
        store.close()
    names = {s.name for family in _tally_metrics(recent) for s in family.samples}
    assert names and all(f"`{name}{{" in section for name in names), names
    scores = scores_section(recent)
    fields = {f"scores.{key}" for key in scores if key not in ("findings", "levels_by_day")}
    fields |= set(scores["findings"]["pneumothorax"]["today"]) | set(scores["levels_by_day"][0])
    assert all(f"`{field}`" in section for field in fields), fields
