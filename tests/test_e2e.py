"""The whole road with real peers: simulator → folder → daemon process → Mosquitto → subscriber.

The daemon runs as its own process (``python -m edge_agent.cli run``) exactly as systemd
would start it, with the demo bundle shipped in the package.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.daemon import (
    MATRIX,
    Collector,
    Daemon,
    assert_no_phi,
    check_payload,
    resolve_file_id,
    running_agent,
)
from helpers.polling import wait_until

from edge_agent.devbroker import Mosquitto
from edge_agent.simulate import simulate

pytestmark = pytest.mark.slow


@pytest.fixture
def road(tmp_path: Path) -> Iterator[tuple[Path, Daemon, Collector, Mosquitto]]:
    with running_agent(tmp_path) as (_, daemon, collector, broker):
        yield tmp_path / "incoming", daemon, collector, broker


def test_studies_flow_end_to_end_once_each(road: tuple[Path, Daemon, Collector, Mosquitto]) -> None:
    watch, daemon, collector, _ = road
    truth = {
        s.study_instance_uid: s.truth
        for s in simulate(watch, studies=4, abnormal=0.5, seed=11, **MATRIX)
    }
    collector.wait(
        lambda: len({r["study_instance_uid"] for r in collector.results()}) == 4,
        90,
        "4 study results",
    )
    results = collector.results()
    assert {r["study_instance_uid"] for r in results} == set(truth)
    assert len({r["alert_id"] for r in results}) == 4
    for r in results:
        check_payload(r)
        assert r["revision"] == 1
    online = collector.on("status")
    assert online and online[0]["state"] == "online"
    assert_no_phi(collector, daemon.log)
    # each result's first PUBACK is in the state (time to notification is measured with it)
    state = daemon.config.parent / "state" / "state.sqlite3"

    def published() -> list[tuple[float, float | None]]:
        with contextlib.closing(sqlite3.connect(f"file:{state}?mode=ro", uri=True)) as db:
            return db.execute("SELECT created_at, published_at FROM results").fetchall()

    wait_until(lambda: all(p is not None for _, p in published()), 10, "PUBACK times stored")
    assert len(published()) == 4
    assert all(c <= p <= time.time() for c, p in published())  # type: ignore[operator]


def test_garbage_files_are_rejected_and_the_daemon_goes_on(
    road: tuple[Path, Daemon, Collector, Mosquitto],
) -> None:
    watch, daemon, collector, _ = road
    (watch / "notes.txt").write_text("not an image")
    (watch / "empty.dcm").write_bytes(b"")
    (watch / "noise.dcm").write_bytes(os.urandom(4096))
    sub = watch / "sub dir"
    sub.mkdir()
    (sub / "fake.dcm").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(300))
    collector.wait(lambda: len(collector.on("rejected")) == 4, 30, "4 rejected messages")
    # paths are not published (phi.publish_paths is false): each message's file_id is
    # resolved to its path on the box
    assert all("path" not in r for r in collector.on("rejected"))
    rejected = {
        resolve_file_id(daemon.config, r["file_id"]): r["reason"] for r in collector.on("rejected")
    }
    assert set(rejected) == {"notes.txt", "empty.dcm", "noise.dcm", "sub dir/fake.dcm"}
    assert all(rejected.values())
    (study,) = simulate(watch, studies=1, abnormal=0.0, seed=3, **MATRIX)
    collector.wait(lambda: len(collector.results()) >= 1, 60, "a result after the garbage")
    assert collector.results()[0]["study_instance_uid"] == study.study_instance_uid
    assert daemon.alive()


def test_restart_mid_way_loses_nothing(road: tuple[Path, Daemon, Collector, Mosquitto]) -> None:
    watch, daemon, collector, _ = road
    first = [s.study_instance_uid for s in simulate(watch, studies=2, seed=21, **MATRIX)]
    collector.wait(lambda: len(collector.results()) >= 2, 60, "first two results")
    second = [s.study_instance_uid for s in simulate(watch, studies=3, seed=22, **MATRIX)]
    time.sleep(0.8)  # read, but not yet quiet: the studies are open in the state database
    daemon.kill()  # power cut
    daemon.start()
    wanted = set(first + second)
    collector.wait(
        lambda: {r["study_instance_uid"] for r in collector.results()} >= wanted, 90, "all results"
    )
    by_alert: dict[str, bytes] = {}
    with collector.lock:
        for topic, payload, _ in collector.messages:
            if "/study/" in topic:
                alert = json.loads(payload)["alert_id"]
                assert by_alert.setdefault(alert, payload) == payload, "one alert, two contents"
    assert len({json.loads(p)["study_instance_uid"] for p in by_alert.values()}) == 5


def test_sigterm_stops_within_15_seconds_with_stopped_status(
    road: tuple[Path, Daemon, Collector, Mosquitto],
) -> None:
    watch, daemon, collector, _ = road
    collector.wait(lambda: bool(collector.on("status")), 30, "online status")
    list(simulate(watch, studies=1, seed=5, **MATRIX))
    time.sleep(1.0)
    start = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    assert time.monotonic() - start < 15
    collector.wait(lambda: collector.on("status")[-1]["state"] == "stopped", 5, "stopped status")
