"""Content plugin: conformance kit, TF-IDF weights, recency, attribute cold start, brand-new items."""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from fuserec.data.dataset import Dataset
from fuserec.histories import Histories
from fuserec.plugins.content import Content
from fuserec.testing import AlgorithmTests, planted_dataset
from fuserec.testing.data import CLUSTER_GENRES


class TestContent(AlgorithmTests):
    algorithm = Content
    bad_configs: ClassVar[list[dict]] = [
        {"min_df": 0},
        {"half_life": 0.0},
        {"title_weight": -1.0},
        {"cold_ridge": 0.0},
        {"year_tokens": "century"},
    ]


def _tiny() -> Dataset:
    items = pd.DataFrame(
        {
            "item": np.arange(4),
            "item_id": np.arange(4) + 1,
            "title": ["Funny Story (1995)", "Funny Tears (1995)", "Sad Tears (1996)", "Night Blood (1996)"],
            "genres": ["Comedy", "Comedy|Drama", "Drama", "Horror"],
            "tags": ["", "", "", ""],
            "text": ["", "", "", ""],
            "year": [1995, 1995, 1996, 1996],
        }
    )
    inter = pd.DataFrame(
        {"user": [0, 0, 1], "item": [0, 1, 3], "rating": [5.0, 4.0, 4.0], "timestamp": [1, 2, 3]}
    )
    users = pd.DataFrame({"user": [0, 1], "user_id": [1, 2]})
    return Dataset(inter, items, users)


def test_tfidf_weights_on_a_tiny_catalog() -> None:
    algo = Content({"title_weight": 0.0, "year_weight": 0.0, "min_df": 1}).fit(_tiny())
    assert list(algo.vocab_) == ["comedy", "drama", "horror"]
    idf = {t: math.log(5 / (1 + df)) + 1 for t, df in {"comedy": 2, "drama": 2, "horror": 1}.items()}
    np.testing.assert_allclose(algo.idf_, [idf["comedy"], idf["drama"], idf["horror"]], rtol=1e-6)
    v = algo.item_representation()
    np.testing.assert_allclose(v[1], np.array([1, 1, 0]) / math.sqrt(2), rtol=1e-6)  # equal idf
    np.testing.assert_allclose(v[3], [0, 0, 1])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-6)


def test_field_weights_scale_each_normalised_block() -> None:
    algo = Content({"title_weight": 0.5, "year_weight": 0.0, "min_df": 2}).fit(_tiny())
    # titles lose their "(1995)"; words in one item only ("story", "sad", ...) fall under min_df
    assert sorted(map(str, algo.vocab_)) == ["comedy", "drama", "funny", "tears"]
    v = algo.item_representation()[0]  # Comedy + "funny": two unit blocks weighted 1 and 0.5
    expected = np.zeros(len(algo.vocab_))
    expected[list(algo.vocab_).index("comedy")] = 1.0
    expected[list(algo.vocab_).index("funny")] = 0.5
    np.testing.assert_allclose(v, expected / np.linalg.norm(expected), rtol=1e-6)
    years = Content({"year_weight": 1.0, "year_tokens": "both", "min_df": 1}).fit(_tiny())
    assert {"1990s", "1995", "1996"} <= set(map(str, years.vocab_))


def test_recency_weights_favour_the_latest_item() -> None:
    data = _tiny()
    comedy_then_horror = Histories.from_lists([[0, 3], [3, 0]], 4)
    decayed = Content({"half_life": 1.0, "year_weight": 0.0, "min_df": 1}).fit(data).score(comedy_then_horror)
    assert decayed[0, 3] > decayed[0, 1]  # horror was last: horror items first
    assert decayed[1, 1] > decayed[1, 3]  # comedy was last
    flat = Content({"half_life": None, "year_weight": 0.0, "min_df": 1}).fit(data).score(comedy_then_horror)
    np.testing.assert_allclose(flat[0], flat[1], rtol=1e-6)  # no decay: order does not matter


def test_rating_weights_are_python_side_and_off_by_default() -> None:
    data = _tiny()
    hist = Histories(np.array([0, 2]), np.array([0, 3]), 4, ratings=np.array([5.0, 1.0], dtype=np.float32))
    plain = Histories(np.array([0, 2]), np.array([0, 3]), 4)
    off = Content({"half_life": None, "min_df": 1}).fit(data)
    np.testing.assert_array_equal(off.score(hist), off.score(plain))
    on = Content({"half_life": None, "rating_power": 2.0, "min_df": 1}).fit(data)
    s = on.score(hist)[0]
    assert s[1] > s[3]  # the comedy rated 5 outweighs the horror rated 1


def test_torch_module_equals_score_without_users_or_ratings() -> None:
    data = planted_dataset()
    algo = Content().fit(data)
    hist = Histories.from_lists([[0, 4, 8, 4], [], [1], [79, 3, 2]], data.n_items)
    module = algo.to_torch()
    with torch.no_grad():
        out = module(torch.from_numpy(hist.to_padded())).numpy()
    np.testing.assert_allclose(out, algo.score(hist), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1], algo.prior_)  # empty history: the global popularity prior


def _cluster_users(data: Dataset) -> list[int]:
    return [int(np.flatnonzero(np.arange(data.n_users) % 4 == c)[0]) for c in range(4)]


def _own_genre_share(config: dict) -> tuple[Content, np.ndarray, Dataset, Histories]:
    """Share of each cluster user's cold top-10 that has the user's cluster genre."""
    data = planted_dataset()
    algo = Content(config).fit(data)
    users = np.array([int(np.flatnonzero(np.arange(data.n_users) % 4 == c)[0]) for c in range(4)])
    empty = Histories(np.zeros(5, dtype=np.int64), np.zeros(0, dtype=np.int64), data.n_items, users=users)
    top = np.argsort(-algo.score(empty), axis=1, kind="stable")[:, :10]
    own = np.array([CLUSTER_GENRES[u % 4] for u in users])[:, None]
    return algo, (data.items["genres"].to_numpy()[top] == own).mean(axis=1), data, empty


def test_cold_user_attributes_map_to_own_cluster_genres() -> None:
    # The attribute -> content-profile ridge alone (its cosine dominating the prior): own genre first.
    _, share, _, _ = _own_genre_share({"cold_prior": "global", "cold_content_weight": 100.0})
    assert (share >= 0.9).all(), share


def test_cold_user_default_prior_is_popularity_among_similar_users() -> None:
    algo, share, data, empty = _own_genre_share({})
    _, global_share, _, _ = _own_genre_share({"cold_prior": "global", "cold_content_weight": 0.0})
    assert (share >= 0.6).all() and share.mean() > global_share.mean() + 0.2, (share, global_share)
    # the same empty histories without a known user get the global prior, as the exported graph does
    anon = Histories(empty.indptr, empty.items, data.n_items, users=np.full(4, -1))
    np.testing.assert_array_equal(algo.score(anon), np.tile(algo.prior_, (4, 1)))


def test_no_user_attributes_falls_back_to_popularity_prior() -> None:
    data = planted_dataset()
    bare = Dataset(data.interactions, data.items, data.users[["user", "user_id"]])
    algo = Content().fit(bare)
    assert algo.user_features_.shape == (0, 0)
    empty = Histories(
        np.zeros(3, dtype=np.int64), np.zeros(0, dtype=np.int64), data.n_items, users=np.array([0, 1])
    )
    np.testing.assert_array_equal(algo.score(empty), np.tile(algo.prior_, (2, 1)))
    assert np.argmax(algo.prior_) == np.argmax(data.item_popularity())


def test_brand_new_item_with_a_liked_genre_outranks_one_without(tmp_path: Path) -> None:
    data = planted_dataset()
    algo = Content().fit(data)
    new = pd.DataFrame(
        {
            "item_id": [9001, 9002],
            "title": ["blood night returns (2003)", "laugh party again (2000)"],
            "genres": ["Horror", "Comedy"],
            "tags": ["", ""],
            "text": ["unseen words only", ""],
            "year": [2002, 2000],
        }
    )
    horror_fan = data.histories().select([2])  # cluster 2 = Horror
    assert (data.items["genres"].to_numpy()[horror_fan.items] == "Horror").mean() > 0.5
    scores = algo.score_items(horror_fan, new)
    assert scores.shape == (1, 2) and scores.dtype == np.float32
    assert scores[0, 0] > scores[0, 1]
    loaded = Content.load(algo.save(tmp_path / "content"))  # the vocabulary survives save/load
    np.testing.assert_allclose(loaded.score_items(horror_fan, new), scores, rtol=1e-6)
    assert algo.explain(horror_fan.items, 2)["terms"]


def test_items_with_the_same_content_tie_exactly_in_python_and_onnx(tmp_path: Path) -> None:
    """Rank-based fusers rank tied items by index: a 1-ulp split in one runtime only reorders them there."""
    from fuserec.onnx_model import OnnxRecommender, export_onnx

    data = planted_dataset()
    model = Content({"title_weight": 0.0, "year_weight": 0.0}).fit(data)
    _, group = np.unique(model.item_vectors_, axis=0, return_inverse=True)
    group = group.reshape(-1)
    shared = [g for g in np.unique(group) if (group == g).sum() > 1]
    assert shared  # the planted catalog gives whole clusters the same genres
    hist = data.histories().select(np.arange(40))
    served = OnnxRecommender(export_onnx(model, tmp_path / "m.onnx", k=10)).run_with_contributions(
        hist.to_padded(), None
    )[0]
    for scores in (model.score(hist), served):
        for g in shared:
            cols = scores[:, group == g]
            assert (cols == cols[:, :1]).all()
