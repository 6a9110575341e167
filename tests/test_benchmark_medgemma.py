"""benchmarks/medgemma.py --tiny runs end to end (build + export with export.medgemma, int4
quantization, a timing process per variant, the int4 token embedding), so the benchmark
cannot rot; the figures themselves are not judged here, except that the int4 embedding
graph (export.medgemma.quantize_embedding) computes exactly its dequantized table."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"[\d.]+"


@pytest.mark.slow
def test_medgemma_benchmark_tiny(tmp_path: Path) -> None:
    work = tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "medgemma.py"), "--tiny"]
    cmd += ["--prompt", "24", "--decode", "4", "--work-dir", str(work)]
    cmd += ["--embedding", "--json", str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert re.search(r"CPUs: .+\(.*avx2|no AVX2", out), out  # CPU model and ISA flags

    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 11 and cells[0] in ("fp32", "int4"):
            rows[cells[0]] = cells
    assert set(rows) == {"fp32", "int4"}, out
    for cells in rows.values():
        size, _, ttft, _, tokens_s, speedup, mean, rss = cells[1:9]
        assert float(mean) > 0, cells
        assert re.fullmatch(rf"{NUMBER} (GB|MB)", size), cells
        assert re.fullmatch(rf"{NUMBER} (s|ms|µs)", ttft), cells
        assert float(tokens_s) > 0, cells
        assert re.fullmatch(rf"{NUMBER}×", speedup), cells
        assert re.fullmatch(rf"{NUMBER} (GB|MB)", rss), cells
    assert rows["fp32"][2] == "100%" and rows["fp32"][6] == "1.00×", rows
    assert re.search(rf"^goal \(int4\): .*\({NUMBER}×\).*\({NUMBER} (GB|MB)", out, re.M), out

    results = json.loads((tmp_path / "out.json").read_text())
    int4 = results["rows"]["int4"]
    assert int4["bytes"] < 0.5 * results["rows"]["fp32"]["bytes"]
    assert len(int4["tokens"]) == 5 and int4["prepacking"] is True
    assert results["rows"]["fp32"]["prepacking"] is False

    embedding = out.split("Token embedding (512 × 64)", 1)[1]
    sizes = re.findall(rf"^\| (fp32|int4) \| ({NUMBER}) (MB|kB) \| (\d+)% \|", embedding, re.M)
    assert [name for name, *_ in sizes] == ["fp32", "int4"], embedding
    assert int(sizes[1][3]) < 30, embedding  # int4 + scales: ~16% of fp32
    cosine = re.search(rf"cosine mean ({NUMBER}) / min ({NUMBER})", embedding)
    assert cosine is not None and float(cosine.group(2)) > 0.98, embedding

    # The int4 embedding graph computes exactly the dequantized table × √D.
    int4_graph = work / "tiny-6L-seed0" / "embed" / "int4" / "embed.onnx"
    tensors = {
        t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(int4_graph)).graph.initializer
    }
    (q4,) = [v for k, v in tensors.items() if k.endswith("_Q4")]
    (scales,) = [v for k, v in tensors.items() if k.endswith("_scales")]
    (sqrt_d,) = [v for k, v in tensors.items() if "embed_scale" in k]
    vocab, hidden = q4.shape
    table = (q4.astype(np.float32).reshape(vocab, -1, 32) * scales[..., None]).reshape(
        vocab, hidden
    ) * sqrt_d
    session = ort.InferenceSession(str(int4_graph), providers=["CPUExecutionProvider"])
    (looked_up,) = session.run(None, {"input_ids": np.arange(vocab)[None]})
    np.testing.assert_allclose(looked_up[0], table, rtol=1e-6, atol=1e-7)

    # A second run reuses the exported and quantized graphs.
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert again.returncode == 0, again.stdout + again.stderr
    for reused in ("fp32: reusing", "int4: reusing", "embedding fp32: reusing"):
        assert reused in again.stderr, again.stderr
