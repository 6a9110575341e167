"""Health benchmark: what one box-health reading costs, and what it adds to a status refresh.

    .venv/bin/python benchmarks/health.py [--rounds 7] [--per-round 200] [--quick]

1. **One reading** (``edge_agent.health.read_health``: thermal zones, soctherm_oc counters,
   cpufreq, devfreq, nvpmodel, /proc/meminfo, two statvfs calls) against this machine's
   root and against the fixture Orin Nano in ``tests/fixtures`` (the same file names and
   formats as the board; on this machine they are page-cache files, so the figure leaves
   out what a sysfs read costs the kernel drivers on a real Orin).
2. **Status refresh** (what the Publisher runs every ``mqtt.status_interval_seconds``: the
   daemon's ``Agent.status_fields`` over a real ``Store`` with ``--studies`` scored studies,
   then the JSON the status message carries), in three variants taking turns in one run:
   without health, with health as shipped (the health thread's cached reading), and with a
   reading taken on every refresh (the design the worker avoids). A real ``Agent`` (demo
   bundle, x86-cpu, never started) is built over the store, and only its ``health`` is
   swapped between the variants, so the code measured is the daemon's own.

Prints medians (µs) and the ratios, with the machine and the load average. Exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_agent.config import load_settings  # noqa: E402
from edge_agent.health import HealthMonitor, read_health  # noqa: E402
from edge_agent.profiles import resolve_profile  # noqa: E402
from edge_agent.service import Agent  # noqa: E402
from edge_agent.store import InstanceRecord, Message, Store  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "jetson-orin-nano"


def timed(fn: Callable[[], object], n: int) -> list[float]:
    """Microseconds per call, ``n`` calls one after the other."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e6)
    return out


def fill_store(store: Store, studies: int) -> None:
    """Scored studies as the daemon leaves them (one instance, a result, an acked outbox)."""
    for i in range(studies):
        uid = f"1.2.826.0.1.{i}"
        record = InstanceRecord(f"{uid}.1", uid, f"{uid}.9", "CR", "frontal")  # type: ignore[arg-type]
        store.add_instance(f"{uid}.dcm", 10, 1, record, now=100.0 + i)
    store.complete_quiet_studies(1.0, now=1e9)
    for i in range(studies):
        uid = f"1.2.826.0.1.{i}"
        study = store.study(uid)
        assert study is not None
        payload = json.dumps({"triage": "routine", "findings": []}).encode()
        store.commit_result(
            study,
            "routine",
            Message("result", f"p/study/{uid}", payload, f"alert-{i}"),
            {f"{uid}.1": ("scored", None)},
            [],
            1e9 + i,
        )


class NoHealth:
    def fields(self) -> dict[str, Any]:
        return {}


def status_payload(agent: Any) -> bytes:
    """As the Publisher builds the retained status message."""
    payload = {"state": "online", **agent.status_fields()}
    return json.dumps(payload, separators=(",", ":"), default=str).encode()


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="turns of each variant (7)")
    parser.add_argument("--per-round", type=int, default=200, help="calls a turn (200)")
    parser.add_argument("--studies", type=int, default=1000, help="scored studies (1000)")
    parser.add_argument("--workdir", type=Path, help="where the database lives (a temp folder)")
    parser.add_argument("--quick", action="store_true", help="a few seconds: 2 x 20, 50 studies")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.per_round, args.studies = 2, 20, 50
    print(f"machine: {machine()}, Python {sys.version.split()[0]}; load average {load()}")

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        state, watch = work / "state", work / "watch"
        state.mkdir()
        watch.mkdir()

        print("\nOne health reading (µs, median of all calls; p90 in brackets)")
        print("| root | median | p90 | soc °C | memory MiB |")
        print("| --- | --- | --- | --- | --- |")
        for label, root in (("this machine (/)", Path("/")), ("fixture Orin Nano", FIXTURE)):
            samples: list[float] = []
            for _ in range(args.rounds):
                samples += timed(lambda r=root: read_health(state, watch, root=r), args.per_round)
            one = read_health(state, watch, root=root)
            p90 = statistics.quantiles(samples, n=10)[-1]
            soc = "-" if one.soc_temp_c is None else f"{one.soc_temp_c:.1f}"
            mem = "-" if one.memory_available_mib is None else f"{one.memory_available_mib:.0f}"
            print(f"| {label} | {statistics.median(samples):.0f} | {p90:.0f} | {soc} | {mem} |")

        agent = Agent(
            load_settings(
                watch_dir=watch, state_dir=state, profile="x86-cpu", site="bench", device_id="box"
            )
        )
        store = agent.store
        try:
            fill_store(store, args.studies)
            profile, _ = resolve_profile("jetson-orin-nano")
            monitor = HealthMonitor(profile.health, state, watch, root=FIXTURE)
            monitor.update()

            class EveryTime:
                def fields(self) -> dict[str, Any]:
                    monitor.update()
                    return monitor.fields()

            variants: dict[str, Any] = {
                "without health": NoHealth(),
                "with health (shipped)": monitor,
                "reading (and health.json) on every refresh": EveryTime(),
            }

            def refresh(health: Any) -> bytes:
                agent.health = health
                return status_payload(agent)

            times: dict[str, list[float]] = {name: [] for name in variants}
            sizes = {name: len(refresh(health)) for name, health in variants.items()}
            for _ in range(args.rounds):  # taking turns: drift in the machine hits all three
                for name, health in variants.items():
                    times[name] += timed(lambda h=health: refresh(h), args.per_round)
        finally:
            store.close()

    print(f"\nStatus refresh over {args.studies} scored studies (µs, median; payload bytes)")
    print("| variant | median | p90 | payload | ratio to without |")
    print("| --- | --- | --- | --- | --- |")
    reference = statistics.median(times["without health"])
    for name, samples in times.items():
        median = statistics.median(samples)
        p90 = statistics.quantiles(samples, n=10)[-1]
        print(f"| {name} | {median:.0f} | {p90:.0f} | {sizes[name]} | {median / reference:.2f}x |")
    shipped = statistics.median(times["with health (shipped)"]) / reference
    every = statistics.median(times["reading (and health.json) on every refresh"]) / reference
    print(
        f"\nhealth costs {shipped:.2f}x the status refresh as shipped, "
        f"{every:.2f}x if read each time"
    )
    print(f"load average at end {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
