"""Each stage's logic through ``task.fn`` on small synthetic data, in pipeline order."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fuserec.artifacts import load_algorithm, load_fuser
from fuserec.data.dataset import Dataset, interactions_matrix
from fuserec.evaluation import evaluate_model
from fuserec.layout import Layout
from fuserec.manifest import read_json
from fuserec.metrics import ndcg_at_k, top_k
from fuserec.segments import simulated_cold
from fuserec.tasks.clean import clean
from fuserec.tasks.evaluate import evaluate
from fuserec.tasks.export import export
from fuserec.tasks.fuse import fuse
from fuserec.tasks.report import report as report_stage
from fuserec.tasks.split import split
from fuserec.tasks.train import train
from fuserec.tasks.validate import validate


def test_stages_in_order_write_what_the_next_reads(small_params) -> None:
    from fuserec.config import Params

    raw = small_params.model_dump(by_alias=True)
    small_params = Params.model_validate({**raw, "export": {**raw["export"], "algorithm": "stacking"}})
    layout = Layout(small_params.outputs_dir)
    validate.fn(small_params)
    report = read_json(layout.validation_report)
    assert report["tables"]["interactions"]["rows_in"] == 4000 and report["passed"]
    clean.fn(small_params)
    summary = read_json(layout.clean / "summary.json")
    assert summary["rows_in"] == 4000 and summary["positives"] > 0
    split.fn(small_params)
    split_summary = read_json(layout.split / "summary.json")
    assert (
        split_summary["train"]["interactions"] + split_summary["test"]["interactions"] == summary["positives"]
    )
    train.fn(small_params)
    for name in ("popularity", "itemknn"):
        manifest = read_json(layout.model(name) / "manifest.json")
        assert manifest["distribution"] == "fuserec" and manifest["config"]["seed"] == 42
    fuse.fn(small_params)
    weighted = read_json(layout.fuser("weighted") / "manifest.json")
    components = weighted["components"]
    assert weighted["kind"] == "fuser" and components == sorted(components)
    for folder in (layout.fusers).iterdir():  # what each fuser serves is on record, fallback or not
        served = read_json(folder / "manifest.json")["served_alone"]
        assert served == load_fuser(folder, layout).served_alone and served in (None, *components)
    export.fn(small_params)  # before evaluate, which also scores the exported graph
    manifest = read_json(layout.export / "manifest.json")
    assert manifest["parity"]["top_items_match_up_to_ties"] and manifest["algorithm"]["name"] == "stacking"
    assert manifest["parity"]["scores_match"] and manifest["time_input"]["name"] == "last_time"
    assert manifest["selection"]["reason"] == "named in export.algorithm"
    evaluate.fn(small_params)
    metrics = read_json(layout.metrics)
    from fuserec.registry import FUSERS_GROUP, available

    assert set(metrics["models"]) == set(available()) == set(components)
    assert set(metrics["fusers"]) == set(available(FUSERS_GROUP))
    assert set(metrics["segments"]["warm_users"]) == set(metrics["models"]) | set(metrics["fusers"])
    assert metrics["models"]["popularity"]["n_users"] == metrics["protocol"]["test_users"]
    segments = metrics["segments"]
    assert set(segments) == {
        "cold_users",
        "warm_users",
        "long_tail_items",
        "rare_items",
        "new_items",
        "cold_simulated",
    }
    users = segments["cold_users"]["itemknn"]["n_users"] + segments["warm_users"]["itemknn"]["n_users"]
    assert users == metrics["protocol"]["test_users"]
    assert set(segments["cold_simulated"]) == set(metrics["models"]) | set(metrics["fusers"])
    by_k = pd.read_csv(layout.plots / "itemknn.csv")
    assert by_k["k"].tolist() == [5, 10] and (np.diff(by_k["recall"]) >= 0).all()
    significance = metrics["significance"]
    assert significance["best_fuser"] in metrics["fusers"]
    best = read_json(layout.fuser(significance["best_fuser"]) / "manifest.json")
    assert significance["best_fuser_served_alone"] == best["served_alone"]
    assert significance["best_single"] in metrics["models"]
    low, high = significance["all_users"]["ci95"]
    assert low <= significance["all_users"]["mean_difference"] <= high
    assert 0.0 <= significance["all_users"]["p_value"] <= 1.0
    assert 0.0 <= metrics["models"]["itemknn"]["diversity@10"] <= 1.0
    # The stage scores each batch once per model and lets the fusers reuse those scores: the same
    # metrics as scoring each fuser on its own, with its own components.
    data = Dataset.load(layout.clean, interactions=layout.split / "train.parquet")
    test = pd.read_parquet(layout.split / "test.parquet")
    for name in ("stacking", "weighted"):
        alone = evaluate_model(load_fuser(layout.fuser(name), layout), data, test, [5, 10], 64, False)
        assert alone["ndcg@10"] == pytest.approx(metrics["fusers"][name]["ndcg@10"], abs=1e-6)
    # The simulated cold segment: warm test users seen through their latest 1-5 items, scored on their own.
    users = np.unique(test["user"])
    cold = simulated_cold(data.histories(), users, small_params.evaluate.simulated_cold_users, 42)
    assert cold is not None
    cut, chosen = cold
    assert (data.histories().lengths[chosen] > 5).all() and (cut.lengths[chosen] <= 5).all()
    assert len(chosen) == segments["cold_simulated"]["itemknn"]["n_users"]
    itemknn = load_algorithm(layout.model("itemknn"))
    ranked = top_k(itemknn.score(cut.select(chosen)), 10, exclude=data.matrix()[chosen])
    truth = interactions_matrix(test, data.n_users, data.n_items)[chosen]
    expected = float(np.mean(ndcg_at_k(ranked, truth, 10)))
    assert segments["cold_simulated"]["itemknn"]["ndcg@10"] == pytest.approx(expected, abs=1e-6)
    assert significance["cold_simulated"]["n_users"] == len(chosen)
    # The re-ranking curve, filled from the exported scorer's kept scores, equals scoring it on its own.
    from fuserec.features import item_content_vectors
    from fuserec.rerank import diversity_curve
    from fuserec.stages.evaluate import rerank_curve

    stacking, users = load_fuser(layout.fuser("stacking"), layout), np.unique(test["user"])
    hist = data.histories()
    reference = rerank_curve(small_params, data, item_content_vectors(data.items))
    alone = diversity_curve(
        lambda rows: stacking.score(hist.select(rows)),
        users,
        data.matrix(),
        interactions_matrix(test, data.n_users, data.n_items),
        item_content_vectors(data.items),
        data.item_popularity(),
        reference.settings,
        batch_size=7,
    )
    for mine, theirs in zip(metrics["rerank"]["curve"], alone, strict=True):
        assert mine["ndcg@10"] == pytest.approx(theirs["ndcg@10"], abs=1e-6)
        assert mine["diversity@10"] == pytest.approx(theirs["diversity@10"], abs=1e-6)
    curve = metrics["rerank"]["curve"]
    assert metrics["rerank"]["scorer"] == "stacking" and len(curve) == 12
    served = small_params.export  # the curve re-ranks with the served graph's pool, head and order
    shape = {"depth": served.rerank_depth, "keep": served.rerank_keep, "order": served.rerank_order}
    assert metrics["rerank"]["shape"] == shape
    assert curve[-4]["diversity@10"] >= curve[0]["diversity@10"]  # the strongest MMR weight diversifies
    assert metrics["served"]["algorithm"] == "stacking"
    report_stage.fn(small_params)
    page = (layout.root / "report.html").read_text()
    assert "stacking" in page and "<svg" in page and "http" not in page.split("<body>")[1].split("ranking")[0]


def test_train_is_deterministic_and_rejects_unknown_plugins(small_params) -> None:
    from fuserec.config import Params

    for stage in (validate, clean, split):
        stage.fn(small_params)
    layout = Layout(small_params.outputs_dir)
    small_params = Params.model_validate(
        {**small_params.model_dump(by_alias=True), "train": {"algorithms": ["popularity", "itemknn"]}}
    )
    train.fn(small_params)
    first = np.load(layout.model("itemknn") / "state.npz")["weights"]
    train.fn(small_params)
    np.testing.assert_array_equal(first, np.load(layout.model("itemknn") / "state.npz")["weights"])
    bad = Params.model_validate({**small_params.model_dump(by_alias=True), "train": {"algorithms": ["nope"]}})
    with pytest.raises(LookupError, match="available"):
        train.fn(bad)


def test_a_fuser_exports_as_one_onnx_graph_with_parity(small_params) -> None:
    from fuserec.config import Params

    params = Params.model_validate(
        {
            **small_params.model_dump(by_alias=True),
            "train": {"algorithms": ["popularity", "itemknn", "content"]},
            "fuse": {"fusers": ["weighted"], "components": ["itemknn", "content"]},
            "fusers": {"weighted": {"n_trials": 10}},
            "export": {"algorithm": "weighted"},
        }
    )
    for stage in (validate, clean, split, train, fuse, export):
        stage.fn(params)
    manifest = read_json(Layout(params.outputs_dir).export / "manifest.json")
    assert manifest["algorithm"]["kind"] == "fuser" and manifest["algorithm"]["components"] == [
        "content",
        "itemknn",
    ]
    assert manifest["parity"]["scores_match"] and manifest["parity"]["max_rel_diff"] < 1e-4
    layout = Layout(params.outputs_dir)
    # only the fused components are refitted on train', and fuse loads them rather than fitting
    assert sorted(p.name for p in layout.inner_models.iterdir()) == ["content", "itemknn"]
    bad = Params.model_validate({**params.model_dump(by_alias=True), "fuse": {"components": ["ease"]}})
    with pytest.raises(ValueError, match=r"train\.algorithms"):
        fuse.fn(bad)
    (layout.inner_model("content") / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="fuserec stage train"):
        fuse.fn(params)


def test_export_names_the_missing_model(small_params) -> None:
    from fuserec.config import Params

    small_params = Params.model_validate(
        {**small_params.model_dump(by_alias=True), "train": {"algorithms": ["popularity"]}}
    )
    for stage in (validate, clean, split, train):
        stage.fn(small_params)
    other = Params.model_validate(
        {**small_params.model_dump(by_alias=True), "export": {"algorithm": "popularity_typo"}}
    )
    with pytest.raises(FileNotFoundError, match="popularity_typo"):
        export.fn(other)
