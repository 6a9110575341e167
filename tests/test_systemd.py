"""The service as installed: the unit passes systemd's own checks, its exposure score stays at
or below 2.0, and systemd/install.sh puts the files in place idempotently and takes them away.

systemd-analyze runs offline on the unit file (no running systemd needed); install.sh runs
with --root into a temporary folder (no user is created, no systemctl is called).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "edge-agent.service"
INSTALL = REPO / "systemd" / "install.sh"
EXPOSURE_LIMIT = 2.0


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is not installed (Debian: systemd)")
    return tool


def unit_copy(folder: Path, dropin: str | None = None) -> Path:
    """The shipped unit with ExecStart pointing at this venv's edge-agent (verify checks that
    the program exists), plus an optional drop-in next to it."""
    folder.mkdir(parents=True, exist_ok=True)
    agent = Path(sys.executable).parent / "edge-agent"
    text = UNIT.read_text().replace("/opt/edge-triage/venv/bin/edge-agent", str(agent))
    unit = folder / "edge-agent.service"
    unit.write_text(text)
    if dropin is not None:
        (folder / "edge-agent.service.d").mkdir()
        (folder / "edge-agent.service.d" / "10-watch-dir.conf").write_text(dropin)
    return unit


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    done = subprocess.run(
        [analyze(), "verify", str(unit_copy(tmp_path))], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_unit_exposure_is_at_most_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [analyze(), "security", "--offline=yes", str(unit_copy(tmp_path))],
        capture_output=True,
        text=True,
    )
    match = re.search(r"Overall exposure level for edge-agent\.service: ([0-9.]+)", done.stdout)
    assert match, done.stdout[-2000:] + done.stderr
    score = float(match.group(1))
    print(f"systemd-analyze security exposure: {score}")
    assert score <= EXPOSURE_LIMIT
    assert "Unknown key" not in done.stderr and "Failed to parse" not in done.stderr


def test_unit_keeps_what_the_jetson_gpu_and_the_protocol_need() -> None:
    text = UNIT.read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#"
    )
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["WatchdogSec"] and settings["Restart"] == "on-failure"
    assert settings["SupplementaryGroups"] == "video"
    assert "PrivateDevices" not in settings  # would hide /dev/nvhost-* and /dev/nvmap
    assert settings["CapabilityBoundingSet"] == "" and settings["NoNewPrivileges"] == "yes"
    assert settings["ProtectSystem"] == "strict"
    assert settings["LoadCredential"].startswith("mqtt_password:")
    assert "AF_UNIX" in settings["RestrictAddressFamilies"]  # the notify socket


def run_install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(INSTALL), *args], capture_output=True, text=True, cwd=REPO, check=False
    )


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_install_puts_files_in_place_idempotently_and_uninstall_removes_them(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    first = run_install("--root", str(root), "--watch-dir", "/srv/modality out")
    assert first.returncode == 0, first.stderr
    placed = files_under(root)
    assert set(placed) == {
        "etc/edge-agent/agent.toml",
        "etc/edge-agent/mqtt_password",
        "etc/systemd/system/edge-agent.service",
        "etc/systemd/system/edge-agent.service.d/10-watch-dir.conf",
        "usr/lib/sysusers.d/edge-agent.conf",
    }
    assert placed["etc/systemd/system/edge-agent.service"] == UNIT.read_bytes()
    assert b'watch_dir = "/srv/modality out"' in placed["etc/edge-agent/agent.toml"]
    assert (root / "etc/edge-agent/mqtt_password").stat().st_mode & 0o077 == 0
    assert (root / "etc/edge-agent/agent.toml").stat().st_mode & 0o007 == 0

    # The drop-in parses (systemd reads drop-ins next to the unit offline) and keeps the space.
    dropin = placed["etc/systemd/system/edge-agent.service.d/10-watch-dir.conf"].decode()
    assert 'ReadOnlyPaths="-/srv/modality out"' in dropin
    done = subprocess.run(
        [analyze(), "security", "--offline=yes", str(unit_copy(tmp_path / "u", dropin))],
        capture_output=True,
        text=True,
    )
    assert "10-watch-dir.conf" not in done.stderr, done.stderr

    # Again, after the site edited its config: nothing changes, the edit survives.
    edited = (root / "etc/edge-agent/agent.toml").read_text() + 'site = "st-marys"\n'
    (root / "etc/edge-agent/agent.toml").write_text(edited)
    second = run_install("--root", str(root), "--watch-dir", "/srv/modality out")
    assert second.returncode == 0, second.stderr
    assert (root / "etc/edge-agent/agent.toml").read_text() == edited
    assert set(files_under(root)) == set(placed)

    removed = run_install("--uninstall", "--root", str(root))
    assert removed.returncode == 0, removed.stderr
    assert set(files_under(root)) == {"etc/edge-agent/agent.toml", "etc/edge-agent/mqtt_password"}
    assert run_install("--uninstall", "--root", str(root)).returncode == 0  # idempotent too
    assert run_install("--uninstall", "--purge", "--root", str(root)).returncode == 0
    assert files_under(root) == {}


def test_install_dry_run_writes_nothing_and_bad_options_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    dry = run_install("--dry-run", "--root", str(root))
    assert dry.returncode == 0 and "+ install" in dry.stdout
    assert files_under(root) == {}
    assert run_install("--extra", "cuda").returncode == 2
    assert run_install("--watch-dir", "relative/path").returncode == 2
    assert run_install("--watch-dir", '/srv/a"b').returncode == 2
    assert run_install("--purge").returncode == 2
    assert run_install("--bogus").returncode == 2


def test_install_applies_the_profile_memory_ceiling(tmp_path: Path) -> None:
    from edge_agent.profiles import resolve_profile

    root = tmp_path / "root"
    root.mkdir()
    done = run_install("--root", str(root), "--profile", "jetson-orin-nano")
    assert done.returncode == 0, done.stderr
    ceiling = resolve_profile("jetson-orin-nano")[0].runtime.memory_max_mib
    assert ceiling is not None
    memory = root / "etc/systemd/system/edge-agent.service.d/20-memory.conf"
    text = memory.read_text()
    assert f"MemoryMax={ceiling}M" in text and f"MemoryHigh={ceiling * 9 // 10}M" in text
    folder = tmp_path / "u"
    unit_copy(folder, dropin="[Service]\n")
    (folder / "edge-agent.service.d" / "20-memory.conf").write_text(text)
    checked = subprocess.run(
        [analyze(), "security", "--offline=yes", str(folder / "edge-agent.service")],
        capture_output=True,
        text=True,
    )
    assert "20-memory.conf" not in checked.stderr, checked.stderr
    assert run_install("--root", str(root), "--profile", "no-such-board").returncode == 2
    assert run_install("--uninstall", "--root", str(root)).returncode == 0
    assert not memory.exists()
