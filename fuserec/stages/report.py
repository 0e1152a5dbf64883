"""Report: ``outputs/report.html`` from ``metrics.json`` and ``selection.json`` (what is served and why),
plus the gating fuser's weights by user segment."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from fuserec.config import Params
from fuserec.data.dataset import Dataset
from fuserec.html_report import render
from fuserec.layout import GATING_FILE, REPORT_FILE, Layout
from fuserec.manifest import read_json
from fuserec.segments import COLD_USER_MAX


def gating_weights(layout: Layout, data: Dataset, test: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Mean learned weight of each component for cold and warm test users (empty without gating)."""
    from fuserec.artifacts import fitted_fusers, load_fuser

    folders = [f for f in fitted_fusers(layout) if read_json(f / "manifest.json")["name"] == "gating"]
    if not folders:
        return {}
    fuser: Any = load_fuser(folders[0], layout)
    if not hasattr(fuser, "weights_for"):
        return {}
    users = np.unique(test["user"].to_numpy())
    hist = data.histories().select(users)
    weights = np.asarray(fuser.weights_for(hist))
    cold = hist.lengths <= COLD_USER_MAX
    out = {}
    for name, rows in (("cold users", cold), ("warm users", ~cold), ("all users", np.ones_like(cold))):
        if rows.any():
            out[name] = dict(zip(fuser.names_, weights[rows].mean(axis=0).tolist(), strict=True))
    return out


def served_alone(layout: Layout) -> dict[str, str]:
    """Fuser -> the component it serves alone, for the fusers that fell back (their manifests say)."""
    from fuserec.artifacts import fitted_fusers

    manifests = [read_json(folder / "manifest.json") for folder in fitted_fusers(layout)]
    return {m["name"]: m["served_alone"] for m in manifests if m.get("served_alone")}


def report(params: Params) -> str:
    if params.task == "rating":  # the rating task's report: same folders, its own content
        from fuserec.stages.rating.report import report as rating_report

        return rating_report(params)
    layout = Layout(params.outputs_dir)
    metrics = read_json(layout.metrics)
    data = Dataset.load(layout.clean, interactions=layout.split_file("train"))
    test = pd.read_parquet(layout.split_file("test"))
    gating = gating_weights(layout, data, test)
    frame = pd.DataFrame(gating).T.rename_axis("segment").reset_index()
    frame.to_csv(layout.root / GATING_FILE, index=False)  # a DVC plot (empty without a gating fuser)
    path = layout.root / REPORT_FILE
    selection = read_json(layout.selection) if layout.selection.exists() else None
    path.write_text(render(metrics, gating, served_alone(layout), selection), encoding="utf-8")
    return str(path)
