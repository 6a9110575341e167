"""benchmarks/board.py --quick runs end to end (Mosquitto, the board process, Chromium pages),
so the benchmark cannot rot; the figures themselves are not judged here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.bench import run_quick

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def test_board_benchmark_quick(tmp_path: Path) -> None:
    out = run_quick("board.py", tmp_path, timeout=170)
    assert "rows never shown: 0" in out, out
    figures = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert figures["latency"]["n"] == 2 * figures["baseline"]["n"] > 0, "every row in both pages"
    assert figures["stream"]["n"] == figures["baseline"]["n"], "and at the plain stream client"
    assert figures["render"]["n"] == 2 and figures["render"]["p50"] > 0
    assert "goal: p99 < 1000 ms" in out
    assert list(tmp_path.iterdir()) == [], "the benchmark left files behind"
