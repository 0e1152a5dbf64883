"""Integration: the real Prefect flow, the real `dvc repro`, real GX and onnxruntime, on small data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fuserec.config import load_params
from fuserec.manifest import read_json

from .conftest import REPO, SMALL, write_params
from .plugin_fixtures import install_broken_plugins, on_path

pytestmark = pytest.mark.integration

REPO_FILES = ("dvc.yaml", "params.yaml", "erasures.jsonl", "fuserec")
REPO_FILES += (".dvc/config", ".dvc/plots", ".dvcignore")


def _copy_project(dest: Path) -> Path:
    """A fresh checkout-like copy: the files dvc.yaml needs, a new git repo, no outputs."""
    dest.mkdir(parents=True)
    for name in REPO_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Path:
    """The Prefect flow on small synthetic data, with a broken third-party plugin installed beside."""
    from fuserec.flows.pipeline import train_pipeline

    root = tmp_path_factory.mktemp("flow")
    params_file = write_params(root, **SMALL)
    with on_path(install_broken_plugins(root / "site")):
        train_pipeline(str(params_file))
    return load_params(params_file).outputs_dir


def test_flow_trains_every_working_plugin_despite_broken_ones(flow_run: Path) -> None:
    from fuserec.registry import available

    metrics = read_json(flow_run / "metrics.json")
    assert set(metrics["models"]) == set(available())
    assert {"popularity", "itemknn"} <= set(metrics["models"])
    for values in metrics["models"].values():
        assert 0.0 <= values["ndcg@10"] <= 1.0 and values["n_users"] > 0
    # On planted synthetic structure a collaborative model must beat popularity.
    assert metrics["models"]["itemknn"]["ndcg@10"] > metrics["models"]["popularity"]["ndcg@10"]
    assert (flow_run / "plots" / "itemknn.csv").exists()
    manifest = read_json(flow_run / "model" / "manifest.json")
    assert manifest["parity"]["scores_match"] and manifest["parity"]["empty_histories"] == 1
    assert manifest["providers"] == ["CPUExecutionProvider"] and manifest["prepack"] is False


def test_flow_validation_reconciles(flow_run: Path) -> None:
    report = read_json(flow_run / "validation_report.json")
    for table in report["tables"].values():
        assert table["rows_in"] == table["rows_kept"] + table["rows_rejected"]


def test_dvc_repro_in_a_fresh_copy_matches_the_flow(flow_run: Path, tmp_path: Path) -> None:
    project = _copy_project(tmp_path / "clone")
    write_params(project, **SMALL)
    # Outputs where dvc.yaml expects them (relative), not the absolute path write_params sets.
    text = (project / "params.yaml").read_text().replace(str(project / "outputs"), "outputs")
    (project / "params.yaml").write_text(text)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    dvc_metrics = read_json(project / "outputs" / "metrics.json")
    flow_metrics = read_json(flow_run / "metrics.json")
    assert dvc_metrics["models"] == flow_metrics["models"]
    assert dvc_metrics["fusers"] == flow_metrics["fusers"] and dvc_metrics["fusers"]
    assert dvc_metrics["protocol"] == flow_metrics["protocol"]
    status = subprocess.run(["dvc", "status"], cwd=project, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout.lower(), status.stdout

    # Every declared plot renders through the project's template: Vega inlined, no CDN, no network.
    shown = subprocess.run(
        ["dvc", "plots", "show", "-o", str(tmp_path / "plots")],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0 and "failed" not in shown.stdout + shown.stderr, shown.stdout + shown.stderr
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and 'src="http' not in page
    assert "vegaEmbed" in page and "rerank_curve.csv" in page and "gating_weights.csv" in page

    # The default local remote (../fuserec-dvc-remote beside the project) takes a real push.
    from fuserec.flows.deployments import dvc_push

    params = load_params(project / "params.yaml", [f"outputs={project / 'outputs'}"])
    assert dvc_push.fn(params, cwd=project) == {"pushed": True, "remote": "local"}
    pushed = [p for p in (tmp_path / "fuserec-dvc-remote").rglob("*") if p.is_file()]
    assert len(pushed) > 10

    # A parameter sweep is a DVC experiment: only the stages reading the changed key rerun.
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "add", "-A"], cwd=project, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=project, check=True, capture_output=True)
    exp = subprocess.run(
        ["dvc", "exp", "run", "-S", "fusers.rrf.k=5"], cwd=project, env=env, capture_output=True, text=True
    )
    assert exp.returncode == 0, exp.stdout + exp.stderr
    ran = exp.stdout + exp.stderr
    assert "Running stage 'fuse'" in ran and "Running stage 'train'" not in ran, ran
    swept = read_json(project / "outputs" / "metrics.json")
    assert swept["models"] == dvc_metrics["models"]
    assert swept["fusers"]["rrf"] != dvc_metrics["fusers"]["rrf"]
