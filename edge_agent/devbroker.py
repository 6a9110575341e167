"""A private Mosquitto broker on a free loopback port, for the demo and the tests.

Never for production: it listens on 127.0.0.1 only and, unless told otherwise, allows
anonymous clients. ``stop()`` then ``start()`` (same port) keeps retained messages and
persistent sessions; ``kill()`` loses what was not yet saved, like a crash.
``pause()``/``resume()`` (SIGSTOP/SIGCONT) hold the broker's answers (PUBACKs) while TCP
stays up.

Besides the plain broker (optionally with an ACL file, ``acl=``), the tests run the fleet
set-ups of docs/mqtt-security.md: ``config=`` starts a broker from a whole configuration of
the caller's (an example from docs/examples/mosquitto: TLS listener, password file, ACL,
bridge), :func:`write_password_file` writes a password file with ``mosquitto_passwd``, and
:class:`Pki` makes certificates with the ``openssl`` command line, as the documentation
does.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from .errors import ResourceMissing

HOST = "127.0.0.1"
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto")
_SBIN_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")


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


def _find_tool(name: str, package: str) -> str:
    found = shutil.which(name) or next(
        (str(Path(d) / name) for d in _SBIN_DIRS if (Path(d) / name).is_file()), None
    )
    if found is None:
        raise ResourceMissing(f"{name} is not installed: sudo apt-get install {package}")
    return found


def _run(argv: Sequence[str]) -> None:
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"{Path(argv[0]).name} failed ({done.returncode}): {err}")


def write_password_file(path: Path, users: Mapping[str, str]) -> Path:
    """A Mosquitto password file (``password_file``) for ``users`` (name → password),
    written with ``mosquitto_passwd -b`` as an administrator would."""
    tool = _find_tool("mosquitto_passwd", "mosquitto")
    path = Path(path)
    path.write_text("")
    for name, password in users.items():
        _run([tool, "-b", str(path), name, password])
    return path


class Pki:
    """A throw-away certificate authority in ``folder``, made with the ``openssl`` CLI.

    ``issue(name, cn, dns=…, ip=…)`` writes ``name.crt`` and ``name.key`` signed by
    ``ca.crt``: a server certificate when given DNS names or addresses (what clients check
    the broker's host name against), else a client certificate whose CN is the identity.
    EC P-256 keys, valid for 30 days; the commands of docs/mqtt-security.md.
    """

    def __init__(self, folder: Path, *, ca_name: str = "edge-triage test CA") -> None:
        self.openssl = _find_tool("openssl", "openssl")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ca_cert = self.folder / "ca.crt"
        self.ca_key = self.folder / "ca.key"
        _run(
            [
                self.openssl, "req", "-x509", "-new", "-newkey", "ec",
                "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "30",
                "-subj", f"/CN={_subject_value(ca_name)}",
                "-keyout", str(self.ca_key), "-out", str(self.ca_cert),
            ]
        )  # fmt: skip

    def issue(
        self, name: str, cn: str, *, dns: Sequence[str] = (), ip: Sequence[str] = ()
    ) -> tuple[Path, Path]:
        """Write ``name.crt`` and ``name.key``; return their paths."""
        cert, key, csr = (self.folder / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
        ext_file = self.folder / f"{name}.ext"
        alt_names = [f"DNS:{d}" for d in dns] + [f"IP:{a}" for a in ip]
        if alt_names:
            ext = f"subjectAltName={','.join(alt_names)}\nextendedKeyUsage=serverAuth\n"
        else:
            ext = "extendedKeyUsage=clientAuth\n"
        ext_file.write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n" + ext)
        _run(
            [
                self.openssl, "req", "-new", "-newkey", "ec",
                "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-subj", f"/CN={_subject_value(cn)}", "-keyout", str(key), "-out", str(csr),
            ]
        )  # fmt: skip
        _run(
            [
                self.openssl, "x509", "-req", "-in", str(csr),
                "-CA", str(self.ca_cert), "-CAkey", str(self.ca_key),
                "-set_serial", f"0x{secrets.token_hex(16)}", "-days", "30",
                "-extfile", str(ext_file), "-out", str(cert),
            ]
        )  # fmt: skip
        csr.unlink()
        ext_file.unlink()
        return cert, key


def _subject_value(value: str) -> str:
    """Escape a value for ``openssl -subj`` ("/CN=north-wing\\/cr-room-2")."""
    return value.replace("\\", "\\\\").replace("/", "\\/")


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
    """A mosquitto process on ``host:port``; a context manager.

    By default a plain listener on ``host:port`` that allows anonymous clients, with the ACL
    file ``acl`` if given. ``config`` replaces that with a whole configuration of the
    caller's, which must contain ``listener <port> 127.0.0.1``; the persistence location and
    the log file are put in ``workdir`` either way. ``extra_config`` is appended.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        acl: str | None = None,
        extra_config: str = "",
        config: str | None = None,
    ) -> None:
        self.binary = find_mosquitto()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = port if port is not None else free_port()
        self.log_file = self.workdir / "mosquitto.log"
        self.conf_file = self.workdir / "mosquitto.conf"
        self.acl_file = self.workdir / "acl"
        # First, so that a bridge section in ``config`` comes after every general option.
        lines = [
            f"persistence_location {self.workdir}/",
            f"log_dest file {self.log_file}",
            "log_type all",
        ]
        if os.geteuid() == 0:  # else it drops to user "mosquitto" and cannot write here
            lines.append(f"user {getpass.getuser()}")
        if config is not None:
            if acl is not None:
                raise ValueError("config= and acl= cannot be combined")
            lines.append(config)
        else:
            lines += [
                f"listener {self.port} {self.host}",
                "allow_anonymous true",
                "persistence true",
            ]
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
