"""Delivery benchmark: a scored study's result from the durable outbox to the broker's PUBACK.

    .venv/bin/python benchmarks/delivery.py [--duration 30] [--rates 1,20] [--quick]

Everything on the road after inference is real: a private Mosquitto on a loopback port
(``edge_agent.devbroker``, as the demo and the tests start it), the daemon's ``Store`` on a
SQLite file on disk (WAL, ``synchronous=FULL``: an fsync per commit) and the daemon's
``Publisher`` (paho-mqtt, MQTT v5, QoS 1). Each study is prepared as the intake leaves it
(two CR instances, PA and lateral, recorded with ``Store.add_instance``, the study marked
complete); a realistic ``StudyResult`` (the demo bundle's findings and model, scores drawn
so that 10% of the studies are urgent and 20% review, triage from ``triage.triage_level``)
stands in for the scorer's, so inference is excluded by construction. The clock starts when
the study is due and runs what ``Agent._score_one`` runs once the scorer returns: the
result's JSON, ``Store.commit_result`` (result + outbox row + study and instance states, and
an alert row for an urgent result, in one transaction) and ``Publisher.wake()``. It stops
when the Publisher, on paho's network thread, handles the PUBACK and calls
``outbox_delete``: the Publisher is given the real store behind a thin ``Outbox`` (the
protocol ``edge_agent.mqtt`` already defines) that notes the time of each call and changes nothing
else. "to PUBACK" is the moment ``outbox_delete`` is entered, "to deleted" the moment the
row's deletion is committed (another fsync).

1. **Latency** at each rate (default 1 and 20 studies/s, 30 s each): arrivals are open-loop,
   Poisson, drawn in advance (a study is due at its time whether or not the previous one is
   delivered); one committing thread, as the daemon has one scoring thread, and latency is
   counted from the due time, so a late commit counts against us. A last run at the highest
   rate with ``synchronous=NORMAL`` (the same store, no fsync per commit) is the baseline.
2. **Outbox throughput**, no broker: results committed back to back with ``commit_result``,
   then their rows deleted with ``outbox_delete`` (what a PUBACK costs the store), with fsync
   (``synchronous=FULL``) and, taking turns in the same run, with ``synchronous=NORMAL``.
3. **End to end at the maximum rate**: studies committed back to back while the Publisher
   drains them through the broker; delivered results per second, FULL and NORMAL.

Prints tables, the goal (p99 to PUBACK under 50 ms at 20 studies/s) and the load average.
Exits 0 whatever the figures; 1 only when a committed result was not acknowledged within
``--drain-timeout`` (a lost result is a bug, not a figure).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.bundle import Bundle, load_bundle
from edge_agent.config import MqttSettings, Settings
from edge_agent.devbroker import Mosquitto
from edge_agent.mqtt import Publisher
from edge_agent.results import (
    InstanceCounts,
    ModelRef,
    StudyResult,
    Timing,
    alert_id,
    iso,
)
from edge_agent.service import demo_bundle_path
from edge_agent.store import InstanceRecord, Message, OutboxMessage, Store, StudyRow, View
from edge_agent.triage import finding_result, triage_level

Sync = Literal["FULL", "NORMAL"]
GOAL_RATE = 20.0
GOAL_P99_MS = 50.0
SITE = "bench"
TRIAGE_MIX = {"urgent": 0.1, "review": 0.2}  # the rest routine


# -- the store, with fsync (the daemon's) and without (the baseline) ------------------------


class NormalSyncStore(Store):
    """The daemon's store with ``synchronous=NORMAL`` on every connection: in WAL mode a
    commit is then written but not fsynced (only checkpoints are). The baseline only."""

    def _conn(self) -> Any:
        fresh = getattr(self._local, "conn", None) is None
        conn = super()._conn()
        if fresh:
            conn.execute("PRAGMA synchronous=NORMAL")
        return conn


def open_store(path: Path, sync: Sync) -> Store:
    store = NormalSyncStore(path) if sync == "NORMAL" else Store(path)
    level = store._conn().execute("PRAGMA synchronous").fetchone()[0]
    assert level == {"FULL": 2, "NORMAL": 1}[sync], f"synchronous={level}, wanted {sync}"
    return store


# -- studies and results -------------------------------------------------------------------


@dataclass
class Study:
    row: StudyRow
    instance_states: dict[str, tuple[str, str | None]]
    scores: list[float]
    inference_ms: float


class Results:
    """Results as the scorer builds them, from the demo bundle's findings and model."""

    def __init__(self, bundle: Bundle, topic_base: str, seed: int) -> None:
        spec = bundle.manifest
        self.sha256 = bundle.sha256
        self.findings = [f for f in spec.findings if "CR" in f.modalities]
        self.model = ModelRef(
            name=spec.model.name,
            version=spec.model.version,
            sha256=bundle.sha256,
            precision=spec.precision,
            provider="CPUExecutionProvider",
            demo=spec.model.demo,
        )
        self.topic_base = topic_base
        self.rng = np.random.default_rng(seed)
        self.payload_bytes = 0
        self.triage: Counter[str] = Counter()

    def prepare(self, store: Store, n: int) -> list[Study]:
        """``n`` complete studies of two CR instances each, as the intake leaves them."""
        now = time.time()
        made: list[tuple[str, dict[str, tuple[str, str | None]]]] = []
        for _ in range(n):
            uid = f"2.25.{uuid.uuid4().int}"
            series = f"2.25.{uuid.uuid4().int}"
            states: dict[str, tuple[str, str | None]] = {}
            views: tuple[tuple[View, str], ...] = (("frontal", "scored"), ("lateral", "unused"))
            for view, state in views:
                sop = f"2.25.{uuid.uuid4().int}"
                record = InstanceRecord(sop, uid, series, "CR", view)
                store.add_instance(f"{uid}/{sop}.dcm", 9_000_000, 0, record, now)
                states[sop] = (state, None)
            made.append((uid, states))
        complete = set(store.complete_quiet_studies(0.0, time.time()))
        studies = []
        for uid, states in made:
            assert uid in complete
            row = store.study(uid)
            assert row is not None
            scores = self.scores()
            studies.append(Study(row, states, scores, float(self.rng.uniform(20, 2000))))
        return studies

    def scores(self) -> list[float]:
        """Scores for a study drawn to be urgent, review or routine in the shares set by
        :data:`TRIAGE_MIX`: one finding above its threshold, the others below theirs."""
        rng = self.rng
        below = [float(rng.uniform(0, f.review_threshold)) for f in self.findings]
        draw = rng.random()
        urgent = [i for i, f in enumerate(self.findings) if f.urgent_threshold is not None]
        if draw < TRIAGE_MIX["urgent"] and urgent:
            i = int(rng.choice(urgent))
            below[i] = float(rng.uniform(self.findings[i].urgent_threshold or 1.0, 1.0))
        elif draw < TRIAGE_MIX["urgent"] + TRIAGE_MIX["review"]:
            i = int(rng.integers(len(self.findings)))
            f = self.findings[i]
            below[i] = float(rng.uniform(f.review_threshold, f.urgent_threshold or 1.0))
        return below

    def build(self, study: Study) -> StudyResult:
        """What ``Scorer.score`` returns after inference."""
        row = study.row
        findings = [finding_result(f, s) for f, s in zip(self.findings, study.scores, strict=True)]
        now = time.time()
        return StudyResult(
            alert_id=alert_id(row.study_instance_uid, row.revision, self.sha256),
            revision=row.revision,
            study_instance_uid=row.study_instance_uid,
            accession_number=None,
            modality=row.modality,
            triage=triage_level(findings),
            reason=None,
            findings=findings,
            model=self.model,
            instances=InstanceCounts(received=2, scored=1, rejected=0),
            timing=Timing(
                first_instance_at=iso(row.first_instance_at),
                complete_at=iso(row.complete_at or now),
                scored_at=iso(now),
                published_at=iso(now),
                inference_ms=round(study.inference_ms, 1),
            ),
        )

    def commit(self, store: Store, study: Study, result: StudyResult) -> None:
        """``Agent._score_one`` after ``Scorer.score``: message, transaction (no rejects)."""
        uid = study.row.study_instance_uid
        message = Message(
            "result", f"{self.topic_base}/study/{uid}", result.to_json_bytes(), result.alert_id
        )
        self.payload_bytes = len(message.payload)
        self.triage[result.triage] += 1
        if not store.commit_result(
            study.row, result.triage, message, study.instance_states, [], time.time()
        ):
            raise RuntimeError(f"study {uid} was not committed (changed meanwhile?)")


# -- timing the publisher from the outside ------------------------------------------------


@dataclass
class Trace:
    due: float
    entered: float = math.nan  # commit path entered
    committed: float = math.nan  # commit_result returned, publisher woken
    fetched: float = math.nan  # the drain thread read the row (just before paho's publish)
    puback: float = math.nan  # the Publisher handled the PUBACK: outbox_delete entered
    deleted: float = math.nan  # the row's deletion committed


class TimedOutbox:
    """The real store as the Publisher's ``Outbox``, noting when each call happens.

    The Publisher calls ``outbox_pending`` on its drain thread before publishing and
    ``outbox_delete`` on paho's network thread once the broker's PUBACK is handled; this
    class forwards both to the store unchanged and records the time against the topic the
    row was published on.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cond = threading.Condition()
        self._by_topic: dict[str, Trace] = {}
        self._by_id: dict[int, Trace] = {}
        self.delivered = 0

    def expect(self, topic: str, trace: Trace) -> None:
        with self._cond:
            self._by_topic[topic] = trace

    def outbox_pending(self, limit: int, exclude: Collection[int]) -> list[OutboxMessage]:
        rows = self.store.outbox_pending(limit, exclude)
        now = time.monotonic()
        with self._cond:
            for row in rows:
                trace = self._by_topic.get(row.topic)
                if trace is not None and row.id not in self._by_id:
                    self._by_id[row.id] = trace
                    trace.fetched = now
        return rows

    def outbox_delete(self, message_id: int) -> None:
        entered = time.monotonic()
        self.store.outbox_delete(message_id)
        done = time.monotonic()
        with self._cond:
            trace = self._by_id.get(message_id)
            if trace is not None and math.isnan(trace.deleted):
                trace.puback, trace.deleted = entered, done
                self.delivered += 1
                self._cond.notify_all()

    def outbox_depth(self) -> int:
        return self.store.outbox_depth()

    def outbox_set_aside(self, message_id: int, reason: str) -> bool:
        return self.store.outbox_set_aside(message_id, reason)

    def outbox_set_aside_messages(self) -> list[OutboxMessage]:
        return self.store.outbox_set_aside_messages()

    def wait_delivered(self, count: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.delivered >= count, timeout)


@contextmanager
def publishing(
    broker: Mosquitto, store: Store, results: Results, device_id: str
) -> Iterator[tuple[Publisher, TimedOutbox]]:
    """A started Publisher on ``broker`` draining ``store``; results go to its topics."""
    mqtt = MqttSettings(host=broker.host, port=broker.port)
    settings = Settings(site=SITE, device_id=device_id, mqtt=mqtt)
    results.topic_base = settings.topic_base
    outbox = TimedOutbox(store)
    publisher = Publisher(settings, outbox, status=store.counters)  # the daemon's fields
    publisher.start()
    try:
        if not publisher.wait_connected(10.0):
            raise RuntimeError(f"the publisher did not connect to {broker}")
        yield publisher, outbox
    finally:
        publisher.stop(timeout=5.0)


# -- the runs ------------------------------------------------------------------------------


def arrivals(rate: float, duration: float, rng: np.random.Generator) -> list[float]:
    """Open-loop Poisson arrival offsets (seconds) within ``duration``; at least one."""
    offsets: list[float] = []
    t = 0.0
    while True:
        t += float(rng.exponential(1.0 / rate))
        if t >= duration:
            return offsets or [duration / 2]
        offsets.append(t)


def fsync_ms(folder: Path, count: int) -> float:
    """Median cost of appending 1 KiB to a file and fsyncing it: the disk's own figure."""
    path = folder / "fsync-probe"
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(count):
            start = time.perf_counter()
            os.write(fd, b"x" * 1024)
            os.fsync(fd)
            times.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()
    return 1000 * float(np.median(times))


def drive(
    results: Results,
    store: Store,
    publisher: Publisher,
    outbox: TimedOutbox,
    studies: Sequence[Study],
    offsets: Sequence[float] | None,
    drain_timeout: float,
) -> dict[str, Any]:
    """Commit each study at its offset (``None``: back to back) on this thread, as the
    scoring thread does, and wait for every PUBACK."""
    traces: list[Trace] = []
    before = outbox.delivered
    start = time.monotonic() + 0.05
    for i, study in enumerate(studies):
        result = results.build(study)  # the scorer's work, before the clock starts
        due = start + offsets[i] if offsets is not None else time.monotonic()
        trace = Trace(due)
        outbox.expect(f"{results.topic_base}/study/{study.row.study_instance_uid}", trace)
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        trace.entered = time.monotonic()
        results.commit(store, study, result)
        publisher.wake()
        trace.committed = time.monotonic()
        traces.append(trace)
    committed_at = time.monotonic()
    complete = outbox.wait_delivered(before + len(studies), drain_timeout)
    end = max((t.deleted for t in traces if not math.isnan(t.deleted)), default=math.nan)
    return {
        "traces": traces,
        "complete": complete,
        "seconds": end - traces[0].entered,
        "commit_seconds": committed_at - traces[0].entered,
    }


def summarise(traces: Sequence[Trace]) -> dict[str, float]:
    def ms(values: list[float]) -> np.ndarray:
        return np.array(values) * 1000.0

    done = [t for t in traces if not math.isnan(t.deleted)]
    puback = ms([t.puback - t.due for t in done])
    deleted = ms([t.deleted - t.due for t in done])
    out = {"n": float(len(traces)), "lost": float(len(traces) - len(done))}
    for name, array in (("puback", puback), ("deleted", deleted)):
        for q in (50, 95, 99):
            out[f"{name}_p{q}"] = float(np.percentile(array, q)) if len(array) else math.nan
        out[f"{name}_max"] = float(array.max()) if len(array) else math.nan
    stages = {
        "late": [t.entered - t.due for t in done],
        "commit": [t.committed - t.entered for t in done],
        "to_fetch": [t.fetched - t.committed for t in done],
        "to_puback": [t.puback - t.fetched for t in done],
        "delete": [t.deleted - t.puback for t in done],
    }
    for name, values in stages.items():
        out[f"{name}_p50"] = float(np.median(ms(values))) if values else math.nan
    out["late_max"] = float(ms(stages["late"]).max()) if done else math.nan
    return out


def latency_run(
    broker: Mosquitto,
    db: Path,
    sync: Sync,
    rate: float,
    duration: float,
    results: Results,
    rng: np.random.Generator,
    drain_timeout: float,
    label: str,
) -> dict[str, Any]:
    offsets = arrivals(rate, duration, rng)
    store = open_store(db, sync)
    try:
        warm = results.prepare(store, 5)
        studies = results.prepare(store, len(offsets))
        with publishing(broker, store, results, label) as (publisher, outbox):
            # warm-up outside the figures: statements compiled, paho's first publishes
            drive(results, store, publisher, outbox, warm, [0.02 * i for i in range(5)], 10.0)
            run = drive(results, store, publisher, outbox, studies, offsets, drain_timeout)
        depth = store.outbox_depth()
    finally:
        store.close()
    return {
        "sync": sync,
        "rate": rate,
        "duration": duration,
        **summarise(run["traces"]),
        "achieved": len(offsets) / duration,
        "depth": depth,
    }


def store_throughput(
    workdir: Path, results: Results, per_round: int, rounds: int
) -> dict[Sync, dict[str, float]]:
    """Commit, then delete, ``per_round`` results per round; FULL and NORMAL take turns."""
    syncs: tuple[Sync, ...] = ("FULL", "NORMAL")
    stores = {sync: open_store(workdir / f"outbox-{sync.lower()}.sqlite3", sync) for sync in syncs}
    times: dict[Sync, dict[str, list[float]]] = {
        sync: {"commit": [], "delete": []} for sync in stores
    }
    try:
        for _ in range(rounds):
            for sync, store in stores.items():
                studies = results.prepare(store, per_round)
                built = [results.build(s) for s in studies]
                start = time.perf_counter()
                for study, result in zip(studies, built, strict=True):
                    results.commit(store, study, result)
                committed = time.perf_counter()
                rows = store.outbox_pending(per_round, ())
                assert len(rows) == per_round
                mid = time.perf_counter()
                for row in rows:
                    store.outbox_delete(row.id)
                deleted = time.perf_counter()
                times[sync]["commit"].append(committed - start)
                times[sync]["delete"].append(deleted - mid)
                assert store.outbox_depth() == 0
    finally:
        for store in stores.values():
            store.close()
    out: dict[Sync, dict[str, float]] = {}
    for sync, t in times.items():
        n = per_round * rounds
        out[sync] = {
            "n": n,
            "commit_per_s": n / sum(t["commit"]),
            "commit_ms": 1000 * sum(t["commit"]) / n,
            "delete_ms": 1000 * sum(t["delete"]) / n,
            "cycle_per_s": n / (sum(t["commit"]) + sum(t["delete"])),
        }
    return out


def max_rate_run(
    broker: Mosquitto, db: Path, sync: Sync, n: int, results: Results, drain_timeout: float
) -> dict[str, Any]:
    store = open_store(db, sync)
    try:
        warm = results.prepare(store, 5)
        studies = results.prepare(store, n)
        with publishing(broker, store, results, f"max-{sync.lower()}") as (publisher, outbox):
            drive(results, store, publisher, outbox, warm, [0.02 * i for i in range(5)], 10.0)
            run = drive(results, store, publisher, outbox, studies, None, drain_timeout)
        depth = store.outbox_depth()
    finally:
        store.close()
    summary = summarise(run["traces"])
    return {
        "sync": sync,
        **summary,
        "committed_per_s": n / run["commit_seconds"],
        "delivered_per_s": (n - summary["lost"]) / run["seconds"],
        "depth": depth,
    }


# -- reporting -----------------------------------------------------------------------------


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model})"


def filesystem(path: Path) -> str:
    """The mount and filesystem type holding ``path`` (fsync on tmpfs would cost nothing)."""
    best, kind = "/", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                _, mount, fstype, *_ = line.split()
                if str(path).startswith(mount.rstrip("/") + "/") and len(mount) >= len(best):
                    best, kind = mount, fstype
    except OSError:
        pass
    return f"{kind} on {best}"


def mosquitto_version(binary: str) -> str:
    out = subprocess.run([binary, "-h"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0].strip() if out else binary


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1,20", help="studies per second (1,20)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per rate (30)")
    parser.add_argument("--max-rate-studies", type=int, default=1000, help="(1000)")
    parser.add_argument("--store-rounds", type=int, default=5, help="FULL/NORMAL turns (5)")
    parser.add_argument("--store-per-round", type=int, default=200, help="results a turn (200)")
    parser.add_argument("--drain-timeout", type=float, default=60.0, help="seconds (60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="where the database lives (a temp folder)")
    parser.add_argument(
        "--quick", action="store_true", help="a few seconds: 1.5 s per rate, small counts"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.max_rate_studies = 1.5, 100
        args.store_rounds, args.store_per_round = 2, 20
    rates = [float(r) for r in args.rates.split(",")]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    started = time.monotonic()
    rng = np.random.default_rng(args.seed)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    print(f"$ {command}")
    print(f"{machine()}, Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}")
    print(f"load average at start {load()} (1/5/15 min)")
    bundle = load_bundle(demo_bundle_path())

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="delivery-") as tmp:
        work = Path(tmp)
        disk = fsync_ms(work, 20 if args.quick else 200)
        print(
            f"state databases in {work} ({filesystem(work.resolve())}); "
            f"1 KiB write + fsync there: {disk:.2f} ms (median)"
        )
        broker = Mosquitto(work / "mosquitto")
        with broker:
            print(f"{mosquitto_version(broker.binary)} on {broker.host}:{broker.port}\n")
            results = Results(bundle, f"edge-triage/v1/{SITE}/-", args.seed)
            latency = []
            plan: list[tuple[Sync, float]] = [("FULL", r) for r in rates]
            plan.append(("NORMAL", max(rates)))
            for sync, rate in plan:
                label = f"r{rate:g}-{sync.lower()}".replace(".", "_")
                latency.append(
                    latency_run(
                        broker,
                        work / f"{label}.sqlite3",
                        sync,
                        rate,
                        args.duration,
                        results,
                        rng,
                        args.drain_timeout,
                        label,
                    )
                )
                print(f"  latency {sync} at {rate:g}/s done; load {load()}", file=sys.stderr)
            throughput = store_throughput(work, results, args.store_per_round, args.store_rounds)
            print(f"  outbox throughput done; load {load()}", file=sys.stderr)
            maxed = []
            for sync in ("FULL", "NORMAL"):
                maxed.append(
                    max_rate_run(
                        broker,
                        work / f"max-{sync.lower()}.sqlite3",
                        sync,
                        args.max_rate_studies,
                        results,
                        args.drain_timeout,
                    )
                )
                print(f"  max rate {sync} done; load {load()}", file=sys.stderr)

    print(
        f"payload {results.payload_bytes} bytes, QoS 1; latency counted from the due time of "
        "open-loop Poisson arrivals"
    )
    mix = ", ".join(f"{n} {level}" for level, n in results.triage.most_common())
    print(f"results committed: {mix} (an urgent one also opens an alert row)")
    print("\nLatency, study complete (scored) → PUBACK handled / outbox row deleted, ms:\n")
    print(
        "| synchronous | rate /s | studies | p50 | p95 | p99 | max | p99 to deleted "
        "| max to deleted | lost |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in latency:
        print(
            f"| {r['sync']} | {r['rate']:g} | {r['n']:.0f} | {r['puback_p50']:.1f} "
            f"| {r['puback_p95']:.1f} | {r['puback_p99']:.1f} | {r['puback_max']:.1f} "
            f"| {r['deleted_p99']:.1f} | {r['deleted_max']:.1f} | {r['lost']:.0f} |"
        )
    print("\nWhere the time goes (medians, ms):\n")
    print(
        "| synchronous | rate /s | commit late | commit_result + wake | → row read by drain "
        "| → PUBACK handled | outbox_delete |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in latency:
        print(
            f"| {r['sync']} | {r['rate']:g} | {r['late_p50']:.2f} (max {r['late_max']:.2f}) "
            f"| {r['commit_p50']:.2f} | {r['to_fetch_p50']:.2f} | {r['to_puback_p50']:.2f} "
            f"| {r['delete_p50']:.2f} |"
        )
    full, normal = throughput["FULL"], throughput["NORMAL"]
    print(
        f"\nOutbox throughput, no broker ({full['n']:.0f} results each, "
        f"{args.store_rounds} turns taken in turn):\n"
    )
    print(
        "| synchronous | commit_result /s | ms per commit | ms per outbox_delete "
        "| results /s, commit + delete |"
    )
    print("| --- | --- | --- | --- | --- |")
    for sync, t in throughput.items():
        print(
            f"| {sync} | {t['commit_per_s']:.0f} | {t['commit_ms']:.2f} | {t['delete_ms']:.2f} "
            f"| {t['cycle_per_s']:.0f} |"
        )
    print(
        f"fsync costs {normal['cycle_per_s'] / full['cycle_per_s']:.1f}x in outbox "
        f"throughput (NORMAL / FULL)"
    )
    print(f"\nEnd to end at the maximum rate ({args.max_rate_studies} studies back to back):\n")
    print(
        "| synchronous | committed /s | delivered (PUBACK + delete) /s | p50 ms | p99 ms "
        "| max ms | lost |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in maxed:
        print(
            f"| {r['sync']} | {r['committed_per_s']:.0f} | {r['delivered_per_s']:.0f} "
            f"| {r['puback_p50']:.0f} | {r['puback_p99']:.0f} | {r['puback_max']:.0f} "
            f"| {r['lost']:.0f} |"
        )
    print(
        f"fsync costs {maxed[1]['delivered_per_s'] / maxed[0]['delivered_per_s']:.1f}x in "
        "delivered results per second (NORMAL / FULL)"
    )

    goal = [r for r in latency if r["sync"] == "FULL" and r["rate"] == GOAL_RATE]
    if goal:
        g = goal[0]
        verdict = "met" if g["puback_p99"] < GOAL_P99_MS else "NOT met"
        print(
            f"\ngoal: p99 to PUBACK < {GOAL_P99_MS:.0f} ms at {GOAL_RATE:.0f} studies/s with fsync "
            f"on: {g['puback_p99']:.1f} ms, {verdict} (to row deleted: {g['deleted_p99']:.1f} ms)"
        )
    else:
        print(f"\ngoal not checked: {GOAL_RATE:g} studies/s not among --rates")
    print(
        f"whole benchmark {time.monotonic() - started:.0f} s; load average now {load()} "
        f"(1/5/15 min)"
    )
    lost = sum(r["lost"] for r in latency + maxed) + sum(r["depth"] for r in latency + maxed)
    if lost:
        print(f"LOST: {lost:.0f} results not acknowledged or left in the outbox", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
