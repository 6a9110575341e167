"""``edge-agent demo``: the whole road on this machine, with nothing configured.

A private Mosquitto on a free loopback port (or ``--broker``), the demo bundle shipped in the
package, a temporary watch folder fed by the simulator, the real daemon in this process and a
real MQTT subscriber printing each result as it arrives. With the ``[board]`` extra the triage
board runs too, on a free loopback port with a one-time account printed beside its URL, so
the flags also arrive in a browser. Everything is marked as coming from a demo model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import secrets
import shutil
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .config import Settings, load_settings
from .devbroker import Mosquitto, free_port
from .errors import BundleError, ConfigError, ExtraMissing
from .service import Agent, demo_bundle_path

logger = logging.getLogger(__name__)

BANNER = "DEMO MODEL — trained on simulated images, not for clinical use"
QUIET_SECONDS = 3.0
TIMEOUT_SECONDS = 180.0


def _broker_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError("--broker", f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _ensure_demo_bundle() -> None:
    if (demo_bundle_path() / "manifest.json").is_file():
        return
    print("demo bundle missing from the package: building it (needs the [export] extra)...")
    try:
        from export.demo import build_demo_bundle
    except ImportError as exc:
        raise BundleError(
            "the demo bundle is missing and cannot be built here: "
            "pip install 'edge-triage[export]' and run edge-export demo"
        ) from exc
    build_demo_bundle(demo_bundle_path())


class _Results:
    """A real MQTT subscriber on P/study/+ (what a dashboard would run)."""

    def __init__(self, host: str, port: int, topic: str) -> None:
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"edge-demo-viewer-{time.time_ns()}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self.messages.put(json.loads(msg.payload))
        except ValueError:
            logger.warning("non-JSON message on %s", msg.topic)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _start_board(settings: Settings, root: Path, stack: ExitStack) -> None:
    """The triage board on a free loopback port with a one-time demo account; skipped (with
    a note) when the [board] extra is not installed."""
    from .cli import _board_extra

    try:
        _board_extra()
    except ExtraMissing as exc:
        print(f"triage board not started: {exc}\n")
        return
    from .board.auth import add_user
    from .board.server import BoardServer

    board_settings = settings.model_copy(
        update={
            "board": settings.board.model_copy(
                update={
                    "listen": f"127.0.0.1:{free_port()}",
                    "users_file": root / "board" / "users",
                    "state_file": root / "board" / "board.sqlite3",
                    "client_id": f"edge-demo-board-{os.getpid()}",
                    "mqtt_session_expiry_hours": 0.1,
                    "max_wait_minutes": 2.0,
                }
            )
        }
    )
    password = secrets.token_urlsafe(12)
    add_user(board_settings.board.users_file, "demo", password)
    server = BoardServer(board_settings)
    server.start_in_thread()
    stack.callback(server.stop)
    print(
        f"triage board: {server.url}  (user demo, password {password}; this run only)\n",
        flush=True,
    )


def _truth_text(truth: dict[str, bool]) -> str:
    present = [code for code, value in truth.items() if value]
    return "+".join(present) if present else "normal"


def run_demo(
    *,
    studies: int = 6,
    broker: str | None = None,
    seed: int = 1,
    keep: Path | None = None,
    hold: bool | None = None,
) -> int:
    """``hold``: keep the board up after the table until Enter or Ctrl-C (default: when
    standard input is a terminal)."""
    from .simulate import simulate

    print(f"edge-agent demo — {BANNER}\n")
    _ensure_demo_bundle()
    with ExitStack() as stack:
        if keep:
            root = keep
            root.mkdir(parents=True, exist_ok=True)
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edge-demo-")))
        if broker:
            host, port = _broker_address(broker)
        else:
            mosq = stack.enter_context(Mosquitto(root / "mosquitto"))
            host, port = mosq.host, mosq.port
            print(f"private mosquitto on {host}:{port}")
        watch, state = root / "incoming", root / "state"
        for d in (watch, state):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        settings = load_settings(
            None,
            watch_dir=watch,
            state_dir=state,
            bundle=None,
            profile="x86-cpu",
            site="demo",
            device_id="demo-box",
            study_quiet_seconds=QUIET_SECONDS,
            intake={"poll_interval_seconds": 0.25, "file_stable_seconds": 0.5},
            mqtt={"host": host, "port": port, "status_interval_seconds": 5.0},
        )
        viewer = _Results(host, port, f"{settings.topic_base}/study/+")
        stack.callback(viewer.close)
        agent = Agent(settings)
        runner = threading.Thread(target=agent.run, name="agent", daemon=True)
        runner.start()
        stack.callback(runner.join, 20.0)
        stack.callback(agent.stop)
        agent.started.wait(30)
        _start_board(settings, root, stack)
        model = agent.bundle.manifest
        print(
            f"model {model.model.name} {model.model.version} ({model.precision}) on "
            f"{agent.runner.provider}; watching {watch}\n"
            f"simulating {studies} chest studies; each is complete {QUIET_SECONDS:.0f} s after "
            "its last image\n"
        )
        written: dict[str, tuple[float, dict[str, bool]]] = {}
        lock = threading.Lock()

        def feed() -> None:
            for s in simulate(
                watch, studies=studies, modality="CR", abnormal=0.5, seed=seed, interval_seconds=1.0
            ):
                with lock:
                    written[s.study_instance_uid] = (time.time(), s.truth)

        feeder = threading.Thread(target=feed, name="simulator", daemon=True)
        feeder.start()
        header = (
            f"{'study':<14} {'truth':<26} {'triage':<11} {'top finding':<14} "
            f"{'score':>6} {'latency':>8}"
        )
        print(header)
        print("-" * len(header))
        got: set[str] = set()
        agree = 0
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while len(got) < studies and time.monotonic() < deadline:
            try:
                result = viewer.messages.get(timeout=1.0)
            except queue.Empty:
                continue
            uid = result["study_instance_uid"]
            if uid in got:
                continue  # at-least-once: a duplicate delivery
            got.add(uid)
            with lock:
                written_at, truth = written.get(uid, (time.time(), {}))
            top = max(result["findings"], key=lambda f: f["score"], default=None)
            flagged = result["triage"] in ("urgent", "review")
            agree += flagged == any(truth.values())
            print(
                f"…{uid[-12:]:<13} {_truth_text(truth):<26} {result['triage']:<11} "
                f"{(top['code'] if top else '-'):<14} {(top['score'] if top else 0):>6.3f} "
                f"{time.time() - written_at:>7.1f}s"
                + ("  [demo]" if result["model"]["demo"] else "")
            )
        print(
            f"\n{len(got)}/{studies} studies triaged; flagged-or-not agrees with the simulator's "
            f"truth for {agree}/{len(got)}. Latency is from the last image written to the result "
            f"received and includes the {QUIET_SECONDS:.0f} s quiet period.\n{BANNER}."
        )
        if hold if hold is not None else sys.stdin.isatty():
            print("The board stays up: press Enter (or Ctrl-C) to stop.", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                sys.stdin.readline()
        return 0 if len(got) == studies else 1
