"""``edge-export evaluate --drift STATE_DB --baseline REPORT_DIR``: has the stream moved?

The agent keeps daily tallies of its results in its state database
(:mod:`edge_agent.state.tallies`: each study counted once, at its first result, on that
result's UTC day, per model and finding: its score in a fine bin, whether it was flagged).
This reads them read-only (the agent may be running), takes those of the baseline report's
model (same model sha256: other models' studies are counted and left out), and compares per
finding:

- the score distribution with the baseline report's ``score_histogram`` (the agent's fine
  bins added up to the report's 20 equal-width bins, :mod:`edge_agent.histogram`; adjacent
  bins merged until each holds 5 % of the baseline): population stability index (PSI);
- the flag rate (score at or above the review threshold the result carried) with its
  Wilson 95 % interval, against the baseline's ``flag_rate``; and the flag rate per UTC day.

A database written by an agent before the tallies (schema 5 or older) has none: they are
counted from its stored results, by the code the agent's migration runs, into a database
in memory (the file is not changed), and read the same way.

Verdict: *moved* when, for a finding, the PSI reaches ``psi_limit`` (default 0.25) and is
significant (p < ``alpha``, default 0.01: on small samples PSI is large by chance alone), or
the flag rate differs from the baseline's (two-proportion test, p < ``alpha``). The
baseline should be a report on studies like the ones the box sees (not an enriched set),
or the flag rate differs by design. The tallies hold nothing identifying a study.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

from edge_agent.errors import ConfigError
from edge_agent.histogram import FINE_BINS, coarsen
from edge_agent.state import schema, tallies
from edge_agent.state.report import open_read_only
from edge_agent.state.schema import Layout
from edge_agent.state.tallies import Tallies

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
        findings: dict[str, dict[str, Any]] = {
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
    for code, f in findings.items():
        bins = len(f["histogram"])
        if bins < 1 or FINE_BINS % bins:
            raise ConfigError(
                "--baseline",
                f"{path}: the score_histogram of {code} has {bins} bins; the agent's "
                f"{FINE_BINS} bins add up only to a divisor of {FINE_BINS}",
            )
    return {"sha256": sha, "findings": findings}


def read_tallies(state_db: Path, since: str | None = None) -> Tallies:
    """The agent's daily tallies in ``state_db`` (read-only), of the UTC days from ``since``
    on (default: all). An older agent's database has none: they are counted from its stored
    results into a database in memory."""
    try:
        conn = open_read_only(state_db)
        try:
            layout = Layout.of(conn)
            if tallies.has_tallies(layout):
                return tallies.read(conn, since)
            if not layout.has("results"):
                raise ConfigError("--drift", f"{state_db}: not an edge-agent state database")
            memory = sqlite3.connect(":memory:", isolation_level=None)
            try:
                schema.create(memory, Path(":memory:"))
                counted = tallies.backfill(conn, memory)
                logger.info(
                    "%s predates the agent's tallies: %d studies counted from its results",
                    state_db,
                    counted,
                )
                return tallies.read(memory, since)
            finally:
                memory.close()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise ConfigError("--drift", f"{state_db}: not a readable state database ({exc})") from exc


def left_out(kept: Tallies, sha256: str) -> Counter[str]:
    """The studies not compared, by reason."""
    out: Counter[str] = Counter()
    for model, days in kept.levels.items():
        if model == sha256:
            out["not scored"] += sum(levels.get("not_scored", 0) for levels in days.values())
            continue
        reason = "unreadable result payload" if model == "" else "scored by another model"
        out[reason] += sum(sum(levels.values()) for levels in days.values())
    return +out  # zero counts dropped


def drift(
    state_db: Path,
    baseline_dir: Path,
    psi_limit: float = DEFAULT_PSI_LIMIT,
    alpha: float = DEFAULT_ALPHA,
    *,
    days: int | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Compare the studies of ``state_db`` (those of the last ``days`` UTC days at ``now``,
    today included; default: all) with the baseline report in ``baseline_dir``."""
    baseline = read_baseline(baseline_dir)
    sha = baseline["sha256"]
    since = None if days is None else tallies.window(time.time() if now is None else now, days)[0]
    kept = read_tallies(state_db, since)
    findings: dict[str, Any] = {}
    moved: list[str] = []
    for code, base in baseline["findings"].items():
        total = kept.finding(sha, code)
        n = total.studies
        if n == 0:
            findings[code] = {"studies": 0}
            continue
        hist = coarsen(total.bins, len(base["histogram"]))
        merged_base, merged = stats.merge_sparse_bins(base["histogram"], hist)
        value = stats.psi(merged_base, merged)
        flags = total.flagged
        ci = stats.wilson(flags, n)
        assert ci is not None
        daily = kept.findings[sha][code]
        psi_p = stats.psi_p_value(value, merged_base, merged)
        base_flags = round(base["flag_rate"] * base["studies"])
        rate_p = stats.two_proportion_p_value(flags, n, base_flags, base["studies"])
        why = []
        if value >= psi_limit and psi_p < alpha:
            why.append(f"PSI {value:.3f} >= {psi_limit} (p {psi_p:.2g})")
        if rate_p < alpha:
            why.append(
                f"flag rate {flags / n:.3f} ({ci[0]:.3f}-{ci[1]:.3f}) vs the "
                f"baseline's {base['flag_rate']:.3f} (p {rate_p:.2g})"
            )
        if why:
            moved.append(f"{code}: " + ", ".join(why))
        findings[code] = {
            "studies": n,
            "psi": round(value, 4),
            "psi_p_value": float(f"{psi_p:.3g}"),
            "score_histogram": hist,
            "flag_rate": round(flags / n, 4),
            "flag_rate_ci95": [round(ci[0], 4), round(ci[1], 4)],
            "baseline_flag_rate": base["flag_rate"],
            "flag_rate_p_value": float(f"{rate_p:.3g}"),
            "daily_flag_rate": {
                day: {
                    "flagged": d.flagged,
                    "studies": d.studies,
                    "rate": round(d.flagged / d.studies, 4),
                }
                for day, d in sorted(daily.items())
                if d.studies
            },
        }
    studies = max((f["studies"] for f in findings.values()), default=0)
    when = "" if since is None else f" since {since}"
    if studies == 0:
        verdict = f"no result of model {sha[:12]} in {state_db.name}{when}: nothing to compare"
    elif moved:
        verdict = "MOVED: " + "; ".join(moved)
    else:
        verdict = f"stable: {studies} studies{when}, no significant shift of scores or flag rates"
    return {
        "model_sha256": sha,
        "psi_limit": psi_limit,
        "alpha": alpha,
        "since": since,
        "studies": studies,
        "left_out": dict(left_out(kept, sha).most_common()),
        "findings": findings,
        "moved": bool(moved),
        "verdict": verdict,
    }
