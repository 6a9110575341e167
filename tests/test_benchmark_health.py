"""benchmarks/health.py --quick runs end to end (real readers, a real Store, the daemon's own
status_fields), so the benchmark cannot rot; the figures themselves are not judged here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers.bench import run_quick

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


def test_health_benchmark_quick(tmp_path: Path) -> None:
    out = run_quick("health.py", tmp_path)
    readings = re.findall(r"^\| (this machine \(/\)|fixture Orin Nano) \| \d+ \| \d+ \|", out, re.M)
    assert readings == ["this machine (/)", "fixture Orin Nano"], out
    assert re.search(r"^\| fixture Orin Nano \| \d+ \| \d+ \| 49\.0 \| 5066 \|$", out, re.M), out
    row = r"^\| ([a-z(). ]+[a-z)]) \| \d+ \| \d+ \| \d+ \| ([\d.]+)x \|$"
    variants = re.findall(row, out, re.M)
    assert [name for name, _ in variants] == [
        "without health",
        "with health (shipped)",
        "reading (and health.json) on every refresh",
    ], out
    assert variants[0][1] == "1.00"
    assert re.search(r"health costs [\d.]+x the status refresh as shipped, [\d.]+x if read", out)
    assert list(tmp_path.iterdir()) == [], "the benchmark left files behind"
