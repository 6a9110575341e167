"""The demo bundle: a tiny SigLIP vision tower trained on simulated chest studies.

It goes through the same road as a real model: simulated DICOM instances → the daemon's own
:func:`edge_agent.imaging.preprocess` → a transformers ``SiglipVisionModel`` →
:func:`export.onnx_export.export_image_encoder` → a linear probe on the L2-normalised
embeddings → :func:`export.bundle_writer.write_bundle`. The model is not clinical
(``demo=True``): it only knows the simulator's findings.

Quality is measured on held-out simulated studies (their own seed), scored through ONNX
Runtime and the manifest head exactly as the daemon scores them; below
:data:`MIN_AUROC` nothing is written.
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from edge_agent import __version__
from edge_agent.bundle import Finding, LinearProbeHead, ModelInfo, Preprocessing
from edge_agent.errors import EdgeTriageError, ExtraMissing

from .findings import default_findings_path, load_findings

logger = logging.getLogger(__name__)

MIN_AUROC = 0.95
"""Held-out AUROC every finding, and normal vs abnormal studies, must reach."""
MODEL_NAME = "edge-triage-demo-siglip"
URGENT = {"pneumothorax": True, "lung_nodule": False}
# A patch counts as showing a finding where that finding alone changes the model input by
# more than this (mean = std = 0.5: 5% of the display range).
PATCH_THRESHOLD = 0.1
# Operating points chosen on the validation split (see choose_thresholds).
REVIEW_SENSITIVITY = 0.95
URGENT_SPECIFICITY = 0.99
URGENT_QUANTILE = 0.2
# Steps timed (after the first, slower ones) to shorten training on a machine too slow to
# do all its steps within the time budget.
CALIBRATION_STEPS = (30, 130)
# Distinct seed streams: training, validation (thresholds) and held-out test studies.
TRAIN, VALIDATION, TEST = 0, 1, 2


@dataclass(frozen=True)
class DemoSettings:
    seed: int = 0
    train_seconds: float = 300.0
    steps: int = 3000
    """Training steps. If the first steps show that this machine cannot do them within
    ``train_seconds``, the schedule is shortened to fit, and the bundle then depends on
    timing, not only on the seed (a warning says so)."""
    batch_size: int = 8
    """Images per step: whole patients, so a multiple of the 4 finding combinations."""
    learning_rate: float = 2e-3
    dense_weight: float = 3.0
    train_patients: int = 600
    """Each imaged once per combination of findings (4 images for 2 findings)."""
    n_validation: int = 300
    n_test: int = 400
    matrix: int = 256
    """Rows and columns of the simulated radiographs."""
    input_size: int = 128
    patch_size: int = 16
    hidden_size: int = 64
    layers: int = 2
    heads: int = 2
    threads: int = 2
    """Worker processes for simulation and ONNX Runtime threads."""
    torch_threads: int = 1
    """torch threads for training. One: at this model size a second thread gains ~15% on
    idle cores, and OpenMP's spin-waiting makes steps 3-5x slower when the cores are shared."""
    abnormal_rate: float = 0.4
    """Each finding is present with this probability, independently."""


@dataclass
class Timer:
    start: float = field(default_factory=time.monotonic)

    def __call__(self) -> float:
        return time.monotonic() - self.start


@dataclass(frozen=True)
class DemoResult:
    bundle: Path
    metrics: dict[str, float | int | str]
    parity: dict[str, float | int | str | bool]
    train_seconds: float
    seconds: float


def _require_export_extra() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise ExtraMissing(exc.name or "torch", "export") from exc
    try:
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise ExtraMissing("scikit-learn", "export") from exc
    return torch, transformers


def preprocessing_spec(settings: DemoSettings) -> Preprocessing:
    return Preprocessing(
        input_size=settings.input_size,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        pad_to_square=True,
    )


@dataclass(frozen=True)
class Studies:
    """Preprocessed frontal images, one per simulated study, and their truth."""

    pixels: np.ndarray
    """(n, 3, N, N) float32, exactly what the daemon feeds the encoder."""
    truth: np.ndarray
    """(n, len(codes)) bool, columns in ``codes`` order."""
    codes: tuple[str, ...]
    patch_truth: np.ndarray | None = None
    """(n, patches, len(codes)) bool: where each finding is, per encoder patch (training
    sets only; see :func:`simulate_training_set`)."""


def _frontal(
    rng: np.random.Generator, findings: dict[str, bool], view: str, modality: str, matrix: int
) -> Any:
    from edge_agent.simulate import chest_instance

    return chest_instance(
        rng,
        findings=findings,
        view=cast(Literal["PA", "AP"], view),
        modality=cast(Literal["CR", "DX"], modality),
        rows=matrix,
        cols=matrix,
    )


def _one_study(
    job: tuple[int, int, int, Preprocessing, int, float],
) -> tuple[np.ndarray, np.ndarray]:
    """One independent study: findings drawn at ``abnormal_rate`` each."""
    from edge_agent.imaging import preprocess
    from edge_agent.simulate import FINDINGS

    seed, stream, i, spec, matrix, abnormal_rate = job
    rng = np.random.default_rng([seed, stream, i])
    truth = rng.random(len(FINDINGS)) < abnormal_rate
    view, modality = str(rng.choice(["PA", "AP"])), str(rng.choice(["CR", "DX"]))
    findings = dict(zip(FINDINGS, truth.tolist(), strict=True))
    return preprocess(_frontal(rng, findings, view, modality, matrix), spec), truth


def _variants(n_findings: int) -> list[tuple[bool, ...]]:
    """Every combination of findings, the normal one first."""
    return list(itertools.product((False, True), repeat=n_findings))


def _one_patient(job: tuple[int, int, int, Preprocessing, int]) -> np.ndarray:
    """One simulated patient imaged once per combination of findings (same anatomy, same
    acquisition, same noise: the images differ only where the findings are)."""
    from edge_agent.imaging import preprocess
    from edge_agent.simulate import FINDINGS

    seed, stream, i, spec, matrix = job
    pick = np.random.default_rng([seed, stream, i, 0])
    view, modality = str(pick.choice(["PA", "AP"])), str(pick.choice(["CR", "DX"]))
    images = []
    for variant in _variants(len(FINDINGS)):
        rng = np.random.default_rng([seed, stream, i, 1])  # the same patient every time
        findings = dict(zip(FINDINGS, variant, strict=True))
        images.append(preprocess(_frontal(rng, findings, view, modality, matrix), spec))
    return np.stack(images)


def _parallel_map(
    fn: Callable[[Any], Any],
    jobs: list[Any],
    workers: int,
    progress: Callable[[int, int], None] | None,
) -> list[Any]:
    """``map(fn, jobs)`` over ``workers`` processes; results do not depend on ``workers``.

    Leaving early (an error, Ctrl-C, SIGTERM turned into ``SystemExit`` by the CLI) ends
    the workers: ``Pool.__exit__`` terminates them. (A ``ProcessPoolExecutor``'s spawned
    workers outlive a parent killed by SIGTERM, blocked forever on their queue.)
    """
    results = []
    if workers <= 1:
        for result in map(fn, jobs):
            results.append(result)
            if progress is not None:
                progress(len(results), len(jobs))
        return results
    # spawn, not fork: the parent may hold torch/OpenMP threads.
    chunksize = max(1, min(16, len(jobs) // (4 * workers)))
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for result in pool.imap(fn, jobs, chunksize=chunksize):
            results.append(result)
            if progress is not None:
                progress(len(results), len(jobs))
    return results


def simulate_studies(
    seed: int,
    stream: int,
    n: int,
    spec: Preprocessing,
    *,
    matrix: int = 256,
    abnormal_rate: float = 0.4,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> Studies:
    """``n`` independent simulated frontal chest studies, each finding present with
    probability ``abnormal_rate``, simulated as DICOM and preprocessed by the daemon's own
    :func:`edge_agent.imaging.preprocess`.

    ``(seed, stream)`` picks the random stream (study ``i`` uses ``[seed, stream, i]``), so
    training, validation and test studies never overlap and the result does not depend on
    ``workers``.
    """
    from edge_agent.simulate import FINDINGS

    jobs = [(seed, stream, i, spec, matrix, abnormal_rate) for i in range(n)]
    results = _parallel_map(_one_study, jobs, workers, progress)
    return Studies(
        pixels=np.stack([r[0] for r in results]).astype(np.float32, copy=False),
        truth=np.stack([r[1] for r in results]).astype(bool),
        codes=tuple(FINDINGS),
    )


def simulate_training_set(
    seed: int,
    stream: int,
    patients: int,
    spec: Preprocessing,
    *,
    patch_size: int,
    matrix: int = 256,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> Studies:
    """Counterfactual training images: each simulated patient once per combination of
    findings (2 findings: normal, pneumothorax, nodule, both).

    Within a patient only the findings differ, so the difference from the normal image
    shows where each finding is; :attr:`Studies.patch_truth` records it per encoder patch,
    for a dense auxiliary loss. Both make a transformer trained from scratch on a few
    hundred images find small findings within a minute of CPU time.
    """
    from edge_agent.simulate import FINDINGS

    jobs = [(seed, stream, i, spec, matrix) for i in range(patients)]
    stacks = np.stack(_parallel_map(_one_patient, jobs, workers, progress))  # (P, V, 3, N, N)
    variants = np.asarray(_variants(len(FINDINGS)), dtype=bool)  # (V, F)
    n = spec.input_size
    grid = n // patch_size
    # Where each finding alone changes the image, per patch (in model-input units).
    masks = []
    for f in range(len(FINDINGS)):
        alone = next(v for v, row in enumerate(variants) if row[f] and row.sum() == 1)
        diff = np.abs(stacks[:, alone] - stacks[:, 0]).max(axis=1)  # (P, N, N)
        crop = diff[:, : grid * patch_size, : grid * patch_size]
        per_patch = crop.reshape(len(diff), grid, patch_size, grid, patch_size).max(axis=(2, 4))
        masks.append(per_patch.reshape(len(diff), grid * grid) > PATCH_THRESHOLD)
    patch_masks = np.stack(masks, axis=-1)  # (P, T, F)
    patch_truth = patch_masks[:, None] & variants[None, :, None, :]  # (P, V, T, F)
    count = stacks.shape[0] * stacks.shape[1]
    return Studies(
        pixels=stacks.reshape(count, 3, n, n),
        truth=np.broadcast_to(variants, (len(stacks), *variants.shape)).reshape(count, -1).copy(),
        codes=tuple(FINDINGS),
        patch_truth=patch_truth.reshape(count, grid * grid, len(FINDINGS)),
    )


def _vision_config(settings: DemoSettings) -> Any:
    from transformers import SiglipVisionConfig

    config = SiglipVisionConfig(
        image_size=settings.input_size,
        patch_size=settings.patch_size,
        num_channels=3,
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        intermediate_size=4 * settings.hidden_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        attention_dropout=0.0,
    )
    config._attn_implementation = "eager"  # faster than sdpa at this size; exports the same
    return config


def _attention_logits(model: Any, tokens: Any) -> Any | None:
    """Logits of the MAP pooling head's attention over ``tokens`` (B, T, H), or None if the
    model's pooling head is not SigLIP's ``SiglipMultiheadAttentionPoolingHead``."""
    head = getattr(model, "head", None)
    attention = getattr(head, "attention", None)
    if attention is None or getattr(attention, "in_proj_weight", None) is None:
        return None
    heads = attention.num_heads
    dim = attention.embed_dim // heads
    w_q, w_k, _ = attention.in_proj_weight.chunk(3)
    b_q, b_k, _ = attention.in_proj_bias.chunk(3)
    assert head is not None
    query = (head.probe[0, 0] @ w_q.T + b_q).view(heads, dim)
    keys = (tokens @ w_k.T + b_k).view(*tokens.shape[:2], heads, dim)
    return (keys * query).sum(-1) / math.sqrt(dim)


def train_tower(train: Studies, settings: DemoSettings) -> tuple[Any, int, float, float]:
    """Train the tower on a counterfactual training set (:func:`simulate_training_set`).

    Losses: multi-label BCE of a temporary linear head on ``pooler_output`` (the embedding
    the bundle exports), plus, weighted by ``settings.dense_weight``, two dense terms from
    the per-patch truth: a temporary per-token classifier on ``last_hidden_state``, and the
    pooling head's attention logits (head ``f`` attends to finding ``f``). Each batch holds
    whole patients (every combination of findings), so the only thing that tells the images
    in a batch apart is the findings. Returns (model, steps, seconds, final smoothed loss).
    """
    torch, _ = _require_export_extra()
    previous = torch.get_num_threads()
    torch.set_num_threads(settings.torch_threads)
    try:
        return _train(train, settings)
    finally:
        torch.set_num_threads(previous)


def _train(train: Studies, settings: DemoSettings) -> tuple[Any, int, float, float]:
    torch, _ = _require_export_extra()
    import torch.nn.functional as F
    from transformers import SiglipVisionModel

    if train.patch_truth is None:
        raise ValueError("train_tower needs a training set with patch_truth")
    n_findings = train.truth.shape[1]
    variants = 2**n_findings
    grid = settings.input_size // settings.patch_size
    torch.manual_seed(settings.seed)
    model = SiglipVisionModel(_vision_config(settings))
    image_head = torch.nn.Linear(settings.hidden_size, n_findings)
    token_head = torch.nn.Linear(settings.hidden_size, n_findings)
    params = [*model.parameters(), *image_head.parameters(), *token_head.parameters()]
    try:  # the fused kernel saves a few ms per (tiny) step
        optimizer = torch.optim.AdamW(
            params, lr=settings.learning_rate, weight_decay=0.05, fused=True
        )
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.05)
    warmup = max(1, settings.steps // 20)
    planned = settings.steps  # shortened only if this machine cannot do them in time

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 0 at `planned`
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, planned - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    x_all = torch.from_numpy(train.pixels)
    y_all = torch.from_numpy(train.truth.astype(np.float32))
    t_all = torch.from_numpy(train.patch_truth.astype(np.float32))
    # Findings cover few patches: weight positives up to balance them (capped).
    share = t_all.mean(dim=(0, 1)).clamp_min(1e-3)
    pos_weight = ((1 - share) / share).clamp(1.0, 30.0)
    patients = len(x_all) // variants
    per_batch = max(1, settings.batch_size // variants)
    generator = torch.Generator().manual_seed(settings.seed)
    model.train()
    started = time.monotonic()
    calibration_start = 0.0
    smoothed = float("nan")
    step = 0
    order = torch.randperm(patients, generator=generator)
    cursor = 0
    log_every = max(1, settings.steps // 10)
    while step < planned:
        elapsed = time.monotonic() - started
        if step == CALIBRATION_STEPS[0]:
            calibration_start = elapsed
        if step == CALIBRATION_STEPS[1]:
            per_step = (elapsed - calibration_start) / (CALIBRATION_STEPS[1] - CALIBRATION_STEPS[0])
            affordable = step + int(0.95 * (settings.train_seconds - elapsed) / per_step)
            if affordable < planned:
                planned = max(affordable, warmup + 1)
                logger.warning(
                    "training: this machine does %.0f steps/s; training %d steps instead of "
                    "%d to fit %.0f s (the bundle is not reproducible from the seed alone)",
                    1 / per_step,
                    planned,
                    settings.steps,
                    settings.train_seconds,
                )
        if elapsed > settings.train_seconds * 1.1:
            logger.warning(
                "training: stopped by the %.0f s budget at step %d of %d "
                "(the bundle is not reproducible from the seed alone)",
                settings.train_seconds,
                step,
                planned,
            )
            break
        if cursor + per_batch > patients:
            order = torch.randperm(patients, generator=generator)
            cursor = 0
        chosen = order[cursor : cursor + per_batch]
        cursor += per_batch
        idx = (chosen[:, None] * variants + torch.arange(variants)).flatten()
        x, y, t = x_all[idx], y_all[idx], t_all[idx]
        # Augment: horizontal flip (findings occur on either side), patch truth alike.
        flip = torch.rand(len(idx), generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        t = t.view(len(idx), grid, grid, n_findings)
        t = torch.where(flip[:, None, None, None], t.flip(2), t).view(len(idx), -1, n_findings)

        out = model(pixel_values=x)
        loss = F.binary_cross_entropy_with_logits(image_head(out.pooler_output), y)
        dense = F.binary_cross_entropy_with_logits(
            token_head(out.last_hidden_state), t, pos_weight=pos_weight
        )
        attention = _attention_logits(model, out.last_hidden_state)
        if attention is not None and attention.shape[-1] >= n_findings:
            dense = dense + F.binary_cross_entropy_with_logits(
                attention[..., :n_findings], t, pos_weight=pos_weight
            )
        optimizer.zero_grad(set_to_none=True)
        (loss + settings.dense_weight * dense).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        value = float(loss.detach())
        smoothed = value if math.isnan(smoothed) else 0.9 * smoothed + 0.1 * value
        if step % log_every == 0 or step == planned:
            logger.info(
                "training: step %d/%d, loss %.4f (dense %.4f), lr %.2e, %.0f s",
                step,
                planned,
                smoothed,
                float(dense.detach()),
                scheduler.get_last_lr()[0],
                time.monotonic() - started,
            )
    model.eval()
    return model, step, time.monotonic() - started, smoothed


def fit_probe(
    embeddings: np.ndarray,
    truth: np.ndarray,
    codes: Sequence[str],
    seed: int,
    *,
    C: float = 1.0,
    class_weight: Literal["balanced"] | None = None,
) -> LinearProbeHead:
    """One logistic regression per finding on normalised embeddings (L2 penalty, inverse
    strength ``C``; ``class_weight="balanced"`` weighs each class by its inverse frequency)."""
    from sklearn.linear_model import LogisticRegression

    weights: dict[str, list[float]] = {}
    biases: dict[str, float] = {}
    for j, code in enumerate(codes):
        clf = LogisticRegression(C=C, class_weight=class_weight, max_iter=5000, random_state=seed)
        clf.fit(embeddings.astype(np.float64), truth[:, j])
        weights[code] = [float(w) for w in clf.coef_[0]]
        biases[code] = float(clf.intercept_[0])
    return LinearProbeHead(weights=weights, biases=biases)


def apply_head(head: LinearProbeHead, codes: Sequence[str], embeddings: np.ndarray) -> np.ndarray:
    """scores = sigmoid(emb @ W.T + b), (n, findings): the daemon's formula."""
    w = np.asarray([head.weights[c] for c in codes], dtype=np.float32)
    b = np.asarray([head.biases[c] for c in codes], dtype=np.float32)
    return 1.0 / (1.0 + np.exp(-(embeddings @ w.T + b)))


def choose_thresholds(
    scores: np.ndarray,
    truth: np.ndarray,
    *,
    urgent: bool,
    review_sensitivity: float = REVIEW_SENSITIVITY,
    urgent_specificity: float = URGENT_SPECIFICITY,
    urgent_quantile: float = URGENT_QUANTILE,
) -> tuple[float, float | None]:
    """(review, urgent) thresholds from validation scores of one finding.

    review: the highest threshold that still flags ``review_sensitivity`` of the
    positives. urgent: flags only clear cases: at least the ``urgent_specificity``
    point of the negatives and at least the score of the positive at the
    ``urgent_quantile`` (0 leaves only the specificity), and never below review.
    The defaults are the demo's (:data:`REVIEW_SENSITIVITY`, :data:`URGENT_SPECIFICITY`,
    :data:`URGENT_QUANTILE`).
    """
    pos = np.sort(scores[truth])
    neg = np.sort(scores[~truth])
    if len(pos) == 0 or len(neg) == 0:
        raise EdgeTriageError("validation split needs positive and negative studies per finding")
    review = float(pos[math.floor((1 - review_sensitivity) * len(pos))])
    review = math.floor(review * 1e4) / 1e4  # round down: keep the sensitivity
    if not urgent:
        return review, None
    bounds = [float(neg[min(len(neg) - 1, math.ceil(urgent_specificity * len(neg)) - 1)])]
    if urgent_quantile > 0:
        bounds.append(float(pos[math.floor(urgent_quantile * len(pos))]))
    urgent_threshold = max(review, math.ceil(max(bounds) * 1e4) / 1e4)
    return review, min(urgent_threshold, 1.0)


def evaluate(scores: np.ndarray, truth: np.ndarray, codes: Sequence[str]) -> dict[str, float]:
    """Per-finding AUROC and study-level normal-vs-abnormal AUROC (max over findings)."""
    from sklearn.metrics import roc_auc_score

    out = {
        f"auroc_{c}": float(roc_auc_score(truth[:, j], scores[:, j])) for j, c in enumerate(codes)
    }
    out["auroc_study_abnormal"] = float(roc_auc_score(truth.any(axis=1), scores.max(axis=1)))
    return out


def _findings() -> tuple[str, ...]:
    from edge_agent.simulate import FINDINGS

    return tuple(FINDINGS)


def _data_progress(name: str) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        if done == total or done % max(1, total // 4) == 0:
            logger.info("data: %s %d/%d", name, done, total)

    return report


def build_demo_bundle(
    out_dir: Path | str, settings: DemoSettings | None = None, *, overwrite: bool = False
) -> DemoResult:
    """Train, export, probe, evaluate and write the demo bundle. Raises
    :class:`EdgeTriageError` (nothing written) if any AUROC is below :data:`MIN_AUROC`."""
    from .bundle_writer import write_bundle
    from .onnx_export import export_image_encoder, torch_embeddings
    from .quantize import embed_onnx

    settings = settings or DemoSettings()
    _require_export_extra()  # fail now, not after a minute of simulation
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (use --overwrite to replace it)")
    clock = Timer()
    spec = preprocessing_spec(settings)
    s = settings

    variants = 2 ** len(_findings())
    logger.info(
        "data: simulating %d training patients (x%d finding combinations), %d validation and "
        "%d held-out studies (%dx%d, input %d px, %d workers)",
        s.train_patients, variants, s.n_validation, s.n_test, s.matrix, s.matrix,
        s.input_size, s.threads,
    )  # fmt: skip
    train = simulate_training_set(
        s.seed,
        TRAIN,
        s.train_patients,
        spec,
        patch_size=s.patch_size,
        matrix=s.matrix,
        workers=s.threads,
        progress=_data_progress("training patients"),
    )
    kw: dict[str, Any] = {
        "matrix": s.matrix,
        "abnormal_rate": s.abnormal_rate,
        "workers": s.threads,
    }
    val = simulate_studies(
        s.seed, VALIDATION, s.n_validation, spec, **kw, progress=_data_progress("validation")
    )
    test = simulate_studies(s.seed, TEST, s.n_test, spec, **kw, progress=_data_progress("held-out"))
    codes = train.codes
    for name, part in (("training", train), ("validation", val), ("held-out", test)):
        logger.info(
            "data: %s positives %s, normal %d/%d",
            name,
            dict(zip(codes, part.truth.sum(axis=0).tolist(), strict=True)),
            int((~part.truth.any(axis=1)).sum()),
            len(part.truth),
        )

    logger.info(
        "training: SiglipVisionModel %d px, patch %d, hidden %d, %d layers, %d heads; "
        "up to %d steps or %.0f s",
        s.input_size, s.patch_size, s.hidden_size, s.layers, s.heads, s.steps,
        s.train_seconds,
    )  # fmt: skip
    model, steps, train_seconds, loss = train_tower(train, s)
    logger.info(
        "training: done, %d steps in %.1f s, loss %.4f",
        steps,
        train_seconds,
        loss,
    )

    logger.info("probe: embedding and fitting one logistic regression per finding")
    head = fit_probe(torch_embeddings(model, train.pixels, batch=64), train.truth, codes, s.seed)

    with tempfile.TemporaryDirectory(prefix="edge-export-demo-") as work:
        logger.info("export: ONNX")
        exported = export_image_encoder(
            model, s.input_size, Path(work) / "encoder.onnx", seed=s.seed
        )

        logger.info("parity: ONNX Runtime vs PyTorch on the held-out images")
        onnx_val = embed_onnx(exported.onnx_path, val.pixels, threads=s.threads, batch=64)
        onnx_test = embed_onnx(exported.onnx_path, test.pixels, threads=s.threads, batch=64)
        torch_test = torch_embeddings(model, test.pixels, batch=64)
        score_diff = float(
            np.abs(apply_head(head, codes, onnx_test) - apply_head(head, codes, torch_test)).max()
        )
        parity: dict[str, float | int | str | bool] = {
            **exported.parity(),
            "images": len(test.pixels),
            "images_max_abs_diff": float(np.abs(onnx_test - torch_test).max()),
            # both sides are L2-normalised: the dot product is the cosine
            "images_cosine_min": float((onnx_test * torch_test).sum(axis=1).min()),
            "score_max_abs_diff": score_diff,
        }
        logger.info(
            "parity: random batch max|Δ| %.2e cos %.7f; %d images max|Δ| %.2e; "
            "scores max|Δ| %.2e",
            exported.max_abs_diff, exported.cosine_min, len(test.pixels),
            parity["images_max_abs_diff"], score_diff,
        )  # fmt: skip

        val_scores = apply_head(head, codes, onnx_val)
        # Labels and codes as the shipped radiograph findings give them (the SR names them)
        shipped = {f.code: f for f in load_findings(default_findings_path())}
        findings = []
        for j, code in enumerate(codes):
            review, urgent = choose_thresholds(
                val_scores[:, j], val.truth[:, j], urgent=URGENT[code]
            )
            findings.append(
                Finding(
                    code=code,
                    label=shipped[code].label,
                    concept=shipped[code].concept,
                    review_threshold=review,
                    urgent_threshold=urgent,
                )
            )

        test_scores = apply_head(head, codes, onnx_test)
        aurocs = evaluate(test_scores, test.truth, codes)
        metrics: dict[str, float | int | str] = {
            **{k: round(v, 4) for k, v in aurocs.items()},
            "evaluated_on": "held-out simulated studies, ONNX Runtime CPU + manifest head",
            "test_studies": len(test.truth),
            "test_seed": f"[{s.seed}, {TEST}]",
            "train_images": len(train.truth),
            "train_patients": s.train_patients,
            "validation_studies": len(val.truth),
            "train_steps": steps,
            "train_seconds": round(train_seconds, 1),
        }
        for j, f in enumerate(findings):
            flagged = test_scores[:, j] >= f.review_threshold
            t = test.truth[:, j]
            metrics[f"review_sensitivity_{f.code}"] = round(float(flagged[t].mean()), 4)
            metrics[f"review_specificity_{f.code}"] = round(float((~flagged[~t]).mean()), 4)

        logger.info(
            "evaluation: %s",
            ", ".join(f"{k} {v:.4f}" for k, v in aurocs.items()),
        )
        failing = {k: v for k, v in aurocs.items() if v < MIN_AUROC}
        if failing:
            raise EdgeTriageError(
                f"demo model below the AUROC bar {MIN_AUROC} on held-out studies ("
                + ", ".join(f"{k} {v:.3f}" for k, v in failing.items())
                + "); bundle not written"
            )

        logger.info("bundle: writing %s", out_dir)
        write_bundle(
            out_dir,
            encoder_onnx=exported.onnx_path,
            model=ModelInfo(
                name=MODEL_NAME,
                version=f"{__version__}+seed.{s.seed}",
                source=f"trained on simulated studies by edge-export demo, seed {s.seed}",
                demo=True,
            ),
            precision="fp32",
            preprocessing=spec,
            head=head,
            findings=findings,
            parity=parity,
            metrics=metrics,
            overwrite=overwrite,
            move=True,
        )
    logger.info("done: %s in %.1f s", out_dir, clock())
    return DemoResult(
        bundle=out_dir,
        metrics=metrics,
        parity=parity,
        train_seconds=train_seconds,
        seconds=clock(),
    )


def format_table(metrics: Mapping[str, float | int | str]) -> str:
    """The held-out AUROCs as a small text table."""
    lines = [f"{'held-out AUROC':<30}{'value':>8}  (bar {MIN_AUROC})"]
    for key, value in metrics.items():
        if key.startswith("auroc_") and isinstance(value, float | int):
            name = key.removeprefix("auroc_").replace("study_abnormal", "study: normal vs abnormal")
            lines.append(f"  {name:<28}{value:>8.4f}  {'ok' if value >= MIN_AUROC else 'BELOW'}")
    return "\n".join(lines)
