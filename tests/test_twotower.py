"""Two-tower hybrid: the conformance kit, plus new-item content scoring, attributes and the training loss."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch

from fuserec.histories import Histories
from fuserec.plugins.twotower import TwoTower, TwoTowerConfig, _TwoTowerModule, recency_weights, user_features
from fuserec.testing import AlgorithmTests, planted_dataset
from fuserec.testing.data import CLUSTER_GENRES, CLUSTER_WORDS

FAST = {
    "dim": 16,
    "user_hidden": 16,
    "content_hidden": 16,
    "lr": 1e-2,
    "batch_size": 512,
    "max_epochs": 8,
    "patience": 2,
    "threads": 1,
    "progress": False,
}


class TestTwoTower(AlgorithmTests):
    algorithm = TwoTower
    config: ClassVar[dict] = FAST
    bad_configs: ClassVar[list[dict]] = [
        {"dim": 0},
        {"id_dropout": 1.0},
        {"alpha": 1.5},
        {"half_life": 0.0},
        {"history": "both"},
        {"lr": 0.0},
        {"device": "gpu"},
    ]


@pytest.fixture(scope="module")
def fitted() -> TwoTower:
    return TwoTower(FAST).fit(planted_dataset())


def _new_items(clusters: list[int]) -> pd.DataFrame:
    """Catalog rows of items that are not in the fitted catalog, each carrying one cluster's content."""
    return pd.DataFrame(
        {
            "item": np.arange(len(clusters)),
            "item_id": 10_000 + np.arange(len(clusters)),
            "title": [f"{CLUSTER_WORDS[c]} new" for c in clusters],
            "genres": [CLUSTER_GENRES[c] for c in clusters],
            "tags": ["" for _ in clusters],
            "text": [CLUSTER_WORDS[c] for c in clusters],
            "year": [2000 + c for c in clusters],
        }
    )


def test_brand_new_item_matching_the_history_scores_higher(fitted: TwoTower) -> None:
    # Planted: item i belongs to cluster i % 4; a history of one cluster should prefer that cluster's content.
    n_items = fitted.n_items_
    hist = Histories.from_lists([[c, c + 4, c + 8, c + 12, c + 16] for c in range(4)], n_items)
    scores = fitted.score_items(hist, _new_items([0, 1, 2, 3]))
    assert scores.shape == (4, 4) and scores.dtype == np.float32
    for c in range(4):
        others = np.delete(scores[c], c)
        assert scores[c, c] > others.max(), f"cluster {c}: {scores[c]}"


def test_items_without_enough_positives_are_scored_from_content_only(fitted: TwoTower) -> None:
    data = planted_dataset()
    cold = data.n_items - 1  # never interacted with: below id_min_count = 1
    warm = int(np.argmax(data.item_popularity()))
    hist = data.histories().select(np.arange(6))
    hist = Histories(hist.indptr, hist.items, hist.n_items)  # no users: same path as score_items
    scores = fitted.score(hist)
    from_content = fitted.score_items(hist, data.items.iloc[[cold, warm]])
    np.testing.assert_allclose(from_content[:, 0], scores[:, cold], rtol=1e-5, atol=1e-5)
    assert not np.allclose(from_content[:, 1], scores[:, warm], atol=1e-3)  # a warm item keeps its id part
    explained = fitted.explain(hist.user(0), cold)
    assert not explained["uses_id"] and explained["id_part"] == pytest.approx(0.0, abs=1e-5)
    explained = fitted.explain(hist.user(0), warm)
    assert explained["uses_id"]
    assert explained["id_part"] + explained["content_part"] == pytest.approx(float(scores[0, warm]), abs=1e-4)
    assert {j for j, _ in explained["contributions"]} == set(hist.user(0).tolist())


def test_cold_offset_lifts_exactly_the_items_without_an_id_part(fitted: TwoTower) -> None:
    data = planted_dataset()
    id_less = data.item_popularity() < fitted.config.id_min_count
    assert id_less.any() and not id_less.all()
    np.testing.assert_array_equal(fitted.params_["id_ok"], (~id_less).astype(np.float32))
    hist = data.histories().select(np.arange(10))
    lifted = TwoTower(fitted.config.model_copy(update={"cold_offset": fitted.config.cold_offset + 1.5}))
    lifted.set_state(fitted.get_state())
    lifted.n_items_ = fitted.n_items_
    diff = lifted.score(hist) - fitted.score(hist)
    np.testing.assert_allclose(diff, np.broadcast_to(1.5 * id_less, diff.shape), atol=1e-5)


def test_user_attributes_are_read_when_users_are_given(fitted: TwoTower) -> None:
    data = planted_dataset()
    base = data.histories().select(np.arange(8))
    bare = Histories(base.indptr, base.items, base.n_items)
    unknown = Histories(base.indptr, base.items, base.n_items, users=np.full(8, -1))
    with_users = fitted.score(base)
    np.testing.assert_allclose(fitted.score(unknown), fitted.score(bare), rtol=1e-6, atol=1e-6)
    assert not np.allclose(with_users, fitted.score(bare), atol=1e-3)
    # The module's optional second input gives the same scores as score() with users.
    feats = user_features(base.users, fitted.attributes_)
    assert feats is not None and feats.shape == (8, fitted.attributes_.shape[1])
    with torch.no_grad():
        out = fitted.to_torch()(torch.from_numpy(base.to_padded()), torch.from_numpy(feats)).numpy()
    np.testing.assert_allclose(out, with_users, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(user_features(np.array([-1, 10**6]), fitted.attributes_), 0.0)


@pytest.mark.parametrize("folds", [None, [0, 1, 0, 2, 2, 3]])
def test_training_loss_is_the_softmax_of_the_history_without_its_fold(folds: list[int] | None) -> None:
    # The vectorised training path (sums minus a fold) must equal scoring each held-out history.
    cfg = TwoTowerConfig(dim=6, user_hidden=5, alpha=0.7, id_min_count=0, half_life=None)
    gen = torch.Generator().manual_seed(0)
    content = np.random.default_rng(0).random((9, 4)).astype(np.float32)
    module = _TwoTowerModule.initial(cfg, content, np.ones(9, np.float32), 3, gen)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)  # break the zero biases and small ids
    lists = [[1, 4, 6], [2, 8], [5]]
    attrs = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    flat_list = [i for x in lists for i in x]
    users = [u for u, x in enumerate(lists) for _ in x]
    row = list(range(len(flat_list))) if folds is None else folds  # None: leave-one-out
    row_user = [users[row.index(r)] for r in range(max(row) + 1)]
    flat = torch.tensor(flat_list)
    with torch.no_grad():
        loss = module.loss(
            flat,
            torch.ones(len(flat)),
            torch.tensor(users),
            3,
            torch.tensor(row),
            torch.tensor(row_user),
            attrs,
            0.0,
            gen,
        )
        rest = [
            [j for j, uj, rj in zip(flat_list, users, row, strict=True) if uj == u and rj != r]
            for r, u in enumerate(row_user)
        ]
        padded = torch.from_numpy(Histories.from_lists(rest, 9).to_padded())
        logits = module(padded, attrs[row_user])
        want = torch.nn.functional.cross_entropy(logits[torch.tensor(row)], flat)
    assert float(loss) == pytest.approx(float(want), rel=1e-5)


def test_recency_weights_halve_every_half_life() -> None:
    w = recency_weights(np.array([3, 0, 2]), 2.0)
    np.testing.assert_allclose(w, [0.5, 2**-0.5, 1.0, 2**-0.5, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(recency_weights(np.array([2, 1]), None), 1.0)


def test_recency_weighting_in_the_graph_favours_the_latest_items(fitted: TwoTower) -> None:
    cfg = fitted.config.model_copy(update={"half_life": 1.0})
    module = _TwoTowerModule.from_state(fitted.params_, cfg).eval()
    vectors = torch.eye(4)
    pooled = module.pool(torch.tensor([[0, 1, 2, -1]]), vectors)
    total = 1.0 + 0.5 + 0.25
    np.testing.assert_allclose(
        pooled.numpy()[0], np.array([0.25, 0.5, 1.0, 0.0]) * total**-cfg.alpha, rtol=1e-6
    )
