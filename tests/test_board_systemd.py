"""The board's unit as shipped: systemd's own checks pass and its exposure stays at or below
2.0 (it holds broker credentials and the accounts file), like the agent's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from helpers.systemd import EXPOSURE_LIMIT, REPO, analyze

UNIT = REPO / "systemd" / "edge-triage-board.service"


def unit_copy(folder: Path) -> Path:
    """The unit with ExecStart pointing at this venv's edge-agent (verify checks it exists)."""
    agent = Path(sys.executable).parent / "edge-agent"
    unit = folder / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/edge-triage/venv/bin/edge-agent", str(agent)))
    return unit


def test_board_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    done = subprocess.run(
        [analyze(), "verify", str(unit_copy(tmp_path))], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_board_unit_exposure_is_at_most_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [analyze(), "security", "--offline=yes", str(unit_copy(tmp_path))],
        capture_output=True,
        text=True,
    )
    match = re.search(
        r"Overall exposure level for edge-triage-board\.service: ([0-9.]+)", done.stdout
    )
    assert match, done.stdout[-2000:] + done.stderr
    print(f"systemd-analyze security exposure: {match.group(1)}")
    assert float(match.group(1)) <= EXPOSURE_LIMIT
    assert "Unknown key" not in done.stderr and "Failed to parse" not in done.stderr


def test_board_unit_runs_the_board_with_its_credential() -> None:
    settings = dict(
        line.split("=", 1)
        for line in UNIT.read_text().splitlines()
        if "=" in line[:40] and line[0] != "#"
    )
    assert settings["ExecStart"].endswith(
        "edge-agent board --config /etc/edge-triage-board/board.toml"
    )
    assert settings["LoadCredential"].startswith("mqtt_password:")
    assert settings["User"] == "edge-board" and settings["NoNewPrivileges"] == "yes"
    assert settings["StateDirectory"] == "edge-triage-board"
    assert "EDGE_AGENT_BOARD__STATE_FILE=/var/lib/edge-triage-board/" in settings["Environment"]


def test_the_example_config_is_valid_and_matches_the_unit() -> None:
    from edge_agent.config import load_settings

    settings = load_settings(REPO / "systemd" / "board.toml.example")
    assert settings.board.state_file == Path("/var/lib/edge-triage-board/board.sqlite3")
    assert settings.board.users_file.parent == Path("/etc/edge-triage-board")
    assert "/etc/edge-triage-board/board.toml" in UNIT.read_text()
