"""Real peers for the triage board's tests: the board as its own process, a box that
publishes hand-made results, a Mosquitto with accounts and an ACL, a headless browser.

The broker's ACL lets the board read every box's topics and write only ``…/ack/+``: a
publish anywhere else would be denied and logged by Mosquitto (``Denied PUBLISH``), which
the tests look for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.devbroker import Mosquitto, free_port, port_open, write_password_file
from edge_agent.results import StudyResult, alert_id, iso
from helpers.polling import wait_until

PREFIX = "edge-triage/v1"
PASSWORDS = {"board": "board-secret", "agent": "agent-secret", "fakebox": "fakebox-secret"}
ACL = f"""user board
topic read {PREFIX}/#
topic write {PREFIX}/+/+/ack/+
user agent
topic readwrite {PREFIX}/#
user fakebox
topic readwrite {PREFIX}/#
"""
USER, PASSWORD = "alice", "correct horse battery"
CHROMIUM = "/usr/bin/chromium"


def secured_broker(folder: Path) -> Mosquitto:
    folder.mkdir(parents=True, exist_ok=True)
    passwords = write_password_file(folder / "passwd", PASSWORDS)
    (folder / "acl.conf").write_text(ACL)
    port = free_port()
    return Mosquitto(
        folder,
        port=port,
        config=(
            f"listener {port} 127.0.0.1\nallow_anonymous false\npersistence true\n"
            f"password_file {passwords}\nacl_file {folder / 'acl.conf'}\n"
        ),
    )


def mqtt_section(broker: Mosquitto, user: str, folder: Path) -> str:
    secret = folder / f"{user}.password"
    secret.write_text(PASSWORDS[user] + "\n")
    return (
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nusername = "{user}"\n'
        f'password_file = "{secret}"\n'
    )


def result_payload(
    uid: str,
    triage: str,
    *,
    revision: int = 1,
    label: str = "Pneumothorax",
    score: float = 0.9,
    complete_at: float | None = None,
    reason: str | None = None,
    **extra: Any,
) -> bytes:
    """A valid study result (validated by the agent's own model: a strict writer)."""
    t = time.time() if complete_at is None else complete_at
    body = {
        "alert_id": alert_id(uid, revision, "f" * 64),
        "revision": revision,
        "study_instance_uid": uid,
        "accession_number": extra.pop("accession_number", None),
        "modality": "CR",
        "triage": triage,
        "reason": reason,
        "findings": []
        if triage == "not_scored"
        else [
            {
                "code": "pneumothorax",
                "label": label,
                "score": score,
                "urgent_threshold": 0.8,
                "review_threshold": 0.5,
                "flagged": score >= 0.5,
            }
        ],
        "model": {
            "name": "fake",
            "version": "1",
            "sha256": "f" * 64,
            "precision": "fp32",
            "provider": "CPUExecutionProvider",
            "demo": True,
        },
        "instances": {"received": 1, "scored": 1, "rejected": 0},
        "timing": {
            "first_instance_at": iso(t - 5),
            "complete_at": iso(t),
            "scored_at": iso(t + 0.1),
            "published_at": iso(t + 0.2),
            "inference_ms": 10.0,
        },
        **extra,
    }
    return StudyResult.model_validate(body).to_json_bytes()


class FakeBox:
    """A box that publishes what a test hands it, under ``PREFIX/site/device``."""

    def __init__(self, broker: Mosquitto, site: str = "ward-9", device: str = "fake-1") -> None:
        self.base = f"{PREFIX}/{site}/{device}"
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"fakebox-{time.time_ns()}",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set("fakebox", PASSWORDS["fakebox"])
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def publish(self, leaf: str, payload: bytes | str, retain: bool = False) -> None:
        info = self.client.publish(f"{self.base}/{leaf}", payload, qos=1, retain=retain)
        info.wait_for_publish(5.0)
        assert info.is_published()

    def study(self, uid: str, triage: str, **kwargs: Any) -> None:
        self.publish(f"study/{uid}", result_payload(uid, triage, **kwargs))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class BoardProcess:
    """``edge-agent board --config FILE`` as its own process, as systemd starts it."""

    config: Path
    log: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> BoardProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_agent.cli", "board", "--config", str(self.config)],
                stdout=log,
                stderr=log,
                env=env,
            )
        wait_until(
            lambda: port_open("127.0.0.1", self.port) or self.proc.poll() is not None,
            timeout,
            "the board to listen",
        )
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        return self

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def board_config(folder: Path, broker: Mosquitto, port: int, **board: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        f'listen = "127.0.0.1:{port}"',
        f'users_file = "{folder / "users"}"',
        f'state_file = "{folder / "board.sqlite3"}"',
    ] + [f"{k} = {json.dumps(v)}" for k, v in board.items()]
    config = folder / "board.toml"
    config.write_text(mqtt_section(broker, "board", folder) + "[board]\n" + "\n".join(lines) + "\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "board",
            "add-user",
            USER,
            "--config",
            str(config),
        ],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")},
    )
    assert done.returncode == 0, done.stderr
    return config


class Http:
    """A plain HTTP client with a cookie jar (what a script, not a browser, would send)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect()
        )

    def request(
        self,
        path: str,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.base + path, data=data, headers=headers or {})
        try:
            with self.opener.open(req, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def cookie(self, name: str) -> str | None:
        return next((c.value for c in self.jar if c.name == name), None)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None
