from pathlib import Path

import numpy as np
import pytest
import torch

from fuserec.histories import Histories
from fuserec.onnx_model import OnnxRecommender, TopKModel, export_onnx
from fuserec.plugins.itemknn import ItemKNN
from fuserec.plugins.popularity import Popularity
from fuserec.testing.data import planted_dataset as _planted


def planted_dataset():
    return _planted(n_items=40)


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
    denom = np.outer(norms, norms)
    sim = np.divide(co, denom, out=np.zeros_like(co), where=denom > 0)  # the cold item has no neighbours
    np.fill_diagonal(sim, 0)
    algo = ItemKNN({"k": 39}).fit(data)
    expected = HIST.to_csr().toarray() @ sim
    np.testing.assert_allclose(algo.score(HIST), expected, rtol=1e-5, atol=1e-6)
    # Planted structure: a history of cluster-3 items (index % 4 == 3) scores that cluster highest.
    s = algo.score(Histories.from_lists([[3, 7, 11]], 40))[0]
    own = np.arange(40) % 4 == 3
    assert s[own].mean() > s[~own].mean()


def test_itemknn_keeps_k_neighbours_and_shrinkage_damps() -> None:
    data = planted_dataset()
    small = ItemKNN({"k": 3}).fit(data)
    assert (small.similarity().getnnz(axis=1) <= 3).all()
    shrunk = ItemKNN({"k": 39, "shrinkage": 10.0}).fit(data)
    plain = ItemKNN({"k": 39}).fit(data)
    assert shrunk.score(HIST)[0].sum() < plain.score(HIST)[0].sum()


@pytest.mark.parametrize("dense", [True, False])
def test_itemknn_torch_module_matches_score_with_repeats(dense: bool) -> None:
    algo = ItemKNN({"k": 5}).fit(planted_dataset())
    module = TopKModel(algo.to_torch(dense=dense), 40, 5)
    scores, _, _, parts = module(torch.from_numpy(HIST.to_padded()))
    np.testing.assert_allclose(scores.numpy(), algo.score(HIST), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(parts.numpy()[0], scores.numpy())  # a single algorithm is its own share


def test_served_graph_treats_out_of_catalog_ids_as_padding(tmp_path: Path) -> None:
    """Unknown ids must never reach a Gather (onnxruntime on CUDA does not bound-check)."""
    algo = ItemKNN({"k": 10}).fit(planted_dataset())
    session = OnnxRecommender(export_onnx(algo, tmp_path / "model.onnx", k=5))
    _, items, _ = session.run(HIST.to_padded())
    for row, u in zip(items, range(len(HIST)), strict=True):
        assert not set(row.tolist()) & set(HIST.user(u).tolist())  # seen items are never recommended
    hostile = np.array([[0, 1, 2, 40, 10**9, -7]], dtype=np.int64)
    scores, _, _ = session.run(hostile)
    clean = algo.score(Histories.from_lists([[0, 1, 2]], 40))[0]
    np.testing.assert_allclose(scores[0], clean, rtol=1e-5)


def test_weights_over_the_limit_go_beside_the_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Protobuf cannot hold 2 GiB: big models keep their weights in ``model.onnx.data``, same answers."""
    import fuserec.onnx_model as onnx_model

    algo = ItemKNN({"k": 10}).fit(planted_dataset())
    whole = export_onnx(algo, tmp_path / "whole" / "model.onnx", k=5)
    assert not (tmp_path / "whole" / "model.onnx.data").exists()
    monkeypatch.setattr(onnx_model, "EXTERNAL_DATA_BYTES", 0)
    split = export_onnx(algo, tmp_path / "split" / "model.onnx", k=5)
    weights = tmp_path / "split" / "model.onnx.data"
    assert weights.exists() and split.stat().st_size < whole.stat().st_size
    padded = HIST.to_padded()
    for a, b in zip(OnnxRecommender(whole).run(padded), OnnxRecommender(split).run(padded), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sessions_skip_weight_prepacking_unless_asked(tmp_path: Path) -> None:
    """Pre-packing holds a second copy of the weights; off unless ``export.prepack`` asks, same scores."""
    algo = ItemKNN({"k": 10}).fit(planted_dataset())
    path = export_onnx(algo, tmp_path / "model.onnx", k=5)
    lean, packed = OnnxRecommender(path), OnnxRecommender(path, prepack=True)
    entry = "session.disable_prepacking"
    assert lean.session.get_session_options().get_session_config_entry(entry) == "1"
    with pytest.raises(RuntimeError, match=entry):  # never set: onnxruntime's default (pre-pack)
        packed.session.get_session_options().get_session_config_entry(entry)
    for a, b in zip(lean.run(HIST.to_padded()), packed.run(HIST.to_padded()), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
