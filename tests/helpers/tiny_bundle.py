"""A tiny, hand-built bundle: a real ONNX graph small enough to reason about in tests.

The encoder averages each channel over the image and L2-normalises the 3 values, so the
embedding of a known image can be computed by hand.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from edge_agent.bundle import (
    Encoder,
    Finding,
    LinearProbeHead,
    Manifest,
    ModelInfo,
    Preprocessing,
    file_entries,
    write_manifest,
)

SIZE = 16


def encoder_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])
    y = helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["batch", 3])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    nodes = [
        helper.make_node("ReduceMean", ["pixel_values", "axes"], ["mean"], keepdims=0),
        helper.make_node("LpNormalization", ["mean"], ["image_embeds"], axis=-1, p=2),
    ]
    graph = helper.make_graph(nodes, "tiny", [x], [y], initializer=[axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def make_bundle(root: Path, *, demo: bool = True) -> Path:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    onnx.save(encoder_model(), root / "encoder.onnx")
    findings = [
        Finding(code="bright", label="Bright", review_threshold=0.5, urgent_threshold=0.9),
        Finding(code="dark", label="Dark", review_threshold=0.5),
    ]
    head = LinearProbeHead(
        weights={"bright": [4.0, 4.0, 4.0], "dark": [-4.0, -4.0, -4.0]},
        biases={"bright": -4.0, "dark": -4.0},
    )
    manifest = Manifest(
        model=ModelInfo(name="tiny", version="1", source="tests", demo=demo),
        created_at="2026-11-29T00:00:00Z",
        created_by="tests",
        precision="fp32",
        encoder=Encoder(
            file="encoder.onnx",
            embedding_dim=3,
            preprocessing=Preprocessing(input_size=SIZE, mean=(0.5,) * 3, std=(0.5,) * 3),
        ),
        head=head,
        findings=findings,
        files=file_entries(root, ["encoder.onnx"]),
    )
    write_manifest(root, manifest)
    return root
