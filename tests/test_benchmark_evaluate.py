"""benchmarks/evaluate.py --quick runs end to end (simulated studies, the real edge-export
evaluate CLI with the demo bundle), so the benchmark cannot rot; its figures, and whether
the bootstrap stayed under its share of the run, are judged by the benchmark's full run and
quoted in docs/evaluation.md, not here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers.bench import run_quick

pytest.importorskip("onnxruntime")
pytest.importorskip("matplotlib")

pytestmark = [pytest.mark.export, pytest.mark.slow, pytest.mark.timeout(120)]

PARTS = ["read_headers", "decode", "encode", "statistics", "bootstrap", "figures", "rest"]


def test_evaluate_benchmark_quick(tmp_path: Path) -> None:
    out = run_quick("evaluate.py", tmp_path)
    head = re.search(
        r"^30 studies, 30 images, 256x256, 1 encoder thread\(s\), 2000 bootstrap resamples x 2 "
        r"findings: ([\d.]+) s wall$",
        out,
        re.M,
    )
    assert head is not None and float(head.group(1)) > 0, out
    parts = re.findall(r"^  ([a-z_]+) +([\d.]+) s +([\d.]+) %", out, re.M)
    assert [name for name, _, _ in parts] == PARTS, out
    shares = {name: float(share) for name, _, share in parts}
    assert shares["bootstrap"] <= shares["statistics"], out
    assert sum(v for k, v in shares.items() if k != "bootstrap") == pytest.approx(100, abs=0.5)
    assert re.findall(r"^  (pneumothorax|lung_nodule): AUROC [\d.]+ \([\d.]+-[\d.]+\)$", out, re.M)
    assert re.search(
        r"^baseline: scoring the studies \(headers, decoding, encoder\) [\d.]+ s; ratios to it: "
        r"whole run [\d.]+x, statistics [\d.]+x, bootstrap [\d.]+x, figures [\d.]+x$",
        out,
        re.M,
    ), out
    claim = re.search(
        r"^claim: the bootstrap \(2000 resamples of 30 studies, 2 findings\) under 10% of the "
        r"run: ([\d.]+) %, not judged \(--quick\)$",
        out,
        re.M,
    )
    assert claim is not None and float(claim.group(1)) == shares["bootstrap"], out
    assert list(tmp_path.iterdir()) == [], "the benchmark left files behind"
