"""Configuration: sources, precedence, and errors that name their key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.config import load_settings
from edge_agent.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("EDGE_AGENT_") or key == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(key)


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
