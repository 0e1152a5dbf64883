"""KnowledgeGraph: the conformance kit, plus the graph, the tail slot and explanation paths."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch

from fuserec.data.dataset import Dataset
from fuserec.histories import Histories
from fuserec.plugins.kg import KnowledgeGraph
from fuserec.testing import AlgorithmTests

FAST = {"factors": 16, "max_epochs": 8, "patience": 2, "user_batch": 64, "progress": False, "threads": 1}


class TestKnowledgeGraph(AlgorithmTests):
    algorithm = KnowledgeGraph
    config: ClassVar[dict] = FAST
    bad_configs: ClassVar[list[dict]] = [
        {"factors": 0},
        {"layers": 0},
        {"lr": 0.0},
        {"holdout": 1.0},
        {"half_life": 0.0},
        {"tail_rank": -1},
        {"tail_users": 0.0},
        {"device": "gpu"},
    ]


def _noir_dataset() -> Dataset:
    """Eight films, eight users; the two film-noirs (0, 1) share no user, films 2 and 3 share three."""
    films = [
        ("Noir A (1946)", "Film-Noir", 1946),
        ("Noir B (1947)", "Film-Noir|Drama", 1947),
        ("Comedy A (1995)", "Comedy", 1995),
        ("Comedy B (1996)", "Comedy", 1996),
        ("Drama A (1995)", "Drama", 1995),
        ("Drama B (1944)", "Drama", 1944),
        ("Comedy C (1942)", "Comedy", 1942),
        ("Drama C (1997)", "Drama", 1997),
    ]
    histories = [[0, 2, 4], [0, 3, 6], [1, 5, 7], [1, 2, 3], [2, 3, 4], [2, 3, 7], [4, 5, 6], [5, 6, 7]]
    rows = [(u, i, 5.0, 1_000 + 10 * u + t) for u, h in enumerate(histories) for t, i in enumerate(h)]
    inter = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    inter["rating"] = inter["rating"].astype(np.float32)
    items = pd.DataFrame(
        {
            "item": np.arange(8),
            "item_id": np.arange(8) + 1,
            "title": [f[0] for f in films],
            "genres": [f[1] for f in films],
            "year": [f[2] for f in films],
        }
    )
    users = pd.DataFrame({"user": np.arange(8), "user_id": np.arange(8) + 1})
    return Dataset(inter, items, users)


@pytest.fixture(scope="module")
def noir() -> KnowledgeGraph:
    return KnowledgeGraph({**FAST, "user_attributes": False, "tail_rank": 0}).fit(_noir_dataset())


def test_explanation_goes_through_an_entity_both_films_share(noir: KnowledgeGraph) -> None:
    out = noir.explain(np.array([0]), 1)
    best = out["best_path"]
    assert best["via"] == "entity"
    assert best["path"][0] == "Noir A (1946)" and best["path"][2] == "Noir B (1947)"
    # Shared: genres:film-noir (2 films) and year:1940s (4 films); not drama, 1946 or 1947 (one side only).
    assert best["path"][1] in {"genres:film-noir", "year:1940s"}
    shares = {p["path"][1]: p["walk_share"] for p in out["paths"]}
    assert set(shares) == {"genres:film-noir", "year:1940s"}  # no co-interacting users: none rated both
    # Walk weight A[j, e] A[e, i] is proportional to 1 / degree(e): shares 1/2 : 1/4.
    assert shares["genres:film-noir"] == pytest.approx(2 / 3, rel=1e-5)
    # The path weights split the history item's exact share of the score (no tail lift here).
    assert sum(p["weight"] for p in out["paths"]) == pytest.approx(out["score"], rel=1e-4, abs=1e-6)


def test_co_interacting_users_path_counts_users_and_weighs_them(noir: KnowledgeGraph) -> None:
    out = noir.explain(np.array([2]), 3)
    by_node = {p["path"][1]: p for p in out["paths"]}
    users = by_node["3 co-interacting users"]  # users 3, 4 and 5 rated both comedies
    assert users["via"] == "users" and users["n_users"] == 3
    # Walks (times sqrt(d2 d3)): users 3 x 1/3, comedy 1/3 (films 2, 3, 6), 1990s 1/4 (films 2, 3, 4, 7).
    assert users["walk_share"] == pytest.approx(12 / 19, rel=1e-5)
    assert by_node["genres:comedy"]["walk_share"] == pytest.approx(4 / 19, rel=1e-5)
    assert by_node["year:1990s"]["walk_share"] == pytest.approx(3 / 19, rel=1e-5)


def test_explanations_survive_save_and_load(noir: KnowledgeGraph, tmp_path: object) -> None:
    back = KnowledgeGraph.load(noir.save(str(tmp_path)))
    assert back.explain(np.array([0, 2]), 1) == noir.explain(np.array([0, 2]), 1)
    assert back.state_["item_names"].dtype.kind == "U"


def test_the_explain_state_alone_explains_as_the_fitted_model_does(noir: KnowledgeGraph) -> None:
    """What the service restores: the same paths and weights, without user attributes or item names."""
    state = noir.explain_state()
    assert not {"user_attr", "item_names", "attr_names", "user_item_indices"} & set(state)
    served = KnowledgeGraph(noir.config)
    served.set_state(state)
    served.n_items_ = noir.n_items_
    for history, item in (([0, 2], 1), ([2], 3), ([0, 5, 6], 7)):
        own, back = noir.explain(np.array(history), item), served.explain(np.array(history), item)
        assert back["score"] == own["score"] and back["tail_lift"] == own["tail_lift"]
        strip = [({k: v for k, v in p.items() if k != "path"}, p["path"][1]) for p in own["paths"]]
        assert [({k: v for k, v in p.items() if k != "path"}, p["path"][1]) for p in back["paths"]] == strip
        assert back["paths"][0]["path"][0] == f"item {back['paths'][0]['from_item']}"  # names: the caller's


def test_tail_lift_puts_the_best_unseen_tail_item_at_the_tail_rank() -> None:
    from fuserec.plugins.kg import TAIL_MARGIN, _KGModule

    n, d = 6, 2
    tail = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    log_pop = torch.tensor([3.0, 3.0, 3.0, 3.0, 0.0, 0.0])

    def module(gate: float) -> _KGModule:
        zeros = torch.zeros(n, d)
        return _KGModule(
            zeros, zeros, torch.zeros(0, d), tail, log_pop, torch.tensor(gate), 20.0, tail_rank=2
        )

    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.5], [1.0, 2.0, 3.0, 4.0, 9.0, 0.0]])
    seen = torch.zeros(2, n, dtype=torch.bool)
    seen[:, 0] = True  # tail affinity of both histories: log_pop[0] = 3
    out = module(3.5).lift_tail(scores, seen)
    # Row 0: unseen familiar items score 4, 3, 2, so the best tail item (4) must pass 3, the 2nd best.
    lift = 3.0 + TAIL_MARGIN - 1.0
    torch.testing.assert_close(out[0], scores[0] + lift * tail)
    unseen_order = [i for i in torch.argsort(out[0], descending=True).tolist() if i != 0]
    assert unseen_order == [1, 4, 2, 5, 3]
    torch.testing.assert_close(out[1], scores[1])  # its best tail item already leads: no lift
    # Histories of popular items (affinity 3 > gate 2.5) and empty ones get no slot.
    torch.testing.assert_close(module(2.5).lift_tail(scores, seen), scores)
    torch.testing.assert_close(module(3.5).lift_tail(scores, torch.zeros_like(seen)), scores)


def test_tail_gate_splits_training_users_by_share() -> None:
    import scipy.sparse as sp

    from fuserec.plugins.kg import _tail_gate

    log_pop = np.array([0.0, 1.0, 2.0, 4.0], dtype=np.float32)
    seen = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]))
    # Affinities of the four users with a history: 0, 1, 3, 4 (the empty one does not count).
    assert _tail_gate(seen.astype(np.float32), log_pop, 0.25) == pytest.approx(0.5)
    assert _tail_gate(seen.astype(np.float32), log_pop, 0.5) == pytest.approx(2.0)
    assert _tail_gate(seen.astype(np.float32), log_pop, 1.0) > 4.0


def test_training_cut_keeps_targets_out_of_inputs_and_graph() -> None:
    from fuserec.plugins.kg import KGConfig, _Trainer
    from fuserec.testing import planted_dataset

    data = planted_dataset()
    trainer = _Trainer(data, KGConfig(**FAST), torch.device("cpu"))
    inputs, targets, edges = trainer._split()
    assert targets.nnz > 0 and inputs.multiply(targets).nnz == 0 and edges.multiply(targets).nnz == 0
    hist = data.histories()
    for u in range(data.n_users):
        order = {int(i): t for t, i in enumerate(hist.user(u))}
        ins = [order[int(i)] for i in inputs[u].indices]
        outs = [order[int(i)] for i in targets[u].indices]
        if outs:
            assert ins and max(ins) < min(outs)  # targets follow the inputs in time
            newest = inputs[u].toarray()[0, hist.user(u)[max(ins)]]
            assert newest == pytest.approx(1.0)  # recency weights count from the cut


def test_attributes_join_python_scores_only_when_users_are_known() -> None:
    from fuserec.testing import planted_dataset

    data = planted_dataset()
    algo = KnowledgeGraph({**FAST, "tail_rank": 0}).fit(data)
    n = data.n_items
    anonymous = algo.score(Histories.from_lists([[], [], [3, 7]], n))
    assert np.allclose(anonymous[0], anonymous[1])
    known = Histories(np.array([0, 0, 0]), np.zeros(0, np.int64), n, users=np.array([0, 1]))
    with_users = algo.score(known)
    assert not np.allclose(with_users[0], with_users[1])  # users 0 and 1 differ in attributes
    with torch.no_grad():
        onnx_like = algo.to_torch()(
            torch.from_numpy(Histories.from_lists([[], [3, 7]], n).to_padded())
        ).numpy()
    np.testing.assert_allclose(onnx_like, anonymous[1:], rtol=1e-5, atol=1e-6)


def test_an_epoch_takes_at_most_max_steps_and_scores_from_one_propagation() -> None:
    """Each step re-propagates the graph: above ``user_batch * max_steps`` users the batch grows instead."""
    from fuserec.plugins.kg import KGConfig, _Trainer, epoch_batch
    from fuserec.testing import planted_dataset

    assert epoch_batch(100, 128, 64) == 128 and epoch_batch(70_000, 128, 64) == 1094
    assert epoch_batch(128 * 64 + 1, 128, 64) == 129
    data = planted_dataset()
    assert data.n_users > 2 * 3
    trainer = _Trainer(data, KGConfig(**{**FAST, "user_batch": 2, "max_steps": 3}), torch.device("cpu"))
    calls = {"propagate": 0}
    propagate = trainer.propagate

    def counted(*args: object) -> object:
        calls["propagate"] += 1
        return propagate(*args)

    trainer.propagate = counted  # type: ignore[method-assign]
    trainer.train_epoch()
    assert calls["propagate"] == 3  # many more users than 2 x 3: three steps of larger batches
    hist = data.histories()
    first = trainer.score(hist.select(np.arange(5)))
    again = trainer.score(hist.select(np.arange(5, 10)))
    assert calls["propagate"] == 4  # one propagation scores every block of this epoch
    trainer.train_epoch()
    assert not np.allclose(trainer.score(hist.select(np.arange(5))), first)  # a new epoch, new scores
    assert again.shape == (5, data.n_items)
