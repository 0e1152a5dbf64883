from pathlib import Path

import numpy as np
import pytest
import torch

from fuserec.histories import Histories
from fuserec.onnx_model import OnnxRecommender, TopKModel, export_onnx
from fuserec.plugins.itemknn import ItemKNN
from fuserec.plugins.popularity import Popularity
from fuserec.tasks.export import parity_check

from .small_data import planted_dataset

HIST = Histories.from_lists([[0, 1, 2], [], [25, 30, 25], [39]], 40)


def test_popularity_scores_training_counts() -> None:
    data = planted_dataset()
    algo = Popularity().fit(data)
    scores = algo.score(HIST)
    assert scores.shape == (4, 40) and scores.dtype == np.float32
    np.testing.assert_array_equal(scores[1], np.bincount(data.interactions["item"], minlength=40))


def test_itemknn_matches_hand_computed_cosine() -> None:
    data = planted_dataset()
    x = data.matrix().toarray()
    co = x.T @ x
    norms = np.sqrt(np.diag(co))
    sim = co / np.outer(norms, norms)
    np.fill_diagonal(sim, 0)
    algo = ItemKNN({"k": 39}).fit(data)
    expected = HIST.to_csr().toarray() @ sim
    np.testing.assert_allclose(algo.score(HIST), expected, rtol=1e-5, atol=1e-6)
    # Planted structure: a history in the first half scores first-half items above the second half.
    s = algo.score(HIST)[0]
    assert s[3:20].mean() > s[20:].mean()


def test_itemknn_keeps_k_neighbours_and_shrinkage_damps() -> None:
    data = planted_dataset()
    small = ItemKNN({"k": 3}).fit(data)
    assert (small.similarity().getnnz(axis=1) <= 3).all()
    shrunk = ItemKNN({"k": 39, "shrinkage": 10.0}).fit(data)
    plain = ItemKNN({"k": 39}).fit(data)
    assert shrunk.score(HIST)[0].sum() < plain.score(HIST)[0].sum()


@pytest.mark.parametrize("algo_cls", [Popularity, ItemKNN])
def test_save_load_roundtrip_without_pickle(algo_cls: type, tmp_path: Path) -> None:
    algo = algo_cls().fit(planted_dataset())
    algo.save(tmp_path / "m")
    with np.load(tmp_path / "m" / "state.npz", allow_pickle=False) as npz:
        assert all(npz[k].dtype != object for k in npz.files)
    back = algo_cls.load(tmp_path / "m")
    np.testing.assert_array_equal(back.score(HIST), algo.score(HIST))


def test_config_rejects_bad_values_with_field_name() -> None:
    with pytest.raises(ValueError, match="k"):
        ItemKNN({"k": 0})
    with pytest.raises(ValueError, match="extra"):
        ItemKNN({"neighbors": 5})


@pytest.mark.parametrize("dense", [True, False])
def test_itemknn_torch_module_matches_score_with_repeats(dense: bool) -> None:
    algo = ItemKNN({"k": 5}).fit(planted_dataset())
    module = TopKModel(algo.to_torch(dense=dense), 40, 5)
    scores, _, _ = module(torch.from_numpy(HIST.to_padded()))
    np.testing.assert_allclose(scores.numpy(), algo.score(HIST), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algo", [Popularity(), ItemKNN({"k": 10})], ids=["popularity", "itemknn"])
def test_onnx_export_matches_python(algo, tmp_path: Path) -> None:
    algo.fit(planted_dataset())
    path = export_onnx(algo, tmp_path / "model.onnx", k=5)
    session = OnnxRecommender(path)
    report = parity_check(algo, session, HIST, 5)
    assert report["scores_match"] and report["top_scores_match"] and report["top_items_match_up_to_ties"]
    assert report["empty_histories"] == 1
    # Seen items are never recommended; ids outside the catalog are treated as padding, not gathered.
    _, items, _ = session.run(HIST.to_padded())
    for row, hist in zip(items, [HIST.user(i) for i in range(len(HIST))], strict=True):
        assert not set(row.tolist()) & set(hist.tolist())
    hostile = np.array([[0, 1, 2, 40, 10**9, -7]], dtype=np.int64)
    scores, _, _ = session.run(hostile)
    np.testing.assert_allclose(scores[0], algo.score(Histories.from_lists([[0, 1, 2]], 40))[0], rtol=1e-5)
