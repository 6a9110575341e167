"""The agent as its own process (``python -m edge_agent.cli run``), as systemd starts it, and
a dashboard that collects what it publishes."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from helpers.brokers import Mosquitto
from helpers.polling import wait_until

SITE, DEVICE = "e2e-site", "box-1"


BASE = f"edge-triage/v1/{SITE}/{DEVICE}"


MATRIX = {"rows": 640, "cols": 520}


PHI_MARKERS = ("SIMULATED^", "PatientName", "BirthDate")


def write_agent_config(
    tmp_path: Path, broker: Mosquitto, *, site: str, device_id: str, extra: str = ""
) -> Path:
    """``tmp_path/agent.toml`` for a real daemon in a test: ``tmp_path/incoming`` (made
    here) watched by polling every 0.2 s, files stable after 0.3 s, a study complete 1.5 s
    after its last instance, the status refreshed every 2 s; ``extra`` (TOML) appended."""
    watch = tmp_path / "incoming"
    watch.mkdir(exist_ok=True)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'watch_dir = "{watch}"\nstate_dir = "{tmp_path / "state"}"\nprofile = "x86-cpu"\n'
        f'site = "{site}"\ndevice_id = "{device_id}"\nstudy_quiet_seconds = 1.5\n'
        f"[intake]\npoll_interval_seconds = 0.2\nfile_stable_seconds = 0.3\n"
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nstatus_interval_seconds = 2\n'
        f"{extra}"
    )
    return config


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


@contextlib.contextmanager
def running_agent(
    tmp_path: Path, extra: str = ""
) -> Iterator[tuple[Path, Daemon, Collector, Mosquitto]]:
    """A broker, the agent started as its own process (:func:`write_agent_config`, SITE and
    DEVICE, ``extra`` TOML) and a dashboard subscribed: (config, daemon, dashboard, broker),
    all stopped afterwards."""
    broker = Mosquitto(tmp_path / "broker").start()
    try:
        config = write_agent_config(tmp_path, broker, site=SITE, device_id=DEVICE, extra=extra)
        daemon = Daemon(config, tmp_path / "agent.log")
        collector = Collector(broker.host, broker.port)
        try:
            daemon.start()
            yield config, daemon, collector, broker
        finally:
            daemon.kill()
            collector.close()
    finally:
        broker.stop()


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
