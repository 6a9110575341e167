"""PACS benchmark: SR build time, C-STORE throughput to Orthanc, and MQTT latency with the
PACS destination on and off.

    .venv/bin/python benchmarks/pacs.py [--quick] [--rate 20] [--duration 20]

1. **SR build**: ``build_sr`` for an urgent chest result with 1 and with 2 source headers
   (in memory), N times; median and p95 in ms.
2. **C-STORE to Orthanc** (Debian's ``orthanc``, started here on free loopback ports, as the
   tests start it): N distinct pre-built SRs stored three ways: one association each with the
   socket as pynetdicom leaves it (Nagle's algorithm, delayed ACKs: the agent before this
   benchmark's change, ``scu.TUNE_TCP`` off), one association each with the socket tuned
   (``scu.store``), and all over one association (``scu.Session``, what the PACS worker does
   while rows are waiting); SRs per second and the ratio to the first. Then the same N results
   through ``PacsWorker.step`` (headers read again from disk, SR built, C-STORE, the row
   removed in a committed transaction).
3. **MQTT latency, PACS off vs on**: benchmarks/delivery.py's latency run (open-loop Poisson
   arrivals, the daemon's Store with an fsync per commit, the real Publisher and Mosquitto;
   commit to PUBACK), with ``pacs.enabled`` off, then with every result also queued for the
   PACS and the PACS worker storing SRs into Orthanc meanwhile, from real DICOM files: once
   with the PACS sender process at the agent's priority (``--no-nice-run`` leaves this run
   out) and once niced as the daemon runs it; p50 and p99 with their ratio to the "off" run.
4. **The interpreter lock**: how late a Python thread that sleeps 2 ms in a loop wakes up
   (p50, p99, max) with nothing else running, beside a thread that builds SRs back to back
   (at the agent's priority, and niced as the PACS worker's thread once was), and beside a
   process that does (as the PACS sender does now).
5. **A study's road, and the SR's share of it**: the daemon itself (``edge-agent run`` as
   its own process, the demo bundle, the intake's defaults and the default
   ``study_quiet_seconds``) with Mosquitto and the PACS destination on for every level;
   ``--e2e-studies`` CR studies written ``--e2e-spacing`` s apart into its watch folder, as
   a modality writes them. From its state database, as ``edge-export evaluate --state``
   reads it: last instance received -> result stored -> PUBACK, and result stored -> SR
   stored in Orthanc (p50, p95, max); the SR's share of the road at the median, with and
   without the quiet wait that tells the agent a study is complete. ``--e2e-bundle B`` runs
   it with another bundle, such as the full-size MedSigLIP-448 architecture with random
   weights (``benchmarks/medsiglip_checkpoint.py``, then ``edge-export siglip --precision
   int8``); ``--e2e-only`` leaves out sections 1-4.

Prints tables and the load average; exits 0 whatever the figures, 1 when a result was lost.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the Orthanc runner the tests use
sys.path.insert(0, str(Path(__file__).resolve().parent))

from delivery import Results, Study, arrivals, drive, publishing, summarise  # noqa: E402
from helpers.daemon import Daemon  # noqa: E402
from helpers.orthanc import Orthanc  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402

from edge_agent.bundle import load_bundle  # noqa: E402
from edge_agent.config import PacsSettings, Settings  # noqa: E402
from edge_agent.devbroker import HOST, Mosquitto  # noqa: E402
from edge_agent.pacs import scu  # noqa: E402
from edge_agent.pacs.scu import Peer, Session, store  # noqa: E402
from edge_agent.pacs.sender import NICE  # noqa: E402
from edge_agent.pacs.sr import build_sr  # noqa: E402
from edge_agent.priority import lower_thread_priority  # noqa: E402
from edge_agent.results import TRIAGE_LEVELS  # noqa: E402
from edge_agent.service import demo_bundle_path  # noqa: E402
from edge_agent.simulate import simulate  # noqa: E402
from edge_agent.simulate.dicom_writer import chest_instance, new_study  # noqa: E402
from edge_agent.status import read_status  # noqa: E402
from edge_agent.store import Store  # noqa: E402
from edge_agent.workers.pacs import PacsWorker  # noqa: E402
from export.evaluation.command import time_to_notification  # noqa: E402


def ms(values: list[float]) -> tuple[float, float]:
    a = np.array(values) * 1000.0
    return float(np.median(a)), float(np.percentile(a, 95))


def headers(n: int, seed: int) -> list[Dataset]:
    rng = np.random.default_rng(seed)
    study = new_study(rng, "CR")
    return [
        chest_instance(rng, findings={}, study=study, rows=64, cols=64, instance_number=i + 1)
        for i in range(n)
    ]


def write_sources(results: Results, studies: list[Study], watch: Path, seed: int) -> None:
    """A real DICOM file (64x64) for each scored instance, where the store says it is."""
    rng = np.random.default_rng(seed)
    for study in studies:
        uid = study.row.study_instance_uid
        header = new_study(rng, "CR")
        for sop, (state, _) in study.instance_states.items():
            if state != "scored":
                continue
            ds = chest_instance(rng, findings={}, study=header, rows=64, cols=64)
            ds.StudyInstanceUID = uid
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            folder = watch / uid
            folder.mkdir(parents=True, exist_ok=True)
            ds.save_as(folder / f"{sop}.dcm", enforce_file_format=True)


def sr_build(results: Results, n: int) -> dict[str, tuple[float, float]]:
    concepts = {f.code: f.concept for f in results.findings}
    out = {}
    for count in (1, 2):
        sources = headers(count, 1)
        uid = sources[0].StudyInstanceUID
        times = []
        for _ in range(n):
            study = Study(_row(uid), {}, results.scores(), 100.0)
            result = results.build(study)
            t = time.perf_counter()
            build_sr(result, sources, concepts=concepts, agent="bench/box")
            times.append(time.perf_counter() - t)
        out[f"{count} image(s)"] = ms(times)
    return out


def _row(uid: str) -> Any:
    from edge_agent.store import StudyRow

    now = time.time()
    return StudyRow(uid, "CR", None, "scored", 1, now, now, now, None)


def cstore(orthanc: Orthanc, results: Results, n: int) -> dict[str, float]:
    """SRs per second: one association each untuned, one each tuned, all over one."""
    concepts = {f.code: f.concept for f in results.findings}
    peer = Peer.from_settings(settings(orthanc))
    srs = []
    for i in range(3 * n):
        sources = headers(1, 100 + i)
        study = Study(_row(sources[0].StudyInstanceUID), {}, results.scores(), 100.0)
        srs.append(build_sr(results.build(study), sources, concepts=concepts, agent="bench/box"))
    out = {}
    for what, batch in (
        ("one association each, socket untuned", srs[:n]),
        ("one association each, socket tuned", srs[n : 2 * n]),
        ("one association for all (Session)", srs[2 * n :]),
    ):
        scu.TUNE_TCP = "untuned" not in what
        try:
            t = time.perf_counter()
            if "Session" in what:
                with Session(peer) as session:
                    for sr in batch:
                        session.store(sr)
            else:
                for sr in batch:
                    store(peer, sr)
            out[what] = n / (time.perf_counter() - t)
        finally:
            scu.TUNE_TCP = True
    return out


def _build_loop(results: Results, stop: Any, nice: int) -> None:
    """Build SRs back to back until ``stop`` (a thread's or a child process's target)."""
    lower_thread_priority(nice, "benchmark")
    concepts = {f.code: f.concept for f in results.findings}
    sources = headers(1, 5)
    while not stop.is_set():
        study = Study(_row(sources[0].StudyInstanceUID), {}, results.scores(), 100.0)
        build_sr(results.build(study), sources, concepts=concepts, agent="bench/box")


def wake_lateness(results: Results, seconds: float) -> dict[str, tuple[float, float, float]]:
    """Lateness of a 2 ms sleep (ms: p50, p99, max) beside no builder, a builder thread
    (nice 0 and NICE) and a builder process (NICE)."""
    out = {}
    for what, kind, nice in (
        ("nothing else", None, 0),
        ("an SR-building thread", "thread", 0),
        (f"an SR-building thread, nice +{NICE}", "thread", NICE),
        (f"an SR-building process, nice +{NICE}", "process", NICE),
    ):
        stop: Any
        runner: Any = None
        if kind == "thread":
            stop = threading.Event()
            runner = threading.Thread(target=_build_loop, args=(results, stop, nice))
        elif kind == "process":
            ctx = multiprocessing.get_context("spawn")
            stop = ctx.Event()
            runner = ctx.Process(target=_build_loop, args=(results, stop, nice))
        if runner is not None:
            runner.start()
            time.sleep(3.0 if kind == "process" else 0.5)  # a spawned child imports first
        late = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            time.sleep(0.002)
            late.append(time.perf_counter() - t - 0.002)
        if runner is not None:
            stop.set()
            runner.join()
        a = np.array(late) * 1000.0
        out[what] = (float(np.median(a)), float(np.percentile(a, 99)), float(a.max()))
    return out


def settings(orthanc: Orthanc) -> PacsSettings:
    return PacsSettings(
        enabled=True,
        host=HOST,
        port=orthanc.dicom_port,
        called_ae=orthanc.aet,
        retry_max_seconds=2,
    )


def worker_throughput(
    orthanc: Orthanc, results: Results, workdir: Path, n: int
) -> tuple[float, float]:
    """SRs per second through ``PacsWorker.step``, and the seconds its sender process took
    to start (before the timing)."""
    st = Store(workdir / "worker.sqlite3", pacs_levels=TRIAGE_LEVELS)
    watch = workdir / "watch-worker"
    try:
        studies = results.prepare(st, n)
        write_sources(results, studies, watch, 7)
        for study in studies:
            results.commit(st, study, results.build(study))
        worker = _worker(st, orthanc, results, watch, threading.Event())
        t = time.perf_counter()
        try:
            worker.sender.start()
            startup = time.perf_counter() - t
            t = time.perf_counter()
            while worker.step(time.time()):
                pass
        finally:
            worker.close()
        elapsed = time.perf_counter() - t
        assert st.pacs_depth() == 0, worker.last_error
    finally:
        st.close()
    return n / elapsed, startup


def _worker(
    st: Store,
    orthanc: Orthanc,
    results: Results,
    watch: Path,
    stop: threading.Event,
    niced: bool = True,
) -> PacsWorker:
    return PacsWorker(
        st,
        settings(orthanc),
        concepts={f.code: f.concept for f in results.findings},
        agent="bench/box",
        watch_dir=watch,
        stop=stop,
        nice=NICE if niced else 0,
    )


def mqtt_latency(
    broker: Mosquitto,
    orthanc: Orthanc | None,
    results: Results,
    workdir: Path,
    rate: float,
    duration: float,
    seed: int,
    niced: bool = True,
) -> dict[str, Any]:
    label = "pacs-off" if orthanc is None else "pacs-on" if niced else "pacs-on-not-niced"
    rng = np.random.default_rng(seed)
    offsets = arrivals(rate, duration, rng)
    st = Store(workdir / f"{label}.sqlite3", pacs_levels=TRIAGE_LEVELS if orthanc else ())
    watch = workdir / f"watch-{label}"
    stop = threading.Event()
    thread = None
    try:
        warm = results.prepare(st, 5)
        studies = results.prepare(st, len(offsets))
        write_sources(results, warm + studies, watch, seed)  # the same work either way
        cpu: dict[str, float] = {}
        pids: dict[str, int] = {"agent": os.getpid()}
        if orthanc is not None:
            worker = _worker(st, orthanc, results, watch, stop, niced=niced)
            pids["sender"] = worker.sender.start()
            assert orthanc.proc is not None
            pids["orthanc"] = orthanc.proc.pid
            thread = threading.Thread(target=worker.run, name="pacs", daemon=True)
            thread.start()
        before = {what: cpu_seconds(pid) for what, pid in pids.items()}
        with publishing(broker, st, results, label) as (publisher, outbox):
            drive(results, st, publisher, outbox, warm, [0.02 * i for i in range(5)], 10.0)
            run = drive(results, st, publisher, outbox, studies, offsets, 60.0)
            cpu = {what: cpu_seconds(pid) - before[what] for what, pid in pids.items()}
        sr_drain = math.nan
        if orthanc is not None:
            t = time.monotonic()
            while st.pacs_depth() and time.monotonic() - t < 120:
                time.sleep(0.05)
            sr_drain = time.monotonic() - t
        depth = st.pacs_depth()
    finally:
        stop.set()
        if thread is not None:
            thread.join(10)
        st.close()
    return {
        "label": label,
        **summarise(run["traces"]),
        "sr_left": depth,
        "sr_drain": sr_drain,
        "cpu": cpu,
    }


def end_to_end(
    broker: Mosquitto,
    orthanc: Orthanc,
    workdir: Path,
    studies: int,
    spacing: float,
    quiet: float,
    bundle: Path | None = None,
) -> dict[str, Any]:
    """The daemon as its own process with every level sent to ``orthanc`` (and ``bundle``,
    default the demo bundle): ``studies`` CR studies written ``spacing`` s apart; the stages
    of each study's road from its state database once every SR is stored (``lost``: studies
    without a result or an SR then)."""
    watch, state = workdir / "e2e-incoming", workdir / "e2e-state"
    watch.mkdir()
    config = workdir / "e2e-agent.toml"
    levels = ", ".join(f'"{level}"' for level in TRIAGE_LEVELS)
    config.write_text(
        ("" if bundle is None else f'bundle = "{bundle.resolve()}"\n')
        + f'watch_dir = "{watch}"\nstate_dir = "{state}"\nprofile = "x86-cpu"\n'
        f'site = "bench"\ndevice_id = "e2e"\nstudy_quiet_seconds = {quiet}\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
        f'[pacs]\nenabled = true\nhost = "{HOST}"\nport = {orthanc.dicom_port}\n'
        f'called_ae = "ORTHANC"\nlevels = [{levels}]\n'
    )
    daemon = Daemon(config, workdir / "e2e-agent.log")
    database = state / "state.sqlite3"
    daemon.start()
    try:
        for _ in simulate(watch, studies=studies, abnormal=0.3, interval_seconds=spacing):
            pass
        deadline = time.monotonic() + quiet + 30.0 * studies + 60.0
        done, waiting = 0, 0
        while time.monotonic() < deadline and daemon.alive():
            if database.exists():
                status = read_status(database)
                done = sum(status.results_by_level.values())
                waiting = status.pacs_outbox or 0
                if done >= studies and not waiting:
                    break
            time.sleep(0.25)
        notification, _, pacs = time_to_notification(database)
    finally:
        daemon.kill()
    return {
        "notification": notification,
        "pacs": pacs,
        "lost": studies - pacs["studies"],
    }


def print_end_to_end(road: dict[str, Any], quiet: float) -> None:
    notification, pacs = road["notification"], road["pacs"]
    rows = {
        "last instance received -> result stored": notification["stages"]["received_to_result"],
        "result stored -> PUBACK": notification["stages"]["result_to_puback"],
        "result stored -> SR stored in Orthanc": pacs["stages"]["result_to_pacs"],
        "last instance received -> SR stored": pacs,
    }
    for what, t in rows.items():
        print(f"  {what:<44}{t['studies']:5d}{t['p50_s']:9.3f}{t['p95_s']:9.3f}{t['max_s']:9.3f}")
    sr, road_s = pacs["stages"]["result_to_pacs"]["p50_s"], pacs["p50_s"]
    print(
        f"  the SR's share of the road at the median: {sr / road_s:.1%};"
        f" of the road less the {quiet:g} s quiet wait: {sr / (road_s - quiet):.1%}"
    )


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds process ``pid`` has used so far (Linux procfs)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pacs_runs(
    args: argparse.Namespace, results: Results, orthanc: Orthanc, broker: Mosquitto, workdir: Path
) -> bool:
    """Sections 2 and 3 (C-STORE and worker throughput, MQTT latency off and on); True when
    a result or an SR was lost."""
    lost = False
    print(f"C-STORE to Orthanc ({args.stores} SRs each)         SR/s   x first")
    rates = cstore(orthanc, results, args.stores)
    first = next(iter(rates.values()))
    for what, rate in rates.items():
        print(f"  {what:<40}{rate:7.1f}{rate / first:8.2f}")
    rate, startup = worker_throughput(orthanc, results, workdir, args.stores)
    print(
        f"PacsWorker.step (read, build, C-STORE, commit): {rate:.1f} SR/s"
        f" (its sender process started in {startup:.1f} s)"
    )
    print(
        f"MQTT commit -> PUBACK at {args.rate:g} studies/s for {args.duration:g} s"
        "      p50     p95     p99     max ms   SRs left  SR drain s  p50 x off"
        "  p99 x off"
    )
    runs: list[tuple[Orthanc | None, bool]] = [(None, True)]
    if not args.no_nice_run:
        runs.append((orthanc, False))
    runs.append((orthanc, True))
    off: dict[str, Any] = {}
    for peer, niced in runs:
        r = mqtt_latency(broker, peer, results, workdir, args.rate, args.duration, args.seed, niced)
        off = off or r
        lost |= r["lost"] > 0 or r["sr_left"] > 0
        print(
            f"  {r['label']:<18}{'':<34}{r['puback_p50']:8.1f}{r['puback_p95']:8.1f}"
            f"{r['puback_p99']:8.1f}{r['puback_max']:8.1f}{r['sr_left']:9d}"
            f"{r['sr_drain']:10.1f}{r['puback_p50'] / off['puback_p50']:11.2f}"
            f"{r['puback_p99'] / off['puback_p99']:11.2f}"
        )
        print(
            "    CPU seconds during the run: "
            + ", ".join(f"{what} {sec:.1f}" for what, sec in r["cpu"].items())
        )
    return lost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0, help="studies per second (20)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per run (20)")
    parser.add_argument("--builds", type=int, default=200, help="SR builds (200)")
    parser.add_argument("--stores", type=int, default=100, help="C-STOREs (100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lateness", type=float, default=8.0, help="seconds per wake-up lateness run (8)"
    )
    quiet = Settings.model_fields["study_quiet_seconds"].default
    parser.add_argument(
        "--e2e-studies", type=int, default=20, help="studies through the daemon (20)"
    )
    parser.add_argument("--e2e-spacing", type=float, default=3.0, help="seconds between them (3)")
    parser.add_argument(
        "--e2e-quiet",
        type=float,
        default=quiet,
        help=f"the daemon's study_quiet_seconds (its default, {quiet:g})",
    )
    parser.add_argument(
        "--e2e-bundle",
        type=Path,
        help="the daemon's bundle for the study's road (default: the demo bundle); e.g. a "
        "full-size one from benchmarks/medsiglip_checkpoint.py and edge-export siglip",
    )
    parser.add_argument(
        "--e2e-only", action="store_true", help="only the study's road through the daemon"
    )
    parser.add_argument("--quick", action="store_true", help="a few seconds, small counts")
    parser.add_argument(
        "--no-nice-run",
        action="store_true",
        help="leave out the MQTT run with the PACS thread at the agent's priority",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.builds, args.stores, args.lateness = 1.5, 10, 5, 0.5
        args.e2e_studies, args.e2e_spacing, args.e2e_quiet = 2, 0.5, 1.5
    bundle = load_bundle(demo_bundle_path())
    results = Results(bundle, "bench", args.seed)
    lost = False
    with tempfile.TemporaryDirectory(prefix="pacs-bench-") as tmp:
        workdir = Path(tmp)
        if not args.e2e_only:
            print("SR build (build_sr, in memory)          median ms   p95 ms")
            for what, (p50, p95) in sr_build(results, args.builds).items():
                print(f"  {what:<38}{p50:9.2f}{p95:9.2f}")
        orthanc = Orthanc(workdir / "orthanc")
        orthanc.start()
        broker = Mosquitto(workdir / "broker").start()
        try:
            if not args.e2e_only:
                lost |= pacs_runs(args, results, orthanc, broker, workdir)
            bundle = args.e2e_bundle or "the demo bundle"
            print(
                f"A study's road through the daemon ({args.e2e_studies} CR studies"
                f" {args.e2e_spacing:g} s apart, study_quiet_seconds {args.e2e_quiet:g},"
                f" {bundle}, every level to the PACS)"
            )
            print(f"  {'by the agent clock, seconds':<44}{'n':>5}{'p50':>9}{'p95':>9}{'max':>9}")
            road = end_to_end(
                broker,
                orthanc,
                workdir,
                args.e2e_studies,
                args.e2e_spacing,
                args.e2e_quiet,
                args.e2e_bundle,
            )
            print_end_to_end(road, args.e2e_quiet)
            lost |= road["lost"] > 0
        finally:
            broker.stop()
            orthanc.stop()
        if not args.e2e_only:
            print("A 2 ms sleep in a Python thread wakes late by (ms)     p50     p99     max")
            for what, (p50, p99, top) in wake_lateness(results, args.lateness).items():
                print(f"  beside {what:<46}{p50:8.2f}{p99:8.2f}{top:8.1f}")
    print(f"load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
