"""The whole road with real peers: simulator → folder → daemon process → Mosquitto → subscriber.

The daemon runs as its own process (``python -m edge_agent.cli run``) exactly as systemd
would start it, with the demo bundle shipped in the package.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from polling import wait_until

from edge_agent.devbroker import Mosquitto
from edge_agent.simulate import simulate

pytestmark = pytest.mark.slow

SITE, DEVICE = "e2e-site", "box-1"
BASE = f"edge-triage/v1/{SITE}/{DEVICE}"
MATRIX = {"rows": 640, "cols": 520}
PHI_MARKERS = ("SIMULATED^", "PatientName", "BirthDate")


@dataclass
class Collector:
    """A dashboard: persistent MQTT session on P/#, collecting every message."""

    host: str
    port: int
    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"e2e-dashboard-{time.time_ns()}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{BASE}/#", qos=1)
        self.client.on_message = self._on_message
        self.client.connect(self.host, self.port)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def results(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(p) for t, p, _ in self.messages if t.startswith(f"{BASE}/study/")]

    def on(self, leaf: str) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(p) for t, p, _ in self.messages if t == f"{BASE}/{leaf}"]

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        wait_until(predicate, timeout, what, poll=0.1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Daemon:
    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(self.config)],
                stdout=log,
                stderr=log,
                env=env,
            )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()


def resolve_file_id(config: Path, file_id: str) -> str:
    """The path ``edge-agent status --file`` gives for a P/rejected message's file_id."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    command = ["status", "--config", str(config), "--file", file_id, "--json"]
    run = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", *command],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return str(json.loads(run.stdout)["path"])


@pytest.fixture
def road(tmp_path: Path) -> Iterator[tuple[Path, Daemon, Collector, Mosquitto]]:
    watch = tmp_path / "incoming"
    watch.mkdir()
    broker = Mosquitto(tmp_path / "broker").start()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'watch_dir = "{watch}"\nstate_dir = "{tmp_path / "state"}"\nprofile = "x86-cpu"\n'
        f'site = "{SITE}"\ndevice_id = "{DEVICE}"\nstudy_quiet_seconds = 1.5\n'
        f"[intake]\npoll_interval_seconds = 0.2\nfile_stable_seconds = 0.3\n"
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nstatus_interval_seconds = 2\n'
    )
    daemon = Daemon(config, tmp_path / "agent.log")
    collector = Collector(broker.host, broker.port)
    daemon.start()
    yield watch, daemon, collector, broker
    daemon.kill()
    collector.close()
    broker.stop()


def check_payload(result: dict[str, Any]) -> None:
    assert result["schema"] == "edge-triage.study-result.v1"
    assert result["model"]["demo"] is True
    assert result["accession_number"] is None
    assert result["triage"] in ("urgent", "review", "routine", "not_scored")
    assert {f["code"] for f in result["findings"]} == {"pneumothorax", "lung_nodule"}
    for key in ("first_instance_at", "complete_at", "scored_at", "published_at"):
        assert result["timing"][key].endswith("Z")
    assert result["instances"]["scored"] >= 1


def assert_no_phi(collector: Collector, log: Path) -> None:
    with collector.lock:
        blobs = [t.encode() + p for t, p, _ in collector.messages]
    text = log.read_text(errors="replace")
    for marker in PHI_MARKERS:
        assert all(marker.encode() not in b for b in blobs), f"{marker} in a message"
        assert marker not in text, f"{marker} in the log"


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
