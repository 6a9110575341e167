"""The Prometheus endpoint: scraped over real HTTP, figures read from the state database."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from helpers.status import make_state
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.devbroker import free_port
from edge_agent.metrics import start_metrics_server


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state database: one urgent result, an open study, one rejected file."""
    return make_state(tmp_path / "state")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_endpoint_serves_the_state_database(state: Path) -> None:
    port = free_port()
    info = {"model": "demo", "version": "1", "precision": "fp32", "provider": "CPU"}
    server = start_metrics_server(state / "state.sqlite3", port, "127.0.0.1", info)
    try:
        got = scrape(port)
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
        got = scrape(port)
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
                    got = scrape(port)
                    break
                except OSError:
                    assert time.monotonic() < deadline, (tmp_path / "agent.log").read_text()
                    time.sleep(0.2)
        finally:
            daemon.kill()
    assert got[("edge_triage_state_readable", ())] == 1.0
    info = [k for k in got if k[0] == "edge_triage_model_info"]
    assert info and ("demo", "true") in info[0][1]
