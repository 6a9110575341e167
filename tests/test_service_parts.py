"""Profiles and the systemd notify protocol (against a real datagram socket)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from edge_agent.errors import ConfigError
from edge_agent.notify import Notifier
from edge_agent.profiles import detect_profile_name, load_profile_file, resolve_profile


@pytest.mark.parametrize(
    ("model", "name"),
    [
        (b"NVIDIA Jetson Orin Nano Developer Kit\0", "jetson-orin-nano"),
        (b"NVIDIA Jetson Orin NX Engineering Reference Developer Kit\0", "jetson-orin-nx"),
        (b"Jetson AGX Orin Developer Kit\0", "jetson-agx-orin"),
        (b"Raspberry Pi 5 Model B\0", "x86-cpu"),
    ],
)
def test_auto_detection_from_device_tree(tmp_path: Path, model: bytes, name: str) -> None:
    dt = tmp_path / "model"
    dt.write_bytes(model)
    assert detect_profile_name(dt)[0] == name


def test_no_device_tree_means_x86(tmp_path: Path) -> None:
    assert detect_profile_name(tmp_path / "absent")[0] == "x86-cpu"


def test_shipped_profiles_validate() -> None:
    profile, why = resolve_profile("x86-cpu")
    assert profile.runtime.providers == ["CPUExecutionProvider"]
    assert "named" in why


def test_profile_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\ndescription = "x"\n[runtime]\nproviders = ["GPU"]\n')
    with pytest.raises(ConfigError, match=r"profile\(bad.toml\).runtime.providers"):
        load_profile_file(bad)
    with pytest.raises(ConfigError, match="no profile named 'nope'"):
        resolve_profile("nope")


def test_notify_protocol_datagrams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    n = Notifier()
    assert n.enabled and n.watchdog_interval() == 10.0
    n.ready("watching")
    assert server.recv(4096) == b"READY=1\nSTATUS=watching"
    n.watchdog()
    assert server.recv(4096) == b"WATCHDOG=1"
    n.stopping()
    assert server.recv(4096).startswith(b"STOPPING=1")
    n.close()
    server.close()


def test_notify_without_systemd_is_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    assert n.ready("x") is False
