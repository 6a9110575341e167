"""Running a benchmark script in its quick mode from a test: the way every benchmark test
starts one (so the benchmarks cannot rot; their figures are judged in docs, not here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_quick(script: str, workdir: Path, *args: str, timeout: float = 110) -> str:
    """``benchmarks/<script> --quick --workdir WORKDIR ARGS…`` with Python's dev mode and
    ResourceWarnings as errors (an unclosed database or socket fails the run); returns its
    standard output once it exited 0 without a traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            "-X",
            "dev",
            "-W",
            "error::ResourceWarning",
            str(ROOT / "benchmarks" / script),
            "--quick",
            "--workdir",
            str(workdir),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout
