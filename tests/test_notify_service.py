"""systemd's notify protocol as the daemon speaks it, received on a real datagram socket that
stands in for systemd: READY=1 with a readable STATUS= once the agent runs, WATCHDOG=1 at
half of $WATCHDOG_USEC while every thread is alive, none once a worker thread has died (so
systemd restarts it), STOPPING=1 on SIGTERM."""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.daemon import Daemon
from helpers.systemd import FakeSystemd, supervise

from edge_agent.devbroker import Mosquitto


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify.socket")
    yield fake
    fake.close()


def config_for(tmp_path: Path, broker: Mosquitto) -> Path:
    watch = tmp_path / "incoming"
    watch.mkdir(exist_ok=True)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'watch_dir = "{watch}"\nstate_dir = "{tmp_path / "state"}"\nprofile = "x86-cpu"\n'
        'site = "s"\ndevice_id = "d"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
    )
    return config


def test_daemon_says_ready_pings_the_watchdog_and_says_stopping(
    tmp_path: Path, systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        supervise(monkeypatch, systemd)
        daemon = Daemon(config_for(tmp_path, broker), tmp_path / "agent.log")
        daemon.start()
        try:
            ready_at, _ = systemd.wait_for("READY", timeout=60)
            status = dict(systemd.fields("STATUS"))[ready_at]
            assert "watching" in status and "model" in status
            time.sleep(3.5)
            pings = [at for at, _ in systemd.fields("WATCHDOG") if at >= ready_at]
            assert len(pings) >= 2, systemd.messages
            assert all(b - a < 1.9 for a, b in itertools.pairwise(pings))
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(15) == 0
            systemd.wait_for("STOPPING", timeout=2)
        finally:
            daemon.kill()


def test_no_watchdog_once_a_worker_thread_has_died(
    tmp_path: Path, systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge_agent.config import load_settings
    from edge_agent.service import Agent

    with Mosquitto(tmp_path / "broker") as broker:
        supervise(monkeypatch, systemd)
        agent = Agent(load_settings(config_for(tmp_path, broker)))
        # The scoring worker dies at once (as an uncaught error would end it).
        monkeypatch.setattr(agent.scoring, "run", lambda: None)
        runner = threading.Thread(target=agent.run, daemon=True)
        runner.start()
        try:
            ready_at, _ = systemd.wait_for("READY", timeout=60)
            time.sleep(3.5)
            assert [at for at, _ in systemd.fields("WATCHDOG") if at >= ready_at] == []
            statuses = [s for _, s in systemd.fields("STATUS")]
            assert any("NOT HEALTHY" in s and "scoring" in s for s in statuses), statuses
        finally:
            agent.stop()
            runner.join(20)
        assert not runner.is_alive()
