"""TensorRT benchmark: the MedSigLIP vision encoder on an NVIDIA GPU, TensorRT vs ONNX Runtime.

    python benchmarks/tensorrt_encoder.py [--precision fp16] [--repeat 20] [--images 4]

For a machine with an NVIDIA GPU (about 10 minutes on an H200, most of it the ONNX export on
the CPU and TensorRT's build). It needs, besides this package: torch (the CPU build is
enough: the export runs on the CPU), transformers, onnx, onnxscript, onnxruntime-gpu (not
together with onnxruntime), tensorrt (pip install tensorrt-cu12 or -cu13, matching the
driver's CUDA) and cuda-python of the same CUDA major version.

Stages, each printed with its elapsed time:

  1. the full-size MedSigLIP vision architecture (transformers SiglipVisionConfig: hidden
     1152, 27 layers, 16 heads, MLP 4304, patch 14, 448 px) with random weights (seeded)
  2. exported by the project's export.onnx_export.export_image_encoder (dynamo, opset 18,
     checked against PyTorch) into a bundle (export.bundle_writer.write_bundle)
  3. the TensorRT engine built by the project's `edge-export tensorrt` code
     (export.tensorrt.build_for_bundle) with a profile derived from x86-cuda, recorded in
     the bundle; on TensorRT 11 (no fp16 builder flag) an fp16 bundle is made first
  4. the engine loaded by the daemon's own TensorRT runner (edge_agent.runners.tensorrt)
  5. ONNX Runtime's CUDA provider on the fp32 encoder, and ONNX Runtime's CPU provider
     as the reference
  6. median latency at batch 1 and 4 (host arrays in and out, copies included) and the
     cosine of each GPU backend's embeddings to the CPU reference on a few structured images

Exit status: 0 when the cosines meet the thresholds (min >= 0.999 for fp16, 0.9999 for fp32
and ONNX Runtime CUDA), 1 when they do not, 3 when a needed package or the GPU is missing.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZE = 448
THRESHOLD = {"fp16": 0.999, "fp32": 0.9999}
_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    """Versions of what the benchmark needs; exits 3 naming what is missing."""
    needed = {
        "torch": "torch",
        "transformers": "transformers",
        "onnx": "onnx",
        "onnxscript": "onnxscript",
        "onnxruntime": "onnxruntime-gpu",
        "tensorrt": "tensorrt (e.g. tensorrt-cu12)",
    }
    found: dict[str, str] = {}
    missing: list[str] = []
    for module, package in needed.items():
        try:
            found[module] = str(getattr(importlib.import_module(module), "__version__", "?"))
        except (ImportError, OSError) as exc:
            missing.append(f"{package} ({exc})")
    for name in ("cuda.bindings", "cuda"):
        try:
            mod = importlib.import_module(name)
            found["cuda-python"] = str(getattr(mod, "__version__", "?"))
            break
        except ImportError:
            continue
    else:
        missing.append("cuda-python")
    if missing:
        print("missing: " + "; ".join(missing), file=sys.stderr)
        sys.exit(3)
    return found


def structured_images(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    """n chest-like images (gradient, body, lungs, ribs, a blob or two), preprocessed as the
    encoder expects: (n, 3, size, size) float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1.0 : 1.0 : size * 1j, -1.0 : 1.0 : size * 1j]

    def ellipse(cx: float, cy: float, rx: float, ry: float, edge: float = 0.05) -> np.ndarray:
        r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
        return np.clip((1.0 - r) / edge, 0.0, 1.0)

    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        img = (
            0.2 + 0.2 * (y + 1.0) * rng.uniform(0.5, 1.5) + 0.6 * ellipse(0, 0.05, 0.85, 0.95, 0.15)
        )
        lungs = ellipse(-0.38, -0.1, 0.28, 0.55, 0.1) + ellipse(0.38, -0.1, 0.28, 0.55, 0.1)
        img -= 0.45 * lungs
        img += 0.1 * lungs * (0.5 + 0.5 * np.sin(y * rng.uniform(30, 45) + 4.0 * x**2)) ** 4
        for _ in range(int(rng.integers(0, 3))):
            cx, cy = rng.uniform(-0.5, 0.5, 2)
            rx, ry = rng.uniform(0.03, 0.12, 2)
            img += 0.3 * ellipse(float(cx), float(cy), float(rx), float(ry), 0.5)
        img += rng.normal(0.0, 0.01, img.shape)
        img = (img - img.min()) / (img.max() - img.min())
        out[i] = (img * 2.0 - 1.0).astype(np.float32)[None]
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def median_ms(run: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, repeat: int) -> float:
    for _ in range(3):
        run(batch)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run(batch)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def build_vision_model(layers: int, seed: int) -> Any:
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(
        hidden_size=1152,
        num_hidden_layers=layers,
        num_attention_heads=16,
        intermediate_size=4304,
        patch_size=14,
        image_size=SIZE,
        num_channels=3,
    )
    return SiglipVisionModel(config).eval()


def write_encoder_bundle(
    onnx_path: Path, out: Path, precision: Literal["fp32", "fp16"], dim: int
) -> Path:
    from edge_agent.bundle import Finding, LinearProbeHead, ModelInfo, Preprocessing
    from export.bundle_writer import write_bundle

    rng = np.random.default_rng(0)
    head = LinearProbeHead(
        weights={"bench": [float(v) for v in rng.normal(0, 0.05, dim)]}, biases={"bench": 0.0}
    )
    return write_bundle(
        out,
        encoder_onnx=onnx_path,
        model=ModelInfo(
            name="medsiglip-architecture-random",
            version="benchmark",
            source="random weights (benchmarks/tensorrt_encoder.py)",
            demo=True,
        ),
        precision=precision,
        preprocessing=Preprocessing(input_size=SIZE, mean=(0.5,) * 3, std=(0.5,) * 3),
        head=head,
        findings=[Finding(code="bench", label="Benchmark", review_threshold=0.5)],
        move=True,
    )


def write_profile(path: Path, precision: Literal["fp32", "fp16"]) -> Path:
    """x86-cuda's [tensorrt] settings with the native runner (what a Jetson profile does)."""
    from edge_agent.profiles import resolve_profile

    base, _ = resolve_profile("x86-cuda")
    assert base.tensorrt is not None
    t = base.tensorrt
    path.write_text(
        f'name = "bench-tensorrt"\ndescription = "benchmark: x86-cuda with the native runner"\n'
        f'[runtime]\nrunner = "tensorrt"\nbatch_size = 4\nprecision = "fp32"\n'
        f'[tensorrt]\nengine = "bundle"\nprecision = "{precision}"\n'
        f"workspace_mib = {t.workspace_mib}\nmin_batch = 1\nopt_batch = 1\nmax_batch = 4\n"
        f"builder_optimization_level = {t.builder_optimization_level}\ntiming_cache = false\n"
    )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--precision",
        choices=["fp16", "fp32"],
        default="fp16",
        help="TensorRT engine precision (default fp16)",
    )
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per case (default 20)")
    parser.add_argument(
        "--images", type=int, default=4, help="structured images for the cosine check (default 4)"
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=27,
        help="encoder layers (default 27, MedSigLIP's; fewer for a quick try)",
    )
    parser.add_argument("--work", type=Path, help="keep the bundle and profile in this folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    found = versions()
    say("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()))

    from edge_agent.errors import EdgeTriageError
    from edge_agent.runners.tensorrt import device_identity
    from export.cli import setup_logging

    setup_logging(debug=False)  # the project's progress lines (export, TensorRT build)
    try:
        identity = device_identity()
    except EdgeTriageError as exc:
        print(f"no GPU: {exc}", file=sys.stderr)
        return 3
    say(f"GPU: {identity.name}, compute capability {identity.compute_capability}")

    work = args.work or Path(tempfile.mkdtemp(prefix="edge-trt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, work, found)
    except EdgeTriageError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path, found: dict[str, str]) -> int:
    import onnxruntime as ort
    import tensorrt as trt

    from edge_agent.bundle import load_bundle
    from edge_agent.profiles import resolve_profile
    from edge_agent.runners import open_runner
    from edge_agent.runners.onnxruntime import cuda_provider_options
    from export.onnx_export import INPUT_NAME, OUTPUT_NAME, export_image_encoder
    from export.tensorrt import build_for_bundle, format_summary

    say(f"stage 1: SiglipVisionModel, {args.layers} layers, random weights (seed {args.seed})")
    model = build_vision_model(args.layers, args.seed)
    params = sum(p.numel() for p in model.parameters())
    say(f"  {params / 1e6:.0f} M parameters")

    say("stage 2: ONNX export (export_image_encoder) and bundle")
    t = time.monotonic()
    result = export_image_encoder(model, SIZE, work / "export" / "encoder.onnx")
    export_seconds = time.monotonic() - t
    del model
    bundle_dir = write_encoder_bundle(
        result.onnx_path, work / "bundle-fp32", "fp32", result.embedding_dim
    )
    fp32_onnx = load_bundle(bundle_dir).encoder_path
    say(f"  exported in {export_seconds:.0f} s; onnx vs torch min cosine {result.cosine_min:.7f}")

    trt_bundle = bundle_dir
    strongly_typed = not hasattr(trt.BuilderFlag, "FP16")
    if args.precision == "fp16" and strongly_typed:
        from export.quantize import to_fp16

        say(f"  TensorRT {trt.__version__} is strongly typed: converting the encoder to fp16")
        fp16_dir = work / "export-fp16"
        to_fp16(fp32_onnx, fp16_dir / "encoder.onnx")
        trt_bundle = write_encoder_bundle(
            fp16_dir / "encoder.onnx", work / "bundle-fp16", "fp16", result.embedding_dim
        )

    say(f"stage 3: TensorRT {trt.__version__} engine ({args.precision}) via edge-export tensorrt")
    profile_path = write_profile(work / "bench-tensorrt.toml", args.precision)
    built = build_for_bundle(trt_bundle, str(profile_path), timing_cache=None)
    print(format_summary(built), file=sys.stderr)

    say("stage 4: the daemon's TensorRT runner")
    profile, _ = resolve_profile(str(profile_path))
    runner = open_runner(load_bundle(trt_bundle), profile)

    say("stage 5: ONNX Runtime CUDA and CPU sessions on the fp32 encoder")
    available = ort.get_available_providers()
    cuda_session = None
    if "CUDAExecutionProvider" in available:
        cuda_session = ort.InferenceSession(
            str(fp32_onnx),
            providers=[("CUDAExecutionProvider", cuda_provider_options()), "CPUExecutionProvider"],
        )
        if cuda_session.get_providers()[0] != "CUDAExecutionProvider":
            say(f"  ONNX Runtime fell back to {cuda_session.get_providers()}: CUDA row skipped")
            cuda_session = None
    else:
        say(f"  CUDAExecutionProvider not available (ONNX Runtime has {available}): skipped")
    cpu_session = ort.InferenceSession(str(fp32_onnx), providers=["CPUExecutionProvider"])

    def ort_run(session: Any) -> Callable[[np.ndarray], np.ndarray]:
        return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]

    images = structured_images(args.images, seed=args.seed)
    say(f"stage 6: reference embeddings of {len(images)} images on the CPU")
    reference = np.concatenate(
        [ort_run(cpu_session)(images[i : i + 1]) for i in range(len(images))]
    )

    rows: list[tuple[str, str, float, float, np.ndarray]] = []
    cases: list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]] = [
        (f"TensorRT {trt.__version__} (native runner)", args.precision, runner.embed)
    ]
    if cuda_session is not None:
        cases.append((f"ONNX Runtime {ort.__version__} CUDA", "fp32", ort_run(cuda_session)))
    for name, precision, fn in cases:
        say(f"  timing {name}…")
        b1 = median_ms(fn, images[:1], args.repeat)
        batch4 = np.concatenate([images] * 4)[:4]
        b4 = median_ms(fn, batch4, args.repeat)
        emb = np.concatenate([fn(images[i : i + 1]) for i in range(len(images))])
        rows.append((name, precision, b1, b4, cosines(emb, reference)))

    print()
    print(
        f"MedSigLIP vision architecture ({args.layers} layers, {SIZE} px, random weights) on "
        f"{built.identity.name}; {', '.join(f'{k} {v}' for k, v in found.items())}"
    )
    print(
        f"export {export_seconds:.0f} s; TensorRT build {built.engine.build_seconds:.0f} s, "
        f"engine {built.size / 1e6:.0f} MB"
    )
    print()
    header = (
        f"{'backend':<34} {'precision':<9} {'batch 1 ms':>10} {'batch 4 ms':>10} "
        f"{'ms/image@4':>10}  cosine to CPU fp32 mean / min"
    )
    print(header)
    print("-" * len(header))
    ok = True
    for name, precision, b1, b4, cos in rows:
        passed = float(cos.min()) >= THRESHOLD[precision]
        ok &= passed
        verdict = "ok" if passed else f"BELOW {THRESHOLD[precision]}"
        print(
            f"{name:<34} {precision:<9} {b1:>10.2f} {b4:>10.2f} {b4 / 4:>10.2f}  "
            f"{cos.mean():.6f} / {cos.min():.6f} {verdict}"
        )
    print()
    print("latency: median of", args.repeat, "runs after 3 warm-ups, numpy arrays in and out")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
