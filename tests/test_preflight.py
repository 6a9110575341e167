"""One preflight for ``edge-agent run`` and ``edge-agent check`` (edge_agent/preflight.py):
the same checks, so the same verdict on every configuration both look at."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_agent.check import run_check
from edge_agent.config import load_settings
from edge_agent.devbroker import Mosquitto, free_port
from edge_agent.errors import ConfigError, EdgeTriageError
from edge_agent.preflight import CHECKS, receive_dir_problem
from edge_agent.service import prepare

X86 = Path(__file__).parent.parent / "firmware_configs" / "x86-cpu.toml"


def narrating_profile(folder: Path) -> Path:
    """x86-cpu with narratives on by the profile's default."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "x86-narrating.toml"
    text = X86.read_text().replace('name = "x86-cpu"', 'name = "x86-narrating"')
    path.write_text(text.replace("enabled = false", "enabled = true"))
    return path


def write_config(tmp_path: Path, mosquitto: Mosquitto, extra: str = "", **top: str) -> Path:
    watch = tmp_path / "incoming"
    watch.mkdir(exist_ok=True)
    keys = {"watch_dir": str(watch), "state_dir": str(tmp_path / "state"), "profile": "x86-cpu"}
    keys.update(top)
    config = tmp_path / "agent.toml"
    config.write_text(
        "".join(f'{k} = "{v}"\n' for k, v in keys.items())
        + f'[mqtt]\nhost = "{mosquitto.host}"\nport = {mosquitto.port}\n'
        + extra
    )
    return config


def both(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, int]:
    """(check's exit code, its output, the exit code ``run``'s preflight gives: 0 it starts)."""
    code = run_check(config)
    out = capsys.readouterr().out
    try:
        prepare(load_settings(config))
        started = 0
    except EdgeTriageError as exc:
        started = exc.exit_code
    return code, out, started


def test_narratives_enabled_explicitly_without_a_report_stop_both_naming_the_key(
    tmp_path: Path, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    # The demo bundle has no report section. Before: check said 2, run warned and started.
    config = write_config(tmp_path, mosquitto, "[narrative]\nenabled = true\n")
    code, out, started = both(config, capsys)
    assert (code, started) == (2, 2)
    assert "FAIL narrative  narrative.enabled: narratives are enabled" in out, out
    with pytest.raises(ConfigError) as err:
        prepare(load_settings(config))
    assert err.value.key == "narrative.enabled"


def test_narratives_on_by_the_profiles_default_without_a_report_warn_in_both(
    tmp_path: Path,
    mosquitto: Mosquitto,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    profile = narrating_profile(tmp_path / "profiles")
    config = write_config(tmp_path, mosquitto, profile=str(profile))
    with caplog.at_level(logging.WARNING, logger="edge_agent.preflight"):
        code, out, started = both(config, capsys)
    assert (code, started) == (0, 0), out
    assert "warn narrative  profile x86-narrating enables narratives but" in out, out
    assert "has no report section" in caplog.text
    components = prepare(load_settings(config))
    assert components.narrative is False


@pytest.mark.parametrize(
    ("case", "key"),
    [
        ("watch_dir missing", "watch_dir"),
        ("receive_dir inside watch_dir", "scp.receive_dir"),
        ("profile unknown", "profile"),
        ("bundle missing", None),
        ("narrative explicit", "narrative.enabled"),
        ("all well", None),
    ],
)
def test_run_and_check_give_the_same_verdict(
    tmp_path: Path,
    mosquitto: Mosquitto,
    capsys: pytest.CaptureFixture[str],
    case: str,
    key: str | None,
) -> None:
    watch = tmp_path / "incoming"
    extra, top = "", {}
    if case == "watch_dir missing":
        top["watch_dir"] = str(tmp_path / "absent")
    elif case == "receive_dir inside watch_dir":
        extra = f'[scp]\nenabled = true\nport = {free_port()}\nreceive_dir = "{watch / "r"}"\n'
    elif case == "profile unknown":
        top["profile"] = "no-such-board"
    elif case == "bundle missing":
        top["bundle"] = str(tmp_path / "no-bundle")
    elif case == "narrative explicit":
        extra = "[narrative]\nenabled = true\n"
    code, out, started = both(write_config(tmp_path, mosquitto, extra, **top), capsys)
    assert code == started, out
    if key is not None:
        assert f"FAIL {key:<10}" in out or f": {key}:" in out or f" {key}: " in out, out
    assert (code == 0) == (case == "all well"), out


def test_the_receive_folder_rule_is_one_function(tmp_path: Path) -> None:
    watch = tmp_path / "in"
    watch.mkdir()
    inside = load_settings(
        None, watch_dir=watch, state_dir=tmp_path / "s", scp={"receive_dir": watch / "r"}
    )
    problem = receive_dir_problem(inside)
    assert problem is not None and problem.key == "scp.receive_dir"
    outside = load_settings(None, watch_dir=watch, state_dir=tmp_path / "s")
    assert receive_dir_problem(outside) is None


def test_every_check_is_named_in_the_interfaces_doc() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "interfaces.md").read_text()
    for check in CHECKS:
        assert f"`{check.name}`" in doc, check.name
