"""Configuration: sources, precedence, and errors that name their key."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from edge_agent.cli import main
from edge_agent.config import Settings, load_settings
from edge_agent.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_defaults_follow_the_contract() -> None:
    s = load_settings()
    assert s.mqtt.topic_prefix == "edge-triage/v1"
    assert s.topic_base == "edge-triage/v1/site/box"
    assert s.profile == "auto"


def test_toml_then_env_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path, 'site = "north"\ndevice_id = "cr-1"\n[mqtt]\nhost = "b1"\nport = 1884\n')
    s = load_settings(cfg)
    assert (s.site, s.device_id, s.mqtt.host, s.mqtt.port) == ("north", "cr-1", "b1", 1884)
    monkeypatch.setenv("EDGE_AGENT_MQTT__PORT", "8883")
    monkeypatch.setenv("EDGE_AGENT_SITE", "south")
    s = load_settings(cfg)
    assert (s.site, s.mqtt.host, s.mqtt.port) == ("south", "b1", 8883)


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_CONFIG", str(write(tmp_path, 'site = "env-file"\n')))
    assert load_settings().site == "env-file"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("sight = 'x'\n", "sight"),
        ("[mqtt]\nhots = 'x'\n", "mqtt.hots"),
        ("[mqtt]\nport = 70000\n", "mqtt.port"),
        ("site = 'a/b'\n", "site"),
        ("[mqtt]\ntopic_prefix = 'a/#'\n", "mqtt.topic_prefix"),
        ("study_quiet_seconds = -1\n", "study_quiet_seconds"),
    ],
)
def test_bad_toml_values_name_their_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert info.value.key == key


def test_unknown_environment_variable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_MQTT__HOTS", "broker")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert info.value.key == "EDGE_AGENT_MQTT__HOTS"


def test_toml_syntax_error_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "site = \n"))


def test_password_from_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mqtt_password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    s = load_settings(
        write(tmp_path, '[mqtt]\nusername = "box"\npassword_file = "mqtt_password"\n')
    )
    assert s.mqtt.password() == "s3cret"


def test_missing_password_file_names_the_key(tmp_path: Path) -> None:
    s = load_settings(
        write(tmp_path, f'[mqtt]\nusername = "box"\npassword_file = "{tmp_path}/nope"\n')
    )
    with pytest.raises(ConfigError) as info:
        s.mqtt.password()
    assert info.value.key == "mqtt.password_file"


def test_tls_cert_needs_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, '[mqtt]\ntls_cert = "/x.pem"\n'))
    assert info.value.key == "mqtt"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        # A client certificate without a CA would mean plain TCP with the certificate unused.
        ('tls_cert = "/c.pem"\ntls_key = "/k.pem"\n', "tls_ca is required"),
        # A password without a user name would silently never be sent.
        ('password_file = "mqtt_password"\n', "password_file needs username"),
    ],
)
def test_settings_that_would_silently_do_nothing_are_refused(
    tmp_path: Path, text: str, words: str
) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        load_settings(write(tmp_path, "[mqtt]\n" + text))
    assert info.value.key == "mqtt"


def test_cli_config_error_exit_2_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", "--config", str(write(tmp_path, "[mqtt]\nport = 'x'\n"))])
    err = capsys.readouterr().err
    assert code == 2
    assert "mqtt.port" in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


# -- values that crashed the agent or passed silently -----------------------------------------


def _numbers(model: type[BaseModel] = Settings, prefix: str = "") -> list[tuple[str, type]]:
    """Every int/float setting as (dotted key, type), found by walking the models: a new
    number setting is covered by the tests below without being listed."""
    found: list[tuple[str, type]] = []
    for name, info in model.model_fields.items():
        arms = typing.get_args(info.annotation) or (info.annotation,)
        for arm in arms:
            while typing.get_origin(arm) is typing.Annotated:
                arm = typing.get_args(arm)[0]
            if isinstance(arm, type) and issubclass(arm, BaseModel):
                found += _numbers(arm, f"{prefix}{name}.")
            elif arm in (int, float):
                found.append((f"{prefix}{name}", arm))
    return found


NUMBERS = _numbers()


def toml_for(key: str, value: str) -> str:
    *section, name = key.split(".")
    return (f"[{section[0]}]\n" if section else "") + f"{name} = {value}\n"


def test_the_walk_finds_the_number_settings() -> None:
    keys = {key for key, _ in NUMBERS}
    assert {"study_quiet_seconds", "mqtt.keepalive_seconds", "intake.rescan_seconds"} <= keys
    assert "narrative.time_budget_seconds" in keys  # inside `X | None`


@pytest.mark.parametrize(("key", "kind"), NUMBERS, ids=[k for k, _ in NUMBERS])
def test_every_number_setting_is_finite_and_bounded(tmp_path: Path, key: str, kind: type) -> None:
    """inf, nan and absurdly large values are refused with the key, in every number setting."""
    absurd = ["inf", "-inf", "nan", "1e300", "-1e300"] if kind is float else ["10000000000000"]
    absurd += ["-10000000000000"] if kind is int else []
    for value in absurd:
        with pytest.raises(ConfigError) as info:
            load_settings(write(tmp_path, toml_for(key, value)))
        assert info.value.key == key, (value, str(info.value))


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.data(),
    pick=st.sampled_from(NUMBERS),
)
def test_a_number_setting_is_kept_as_given_or_refused_with_its_key(
    tmp_path: Path, data: st.DataObject, pick: tuple[str, type]
) -> None:
    key, kind = pick
    value: float | int = data.draw(
        st.floats(allow_nan=True, allow_infinity=True)
        if kind is float
        else st.integers(min_value=-(2**70), max_value=2**70)
    )
    text = repr(value) if not (isinstance(value, float) and math.isnan(value)) else "nan"
    text = {"inf": "inf", "-inf": "-inf"}.get(text, text)
    try:
        s = load_settings(write(tmp_path, toml_for(key, text)))
    except ConfigError as exc:
        assert exc.key == key
        return
    got = s
    for part in key.split("."):
        got = getattr(got, part)
    assert math.isfinite(got) and got == value


@pytest.mark.parametrize(
    ("env", "key", "words"),
    [
        ({"EDGE_AGENT_MQTT__HOST": ""}, "mqtt.host", "must not be empty"),
        ({"EDGE_AGENT_MQTT__HOST": "broker .lan"}, "mqtt.host", "no spaces"),
        ({"EDGE_AGENT_WATCH_DIR": ""}, "watch_dir", "must not be empty"),
        ({"EDGE_AGENT_STATE_DIR": " "}, "state_dir", "must not be empty"),
        ({"EDGE_AGENT_BUNDLE": ""}, "bundle", "must not be empty"),
        ({"EDGE_AGENT_MQTT__CLIENT_ID": "x" * 70000}, "mqtt.client_id", "at most 128 bytes"),
        ({"EDGE_AGENT_MQTT__CLIENT_ID": ""}, "mqtt.client_id", "must not be empty"),
        ({"EDGE_AGENT_STUDY_QUIET_SECONDS": "inf"}, "study_quiet_seconds", "finite"),
        ({"EDGE_AGENT_STUDY_QUIET_SECONDS": "nan"}, "study_quiet_seconds", "finite"),
        ({"EDGE_AGENT_STUDY_QUIET_SECONDS": "1e-9"}, "study_quiet_seconds", "greater"),
        ({"EDGE_AGENT_MQTT__KEEPALIVE_SECONDS": "999999999"}, "mqtt.keepalive_seconds", "less"),
        ({"EDGE_AGENT_MQTT__RENOTIFY_SECONDS": "1e-300"}, "mqtt.renotify_seconds", "at least 1"),
        ({"EDGE_AGENT_INTAKE__RESCAN_SECONDS": "1e300"}, "intake.rescan_seconds", "less"),
        ({"EDGE_AGENT_SCP__ALLOWED_CALLING_AES": '["CR1"'}, "scp.allowed_calling_aes", "JSON"),
        ({"EDGE_AGENT_MQTT": "broker"}, "EDGE_AGENT_MQTT", "EDGE_AGENT_MQTT__HOST"),
    ],
    ids=lambda v: "" if isinstance(v, str) else next(iter(v)),
)
def test_a_bad_value_is_one_line_naming_its_key_exit_2(
    tmp_path: Path, env: dict[str, str], key: str, words: str
) -> None:
    """A real `edge-agent run` process: before, these crashed (exit 1, or paho's thread) or
    were taken silently (an empty folder setting is the current folder)."""
    done = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "run"],
        capture_output=True,
        text=True,
        env={**clean_environ(), **env},
        cwd=tmp_path,
        timeout=60,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"edge-agent: config error: {key}: ") and words in lines[0]


def clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}


def test_a_binary_config_file_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" + bytes(range(256)))
    for command in ("run", "check"):
        done = subprocess.run(
            [sys.executable, "-m", "edge_agent.cli", command, "--config", str(config)],
            capture_output=True,
            text=True,
            env=clean_environ(),
            timeout=60,
        )
        out = (done.stderr if command == "run" else done.stdout).strip().splitlines()
        assert done.returncode == 2, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        assert any("--config" in ln and "not a TOML text file" in ln for ln in out), out


AE = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters='\\,["'),
    min_size=1,
    max_size=16,
)


@settings(max_examples=50, deadline=None)
@given(titles=st.lists(AE, max_size=5))
def test_list_settings_from_the_environment_as_json_or_comma_separated(
    titles: list[str],
) -> None:
    for text in (json.dumps(titles), ",".join(titles), ", ".join(titles)):
        os.environ["EDGE_AGENT_SCP__ALLOWED_CALLING_AES"] = text
        try:
            assert load_settings().scp.allowed_calling_aes == titles
        finally:
            del os.environ["EDGE_AGENT_SCP__ALLOWED_CALLING_AES"]


def test_plain_text_list_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_SCP__ALLOWED_CALLING_AES", "CR1")
    monkeypatch.setenv("EDGE_AGENT_INTAKE__IGNORE_SUFFIXES", ".part,.tmp")
    s = load_settings()
    assert s.scp.allowed_calling_aes == ["CR1"]
    assert s.intake.ignore_suffixes == [".part", ".tmp"]


@settings(max_examples=100, deadline=None)
@given(client_id=st.text(max_size=200))
def test_client_id_is_kept_or_refused_with_its_key(client_id: str) -> None:
    try:
        s = load_settings(mqtt={"client_id": client_id})
    except ConfigError as exc:
        assert exc.key == "mqtt.client_id"
        return
    got = s.mqtt.client_id
    assert got == client_id and 0 < len(got.encode()) <= 128 and got.isprintable()


@settings(max_examples=100, deadline=None)
@given(host=st.text(max_size=300))
def test_mqtt_host_is_a_name_or_refused_with_its_key(host: str) -> None:
    try:
        s = load_settings(mqtt={"host": host})
    except ConfigError as exc:
        assert exc.key == "mqtt.host"
        return
    assert s.mqtt.host and s.mqtt.host.isprintable() and " " not in s.mqtt.host


@settings(max_examples=100, deadline=None)
@given(path=st.text(max_size=50))
def test_a_folder_setting_is_a_path_or_refused_with_its_key(path: str) -> None:
    """Never the current folder by accident: an empty or blank value is refused."""
    try:
        s = load_settings(state_dir=path)
    except ConfigError as exc:
        assert exc.key == "state_dir"
        return
    assert path.strip() and "\0" not in path and s.state_dir == Path(path)


@pytest.mark.parametrize(
    ("key", "value", "path"),
    [
        ("EDGE_AGENT_NARRATIVE__ENABLED", "true", ("narrative", "enabled", True)),
        ("EDGE_AGENT_BOARD__LISTEN", "127.0.0.1:9090", ("board", "listen", "127.0.0.1:9090")),
    ],
)
def test_every_section_is_known_to_the_environment(
    monkeypatch: pytest.MonkeyPatch, key: str, value: str, path: tuple[str, str, object]
) -> None:
    """The sections checked for unknown env keys come from the model (narrative was missing)."""
    monkeypatch.setenv(key, value)
    section, field, expected = path
    assert getattr(getattr(load_settings(None), section), field) == expected
