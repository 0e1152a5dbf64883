"""The protocol of ../shared/PROTOCOL.md reproduced on real MovieLens-100k through the real flow."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuserec.config import load_params
from fuserec.manifest import read_json

from .conftest import write_params

pytestmark = [pytest.mark.integration, pytest.mark.shared]


@pytest.fixture(scope="module")
def ml100k_run(ml100k: Path, tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Path:
    from fuserec.flows.pipeline import train_pipeline

    root = tmp_path_factory.mktemp("ml100k")
    params_file = write_params(root)
    overrides = ["data.source=movielens-100k", f"data.path={ml100k}"]
    train_pipeline(str(params_file), overrides)
    return load_params(params_file, overrides).outputs_dir


def test_split_sizes_match_protocol(ml100k_run: Path) -> None:
    split = read_json(ml100k_run / "split" / "summary.json")
    assert split["train"]["interactions"] + split["test"]["interactions"] == 55_375
    assert (split["train"]["interactions"], split["test"]["interactions"]) == (44_300, 11_075)
    assert (split["train_inner"]["interactions"], split["valid"]["interactions"]) == (35_418, 8_882)


def test_anchor_metrics(ml100k_run: Path) -> None:
    metrics = read_json(ml100k_run / "metrics.json")
    assert metrics["protocol"]["n_items"] == 1682
    pop, knn = metrics["models"]["popularity"], metrics["models"]["itemknn"]
    assert pop["n_users"] == 938
    assert abs(pop["ndcg@10"] - 0.0771) <= 0.003, pop
    assert knn["ndcg@10"] >= 0.125, knn
    report = read_json(ml100k_run / "validation_report.json")
    assert report["tables"]["interactions"]["rows_kept"] == 100_000


def test_collaborative_family_reaches_its_bars(ml100k_run: Path) -> None:
    models = read_json(ml100k_run / "metrics.json")["models"]
    bars = {"ease": 0.140, "als": 0.138, "itemknn": 0.128, "userknn": 0.120, "bpr": 0.110, "content": 0.030}
    for name, bar in bars.items():
        assert models[name]["ndcg@10"] >= bar, (name, models[name]["ndcg@10"])
