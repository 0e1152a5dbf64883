"""Report: the rating task's self-contained HTML page from ``metrics.json`` and ``selection.json``."""

from __future__ import annotations

from fuserec.config import Params
from fuserec.html_report import render_rating
from fuserec.layout import GATING_FILE, REPORT_FILE, Layout
from fuserec.manifest import read_json


def report(params: Params) -> str:
    layout = Layout(params.outputs_dir)
    metrics = read_json(layout.metrics)
    selection = read_json(layout.selection) if layout.selection.exists() else None
    (layout.root / GATING_FILE).write_text("segment\n")  # a declared DVC plot: no gating in this task
    path = layout.root / REPORT_FILE
    path.write_text(render_rating(metrics, selection), encoding="utf-8")
    return str(path)
