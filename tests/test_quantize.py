"""int8 and fp16 conversion of an exported encoder (export/quantize.py), on a tiny SigLIP
vision tower of the real architecture, run by ONNX Runtime's CPU provider."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")

from export import quantize  # noqa: E402
from export.onnx_export import export_image_encoder  # noqa: E402

pytestmark = pytest.mark.export
SIZE = 32


def vision_tower(outlier: bool) -> transformers.SiglipVisionModel:
    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(
        image_size=SIZE,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
    )
    model = transformers.SiglipVisionModel(config).eval()
    if outlier:
        # One hidden unit of layer 1's MLP fires ~200× harder than the rest, and fc2 reads
        # it with a ~200× smaller weight (the "massive activation" pattern of trained
        # transformers): the output is unchanged in fp32, but the input of layer 1's fc2
        # gets an outlier channel that per-tensor int8 activations cannot represent without
        # crushing every other channel.
        with torch.no_grad():
            mlp = model.encoder.layers[1].mlp
            mlp.fc1.weight[7].mul_(200.0)
            mlp.fc1.bias[7] = 50.0
            mlp.fc2.weight[:, 7].div_(200.0)
    return model


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    out = []
    for _ in range(6):
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2).astype(np.float32)
        grey = 0.6 * disc + 0.4 * yy + 0.05 * rng.standard_normal((SIZE, SIZE))
        out.append(np.repeat((grey * 2 - 1)[None], 3, axis=0))
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "outlier"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    model = vision_tower(outlier=request.param)
    path = tmp_path_factory.mktemp("q") / "encoder.onnx"
    export_image_encoder(model, SIZE, path)
    return request.param, model, path


def reference(model: transformers.SiglipVisionModel, images: np.ndarray) -> np.ndarray:
    from export.onnx_export import _embedding_module

    with torch.inference_mode():
        return _embedding_module(model)(torch.from_numpy(images)).numpy()


def test_weight_matmuls_are_labelled_by_siglip_layer(exported) -> None:
    _, _, path = exported
    labels = [m.label for m in quantize.weight_matmuls(onnx.load(str(path)))]
    assert labels[:6] == [
        "layer 0 self_attn.q_proj",
        "layer 0 self_attn.k_proj",
        "layer 0 self_attn.v_proj",
        "layer 0 self_attn.out_proj",
        "layer 0 mlp.fc1",
        "layer 0 mlp.fc2",
    ]
    assert labels[17] == "layer 2 mlp.fc2" and labels[18].startswith("head matmul")


def test_sensitivity_finds_the_matmul_fed_by_an_outlier_channel(exported, images) -> None:
    outlier, _, path = exported
    ranked = quantize.sensitivity(path, images[:2])
    errors = [e for _, e in ranked]
    assert errors == sorted(errors, reverse=True)
    if outlier:
        worst, error = ranked[0]
        assert worst.label == "layer 1 mlp.fc2"
        assert error > 5 * ranked[1][1]
    else:
        assert ranked[0][1] < 0.05


@pytest.mark.parametrize("form", ["dynamic", "qdq"])
def test_mixed_int8_keeps_the_sensitive_matmul_in_fp32(
    form: quantize.Int8Form, exported, images, tmp_path: Path
) -> None:
    outlier, model, path = exported
    ref = reference(model, images)
    out = tmp_path / "int8" / "encoder.onnx"
    # Static ranges from 3 images lose more than dynamic ones: allow qdq a few more fp32
    # MatMuls than the default sixth of this tiny model's 20.
    limit = 3 if form == "dynamic" else 6
    report = quantize.mixed_int8(
        path, out, ref[:3], images[:3], form=form, target_cosine=0.999, max_fp32=limit
    )
    cos = quantize.cosines(quantize.embed_onnx(out, images[3:]), ref[3:])
    graph = onnx.load(str(out)).graph
    ops = {n.op_type for n in graph.node}
    if form == "dynamic":
        assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}
    else:
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "MatMulInteger" not in ops
        # Only weight MatMuls are quantized: attention's Q·Kᵀ and softmax·V stay float.
        made = {o: n.op_type for n in graph.node for o in n.output}
        fed = {
            n.name
            for n in graph.node
            if n.op_type == "MatMul" and made.get(n.input[0]) == "DequantizeLinear"
        }
        weights = {m.node for m in quantize.weight_matmuls(onnx.load(str(path)))}
        assert fed and fed <= weights
    assert report.quantized > 0 and report.mode.startswith(form)
    if outlier:
        # Plain int8 misses the target; keeping layer 1's fc2 in fp32 reaches it.
        assert report.trials[0][1] < 0.999 <= report.trials[-1][1]
        assert "layer 1 mlp.fc2" in report.excluded_labels
        assert report.sensitivity[0][0] == "layer 1 mlp.fc2"
        excluded_inputs = {
            n.input[1] for n in graph.node if n.op_type == "MatMul" and n.name in report.excluded
        }
        inits = {i.name: i.data_type for i in graph.initializer}
        assert all(inits.get(w) == onnx.TensorProto.FLOAT for w in excluded_inputs)
        assert cos.mean() >= 0.999  # held out: images the search did not see
    else:
        assert report.trials == [(0, report.trials[0][1])] and report.excluded == []
        assert cos.mean() >= 0.99
    assert report.manifest()["int8_matmuls_fp32"] == len(report.excluded)


def test_plain_int8_is_hurt_by_the_outlier(exported, images, tmp_path: Path) -> None:
    outlier, model, path = exported
    out = tmp_path / "plain" / "encoder.onnx"
    quantize.dynamic_int8(path, out)
    cos = quantize.cosines(quantize.embed_onnx(out, images), reference(model, images))
    assert (cos.mean() < 0.999) == outlier


def test_fp16_keeps_float32_io(exported, images, tmp_path: Path) -> None:
    _, model, path = exported
    out = tmp_path / "fp16" / "encoder.onnx"
    quantize.to_fp16(path, out)
    graph = onnx.load(str(out)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert quantize.file_size(out) < 0.7 * quantize.file_size(path)
    cos = quantize.cosines(quantize.embed_onnx(out, images), reference(model, images))
    assert cos.min() > 0.9999


def test_exclusion_schedule() -> None:
    assert quantize.exclusion_schedule(100, 16) == [0, 1, 2, 4, 8, 16]
    assert quantize.exclusion_schedule(100, 12) == [0, 1, 2, 4, 8, 12]
    assert quantize.exclusion_schedule(3, 16) == [0, 1, 2, 3]
    assert quantize.exclusion_schedule(0, 16) == [0]
