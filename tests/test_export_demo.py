"""The export stage: encoder → ONNX parity, bundle writing, and the demo bundle end to end.

The slow test rebuilds the demo bundle from scratch and then judges it the way the daemon
would use it: ONNX Runtime on the CPU plus the head from the manifest, on fresh simulated
studies the export never saw. torch is used only to build models, never to score.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from edge_agent.bundle import (  # noqa: E402
    Finding,
    LinearProbeHead,
    ModelInfo,
    Preprocessing,
    load_bundle,
)
from edge_agent.errors import BundleError  # noqa: E402

pytestmark = pytest.mark.export


def tiny_vision_model(image_size: int = 32) -> transformers.SiglipVisionModel:
    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
    )
    return transformers.SiglipVisionModel(config).eval()


def torch_embeddings(model: transformers.SiglipVisionModel, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        pooled = model(pixel_values=torch.from_numpy(x)).pooler_output
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_export_image_encoder_matches_torch_with_dynamic_batch(tmp_path: Path) -> None:
    from export.onnx_export import export_image_encoder

    model = tiny_vision_model()
    result = export_image_encoder(model, 32, tmp_path / "encoder.onnx")

    assert result.files == ["encoder.onnx"]  # small model: one self-contained file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.onnx"]
    assert result.embedding_dim == 32
    assert result.cosine_min >= 0.9999
    assert result.max_abs_diff < 1e-4
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in session.get_outputs()] == ["image_embeds"]
    rng = np.random.default_rng(1)
    for batch in (1, 3):
        x = rng.uniform(-1, 1, size=(batch, 3, 32, 32)).astype(np.float32)
        got = session.run(["image_embeds"], {"pixel_values": x})[0]
        assert got.shape == (batch, 32)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert cosines(got, torch_embeddings(model, x)).min() >= 0.9999


def _probe_head(dim: int) -> LinearProbeHead:
    rng = np.random.default_rng(0)
    return LinearProbeHead(
        weights={c: rng.normal(size=dim).tolist() for c in ("pneumothorax", "lung_nodule")},
        biases={"pneumothorax": -1.0, "lung_nodule": -2.0},
    )


FINDINGS = [
    Finding(code="pneumothorax", label="Pneumothorax", review_threshold=0.3, urgent_threshold=0.7),
    Finding(code="lung_nodule", label="Lung nodule or mass", review_threshold=0.4),
]


def test_external_data_is_listed_and_bundle_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Models over the protobuf limit keep weights in ``.onnx.data``; the bundle names it."""
    import export.onnx_export as onnx_export
    from export.bundle_writer import write_bundle

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    result = onnx_export.export_image_encoder(
        tiny_vision_model(), 32, tmp_path / "work" / "encoder.onnx"
    )
    assert result.files == ["encoder.onnx", "encoder.onnx.data"]
    assert result.cosine_min >= 0.9999

    spec = Preprocessing(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    kwargs = {
        "encoder_onnx": result.onnx_path,
        "model": ModelInfo(name="tiny", version="0", source="test", demo=True),
        "precision": "fp32",
        "preprocessing": spec,
        "head": _probe_head(32),
        "findings": FINDINGS,
        "parity": result.parity(),
    }
    out = write_bundle(tmp_path / "bundle", **kwargs)
    bundle = load_bundle(out)
    assert set(bundle.manifest.files) == {"encoder.onnx", "encoder.onnx.data"}
    assert bundle.manifest.encoder.embedding_dim == 32
    assert bundle.manifest.parity is not None
    assert bundle.manifest.parity["cosine_min"] >= 0.9999
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left

    with pytest.raises(FileExistsError):
        write_bundle(out, **kwargs)
    write_bundle(out, overwrite=True, **kwargs)
    assert load_bundle(out).manifest.files == bundle.manifest.files

    with pytest.raises(BundleError, match=r"preprocessing\.input_size"):
        write_bundle(
            tmp_path / "wrong-size",
            **{**kwargs, "preprocessing": spec.model_copy(update={"input_size": 64})},
        )
    assert not (tmp_path / "wrong-size").exists()


def test_cli_help_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from export.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["demo"])  # --out is required
    assert exc.value.code == 2


def _rescore_with_onnxruntime(bundle_root: Path, pixels: np.ndarray) -> np.ndarray:
    """What the daemon computes: ONNX Runtime embeddings, then the manifest's head."""
    bundle = load_bundle(bundle_root)
    session = ort.InferenceSession(str(bundle.encoder_path), providers=["CPUExecutionProvider"])
    enc = bundle.manifest.encoder
    embeddings = np.concatenate(
        [
            session.run([enc.output_name], {enc.input_name: pixels[i : i + 32]})[0]
            for i in range(0, len(pixels), 32)
        ]
    )
    w, b = bundle.head_arrays()
    return 1.0 / (1.0 + np.exp(-(embeddings @ w.T + b)))


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~100 s alone on 2 cores; training itself is capped at 300 s
def test_demo_bundle_from_scratch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sklearn.metrics import roc_auc_score

    from export.cli import main
    from export.demo import MIN_AUROC, TEST, simulate_studies

    out = tmp_path / "demo-bundle"
    assert main(["demo", "--out", str(out), "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert "held-out AUROC" in printed

    bundle = load_bundle(out)
    manifest = bundle.manifest
    assert manifest.model.demo is True
    assert manifest.model.name == "edge-triage-demo-siglip"
    assert "seed 0" in manifest.model.source
    assert manifest.precision == "fp32"
    assert manifest.created_by.startswith("edge-export ")
    assert [f.code for f in manifest.findings] == ["pneumothorax", "lung_nodule"]
    ptx, nodule = manifest.findings
    assert ptx.label == "Pneumothorax"
    assert ptx.urgent_threshold is not None and ptx.urgent_threshold >= ptx.review_threshold
    assert nodule.label == "Lung nodule or mass" and nodule.urgent_threshold is None
    assert manifest.head.kind == "linear_probe"
    assert manifest.metrics is not None and manifest.parity is not None
    for key in ("auroc_pneumothorax", "auroc_lung_nodule", "auroc_study_abnormal"):
        assert manifest.metrics[key] >= MIN_AUROC, (key, manifest.metrics)
    assert manifest.parity["images_cosine_min"] >= 0.9999
    size = sum(e.size for e in manifest.files.values())
    assert size < 8_000_000, f"demo bundle is {size / 1e6:.1f} MB"

    # Fresh held-out studies (a seed the export never used), scored without torch.
    studies = simulate_studies(
        20_250_101, TEST, 240, manifest.encoder.preprocessing, matrix=256, abnormal_rate=0.4
    )
    scores = _rescore_with_onnxruntime(out, studies.pixels)
    codes = [f.code for f in manifest.findings]
    assert list(studies.codes) == codes
    for j, code in enumerate(codes):
        auroc = roc_auc_score(studies.truth[:, j], scores[:, j])
        assert auroc >= MIN_AUROC, f"{code}: AUROC {auroc:.3f} on fresh studies"
    study_auroc = roc_auc_score(studies.truth.any(axis=1), scores.max(axis=1))
    assert study_auroc >= MIN_AUROC, f"study-level AUROC {study_auroc:.3f} on fresh studies"

    # Tampering with the encoder is refused, naming the file.
    encoder = out / manifest.encoder.file
    data = bytearray(encoder.read_bytes())
    data[len(data) // 2] ^= 0xFF
    encoder.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"encoder\.onnx"):
        load_bundle(out)
    # ... and so is an edited manifest that no longer matches the files.
    manifest_path = out / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    raw["files"]["encoder.onnx"]["size"] += 1
    manifest_path.write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"encoder\.onnx"):
        load_bundle(out)
