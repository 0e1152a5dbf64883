"""The served rating graph: every built-in rater's ``to_torch()`` and ONNX export match ``predict``, the
wrapper sanitises and clips, the session takes ragged lists, and the in-graph solve is exact enough."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from fuserec.plugins.rating.svd import SVD
from fuserec.rating import RatingData
from fuserec.rating_onnx import (
    COMPONENTS_KEY,
    PARTS_KEY,
    RatingGraph,
    RatingSession,
    export_rating_onnx,
)
from fuserec.rating_torch import conjugate_gradient
from fuserec.registry import get_rater
from fuserec.testing import check_rater
from fuserec.testing.checks import ConformanceError

ML100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k" / "u.data"

# Small settings keep each check to seconds; k below the history lengths exercises the top-k cut.
KIT_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("baseline", {}),
    ("knn_baseline", {"k": 3}),
    ("svd", {"factors": 8, "epochs": 10}),
    ("svdpp", {"factors": 6, "epochs": 10}),
    ("user_similarity", {"k": 5}),
    ("user_similarity", {"similarity": "cosine"}),
]


@pytest.mark.parametrize(("name", "config"), KIT_CONFIGS, ids=[f"{n}-{c}" for n, c in KIT_CONFIGS])
def test_every_built_in_rater_passes_the_kit_and_is_served_exactly(name: str, config: dict[str, Any]) -> None:
    report = check_rater(get_rater(name), config)
    assert report["served"]
    assert report["onnx_max_abs_diff"] <= 1e-4 and report["torch_max_abs_diff"] <= 1e-4


def test_the_kit_names_a_served_form_that_ignores_padding_badly() -> None:
    class Leaky(SVD):
        """A served form that lets padding ratings in (NaN)."""

        def to_torch(self) -> torch.nn.Module:
            inner = super().to_torch()

            class Wrapped(torch.nn.Module):
                def forward(
                    self, history: torch.Tensor, ratings: torch.Tensor, items: torch.Tensor
                ) -> torch.Tensor:
                    return inner(history, ratings, items) + ratings.sum(1, keepdim=True)

            return Wrapped()

    with pytest.raises(ConformanceError, match="torch parity"):
        check_rater(Leaky, {"factors": 4, "epochs": 2})


class _Ensemble(torch.nn.Module):
    """A stand-in fused model: two components (the history mean, an item score) and a user-feature part."""

    n_user_features = 2

    def forward(
        self, history: torch.Tensor, ratings: torch.Tensor, items: torch.Tensor, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        valid = (history >= 0).to(torch.float32)
        mean = (ratings * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1.0)
        first = mean.expand(-1, items.shape[1])
        second = items.to(torch.float32)  # item i is rated i: overshoots the range for large ids
        extra = features[:, :1].expand(-1, items.shape[1])
        parts = torch.stack([0.5 * first, 0.5 * second, extra])
        return parts.sum(0), torch.stack([first, second]), parts


class _Recorder(torch.nn.Module):
    """Records what the wrapper hands the model."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, history: torch.Tensor, ratings: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        self.seen = [history, ratings, items]
        return items.to(torch.float32)


def test_the_wrapper_turns_bad_ids_into_padding_clamps_items_and_clips() -> None:
    recorder = _Recorder()
    graph = RatingGraph(recorder, n_items=10, rating_range=(1.0, 5.0))
    history = torch.tensor([[5, 100, -3, 9]])
    ratings = torch.tensor([[4.0, float("nan"), 2.0, 3.0]])
    ratings_out, predictions, parts = graph(history, ratings, torch.tensor([[-2, 3, 12]]))
    seen_history, seen_ratings, seen_items = recorder.seen
    assert seen_history.tolist() == [[5, -1, -1, 9]]
    assert seen_ratings.tolist() == [[4.0, 0.0, 0.0, 3.0]]  # NaN padding never reaches the model
    assert seen_items.tolist() == [[0, 3, 9]]
    assert ratings_out.tolist() == [[1.0, 3.0, 5.0]]  # clipped
    assert predictions.shape == (1, 1, 3) and predictions[0].tolist() == ratings_out.tolist()
    assert parts.tolist() == [[[0.0, 3.0, 9.0]]]  # the parts add up to the unclipped rating


def test_an_ensemble_with_user_features_exports_its_triple_and_metadata(tmp_path: Path) -> None:
    meta = {COMPONENTS_KEY: '["mean", "item"]', PARTS_KEY: '["mean", "item", "attribute"]', "note": "x"}
    path = export_rating_onnx(_Ensemble(), tmp_path / "fused.onnx", 8, (1.0, 5.0), True, meta)
    session = RatingSession(path)
    assert session.reads_user_features and session.feature_width == 2
    assert session.names(COMPONENTS_KEY) == ["mean", "item"]
    assert session.names(PARTS_KEY) == ["mean", "item", "attribute"]
    assert session.metadata["note"] == "x" and session.rating_range == (1.0, 5.0) and session.n_items == 8
    assert session.names("absent") is None
    out = session.run([[1, 2], []], [[4.0, 2.0], []], [[0, 7, 6], [4]], np.array([[1.0, 0.0], [0.5, 1.0]]))
    assert out["ratings"].shape == (2, 3) and out["predictions"].shape == (2, 2, 3)
    assert out["contributions"].shape == (3, 2, 3) and out["lengths"].tolist() == [3, 1]
    # row 0, item 7: 0.5·3 + 0.5·7 + 1 = 6, clipped to 5; the item component alone says 7, clipped too
    assert out["ratings"][0].tolist() == [2.5, 5.0, 5.0]
    assert out["predictions"][:, 0, 1].tolist() == [3.0, 5.0]
    np.testing.assert_allclose(out["contributions"][:, 0, 1], [1.5, 3.5, 1.0])
    assert np.isnan(out["ratings"][1, 1:]).all() and out["ratings"][1, 0] == pytest.approx(2.5)
    unknown = session.run([[1]], [[3.0]], [[2]])  # no features: an unknown user's zeros
    assert unknown["contributions"][2, 0, 0] == 0.0
    with pytest.raises(ValueError, match="user_features"):
        session.run([[1]], [[3.0]], [[2]], np.zeros((1, 3), np.float32))


def test_the_session_pads_ragged_rows_and_takes_empty_batches(tmp_path: Path) -> None:
    model = get_rater("baseline")().fit(
        pd.DataFrame({"user": [0, 0, 1, 2], "item": [0, 1, 1, 2], "rating": [5.0, 3.0, 1.0, 4.0]}), 3, 4
    )
    session = RatingSession(export_rating_onnx(model.to_torch(), tmp_path / "b.onnx", 4, model.rating_range_))
    assert session.names(COMPONENTS_KEY) is None
    out = session.run([[0, 1], [], [2]], [[5.0, 3.0], [], [4.0]], [[3], [0, 1, 2], []])
    assert out["lengths"].tolist() == [1, 3, 0]
    assert np.isfinite(out["ratings"][1]).all() and np.isnan(out["ratings"][[0, 2]][:, 1:]).all()
    nothing = session.run([], [], [])
    assert nothing["ratings"].shape[0] == 0 and nothing["predictions"].shape[:2] == (1, 0)
    with pytest.raises(ValueError, match="same length"):
        session.run([[0, 1]], [[5.0]], [[0]])
    with pytest.raises(ValueError, match="one row per user"):
        session.run([[0]], [[5.0]], [])


def test_conjugate_gradient_solves_ill_conditioned_systems_row_by_row() -> None:
    rng = np.random.default_rng(0)
    d = 40
    basis = np.linalg.qr(rng.normal(size=(3, d, d)))[0]
    spectrum = np.geomspace(1.0, 1e4, d)  # κ = 1e4: far worse than any ridge fold-in of the raters
    a = torch.from_numpy(basis @ (spectrum[:, None] * basis.transpose(0, 2, 1)))
    c = torch.from_numpy(rng.normal(size=(3, d, 1)))
    c[2] = 0.0  # an empty history: nothing to solve
    x = conjugate_gradient(a, c)
    np.testing.assert_allclose(x.numpy(), torch.linalg.solve(a, c)[:, :, 0].numpy(), atol=1e-8)
    assert x[2].abs().max() == 0.0
    # a row's answer does not depend on its batch: converged rows stop moving
    assert torch.equal(conjugate_gradient(a[:1], c[:1]), x[:1])


@pytest.mark.skipif(not ML100K.exists(), reason=f"MovieLens-100k not found at {ML100K} (../shared absent)")
def test_svd_at_ml100k_scale_is_served_within_1e4(tmp_path: Path) -> None:
    start = time.perf_counter()
    raw = pd.read_csv(ML100K, sep="\t", names=["user_id", "item_id", "rating", "timestamp"])
    users, items = pd.factorize(raw["user_id"], sort=True)[0], pd.factorize(raw["item_id"], sort=True)[0]
    frame = pd.DataFrame({"user": users, "item": items, "rating": raw["rating"].astype(np.float32)})
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    rng = np.random.default_rng(0)
    train = frame[rng.random(len(frame)) < 0.8].reset_index(drop=True)
    model = get_rater("svd")().fit(
        train, n_users, n_items
    )  # defaults: 100 factors, fold-in ridge 10 + 0.02|h|
    hist = RatingData.from_frame(train, n_users, n_items).histories()
    longest = np.argsort(-hist.lengths, kind="stable")[:20]
    rows = np.concatenate(
        [longest, rng.choice(np.setdiff1d(np.arange(n_users), longest), 180, replace=False)]
    )
    chosen = hist.select(rows)
    assert chosen.ratings is not None and chosen.lengths.max() > 500
    targets = rng.integers(0, n_items, (len(rows), 30))
    expected = model.predict(chosen, targets)
    session = RatingSession(
        export_rating_onnx(model.to_torch(), tmp_path / "svd.onnx", n_items, model.rating_range_)
    )
    out = session.run(
        [chosen.user(b).tolist() for b in range(len(chosen))],
        [chosen.ratings[chosen.indptr[b] : chosen.indptr[b + 1]].tolist() for b in range(len(chosen))],
        targets.tolist(),
    )
    assert float(np.abs(out["ratings"] - expected).max()) <= 1e-4
    assert time.perf_counter() - start < 60  # budget ~30 s; a slower solve would show here first
