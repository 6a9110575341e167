"""Encoder benchmark: the full MedSigLIP vision architecture, fp32 against what we ship.

    .venv/bin/python benchmarks/encoder.py [--images 16] [--variants fp32,int8-stock,int8,fp16]

Builds the MedSigLIP-448 vision tower (SigLIP so400m: hidden 1152, 27 layers, 16 heads, MLP
4304, patch 14, 448 px) with random weights (the real weights are gated; the export's parity
gate on the real checkpoint decides what ships), exports it with the export stage's own code
(export.onnx_export, export.quantize: the functions `edge-export siglip` calls), and measures
on ONNX Runtime's CPU provider, each variant in its own process, one after the other:

  size         bytes of the ONNX file(s)
  latency      median seconds per call at batch 1 (every image) and batch 4
  peak RSS     of the measuring process (load + warm-up + all calls)
  cosine       to the PyTorch fp32 embeddings, mean / min, on structured images (simulated
               chest radiographs preprocessed by the daemon's own code), for int8 on the
               half of the images the layer search did NOT see

Variants: fp32 (baseline for every ratio); int8-stock (ONNX Runtime dynamic QInt8 per
channel, reduce_range: the best stock mode measured before); int8 (what `edge-export siglip
--precision int8` ships: the same, with the MatMuls that lose most kept in fp32, found by
export.quantize.mixed_int8); fp16 (for GPU providers; on a CPU it is not faster);
int8-qdq-stock (explicit Q/DQ, symmetric int8, MinMax calibration on the search images);
int8-qdq (what `--int8-mode qdq` ships for TensorRT: the same with the layer search). The
Q/DQ variants are built for TensorRT; their CPU latency is shown for completeness.

Ratios, not absolute times, are the result: they come from the same run on the same machine.
`--tiny` runs a small configuration of the same architecture in seconds (used by the tests).
Exits 1 if a variant fails to run; prints the goal check (int8 ≥ 1.5× fp32 at mean cosine ≥
0.999, ≤ 30% of fp32's size, ≤ 50% of its peak RSS) without failing on it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FULL = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 448,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "patch_size": 8,
    "image_size": 64,
}
ALL_VARIANTS = ("fp32", "int8-stock", "int8", "fp16", "int8-qdq-stock", "int8-qdq")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- measuring child ------------------------------------------------------------------------


def cpu_session(model: Path, threads: int, **config: str) -> tuple[Any, float]:
    """(ONNX Runtime CPU session with ``threads`` intra-op threads and the session config
    entries ``config``, seconds it took to load)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return session, time.perf_counter() - t0


def measure(model: Path, images: Path, threads: int, repeat4: int) -> dict[str, object]:
    """Run in a fresh process: load, warm up, time batch 1 and batch 4, report peak RSS."""
    pixels = np.load(images)
    session, load_s = cpu_session(model, threads)
    session.run(None, {"pixel_values": pixels[:1]})
    b1, outputs = [], []
    for i in range(len(pixels)):
        t0 = time.perf_counter()
        (out,) = session.run(None, {"pixel_values": pixels[i : i + 1]})
        b1.append(time.perf_counter() - t0)
        outputs.append(out[0])
    b4 = []
    for r in range(repeat4):
        batch = np.roll(pixels, -4 * r, axis=0)[:4]
        t0 = time.perf_counter()
        session.run(None, {"pixel_values": batch})
        b4.append(time.perf_counter() - t0)
    np.save(images.with_name(model.stem + ".embeddings.npy"), np.stack(outputs))
    return {
        "load_s": load_s,
        "b1_s": statistics.median(b1),
        "b4_s": statistics.median(b4) if b4 else float("nan"),
        "rss_mb": _peak_rss_mb(),
    }


def _peak_rss_mb() -> float:
    """This process's peak RSS. Not getrusage's ru_maxrss: Linux carries that across exec, so
    a child would report its parent's (torch-laden) peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(model: Path, images: Path, threads: int, repeat4: int) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--measure", str(model), "--pixels", str(images)]
    cmd += ["--threads", str(threads), "--repeat4", str(repeat4)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {model.name} failed:\n{done.stderr[-2000:]}")
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --- the run --------------------------------------------------------------------------------


def build_model(config: dict[str, int], seed: int) -> object:
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    model = SiglipVisionModel(SiglipVisionConfig(**config))
    model.eval()
    return model


def structured_images(n: int, size: int, seed: int) -> np.ndarray:
    from edge_agent.bundle import Preprocessing
    from export.demo import simulate_studies

    spec = Preprocessing(input_size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return simulate_studies(seed, 7, n, spec, matrix=max(size * 2, 256)).pixels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="structured images (default 16)")
    parser.add_argument("--variants", default="fp32,int8-stock,int8,fp16")
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: auto)")
    parser.add_argument("--repeat4", type=int, default=3, help="batch-4 calls timed (default 3)")
    parser.add_argument("--tiny", action="store_true", help="small config, for the tests")
    parser.add_argument("--work", type=Path, help="keep the models here (default: temporary)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pixels", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.pixels, args.threads, args.repeat4)))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(ALL_VARIANTS))
    if unknown or "fp32" not in variants:
        parser.error(f"--variants: choose from {', '.join(ALL_VARIANTS)}, fp32 included")
    if args.images < 4:
        parser.error("--images must be at least 4")
    with tempfile.TemporaryDirectory(prefix="edge-bench-encoder-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        return run(args, variants, work)


def run(args: argparse.Namespace, variants: list[str], work: Path) -> int:
    import torch

    from export import quantize
    from export.onnx_export import cosines, export_image_encoder, torch_embeddings

    torch.set_num_threads(max(1, os.cpu_count() or 1) if args.threads == 0 else args.threads)
    config = TINY if args.tiny else FULL
    size = config["image_size"]
    log(f"architecture {'tiny' if args.tiny else 'MedSigLIP-448 vision'}: {config}")
    model = build_model(config, args.seed)
    pixels = structured_images(args.images, size, args.seed)
    pixel_path = work / "pixels.npy"
    np.save(pixel_path, pixels)
    log(f"{len(pixels)} structured images {pixels.shape[1:]}; PyTorch fp32 reference…")
    reference = torch_embeddings(model, pixels)

    fp32 = work / "fp32" / "encoder.onnx"
    log("exporting fp32 with export.onnx_export.export_image_encoder…")
    t0 = time.monotonic()
    export_image_encoder(model, size, fp32)
    built: dict[str, tuple[Path, float, str]] = {"fp32": (fp32, time.monotonic() - t0, "")}
    del model

    half = len(pixels) // 2
    search, held_out = pixels[:half], np.arange(half, len(pixels))
    for name in variants:
        if name == "fp32":
            continue
        out = work / name / "encoder.onnx"
        log(f"building {name}…")
        t0 = time.monotonic()
        note = ""
        if name == "int8-stock":
            quantize.dynamic_int8(fp32, out)
        elif name in ("int8", "int8-qdq"):
            form = "dynamic" if name == "int8" else "qdq"
            report = quantize.mixed_int8(
                fp32,
                out,
                reference[:half],
                search,
                form=form,
                progress=lambda stage, d, t: log(f"  {stage} {d}/{t}"),
            )
            note = f"{len(report.excluded)} MatMuls fp32: {', '.join(report.excluded_labels)}"
            log("  trials (fp32 MatMuls, mean cosine on search images): " + str(report.trials))
            log("  worst 8 by simulated error: " + str(report.sensitivity[:8]))
        elif name == "fp16":
            quantize.to_fp16(fp32, out)
        elif name == "int8-qdq-stock":
            quantize.qdq_int8(fp32, out, search)
        built[name] = (out, time.monotonic() - t0, note)
        log(f"  built in {built[name][1]:.0f} s")

    rows = {}
    for name, (path, build_s, note) in built.items():
        log(f"measuring {name} in a fresh process…")
        rows[name] = run_child(path, pixel_path, args.threads, args.repeat4)
        got = np.load(pixel_path.with_name(path.stem + ".embeddings.npy"))
        (pixel_path.with_name(path.stem + ".embeddings.npy")).unlink()
        idx = held_out if name.startswith("int8") else np.arange(len(pixels))
        cos = cosines(got[idx], reference[idx])
        rows[name].update(
            size_mb=quantize.file_size(path) / 1e6,
            cos_mean=float(np.mean(cos)),
            cos_min=float(np.min(cos)),
            build_s=build_s,
            note=note,
        )
        log(f"  {name}: {rows[name]}")

    base = rows["fp32"]
    print(
        f"\nMedSigLIP vision ({'tiny' if args.tiny else 'full size'}), random weights, "
        f"ONNX Runtime {_ort_version()} CPU, threads {args.threads or 'auto'}, "
        f"{len(pixels)} structured images, {os.cpu_count()} CPUs: {cpu_description()}\n"
    )
    print(
        "| variant | size | vs fp32 | batch 1 | speed-up | batch 4 | speed-up "
        "| cosine mean / min | peak RSS | vs fp32 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(
            f"| {name} | {r['size_mb']:.1f} MB | {r['size_mb'] / base['size_mb']:.0%} "
            f"| {r['b1_s']:.3f} s | {base['b1_s'] / r['b1_s']:.2f}× "
            f"| {r['b4_s']:.3f} s | {base['b4_s'] / r['b4_s']:.2f}× "
            f"| {r['cos_mean']:.5f} / {r['cos_min']:.5f} "
            f"| {r['rss_mb']:.0f} MB | {r['rss_mb'] / base['rss_mb']:.0%} |"
        )
    for name, r in rows.items():
        if r["note"]:
            print(f"\n{name}: {r['note']}")
    if "int8" in rows:
        r = rows["int8"]
        checks = {
            "≥ 1.5× fp32 (batch 1)": base["b1_s"] / r["b1_s"] >= 1.5,
            "mean cosine ≥ 0.999": r["cos_mean"] >= 0.999,
            "≤ 30% of fp32's size": r["size_mb"] <= 0.3 * base["size_mb"],
            "≤ 50% of fp32's peak RSS": r["rss_mb"] <= 0.5 * base["rss_mb"],
        }
        verdict = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items())
        print(f"\ngoal (int8): {verdict}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def cpu_description() -> str:
    """CPU model and the int8-relevant instruction sets (int8 speed depends on them)."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_fp16", "asimddp"]
    return f"{model} ({', '.join(f for f in wanted if f in flags) or 'no AVX2'})"


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


if __name__ == "__main__":
    sys.exit(main())
