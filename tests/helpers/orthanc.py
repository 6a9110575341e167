"""A real PACS for tests: Orthanc (Debian's ``orthanc``) on free loopback ports.

``Orthanc`` writes a JSON configuration (its storage and index in its own folder, no plugins,
HTTP and DICOM on free ports) and runs ``/usr/sbin/Orthanc <config>``; ``stop()`` then
``start()`` keeps the ports and what was stored, like a PACS outage. The REST API answers the
test's questions (what is stored, in which study).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from edge_agent.devbroker import HOST, free_port, port_open

from .polling import wait_until

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"

needs_orthanc = pytest.mark.skipif(
    not Path(ORTHANC).exists(), reason="needs Orthanc (Debian's orthanc): make system-deps-test"
)


class Orthanc:
    def __init__(
        self,
        root: Path,
        *,
        aet: str = "ORTHANC",
        check_called_aet: bool = True,
        tls: tuple[Path, Path, Path] | None = None,
        require_client_cert: bool = False,
    ) -> None:
        """``tls``: (certificate, key, CA of the clients): DICOM over TLS only; a client
        certificate signed by that CA is required when ``require_client_cert``."""
        self.root = root
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = root / "orthanc.json"
        self.config.write_text(
            json.dumps(
                {
                    "Name": "edge-triage-test",
                    "StorageDirectory": str(root / "storage"),
                    "IndexDirectory": str(root / "index"),
                    "DicomAet": aet,
                    "DicomPort": self.dicom_port,
                    "HttpPort": self.http_port,
                    "HttpServerEnabled": True,
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "DicomCheckCalledAet": check_called_aet,
                    "DicomAlwaysAllowStore": True,
                    "DicomAlwaysAllowEcho": True,
                    "Plugins": [],
                    "ConcurrentJobs": 1,
                    **(
                        {
                            "DicomTlsEnabled": True,
                            "DicomTlsCertificate": str(tls[0]),
                            "DicomTlsPrivateKey": str(tls[1]),
                            "DicomTlsTrustedCertificates": str(tls[2]),
                            "DicomTlsRemoteCertificateRequired": require_client_cert,
                        }
                        if tls is not None
                        else {}
                    ),
                },
                indent=2,
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        with (self.root / "orthanc.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_until(
            lambda: port_open(HOST, self.dicom_port) and self._alive(),
            timeout,
            "Orthanc to listen",
            poll=0.1,
        )

    def __enter__(self) -> Orthanc:
        """Started; stopped again when the ``with`` block ends, however it ends."""
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _alive(self) -> bool:
        try:
            self.get("/system")
        except (OSError, urllib.error.URLError):
            return False
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}{path}", timeout=10) as rsp:
            return json.loads(rsp.read())

    def instances(self) -> list[dict[str, Any]]:
        """Every stored instance: its main DICOM tags and those of its series and study."""
        out = []
        for oid in self.get("/instances"):
            tags = self.get(f"/instances/{oid}/simplified-tags")
            out.append({"id": oid, **tags})
        return out

    def file(self, oid: str) -> bytes:
        url = f"http://{HOST}:{self.http_port}/instances/{oid}/file"
        with urllib.request.urlopen(url, timeout=10) as rsp:
            return bytes(rsp.read())
