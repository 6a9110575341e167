"""benchmarks/delivery.py --quick runs end to end (real Mosquitto, store on disk, Publisher),
so the benchmark cannot rot; the figures themselves are not judged here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers.bench import run_quick

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


def test_delivery_benchmark_quick(tmp_path: Path) -> None:
    out = run_quick("delivery.py", tmp_path)

    table = out.split("Latency, study complete", 1)[1].split("Where the time goes", 1)[0]
    latency = re.findall(r"^\| (FULL|NORMAL) \| (\d+) \| (\d+) \| .* \| (\d+) \|$", table, re.M)
    assert [(sync, rate) for sync, rate, _, _ in latency] == [
        ("FULL", "1"),
        ("FULL", "20"),
        ("NORMAL", "20"),
    ], out
    assert all(int(n) >= 1 and lost == "0" for _, _, n, lost in latency), out
    maxed = out.split("End to end at the maximum rate", 1)[1]
    assert re.findall(r"^\| (FULL|NORMAL) \| \d+ \| \d+ \| .* \| 0 \|$", maxed, re.M) == [
        "FULL",
        "NORMAL",
    ], out
    assert re.search(r"fsync costs [\d.]+x in outbox throughput", out), out
    assert re.search(r"fsync costs [\d.]+x in delivered results per second", out), out
    goal = re.search(r"^goal: p99 to PUBACK < 50 ms at 20 studies/s .*: ([\d.]+) ms, ", out, re.M)
    assert goal is not None and float(goal.group(1)) > 0, out
    assert re.search(r"load average at start [\d.]+/[\d.]+/[\d.]+", out), out
    assert list(tmp_path.iterdir()) == [], "the benchmark left files behind"
