"""Promotion: a worse candidate keeps the served model (and the log says why); a better one replaces it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fuserec.config import load_params
from fuserec.manifest import read_json, write_json
from fuserec.stages.promote import LOG_FILE, promote_candidate, read_log
from fuserec.tasks.promote import promote

from .conftest import SMALL, write_params


def fake_run(folder: Path, ndcg: float, algorithm: str = "itemknn") -> Path:
    """A run folder with just what promotion reads: metrics.json and an exported model folder."""
    write_json(folder / "metrics.json", {"models": {algorithm: {"ndcg@10": ndcg, "recall@10": ndcg}}})
    write_json(folder / "model" / "manifest.json", {"algorithm": {"name": algorithm}, "ndcg": ndcg})
    return folder


def served_ndcg(served: Path) -> float:
    return read_json(served / "current" / "model" / "manifest.json")["ndcg"]


def test_first_candidate_is_always_promoted(tmp_path: Path) -> None:
    served = tmp_path / "served"
    decision = promote_candidate(fake_run(tmp_path / "a", 0.01), served, tolerance=0.0, algorithm="itemknn")
    assert decision.promoted and "nothing served" in decision.reason and decision.served_value is None
    assert served_ndcg(served) == 0.01
    assert read_log(served)[0]["decision"] == "promoted"


@pytest.mark.parametrize(
    ("candidate", "promoted"),
    [(0.200, True), (0.196, True), (0.195, True), (0.194, False), (0.100, False)],
)
def test_tolerance_boundary(tmp_path: Path, candidate: float, promoted: bool) -> None:
    served = tmp_path / "served"
    promote_candidate(fake_run(tmp_path / "old", 0.2), served, algorithm="itemknn", tolerance=0.005)
    decision = promote_candidate(
        fake_run(tmp_path / "new", candidate), served, algorithm="itemknn", tolerance=0.005
    )
    assert decision.promoted is promoted, decision.reason
    assert served_ndcg(served) == (candidate if promoted else 0.2)
    assert (served / "previous").exists() is promoted
    rejected = list((served / "rejected").glob("*")) if (served / "rejected").exists() else []
    assert len(rejected) == (0 if promoted else 1)


def test_missing_metric_or_algorithm_says_how_to_fix(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "a", 0.1)
    with pytest.raises(KeyError, match=r"promote\.algorithm"):
        promote_candidate(run, tmp_path / "served", algorithm="stacking")
    with pytest.raises(KeyError, match=r"evaluate\.ks"):
        promote_candidate(run, tmp_path / "served", algorithm="itemknn", metric="ndcg@50")
    with pytest.raises(FileNotFoundError, match="run the pipeline first"):
        promote_candidate(tmp_path / "nothing", tmp_path / "served")
    assert not (tmp_path / "served" / LOG_FILE).exists(), "a failed comparison must not log a decision"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One small real run (popularity + itemknn), exported twice: as itemknn and as popularity."""
    from fuserec.tasks.clean import clean
    from fuserec.tasks.evaluate import evaluate
    from fuserec.tasks.export import export
    from fuserec.tasks.fuse import fuse
    from fuserec.tasks.split import split
    from fuserec.tasks.train import train
    from fuserec.tasks.validate import validate

    root = tmp_path_factory.mktemp("promote")
    sections = {
        **SMALL,
        "train": {"algorithms": ["popularity", "itemknn"]},
        "fuse": {"fusers": []},
        "export": {"algorithm": "itemknn"},
    }
    params = load_params(write_params(root, **sections))
    for stage in (validate, clean, split, train, fuse, evaluate, export):
        stage.fn(params)
    knn = params.outputs_dir
    pop = root / "outputs-popularity"
    shutil.copytree(knn, pop)
    shutil.rmtree(pop / "model")
    export.fn(load_params(root / "params.yaml", [f"outputs={pop}", "export.algorithm=popularity"]))
    return knn, pop


def exported(folder: Path) -> str:
    return read_json(folder / "model" / "manifest.json")["algorithm"]["name"]


def test_worse_candidate_keeps_served_model_and_better_one_replaces_it(
    tmp_path: Path, two_runs: tuple[Path, Path]
) -> None:
    knn, pop = two_runs
    served = tmp_path / "served"
    knn_value = read_json(knn / "metrics.json")["models"]["itemknn"]["ndcg@10"]
    pop_value = read_json(pop / "metrics.json")["models"]["popularity"]["ndcg@10"]
    assert knn_value > pop_value + 0.01, "the synthetic data must separate the two for this test to mean much"

    first = promote_candidate(pop, served, algorithm="popularity", tolerance=0.005)
    assert first.promoted and exported(served / "current") == "popularity"

    better = promote_candidate(knn, served, algorithm="itemknn", tolerance=0.005)
    assert better.promoted, better.reason
    assert exported(served / "current") == "itemknn" and exported(served / "previous") == "popularity"
    assert (served / "current" / "split" / "train.parquet").exists()  # what batch scoring reads

    worse = promote_candidate(pop, served, algorithm="popularity", tolerance=0.005)
    assert not worse.promoted
    assert exported(served / "current") == "itemknn", "a rejected candidate must not touch the served model"
    kept = Path(worse.kept_at)
    assert kept.parent == served / "rejected" and exported(kept) == "popularity"

    log = read_log(served)
    assert [entry["decision"] for entry in log] == ["promoted", "promoted", "rejected"]
    last = log[-1]
    assert last["candidate_value"] == pytest.approx(pop_value)
    assert last["served_value"] == pytest.approx(knn_value)
    assert last["tolerance"] == 0.005 and last["decided_at"].endswith("Z")
    assert "worse than served" in last["reason"] and "served model is kept" in last["reason"]
    assert last["candidate_metrics"]["ndcg@10"] == pytest.approx(pop_value)
    assert last["served_metrics"]["ndcg@10"] == pytest.approx(knn_value)


def test_task_uses_params(tmp_path: Path, two_runs: tuple[Path, Path]) -> None:
    knn, _ = two_runs
    params_file = write_params(tmp_path, promote={"served_dir": str(tmp_path / "served"), "tolerance": 0.0})
    params = load_params(params_file, [f"outputs={knn}", "export.algorithm=itemknn"])
    result = promote.fn(params)
    assert (
        result["decision"] == "promoted" and result["algorithm"] == "itemknn" and result["tolerance"] == 0.0
    )
    assert (tmp_path / "served" / "current" / "promotion.json").exists()


def test_batch_recommend_flow_scores_every_served_user(tmp_path: Path, two_runs: tuple[Path, Path]) -> None:
    """The batch-recommend deployment's flow reads the served model, not the last run's outputs."""
    import pandas as pd

    from fuserec.flows.deployments import batch_recommend

    knn, _ = two_runs
    served = tmp_path / "served"
    params_file = write_params(tmp_path, promote={"served_dir": str(served)})
    with pytest.raises(FileNotFoundError, match="no served model"):
        batch_recommend.fn(params_file=str(params_file))
    promote_candidate(knn, served, algorithm="itemknn")
    result = batch_recommend.fn(k=5, params_file=str(params_file))
    rows = pd.read_parquet(served / "recommendations.parquet")
    n_users = pd.read_parquet(served / "current" / "clean" / "users.parquet")["user_id"].nunique()
    assert result["users"] == n_users and len(rows) == 5 * n_users == result["rows"]
    assert rows.groupby("user_id")["rank"].max().eq(5).all()
