"""Intake benchmark: thousands of instances dropped at once, through intake and preprocessing.

    .venv/bin/python benchmarks/intake.py [--files 2000] [--small 200] [--cr-share 0.1]

Prepares two sets of simulated instances (``edge_agent.simulate``): ``--files`` and ``--small``
instances, a mix of CR radiographs (2048x1664, frontal + lateral studies) and axial CT slices
(256x256, series of 48), written in nested folders as PACS exports write them
(``<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``), outside the watch folder.
The pixel data come from a few simulated images; every instance has its own UIDs.

Then, for each set and each watch mode (inotify, polling), a fresh process starts a
``FolderWatcher`` on an empty folder with the daemon's default settings (file stable 2 s,
poll 1 s), moves every study folder of the set into it at once, and runs, for each file the
watcher hands out, what the daemon does with it: the intake step (``read_header``,
``Store.add_instance`` into a real state database, ``mark_handled``) and the scoring
thread's preprocessing (``pydicom.dcmread`` + ``imaging.preprocess`` to 448 px, MedSigLIP's
input), one after the other in one thread (the daemon runs them in two), model excluded.
Measured there: instances per second from the drop to the last instance preprocessed (the
2 s stability wait included) and from the first file handed out to the last (steady rate),
where the time goes, the most files waiting at once, and the process's peak RSS
(``ru_maxrss``) against its RSS just before the drop.

In the same run: the demo bundle's encoder (ONNX Runtime, x86-cpu profile, batch 1, on its
own preprocessed tensors), for the ratio intake rate / encoder rate. The full-size MedSigLIP
int8 encoder is quoted from docs/benchmarks.md (1.28 s per image at batch 1 on this class of
machine), not measured here. Goal: intake ≥ 10x the encoder's rate; peak RSS the same
whether 200 or 2,000 files wait.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MEDSIGLIP_INT8_SECONDS = 1.282  # docs/benchmarks.md, "Encoder precision", int8 batch 1
CT_SERIES = 48
INPUT_SIZE = 448


# -- preparing the files -------------------------------------------------------------------


def prepare(out: Path, files: int, cr_share: float, seed: int) -> dict[str, int]:
    """Writes ``files`` instances into ``out/<study>/<series>/<sop>.dcm``; returns counts."""
    from pydicom.dataset import FileDataset
    from pydicom.uid import generate_uid

    from edge_agent.simulate import FINDINGS, chest_instance, ct_series

    rng = np.random.default_rng(seed)
    clear = dict.fromkeys(FINDINGS, False)
    cr_templates = [
        chest_instance(rng, findings=clear, view=view, photometric="MONOCHROME2")
        for view in ("PA", "LL")
    ]
    ct_template = ct_series(rng, findings={**clear, "lung_nodule": True}, slices=CT_SERIES)
    n_cr = 2 * round(files * cr_share / 2)
    n_ct = files - n_cr
    out.mkdir(parents=True)

    def write(ds: FileDataset, study: str, series: str) -> None:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        folder = out / study / series
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)

    for _ in range(n_cr // 2):
        study = generate_uid()
        for template in cr_templates:
            write(template, study, generate_uid())
    left = n_ct
    while left > 0:
        study, series = generate_uid(), generate_uid()
        for ds in ct_template[: min(CT_SERIES, left)]:
            write(ds, study, series)
        left -= CT_SERIES
    return {"CR": n_cr, "CT": n_ct, "studies": len(os.listdir(out))}


def warm_page_cache(folder: Path) -> int:
    """Read every file once, so every run finds them in the page cache (as after a copy)."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                while chunk := f.read(1 << 20):
                    total += len(chunk)
    return total


# -- one run (a child process) -------------------------------------------------------------


def rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(source: Path, mode: str, stable: float, poll: float) -> dict[str, object]:
    import pydicom

    from edge_agent import imaging
    from edge_agent.bundle import Preprocessing
    from edge_agent.config import IntakeSettings
    from edge_agent.intake.header import read_header
    from edge_agent.intake.watcher import FolderWatcher, WatchMode
    from edge_agent.store import Store

    spec = Preprocessing(input_size=INPUT_SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)
    studies = sorted(os.listdir(source))
    expected = sum(len(names) for _, _, names in os.walk(source))
    with tempfile.TemporaryDirectory(dir=source.parent) as tmp:
        watch = Path(tmp) / "incoming"
        watch.mkdir()
        store = Store(Path(tmp) / "state" / "state.sqlite3")
        watcher = FolderWatcher(
            watch,
            stable_seconds=stable,
            ignore_suffixes=IntakeSettings().ignore_suffixes,
            watch_mode=cast(WatchMode, mode),
            poll_interval=poll,
        )
        active = watcher.start()
        # warm-up outside the timing: one file of each kind through the whole step
        samples = []
        for study in studies[:1] + studies[-1:]:
            series = next(os.scandir(source / study))
            samples.append(next(os.scandir(series.path)).path)
        for path in samples:
            read_header(Path(path))
            imaging.preprocess(pydicom.dcmread(path), spec)
        watcher.scan(time.monotonic())
        rss_before = rss_now_mb()

        stages = dict.fromkeys(("scan and wait", "header", "store", "preprocess"), 0.0)
        done, waiting_max, first_at = 0, 0, None
        drop = time.monotonic()
        for study in studies:
            os.rename(source / study, watch / study)
        try:
            while done < expected:
                t = time.monotonic()
                batch = watcher.scan(t)
                waiting_max = max(waiting_max, watcher.waiting)
                stages["scan and wait"] += time.monotonic() - t
                for f in batch:
                    first_at = first_at or time.monotonic()
                    t0 = time.monotonic()
                    record = read_header(f.path)
                    t1 = time.monotonic()
                    store.add_instance(f.relpath, f.size, f.mtime_ns, record, time.time())
                    watcher.mark_handled(f)
                    t2 = time.monotonic()
                    imaging.preprocess(pydicom.dcmread(f.path), spec)
                    t3 = time.monotonic()
                    stages["header"] += t1 - t0
                    stages["store"] += t2 - t1
                    stages["preprocess"] += t3 - t2
                    done += 1
                if not watcher.more_ready and done < expected:
                    t = time.monotonic()
                    watcher.wait(poll)
                    stages["scan and wait"] += time.monotonic() - t
            end = time.monotonic()
        finally:
            watcher.close()
            store.close()
            for study in studies:  # back, for the next run
                if (watch / study).exists():
                    os.rename(watch / study, source / study)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert first_at is not None
    return {
        "mode": active,
        "files": expected,
        "seconds": end - drop,
        "rate": expected / (end - drop),
        "first_ready_s": first_at - drop,
        "steady_rate": (expected - 1) / max(end - first_at, 1e-9),
        "stages": stages,
        "waiting_max": waiting_max,
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak,
    }


# -- the encoder ---------------------------------------------------------------------------


def demo_encoder_rate(sample: Path, repeat: int) -> tuple[float, str]:
    """Images per second of the shipped demo bundle's encoder at batch 1."""
    import pydicom

    from edge_agent import imaging
    from edge_agent.bundle import load_bundle
    from edge_agent.profiles import resolve_profile
    from edge_agent.runners import open_runner
    from edge_agent.service import demo_bundle_path

    bundle = load_bundle(demo_bundle_path())
    profile, _ = resolve_profile("x86-cpu")
    runner = open_runner(bundle, profile)
    tensor = imaging.preprocess(pydicom.dcmread(sample), bundle.manifest.encoder.preprocessing)
    batch = tensor[None]
    for _ in range(5):
        runner.embed(batch)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        runner.embed(batch)
        times.append(time.perf_counter() - start)
    size = bundle.manifest.encoder.preprocessing.input_size
    return 1.0 / statistics.median(times), f"{bundle.manifest.model.name} ({size} px)"


# -- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000, help="instances dropped (2000)")
    parser.add_argument("--small", type=int, default=200, help="the smaller drop (200)")
    parser.add_argument("--cr-share", type=float, default=0.1, help="CR instances (0.1)")
    parser.add_argument("--stable", type=float, default=2.0, help="file_stable_seconds (2)")
    parser.add_argument("--poll", type=float, default=1.0, help="poll_interval_seconds (1)")
    parser.add_argument("--modes", default="inotify,polling", help="(inotify,polling)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="where to write the files (a temp folder)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.mode, args.stable, args.poll)))
        return 0

    started = time.monotonic()
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        sets: dict[int, Path] = {}
        counts: dict[int, dict[str, int]] = {}
        for n in sorted({args.small, args.files}):
            sets[n] = Path(tmp) / f"set-{n}"
            counts[n] = prepare(sets[n], n, args.cr_share, args.seed + n)
        size = sum(warm_page_cache(p) for p in sets.values())
        print(
            f"prepared in {time.monotonic() - started:.0f} s: "
            + "; ".join(
                f"{n} instances ({c['CR']} CR, {c['CT']} CT slices, {c['studies']} studies)"
                for n, c in counts.items()
            )
            + f", {size / 2**20:.0f} MiB; {os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.1f}"
        )
        runs = []
        for n in sorted(sets, reverse=True):
            for mode in modes:
                command = [sys.executable, __file__, "--child", str(sets[n]), "--mode", mode]
                command += ["--stable", str(args.stable), "--poll", str(args.poll)]
                proc = subprocess.run(
                    command,
                    check=True,
                    stdout=subprocess.PIPE,  # the JSON line; errors go to the terminal
                    text=True,
                )
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                if runs[-1]["mode"] != mode:
                    print(f"note: {mode} was asked for, {runs[-1]['mode']} ran", file=sys.stderr)
        cr_sample = next(sets[args.small].rglob("*.dcm"))
        for path in sets[args.small].rglob("*.dcm"):
            if path.stat().st_size > 1_000_000:  # a CR radiograph, the encoder's input
                cr_sample = path
                break
        encoder_rate, encoder_name = demo_encoder_rate(cr_sample, repeat=50)

    print(
        f"\nfile_stable_seconds {args.stable}, poll_interval_seconds {args.poll}; intake + "
        f"preprocessing to {INPUT_SIZE} px in one thread, model excluded\n"
    )
    print(
        "| mode | files | drop → last | instances/s | first handed out | steady /s "
        "| most waiting | RSS before drop | peak RSS |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        print(
            f"| {r['mode']} | {r['files']} | {r['seconds']:.1f} s | {r['rate']:.0f} "
            f"| {r['first_ready_s']:.1f} s | {r['steady_rate']:.0f} | {r['waiting_max']} "
            f"| {r['rss_before_mb']:.0f} MB | {r['peak_rss_mb']:.0f} MB |"
        )
    print("\n| mode | files | scan and wait | header | store | preprocess |")
    print("| --- | --- | --- | --- | --- | --- |")
    stage_names = ("scan and wait", "header", "store", "preprocess")
    for r in runs:
        cells = " | ".join(f"{r['stages'][k]:.1f} s" for k in stage_names)
        print(f"| {r['mode']} | {r['files']} | {cells} |")
    big = [r for r in runs if r["files"] == max(sets)]
    small = [r for r in runs if r["files"] == min(sets)]
    slowest = min(r["rate"] for r in big)
    medsiglip = 1.0 / MEDSIGLIP_INT8_SECONDS
    print(
        f"\nencoders at batch 1: {encoder_name} {encoder_rate:.1f} images/s (measured in this "
        f"run); MedSigLIP-448 int8 {medsiglip:.2f} images/s (1.28 s/image, docs/benchmarks.md)"
    )
    print(
        f"slowest intake rate ({max(sets)} files, drop → last) {slowest:.0f} instances/s = "
        f"{slowest / encoder_rate:.2g}x the demo encoder, {slowest / medsiglip:.0f}x MedSigLIP "
        "int8 (goal >= 10x)"
    )
    for mode in modes:
        b = [r for r in big if r["mode"] == mode]
        s = [r for r in small if r["mode"] == mode]
        if b and s and b[0] is not s[0]:
            print(
                f"{mode}: peak RSS {s[0]['peak_rss_mb']:.0f} MB with {s[0]['files']} files, "
                f"{b[0]['peak_rss_mb']:.0f} MB with {b[0]['files']} "
                f"({b[0]['peak_rss_mb'] / s[0]['peak_rss_mb']:.2f}x for "
                f"{b[0]['files'] / s[0]['files']:.0f}x the files)"
            )
    print(
        f"whole benchmark {time.monotonic() - started:.0f} s; load average now "
        f"{os.getloadavg()[0]:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
