"""The box's health: temperatures, throttling, clocks, power mode, memory and free space.

A small worker (:class:`HealthMonitor`, the daemon's ``health`` thread) reads
:mod:`edge_agent.platform` every ``health.interval_seconds`` (profile), compares the reading
with the profile's ``[health]`` limits and

* logs a warning once when a limit is crossed and one line when it clears (a little past
  the limit, so that a value sitting on it does not fill the log);
* pauses the intake while state_dir's file system has less than
  ``health.min_state_free_mib`` free (:attr:`HealthMonitor.intake_paused`), so that a full
  disk stops new work before it can fail half-way, and resumes it by itself;
* keeps the last reading for the retained MQTT status (:meth:`HealthMonitor.fields`) and
  writes it to ``state_dir/health.json``, where ``edge-agent status`` and ``/metrics`` read
  it (they run outside the worker, and must not read sysfs on every refresh).

Missing sensors are None in the reading, never an error; a limit whose reading is None is
neither crossed nor cleared.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import platform
from .profiles import HealthProfile

logger = logging.getLogger(__name__)

HEALTH_FILE = "health.json"
# How far past a limit a reading must come back before its warning clears.
TEMP_MARGIN_C = 3.0
SPACE_MARGIN = 0.05  # of the floor (MiB, percent), at least 1 %-point / 64 MiB
STALE_INTERVALS = 3  # a health file older than this many intervals is stale


@dataclass
class HealthReading:
    at: float
    soc_temp_c: float | None = None
    gpu_temp_c: float | None = None
    cpu_mhz: float | None = None
    cpu_max_mhz: float | None = None
    cpu_capped: bool | None = None
    """The CPU's ceiling (scaling_max_freq) is below its hardware maximum: a power mode or
    thermal management holds it down."""
    gpu_mhz: float | None = None
    gpu_max_mhz: float | None = None
    overcurrent_events: dict[str, int] | None = None
    """Jetson Orin over-current/under-voltage throttle events since boot (oc1, oc2, oc3)."""
    throttle_events: int | None = None
    """Over-current throttle events since the previous reading (None: no counters here)."""
    power_mode: str | None = None
    memory_available_mib: float | None = None
    state_free_mib: float | None = None
    state_free_percent: float | None = None
    watch_free_mib: float | None = None
    watch_free_percent: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float) and key != "at":
                out[key] = round(value, 1)
        return out


def read_health(
    state_dir: Path,
    watch_dir: Path,
    *,
    root: Path = platform.ROOT,
    previous: HealthReading | None = None,
    now: float | None = None,
) -> HealthReading:
    """One reading of everything. ``previous`` gives the throttle events since then."""
    zones = platform.thermal_zones(root)
    cpu = platform.cpu_clock(root)
    gpu = platform.gpu_clock(root)
    mode = platform.power_mode(root)
    state = platform.free_space(state_dir)
    watch = platform.free_space(watch_dir)
    events = platform.overcurrent_events(root)
    throttle = None
    if events is not None:
        before = previous.overcurrent_events if previous is not None else None
        throttle = sum(max(0, n - (before or {}).get(k, n)) for k, n in events.items())
    return HealthReading(
        at=time.time() if now is None else now,
        soc_temp_c=platform.soc_temperature(zones),
        gpu_temp_c=platform.gpu_temperature(zones),
        cpu_mhz=cpu.current_mhz if cpu else None,
        cpu_max_mhz=cpu.max_mhz if cpu else None,
        cpu_capped=cpu.capped if cpu else None,
        gpu_mhz=gpu.current_mhz if gpu else None,
        gpu_max_mhz=gpu.max_mhz if gpu else None,
        overcurrent_events=events,
        throttle_events=throttle,
        power_mode=None if mode is None else mode.describe(),
        memory_available_mib=platform.memory_available_mib(root),
        state_free_mib=state.free_mib if state else None,
        state_free_percent=state.free_percent if state else None,
        watch_free_mib=watch.free_mib if watch else None,
        watch_free_percent=watch.free_percent if watch else None,
    )


def _num(limit: float) -> str:
    """A limit as written in the profile: 1024, 5, 92.5."""
    return f"{limit:.0f}" if float(limit).is_integer() else f"{limit:g}"


def _below(value: float | None, floor: float, margin: float, active: bool) -> bool | None:
    """Is ``value`` below ``floor``? Once below, it stays so until above floor + margin.
    None when unknown (or the limit is off: floor 0)."""
    if value is None or floor <= 0:
        return None
    return value < floor + margin if active else value < floor


STATE_FLOOR = "health.min_state_free_mib"


def limits_crossed(
    reading: HealthReading, limits: HealthProfile, active: dict[str, str]
) -> dict[str, str]:
    """The limits the reading is past now, as {setting: warning}. ``active`` (the previous
    result) holds a warning until the reading is past its limit by the margin."""
    out: dict[str, str] = {}
    temp = reading.soc_temp_c
    key = "health.max_soc_temp_c"
    if temp is not None:
        hot = temp > limits.max_soc_temp_c - (TEMP_MARGIN_C if key in active else 0.0)
        if hot:
            out[key] = f"SoC at {temp:.1f} °C, above {key} ({_num(limits.max_soc_temp_c)})"

    def floor(key: str, value: float | None, limit: float, unit: str, what: str) -> None:
        margin = max(limit * SPACE_MARGIN, 1.0 if unit == "%" else 64.0)
        if _below(value, limit, margin, key in active):
            shown = f"{value:.0f} MiB" if unit == "MiB" else f"{value:.1f}%"
            out[key] = f"{what} has {shown} free, below {key} ({_num(limit)})"

    floor(STATE_FLOOR, reading.state_free_mib, limits.min_state_free_mib, "MiB", "state disk")
    floor(
        "health.min_state_free_percent",
        reading.state_free_percent,
        limits.min_state_free_percent,
        "%",
        "state disk",
    )
    floor(
        "health.min_watch_free_mib",
        reading.watch_free_mib,
        limits.min_watch_free_mib,
        "MiB",
        "watch disk",
    )
    floor(
        "health.min_watch_free_percent",
        reading.watch_free_percent,
        limits.min_watch_free_percent,
        "%",
        "watch disk",
    )
    memory = reading.memory_available_mib
    key = "health.min_available_memory_mib"
    margin = max(limits.min_available_memory_mib * SPACE_MARGIN, 64.0)
    if _below(memory, limits.min_available_memory_mib, margin, key in active):
        out[key] = (
            f"{memory:.0f} MiB memory available, below {key} ({limits.min_available_memory_mib})"
        )
    if reading.throttle_events:
        out["throttling"] = (
            f"over-current throttling: {reading.throttle_events} event(s) since the last "
            "reading (power supply or power mode)"
        )
    return out


@dataclass
class HealthState:
    """What the worker last found: the reading, the warnings, and whether intake is paused."""

    reading: HealthReading | None = None
    warnings: dict[str, str] = field(default_factory=dict)
    interval_seconds: float = 10.0

    @property
    def intake_paused(self) -> str | None:
        warning = self.warnings.get(STATE_FLOOR)
        return f"intake paused: {warning}" if warning is not None else None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = self.reading.as_dict() if self.reading is not None else {}
        out["warnings"] = list(self.warnings.values())
        out["intake_paused"] = self.intake_paused
        out["interval_seconds"] = self.interval_seconds
        return out


class HealthMonitor:
    """Reads the box's health on an interval; see the module docstring.

    ``notify`` is called with the reason when the intake pauses and with None when it
    resumes (the daemon sets systemd's ``STATUS=`` line from it)."""

    def __init__(
        self,
        limits: HealthProfile,
        state_dir: Path,
        watch_dir: Path,
        *,
        root: Path = platform.ROOT,
        notify: Callable[[str | None], object] | None = None,
    ) -> None:
        self.limits = limits
        self.state_dir = state_dir
        self.watch_dir = watch_dir
        self.root = root
        self.notify = notify
        self._lock = threading.Lock()
        self._state = HealthState(interval_seconds=limits.interval_seconds)
        self._failed_logged = False

    @property
    def state(self) -> HealthState:
        with self._lock:
            return self._state

    @property
    def intake_paused(self) -> str | None:
        """Why the intake must wait, or None (read by the intake loop: no sysfs here)."""
        return self.state.intake_paused

    def fields(self) -> dict[str, Any]:
        """The last reading and its warnings, for the retained status message."""
        return self.state.as_dict()

    def update(self) -> HealthState:
        """Read once, log what changed, keep and write the result."""
        before = self.state
        reading = read_health(
            self.state_dir, self.watch_dir, root=self.root, previous=before.reading
        )
        warnings = limits_crossed(reading, self.limits, before.warnings)
        state = HealthState(reading, warnings, self.limits.interval_seconds)
        for key, message in warnings.items():
            if key not in before.warnings:
                logger.warning("health: %s", message)
        for key, message in before.warnings.items():
            if key not in warnings:
                logger.info("health: cleared: %s", message)
        with self._lock:
            self._state = state
        paused, was_paused = state.intake_paused, before.intake_paused
        if paused and not was_paused:
            logger.error("%s; it resumes by itself when space is back", paused)
            if self.notify is not None:
                self.notify(paused)
        elif was_paused and not paused:
            logger.info("intake resumed: state disk has space again")
            if self.notify is not None:
                self.notify(None)
        write_health_file(self.state_dir / HEALTH_FILE, state)
        return state

    def run(self, stop: threading.Event) -> None:
        """The worker: a reading every interval until ``stop``. A failed reading is logged
        (once until one succeeds) and the next one tried; it never stops the thread."""
        while not stop.wait(self.limits.interval_seconds):
            try:
                self.update()
                self._failed_logged = False
            except Exception:
                if not self._failed_logged:
                    logger.exception("health reading failed; trying again every interval")
                    self._failed_logged = True


def write_health_file(path: Path, state: HealthState) -> None:
    """Atomically (a reader never sees half a file); a full disk or a read-only state_dir
    costs the file, not the reading."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(state.as_dict(), sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        logger.debug("could not write %s: %s", path, exc)
        tmp.unlink(missing_ok=True)


def read_health_file(path: Path, now: float | None = None) -> dict[str, Any] | None:
    """The daemon's last health state, with ``age_seconds`` and ``stale`` (older than a few
    intervals: the agent is not running); None when absent or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    now = time.time() if now is None else now
    at, interval = data.get("at"), data.get("interval_seconds")
    if isinstance(at, int | float) and isinstance(interval, int | float):
        data["age_seconds"] = round(max(0.0, now - at), 1)
        data["stale"] = now - at > STALE_INTERVALS * interval
    return data
