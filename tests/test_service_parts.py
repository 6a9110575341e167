"""Profiles and the systemd notify protocol (against a real datagram socket)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    assert detect_profile_name(dt, nvidia_driver=tmp_path / "no-driver")[0] == name


def test_no_device_tree_means_x86(tmp_path: Path) -> None:
    assert detect_profile_name(tmp_path / "absent", tmp_path / "no-driver")[0] == "x86-cpu"


def test_x86_with_nvidia_driver_and_cuda_provider_means_x86_cuda(tmp_path: Path) -> None:
    driver = tmp_path / "version"
    driver.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14\n")
    gpu_ort = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    name, why = detect_profile_name(tmp_path / "absent", driver, lambda: gpu_ort)
    assert name == "x86-cuda" and "NVIDIA driver" in why
    # A GPU but the CPU build of ONNX Runtime: the CPU profile, and the reason says how to fix.
    name, why = detect_profile_name(tmp_path / "absent", driver, lambda: ["CPUExecutionProvider"])
    assert name == "x86-cpu" and "'gpu' extra" in why
    # A Jetson's device tree wins over everything else.
    dt = tmp_path / "model"
    dt.write_bytes(b"NVIDIA Jetson Orin NX Engineering Reference Developer Kit\0")
    assert detect_profile_name(dt, driver, lambda: gpu_ort)[0] == "jetson-orin-nx"


def test_every_shipped_profile_loads_and_validates() -> None:
    from edge_agent.profiles import profile_dirs

    names = sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.toml")})
    assert {"x86-cpu", "x86-cuda", "jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin"} <= set(
        names
    )
    for name in names:
        profile, _ = resolve_profile(name)
        assert profile.name == name


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


def test_check_reports_each_problem_and_exit_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_agent.cli import main
    from edge_agent.devbroker import Mosquitto, free_port

    watch = tmp_path / "in"
    watch.mkdir()
    for key in ("EDGE_AGENT_CONFIG", "EDGE_AGENT_BUNDLE", "EDGE_AGENT_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("EDGE_AGENT_WATCH_DIR", str(watch))
    monkeypatch.setenv("EDGE_AGENT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("EDGE_AGENT_PROFILE", "x86-cpu")
    with Mosquitto(tmp_path / "broker") as broker:
        monkeypatch.setenv("EDGE_AGENT_MQTT__PORT", str(broker.port))
        monkeypatch.setenv("EDGE_AGENT_MQTT__HOST", broker.host)
        assert main(["check"]) == 0
        out = capsys.readouterr().out
        assert "DEMO MODEL" in out and "hashes verified" in out and "FAIL" not in out
    monkeypatch.setenv("EDGE_AGENT_MQTT__PORT", str(free_port()))
    assert main(["check"]) == 3  # broker missing
    assert "FAIL broker" in capsys.readouterr().out
    monkeypatch.setenv("EDGE_AGENT_WATCH_DIR", str(tmp_path / "missing"))
    assert main(["check"]) == 2  # a config problem outranks a missing resource
    assert "watch_dir" in capsys.readouterr().out
    monkeypatch.setenv("EDGE_AGENT_MQTT__PORT", "not-a-port")
    assert main(["check"]) == 2
    assert "mqtt.port" in capsys.readouterr().out


def test_check_looks_for_the_tensorrt_engine_with_a_tensorrt_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A Jetson profile with the native runner opted in runs the bundle's own TensorRT engine:
    # check must look for that engine (here: TensorRT is absent, so exit 3 saying so), not for
    # ONNX Runtime providers.
    from helpers.jetson_profiles import native_runner_profile

    from edge_agent.cli import main
    from edge_agent.devbroker import Mosquitto

    watch = tmp_path / "in"
    watch.mkdir()
    for key in ("EDGE_AGENT_CONFIG", "EDGE_AGENT_BUNDLE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("EDGE_AGENT_WATCH_DIR", str(watch))
    monkeypatch.setenv("EDGE_AGENT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("EDGE_AGENT_PROFILE", str(native_runner_profile(tmp_path / "profiles")))
    with Mosquitto(tmp_path / "broker") as broker:
        monkeypatch.setenv("EDGE_AGENT_MQTT__PORT", str(broker.port))
        monkeypatch.setenv("EDGE_AGENT_MQTT__HOST", broker.host)
        assert main(["check"]) == 3
    out = capsys.readouterr().out
    assert "FAIL engine" in out and "TensorRT" in out
    # No provider check line (the platform lines may name ONNX Runtime's providers).
    assert not [line for line in out.splitlines() if line[5:].startswith("providers")]
    assert "warn tensorrt   the tensorrt module does not import" in out


def test_cgroup_memory_limit_is_read_from_the_process_cgroup(tmp_path: Path) -> None:
    from edge_agent.check import cgroup_memory_max

    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/edge-agent.service\n")
    group = tmp_path / "fs" / "system.slice" / "edge-agent.service"
    group.mkdir(parents=True)
    (group / "memory.max").write_text("3221225472\n")
    assert cgroup_memory_max(proc, tmp_path / "fs") == 3 * 2**30
    (group / "memory.max").write_text("max\n")
    assert cgroup_memory_max(proc, tmp_path / "fs") is None
    assert cgroup_memory_max(tmp_path / "absent", tmp_path / "fs") is None


def test_every_profile_has_a_memory_ceiling() -> None:
    for name in ("x86-cpu", "x86-cuda", "jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin"):
        ceiling = resolve_profile(name)[0].runtime.memory_max_mib
        assert ceiling is not None and ceiling >= 1024, name
    nano = resolve_profile("jetson-orin-nano")[0].runtime.memory_max_mib
    agx = resolve_profile("jetson-agx-orin")[0].runtime.memory_max_mib
    assert nano is not None and agx is not None and nano < agx


# -- studies waiting to be stored again (edge_agent/waiting.py) ------------------------------


def test_retry_delay_doubles_from_one_second_to_a_minute() -> None:
    from edge_agent.waiting import retry_delay

    assert [retry_delay(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]


@settings(max_examples=40, deadline=None)
@given(
    reasons=st.lists(st.text(max_size=2000), min_size=1, max_size=300),
)
def test_the_waiting_file_keeps_its_size_and_says_how_many_wait(reasons: list[str]) -> None:
    """Whatever the reasons, the file stays 16 KiB (rewritten in place, never grown) and
    reads back with the exact count; the status names at most 20, oldest first."""
    import tempfile

    from edge_agent.waiting import FILE_SIZE, LISTED, ScoringWaits, read_waiting

    with tempfile.TemporaryDirectory() as folder:
        waits = ScoringWaits(Path(folder))
        for i, reason in enumerate(reasons):
            waits.failed(f"1.2.{i}", reason)
        assert waits.path.stat().st_size == FILE_SIZE
        body = read_waiting(Path(folder))
        assert body is not None and body["scoring_waiting"] == len(reasons)
        listed = body["scoring_waiting_studies"]
        assert len(listed) <= LISTED and [w["study_instance_uid"] for w in listed] == [
            f"1.2.{i}" for i in range(len(listed))
        ]
        fields = waits.status_fields()
        assert fields["scoring_waiting"] == len(reasons)
        assert len(fields["scoring_waiting_studies"]) == min(LISTED, len(reasons))
        for i in range(len(reasons)):
            waits.done(f"1.2.{i}")
        assert read_waiting(Path(folder))["scoring_waiting"] == 0  # type: ignore[index]
        assert waits.path.stat().st_size == FILE_SIZE


def test_a_waiting_study_is_due_after_its_back_off() -> None:
    import tempfile
    import time

    from edge_agent.waiting import ScoringWaits

    with tempfile.TemporaryDirectory() as folder:
        waits = ScoringWaits(Path(folder))
        entry, first = waits.failed("1.2.3", "database is locked")
        assert first and entry.attempts == 1
        now = time.monotonic()
        assert waits.due(now) is None and 0.5 < (waits.seconds_to_next(now) or 0) <= 1.0
        assert waits.due(now + 1.01) == "1.2.3"
        entry, first = waits.failed("1.2.3", "database is locked")
        assert not first and entry.attempts == 2
        assert waits.due(time.monotonic() + 1.5) is None


def test_errors_described_for_the_status_never_carry_a_file_name() -> None:
    """last_error goes out on P/status: an OSError's str() names the file (folders are often
    named after the patient), a bug's message could hold anything."""
    import sqlite3

    from edge_agent.errors import ConfigError, describe

    name = "/srv/incoming/DOE^JANE 19700101/1.dcm"
    assert describe(PermissionError(13, "Permission denied", name)) == (
        "PermissionError: Permission denied"
    )
    assert describe(ValueError(f"bad value in {name}")) == "ValueError (see the log)"
    assert describe(sqlite3.OperationalError("database is locked")) == "database is locked"
    assert describe(ConfigError("mqtt.port", "too large")) == "mqtt.port: too large"


def test_a_study_is_queued_for_scoring_once_until_taken() -> None:
    from edge_agent.workers import StudyQueue

    studies = StudyQueue()
    for uid in ["1.2.3", "1.2.4", "1.2.3"]:
        studies.put(uid)
    assert [studies.get(0.01), studies.get(0.01), studies.get(0.01)] == ["1.2.3", "1.2.4", None]
    studies.put("1.2.3")  # complete again after it was taken: queued again
    assert studies.get(0.01) == "1.2.3"


def test_last_error_is_the_newest_of_the_threads_errors() -> None:
    from edge_agent.workers import WorkerErrors

    errors = WorkerErrors()
    assert errors.latest() is None
    errors.set("start", "state database was damaged")
    errors.set("intake", "intake: disk I/O error")
    errors.set("scoring", "scoring study 1.2.3: database is locked")
    assert errors.latest() == "scoring study 1.2.3: database is locked"
    errors.set("intake", "intake: disk I/O error")  # the same again is the newest again
    assert errors.latest() == "intake: disk I/O error"
    assert errors.get("scoring") == "scoring study 1.2.3: database is locked"
    assert errors.get("main") is None
