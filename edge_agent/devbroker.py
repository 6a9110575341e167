"""A private Mosquitto broker on a free loopback port, for the demo and the tests.

Never for production: it listens on 127.0.0.1 only and allows anonymous clients.
``stop()`` then ``start()`` (same port) keeps retained messages and persistent sessions;
``kill()`` loses what was not yet saved, like a crash. ``pause()``/``resume()``
(SIGSTOP/SIGCONT) hold the broker's answers (PUBACKs) while TCP stays up.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from .errors import ResourceMissing

HOST = "127.0.0.1"
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in MOSQUITTO_PATHS if Path(p).is_file()), None
    )
    if found is None:
        raise ResourceMissing(
            "mosquitto is not installed: sudo apt-get install mosquitto "
            "(or give a broker with --broker HOST:PORT)"
        )
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Mosquitto:
    """A mosquitto process on ``host:port``; a context manager."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        acl: str | None = None,
        extra_config: str = "",
    ) -> None:
        self.binary = find_mosquitto()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = port if port is not None else free_port()
        self.log_file = self.workdir / "mosquitto.log"
        self.conf_file = self.workdir / "mosquitto.conf"
        self.acl_file = self.workdir / "acl"
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.workdir}/",
            f"log_dest file {self.log_file}",
            "log_type all",
        ]
        if os.geteuid() == 0:  # else it drops to user "mosquitto" and cannot write here
            lines.append(f"user {getpass.getuser()}")
        if acl is not None:
            self.acl_file.write_text(acl)
            lines.append(f"acl_file {self.acl_file}")
        self.conf_file.write_text("\n".join(lines) + "\n" + extra_config)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 5.0) -> Mosquitto:
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError("mosquitto is already running")
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while not port_open(self.host, self.port):
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self._proc = None
                raise ResourceMissing(
                    f"mosquitto exited at start: {err.strip()}\n{self.log_text()[-2000:]}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise ResourceMissing(f"mosquitto did not listen on {self.host}:{self.port}")
            time.sleep(0.02)
        return self

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM: mosquitto saves its database and exits."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash; what was not saved is lost."""
        self._end(signal.SIGKILL, 5.0)

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a paused broker cannot handle SIGTERM
                proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def restart(self) -> None:
        """Stop (saving state) and start again on the same port."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def reload(self, acl: str | None = None) -> None:
        """Rewrite the ACL file (if given) and SIGHUP: mosquitto re-reads it."""
        assert self._proc is not None
        if acl is not None:
            self.acl_file.write_text(acl)
        self._proc.send_signal(signal.SIGHUP)

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Mosquitto({self.host}:{self.port}, running={self.running})"
