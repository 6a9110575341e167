"""Prometheus metrics for fleets that scrape (off by default: ``metrics.port = 0``).

Every scrape reads the state database read-only (:func:`edge_agent.state.report.read`: the
figures of ``edge-agent status`` and ``P/status``; :func:`edge_agent.state.tallies.recent`:
the daily tallies status shows), so the figures are what is durably true, survive restarts,
and need no bookkeeping in the daemon's threads. The process collector adds memory and CPU.
Labels carry levels, states, finding codes and windows only: no UIDs, no patient data.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .errors import ResourceMissing
from .health import HEALTH_FILE, read_health_file
from .histogram import REPORT_BINS, coarsen, upper_edges
from .results import TRIAGE_LEVELS
from .state import report, tallies
from .state.report import Figures
from .state.schema import Layout
from .state.tallies import Recent

PREFIX = "edge_triage"


def _read(database: Path) -> tuple[Figures, Recent | None]:
    db = report.open_read_only(database)
    try:
        layout = Layout.of(db)
        figures = report.read(db, layout)
        recent = tallies.recent(db, time.time()) if tallies.has_tallies(layout) else None
        return figures, recent
    finally:
        db.close()


def _name(counter: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", counter).strip("_").lower()


class StateCollector(Collector):
    """Gauges and counters from the state database, read at scrape time."""

    def __init__(self, database: Path, info: dict[str, str] | None = None) -> None:
        self.database = database
        self.info = dict(info or {})

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            f"{PREFIX}_state_readable", "1 when the state database could be read at this scrape"
        )
        try:
            figures, recent = _read(self.database)
        except (ResourceMissing, sqlite3.Error, OSError):
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        if self.info:
            info = GaugeMetricFamily(
                f"{PREFIX}_model_info", "The loaded model (value 1)", labels=sorted(self.info)
            )
            info.add_metric([self.info[k] for k in sorted(self.info)], 1.0)
            yield info
        studies = GaugeMetricFamily(
            f"{PREFIX}_studies", "Studies in the state database by state", labels=["state"]
        )
        for state in ("open", "complete", "scored"):
            studies.add_metric([state], float(figures.studies.get(state, 0)))
        yield studies
        by_level = CounterMetricFamily(
            f"{PREFIX}_results",
            "Results committed, by triage level (a narrative revision is not counted again)",
            labels=["triage"],
        )
        for level in TRIAGE_LEVELS:
            by_level.add_metric([level], float(figures.results_by_level.get(level, 0)))
        yield by_level
        yield _gauge("outbox_messages", "Messages waiting for the broker's PUBACK", figures.outbox)
        yield _gauge("outbox_urgent_messages", "Urgent results among them", figures.outbox_urgent)
        yield _gauge(
            "outbox_oldest_age_seconds",
            "Age of the oldest waiting message (0 when none)",
            figures.outbox_oldest_seconds(time.time()) or 0.0,
        )
        yield _gauge(
            "outbox_set_aside_messages",
            "Messages set aside after the broker refused them or they broke the connection "
            "(kept in the outbox, retried later)",
            figures.outbox_set_aside,
        )
        if figures.pacs_outbox is not None:
            yield _gauge(
                "pacs_outbox_messages",
                "Results waiting for the PACS (DICOM SR)",
                figures.pacs_outbox,
            )
            yield _gauge(
                "pacs_outbox_failing_messages",
                "Among them, those with at least one failed attempt",
                figures.pacs_failing,
            )
            yield _gauge(
                "pacs_outbox_oldest_age_seconds",
                "Age of the oldest result waiting for the PACS (0 when none)",
                0.0
                if figures.pacs_oldest_at is None
                else max(0.0, time.time() - figures.pacs_oldest_at),
            )
            if figures.pacs_last_error:
                error = GaugeMetricFamily(
                    f"{PREFIX}_pacs_last_error_info",
                    "The PACS destination's latest failure (value 1)",
                    labels=["reason"],
                )
                error.add_metric([figures.pacs_last_error[:200]], 1.0)
                yield error
        yield _gauge(
            "alerts_unacknowledged",
            "Urgent results no dashboard has acknowledged yet",
            figures.alerts_waiting,
        )
        rejected = CounterMetricFamily(f"{PREFIX}_rejected_files", "Input files rejected")
        rejected.add_metric([], float(figures.files.get("rejected", 0)))
        yield rejected
        yield from _health_metrics(
            read_health_file(self.database.parent / HEALTH_FILE, time.time())
        )
        for key, value in sorted(figures.counters.items()):
            counter = CounterMetricFamily(f"{PREFIX}_{_name(key)}", f"Agent counter '{key}'")
            counter.add_metric([], float(value))
            yield counter
        if recent is not None:
            yield from _tally_metrics(recent)


WINDOWS = {"today": "today", "7d": "week"}
"""The ``window`` label's values and the :class:`Recent` field each reads."""


def _tally_metrics(recent: Recent) -> Iterator[Metric]:
    """The daily tallies (each study once, at its first result; UTC days): the last 7
    days' score distribution per finding, studies by level, shares over the thresholds."""
    scores = GaugeHistogramMetricFamily(
        f"{PREFIX}_score",
        "Study scores per finding over the last 7 UTC days (today included), of the model "
        "of the last result; le is a bin's upper edge, a score on it included; goes down as "
        "days leave the window",
        labels=["finding"],
    )
    edges = [*(f"{e:g}" for e in upper_edges(REPORT_BINS)[:-1]), "+Inf"]  # scores <= 1
    for code, tally in recent.week.items():
        counts = coarsen(tally.bins, REPORT_BINS)
        cumulative = [float(sum(counts[: i + 1])) for i in range(REPORT_BINS)]
        scores.add_metric([code], list(zip(edges, cumulative, strict=True)), tally.score_sum)
    yield scores
    days = list(recent.levels)
    for suffix, span, when in (
        ("today", days[-1:], "today (UTC)"),
        ("last_7_days", days, "in the last 7 UTC days (today included)"),
    ):
        studies = GaugeMetricFamily(
            f"{PREFIX}_studies_{suffix}",
            f"Studies whose first result was committed {when}, by triage level",
            labels=["triage"],
        )
        for level, n in recent.level_totals(span).items():
            studies.add_metric([level], float(n))
        yield studies
    for name, what, attr in (
        ("over_review_share", "at or above its review threshold (flagged)", "flagged"),
        ("over_urgent_share", "at or above its urgent threshold", "urgent"),
    ):
        share = GaugeMetricFamily(
            f"{PREFIX}_{name}",
            f"Share of the studies scored for a finding whose score was {what}, of the model "
            "of the last result; window today or 7d (UTC days); absent without studies",
            labels=["finding", "window"],
        )
        for window, field in WINDOWS.items():
            for code, tally in getattr(recent, field).items():
                if tally.studies:
                    share.add_metric([code, window], getattr(tally, attr) / tally.studies)
        yield share


# Health readings (state_dir/health.json, written by the agent's health thread) as gauges:
# (key in the file, metric name, help). A reading the box does not have is left out.
_HEALTH_GAUGES = [
    ("soc_temp_c", "soc_temperature_celsius", "SoC temperature (Jetson tj-thermal)"),
    ("gpu_temp_c", "gpu_temperature_celsius", "GPU temperature"),
    ("cpu_mhz", "cpu_clock_mhz", "Clock of the fastest CPU cluster"),
    ("cpu_max_mhz", "cpu_clock_max_mhz", "Its hardware maximum"),
    ("gpu_mhz", "gpu_clock_mhz", "GPU clock (Jetson devfreq)"),
    ("gpu_max_mhz", "gpu_clock_max_mhz", "Its maximum"),
    ("memory_available_mib", "memory_available_mib", "MemAvailable, MiB"),
    ("state_free_mib", "state_disk_free_mib", "Free MiB on state_dir's file system"),
    ("watch_free_mib", "watch_disk_free_mib", "Free MiB on watch_dir's file system"),
    ("age_seconds", "health_reading_age_seconds", "Age of the last health reading"),
]


def _health_metrics(health: dict[str, Any] | None) -> Iterator[Metric]:
    if health is None:
        return
    for key, name, documentation in _HEALTH_GAUGES:
        value = health.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            yield _gauge(name, documentation, value)
    events = health.get("overcurrent_events")
    if isinstance(events, dict):
        counter = CounterMetricFamily(
            f"{PREFIX}_overcurrent_events",
            "Jetson over-current/under-voltage throttle events since boot (soctherm_oc)",
            labels=["event"],
        )
        for event, count in sorted(events.items()):
            if isinstance(count, int):
                counter.add_metric([str(event)], float(count))
        yield counter
    warnings = health.get("warnings")
    yield _gauge(
        "health_warnings",
        "Health limits crossed now (profile [health])",
        len(warnings) if isinstance(warnings, list) else 0,
    )
    yield _gauge(
        "intake_paused",
        "1 while the intake waits for space on the state disk",
        1 if health.get("intake_paused") else 0,
    )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(f"{PREFIX}_{name}", documentation)
    g.add_metric([], float(value))
    return g


def registry_for(database: Path, info: dict[str, str] | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(database, info))
    ProcessCollector(registry=registry)
    return registry


def start_metrics_server(
    database: Path, port: int, address: str, info: dict[str, str] | None = None
) -> Any:
    """Serve ``/metrics`` on ``address:port`` in a daemon thread; returns the server (call
    ``shutdown()`` to stop it)."""
    server, _thread = start_http_server(port, addr=address, registry=registry_for(database, info))
    return server
