"""``edge-export`` run in the test's own process, and the labels CSV its probe and evaluate
commands read: what test_probe, test_evaluate and test_evaluate_drift share."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple


class Run(NamedTuple):
    code: int
    out: str
    err: str


def run_cli(args: Sequence[object]) -> Run:
    """``edge-export ARGS`` in this process, its stdout and stderr (logs included) captured;
    the root logger is restored afterwards."""
    from export.cli import main  # the export extra: imported only by tests that have it

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return Run(code, out.getvalue(), err.getvalue())


def write_labels(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Path:
    """A labels CSV: ``study_instance_uid`` and one column per finding code."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path
