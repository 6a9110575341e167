"""systemd for tests: a stand-in for its notify socket, the environment a Type=notify service
gets, and ``systemd-analyze`` with the exposure score the units must stay under."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest


class FakeSystemd:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode().split("\n")))

    def fields(self, name: str) -> list[tuple[float, str]]:
        return [
            (at, line.split("=", 1)[1])
            for at, lines in list(self.messages)
            for line in lines
            if line.startswith(f"{name}=")
        ]

    def wait_for(self, name: str, timeout: float) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.fields(name)
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no {name}= within {timeout} s; got {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def supervise(monkeypatch: pytest.MonkeyPatch, fake: FakeSystemd) -> None:
    """The environment systemd gives a Type=notify service with WatchdogSec=2. Set only
    after the broker started: Mosquitto speaks the protocol too."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(fake.path))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # pings expected every second
    monkeypatch.delenv("WATCHDOG_PID", raising=False)


REPO = Path(__file__).resolve().parents[2]
EXPOSURE_LIMIT = 2.0  # systemd-analyze security's exposure score every unit stays under


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is not installed (Debian: systemd)")
    return tool
