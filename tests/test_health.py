"""The box's health: readings from the fixture boards and this machine, the profile's limits
(warned once per crossing, cleared once), state_dir/health.json for `edge-agent status` and
/metrics, and the intake pausing in the real daemon while the state disk is below its floor."""

from __future__ import annotations

import gc
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import pytest
from helpers.polling import wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent import platform
from edge_agent.health import (
    HEALTH_FILE,
    HealthMonitor,
    HealthReading,
    limits_crossed,
    read_health,
    read_health_file,
)
from edge_agent.profiles import HealthProfile, resolve_profile
from edge_agent.status import format_status, read_status
from edge_agent.store import Store

FIXTURES = Path(__file__).parent / "fixtures"


def board(tmp_path: Path, name: str = "jetson-orin-nano") -> Path:
    """A copy of a fixture board that a test may change."""
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def test_the_fixture_orin_nano_reads_like_one(tmp_path: Path) -> None:
    r = read_health(tmp_path, tmp_path, root=FIXTURES / "jetson-orin-nano", now=5.0)
    assert r.at == 5.0
    assert r.soc_temp_c == 48.968 and r.gpu_temp_c == 47.343  # tj-thermal; cv* are -256 °C
    assert r.cpu_mhz == 1510.4 and r.cpu_max_mhz == 1510.4 and r.cpu_capped is False
    assert r.gpu_mhz == 306.0 and r.gpu_max_mhz == 624.75
    assert r.overcurrent_events == {"oc1": 0, "oc2": 0, "oc3": 3} and r.throttle_events == 0
    assert r.power_mode == "1 (7W)"
    assert r.memory_available_mib == pytest.approx(5187420 / 1024)
    assert r.state_free_mib is not None and r.state_free_mib > 0
    assert r.watch_free_percent is not None and 0 < r.watch_free_percent <= 100


def test_the_fixture_agx_orin_reads_like_one(tmp_path: Path) -> None:
    r = read_health(tmp_path, tmp_path, root=FIXTURES / "jetson-agx-orin")
    assert r.soc_temp_c == 52.125 and r.power_mode == "0 (MAXN)"
    assert r.cpu_mhz == 2201.6 and r.gpu_mhz == 1300.5


def test_this_machine_reads_what_it_has_and_none_for_the_rest(tmp_path: Path) -> None:
    """Whatever this machine has (a VM often has no thermal zones, no cpufreq): no error,
    absent readings None, the universal ones present."""
    r = read_health(tmp_path, tmp_path)
    assert r.memory_available_mib is not None and r.memory_available_mib > 0
    assert r.state_free_mib is not None and r.state_free_mib > 0
    assert r.power_mode is None and r.gpu_mhz is None  # not a Jetson
    assert (r.soc_temp_c is None) == (platform.thermal_zones() == [] or r.soc_temp_c is None)
    json.dumps(r.as_dict())  # what goes into health.json and the status message


def test_broken_sensor_files_read_as_none(tmp_path: Path) -> None:
    root = board(tmp_path)
    (root / "sys/class/thermal/thermal_zone8/temp").write_text("not a number\n")  # tj
    (root / "sys/class/thermal/thermal_zone0/temp").unlink()  # cpu
    (root / "var/lib/nvpmodel/status").write_text("garbage")
    (root / "proc/meminfo").write_text("MemTotal: 1 kB\n")
    shutil.rmtree(root / "sys/class/devfreq")
    (root / "sys/class/hwmon/hwmon1/name").write_text("ina3221\n")  # no soctherm_oc
    r = read_health(tmp_path / "absent" / "deeper", tmp_path, root=root)
    # No tj reading: the hottest zone that is not the GPU's (soc0 at 47.531).
    assert r.soc_temp_c == 47.531
    assert r.power_mode is None and r.memory_available_mib is None and r.gpu_mhz is None
    assert r.overcurrent_events is None and r.throttle_events is None
    assert r.state_free_mib is not None  # the nearest existing folder's file system


LIMITS = HealthProfile(
    max_soc_temp_c=80,
    min_state_free_mib=1000,
    min_state_free_percent=5,
    min_watch_free_mib=2000,
    min_watch_free_percent=5,
    min_available_memory_mib=500,
)


def reading(**values: float | None) -> HealthReading:
    base: dict[str, float | None] = {
        "soc_temp_c": 50.0,
        "memory_available_mib": 4000.0,
        "state_free_mib": 50_000.0,
        "state_free_percent": 50.0,
        "watch_free_mib": 50_000.0,
        "watch_free_percent": 50.0,
    }
    base.update(values)
    return HealthReading(at=0.0, **base)  # type: ignore[arg-type]


def test_limits_cross_and_clear_a_little_past_them() -> None:
    assert limits_crossed(reading(), LIMITS, {}) == {}
    hot = limits_crossed(reading(soc_temp_c=81.5), LIMITS, {})
    assert hot == {"health.max_soc_temp_c": "SoC at 81.5 °C, above health.max_soc_temp_c (80)"}
    # Back under the limit but within the margin: still warned; 3 °C under: cleared.
    assert "health.max_soc_temp_c" in limits_crossed(reading(soc_temp_c=79.0), LIMITS, hot)
    assert limits_crossed(reading(soc_temp_c=76.9), LIMITS, hot) == {}
    full = limits_crossed(reading(state_free_mib=812.4, state_free_percent=1.2), LIMITS, {})
    assert full["health.min_state_free_mib"] == (
        "state disk has 812 MiB free, below health.min_state_free_mib (1000)"
    )
    assert full["health.min_state_free_percent"] == (
        "state disk has 1.2% free, below health.min_state_free_percent (5)"
    )
    assert "health.min_state_free_mib" in limits_crossed(reading(state_free_mib=1010), LIMITS, full)
    assert limits_crossed(reading(state_free_mib=1100), LIMITS, full) == {}
    low = limits_crossed(reading(memory_available_mib=100, watch_free_mib=10), LIMITS, {})
    assert set(low) == {"health.min_available_memory_mib", "health.min_watch_free_mib"}
    # Unknown readings and limits set to 0 never warn.
    unknown = reading(soc_temp_c=None, memory_available_mib=None, state_free_mib=None)
    assert limits_crossed(unknown, LIMITS, {}) == {}
    off = LIMITS.model_copy(update={"min_state_free_mib": 0})
    assert limits_crossed(reading(state_free_mib=1), off, {}) == {}


def test_growing_overcurrent_counts_are_throttling(tmp_path: Path) -> None:
    root = board(tmp_path)
    first = read_health(tmp_path, tmp_path, root=root)
    (root / "sys/class/hwmon/hwmon1/oc3_event_cnt").write_text("30\n")
    second = read_health(tmp_path, tmp_path, root=root, previous=first)
    assert second.throttle_events == 27
    warnings = limits_crossed(second, LIMITS, {})
    assert warnings["throttling"].startswith("over-current throttling: 27 event(s)")
    third = read_health(tmp_path, tmp_path, root=root, previous=second)
    assert third.throttle_events == 0 and "throttling" not in limits_crossed(third, LIMITS, {})


def test_monitor_warns_once_per_crossing_and_once_when_cleared(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = board(tmp_path)
    tj = root / "sys/class/thermal/thermal_zone8/temp"
    state = tmp_path / "state"
    state.mkdir()
    monitor = HealthMonitor(LIMITS, state, tmp_path, root=root)
    with caplog.at_level(logging.INFO, logger="edge_agent.health"):
        monitor.update()
        tj.write_text("85500\n")
        monitor.update()
        monitor.update()  # still hot: no second line
        tj.write_text("60000\n")
        monitor.update()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("WARNING", "health: SoC at 85.5 °C, above health.max_soc_temp_c (80)"),
        ("INFO", "health: cleared: SoC at 85.5 °C, above health.max_soc_temp_c (80)"),
    ]
    assert monitor.intake_paused is None
    saved = read_health_file(state / HEALTH_FILE)
    assert saved is not None and saved["soc_temp_c"] == 60.0 and saved["warnings"] == []
    assert saved["stale"] is False and saved["power_mode"] == "1 (7W)"


def test_monitor_pauses_intake_below_the_state_floor_and_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    said: list[str | None] = []
    huge = LIMITS.model_copy(update={"min_state_free_mib": 1 << 40})
    monitor = HealthMonitor(huge, tmp_path, tmp_path, root=tmp_path / "none", notify=said.append)
    with caplog.at_level(logging.INFO, logger="edge_agent.health"):
        monitor.update()
        paused = monitor.intake_paused
        assert paused is not None and paused.startswith("intake paused: state disk has ")
        assert paused.endswith(f"MiB free, below health.min_state_free_mib ({1 << 40})")
        monitor.limits = LIMITS
        monitor.update()
    assert monitor.intake_paused is None
    assert said == [paused, None]  # the daemon shows its summary again on None
    messages = [r.getMessage() for r in caplog.records]
    assert f"{paused}; it resumes by itself when space is back" in messages
    assert "intake resumed: state disk has space again" in messages


def test_status_and_metrics_show_the_health_file(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from edge_agent.metrics import registry_for

    state = tmp_path / "state"
    Store(state / "state.sqlite3").close()
    report = read_status(state / "state.sqlite3")
    assert report.health is None and "health" not in format_status(report)
    monitor = HealthMonitor(LIMITS, state, tmp_path, root=FIXTURES / "jetson-orin-nano")
    monitor.update()
    report = read_status(state / "state.sqlite3")
    assert report.health is not None and report.health["stale"] is False
    text = format_status(report)
    assert (
        "health     read 0 s ago: SoC 49.0 °C, GPU 47.3 °C; CPU 1510/1510 MHz; GPU 306/625 MHz; "
        "power mode 1 (7W); over-current events oc1 0, oc2 0, oc3 3"
    ) in text
    assert "space      state disk " in text and "memory available 5066 MiB" in text
    # A reading older than three intervals: the agent is not running.
    later = read_status(state / "state.sqlite3", now=time.time() + 60)
    assert later.health is not None and later.health["stale"] is True
    assert "(stale: is the agent running?)" in format_status(later)
    metrics = generate_latest(registry_for(state / "state.sqlite3")).decode()
    assert "edge_triage_soc_temperature_celsius 49.0" in metrics
    assert "edge_triage_gpu_clock_mhz 306.0" in metrics
    assert 'edge_triage_overcurrent_events_total{event="oc3"} 3.0' in metrics
    assert "edge_triage_intake_paused 0.0" in metrics


def test_a_torn_or_foreign_health_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / HEALTH_FILE).write_text('{"at": 1')
    assert read_health_file(tmp_path / HEALTH_FILE) is None
    (tmp_path / HEALTH_FILE).write_text("[1, 2]")
    assert read_health_file(tmp_path / HEALTH_FILE) is None


def test_every_shipped_profile_has_health_limits() -> None:
    for name in ("x86-cpu", "x86-cuda", "jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin"):
        health = resolve_profile(name)[0].health
        assert health.min_state_free_mib >= 1024 and health.max_soc_temp_c <= 95, name
    nano, agx = resolve_profile("jetson-orin-nano")[0], resolve_profile("jetson-agx-orin")[0]
    assert nano.health.min_available_memory_mib < agx.health.min_available_memory_mib


@pytest.mark.slow
def test_the_daemon_pauses_intake_while_the_state_disk_is_below_its_floor(
    tmp_path: Path,
) -> None:
    """The real agent: with a floor no disk can meet, a study in the watch folder waits, the
    retained status says why; when the floor is met again the study is read and scored."""
    from helpers.brokers import Mosquitto, Subscriber

    from edge_agent.config import load_settings
    from edge_agent.service import Agent
    from edge_agent.simulate import simulate

    profile = tmp_path / "tight.toml"
    profile.write_text(
        (Path(__file__).parents[1] / "firmware_configs/x86-cpu.toml")
        .read_text()
        .replace("min_state_free_mib = 2048", f"min_state_free_mib = {1 << 40}")
        .replace("[health]\n", "[health]\ninterval_seconds = 0.2\n")
    )
    watch = tmp_path / "incoming"
    watch.mkdir()
    with Mosquitto(tmp_path / "broker") as broker:
        settings = load_settings(
            None,
            watch_dir=watch,
            state_dir=tmp_path / "state",
            profile=str(profile),
            site="s",
            device_id="d",
            study_quiet_seconds=0.5,
            mqtt={"host": broker.host, "port": broker.port, "status_interval_seconds": 0.5},
            intake={"file_stable_seconds": 0.2, "poll_interval_seconds": 0.2},
        )
        agent = Agent(settings)
        runner = threading.Thread(target=agent.run, daemon=True)
        runner.start()
        try:
            assert agent.started.wait(30)
            list(simulate(watch, studies=1, seed=5))
            time.sleep(2.0)
            assert agent.store.counters()["studies_seen"] == 0
            # The retained status, as a dashboard reads it from the broker.
            sub = Subscriber(broker, f"{settings.topic_base}/status")
            try:
                (status,) = sub.wait_for(
                    lambda m: bool(m.json().get("health", {}).get("intake_paused")), timeout=10
                )[-1:]
            finally:
                sub.close()
            health = status.json()["health"]
            assert health["intake_paused"].startswith("intake paused: state disk has ")
            assert health["intake_paused"].endswith(
                f"MiB free, below health.min_state_free_mib ({1 << 40})"
            )
            assert health["warnings"] and health["state_free_mib"] > 0
            agent.health.limits = agent.health.limits.model_copy(update={"min_state_free_mib": 1})
            wait_until(
                lambda a=agent: a.store.studies_in_state("scored"), timeout=60, what="scored"
            )
            assert agent.status_fields()["health"]["intake_paused"] is None
        finally:
            agent.stop()
            runner.join(20)
        assert not runner.is_alive()
    # paho closes its client's socket pair only in __del__, and the agent and its publisher
    # hold each other: collect them here, not in whichever later test the collector runs.
    del agent
    gc.collect()


SENSOR_FILES = [
    "sys/class/thermal/thermal_zone8/temp",
    "sys/class/thermal/thermal_zone8/type",
    "sys/class/hwmon/hwmon1/oc3_event_cnt",
    "sys/class/hwmon/hwmon1/name",
    "sys/devices/system/cpu/cpufreq/policy0/scaling_cur_freq",
    "sys/class/devfreq/17000000.gpu/max_freq",
    "var/lib/nvpmodel/status",
    "etc/nvpmodel.conf",
    "proc/meminfo",
]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(SENSOR_FILES), st.binary(max_size=64))
def test_any_bytes_in_a_sensor_file_read_as_a_value_or_none(relative: str, data: bytes) -> None:
    """Whatever a driver (or a broken one) puts in a file, a reading never fails."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(shutil.copytree(FIXTURES / "jetson-orin-nano", Path(tmp) / "root"))
        (root / relative).write_bytes(data)
        r = read_health(Path(tmp), Path(tmp), root=root)
        for key, value in r.as_dict().items():
            assert value is None or isinstance(value, int | float | str | dict), key
        json.dumps(r.as_dict())
        limits_crossed(r, LIMITS, {})


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("[health]\nmax_soc_temp_c = 500\n", "health.max_soc_temp_c"),
        ("[health]\nmin_state_free_mib = -1\n", "health.min_state_free_mib"),
        ("[health]\ninterval_seconds = 0\n", "health.interval_seconds"),
        ("[health]\nmin_free_gb = 3\n", "health.min_free_gb"),
    ],
)
def test_health_limit_errors_name_the_key(tmp_path: Path, body: str, key: str) -> None:
    from edge_agent.errors import ConfigError
    from edge_agent.profiles import load_profile_file

    path = tmp_path / "bad.toml"
    path.write_text(f'name = "bad"\ndescription = "x"\n{body}')
    with pytest.raises(ConfigError) as info:
        load_profile_file(path)
    assert info.value.key == f"profile(bad.toml).{key}"
