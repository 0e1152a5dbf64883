"""A self-contained HTML report (inline CSS and SVG, no CDN) from ``metrics.json``.

It must open on an air-gapped machine and in a CI artifact viewer, so charts are drawn here as SVG
rather than with a JavaScript library.
"""

from __future__ import annotations

import html
from typing import Any

from fuserec.segments import SIMULATED_COLD

COLUMNS = ("ndcg@10", "recall@10", "hr@10", "coverage@10", "diversity@10", "gini@10", "self_information@10")
PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d")
STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}tr.fuser td{background:#f3f7fb}.best{font-weight:bold}
h2{margin-top:1.6em;border-bottom:1px solid #ddd}.note{color:#555;font-size:90%}
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def comparison_table(metrics: dict[str, Any], served_alone: dict[str, str] | None = None) -> str:
    """Every model and fuser by NDCG@10; a fuser that fell back says which component it serves alone."""
    served_alone = served_alone or {}
    rows = [("model", name, v) for name, v in metrics.get("models", {}).items()]
    rows += [("fuser", name, v) for name, v in metrics.get("fusers", {}).items()]
    rows.sort(key=lambda r: -float(r[2].get("ndcg@10", 0.0)))
    cols = [c for c in COLUMNS if any(c in r[2] for r in rows)]
    best = max((float(r[2].get("ndcg@10", 0.0)) for r in rows), default=None)
    head = "<tr><th>name</th><th>kind</th>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
    body = []
    for kind, name, values in rows:
        cls = ' class="fuser"' if kind == "fuser" else ""
        mark = ' class="best"' if values.get("ndcg@10") == best else ""
        cells = "".join(f"<td>{_fmt(values.get(c, '-'))}</td>" for c in cols)
        if kind == "fuser" and name in served_alone:
            kind = f"fuser, serves {html.escape(served_alone[name])} alone (lost to it on validation)"
        body.append(f"<tr{cls}><td{mark}>{html.escape(name)}</td><td>{kind}</td>{cells}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def served_block(metrics: dict[str, Any], selection: dict[str, Any] | None) -> str:
    """What is served and why: the exported graph's test metrics beside its Python row, and every
    candidate's validation score (``selection.json``), so the choice can be checked from the report."""
    served, selection = metrics.get("served") or {}, selection or {}
    if not served and not selection:
        return "<p>No exported graph was scored in this run.</p>"
    parts = []
    name, metric = served.get("algorithm") or selection.get("chosen"), selection.get("metric")
    if name:
        how = "named in export.algorithm"
        if served.get("export_algorithm", "auto") == "auto" and metric:
            how = f"the best {html.escape(str(metric))} on validation users it was not fitted on"
        parts.append(f"<p>Served: <b>{html.escape(str(name))}</b>, {how}.</p>")
    if served:
        python = metrics.get("models", {}).get(name) or metrics.get("fusers", {}).get(name) or {}
        cols = [c for c in COLUMNS if c in served]
        rows = [(f"exported graph under onnxruntime ({served.get('graph', 'model')})", served)]
        rows += [(f"{name} in Python", python)] if python else []
        parts.append(
            _table(["test", *cols], [[label, *(values.get(c, "-") for c in cols)] for label, values in rows])
        )
    candidates = selection.get("candidates") or {}
    if candidates and metric:
        chosen = selection.get("chosen")
        table = [
            [
                f"{n} (served)" if n == chosen else n,
                c.get("kind"),
                c.get(metric, "-"),
                c.get("n_users", "-"),
                c.get("method", ""),
            ]
            for n, c in candidates.items()
        ]
        head = ["candidate", "kind", f"validation {metric}", "users", "how it holds users out"]
        parts.append(_table(head, table))
        if selection.get("users"):
            parts.append(
                f"<p class='note'>Each candidate is scored on {html.escape(selection['users'])}.</p>"
            )
    left_out = selection.get("left_out") or {}
    if left_out:
        items = "".join(f"<li>{html.escape(n)}: {html.escape(str(why))}</li>" for n, why in left_out.items())
        parts.append(f"<p class='note'>Not candidates:</p><ul class='note'>{items}</ul>")
    return "".join(parts)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    """A plain HTML table, every cell escaped."""
    top = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{top}</tr>{body}</table>"


def bar_chart(groups: dict[str, dict[str, float]], title: str, width: int = 1000) -> str:
    """Grouped horizontal bars: one group per segment, one bar per model or fuser."""
    names = sorted({n for values in groups.values() for n in values})
    if not names:
        return ""
    top = max((v for values in groups.values() for v in values.values()), default=1.0) or 1.0
    bar, gap, label = 12, 14, 200
    height = sum(len(values) * bar + gap for values in groups.values()) + 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    parts.append(f'<text x="0" y="14" font-size="13" font-weight="bold">{html.escape(title)}</text>')
    y = 28
    for group, values in groups.items():
        parts.append(f'<text x="0" y="{y + 10}" font-size="12">{html.escape(group)}</text>')
        for name in sorted(values, key=lambda n: -values[n]):
            w = (width - label - 260) * values[name] / top
            color = PALETTE[names.index(name) % len(PALETTE)]
            parts.append(f'<rect x="{label}" y="{y}" width="{w:.1f}" height="{bar - 2}" fill="{color}"/>')
            parts.append(
                f'<text x="{label + w + 4:.1f}" y="{y + 9}" font-size="10">'
                f"{html.escape(name)} {values[name]:.4f}</text>"
            )
            y += bar
        y += gap
    parts.append("</svg>")
    return "".join(parts)


def line_chart(points: list[tuple[float, float, str]], x_label: str, y_label: str) -> str:
    """A scatter-with-line chart of ``(x, y, label)`` points, in the given order."""
    if not points:
        return ""
    w, h, pad = 640, 360, 50
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1e-9), (y1 if y1 > y0 else y0 + 1e-9)

    def sx(x: float) -> float:
        return pad + (w - 2 * pad) * (x - x0) / (x1 - x0)

    def sy(y: float) -> float:
        return h - pad - (h - 2 * pad) * (y - y0) / (y1 - y0)

    path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y, _) in enumerate(points))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">']
    parts.append(f'<path d="{path}" fill="none" stroke="#4c78a8" stroke-width="2"/>')
    for x, y, label in points:
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="#f58518"/>')
        parts.append(
            f'<text x="{sx(x) + 6:.1f}" y="{sy(y) - 6:.1f}" font-size="10">{html.escape(label)}</text>'
        )
    parts.append(f'<text x="{w / 2}" y="{h - 10}" font-size="12" text-anchor="middle">{x_label}</text>')
    parts.append(
        f'<text x="14" y="{h / 2}" font-size="12" transform="rotate(-90 14 {h / 2})" '
        f'text-anchor="middle">{y_label}</text>'
    )
    for value, pos in ((x0, sx(x0)), (x1, sx(x1))):
        parts.append(f'<text x="{pos:.1f}" y="{h - pad + 16}" font-size="10">{value:.3f}</text>')
    for value, pos in ((y0, sy(y0)), (y1, sy(y1))):
        parts.append(f'<text x="2" y="{pos:.1f}" font-size="10">{value:.4f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def significance_block(sig: dict[str, Any]) -> str:
    if not sig:
        return "<p>No fuser and single model to compare.</p>"
    rows = []
    fuser = html.escape(sig["best_fuser"])
    if sig.get("best_fuser_served_alone"):
        fuser += f" (serves {html.escape(sig['best_fuser_served_alone'])} alone)"
    labels = (
        ("all test users", "all_users"),
        ("cold users", "cold_users"),
        ("warm users cut to 1-5 items", SIMULATED_COLD),
    )
    for label, key in labels:
        if key not in sig:
            continue
        s = sig[key]
        other = s.get("best_single_on_segment", sig["best_single"])
        ci = s.get("ci95", [float("nan")] * 2)
        rows.append(
            f"<tr><td>{label}</td><td>{fuser} vs {html.escape(other)}</td>"
            f"<td>{s.get('n_users')}</td><td>{_fmt(s.get('candidate_mean'))}</td>"
            f"<td>{_fmt(s.get('baseline_mean'))}</td><td>{_fmt(s.get('mean_difference'))}</td>"
            f"<td>[{ci[0]:.4f}, {ci[1]:.4f}]</td><td>{s.get('p_value', float('nan')):.2e}</td>"
            f"<td>{s.get('wilcoxon_p', float('nan')):.2e}</td></tr>"
        )
    head = (
        "<tr><th>users</th><th>comparison</th><th>n</th><th>fuser</th><th>single</th><th>difference</th>"
        "<th>95% interval</th><th>paired t p</th><th>Wilcoxon p</th></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table><p class='note'>{html.escape(sig.get('test', ''))}</p>"


def gating_table(weights: dict[str, dict[str, float]]) -> str:
    if not weights:
        return "<p>No gating fuser was fitted in this run.</p>"
    names = sorted({n for w in weights.values() for n in w})
    head = "<tr><th>segment</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"
    body = "".join(
        f"<tr><td>{html.escape(seg)}</td>" + "".join(f"<td>{w.get(n, 0.0):.3f}</td>" for n in names) + "</tr>"
        for seg, w in weights.items()
    )
    return f"<table>{head}{body}</table>"


def _change(value: Any, base: Any) -> str:
    if not isinstance(value, float | int) or not isinstance(base, float | int) or not base:
        return "-"
    return f"{100.0 * (value / base - 1.0):+.1f}%"


def rerank_shape(shape: dict[str, Any] | None) -> str:
    """The pool, head and order the curve (and the served model) re-rank with; absent in old metrics."""
    if not shape:
        return ""
    order = "the scorer's order" if shape.get("order") == "score" else "the order they were picked"
    return html.escape(
        f"Re-ranked from each user's top {shape.get('depth')} unseen items; the first {shape.get('keep')} "
        f"slots stay as scored; the chosen items are listed in {order}."
    )


def rerank_table(curve: list[dict[str, Any]]) -> str:
    """The curve's points, each with its diversity and NDCG@10 change against no re-ranking.

    The trade-off is read in relative terms ("+20% diversity for -4% NDCG"), so the report says them.
    """
    if not curve:
        return ""
    base = next((p for p in curve if not p.get("diversity_weight") and not p.get("novelty_weight")), None)
    columns = list(curve[0])
    head = "".join(f"<th>{c}</th>" for c in columns) + "<th>diversity vs none</th><th>NDCG@10 vs none</th>"
    rows = "".join(
        "<tr>"
        + "".join(f"<td>{_fmt(p.get(c))}</td>" for c in columns)
        + f"<td>{_change(p.get('diversity@10'), base and base.get('diversity@10'))}</td>"
        + f"<td>{_change(p.get('ndcg@10'), base and base.get('ndcg@10'))}</td></tr>"
        for p in curve
    )
    return f"<table><tr>{head}</tr>{rows}</table>"


def render(
    metrics: dict[str, Any],
    gating: dict[str, dict[str, float]] | None = None,
    served_alone: dict[str, str] | None = None,
    selection: dict[str, Any] | None = None,
) -> str:
    """The whole report as one HTML string; ``served_alone``: fuser -> the component it fell back to;
    ``selection``: the fuse stage's validation scores of the candidates for export (``selection.json``)."""
    protocol = metrics.get("protocol", {})
    segments = {
        seg: {name: float(v.get("ndcg@10", 0.0)) for name, v in values.items() if v.get("n_users", 0)}
        for seg, values in metrics.get("segments", {}).items()
    }
    curve = metrics.get("rerank", {}).get("curve", [])
    points = [
        (
            float(p["diversity@10"]),
            float(p["ndcg@10"]),
            f"div {p['diversity_weight']}" if p["novelty_weight"] == 0 else f"nov {p['novelty_weight']}",
        )
        for p in curve
        if p.get("diversity@10") is not None
    ]
    curve_table = rerank_table(curve)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>fuserec report</title>
<style>{STYLE}</style></head><body>
<h1>fuserec report</h1>
<p class="note">Split {html.escape(str(protocol.get("split")))}, {protocol.get("test_users")} test users,
{protocol.get("n_items")} items; ranking: {html.escape(str(protocol.get("ranking")))}.</p>
<h2>What is served, and why</h2>{served_block(metrics, selection)}
<h2>Every model and fuser on test</h2>{comparison_table(metrics, served_alone)}
<h2>Best fuser against the best single model</h2>{significance_block(metrics.get("significance", {}))}
<h2>NDCG@10 by segment</h2>{bar_chart(segments, "NDCG@10 per segment")}
<h2>Accuracy and diversity as the re-ranking weights move</h2>
<p class="note">Scorer: {html.escape(str(metrics.get("rerank", {}).get("scorer", "-")))}. MMR over content
vectors (diversity weight) and a self-information bonus (novelty weight), applied after the scorer.
{rerank_shape(metrics.get("rerank", {}).get("shape"))}</p>
{line_chart(points, "intra-list diversity@10", "NDCG@10")}{curve_table}
<h2>Learned gating weights by user segment</h2>{gating_table(gating or {})}
</body></html>"""


def render_rating(metrics: dict[str, Any], selection: dict[str, Any] | None = None) -> str:
    """The rating task's report (``task: rating``): RMSE and MAE of every rater, fuser and the served
    graph, overall and per segment, and what was served and why."""
    protocol = metrics.get("protocol", {})
    rows: list[list[Any]] = []
    for group in ("models", "fusers"):
        for name, m in metrics.get(group, {}).items():
            rows.append([name, group[:-1], m.get("rmse"), m.get("mae"), m.get("n")])
    served = metrics.get("served") or {}
    if served:
        rows.append(
            [
                f"served ({served.get('name')})",
                "graph",
                served.get("rmse"),
                served.get("mae"),
                served.get("n"),
            ]
        )
    segment_names = sorted({s for m in metrics.get("models", {}).values() for s in m.get("segments", {})})
    seg_rows = [
        [name, *[(m.get("segments", {}).get(s) or {}).get("rmse") for s in segment_names]]
        for group in ("models", "fusers")
        for name, m in metrics.get(group, {}).items()
    ]
    candidates = (selection or {}).get("candidates", {})
    sel_rows = [[name, c.get("kind"), c.get("rmse")] for name, c in candidates.items()]
    chosen = html.escape(str((selection or {}).get("chosen", served.get("name", "-"))))
    sig = metrics.get("significance") or {}
    sig_text = html.escape(str(sig.get("summary", "not computed")))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>fuserec rating report</title>
<style>{STYLE}</style></head><body>
<h1>fuserec rating report</h1>
<p class="note">Protocol {html.escape(str(protocol.get("protocol")))}; {protocol.get("test_ratings")} held-out
ratings of {protocol.get("test_users")} users, {protocol.get("n_items")} items. Lower is better.</p>
<h2>What is served, and why</h2><p>Served: <b>{chosen}</b> (lowest validation RMSE on out-of-fold
predictions of the training ratings, unless rating.export names one).</p>
{_table(["candidate", "kind", "validation RMSE"], sel_rows)}
<h2>Every rater and fuser on test</h2>{_table(["name", "kind", "RMSE", "MAE", "ratings"], rows)}
<h2>Best fused predictor against the best single rater</h2><p>{sig_text}</p>
<h2>RMSE by segment</h2>{_table(["name", *segment_names], seg_rows)}
</body></html>"""
