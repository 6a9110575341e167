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
from .html import ci_text

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


def check_comparable(bundle: Bundle, reference: Bundle) -> None:
    """Refuse a reference that does not answer the same questions: other findings, or a
    finding scored on other images (radiographs against CT). Each bundle keeps its own
    preprocessing, head and thresholds: those are what is compared."""
    ours = {f.code: f for f in bundle.manifest.findings}
    theirs = {f.code: f for f in reference.manifest.findings}
    problems = []
    for where, codes in (
        ("the bundle", set(ours) - set(theirs)),
        ("the reference", set(theirs) - set(ours)),
    ):
        if codes:
            problems.append(f"findings only in {where}: {', '.join(sorted(codes))}")
    for code in sorted(set(ours) & set(theirs)):
        a, b = ours[code].modalities, theirs[code].modalities
        if set(a) != set(b):
            problems.append(
                f"finding {code} is scored on {'/'.join(a)} images by the bundle, on "
                f"{'/'.join(b)} by the reference"
            )
    if problems:
        raise ConfigError(
            "--reference",
            f"{reference.root} cannot be compared with {bundle.root}: "
            + "; ".join(problems)
            + ". A reference scores the same findings on the same images.",
        )


def _score_row(scored: Scored, index: int | None) -> dict[str, float | None]:
    if index is None:
        return dict.fromkeys(scored.codes)
    row = scored.scores[index]
    return {c: float(row[j]) if math.isfinite(row[j]) else None for j, c in enumerate(scored.codes)}


def compare_reference(
    reference: Bundle, labels: Labels, scan: DataScan, scored: Scored, settings: EvaluateSettings
) -> dict[str, Any]:
    """The same studies scored by ``reference``: triage-level agreement with its Wilson
    interval, Cohen's kappa, the score differences per finding (this bundle's minus the
    reference's, over the studies both score) and every study whose level changes (by
    StudyInstanceUID, with both bundles' scores). A study one bundle does not score counts
    as ``not_scored`` for it. The bundles have the same findings (:func:`check_comparable`)."""
    from export.probe import Labels

    blank = Labels(
        path=labels.path,
        codes=tuple(reference.finding_codes),
        studies={uid: (None,) * len(reference.finding_codes) for uid in labels.studies},
    )
    ref = score_scan(reference, blank, scan, settings)
    ours = {u: i for i, u in enumerate(scored.study_uids)}
    theirs = {u: i for i, u in enumerate(ref.study_uids)}
    uids = sorted(set(labels.studies) & set(scan.studies))
    a = [ref.levels[theirs[u]] if u in theirs else "not_scored" for u in uids]
    b = [scored.levels[ours[u]] if u in ours else "not_scored" for u in uids]
    table: dict[str, dict[str, int]] = {}
    for x, y in zip(a, b, strict=True):
        table.setdefault(x, {}).setdefault(y, 0)
        table[x][y] += 1
    kappa = stats.cohen_kappa(a, b)
    agree = stats.Proportion(sum(x == y for x, y in zip(a, b, strict=True)), len(uids))
    differences: dict[str, Any] = {}
    both = [(ours[u], theirs[u]) for u in uids if u in ours and u in theirs]
    for j, code in enumerate(scored.codes):
        k = ref.codes.index(code)
        d = np.asarray([scored.scores[i, j] - ref.scores[r, k] for i, r in both])
        d = d[np.isfinite(d)]
        differences[code] = {
            "studies": len(d),
            "mean": _r(float(d.mean())) if len(d) else None,
            "mean_abs": _r(float(np.abs(d).mean())) if len(d) else None,
            "max_abs": _r(float(np.abs(d).max())) if len(d) else None,
        }
    spec = reference.manifest
    return {
        "model": {
            "name": spec.model.name,
            "version": spec.model.version,
            "sha256": reference.sha256,
        },
        "studies": len(uids),
        "agreement": _r(agree.value),
        "agreement_ci95": _pair(agree.ci95),
        "kappa": _r(kappa),
        "levels": table,
        "score_differences": differences,
        "changed": [
            {
                "study_instance_uid": u,
                "reference": x,
                "level": y,
                "reference_scores": _score_row(ref, theirs.get(u)),
                "scores": _score_row(scored, ours.get(u)),
            }
            for u, x, y in zip(uids, a, b, strict=True)
            if x != y
        ],
    }


def _summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"studies": 0, "p50_s": None, "p95_s": None, "max_s": None}
    v = np.asarray(values, dtype=np.float64)
    return {
        "studies": len(values),
        "p50_s": round(float(np.percentile(v, 50)), 3),
        "p95_s": round(float(np.percentile(v, 95)), 3),
        "max_s": round(float(v.max()), 3),
    }


Timing = dict[str, Any]
"""studies, p50_s, p95_s, max_s (:func:`_summary`) and what else a timing says."""


def time_to_notification(state_db: Path) -> tuple[Timing, Timing, Timing]:
    """Read only from the agent's state database, by the agent's clock, over each study's
    first result: time to notification (its last instance received -> the result stored ->
    the broker's first PUBACK of it; p50/p95/max of the whole and of each stage, and of the
    whole by triage level), time to acknowledgement (an urgent study's first
    notification acknowledged by the broker -> the first acknowledgement the agent took),
    and time to PACS (over each study's first result whose SR the PACS stored: its last
    instance received -> the result stored -> the PACS's Success to the SR's C-STORE).

    A result with no PUBACK recorded (still queued, or stored by an agent older than state
    schema 6) counts in ``not_published``; an urgent study not acknowledged, in
    ``unacknowledged``; a study whose SR still waits for the PACS and none of whose results
    the PACS stored, in ``waiting``. An agent older than schema 7 recorded no PACS time."""
    import sqlite3

    from edge_agent.state.report import open_read_only
    from edge_agent.state.schema import Layout

    try:
        conn = open_read_only(state_db)
        try:
            layout = Layout.of(conn)
            # an older agent's database lacks the columns: NULL in their place
            published = "r.published_at" if layout.has("results", "published_at") else "NULL"
            taken = "b.ack_taken_at" if layout.has("alerts", "ack_taken_at") else "NULL"
            has_pacs = layout.has("results", "pacs_stored_at")
            # the study's last instance received before this result was stored
            received = (
                "COALESCE((SELECT MAX(i.received_at) FROM instances i "
                "WHERE i.study_instance_uid = r.study_instance_uid "
                "AND i.received_at <= r.created_at), s.last_instance_at)"
            )
            firsts = conn.execute(
                f"SELECT r.triage, {received}, r.created_at, {published} FROM results r "
                "JOIN studies s ON s.study_instance_uid = r.study_instance_uid "
                "WHERE r.revision = (SELECT MIN(revision) FROM results "
                "WHERE study_instance_uid = r.study_instance_uid)"
            ).fetchall()
            in_pacs = (
                conn.execute(
                    f"SELECT {received}, r.created_at, r.pacs_stored_at FROM results r "
                    "JOIN studies s ON s.study_instance_uid = r.study_instance_uid "
                    "WHERE r.revision = (SELECT MIN(revision) FROM results "
                    "WHERE study_instance_uid = r.study_instance_uid "
                    "AND pacs_stored_at IS NOT NULL)"
                ).fetchall()
                if has_pacs
                else []
            )
            # studies with an SR waiting and none stored yet (before schema 5: no PACS)
            stored_one = (
                " WHERE NOT EXISTS (SELECT 1 FROM results d WHERE d.study_instance_uid "
                "= r.study_instance_uid AND d.pacs_stored_at IS NOT NULL)"
                if has_pacs
                else ""
            )
            (waiting,) = (
                conn.execute(
                    "SELECT COUNT(DISTINCT r.study_instance_uid) FROM pacs_outbox p "
                    f"JOIN results r ON r.alert_id = p.alert_id{stored_one}"
                ).fetchone()
                if layout.has("pacs_outbox")
                else (0,)
            )
            acks = conn.execute(
                f"SELECT {published}, (SELECT MIN({taken}) FROM alerts b "
                "WHERE b.study_instance_uid = a.study_instance_uid) "
                "FROM alerts a JOIN results r ON r.alert_id = a.alert_id "
                "WHERE a.created_at = (SELECT MIN(created_at) FROM alerts "
                "WHERE study_instance_uid = a.study_instance_uid)"
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise ConfigError("--state", f"{state_db}: not a readable state database ({exc})") from exc

    whole = [(t, puback - received) for t, received, _, puback in firsts if puback is not None]
    notification = _summary([d for _, d in whole])
    notification["stages"] = {
        "received_to_result": _summary([float(c - r) for _, r, c, _ in firsts]),
        "result_to_puback": _summary([float(p - c) for _, _, c, p in firsts if p is not None]),
    }
    notification["by_level"] = {
        level: _summary([d for t, d in whole if t == level])
        for level in sorted({t for t, _ in whole})
    }
    notification["not_published"] = sum(1 for *_, p in firsts if p is None)
    notification["measured"] = (
        "last instance received -> result stored -> first PUBACK from the broker, "
        "each study's first result, by the agent's clock"
    )
    acknowledgement = _summary([float(k - p) for p, k in acks if p is not None and k is not None])
    acknowledgement["unacknowledged"] = sum(1 for _, k in acks if k is None)
    acknowledgement["measured"] = (
        "an urgent study's first notification acknowledged by the broker (PUBACK) -> the "
        "first acknowledgement the agent took, by the agent's clock"
    )
    pacs = _summary([float(p - r) for r, _, p in in_pacs])
    pacs["stages"] = {"result_to_pacs": _summary([float(p - c) for _, c, p in in_pacs])}
    pacs["waiting"] = int(waiting)
    pacs["measured"] = (
        "last instance received -> result stored -> the PACS's Success to its SR's C-STORE, "
        "each study's first result the PACS stored, by the agent's clock"
    )
    return notification, acknowledgement, pacs


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
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Every figure of one finding over the studies labelled for it; the bootstrap's seconds
    are added to ``timings["bootstrap"]`` (its share of the run is a benchmark's figure)."""
    npos, nneg = int(truth.sum()), int((~truth).sum())
    out: dict[str, Any] = {"n_positive": npos, "n_negative": nneg}
    both = npos > 0 and nneg > 0
    out["auroc"] = _r(stats.auroc(scores, truth)) if both else None
    out["auroc_ci95"] = None
    if both:
        start = time.perf_counter()
        out["auroc_ci95"] = _pair(
            stats.bootstrap_auroc(scores, truth, resamples=settings.resamples, seed=settings.seed)
        )
        if timings is not None:
            timings["bootstrap"] = timings.get("bootstrap", 0.0) + time.perf_counter() - start
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
    timings = {"bootstrap": 0.0}
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
            timings,
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
            "bootstrap": round(timings["bootstrap"], 3),
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
    from edge_agent.bundle import read_manifest

    from ..bundle_writer import revise_bundle

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
    metrics: dict[str, float | int | str] = dict(spec.metrics or {})
    metrics["thresholds"] = (
        f"review at sensitivity {target} on {report['studies']['scored']} labelled studies "
        f"(edge-export evaluate of model sha256 {bundle.sha256[:12]})"
    )
    for code, f in report["findings"].items():
        if f["auroc"] is not None:
            metrics[f"site_auroc_{code}"] = f["auroc"]
    version = _revision_version(spec.model.version, target)
    revise_bundle(
        bundle, out, version=version, findings=findings, metrics=metrics, overwrite=overwrite
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
    if reference is not None:
        check_comparable(bundle, reference)
    timings = time_to_notification(state_db) if state_db is not None else None
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
    if timings is not None:
        (
            report["time_to_notification"],
            report["time_to_acknowledgement"],
            report["time_to_pacs"],
        ) = timings
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


def _timing_line(what: str, t: Timing, note: str, studies: str = "studies") -> str:
    """``time to WHAT over N STUDIES: p50 … s, p95 … s, max … s`` and `` (NOTE)`` unless
    ``note`` is empty."""
    return (
        f"time to {what} over {t['studies']} {studies}: p50 {t['p50_s']} s, "
        f"p95 {t['p95_s']} s, max {t['max_s']} s" + (f" ({note})" if note else "")
    )


def format_summary(report: dict[str, Any]) -> str:
    lines = [f"{'finding':<20}{'n+':>5}{'n-':>6}{'AUROC':>8}{'95% CI':>16}{'sens':>7}{'spec':>7}"]
    for code, f in report["findings"].items():
        interval = ci_text(f["auroc_ci95"])
        auroc = "—" if f["auroc"] is None else f"{f['auroc']:.3f}"
        sens = "—" if f["sensitivity"] is None else f"{f['sensitivity']:.3f}"
        spec = "—" if f["specificity"] is None else f"{f['specificity']:.3f}"
        lines.append(
            f"{code:<20}{f['n_positive']:>5}{f['n_negative']:>6}{auroc:>8}{interval:>16}"
            f"{sens:>7}{spec:>7}"
        )
    ref = report.get("reference")
    if ref is not None:
        lines.append(
            f"vs reference {ref['model']['version']}: triage agreement {ref['agreement']} "
            f"(95% CI {ci_text(ref['agreement_ci95'])}), kappa {ref['kappa']}, "
            f"{len(ref['changed'])} studies change level"
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
        pending = ttn["not_published"]
        note = f"{pending} not published yet" if pending else ""
        lines.append(_timing_line("notification", ttn, note))
    ttp = report.get("time_to_pacs")
    if ttp is not None and (ttp["studies"] or ttp["waiting"]):
        note = f"{ttp['waiting']} SRs waiting" if ttp["waiting"] else ""
        lines.append(_timing_line("PACS", ttp, note))
    tta = report.get("time_to_acknowledgement")
    if tta is not None and (tta["studies"] or tta["unacknowledged"]):
        note = f"{tta['unacknowledged']} not acknowledged"
        lines.append(_timing_line("acknowledgement", tta, note, studies="urgent studies"))
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
        help="the agent's state database (read only): time to notification and to "
        "acknowledgement, p50/p95/max",
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
