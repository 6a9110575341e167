"""``edge-export evaluate`` benchmark: N simulated studies scored with the demo bundle.

    .venv/bin/python benchmarks/evaluate.py [--studies 500] [--size 512] [--threads 1]

Simulates N CR/DX studies (half abnormal, one label in ten flipped so that the figures are
not perfect) into a temporary folder, runs ``edge-export evaluate`` on them as a user
would (the real CLI) and prints the report's timings: reading headers, decoding (DICOM to
tensor), the encoder, statistics (AUROC with a 2,000-resample bootstrap per finding,
Wilson intervals, operating points) and figures, with each part's share of the run.
Exits 1 when the statistics take 10 % of the run or more.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.service import demo_bundle_path
from edge_agent.simulate import FINDINGS, simulate
from export.cli import main


def run(studies: int, size: int, threads: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
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
            code = main(
                [
                    "evaluate", "--bundle", str(demo_bundle_path()), "--data", str(root / "dicom"),
                    "--labels", str(labels), "--out", str(root / "report"),
                    "--threads", str(threads), "--no-progress",
                ]
            )  # fmt: skip
        wall = time.perf_counter() - start
        if code:
            return code
        report = json.loads((root / "report" / "report.json").read_text())
    t = report["timings_s"]
    print(
        f"{report['studies']['scored']} studies, {report['studies']['images']} images, "
        f"{size}x{size}, {threads} encoder thread(s): {wall:.2f} s wall"
    )
    for name in ("read_headers", "decode", "encode", "statistics", "figures"):
        print(f"  {name:<14}{t[name]:>8.3f} s  {100 * t[name] / wall:5.1f} %")
    for code, f in report["findings"].items():
        print(f"  {code}: AUROC {f['auroc']} ({f['auroc_ci95'][0]}-{f['auroc_ci95'][1]})")
    return 1 if t["statistics"] >= 0.1 * wall else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=500)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sys.exit(run(args.studies, args.size, args.threads))
