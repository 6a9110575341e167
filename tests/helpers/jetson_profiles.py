"""The shipped Jetson profiles with the native TensorRT runner opted in, as a site would do it:
the one line ``runner = "tensorrt"`` changed (the profiles default to ONNX Runtime's TensorRT
execution provider until the native runner has run on a GPU)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def native_runner_profile(folder: Path, name: str = "jetson-orin-nano") -> Path:
    text = (REPO / "firmware_configs" / f"{name}.toml").read_text()
    assert text.count('runner = "onnxruntime"') == 1
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(text.replace('runner = "onnxruntime"', 'runner = "tensorrt"'))
    return path
