"""``edge-export evaluate --drift STATE_DB --baseline REPORT_DIR``: has the stream moved?

The agent's state database keeps every result it published (the ``results`` table, the
payload byte for byte). This reads it read-only (the agent may be running), takes each
study's first result computed by the baseline report's model (same model sha256: other
models' results are counted and left out), and compares per finding:

- the score distribution with the baseline report's ``score_histogram`` (the same 20
  equal-width bins, adjacent bins merged until each holds 5 % of the baseline):
  population stability index (PSI);
- the flag rate (score at or above the review threshold the result carries) with its
  Wilson 95 % interval, against the baseline's ``flag_rate``; and the flag rate per UTC day.

Verdict: *moved* when, for a finding, the PSI reaches ``psi_limit`` (default 0.25) and is
significant (p < ``alpha``, default 0.01: on small samples PSI is large by chance alone), or
the flag rate differs from the baseline's (two-proportion test, p < ``alpha``). Only
scores, flags and days are read from a payload; the
baseline should be a report on studies like the ones the box sees (not an enriched set),
or the flag rate differs by design. Nothing identifying a study is printed.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import ConfigError

from . import stats

logger = logging.getLogger(__name__)

DEFAULT_PSI_LIMIT = 0.25
DEFAULT_ALPHA = 0.01


def read_baseline(folder: Path) -> dict[str, Any]:
    """The baseline report's model sha256, histograms and flag rates (refused, naming what
    is missing, when the report predates them or is not a report)."""
    path = folder / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("--baseline", f"{folder} holds no report.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError("--baseline", f"{path} is not a readable report ({exc})") from None
    try:
        sha = str(report["model"]["sha256"])
        findings = {
            code: {
                "histogram": list(f["score_histogram"]),
                "flag_rate": float(f["flag_rate"]),
                "studies": int(f["n_positive"]) + int(f["n_negative"]),
            }
            for code, f in report["findings"].items()
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            "--baseline",
            f"{path} has no score histograms or flag rates ({exc}): evaluate again with this "
            "version to make a baseline",
        ) from None
    return {"sha256": sha, "findings": findings}


Stream = dict[str, list[tuple[float, bool, str]]]


def read_stream(state_db: Path, sha256: str) -> tuple[Stream, Counter[str]]:
    """Per finding: (score, flagged, UTC day) of each study's first result by model
    ``sha256``; and what was left out, by reason."""
    from edge_agent.state.report import open_read_only

    left_out: Counter[str] = Counter()
    per_finding: dict[str, list[tuple[float, bool, str]]] = defaultdict(list)
    try:
        conn = open_read_only(state_db)
        try:
            rows = conn.execute(
                "SELECT study_instance_uid, revision, created_at, payload FROM results "
                "ORDER BY study_instance_uid, revision"
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise ConfigError("--drift", f"{state_db}: not a readable state database ({exc})") from exc
    seen: set[str] = set()
    for uid, _revision, created_at, payload in rows:
        if uid in seen:
            continue  # later revisions (late instances, narratives) repeat or revise the study
        seen.add(uid)
        try:
            result = json.loads(payload)
            model = result["model"]["sha256"]
            findings = [
                (str(f["code"]), float(f["score"]), bool(f["flagged"])) for f in result["findings"]
            ]
        except (ValueError, KeyError, TypeError):
            left_out["unreadable result payload"] += 1
            continue
        if model != sha256:
            left_out["scored by another model"] += 1
            continue
        if not findings:
            left_out["not scored"] += 1
            continue
        day = datetime.fromtimestamp(float(created_at), timezone.utc).date().isoformat()
        for code, score, flagged in findings:
            per_finding[code].append((score, flagged, day))
    return dict(per_finding), left_out


def drift(
    state_db: Path,
    baseline_dir: Path,
    psi_limit: float = DEFAULT_PSI_LIMIT,
    alpha: float = DEFAULT_ALPHA,
) -> dict[str, Any]:
    baseline = read_baseline(baseline_dir)
    stream, left_out = read_stream(state_db, baseline["sha256"])
    findings: dict[str, Any] = {}
    moved: list[str] = []
    for code, base in baseline["findings"].items():
        values = stream.get(code, [])
        if not values:
            findings[code] = {"studies": 0}
            continue
        hist = stats.histogram(np.asarray([v[0] for v in values]))
        merged_base, merged = stats.merge_sparse_bins(base["histogram"], hist)
        value = stats.psi(merged_base, merged)
        flags = sum(v[1] for v in values)
        ci = stats.wilson(flags, len(values))
        assert ci is not None
        daily: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for _, flagged, day in values:
            daily[day][0] += int(flagged)
            daily[day][1] += 1
        psi_p = stats.psi_p_value(value, merged_base, merged)
        base_flags = round(base["flag_rate"] * base["studies"])
        rate_p = stats.two_proportion_p_value(flags, len(values), base_flags, base["studies"])
        why = []
        if value >= psi_limit and psi_p < alpha:
            why.append(f"PSI {value:.3f} >= {psi_limit} (p {psi_p:.2g})")
        if rate_p < alpha:
            why.append(
                f"flag rate {flags / len(values):.3f} ({ci[0]:.3f}-{ci[1]:.3f}) vs the "
                f"baseline's {base['flag_rate']:.3f} (p {rate_p:.2g})"
            )
        if why:
            moved.append(f"{code}: " + ", ".join(why))
        findings[code] = {
            "studies": len(values),
            "psi": round(value, 4),
            "psi_p_value": float(f"{psi_p:.3g}"),
            "score_histogram": hist,
            "flag_rate": round(flags / len(values), 4),
            "flag_rate_ci95": [round(ci[0], 4), round(ci[1], 4)],
            "baseline_flag_rate": base["flag_rate"],
            "flag_rate_p_value": float(f"{rate_p:.3g}"),
            "daily_flag_rate": {
                day: {"flagged": f, "studies": n, "rate": round(f / n, 4)}
                for day, (f, n) in sorted(daily.items())
            },
        }
    studies = max((f["studies"] for f in findings.values()), default=0)
    if studies == 0:
        verdict = (
            f"no result of model {baseline['sha256'][:12]} in {state_db.name}: nothing to compare"
        )
    elif moved:
        verdict = "MOVED: " + "; ".join(moved)
    else:
        verdict = f"stable: {studies} studies, no significant shift of scores or flag rates"
    return {
        "model_sha256": baseline["sha256"],
        "psi_limit": psi_limit,
        "alpha": alpha,
        "studies": studies,
        "left_out": dict(left_out.most_common()),
        "findings": findings,
        "moved": bool(moved),
        "verdict": verdict,
    }
