"""Lower-precision variants of an exported fp32 encoder: fp16 and int8.

int8 comes in two forms, because the two places it runs want different graphs:

``dynamic`` (ONNX Runtime on a CPU)
    Weights int8 per output channel, activations quantized per batch at run time
    (``MatMulInteger``/``DynamicQuantizeMatMul``). On CPUs without VNNI (AVX2 only), signed
    int8 weights at full range overflow the u8×s8 multiply-add's 16-bit intermediate and lose
    fidelity (ONNX Runtime documents this), so weights use 7 bits (``reduce_range``). What
    is left of the error is concentrated in a few MatMuls; :func:`mixed_int8` ranks
    them and keeps just enough of them in fp32 to meet a cosine target ("mixed" precision).

``qdq`` (TensorRT, or ONNX Runtime's TensorRT provider)
    Explicit QuantizeLinear/DequantizeLinear pairs, symmetric int8 activations and weights,
    activation ranges from calibration images (MinMax). TensorRT reads the scales from the
    graph; its implicit INT8 calibrators are deprecated since TensorRT 10.1.

onnx and onnxruntime are imported inside functions.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    _import_onnx,
    _import_ort,
    cosines,
    onnx_files,
    remove_onnx,
)

logger = logging.getLogger(__name__)

# MatMuls whose simulated relative output error is below this are never worth excluding.
NEGLIGIBLE_ERROR = 1e-3


@dataclass(frozen=True)
class WeightMatMul:
    """A MatMul whose second input is a constant weight: what int8 quantization changes."""

    node: str
    activation: str
    weight: str
    shape: tuple[int, int]
    label: str
    """Human-readable position, e.g. ``layer 26 mlp.fc2`` (by order in the graph)."""


@dataclass
class Int8Report:
    """What the int8 search did, for the manifest and the summary."""

    mode: str
    excluded: list[str] = field(default_factory=list)
    excluded_labels: list[str] = field(default_factory=list)
    quantized: int = 0
    sensitivity: list[tuple[str, float]] = field(default_factory=list)
    trials: list[tuple[int, float]] = field(default_factory=list)
    """(number of MatMuls kept in fp32, mean cosine on the search images) per attempt."""
    seconds: float = 0.0

    def manifest(self) -> dict[str, float | int | str | bool]:
        out: dict[str, float | int | str | bool] = {
            "int8_mode": self.mode,
            "int8_matmuls_quantized": self.quantized,
            "int8_matmuls_fp32": len(self.excluded),
        }
        if self.excluded_labels:
            out["int8_fp32_layers"] = ", ".join(self.excluded_labels)
        return out


def _load(path: Path, *, weights: bool) -> Any:
    onnx = _import_onnx()
    return onnx.load(str(path), load_external_data=weights)


def _save(model: Any, path: Path) -> list[str]:
    """Save as one file when it fits a protobuf, else with one external data file."""
    onnx = _import_onnx()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_onnx(path)
    if model.ByteSize() < 1_800_000_000:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{path.name}.data",
        )
    return onnx_files(path)


def weight_matmuls(model: Any) -> list[WeightMatMul]:
    """The MatMuls with a 2-D constant weight, in graph order, with readable labels.

    Labels follow the SigLIP layout (per encoder layer: q, k, v, out, fc1, fc2; then the
    attention-pooling head) when the count fits it, else ``matmul N``.
    """
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]]) == 2:
            k, n = inits[node.input[1]]
            found.append((node.name, node.input[0], node.input[1], (int(k), int(n))))
    roles = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"]
    roles += ["mlp.fc1", "mlp.fc2"]
    layers = len(found) // len(roles)
    out = []
    for index, (name, act, weight, shape) in enumerate(found):
        layer, role = divmod(index, len(roles))
        if layer < layers and len(found) - layers * len(roles) <= 4:
            label = f"layer {layer} {roles[role]}"
        elif layer >= layers and len(found) - layers * len(roles) <= 4:
            label = f"head matmul {index - layers * len(roles)}"
        else:
            label = f"matmul {index}"
        out.append(WeightMatMul(name, act, weight, shape, label))
    return out


def to_fp16(src: Path, dst: Path) -> list[str]:
    """fp16 weights and compute, fp32 input and output (the daemon feeds float32).

    For GPU providers: on a CPU, ONNX Runtime runs most fp16 operators by casting back to
    fp32, so this is no faster there. Returns the written files (relative to dst's folder).
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = _load(src, weights=True)
    # LayerNormalization and the final L2 normalisation stay fp32: their reductions are what
    # overflows in fp16 on large activations.
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        disable_shape_infer=True,
        op_block_list=["LayerNormalization", "ReduceL2", "Softmax"],
    )
    return _save(converted, dst)


def dynamic_int8(src: Path, dst: Path, *, exclude: Sequence[str] = ()) -> list[str]:
    """Dynamic int8: weights QInt8 per channel with 7 bits (reduce_range), MatMuls only;
    ``exclude``: MatMul node names kept in fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_onnx(dst)
    quantize_dynamic(
        str(src),
        str(dst),
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        reduce_range=True,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(exclude),
        use_external_data_format=False,
        extra_options={"MatMulConstBOnly": True},
    )
    return onnx_files(dst)


class _Images:
    """A calibration data reader over preprocessed images, one image per call."""

    def __init__(self, images: np.ndarray) -> None:
        self._it = iter(images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self._it, None)
        return None if image is None else {INPUT_NAME: image[None].astype(np.float32)}


def qdq_int8(
    src: Path, dst: Path, calibration: np.ndarray, *, exclude: Sequence[str] = ()
) -> list[str]:
    """Static int8 in explicit Q/DQ form for TensorRT: symmetric int8 activations (MinMax over
    ``calibration``, (N, 3, H, W)) and per-channel symmetric int8 weights, MatMuls only."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_onnx(dst)
    # Only the weight MatMuls, named one by one: the QDQ quantizer ignores MatMulConstBOnly
    # and would otherwise also quantize attention's Q·Kᵀ and softmax·V, whose int8 error no
    # exclusion of weight MatMuls can undo (mean cosine 0.986 on MedSigLIP's architecture).
    skip = set(exclude)
    wanted = [m.node for m in weight_matmuls(_load(src, weights=False)) if m.node not in skip]
    with tempfile.TemporaryDirectory(prefix="edge-export-calib-") as tmp:
        quantize_static(
            str(src),
            str(dst),
            _Images(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=wanted,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude),
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=False,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "MatMulConstBOnly": True,
                "CalibTensorRangeSymmetric": True,
                "CalibIntermediateOutputsDir": tmp,
            },
        )
    return onnx_files(dst)


Int8Form = Literal["dynamic", "qdq"]


def _simulated_error(
    x: np.ndarray, w: np.ndarray, rows: np.ndarray, form: Int8Form, absmax: float
) -> float:
    """Relative output error of x @ w under ONNX Runtime's int8 arithmetic.

    dynamic: activations uint8, asymmetric, per tensor, range from the whole tensor
    (DynamicQuantizeLinear); weights int8 symmetric per output column, 7 bits (-64..64,
    reduce_range). qdq: activations int8 symmetric per tensor with the calibrated range
    ``absmax`` (MinMax over the calibration images); weights int8 symmetric per output
    column (-127..127). Only ``rows`` of x are multiplied (the error is a per-row property;
    the activation scale still comes from all rows or the calibration).
    """
    x2 = x.reshape(-1, x.shape[-1])
    xs = x2[rows]
    if form == "dynamic":
        lo, hi = min(float(x2.min()), 0.0), max(float(x2.max()), 0.0)
        scale = (hi - lo) / 255.0 or 1.0
        zero = np.clip(np.round(-lo / scale), 0, 255)
        xq = (np.clip(np.round(xs / scale) + zero, 0, 255) - zero) * scale
        wlevels = 64.0
    else:
        scale = absmax / 127.0 or 1.0
        xq = np.clip(np.round(xs / scale), -127, 127) * scale
        wlevels = 127.0
    wmax = np.abs(w).max(axis=0)
    wscale = np.where(wmax > 0, wmax / wlevels, 1.0)
    wq = np.clip(np.round(w / wscale), -wlevels, wlevels) * wscale
    ref = xs @ w
    got = xq.astype(np.float32) @ wq.astype(np.float32)
    return float(np.linalg.norm(got - ref) / max(float(np.linalg.norm(ref)), 1e-12))


def sensitivity(
    src: Path,
    images: np.ndarray,
    *,
    form: Int8Form = "dynamic",
    rows: int = 256,
    threads: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[WeightMatMul, float]]:
    """Rank the weight MatMuls of ``src`` by how much int8 (``form``) hurts their output.

    Runs the fp32 model on ``images`` with every MatMul's input exposed as an output, and
    replays each MatMul in numpy with int8 arithmetic (:func:`_simulated_error`; for qdq
    the activation ranges are the images' MinMax, as calibration would find). Returns
    (matmul, mean relative error) sorted worst first. A model with external data keeps it:
    the probe graph is written next to it.
    """
    onnx = _import_onnx()
    ort = _import_ort()
    graph_only = _load(src, weights=False)
    matmuls = weight_matmuls(graph_only)
    if not matmuls:
        return []
    acts = sorted({m.activation for m in matmuls})
    existing = {o.name for o in graph_only.graph.output}
    for name in acts:
        if name not in existing:
            graph_only.graph.output.append(onnx.ValueInfoProto(name=name))
    probe = src.parent / f".{src.stem}.sensitivity.onnx"
    onnx.save_model(graph_only, str(probe))
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        session = ort.InferenceSession(
            str(probe), sess_options=options, providers=["CPUExecutionProvider"]
        )
    finally:
        probe.unlink(missing_ok=True)
    from onnx import numpy_helper

    full = _load(src, weights=True)
    inits = {i.name: i for i in full.graph.initializer if i.name in {m.weight for m in matmuls}}
    weights = {name: numpy_helper.to_array(t).astype(np.float32) for name, t in inits.items()}
    del full, inits

    def run(image: np.ndarray) -> dict[str, np.ndarray]:
        outs = session.run(acts, {INPUT_NAME: image[None].astype(np.float32)})
        return dict(zip(acts, outs, strict=True))

    steps = len(images) * (2 if form == "qdq" else 1)
    done = 0
    absmax = dict.fromkeys(acts, 0.0)
    if form == "qdq":  # first pass: the calibrated ranges
        for image in images:
            for name, x in run(image).items():
                absmax[name] = max(absmax[name], float(np.abs(x).max()))
            done += 1
            if progress is not None:
                progress(done, steps)
    errors = np.zeros(len(matmuls))
    rng = np.random.default_rng(0)
    for image in images:
        by_name = run(image)
        for j, mm in enumerate(matmuls):
            x = by_name[mm.activation]
            n = int(np.prod(x.shape[:-1]))
            pick = np.sort(rng.choice(n, size=min(rows, n), replace=False))
            errors[j] += _simulated_error(x, weights[mm.weight], pick, form, absmax[mm.activation])
        done += 1
        if progress is not None:
            progress(done, steps)
    errors /= max(len(images), 1)
    order = np.argsort(-errors)
    return [(matmuls[k], float(errors[k])) for k in order]


def embed_onnx(path: Path, images: np.ndarray, *, threads: int = 0, batch: int = 1) -> np.ndarray:
    """Embeddings of ``images`` by an ONNX encoder on ONNX Runtime's CPU provider."""
    ort = _import_ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    outs = [
        session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + batch].astype(np.float32)})[0]
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(outs).astype(np.float32)


def exclusion_schedule(total: int, limit: int) -> list[int]:
    """How many of the worst MatMuls to keep in fp32, attempt by attempt: 0, 1, 2, 4, …"""
    steps, k = [0], 1
    while k <= min(limit, total):
        steps.append(k)
        k *= 2
    if steps[-1] < min(limit, total):
        steps.append(min(limit, total))
    return steps


def mixed_int8(
    src: Path,
    dst: Path,
    reference: np.ndarray,
    images: np.ndarray,
    *,
    form: Int8Form = "dynamic",
    target_cosine: float = 0.999,
    max_fp32: int | None = None,
    threads: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> Int8Report:
    """int8 (``form``) with the fewest fp32 MatMuls that reach ``target_cosine``.

    ``images`` are also the calibration images of the qdq form.
    ``reference``: fp32 embeddings of ``images`` (from PyTorch). Everything int8 is tried
    first; if its mean cosine to ``reference`` on ``images`` misses the target, the MatMuls
    are ranked by :func:`sensitivity` and 1, 2, 4, … of the worst are kept in fp32 until the
    target is reached or ``max_fp32`` (default: a sixth of them, beyond which int8 stops
    paying) is: the best attempt is kept and the parity gate decides. Writes ``dst`` and
    reports what it did.
    """
    started = time.monotonic()
    report = Int8Report(
        mode="dynamic, weights int8 per channel (7-bit), fp32 where sensitive"
        if form == "dynamic"
        else "qdq, symmetric int8 activations (MinMax) and weights per channel, fp32 where "
        "sensitive"
    )
    total = len(weight_matmuls(_load(src, weights=False)))
    limit = max_fp32 if max_fp32 is not None else max(1, total // 6)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=dst.parent) as tmp:

        def attempt(excluded: list[WeightMatMul]) -> tuple[float, Path]:
            trial = Path(tmp) / f"try{len(excluded)}" / dst.name
            names = [m.node for m in excluded]
            if form == "dynamic":
                dynamic_int8(src, trial, exclude=names)
            else:
                qdq_int8(src, trial, images, exclude=names)
            emb = embed_onnx(trial, images, threads=threads)
            mean = float(np.nanmean(cosines(emb, reference)))
            report.trials.append((len(excluded), mean))
            logger.info("int8 with %d MatMul(s) in fp32: mean cosine %.5f", len(excluded), mean)
            return mean, trial

        mean, trial = attempt([])
        best: tuple[float, list[WeightMatMul], Path] = (mean, [], trial)
        if mean < target_cosine and limit > 0:
            logger.info(
                "int8 misses the target cosine %.4f: ranking MatMuls by int8 error…",
                target_cosine,
            )
            ranked = sensitivity(
                src,
                images,
                form=form,
                threads=threads,
                progress=(lambda d, t: progress("ranking MatMuls", d, t)) if progress else None,
            )
            report.sensitivity = [(m.label, e) for m, e in ranked]
            candidates = [m for m, e in ranked if e > NEGLIGIBLE_ERROR]
            schedule = exclusion_schedule(len(candidates), limit)[1:]
            for i, k in enumerate(schedule):
                mean, trial = attempt(candidates[:k])
                if progress is not None:
                    progress("searching fp32 layers", i + 1, len(schedule))
                if mean > best[0]:
                    best = (mean, candidates[:k], trial)
                if mean >= target_cosine:
                    break
        mean, excluded, trial = best
        if mean < target_cosine:
            logger.warning(
                "int8: best mean cosine %.5f (with %d MatMuls in fp32) is below the target "
                "%.4f; the parity gate decides",
                mean,
                len(excluded),
                target_cosine,
            )
        remove_onnx(dst)
        for name in onnx_files(trial):
            shutil.move(trial.parent / name, dst.parent / name)
    report.excluded = [m.node for m in excluded]
    report.excluded_labels = [m.label for m in excluded]
    report.quantized = total - len(excluded)
    report.seconds = time.monotonic() - started
    return report


def file_size(path: Path) -> int:
    return sum((path.parent / n).stat().st_size for n in onnx_files(path))


def describe(names: Iterable[str]) -> str:
    return ", ".join(names) or "none"
