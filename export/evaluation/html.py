"""The evaluation report's figures (PNG, matplotlib's Agg backend) and its one-file HTML page.

The page embeds every figure as a data: URI and carries its style inline, so it opens from a
USB stick on a machine with no network. Every value written into the page is escaped: codes
and UIDs come from the bundle and the labels file (data, never markup).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.results import TRIAGE_LEVELS

from . import stats

if TYPE_CHECKING:
    from .command import Scored

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}
th{background:#eee}td.l,th.l{text-align:left}
img{max-width:100%;border:1px solid #ddd}
.demo{background:#fee;padding:0.5em;border:1px solid #c00}
code{font-size:90%}
"""


def _figure(code: str, scores: np.ndarray, truth: np.ndarray, f: dict[str, Any]) -> bytes:
    """ROC curve, score histograms by truth and calibration of one finding, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (roc, hist, cal) = plt.subplots(1, 3, figsize=(13, 4), dpi=80)
    try:
        fpr, tpr = stats.roc_curve(scores, truth)
        roc.plot(fpr, tpr, color="C0", label=f"AUROC {f['auroc']}")
        roc.plot([0, 1], [0, 1], color="#999", linestyle=":")
        review = f["review"]
        if review["sensitivity"] is not None and review["specificity"] is not None:
            roc.plot(
                [1 - review["specificity"]],
                [review["sensitivity"]],
                "o",
                color="C3",
                label=f"review ≥ {review['threshold']}",
            )
        roc.set(xlabel="1 − specificity", ylabel="sensitivity", title=f"{code}: ROC")
        roc.legend(loc="lower right")
        bins = np.linspace(0, 1, 41)
        hist.hist(scores[~truth], bins=bins, alpha=0.6, label=f"negative (n={int((~truth).sum())})")
        hist.hist(scores[truth], bins=bins, alpha=0.6, label=f"positive (n={int(truth.sum())})")
        hist.axvline(review["threshold"], color="C3", linestyle="--", label="review threshold")
        hist.set(xlabel="study score", ylabel="studies", title="scores by truth")
        hist.legend()
        points = stats.calibration(scores, truth)
        cal.plot([0, 1], [0, 1], color="#999", linestyle=":")
        cal.plot([p[0] for p in points], [p[1] for p in points], "o-", color="C2")
        cal.set(
            xlabel="mean score (bin)",
            ylabel="observed positive rate",
            title="calibration",
            xlim=(0, 1),
            ylim=(0, 1),
        )
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.3f}"
    return html.escape(str(x))


def ci_text(pair: Any) -> str:
    """A 95% interval as the page and the command's summary show it."""
    return "—" if not pair else f"{pair[0]:.3f}–{pair[1]:.3f}"


def _rate_cells(at: dict[str, Any]) -> str:
    cells = []
    for name in ("sensitivity", "specificity", "ppv", "npv"):
        cells.append(f"<td>{_fmt(at[name])} <small>({ci_text(at[name + '_ci95'])})</small></td>")
    prev = at.get("at_prevalence")
    if prev:
        cells.append(
            f"<td>{_fmt(prev['ppv'])} <small>({ci_text(prev['ppv_ci95'])})</small></td>"
            f"<td>{_fmt(prev['npv'])} <small>({ci_text(prev['npv_ci95'])})</small></td>"
        )
    else:
        cells.append("<td>—</td><td>—</td>")
    return "".join(cells)


CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
"""Nothing but the page itself and its embedded images: a report that tries to fetch
anything is a bug, and the browser refuses it."""

RATE_HEAD = (
    "<th>sensitivity</th><th>specificity</th><th>PPV</th><th>NPV</th>"
    "<th>PPV at prevalence</th><th>NPV at prevalence</th>"
)


def _finding_html(code: str, f: dict[str, Any], png: bytes) -> str:
    e = html.escape
    rows = []
    for name, at in (("review", f["review"]), ("urgent", f["urgent"])):
        if at is not None:
            rows.append(
                f"<tr><td class=l>{name}</td><td>{at['threshold']}</td>{_rate_cells(at)}</tr>"
            )
    for op in f["operating_points"]:
        rows.append(
            f"<tr><td class=l>sensitivity ≥ {op['target_sensitivity']}</td>"
            f"<td>{op['threshold']}</td>{_rate_cells(op)}</tr>"
        )
    worst = "".join(
        f"<li>false negative <code>{e(w['study_instance_uid'])}</code> score {w['score']}</li>"
        for w in f["worst_false_negatives"][:5]
    ) + "".join(
        f"<li>false positive <code>{e(w['study_instance_uid'])}</code> score {w['score']}</li>"
        for w in f["worst_false_positives"][:5]
    )
    data = base64.b64encode(png).decode("ascii")
    return (
        f"<h2 id='{e(code)}'>{e(code)}</h2>"
        f"<p>AUROC <b>{_fmt(f['auroc'])}</b> (95% bootstrap CI {ci_text(f['auroc_ci95'])}), "
        f"{f['n_positive']} positive and {f['n_negative']} negative studies.</p>"
        f"<img alt='{e(code)}: ROC curve, score histograms, calibration' "
        f"src='data:image/png;base64,{data}'>"
        "<table><tr><th class=l>threshold</th><th>value</th>"
        f"{RATE_HEAD}</tr>{''.join(rows)}</table>"
        f"<ul>{worst or '<li>no misses at the review threshold</li>'}</ul>"
    )


def write_html(out: Path, report: dict[str, Any], scored: Scored) -> None:
    """Write ``out/figures/CODE.png`` per finding and ``out/index.html``."""
    e = html.escape
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    sections = []
    for code, f in report["findings"].items():
        j = scored.codes.index(code)
        keep = ~np.isnan(scored.truth[:, j]) & ~np.isnan(scored.scores[:, j])
        png = _figure(code, scored.scores[keep, j], scored.truth[keep, j].astype(bool), f)
        (figures / f"{scored.codes.index(code):02d}-{_safe(code)}.png").write_bytes(png)
        sections.append(_finding_html(code, f, png))
    model = report["model"]
    conf = report["triage_confusion"]
    conf_rows = "".join(
        f"<tr><td class=l>{e(level)}</td><td>{c['abnormal']}</td><td>{c['normal']}</td>"
        f"<td>{c['unknown']}</td></tr>"
        for level, c in conf.items()
    )
    not_scored = report["studies"]["not_scored"]
    not_scored_html = (
        "<ul>" + "".join(f"<li>{n} × {e(r)}</li>" for r, n in not_scored.items()) + "</ul>"
        if not_scored
        else "<p>none</p>"
    )
    summary = "".join(
        f"<tr><td class=l><a href='#{e(c)}'>{e(c)}</a></td><td>{f['n_positive']}</td>"
        f"<td>{f['n_negative']}</td><td>{_fmt(f['auroc'])}</td><td>{ci_text(f['auroc_ci95'])}</td>"
        f"<td>{_fmt(f['sensitivity'])}</td><td>{_fmt(f['specificity'])}</td></tr>"
        for c, f in report["findings"].items()
    )
    demo = "<p class=demo>Demo bundle: not for clinical use.</p>" if model.get("demo") else ""
    timing = _notification_html(
        report.get("time_to_notification"),
        report.get("time_to_acknowledgement"),
        report.get("time_to_pacs"),
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>edge-triage evaluation: {e(model["name"])} {e(model["version"])}</title>
<style>{STYLE}</style></head><body>
<h1>Site evaluation: {e(model["name"])} {e(model["version"])}</h1>{demo}
<p>Model sha256 <code>{e(model["sha256"])}</code><br>
Command <code>{e(report["command"])}</code><br>
{report["studies"]["scored"]} studies scored ({report["studies"]["images"]} images);
AUROC intervals from {report["settings"]["bootstrap_resamples"]} bootstrap resamples of
studies, seed {report["settings"]["seed"]}; rate intervals are Wilson 95%.</p>
<table><tr><th class=l>finding</th><th>n+</th><th>n−</th><th>AUROC</th><th>95% CI</th>
<th>sensitivity</th><th>specificity</th></tr>{summary}</table>
<h2>Triage level vs truth (studies)</h2>
<table><tr><th class=l>level</th><th>abnormal</th><th>normal</th><th>unknown</th></tr>
{conf_rows}</table>
<h2>Not scored</h2>{not_scored_html}
{_reference_html(report.get("reference"))}{timing}
{"".join(sections)}
</body></html>
"""
    (out / "index.html").write_text(page, encoding="utf-8")


def _safe(code: str) -> str:
    """A finding code as a file name part (codes are data: nothing but [a-z0-9_-] kept)."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in code)


def _reference_html(ref: dict[str, Any] | None) -> str:
    if ref is None:
        return ""
    e = html.escape
    seen = {y for row in ref["levels"].values() for y in row} | set(ref["levels"])
    levels = [x for x in TRIAGE_LEVELS if x in seen]
    head = "".join(f"<th>{e(y)}</th>" for y in levels)
    rows = "".join(
        f"<tr><td class=l>{e(x)}</td>"
        + "".join(f"<td>{ref['levels'].get(x, {}).get(y, 0)}</td>" for y in levels)
        + "</tr>"
        for x in levels
    )
    diffs = "".join(
        f"<tr><td class=l>{e(code)}</td><td>{d['studies']}</td><td>{_signed(d['mean'])}</td>"
        f"<td>{_fmt(d['mean_abs'])}</td><td>{_fmt(d['max_abs'])}</td></tr>"
        for code, d in ref["score_differences"].items()
    )

    def scores(c: dict[str, Any]) -> str:
        return ", ".join(
            f"{e(code)} {_score(c['reference_scores'].get(code))} → {_score(s)}"
            for code, s in c["scores"].items()
        )

    changed = "".join(
        f"<li><code>{e(c['study_instance_uid'])}</code> {e(c['reference'])} → {e(c['level'])} "
        f"<small>({scores(c)})</small></li>"
        for c in ref["changed"][:50]
    )
    more = len(ref["changed"]) - 50
    return (
        f"<h2>Against the reference {e(ref['model']['name'])} {e(ref['model']['version'])}</h2>"
        f"<p>Reference sha256 <code>{e(ref['model']['sha256'])}</code>; {ref['studies']} "
        f"studies, triage agreement {_fmt(ref['agreement'])} "
        f"<small>({ci_text(ref['agreement_ci95'])})</small>, Cohen's kappa "
        f"{_fmt(ref['kappa'])}. Rows: the reference's level; columns: this bundle's.</p>"
        f"<table><tr><th class=l>reference</th>{head}</tr>{rows}</table>"
        "<h3>Score differences</h3><p>This bundle's score minus the reference's, over the "
        "studies both score.</p>"
        "<table><tr><th class=l>finding</th><th>studies</th><th>mean</th><th>mean |d|</th>"
        f"<th>max |d|</th></tr>{diffs}</table>"
        "<h3>Studies whose level changes</h3><ul>"
        f"{changed or '<li>no study changes level</li>'}"
        f"{f'<li>and {more} more (report.json)</li>' if more > 0 else ''}</ul>"
    )


def _score(x: float | None) -> str:
    # 4 places, as thresholds are written: a crossed threshold stays visible
    return "—" if x is None else f"{x:.4f}"


def _signed(x: float | None) -> str:
    return "—" if x is None else f"{x:+.3f}"


def _notification_html(
    ttn: dict[str, Any] | None, tta: dict[str, Any] | None, ttp: dict[str, Any] | None
) -> str:
    if ttn is None:
        return ""
    e = html.escape

    def row(name: str, v: dict[str, Any]) -> str:
        return (
            f"<tr><td class=l>{e(name)}</td><td>{v['studies']}</td><td>{_fmt(v['p50_s'])}</td>"
            f"<td>{_fmt(v['p95_s'])}</td><td>{_fmt(v['max_s'])}</td></tr>"
        )

    stages = ttn["stages"]
    rows = "".join(
        [
            row("last instance received → PUBACK", ttn),
            row("  received → result stored", stages["received_to_result"]),
            row("  result stored → PUBACK", stages["result_to_puback"]),
            *(row(f"  {level}", v) for level, v in ttn["by_level"].items()),
        ]
    )
    if tta is not None:
        rows += row("urgent: PUBACK → acknowledged", tta)
    if ttp is not None and (ttp["studies"] or ttp["waiting"]):
        rows += row("last instance received → SR stored in PACS", ttp)
        rows += row("  result stored → SR stored in PACS", ttp["stages"]["result_to_pacs"])
    notes = [f"{ttn['not_published']} studies' first result has no PUBACK recorded yet"]
    if tta is not None:
        notes.append(f"{tta['unacknowledged']} urgent studies not acknowledged")
    if ttp is not None and (ttp["studies"] or ttp["waiting"]):
        notes.append(f"{ttp['waiting']} studies' SR still waiting for the PACS")
    return (
        "<h2>Time to notification and acknowledgement (state database)</h2>"
        f"<p>{e(ttn['measured'])}; seconds. " + "; ".join(e(n) for n in notes) + ".</p>"
        "<table><tr><th class=l>from → to</th><th>studies</th><th>p50</th><th>p95</th>"
        f"<th>max</th></tr>{rows}</table>"
    )
