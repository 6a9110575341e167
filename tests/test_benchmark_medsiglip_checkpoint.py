"""benchmarks/medsiglip_checkpoint.py --tiny writes a checkpoint folder that the export stage
loads as it loads a real one, so the full-size run cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def test_the_tiny_checkpoint_loads_like_a_real_one(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from encoder import TINY

    from export.siglip import load_checkpoint

    out = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "medsiglip_checkpoint.py"), "--tiny",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SigLIP tiny at 64 px, random weights (seed 0)" in proc.stdout
    vision = json.loads((out / "config.json").read_text())["vision_config"]
    assert {k: vision[k] for k in TINY} == TINY
    checkpoint = load_checkpoint(out)
    assert checkpoint.preprocessing.input_size == TINY["image_size"]
    assert checkpoint.preprocessing.mean == (0.5, 0.5, 0.5)
