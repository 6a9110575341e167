"""``edge-export evaluate`` benchmark: N simulated studies scored with the demo bundle.

    .venv/bin/python benchmarks/evaluate.py [--studies 500] [--size 512] [--threads 1]
        [--resamples 2000] [--quick] [--workdir DIR]

Simulates N CR/DX studies (half abnormal, one label in ten flipped so that the figures are
not perfect) into a temporary folder, runs ``edge-export evaluate`` on them as a user
would (the real CLI) and prints the report's timings, each with its share of the run:
reading headers, decoding (DICOM to tensor), the encoder, statistics (AUROC with its
bootstrap per finding, Wilson intervals, operating points), the bootstrap alone (measured
inside the run) and figures. Baseline: scoring the studies (headers, decoding, encoder:
what the daemon does for them); the line after it gives the whole run and each other part
as a multiple of it.

Claim: the bootstrap does not dominate; 2,000 resamples of 500 studies for each finding
take, together, well under 10 % of the run. The claim line says whether this run met it;
the run exits 1 when it did not, except with ``--quick`` (30 studies of 256 x 256, a few
seconds: the benchmark runs end to end, its figures are not judged).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.service import demo_bundle_path
from edge_agent.simulate import FINDINGS, simulate
from export.cli import main as edge_export

CLAIM_SHARE = 0.10
"""The bootstrap's share of the run must stay below this."""
PARTS = ("read_headers", "decode", "encode", "statistics", "bootstrap", "figures")


def run(
    studies: int, size: int, threads: int, resamples: int, workdir: Path | None
) -> tuple[dict[str, Any], float]:
    """Simulate, label and evaluate ``studies`` studies; the report and the run's wall time."""
    with tempfile.TemporaryDirectory(dir=workdir, prefix="evaluate-") as tmp:
        root = Path(tmp)
        sims = simulate(root / "dicom", studies=studies, abnormal=0.5, seed=5, rows=size, cols=size)
        labels = root / "labels.csv"
        with labels.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["study_instance_uid", *FINDINGS])
            for i, s in enumerate(sims):
                row = ["1" if s.truth[c] else "0" for c in FINDINGS]
                if i % 10 == 0:
                    row[0] = "0" if row[0] == "1" else "1"
                writer.writerow([s.study_instance_uid, *row])
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            code = edge_export(
                [
                    "evaluate", "--bundle", str(demo_bundle_path()), "--data", str(root / "dicom"),
                    "--labels", str(labels), "--out", str(root / "report"),
                    "--threads", str(threads), "--resamples", str(resamples), "--no-progress",
                ]
            )  # fmt: skip
        wall = time.perf_counter() - start
        if code:
            raise SystemExit(f"edge-export evaluate exited {code}")
        return json.loads((root / "report" / "report.json").read_text()), wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--studies", type=int, default=500, help="simulated studies (500)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (512)")
    parser.add_argument("--threads", type=int, default=1, help="encoder threads (1)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (2000)")
    parser.add_argument("--workdir", type=Path, help="where the studies are simulated (temp)")
    parser.add_argument(
        "--quick", action="store_true", help="30 studies of 256 x 256; the claim is not judged"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.studies, args.size = 30, 256
    print(f"load average at start {'/'.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min)")
    report, wall = run(args.studies, args.size, args.threads, args.resamples, args.workdir)
    t, studies, findings = report["timings_s"], report["studies"], report["findings"]
    print(
        f"{studies['scored']} studies, {studies['images']} images, {args.size}x{args.size}, "
        f"{args.threads} encoder thread(s), {args.resamples} bootstrap resamples x "
        f"{len(findings)} findings: {wall:.2f} s wall"
    )
    for name in PARTS:
        note = " (part of statistics)" if name == "bootstrap" else ""
        print(f"  {name:<14}{t[name]:>8.3f} s  {100 * t[name] / wall:5.1f} %{note}")
    rest = wall - sum(t[name] for name in PARTS if name != "bootstrap")
    print(f"  {'rest':<14}{rest:>8.3f} s  {100 * rest / wall:5.1f} % (start-up: imports, bundle)")
    for code, f in findings.items():
        ci = f["auroc_ci95"] or [None, None]
        print(f"  {code}: AUROC {f['auroc']} ({ci[0]}-{ci[1]})")

    scoring = t["read_headers"] + t["decode"] + t["encode"]
    print(
        f"baseline: scoring the studies (headers, decoding, encoder) {scoring:.3f} s; "
        f"ratios to it: whole run {wall / scoring:.2f}x, statistics "
        f"{t['statistics'] / scoring:.2f}x, bootstrap {t['bootstrap'] / scoring:.2f}x, "
        f"figures {t['figures'] / scoring:.2f}x"
    )
    share = t["bootstrap"] / wall
    met = share < CLAIM_SHARE
    judged = "not judged (--quick)" if args.quick else ("met" if met else "NOT met")
    print(
        f"claim: the bootstrap ({args.resamples} resamples of {studies['scored']} studies, "
        f"{len(findings)} findings) under {CLAIM_SHARE:.0%} of the run: "
        f"{100 * share:.1f} %, {judged}"
    )
    print(f"load average now {'/'.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min)")
    return 0 if met or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
