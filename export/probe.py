"""``edge-export probe``: fit a linear probe on a bundle's embeddings of labelled studies.

MedSigLIP's best figures are linear probes on its image embeddings. This command takes an
existing bundle (zero-shot or probe), a folder of DICOM studies and a CSV of labels, and
writes a *new* bundle revision whose head is one logistic regression per finding. The
source bundle is never modified.

The studies take the daemon's road, with the daemon's own code: each file's header is read
with :func:`edge_agent.intake.header.read_header`, instances are grouped by
StudyInstanceUID, the images to score are picked with :func:`edge_agent.scoring.select_images`,
pixels go through :func:`edge_agent.imaging.preprocess` and the bundle's encoder runs
through :func:`edge_agent.runners.open_runner` (CPU unless ``--profile`` says otherwise).
Files and images the daemon would not use are counted and reported, never fatal.

The daemon scores a study as the maximum over its images' scores, so the probe is trained
on per-image embeddings, each labelled with its study's label, and judged on study scores
(the maximum over the study's images). Cross-validation is stratified k-fold over
*studies* (grouped: all images of a study are in the same fold), so no study leaks from
training into the fold that scores it. Every finding gets its own folds, over the studies
labelled for it (a blank cell means unknown and leaves the study out for that finding).

A zero-shot bundle's thresholds mean nothing for a probe, so new thresholds are chosen from
the cross-validated study scores: review at a target sensitivity, urgent (only for findings
that can be urgent in the source bundle) at a target specificity, never below review.
``--keep-thresholds`` keeps the source bundle's instead. The manifest's ``metrics`` record
the cross-validated AUROC, the counts and the sensitivity/specificity at the thresholds.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import math
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from edge_agent.bundle import (
    MANIFEST,
    Bundle,
    Finding,
    LinearProbeHead,
    Preprocessing,
    load_bundle,
    read_manifest,
)
from edge_agent.dicom.uid import UID_PADDING, uid_problem, valid_uid
from edge_agent.errors import ConfigError, ExtraMissing, InputRejected
from edge_agent.runners.base import Runner
from edge_agent.store import InstanceRow

if TYPE_CHECKING:
    from edge_agent.profiles import Profile

logger = logging.getLogger(__name__)

UID_COLUMN = "study_instance_uid"
TRUE_VALUES = frozenset({"1", "true", "yes"})
FALSE_VALUES = frozenset({"0", "false", "no"})

DEFAULT_FOLDS = 5
DEFAULT_REVIEW_SENSITIVITY = 0.90
DEFAULT_URGENT_SPECIFICITY = 0.95
DEFAULT_BATCH_SIZE = 16
SOURCE_PREFIX = "linear probe fitted by edge-export probe"
SOURCE_WEIGHTS = "; encoder weights: "

ClassWeight = Literal["balanced", "none"]
T = TypeVar("T")
R = TypeVar("R")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ProbeSettings:
    folds: int = DEFAULT_FOLDS
    """k of the stratified k-fold cross-validation over studies."""
    C: float = 1.0
    """Inverse L2 regularisation strength of each logistic regression (sklearn's ``C``)."""
    class_weight: ClassWeight = "balanced"
    review_sensitivity: float = DEFAULT_REVIEW_SENSITIVITY
    urgent_specificity: float = DEFAULT_URGENT_SPECIFICITY
    keep_thresholds: bool = False
    """Keep the source bundle's thresholds instead of choosing new ones."""
    seed: int = 0
    version: str | None = None
    """model.version of the new bundle; default: the source's with ``+probe``."""
    profile: str | None = None
    """Device profile for the encoder (a name, a path or ``auto``); default: CPU."""
    threads: int = 0
    """ONNX Runtime intra-op threads of the default CPU profile (0: ONNX Runtime decides)."""
    batch_size: int | None = None
    """Images per encoder call; default: the profile's with --profile, else 16."""
    workers: int = 1
    """Threads that read and preprocess DICOM images while the encoder runs."""
    progress: bool | None = None
    """tqdm progress bars on stderr: None shows them when stderr is a terminal."""


# --------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class Labels:
    """The labels CSV: per study, one label per finding code (None: unknown)."""

    path: Path
    codes: tuple[str, ...]
    studies: dict[str, tuple[bool | None, ...]]


def _labels_error(path: Path, message: str) -> ConfigError:
    return ConfigError("--labels", f"{path}: {message}")


def _parse_label(text: str) -> bool | None:
    value = text.strip().lower()
    if not value:
        return None
    if value in TRUE_VALUES:
        return True
    if value in FALSE_VALUES:
        return False
    raise ValueError(value)


def read_labels(path: Path, codes: Sequence[str]) -> Labels:
    """Read and check the labels CSV against the bundle's finding codes.

    Header: ``study_instance_uid`` and exactly one column per finding code, in any order.
    Cells: 1/0, true/false, yes/no (any case) or blank for unknown. Raises
    :class:`ConfigError` naming the file, the line and the column at fault.
    """
    if not path.is_file():
        raise _labels_error(path, "does not exist or is not a file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            return _read_labels(path, csv.reader(f), tuple(codes))
    except UnicodeDecodeError as exc:
        raise _labels_error(path, f"is not UTF-8 text ({exc.reason})") from exc
    except csv.Error as exc:
        raise _labels_error(path, f"is not valid CSV: {exc}") from exc


def _read_labels(path: Path, reader: Any, codes: tuple[str, ...]) -> Labels:
    header = next(reader, None)
    if header is None:
        raise _labels_error(path, f"is empty (expected a header: {UID_COLUMN},{','.join(codes)})")
    names = [h.strip() for h in header]
    for i, name in enumerate(names):
        if not name:
            raise _labels_error(path, f"column {i + 1} of the header has no name")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise _labels_error(path, f"column {name!r} appears twice in the header")
        seen.add(name)
    if UID_COLUMN not in names:
        raise _labels_error(path, f"has no {UID_COLUMN!r} column (header: {','.join(names)})")
    for name in names:
        if name != UID_COLUMN and name not in codes:
            raise _labels_error(
                path,
                f"column {name!r} is not a finding of the bundle (its findings: "
                f"{', '.join(codes)})",
            )
    for code in codes:
        if code not in names:
            raise _labels_error(
                path,
                f"no column for the bundle's finding {code!r} (every finding needs a column; "
                "leave a cell blank where the label is unknown)",
            )
    uid_index = names.index(UID_COLUMN)
    code_index = [names.index(code) for code in codes]
    studies: dict[str, tuple[bool | None, ...]] = {}
    first_line: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(names):
            raise _labels_error(
                path, f"line {line} has {len(row)} fields, the header has {len(names)}"
            )
        cell = row[uid_index]
        if not cell.strip(UID_PADDING):
            raise _labels_error(path, f"line {line}, column {UID_COLUMN!r}: empty")
        problem = uid_problem(cell)
        if problem is not None:
            raise _labels_error(
                path, f"line {line}, column {UID_COLUMN!r}: {cell!r} is not a DICOM UID ({problem})"
            )
        uid = valid_uid(cell)
        assert uid is not None
        if uid in studies:
            raise _labels_error(
                path, f"line {line}: study {uid} is listed again (first on line {first_line[uid]})"
            )
        values: list[bool | None] = []
        for code, index in zip(codes, code_index, strict=True):
            try:
                values.append(_parse_label(row[index]))
            except ValueError:
                raise _labels_error(
                    path,
                    f"line {line}, column {code!r}: {row[index].strip()!r} is not a label "
                    "(use 1/0, true/false or yes/no; blank for unknown)",
                ) from None
        studies[uid] = tuple(values)
        first_line[uid] = line
    if not studies:
        raise _labels_error(path, "has a header but no studies")
    return Labels(path=path, codes=codes, studies=studies)


# --------------------------------------------------------------------------- data folder


@dataclass
class DataScan:
    """What walking the data folder found: instances grouped by study, and what was not used."""

    root: Path
    studies: dict[str, list[InstanceRow]] = field(default_factory=dict)
    files: int = 0
    not_dicom: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0

    @property
    def instances(self) -> int:
        return sum(len(v) for v in self.studies.values())


def _walk(root: Path) -> Iterator[Path]:
    """Every file under ``root`` in a stable order; hidden folders (``.git``) are left out."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(folder.iterdir(), key=lambda p: p.name)
        except OSError as exc:
            logger.warning("cannot list %s: %s", folder, exc.strerror or exc)
            continue
        subfolders = []
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                if not entry.name.startswith("."):
                    subfolders.append(entry)
            elif entry.is_file():
                yield entry
        stack.extend(reversed(subfolders))


def _bar(iterable: Any, *, enabled: bool | None, **kwargs: Any) -> Any:
    from tqdm import tqdm

    return tqdm(iterable, disable=None if enabled is None else not enabled, **kwargs)


def scan_data(root: Path, *, progress: bool | None = None) -> DataScan:
    """Read every file's header as the daemon's intake does and group instances by study."""
    from pydicom.errors import InvalidDicomError

    from edge_agent.intake.header import Skipped, read_header

    if not root.is_dir():
        raise ConfigError("--data", f"{root} does not exist or is not a folder")
    scan = DataScan(root=root)
    seen: set[str] = set()
    paths = list(_walk(root))
    scan.files = len(paths)
    for path in _bar(paths, enabled=progress, desc="reading headers", unit="file"):
        try:
            record = read_header(path)
        except Skipped as exc:
            scan.skipped[exc.reason] += 1
            continue
        except InputRejected as exc:
            if isinstance(exc.__cause__, InvalidDicomError):
                scan.not_dicom += 1
            else:
                scan.rejected[exc.reason] += 1
                logger.debug("rejected %s: %s", path.relative_to(root), exc.reason)
            continue
        if record.sop_instance_uid in seen:
            scan.duplicates += 1
            continue
        seen.add(record.sop_instance_uid)
        scan.studies.setdefault(record.study_instance_uid, []).append(
            InstanceRow(
                sop_instance_uid=record.sop_instance_uid,
                series_instance_uid=record.series_instance_uid,
                path=path.relative_to(root).as_posix(),
                modality=record.modality,
                view=record.view,
                state="received",
                reason=None,
            )
        )
    return scan


def load_image(path: Path, preprocessing: Preprocessing) -> np.ndarray:
    """Read one file and preprocess it exactly as the daemon's scorer does.

    Raises :class:`InputRejected` (or its :class:`~edge_agent.errors.ImageRejected`) with
    the daemon's reasons for an image it would not score.
    """
    from edge_agent import imaging
    from edge_agent.dicom.instance_file import Rereading, read_again

    words = Rereading(
        gone="file disappeared after its header was read",
        replaced="",  # no SOP Instance UID to check: never said
        unreadable="unreadable DICOM file ({error})",
        not_dicom="not a DICOM file any more (changed after its header was read)",
    )
    ds = read_again(path.parent, path.name, None, words)
    return imaging.preprocess(ds, preprocessing)


# --------------------------------------------------------------------------- embedding


@dataclass(frozen=True)
class Embedded:
    """Per-image embeddings of the labelled studies, and which study each image belongs to."""

    embeddings: np.ndarray
    """(images, D) float32, as the runner returns them."""
    image_study: np.ndarray
    """(images,) int: index into ``study_uids``."""
    study_uids: list[str]
    truth: np.ndarray
    """(studies, findings) float: 1, 0 or nan (unknown)."""
    not_scored: Counter[str]
    """Labelled studies left out, by the daemon's reason."""
    rejected_images: Counter[str]
    provider: str
    seconds: float
    decode_seconds: float = 0.0
    """Time spent reading and preprocessing images, summed over the loading threads (with
    ``workers > 1`` it overlaps the encoder and can exceed ``seconds``)."""
    encode_seconds: float = 0.0
    """Time spent in the encoder."""


@contextlib.contextmanager
def _loaded_batches(
    load: Callable[[T], R], jobs: Sequence[T], batch_size: int, workers: int
) -> Iterator[Iterator[tuple[Sequence[T], list[R]]]]:
    """``(batch, [load(job) for job in batch])`` for consecutive batches of ``jobs``.

    With ``workers > 1`` the jobs are loaded by that many threads, the next batch while the
    caller works on the current one (at most two batches in memory); leaving the context
    cancels what is still queued.
    """
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    if workers <= 1:
        yield ((batch, [load(job) for job in batch]) for batch in batches)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="probe-load")

    def prefetched() -> Iterator[tuple[Sequence[T], list[R]]]:
        pending: deque[tuple[Sequence[T], list[Future[R]]]] = deque()
        for batch in batches:
            pending.append((batch, [pool.submit(load, job) for job in batch]))
            if len(pending) > 1:
                done, futures = pending.popleft()
                yield done, [f.result() for f in futures]
        while pending:
            done, futures = pending.popleft()
            yield done, [f.result() for f in futures]

    try:
        yield prefetched()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def embed_studies(
    bundle: Bundle,
    runner: Runner,
    scan: DataScan,
    labels: Labels,
    *,
    batch_size: int,
    workers: int = 1,
    progress: bool | None = None,
) -> Embedded:
    """Select, preprocess and embed the images of every labelled study found in ``scan``."""
    from edge_agent.scoring import select_images

    spec = bundle.manifest.encoder.preprocessing
    not_scored: Counter[str] = Counter()
    jobs: list[tuple[str, InstanceRow]] = []
    for uid in sorted(set(labels.studies) & set(scan.studies)):
        chosen, reason = select_images(scan.studies[uid])
        if reason is not None:
            not_scored[reason] += 1
            continue
        jobs.extend((uid, inst) for inst in chosen)

    decode_times: list[float] = []  # list.append is atomic: safe from the loading threads

    def load(job: tuple[str, InstanceRow]) -> np.ndarray | str:
        began = time.perf_counter()
        try:
            return load_image(scan.root / job[1].path, spec)
        except InputRejected as exc:
            return exc.reason
        finally:
            decode_times.append(time.perf_counter() - began)

    rejected: Counter[str] = Counter()
    kept_uids: list[str] = []
    vectors: list[np.ndarray] = []
    encode_seconds = 0.0
    start = time.perf_counter()
    with (
        _loaded_batches(load, jobs, batch_size, workers) as batches,
        _bar(None, enabled=progress, total=len(jobs), desc="embedding", unit="image") as bar,
    ):
        for batch, loaded in batches:
            tensors = []
            for (uid, inst), out in zip(batch, loaded, strict=True):
                if isinstance(out, str):
                    rejected[out] += 1
                    logger.debug("image %s of study %s rejected: %s", inst.path, uid, out)
                else:
                    tensors.append(out)
                    kept_uids.append(uid)
            if tensors:
                began = time.perf_counter()
                vectors.append(runner.embed(np.stack(tensors)))
                encode_seconds += time.perf_counter() - began
            bar.update(len(batch))
    seconds = time.perf_counter() - start

    scored = sorted(set(kept_uids))
    # A study whose every chosen image was rejected is not scored by the daemon either.
    unusable = len({uid for uid, _ in jobs} - set(scored))
    if unusable:
        not_scored["no usable frontal chest image"] = unusable
    index = {uid: i for i, uid in enumerate(scored)}
    dim = bundle.manifest.encoder.embedding_dim
    truth = np.asarray(
        [[np.nan if v is None else float(v) for v in labels.studies[uid]] for uid in scored],
        dtype=np.float64,
    ).reshape(len(scored), len(labels.codes))
    return Embedded(
        embeddings=np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32),
        image_study=np.asarray([index[uid] for uid in kept_uids], dtype=np.int64),
        study_uids=scored,
        truth=truth,
        not_scored=not_scored,
        rejected_images=rejected,
        provider=str(runner.provider),
        seconds=seconds,
        decode_seconds=sum(decode_times),
        encode_seconds=encode_seconds,
    )


# --------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class FindingReport:
    code: str
    positives: int
    """Studies labelled positive that have a usable image."""
    negatives: int
    images: int
    """Images the final probe was fitted on."""
    auroc: float
    """Study-level AUROC of the pooled out-of-fold scores."""
    fold_aurocs: tuple[float, ...]
    review_threshold: float
    urgent_threshold: float | None
    review_sensitivity: float
    review_specificity: float
    urgent_sensitivity: float | None
    urgent_specificity: float | None


def _class_weight(value: ClassWeight) -> Literal["balanced"] | None:
    return "balanced" if value == "balanced" else None


def _study_scores(
    head: LinearProbeHead, code: str, embedded: Embedded, images: np.ndarray
) -> dict[int, float]:
    """The daemon's study score for ``code``: the maximum of sigmoid(w . e + b) over the
    study's images (rounded as published)."""
    from edge_agent.triage import sigmoid

    w = np.asarray(head.weights[code], dtype=np.float64)
    scores = sigmoid(embedded.embeddings[images].astype(np.float64) @ w + head.biases[code])
    out: dict[int, float] = {}
    for study, score in zip(embedded.image_study[images].tolist(), scores.tolist(), strict=True):
        out[study] = max(out.get(study, -math.inf), score)
    return {s: round(v, 6) for s, v in out.items()}


def check_counts(codes: Sequence[str], truth: np.ndarray, folds: int, where: str) -> None:
    """Refuse (naming every finding at fault) when a finding has fewer positive or negative
    studies than folds: each fold must hold at least one of each."""
    problems = []
    for j, code in enumerate(codes):
        pos, neg = int(np.sum(truth[:, j] == 1)), int(np.sum(truth[:, j] == 0))
        if pos < folds or neg < folds:
            problems.append(f"{code} has {pos} positive and {neg} negative")
    if problems:
        raise ConfigError(
            "--labels",
            f"too few labelled studies {where} for {folds}-fold cross-validation: "
            + "; ".join(problems)
            + f" (each needs at least {folds} of both; label more studies or lower --folds)",
        )


def cross_validate_finding(
    embedded: Embedded, j: int, code: str, settings: ProbeSettings
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Out-of-fold study scores for finding ``j``: (labelled study indices, their scores,
    per-fold AUROCs). Folds are stratified over studies; a study's images stay together."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    from .demo import fit_probe

    labelled = np.flatnonzero(~np.isnan(embedded.truth[:, j]))
    y = embedded.truth[labelled, j].astype(bool)
    oof = np.full(len(labelled), np.nan)
    position = {int(s): i for i, s in enumerate(labelled)}
    image_truth = embedded.truth[embedded.image_study, j]
    fold_aurocs = []
    splitter = StratifiedKFold(n_splits=settings.folds, shuffle=True, random_state=settings.seed)
    for train, test in splitter.split(np.zeros(len(labelled)), y):
        train_images = np.flatnonzero(np.isin(embedded.image_study, labelled[train]))
        test_images = np.flatnonzero(np.isin(embedded.image_study, labelled[test]))
        head = fit_probe(
            embedded.embeddings[train_images],
            image_truth[train_images, None].astype(bool),
            [code],
            settings.seed,
            C=settings.C,
            class_weight=_class_weight(settings.class_weight),
        )
        for study, score in _study_scores(head, code, embedded, test_images).items():
            oof[position[study]] = score
        fold_aurocs.append(float(roc_auc_score(y[test], oof[test])))
    return labelled, oof, fold_aurocs


def _rate(flags: np.ndarray) -> float:
    return round(float(flags.mean()), 4)


def fit(
    embedded: Embedded, findings: Sequence[Finding], settings: ProbeSettings
) -> tuple[LinearProbeHead, list[Finding], list[FindingReport], float | None]:
    """Cross-validate and fit the probe for every finding; choose or keep thresholds.

    Returns the head (fitted on every labelled image), the findings with their thresholds,
    one report per finding and the cross-validated normal-vs-abnormal study AUROC (None
    when no study is labelled for every finding, or all such studies are alike)."""
    from .demo import choose_thresholds, evaluate, fit_probe

    codes = [f.code for f in findings]
    weights: dict[str, list[float]] = {}
    biases: dict[str, float] = {}
    new_findings: list[Finding] = []
    reports: list[FindingReport] = []
    oof_matrix = np.full(embedded.truth.shape, np.nan)
    for j, finding in enumerate(findings):
        code = finding.code
        labelled, oof, fold_aurocs = cross_validate_finding(embedded, j, code, settings)
        y = embedded.truth[labelled, j].astype(bool)
        oof_matrix[labelled, j] = oof
        images = np.flatnonzero(np.isin(embedded.image_study, labelled))
        head = fit_probe(
            embedded.embeddings[images],
            embedded.truth[embedded.image_study[images], j, None].astype(bool),
            [code],
            settings.seed,
            C=settings.C,
            class_weight=_class_weight(settings.class_weight),
        )
        weights[code], biases[code] = head.weights[code], head.biases[code]

        if settings.keep_thresholds:
            review, urgent = finding.review_threshold, finding.urgent_threshold
        else:
            review, urgent = choose_thresholds(
                oof,
                y,
                urgent=finding.urgent_threshold is not None,
                review_sensitivity=settings.review_sensitivity,
                urgent_specificity=settings.urgent_specificity,
                urgent_quantile=0.0,
            )
        new_findings.append(
            finding.model_copy(update={"review_threshold": review, "urgent_threshold": urgent})
        )
        auroc = evaluate(oof[:, None], y[:, None], [code])[f"auroc_{code}"]
        review_flags = oof >= review
        urgent_flags = oof >= urgent if urgent is not None else None
        reports.append(
            FindingReport(
                code=code,
                positives=int(y.sum()),
                negatives=int((~y).sum()),
                images=len(images),
                auroc=round(auroc, 4),
                fold_aurocs=tuple(round(a, 4) for a in fold_aurocs),
                review_threshold=review,
                urgent_threshold=urgent,
                review_sensitivity=_rate(review_flags[y]),
                review_specificity=_rate(~review_flags[~y]),
                urgent_sensitivity=None if urgent_flags is None else _rate(urgent_flags[y]),
                urgent_specificity=None if urgent_flags is None else _rate(~urgent_flags[~y]),
            )
        )
    complete = ~np.isnan(embedded.truth).any(axis=1)
    abnormal = embedded.truth[complete].astype(bool)
    study_auroc = None
    if complete.any() and 0 < abnormal.any(axis=1).sum() < complete.sum():
        study_auroc = round(
            evaluate(oof_matrix[complete], abnormal, codes)["auroc_study_abnormal"], 4
        )
    return LinearProbeHead(weights=weights, biases=biases), new_findings, reports, study_auroc


# --------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class ProbeResult:
    bundle: Path
    model_sha256: str
    version: str
    reports: list[FindingReport]
    study_auroc: float | None
    metrics: dict[str, float | int | str]
    scan: DataScan
    embedded: Embedded
    seconds: float


def _require_extra() -> None:
    for module, name in (("sklearn", "scikit-learn"), ("tqdm", "tqdm"), ("onnx", "onnx")):
        try:
            __import__(module)
        except ImportError as exc:
            raise ExtraMissing(name, "export") from exc


def _check_out(source: Path, out: Path, overwrite: bool) -> None:
    src, dst = source.resolve(), out.resolve()
    if dst == src:
        if not overwrite:
            raise FileExistsError(
                f"--out {out} is the source bundle: refusing to replace it "
                "(choose another folder, or pass --overwrite to replace it)"
            )
        return
    if src in dst.parents:
        raise ConfigError("--out", f"{out} is inside the source bundle {source}")
    if dst in src.parents:
        raise ConfigError("--out", f"{out} holds the source bundle {source}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (use --overwrite to replace it)")
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())
    ):
        # write_bundle refuses it too, but only after all the work
        raise FileExistsError(f"{out} exists and is not a bundle: refusing to replace it")


def _profile(settings: ProbeSettings, bundle: Bundle) -> tuple[Profile, int]:
    from edge_agent.profiles import Profile, RuntimeProfile, resolve_profile

    if settings.profile is not None:
        profile, why = resolve_profile(settings.profile)
        logger.info("encoder: profile %s (%s)", profile.name, why)
        return profile, settings.batch_size or profile.runtime.batch_size
    profile = Profile(
        name="cpu",
        description="edge-export probe: ONNX Runtime on the CPU",
        runtime=RuntimeProfile(
            providers=["CPUExecutionProvider"],
            intra_op_threads=settings.threads,
            precision=bundle.manifest.precision,
        ),
    )
    return profile, settings.batch_size or DEFAULT_BATCH_SIZE


def _weights_origin(source: str) -> str:
    """Where the encoder's weights came from, without the story of earlier probes."""
    if source.startswith(SOURCE_PREFIX) and SOURCE_WEIGHTS in source:
        return source.split(SOURCE_WEIGHTS, 1)[1]
    return source


def _new_version(old: str) -> str:
    # PEP 440 local version: "1.0" -> "1.0+probe", "0.1.0+seed.0" -> "0.1.0+seed.0.probe"
    return f"{old}.probe" if "+" in old else f"{old}+probe"


def _log_counts(what: str, counts: Counter[str]) -> None:
    for reason, n in counts.most_common():
        logger.warning("%s: %d × %s", what, n, reason)


def embed_labelled_studies(
    source: Bundle, labels: Labels, data_dir: Path, settings: ProbeSettings
) -> tuple[DataScan, Embedded]:
    """Walk ``data_dir`` and embed the images the daemon would score in each labelled study,
    reporting (in the log) every file, image and study left out and why."""
    from edge_agent.runners import open_runner

    with warnings.catch_warnings():
        # pydicom's warnings about non-conforming files can quote element values (patient
        # data); the daemon keeps them out of its log, and so does this command.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
        scan = scan_data(data_dir, progress=settings.progress)
        logger.info(
            "data: %d files, %d DICOM instances in %d studies; %d not DICOM (ignored), "
            "%d skipped, %d rejected, %d duplicate instances",
            scan.files, scan.instances, len(scan.studies), scan.not_dicom,
            sum(scan.skipped.values()), sum(scan.rejected.values()), scan.duplicates,
        )  # fmt: skip
        _log_counts("skipped files", scan.skipped)
        _log_counts("rejected files", scan.rejected)
        if not scan.studies:
            raise ConfigError(
                "--data",
                f"{data_dir} holds no usable DICOM instance ({_plural(scan.files, 'file')} "
                f"looked at, {scan.not_dicom} not DICOM)",
            )
        found = set(labels.studies) & set(scan.studies)
        if not found:
            raise ConfigError(
                "--data",
                f"none of the {len(labels.studies)} studies in {labels.path.name} has an "
                f"instance in {data_dir} ({_plural(len(scan.studies), 'other study')} there)",
            )
        if missing := len(labels.studies) - len(found):
            logger.warning("labels: %d labelled studies have no instance in %s", missing, data_dir)
        if unlabelled := len(scan.studies) - len(found):
            logger.info("data: %d studies without labels ignored", unlabelled)

        profile, batch_size = _profile(settings, source)
        embedded = embed_studies(
            source,
            open_runner(source, profile),
            scan,
            labels,
            batch_size=batch_size,
            workers=settings.workers,
            progress=settings.progress,
        )
    _log_counts("labelled studies not scored", embedded.not_scored)
    _log_counts("images rejected", embedded.rejected_images)
    logger.info(
        "embedding: %d images of %d studies in %.1f s on %s",
        len(embedded.embeddings),
        len(embedded.study_uids),
        embedded.seconds,
        embedded.provider,
    )
    return scan, embedded


def probe_metrics(
    settings: ProbeSettings,
    embedded: Embedded,
    reports: Sequence[FindingReport],
    study_auroc: float | None,
    source: Bundle,
) -> dict[str, float | int | str]:
    """The manifest's ``metrics``: how the probe was judged, counts and CV figures."""
    metrics: dict[str, float | int | str] = {
        "evaluated_on": (
            f"{settings.folds}-fold cross-validation stratified over studies (a study's images "
            "in one fold), study score = max over its images; ONNX Runtime "
            f"{embedded.provider} + logistic regression"
        ),
        "cv_folds": settings.folds,
        "cv_seed": settings.seed,
        "probe_C": settings.C,
        "probe_class_weight": settings.class_weight,
        "studies": len(embedded.study_uids),
        "images": len(embedded.embeddings),
        "thresholds": (
            "kept from the source bundle"
            if settings.keep_thresholds
            else f"chosen on cross-validated study scores: review at sensitivity "
            f"{settings.review_sensitivity}, urgent at specificity {settings.urgent_specificity}"
        ),
        "source_model_sha256": source.sha256,
    }
    for r in reports:
        metrics[f"positives_{r.code}"] = r.positives
        metrics[f"negatives_{r.code}"] = r.negatives
        metrics[f"cv_auroc_{r.code}"] = r.auroc
        metrics[f"cv_auroc_fold_sd_{r.code}"] = round(float(np.std(r.fold_aurocs)), 4)
        metrics[f"cv_review_sensitivity_{r.code}"] = r.review_sensitivity
        metrics[f"cv_review_specificity_{r.code}"] = r.review_specificity
        if r.urgent_sensitivity is not None and r.urgent_specificity is not None:
            metrics[f"cv_urgent_sensitivity_{r.code}"] = r.urgent_sensitivity
            metrics[f"cv_urgent_specificity_{r.code}"] = r.urgent_specificity
    if study_auroc is not None:
        metrics["cv_auroc_study_abnormal"] = study_auroc
    return metrics


def build_probe_bundle(
    bundle_dir: Path,
    labels_csv: Path,
    data_dir: Path,
    out_dir: Path,
    settings: ProbeSettings | None = None,
    *,
    overwrite: bool = False,
) -> ProbeResult:
    """Embed the labelled studies in ``data_dir``, fit the probe, write the new bundle."""
    from .bundle_writer import revise_bundle

    settings = settings or ProbeSettings()
    start = time.monotonic()
    _require_extra()
    source = load_bundle(bundle_dir)
    spec = source.manifest
    _check_out(Path(bundle_dir), Path(out_dir), overwrite)
    labels = read_labels(Path(labels_csv), source.finding_codes)
    truth = np.asarray(
        [[np.nan if x is None else float(x) for x in v] for v in labels.studies.values()]
    )
    logger.info(
        "labels: %d studies, %s",
        len(labels.studies),
        ", ".join(
            f"{code} {int(np.sum(truth[:, j] == 1))}+/{int(np.sum(truth[:, j] == 0))}-"
            for j, code in enumerate(labels.codes)
        ),
    )
    check_counts(labels.codes, truth, settings.folds, f"in {labels.path.name}")  # before pixels
    scan, embedded = embed_labelled_studies(source, labels, Path(data_dir), settings)
    check_counts(labels.codes, embedded.truth, settings.folds, "with a usable image")

    logger.info(
        "probe: %d-fold cross-validation over studies, logistic regression C=%g, class weight %s",
        settings.folds,
        settings.C,
        settings.class_weight,
    )
    head, findings, reports, study_auroc = fit(embedded, spec.findings, settings)
    metrics = probe_metrics(settings, embedded, reports, study_auroc, source)

    version = settings.version or _new_version(spec.model.version)
    revise_bundle(
        source,
        out_dir,
        version=version,
        model_source=(
            f"{SOURCE_PREFIX} on {len(embedded.study_uids)} labelled studies "
            f"({labels.path.name}) over the encoder of {spec.model.name} "
            f"{spec.model.version} (model sha256 {source.sha256[:12]})"
            f"{SOURCE_WEIGHTS}{_weights_origin(spec.model.source)}"
        ),
        head=head,
        findings=findings,
        metrics=metrics,
        overwrite=overwrite,
    )
    return ProbeResult(
        bundle=Path(out_dir),
        model_sha256=read_manifest(Path(out_dir)).model_sha256(),  # verified when written
        version=version,
        reports=reports,
        study_auroc=study_auroc,
        metrics=metrics,
        scan=scan,
        embedded=embedded,
        seconds=time.monotonic() - start,
    )


def _plural(n: int, noun: str) -> str:
    if n == 1:
        return f"1 {noun}"
    return f"{n} {noun[:-1]}ies" if noun.endswith("y") else f"{n} {noun}s"


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def format_summary(result: ProbeResult) -> str:
    """Per finding: studies +/-, images, CV AUROC, thresholds and CV sensitivity/specificity."""
    header = (
        f"{'finding':<20}{'n+':>5}{'n-':>6}{'images':>8}{'CV AUROC':>10}{'± sd':>7}"
        f"{'review':>9}{'sens':>7}{'spec':>7}{'urgent':>9}{'sens':>7}{'spec':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in result.reports:
        sd = float(np.std(r.fold_aurocs))
        lines.append(
            f"{r.code:<20}{r.positives:>5}{r.negatives:>6}{r.images:>8}{r.auroc:>10.3f}"
            f"{sd:>7.3f}{r.review_threshold:>9.4f}{r.review_sensitivity:>7.3f}"
            f"{r.review_specificity:>7.3f}{_fmt(r.urgent_threshold, '.4f'):>9}"
            f"{_fmt(r.urgent_sensitivity):>7}{_fmt(r.urgent_specificity):>7}"
        )
    if result.study_auroc is not None:
        lines.append(f"study: normal vs abnormal, CV AUROC {result.study_auroc:.3f}")
    folds = result.metrics["cv_folds"]
    lines.append(
        f"n+/n-: labelled studies with a usable image; AUROC, sensitivity and specificity "
        f"from {folds}-fold cross-validation over studies (study score = max over images)"
    )
    return "\n".join(lines)


def cmd_probe(args: argparse.Namespace) -> int:
    if args.keep_thresholds and (
        args.review_sensitivity is not None or args.urgent_specificity is not None
    ):
        raise ConfigError(
            "--keep-thresholds", "cannot be combined with --review-sensitivity/--urgent-specificity"
        )
    settings = ProbeSettings(
        folds=args.folds,
        C=args.C,
        class_weight=args.class_weight,
        review_sensitivity=args.review_sensitivity or DEFAULT_REVIEW_SENSITIVITY,
        urgent_specificity=args.urgent_specificity or DEFAULT_URGENT_SPECIFICITY,
        keep_thresholds=args.keep_thresholds,
        seed=args.seed,
        version=args.model_version,
        profile=args.profile,
        threads=args.threads,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    result = build_probe_bundle(
        args.bundle, args.labels, args.data, args.out, settings, overwrite=args.overwrite
    )
    print(format_summary(result))
    print(
        f"bundle {result.bundle}: version {result.version}, model sha256 "
        f"{result.model_sha256[:12]}, {len(result.embedded.study_uids)} studies / "
        f"{len(result.embedded.embeddings)} images, {result.seconds:.1f} s"
    )
    return 0


# --------------------------------------------------------------------------- arguments


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1 (exclusive)")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return parse


def register(sub: Any) -> None:
    """Add the ``probe`` subcommand to edge-export's subparsers."""
    p = sub.add_parser(
        "probe",
        help="fit a linear probe on a bundle's embeddings of labelled studies",
        description="Embed the labelled studies found in a DICOM folder with a bundle's "
        "encoder (the daemon's own image selection and preprocessing), fit one logistic "
        "regression per finding with cross-validation grouped by study, and write a new "
        "bundle whose head is the probe. The source bundle is not modified.",
    )
    p.add_argument("--bundle", type=Path, required=True, help="source bundle folder")
    p.add_argument(
        "--labels",
        type=Path,
        required=True,
        metavar="CSV",
        help=f"CSV with a {UID_COLUMN} column and one column per finding code of the "
        "bundle: 1/0, true/false, yes/no, blank for unknown",
    )
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder of DICOM files in any layout (walked; non-DICOM files are ignored)",
    )
    p.add_argument("--out", type=Path, required=True, help="new bundle folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--version",
        dest="model_version",
        metavar="V",
        help="model.version of the new bundle (default: the source's with '+probe')",
    )
    p.add_argument(
        "--folds",
        type=_int_at_least(2),
        default=DEFAULT_FOLDS,
        help=f"cross-validation folds over studies (default {DEFAULT_FOLDS}); each finding "
        "needs at least this many positive and negative studies",
    )
    p.add_argument(
        "--C",
        dest="C",
        type=_positive_float,
        default=1.0,
        help="inverse L2 regularisation strength of the logistic regressions (default 1.0)",
    )
    p.add_argument(
        "--class-weight",
        choices=["balanced", "none"],
        default="balanced",
        help="weigh classes by inverse frequency (default balanced)",
    )
    p.add_argument(
        "--review-sensitivity",
        type=_fraction,
        help="review threshold: the highest that flags this share of positive studies in "
        f"cross-validation (default {DEFAULT_REVIEW_SENSITIVITY})",
    )
    p.add_argument(
        "--urgent-specificity",
        type=_fraction,
        help="urgent threshold (findings that can be urgent in the source bundle): the "
        "lowest that leaves this share of negative studies unflagged in cross-validation, "
        f"never below review (default {DEFAULT_URGENT_SPECIFICITY})",
    )
    p.add_argument(
        "--keep-thresholds",
        action="store_true",
        help="keep the source bundle's thresholds (their CV sensitivity and specificity "
        "are still reported)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the fold split (default 0)")
    p.add_argument(
        "--profile",
        help="device profile to run the encoder with (a name in firmware_configs/, a path "
        "or auto); default: ONNX Runtime on the CPU",
    )
    p.add_argument(
        "--threads",
        type=_int_at_least(0),
        default=0,
        help="ONNX Runtime threads without --profile (default 0: ONNX Runtime decides)",
    )
    p.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        help=f"images per encoder call (default: the profile's, else {DEFAULT_BATCH_SIZE})",
    )
    p.add_argument(
        "--workers",
        type=_int_at_least(1),
        default=1,
        help="threads reading and preprocessing DICOM images (default 1)",
    )
    p.set_defaults(func=cmd_probe)
