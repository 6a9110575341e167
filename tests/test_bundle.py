"""Bundles: verified before use, refused with a message that names the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.tiny_bundle import SIZE, make_bundle

from edge_agent.bundle import load_bundle
from edge_agent.errors import BundleError
from edge_agent.profiles import resolve_profile
from edge_agent.runners import open_runner
from edge_agent.service import demo_bundle_path
from edge_agent.triage import Head


def test_tiny_bundle_loads_and_scores(tmp_path: Path) -> None:
    bundle = load_bundle(make_bundle(tmp_path / "b"))
    profile, _ = resolve_profile("x86-cpu")
    runner = open_runner(bundle, profile)
    assert runner.provider == "CPUExecutionProvider"
    images = np.stack(
        [np.full((3, SIZE, SIZE), 1.0, np.float32), np.full((3, SIZE, SIZE), -1.0, np.float32)]
    )
    emb = runner.embed(images)
    np.testing.assert_allclose(emb[0], [1 / np.sqrt(3)] * 3, rtol=1e-6)
    scores = Head(bundle).scores(emb)
    # bright image: sigmoid(4 * sqrt(3) - 4); dark image the mirror
    expected = 1 / (1 + np.exp(-(4 * np.sqrt(3) - 4)))
    np.testing.assert_allclose(
        scores[0], [expected, 1 / (1 + np.exp(4 * np.sqrt(3) + 4))], rtol=1e-6
    )
    np.testing.assert_allclose(scores[1], scores[0][::-1], rtol=1e-6)


def test_tampered_file_is_refused_by_name(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    data = bytearray((root / "encoder.onnx").read_bytes())
    data[-1] ^= 0xFF
    (root / "encoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"sha256 of encoder\.onnx does not match"):
        load_bundle(root)


def test_missing_file_and_manifest(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    (root / "encoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"encoder\.onnx is listed in the manifest but missing"):
        load_bundle(root)
    (root / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        load_bundle(root)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_wrong_format_and_inconsistent_manifest(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "format": "other/9"}))
    with pytest.raises(BundleError, match="format 'other/9' is not supported"):
        load_bundle(root)
    manifest["head"]["weights"]["dark"] = [1.0]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="embedding_dim"):
        load_bundle(root)


def test_model_identity_ignores_non_scoring_fields(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    before = load_bundle(root).sha256
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["parity"] = {"cosine_mean": 0.9999}
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert load_bundle(root).sha256 == before
    manifest["findings"][0]["review_threshold"] = 0.6
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert load_bundle(root).sha256 != before


def test_shipped_demo_bundle_verifies() -> None:
    bundle = load_bundle(demo_bundle_path())
    assert bundle.manifest.model.demo is True
    assert {f.code for f in bundle.manifest.findings} == {"pneumothorax", "lung_nodule"}


def test_zero_shot_head_is_siglip_scoring(tmp_path: Path) -> None:
    """score = sigmoid(cos(image, mean text) * exp(logit_scale) + logit_bias)."""
    import math

    from edge_agent.bundle import ZeroShotHead, read_manifest, write_manifest

    root = make_bundle(tmp_path / "b")
    manifest = read_manifest(root)
    text = {"bright": [2.0, 0.0, 0.0], "dark": [0.0, 0.0, 3.0]}  # not yet unit length
    head = ZeroShotHead(logit_scale=math.log(10.0), logit_bias=-5.0, text_embeddings=text)
    write_manifest(root, manifest.model_copy(update={"head": head}))
    bundle = load_bundle(root)
    image = np.array([[0.6, 0.0, 0.8]], dtype=np.float32)
    scores = Head(bundle).scores(image)
    expected = [1 / (1 + math.exp(-(0.6 * 10 - 5))), 1 / (1 + math.exp(-(0.8 * 10 - 5)))]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-6)
