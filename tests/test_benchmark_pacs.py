"""benchmarks/pacs.py --quick runs end to end (real Orthanc and Mosquitto, the daemon's Store,
Publisher and PACS worker), so the benchmark cannot rot; its figures are not judged here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.orthanc import needs_orthanc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300), needs_orthanc]

ROOT = Path(__file__).resolve().parents[1]


def test_pacs_benchmark_quick() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-X",
            "dev",
            "-W",
            "error::ResourceWarning",  # an unclosed socket or database fails the run
            str(ROOT / "benchmarks" / "pacs.py"),
            "--quick",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=290,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert re.search(r"^  1 image\(s\)\s+[\d.]+\s+[\d.]+$", out, re.M), out
    for what in ("socket untuned", "socket tuned", "one association for all"):
        assert re.search(rf"^  [^\n]*{what}[^\n]*\s[\d.]+\s+[\d.]+$", out, re.M), out
    rows = re.findall(
        r"^  (pacs-off|pacs-on-not-niced|pacs-on)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+0\s",
        out,
        re.M,
    )
    assert rows == ["pacs-off", "pacs-on-not-niced", "pacs-on"], out
    assert re.search(r"^PacsWorker.step .*: [\d.]+ SR/s \(its sender process started in", out, re.M)
    lateness = re.findall(r"^  beside (.+?)\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out, re.M)
    assert len(lateness) == 4 and "SR-building process" in lateness[-1], out
    # the daemon's road: both studies through every stage, and the SR's share of it
    stages = re.findall(r"^  (last instance|result stored) .+?\s+2(\s+[\d.]+){3}$", out, re.M)
    assert len(stages) == 4, out
    assert re.search(r"^  the SR's share of the road at the median: [\d.]+%;", out, re.M), out
