"""benchmarks/narrative_priority.py --tiny runs end to end (real exports, real ONNX Runtime
sessions, a niced generating thread), so the benchmark cannot rot; the figures themselves are
not judged here (docs/benchmarks.md quotes the full run)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = [pytest.mark.export, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]


def test_narrative_priority_benchmark_tiny() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "narrative_priority.py"), "--tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    rows = re.findall(
        r"^\| (alone|nice 0|nice 10) \| ([\d.]+) ms .*\| ([\d.]+)× \| (\S+) \|$", proc.stdout, re.M
    )
    assert [r[0] for r in rows] == ["alone", "nice 0", "nice 10"], proc.stdout
    assert rows[0][2] == "1.00"
    assert all(int(r[3]) > 0 for r in rows[1:]), "the decoder really ran meanwhile"
