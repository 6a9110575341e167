"""``edge-export evaluate``: how a bundle does on a site's own labelled studies.

The studies take the daemon's road with the daemon's code, the same path as
``edge-export probe`` (:func:`export.probe.scan_data` and :func:`export.probe.embed_studies`:
header, grouping by study, image selection, preprocessing, the bundle's encoder through its
runner), then the bundle's head and triage rule (:class:`edge_agent.triage.Head`,
:func:`edge_agent.triage.triage_level`): a study's score per finding is the maximum over its
images, rounded as published, flagged at or above the threshold.

Bad input is refused before any pixel is read, naming what is wrong and listing what would
have been left out: labelled studies that are not in the folder, studies in the folder
without a label, a column that is not a finding, a value that is not a label.

Output: ``REPORT_DIR/report.json`` (every figure, the model's sha256, the command line),
``REPORT_DIR/index.html`` (one file, figures embedded, opens without a network) and the
figures as PNG in ``REPORT_DIR/figures/``. StudyInstanceUIDs are the only study identifiers
written (worst misses); nothing from a patient's header is.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.bundle import Bundle, load_bundle
from edge_agent.errors import ConfigError

if TYPE_CHECKING:
    from export.probe import DataScan, Labels

from . import stats

logger = logging.getLogger(__name__)

REPORT_VERSION = 1
TARGET_SENSITIVITIES = (0.90, 0.95, 0.98)
DEFAULT_RESAMPLES = 2000
WORST = 10
"""Worst false negatives / false positives listed per finding."""
LISTED = 20
"""Study UIDs named in a bad-input message (the rest counted)."""


@dataclass(frozen=True)
class EvaluateSettings:
    resamples: int = DEFAULT_RESAMPLES
    seed: int = 0
    prevalence: dict[str, float] | None = None
    """Per finding code: the prevalence PPV and NPV are also given at."""
    profile: str | None = None
    threads: int = 0
    batch_size: int | None = None
    workers: int = 1
    progress: bool | None = None
    command: str = ""
    """The command line, recorded in the report."""


@dataclass(frozen=True)
class Scored:
    """Every labelled study the daemon would score: its scores, level and truth."""

    study_uids: list[str]
    codes: list[str]
    scores: np.ndarray
    """(studies, findings) as published (rounded to 6 places); nan for a finding the head
    does not score for radiographs."""
    levels: list[str]
    truth: np.ndarray
    """(studies, findings): 1, 0 or nan (unknown)."""
    not_scored: Counter[str]
    rejected_images: Counter[str]
    images: int
    provider: str
    seconds_read: float
    seconds_embed: float
    seconds_decode: float = 0.0
    seconds_encode: float = 0.0


def _listed(uids: Sequence[str]) -> str:
    shown = ", ".join(sorted(uids)[:LISTED])
    more = len(uids) - LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def check_match(label_uids: set[str], data_uids: set[str], labels: Path, data: Path) -> None:
    """Refuse labels and folder that do not describe the same studies, listing the strays."""
    not_in_data = sorted(label_uids - data_uids)
    unlabelled = sorted(data_uids - label_uids)
    problems = []
    if not_in_data:
        problems.append(
            f"{len(not_in_data)} labelled studies have no instance in {data} (left out: "
            f"{_listed(not_in_data)})"
        )
    if unlabelled:
        problems.append(
            f"{len(unlabelled)} studies in {data} have no row in {labels.name} (left out: "
            f"{_listed(unlabelled)})"
        )
    if problems:
        raise ConfigError(
            "--labels",
            "; ".join(problems)
            + ". Evaluate on exactly the labelled studies: add the rows, or move the studies "
            "out of the folder.",
        )


def read_input(
    bundle: Bundle, labels_csv: Path, data: Path, settings: EvaluateSettings
) -> tuple[Labels, DataScan, float]:
    """Read the labels and every header; refuse bad input before any pixel is read."""
    from export.probe import read_labels, scan_data

    labels = read_labels(labels_csv, bundle.finding_codes)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # pydicom's warnings can quote element values (patient data): kept out, as the daemon does
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
        scan = scan_data(data, progress=settings.progress)
    if not scan.studies:
        raise ConfigError("--data", f"{data} holds no usable DICOM instance")
    check_match(set(labels.studies), set(scan.studies), labels_csv, data)
    return labels, scan, time.perf_counter() - start


def score_scan(
    bundle: Bundle, labels: Labels, scan: DataScan, settings: EvaluateSettings, read: float = 0.0
) -> Scored:
    """Score the labelled studies of ``scan`` with ``bundle`` as the daemon would."""
    from edge_agent.runners import open_runner
    from edge_agent.triage import Head, triage_level
    from export.probe import ProbeSettings, _profile, embed_studies

    probe_settings = ProbeSettings(
        profile=settings.profile,
        threads=settings.threads,
        batch_size=settings.batch_size,
        workers=settings.workers,
        progress=settings.progress,
    )
    profile, batch_size = _profile(probe_settings, bundle)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
        embedded = embed_studies(
            bundle,
            open_runner(bundle, profile),
            scan,
            labels,
            batch_size=batch_size,
            workers=settings.workers,
            progress=settings.progress,
        )
    head = Head(bundle)
    image_scores = head.scores(embedded.embeddings)
    codes = list(labels.codes)
    scores = np.full((len(embedded.study_uids), len(codes)), np.nan)
    levels: list[str] = []
    for i in range(len(embedded.study_uids)):
        results = head.study_findings(image_scores[embedded.image_study == i])
        for r in results:
            scores[i, codes.index(r.code)] = r.score
        levels.append(triage_level(results))
    return Scored(
        study_uids=embedded.study_uids,
        codes=codes,
        scores=scores,
        levels=levels,
        truth=embedded.truth,
        not_scored=embedded.not_scored,
        rejected_images=embedded.rejected_images,
        images=len(embedded.embeddings),
        provider=embedded.provider,
        seconds_read=read,
        seconds_embed=embedded.seconds,
        seconds_decode=embedded.decode_seconds,
        seconds_encode=embedded.encode_seconds,
    )


def score_studies(
    bundle: Bundle, labels_csv: Path, data: Path, settings: EvaluateSettings
) -> Scored:
    """The labelled studies through the daemon's road: refuse bad input first, then score."""
    labels, scan, read = read_input(bundle, labels_csv, data, settings)
    return score_scan(bundle, labels, scan, settings, read)


def compare_reference(
    reference: Bundle, labels: Labels, scan: DataScan, scored: Scored, settings: EvaluateSettings
) -> dict[str, Any]:
    """The same studies scored by ``reference``: triage-level agreement, Cohen's kappa and
    every study whose level changes (by StudyInstanceUID). A study one bundle does not
    score counts as ``not_scored`` for it."""
    from export.probe import Labels

    blank = Labels(
        path=labels.path,
        codes=tuple(reference.finding_codes),
        studies={uid: (None,) * len(reference.finding_codes) for uid in labels.studies},
    )
    ref = score_scan(reference, blank, scan, settings)
    ours = dict(zip(scored.study_uids, scored.levels, strict=True))
    theirs = dict(zip(ref.study_uids, ref.levels, strict=True))
    uids = sorted(set(labels.studies) & set(scan.studies))
    a = [theirs.get(u, "not_scored") for u in uids]
    b = [ours.get(u, "not_scored") for u in uids]
    table: dict[str, dict[str, int]] = {}
    for x, y in zip(a, b, strict=True):
        table.setdefault(x, {}).setdefault(y, 0)
        table[x][y] += 1
    kappa = stats.cohen_kappa(a, b)
    agree = sum(x == y for x, y in zip(a, b, strict=True))
    spec = reference.manifest
    return {
        "model": {
            "name": spec.model.name,
            "version": spec.model.version,
            "sha256": reference.sha256,
        },
        "studies": len(uids),
        "agreement": _r(agree / len(uids)) if uids else None,
        "kappa": _r(kappa),
        "levels": table,
        "changed": [
            {"study_instance_uid": u, "reference": x, "level": y}
            for u, x, y in zip(uids, a, b, strict=True)
            if x != y
        ],
    }


def time_to_notification(state_db: Path) -> dict[str, Any]:
    """From a study's first instance received to its first result stored in the outbox
    (seconds), read-only from the agent's state database: p50/p95/max over all studies
    with a result, and by the first result's triage level."""
    import sqlite3

    from edge_agent.state.report import open_read_only

    try:
        conn = open_read_only(state_db)
        try:
            rows = conn.execute(
                "SELECT r.triage, r.created_at - s.first_instance_at FROM studies s "
                "JOIN results r ON r.study_instance_uid = s.study_instance_uid "
                "WHERE r.revision = (SELECT MIN(revision) FROM results "
                "WHERE study_instance_uid = s.study_instance_uid)"
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise ConfigError("--state", f"{state_db}: not a readable state database ({exc})") from exc

    def summary(values: list[float]) -> dict[str, Any]:
        if not values:
            return {"studies": 0, "p50_s": None, "p95_s": None, "max_s": None}
        v = np.asarray(values, dtype=np.float64)
        return {
            "studies": len(values),
            "p50_s": round(float(np.percentile(v, 50)), 3),
            "p95_s": round(float(np.percentile(v, 95)), 3),
            "max_s": round(float(v.max()), 3),
        }

    out = summary([float(d) for _, d in rows])
    out["by_level"] = {
        level: summary([float(d) for t, d in rows if t == level])
        for level in sorted({t for t, _ in rows})
    }
    out["measured"] = "first instance received -> first result stored for publishing"
    return out


# --------------------------------------------------------------------------- statistics


def _r(x: float | None, places: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, places)


def _pair(p: tuple[float, float] | tuple[float | None, float | None] | None) -> list[Any] | None:
    return None if p is None else [_r(p[0]), _r(p[1])]


def _at(
    scores: np.ndarray, truth: np.ndarray, threshold: float, prevalence: float | None
) -> dict[str, Any]:
    at = stats.at_threshold(scores, truth, threshold)
    out: dict[str, Any] = {
        "threshold": threshold,
        "tp": at.tp,
        "fp": at.fp,
        "tn": at.tn,
        "fn": at.fn,
    }
    for name, prop in (
        ("sensitivity", at.sensitivity),
        ("specificity", at.specificity),
        ("ppv", at.ppv),
        ("npv", at.npv),
    ):
        out[name] = _r(prop.value)
        out[f"{name}_ci95"] = _pair(prop.ci95)
    if prevalence is not None and at.sensitivity.n and at.specificity.n:
        sens, spec = at.sensitivity.value, at.specificity.value
        assert sens is not None and spec is not None
        ppv, npv = stats.predictive_values(sens, spec, prevalence)
        ppv_ci, npv_ci = stats.predictive_values_ci(at.sensitivity, at.specificity, prevalence)
        out["at_prevalence"] = {
            "prevalence": prevalence,
            "ppv": _r(ppv),
            "ppv_ci95": _pair(ppv_ci),
            "npv": _r(npv),
            "npv_ci95": _pair(npv_ci),
        }
    return out


def finding_report(
    code: str,
    scores: np.ndarray,
    truth: np.ndarray,
    uids: Sequence[str],
    review: float,
    urgent: float | None,
    settings: EvaluateSettings,
) -> dict[str, Any]:
    """Every figure of one finding over the studies labelled for it."""
    npos, nneg = int(truth.sum()), int((~truth).sum())
    out: dict[str, Any] = {"n_positive": npos, "n_negative": nneg}
    both = npos > 0 and nneg > 0
    out["auroc"] = _r(stats.auroc(scores, truth)) if both else None
    out["auroc_ci95"] = (
        _pair(
            stats.bootstrap_auroc(scores, truth, resamples=settings.resamples, seed=settings.seed)
        )
        if both
        else None
    )
    prevalence = (settings.prevalence or {}).get(code)
    review_at = _at(scores, truth, review, prevalence)
    out["sensitivity"] = review_at["sensitivity"]
    out["specificity"] = review_at["specificity"]
    out["review"] = review_at
    out["urgent"] = None if urgent is None else _at(scores, truth, urgent, prevalence)
    out["operating_points"] = (
        [
            {
                "target_sensitivity": target,
                **_at(scores, truth, stats.operating_point(scores, truth, target), prevalence),
            }
            for target in TARGET_SENSITIVITIES
        ]
        if npos > 0 and nneg > 0
        else []
    )
    out["score_histogram"] = stats.histogram(scores)
    out["flag_rate"] = _r(float((scores >= review).mean()))
    order = np.argsort(scores, kind="stable")
    out["worst_false_negatives"] = [
        {"study_instance_uid": uids[i], "score": float(scores[i])}
        for i in order
        if truth[i] and scores[i] < review
    ][:WORST]
    out["worst_false_positives"] = [
        {"study_instance_uid": uids[i], "score": float(scores[i])}
        for i in order[::-1]
        if not truth[i] and scores[i] >= review
    ][:WORST]
    return out


LEVELS = ("urgent", "review", "routine")


def confusion(levels: Sequence[str], truth: np.ndarray) -> dict[str, dict[str, int]]:
    """Triage level vs study truth: abnormal (any finding positive), normal (every finding
    negative) or unknown (no positive, some blank)."""
    table = {level: {"abnormal": 0, "normal": 0, "unknown": 0} for level in LEVELS}
    for level, row in zip(levels, truth, strict=True):
        if np.any(row == 1):
            kind = "abnormal"
        elif np.all(row == 0):
            kind = "normal"
        else:
            kind = "unknown"
        table[level][kind] += 1
    return table


def build_report(bundle: Bundle, scored: Scored, settings: EvaluateSettings) -> dict[str, Any]:
    spec = bundle.manifest
    findings: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for j, finding in enumerate(spec.findings):
        code = finding.code
        labelled = ~np.isnan(scored.truth[:, j]) & ~np.isnan(scored.scores[:, j])
        if not labelled.any():
            skipped[code] = "no labelled study scored for it"
            continue
        findings[code] = finding_report(
            code,
            scored.scores[labelled, j],
            scored.truth[labelled, j].astype(bool),
            [u for u, keep in zip(scored.study_uids, labelled, strict=True) if keep],
            finding.review_threshold,
            finding.urgent_threshold,
            settings,
        )
    return {
        "report_version": REPORT_VERSION,
        "command": settings.command,
        "model": {
            "name": spec.model.name,
            "version": spec.model.version,
            "sha256": bundle.sha256,
            "demo": spec.model.demo,
        },
        "settings": {
            "bootstrap_resamples": settings.resamples,
            "seed": settings.seed,
            "prevalence": settings.prevalence,
            "target_sensitivities": list(TARGET_SENSITIVITIES),
        },
        "studies": {
            "scored": len(scored.study_uids),
            "images": scored.images,
            "not_scored": dict(scored.not_scored.most_common()),
            "rejected_images": dict(scored.rejected_images.most_common()),
        },
        "findings": findings,
        "findings_not_evaluated": skipped,
        "triage_confusion": confusion(scored.levels, scored.truth),
        "timings_s": {
            "read_headers": round(scored.seconds_read, 3),
            "decode_and_encode": round(scored.seconds_embed, 3),
            "decode": round(scored.seconds_decode, 3),
            "encode": round(scored.seconds_encode, 3),
        },
        "provider": scored.provider,
    }


# --------------------------------------------------------------------------- new revision


def _revision_version(old: str, target: float) -> str:
    # PEP 440 local version, as probe's: "1.0" -> "1.0+sens95", "1.0+probe" -> "1.0+probe.sens95"
    tag = f"sens{round(target * 100)}"
    return f"{old}.{tag}" if "+" in old else f"{old}+{tag}"


def write_revision(
    bundle: Bundle,
    report: dict[str, Any],
    target: float,
    out: Path,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """A new bundle revision at ``out`` whose review thresholds are the report's operating
    points at ``target`` sensitivity (urgent thresholds kept, raised to review where they
    would fall below it). The source bundle is never touched. Returns what was written."""
    from edge_agent.bundle import ModelInfo, read_manifest

    from ..bundle_writer import write_bundle

    spec = bundle.manifest
    findings = []
    changed: dict[str, dict[str, float | None]] = {}
    for finding in spec.findings:
        points = (report["findings"].get(finding.code) or {}).get("operating_points", [])
        point = next((p for p in points if p["target_sensitivity"] == target), None)
        if point is None:
            logger.warning(
                "finding %s keeps its thresholds: no operating point (no positive and negative "
                "labelled studies)",
                finding.code,
            )
            findings.append(finding)
            continue
        review = float(point["threshold"])
        urgent = finding.urgent_threshold
        if urgent is not None:
            urgent = max(urgent, review)
        findings.append(
            finding.model_copy(update={"review_threshold": review, "urgent_threshold": urgent})
        )
        changed[finding.code] = {"review_threshold": review, "urgent_threshold": urgent}
    if spec.engines:
        logger.warning(
            "source device engines are not carried over (%s): rebuild them with "
            "edge-export tensorrt",
            ", ".join(spec.engines),
        )
    if spec.report is not None:
        logger.warning(
            "the source's narrative report section is not carried over: add it again with "
            "edge-export add-report"
        )
    metrics: dict[str, float | int | str] = dict(spec.metrics or {})
    metrics["thresholds"] = (
        f"review at sensitivity {target} on {report['studies']['scored']} labelled studies "
        f"(edge-export evaluate of model sha256 {bundle.sha256[:12]})"
    )
    for code, f in report["findings"].items():
        if f["auroc"] is not None:
            metrics[f"site_auroc_{code}"] = f["auroc"]
    version = _revision_version(spec.model.version, target)
    notice = spec.model.notice
    write_bundle(
        out,
        encoder_onnx=bundle.encoder_path,
        model=ModelInfo(
            name=spec.model.name,
            version=version,
            source=spec.model.source,
            demo=spec.model.demo,
            notice=Path(notice).name if notice else None,
        ),
        precision=spec.precision,
        preprocessing=spec.encoder.preprocessing,
        ct=spec.ct,
        head=spec.head,
        findings=findings,
        parity=spec.parity,
        metrics=metrics,
        extra_files=[bundle.root / notice] if notice else [],
        overwrite=overwrite,
    )
    return {
        "path": str(out),
        "version": version,
        "target_sensitivity": target,
        "model_sha256": read_manifest(out).model_sha256(),
        "thresholds": changed,
    }


# --------------------------------------------------------------------------- the command


def evaluate(
    bundle_dir: Path,
    data: Path,
    labels_csv: Path,
    out: Path,
    settings: EvaluateSettings,
    *,
    reference_dir: Path | None = None,
    state_db: Path | None = None,
    revision: tuple[Path, float] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Score, compute, write report.json, the figures and index.html; return the report."""
    from export.probe import _check_out, _require_extra

    from .html import write_html

    _require_extra()
    bundle = load_bundle(bundle_dir)
    reference = load_bundle(reference_dir) if reference_dir is not None else None
    notification = time_to_notification(state_db) if state_db is not None else None
    if revision is not None:
        _check_out(Path(bundle_dir), revision[0], overwrite)  # before all the work
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        # A signed validation report is not replaced by accident (checked before the work).
        raise ConfigError(
            "--out", f"{out} is not empty (an earlier report?): choose a new folder or --overwrite"
        )
    if settings.prevalence:
        unknown = sorted(set(settings.prevalence) - set(bundle.finding_codes))
        if unknown:
            raise ConfigError(
                "--prevalence",
                f"{', '.join(unknown)} is not a finding of the bundle (its findings: "
                f"{', '.join(bundle.finding_codes)})",
            )
    labels, scan, read = read_input(bundle, labels_csv, data, settings)
    scored = score_scan(bundle, labels, scan, settings, read)
    if not scored.study_uids:
        raise ConfigError(
            "--data",
            "no labelled study could be scored ("
            + ", ".join(f"{n} × {r}" for r, n in scored.not_scored.most_common())
            + ")",
        )
    start = time.perf_counter()
    report = build_report(bundle, scored, settings)
    report["timings_s"]["statistics"] = round(time.perf_counter() - start, 3)
    if reference is not None:
        report["reference"] = compare_reference(reference, labels, scan, scored, settings)
    if notification is not None:
        report["time_to_notification"] = notification
    if revision is not None:
        report["revision"] = write_revision(
            bundle, report, revision[1], revision[0], overwrite=overwrite
        )
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write_html(out, report, scored)
    report["timings_s"]["figures"] = round(time.perf_counter() - start, 3)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_summary(report: dict[str, Any]) -> str:
    lines = [f"{'finding':<20}{'n+':>5}{'n-':>6}{'AUROC':>8}{'95% CI':>16}{'sens':>7}{'spec':>7}"]
    for code, f in report["findings"].items():
        ci = f["auroc_ci95"]
        ci_text = f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "—"
        auroc = "—" if f["auroc"] is None else f"{f['auroc']:.3f}"
        sens = "—" if f["sensitivity"] is None else f"{f['sensitivity']:.3f}"
        spec = "—" if f["specificity"] is None else f"{f['specificity']:.3f}"
        lines.append(
            f"{code:<20}{f['n_positive']:>5}{f['n_negative']:>6}{auroc:>8}{ci_text:>16}"
            f"{sens:>7}{spec:>7}"
        )
    ref = report.get("reference")
    if ref is not None:
        lines.append(
            f"vs reference {ref['model']['version']}: triage agreement {ref['agreement']}, "
            f"kappa {ref['kappa']}, {len(ref['changed'])} studies change level"
        )
    rev = report.get("revision")
    if rev is not None:
        lines.append(
            f"new bundle {rev['path']}: version {rev['version']}, review thresholds at "
            f"sensitivity {rev['target_sensitivity']} ("
            + ", ".join(f"{c} {t['review_threshold']}" for c, t in rev["thresholds"].items())
            + ")"
        )
    ttn = report.get("time_to_notification")
    if ttn is not None:
        lines.append(
            f"time to notification over {ttn['studies']} studies: p50 {ttn['p50_s']} s, "
            f"p95 {ttn['p95_s']} s, max {ttn['max_s']} s"
        )
    not_scored = report["studies"]["not_scored"]
    if not_scored:
        lines.append(
            "not scored: " + ", ".join(f"{n} × {reason}" for reason, n in not_scored.items())
        )
    return "\n".join(lines)


def _prevalence(text: str) -> tuple[str, float]:
    code, sep, value = text.partition("=")
    if not sep or not code.strip():
        raise argparse.ArgumentTypeError("expected CODE=FRACTION, e.g. pneumothorax=0.02")
    try:
        p = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 < p < 1.0:
        raise argparse.ArgumentTypeError(f"{p} is not between 0 and 1 (exclusive)")
    return code.strip(), p


def cmd_drift(args: argparse.Namespace) -> int:
    from .drift import drift

    if args.baseline is None:
        raise ConfigError("--baseline", "--drift needs the baseline REPORT_DIR")
    result = drift(args.drift, args.baseline, args.psi_limit, args.alpha, days=args.days)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for code, f in result["findings"].items():
            if f["studies"]:
                lo, hi = f["flag_rate_ci95"]
                print(
                    f"{code:<20} {f['studies']:>6} studies  PSI {f['psi']:.3f}  flag rate "
                    f"{f['flag_rate']:.3f} ({lo:.3f}-{hi:.3f}), "
                    f"baseline {f['baseline_flag_rate']:.3f}"
                )
        for reason, n in result["left_out"].items():
            print(f"left out: {n} × {reason}")
        print(result["verdict"])
    return 1 if result["moved"] else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.drift is not None:
        mixed = [
            f"--{name.replace('_', '-')}"
            for name in ("bundle", "data", "labels", "out", "reference", "state", "write_bundle")
            if getattr(args, name) is not None
        ]
        if mixed:
            raise ConfigError(
                "--drift", f"compares stored results with --baseline only: drop {', '.join(mixed)}"
            )
        return cmd_drift(args)
    if args.days is not None:
        raise ConfigError("--days", "chooses the days --drift compares: use it with --drift")
    missing = [
        f"--{name.replace('_', '-')}"
        for name in ("bundle", "data", "labels", "out")
        if getattr(args, name) is None
    ]
    if missing:
        raise ConfigError(missing[0], f"required (missing: {', '.join(missing)})")
    settings = EvaluateSettings(
        resamples=args.resamples,
        seed=args.seed,
        prevalence=dict(args.prevalence) if args.prevalence else None,
        profile=args.profile,
        threads=args.threads,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=args.progress,
        command=shlex.join(["edge-export", *args.argv]),
    )
    report = evaluate(
        args.bundle,
        args.data,
        args.labels,
        args.out,
        settings,
        reference_dir=args.reference,
        state_db=args.state,
        revision=None if args.write_bundle is None else (args.write_bundle, args.at_sensitivity),
        overwrite=args.overwrite,
    )
    print(format_summary(report))
    print(f"report: {args.out / 'index.html'} and {args.out / 'report.json'}")
    return 0


def register(sub: Any) -> None:
    from export.probe import UID_COLUMN, _int_at_least

    p = sub.add_parser(
        "evaluate",
        help="validate a bundle on a site's labelled studies: AUROC with CI, sensitivity, "
        "specificity, operating points; an HTML report",
        description="Score the labelled studies found in a DICOM folder as the daemon would "
        "(its image selection, preprocessing, encoder, head and triage rule) and write "
        "REPORT_DIR/report.json, REPORT_DIR/index.html and the figures as PNG.",
    )
    p.add_argument("--bundle", type=Path, help="bundle folder to evaluate")
    p.add_argument("--data", type=Path, metavar="DIR", help="folder of DICOM files (walked)")
    p.add_argument(
        "--labels",
        type=Path,
        metavar="CSV",
        help=f"CSV with a {UID_COLUMN} column and one column per finding code: 1/0, "
        "true/false, yes/no, blank for unknown; exactly the studies of --data",
    )
    p.add_argument("--out", type=Path, metavar="REPORT_DIR", help="report folder")
    p.add_argument(
        "--drift",
        type=Path,
        metavar="STATE_DB",
        help="instead: compare the agent's results (its state database, read only) with "
        "--baseline; exit 1 when the stream moved",
    )
    p.add_argument("--baseline", type=Path, metavar="REPORT_DIR", help="the report to compare with")
    p.add_argument(
        "--psi-limit",
        type=float,
        default=0.25,
        help="with --drift: a finding moved at this population stability index (default 0.25)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=0.01,
        help="with --drift: significance level of the PSI and flag-rate tests (default 0.01)",
    )
    p.add_argument("--json", action="store_true", help="with --drift: print the result as JSON")
    p.add_argument(
        "--days",
        type=_int_at_least(1),
        metavar="N",
        help="with --drift: only the studies of the last N UTC days, today included "
        "(default: every day the agent kept)",
    )
    p.add_argument(
        "--prevalence",
        type=_prevalence,
        action="append",
        metavar="CODE=P",
        help="also give PPV and NPV at this prevalence of a finding (repeatable)",
    )
    p.add_argument(
        "--reference",
        type=Path,
        metavar="B0",
        help="another bundle (the one in service): triage-level agreement, Cohen's kappa and "
        "the studies whose level changes",
    )
    p.add_argument(
        "--state",
        type=Path,
        metavar="STATE_DB",
        help="the agent's state database (read only): time to notification p50/p95/max",
    )
    p.add_argument(
        "--write-bundle",
        type=Path,
        metavar="NEW",
        help="also write a new bundle revision whose review thresholds are the operating "
        "points at --at-sensitivity (the source bundle is not modified)",
    )
    p.add_argument(
        "--at-sensitivity",
        type=float,
        choices=TARGET_SENSITIVITIES,
        default=0.95,
        help="target sensitivity of --write-bundle's review thresholds (default 0.95)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out folder and replace an existing --write-bundle",
    )
    p.add_argument(
        "--resamples",
        type=_int_at_least(100),
        default=DEFAULT_RESAMPLES,
        help=f"bootstrap resamples of the AUROC interval (default {DEFAULT_RESAMPLES})",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument(
        "--profile", help="device profile for the encoder (default: ONNX Runtime on the CPU)"
    )
    p.add_argument("--threads", type=_int_at_least(0), default=0, help="ONNX Runtime threads")
    p.add_argument("--batch-size", type=_int_at_least(1), help="images per encoder call")
    p.add_argument(
        "--workers", type=_int_at_least(1), default=1, help="threads reading DICOM images"
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr (default: when stderr is a terminal)",
    )
    p.set_defaults(func=cmd_evaluate, argv=[])
