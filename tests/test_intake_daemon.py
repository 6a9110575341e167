"""Reading the watch folder through the real daemon (``python -m edge_agent.cli run``) and a
real Mosquitto: a file that cannot be read yet, an image read while its writer paused, the
watch folder removed and made again, an intake step that hangs."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from helpers.daemon import DEVICE, MATRIX, SITE, Collector, Daemon
from helpers.polling import wait_until

from edge_agent.devbroker import Mosquitto
from edge_agent.simulate import FINDINGS, chest_instance, simulate, write_instance

pytestmark = pytest.mark.slow


class Road:
    def __init__(self, root: Path, broker: Mosquitto, collector: Collector) -> None:
        self.root = root
        self.watch = root / "incoming"
        self.state = root / "state"
        self.broker = broker
        self.collector = collector
        self.log = root / "agent.log"
        self.daemon: Daemon | None = None

    def start(self, *, intake: str = "", extra: str = "", plain_root: bool = True) -> Daemon:
        config = self.root / "agent.toml"
        config.write_text(
            f'watch_dir = "{self.watch}"\nstate_dir = "{self.state}"\nprofile = "x86-cpu"\n'
            f'site = "{SITE}"\ndevice_id = "{DEVICE}"\nstudy_quiet_seconds = 1.5\n'
            f"[intake]\npoll_interval_seconds = 0.2\nfile_stable_seconds = 0.3\n{intake}\n"
            f'[mqtt]\nhost = "{self.broker.host}"\nport = {self.broker.port}\n'
            f"status_interval_seconds = 1\n{extra}\n"
        )
        self.daemon = WithoutDacOverride(config, self.log, plain_root)
        self.daemon.start()
        self.collector.wait(
            lambda: "running:" in self.log.read_text(errors="replace"), 60, "daemon running"
        )
        return self.daemon

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def results(self) -> list[dict]:
        return self.collector.results()


class WithoutDacOverride(Daemon):
    """The daemon as root but without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (dropped from
    the bounding set by util-linux's setpriv before exec), when ``plain_root`` is False: a
    permission bit then stops its reads for real, as it stops any non-root service user."""

    def __init__(self, config: Path, log: Path, plain_root: bool) -> None:
        super().__init__(config, log)
        self.plain_root = plain_root

    def start(self) -> None:
        if self.plain_root:
            super().start()
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    shutil.which("setpriv") or "setpriv",
                    "--bounding-set=-dac_override,-dac_read_search",
                    sys.executable,
                    *("-m", "edge_agent.cli", "run", "--config", str(self.config)),
                ],
                stdout=log,
                stderr=log,
                env=env,
            )


@pytest.fixture
def road(tmp_path: Path) -> Iterator[Road]:
    (tmp_path / "incoming").mkdir()
    broker = Mosquitto(tmp_path / "broker").start()
    collector = Collector(broker.host, broker.port)
    r = Road(tmp_path, broker, collector)
    yield r
    if r.daemon is not None:
        r.daemon.kill()
    collector.close()
    broker.stop()


def image(seed: int, *, pneumothorax: bool = True):  # type: ignore[no-untyped-def]
    findings = dict.fromkeys(FINDINGS, False)
    findings["pneumothorax"] = pneumothorax
    return chest_instance(np.random.default_rng(seed), findings=findings, **MATRIX)


def test_unreadable_file_is_retried_until_it_can_be_read(road: Road) -> None:
    road.start(intake="retry_max_seconds = 2", plain_root=False)
    made = write_instance(image(1), road.root / "staging")
    made.chmod(0o000)  # not readable by the daemon's user (EACCES), then moved in at once
    target = road.watch / made.name
    os.rename(made, target)
    road.collector.wait(
        lambda: any(s.get("read_retries") == 1 for s in road.collector.on("status")),
        30,
        "status read_retries 1",
    )
    time.sleep(5)  # several retries (1, 2, 2 s)
    assert road.collector.on("rejected") == [], "an unreadable file was rejected for good"
    assert road.log_text().count("trying again with back-off") == 1, (
        "warned once, not at every retry"
    )
    assert road.results() == []
    target.chmod(0o644)  # the permission is fixed: read at the next retry
    road.collector.wait(lambda: len(road.results()) == 1, 60, "the result")
    (result,) = road.results()
    assert result["triage"] != "not_scored" and result["instances"]["scored"] == 1
    road.collector.wait(
        lambda: road.collector.on("status")[-1].get("read_retries") == 0, 10, "no retries"
    )


def test_an_image_read_while_its_writer_paused_is_scored_when_complete(road: Road) -> None:
    road.start()
    full = write_instance(image(2), road.root / "staging").read_bytes()
    target = road.watch / "slow-writer.dcm"
    with target.open("wb") as f:  # the writer stops two thirds in, longer than stable time
        f.write(full[: len(full) * 2 // 3])
        f.flush()
        road.collector.wait(lambda: len(road.results()) == 1, 60, "the first result")
        (first,) = road.results()
        assert first["triage"] == "not_scored" and first["revision"] == 1
        f.write(full[len(full) * 2 // 3 :])  # … and finishes the file
    road.collector.wait(lambda: len(road.results()) == 2, 60, "revision 2")
    second = road.results()[1]
    assert second["revision"] == 2
    assert second["study_instance_uid"] == first["study_instance_uid"]
    assert second["triage"] != "not_scored" and second["instances"]["scored"] == 1
    assert {f["code"] for f in second["findings"]} == {"pneumothorax", "lung_nodule"}


def test_watch_folder_removed_and_made_again_is_watched_again_at_once(road: Road) -> None:
    road.start(intake='watch_mode = "inotify"\nrescan_seconds = 3600')
    list(simulate(road.watch, studies=1, seed=3, **MATRIX))
    road.collector.wait(lambda: len(road.results()) == 1, 60, "a result before")
    shutil.rmtree(road.watch)
    time.sleep(1.0)
    road.watch.mkdir()
    time.sleep(0.5)
    (study,) = simulate(road.watch, studies=1, seed=4, **MATRIX)
    start = time.monotonic()
    road.collector.wait(lambda: len(road.results()) == 2, 30, "a result after (not at rescan)")
    assert road.results()[1]["study_instance_uid"] == study.study_instance_uid
    assert time.monotonic() - start < 15
    log = road.log_text()
    assert "watch folder was removed" in log and "inotify set again" in log


def test_an_intake_step_that_hangs_makes_the_agent_not_healthy(road: Road) -> None:
    """A real hang: another process holds the state database's write lock, so the intake's
    next step waits on it (as a read from a hung mount would)."""
    road.start(intake="stall_seconds = 1", extra="renotify_seconds = 0")
    db = road.state / "state.sqlite3"
    with closing(sqlite3.connect(db, isolation_level=None)) as holder:
        holder.execute("BEGIN IMMEDIATE")
        write_instance(image(5, pneumothorax=False), road.watch)
        wait_until(lambda: "not healthy: intake stuck for" in road.log_text(), 20, "NOT HEALTHY")
        holder.execute("ROLLBACK")
    wait_until(lambda: "healthy again" in road.log_text(), 20, "healthy again")
    road.collector.wait(lambda: len(road.results()) == 1, 60, "the result after the stall")
    assert road.daemon is not None and road.daemon.alive()
