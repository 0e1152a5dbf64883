"""The conformance kit for rating-prediction plugins (``fuserec.raters``).

A rater's tests call :func:`check_rater` once::

    def test_my_rater_keeps_the_contract() -> None:
        check_rater(MyRater, {"factors": 8})

It fits on planted ratings (:mod:`fuserec.testing.ratings`) and runs every check below; each is also a
plain function that raises :class:`~fuserec.testing.checks.ConformanceError` saying what to fix.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fuserec.histories import PAD, Histories
from fuserec.rating import RatingAlgorithm, RatingData
from fuserec.testing.checks import ConformanceError
from fuserec.testing.ratings import PlantedRatings, planted_ratings

#: Served graphs must match ``predict`` this closely (the contract of ``RatingAlgorithm.to_torch``).
RATING_PARITY_ATOL = 1e-4
#: Predictions of the same history in another batch (order, neighbours) may differ by float rounding only.
BATCH_ATOL = 1e-5


def _fail(cls: type[RatingAlgorithm], check: str, problem: str, fix: str) -> None:
    raise ConformanceError(f"{cls.__name__} fails '{check}': {problem}. To fix: {fix}")


def make_rater(cls: type[RatingAlgorithm], config: dict[str, Any] | None, seed: int = 0) -> RatingAlgorithm:
    return cls(cls.Config.model_validate({**(config or {}), "seed": seed}))


def rated(lists: list[list[int]], ratings: list[list[float]], n_items: int) -> Histories:
    """Histories with ratings from per-row lists (an empty list is a user with no ratings yet)."""
    hist = Histories.from_lists(lists, n_items)
    flat = np.asarray([r for row in ratings for r in row], dtype=np.float32)
    return Histories(hist.indptr, hist.items, n_items, ratings=flat)


def probe_histories(data: PlantedRatings, rows: int = 24) -> tuple[Histories, np.ndarray]:
    """``(histories, items [B, 5])``: training histories (the longest first) and the edge cases a served
    request brings: an empty history, one rating, an item rated twice, ratings outside the training range.
    """
    train = RatingData.from_frame(data.frame, data.n_users, data.n_items).histories()
    keep = np.argsort(-train.lengths, kind="stable")[:rows]
    chosen = train.select(keep)
    assert chosen.ratings is not None
    lists = [chosen.user(b).tolist() for b in range(len(chosen))]
    ratings = [chosen.ratings[chosen.indptr[b] : chosen.indptr[b + 1]].tolist() for b in range(len(chosen))]
    last = data.n_items - 1
    lists += [[], [min(3, last)], [min(5, last), min(7, last), min(5, last)], [0, last]]
    ratings += [[], [4.0], [5.0, 2.0, 1.0], [9.0, -3.0]]
    items = np.random.default_rng(0).integers(0, data.n_items, (len(lists), 5))
    items[:, 0], items[:, -1] = 0, last
    return rated(lists, ratings, data.n_items), items


def extreme_histories(data: PlantedRatings) -> Histories:
    """Every item rated far above, then far below the training range: what clipping is for."""
    items = list(range(data.n_items))
    return rated([items, items], [[1e3] * len(items), [-1e3] * len(items)], data.n_items)


def check_predictions(model: RatingAlgorithm, hist: Histories, items: np.ndarray) -> np.ndarray:
    """``predict`` returns finite ``float32 [B, m]`` within ``rating_range_``."""
    cls = type(model)
    pred = model.predict(hist, items)
    if not isinstance(pred, np.ndarray) or pred.shape != items.shape:
        _fail(
            cls,
            "predict shape",
            f"predict() returned {getattr(pred, 'shape', type(pred))}, expected {items.shape}",
            "make estimate() return [len(histories), m]: row b rates items[b] for history b",
        )
    if pred.dtype != np.float32:
        _fail(cls, "predict dtype", f"predict() returned {pred.dtype}", "let the base class's predict() cast")
    if not np.isfinite(pred).all():
        _fail(
            cls,
            "finite predictions",
            "predict() returned NaN or inf (an empty history? an item nobody rated?)",
            "guard the divisions of estimate(): fall back to the global mean or the biases",
        )
    low, high = model.rating_range_ or (np.nan, np.nan)
    if pred.min() < low or pred.max() > high:
        _fail(cls, "clipping", f"predictions leave [{low}, {high}]", "do not override predict(); clip there")
    return pred


def check_clipping(model: RatingAlgorithm, data: PlantedRatings) -> None:
    """The range is the training ratings' and holds for histories rated far outside it."""
    cls = type(model)
    want = (float(data.frame["rating"].min()), float(data.frame["rating"].max()))
    if model.rating_range_ != want:
        _fail(cls, "rating range", f"rating_range_ is {model.rating_range_}, the data's {want}", "call fit()")
    hist = extreme_histories(data)
    check_predictions(model, hist, np.tile(np.arange(data.n_items), (2, 1)))


def check_empty_history(model: RatingAlgorithm, hist: Histories, items: np.ndarray) -> None:
    """An empty history folds in alone and within a batch, to the same prediction."""
    empty = int(np.flatnonzero(hist.lengths == 0)[0])
    alone = check_predictions(model, hist.select([empty]), items[empty : empty + 1])
    within = model.predict(hist, items)[empty : empty + 1]
    if not np.allclose(alone, within, atol=BATCH_ATOL):
        _fail(
            type(model),
            "empty history",
            "an empty history is predicted differently alone and in a batch",
            "fold an empty history in as the model's prior (zero user parameters), whatever else is batched",
        )


def check_batch_order(model: RatingAlgorithm, hist: Histories, items: np.ndarray) -> None:
    """A history's predictions do not depend on the order of the batch (nor on the rest of it)."""
    expected = model.predict(hist, items)
    perm = np.random.default_rng(1).permutation(len(hist))
    shuffled = model.predict(hist.select(perm), items[perm])
    if not np.allclose(shuffled, expected[perm], atol=BATCH_ATOL):
        worst = float(np.abs(shuffled - expected[perm]).max())
        _fail(
            type(model),
            "batch order",
            f"reordering the histories of a batch changes their predictions (by up to {worst:.2g})",
            "compute each history's fold-in from its own row only (no state shared across rows)",
        )


def check_save_load(model: RatingAlgorithm, hist: Histories, items: np.ndarray) -> None:
    """``save`` then ``load`` (npz without pickle) predicts exactly as the fitted model."""
    cls = type(model)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            back = cls.load(model.save(tmp))
        except (TypeError, ValueError) as exc:
            _fail(
                cls,
                "save/load",
                f"{type(exc).__name__}: {exc}",
                "return only numeric numpy arrays from model_state() and restore them in set_model_state()",
            )
        if not np.array_equal(back.predict(hist, items), model.predict(hist, items)):
            _fail(
                cls,
                "save/load round-trip",
                "the loaded model predicts differently",
                "put every array estimate() reads in model_state() and restore it in set_model_state()",
            )
        if back.config != model.config or back.rating_range_ != model.rating_range_:
            _fail(cls, "save/load round-trip", "config or rating range changed", "do not override save/load")


def padded_inputs(hist: Histories, odd_padding: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(history [B, L], history_ratings [B, L])`` as the served graph takes them, L ≥ 1.

    With ``odd_padding`` the padding mixes -1 with other ids outside the catalogue and its ratings are
    NaN: all of it must be ignored.
    """
    assert hist.ratings is not None
    history = hist.to_padded()
    values = np.full(history.shape, np.nan if odd_padding else 0.0, dtype=np.float32)
    for b in range(len(hist)):
        values[b, : hist.lengths[b]] = hist.ratings[hist.indptr[b] : hist.indptr[b + 1]]
    if odd_padding:
        pad = history == PAD
        odd = np.where(np.arange(history.size).reshape(history.shape) % 2 == 0, -7, hist.n_items + 3)
        history = np.where(pad, odd, history)
    return history, values


def check_served_form(model: RatingAlgorithm, hist: Histories, items: np.ndarray) -> dict[str, Any]:
    """``to_torch()`` equals ``estimate`` and its exported ONNX graph equals ``predict``, within 1e-4.

    Skipped (``{"served": False}``) when the rater has no served form. Checks the torch module on odd
    padding, then the exported file through :class:`~fuserec.rating_onnx.RatingSession` on ragged lists,
    on padded arrays, on a one-rating history and on a batch of empty histories.
    """
    import torch

    from fuserec.rating_onnx import COMPONENTS_KEY, RatingSession, export_rating_onnx, feature_width

    cls = type(model)
    try:
        module = model.to_torch()
    except NotImplementedError:
        return {"served": False}
    assert model.n_items_ is not None and model.rating_range_ is not None and hist.ratings is not None
    history, values = padded_inputs(hist)
    args = [torch.from_numpy(history), torch.from_numpy(values), torch.from_numpy(items.astype(np.int64))]
    if cls.reads_user_features:  # unknown users: all zeros, as predict() sees histories without users
        args.append(torch.zeros(len(hist), feature_width(module), dtype=torch.float32))
    with torch.no_grad():
        got = module(*args)
    expected = model.estimate(hist, items.astype(np.int64))
    torch_diff = float(np.abs(got.numpy().astype(np.float64) - expected).max())
    if got.dtype != torch.float32 or tuple(got.shape) != items.shape or not torch_diff <= RATING_PARITY_ATOL:
        _fail(
            cls,
            "torch parity",
            f"to_torch() gives {got.dtype} {tuple(got.shape)}, off estimate() by {torch_diff:.3g}",
            "compute what estimate() computes (float64 fold-ins); treat ids outside [0, n_items) as padding "
            "and ignore their ratings (use where(), not a product: padding ratings may be NaN)",
        )
    predicted = model.predict(hist, items)
    lists = [hist.user(b).tolist() for b in range(len(hist))]
    ratings = [hist.ratings[hist.indptr[b] : hist.indptr[b + 1]].tolist() for b in range(len(hist))]
    ragged = [row[: 1 + b % items.shape[1]].tolist() for b, row in enumerate(items)]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = export_rating_onnx(
                module,
                Path(tmp) / "rater.onnx",
                model.n_items_,
                model.rating_range_,
                cls.reads_user_features,
                {COMPONENTS_KEY: f'["{cls.__name__}"]'},
            )
        except Exception as exc:
            _fail(
                cls,
                "ONNX export",
                f"torch.onnx.export(dynamo=True) failed: {type(exc).__name__}: {exc}",
                "use tensor ops only in to_torch()'s module (no numpy, no data-dependent Python control "
                "flow; ONNX has no linalg.solve: see fuserec.rating_torch.conjugate_gradient)",
            )
        session = RatingSession(path)
        out = session.run(lists, ratings, ragged)
        padded = session.run_padded(history, values, items)
        single = session.run([lists[0][:1]], [ratings[0][:1]], [items[0].tolist()])
        empties = session.run([[], []], [[], []], [items[0].tolist(), items[1].tolist()])
    empty_rows = model.predict(rated([[], []], [[], []], hist.n_items), items[:2])
    one = model.predict(rated([lists[0][:1]], [ratings[0][:1]], hist.n_items), items[:1])
    diffs = [
        max(abs(out["ratings"][b, : len(r)] - predicted[b, : len(r)]).max() for b, r in enumerate(ragged)),
        np.abs(padded["ratings"] - predicted).max(),
        np.abs(single["ratings"] - one).max(),
        np.abs(empties["ratings"] - empty_rows).max(),
    ]
    onnx_diff = float(max(diffs))
    if not onnx_diff <= RATING_PARITY_ATOL:
        _fail(
            cls,
            "ONNX parity",
            f"onnxruntime differs from predict() by {onnx_diff:.3g} (ragged, padded, one rating, empty: "
            f"{[float(d) for d in diffs]})",
            "make to_torch() compute exactly what estimate() computes, for any history length",
        )
    low, high = model.rating_range_
    shapes = padded["predictions"].shape == (1, *items.shape) == padded["contributions"].shape
    if (
        not shapes
        or not np.array_equal(padded["predictions"][0], padded["ratings"])
        or not np.allclose(np.clip(padded["contributions"].sum(0), low, high), padded["ratings"], atol=1e-6)
        or session.rating_range != model.rating_range_
        or session.names(COMPONENTS_KEY) != [cls.__name__]
    ):
        _fail(
            cls,
            "served outputs",
            "a single rater's predictions/contributions are not [1, B, m] copies of its ratings, or the "
            "metadata lost the rating range",
            "return one [B, m] tensor from to_torch()'s module; RatingGraph adds the rest",
        )
    return {"served": True, "torch_max_abs_diff": torch_diff, "onnx_max_abs_diff": onnx_diff}


def check_rater(cls: type[RatingAlgorithm], config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit ``cls`` on planted ratings and run every check; returns what the served-form check measured.

    Raises :class:`~fuserec.testing.checks.ConformanceError` at the first broken rule.
    """
    data = planted_ratings()
    model = make_rater(cls, config).fit(data.frame, data.n_users, data.n_items)
    hist, items = probe_histories(data)
    check_predictions(model, hist, items)
    check_clipping(model, data)
    check_empty_history(model, hist, items)
    check_batch_order(model, hist, items)
    check_save_load(model, hist, items)
    return check_served_form(model, hist, items)


__all__ = [
    "BATCH_ATOL",
    "RATING_PARITY_ATOL",
    "check_batch_order",
    "check_clipping",
    "check_empty_history",
    "check_predictions",
    "check_rater",
    "check_save_load",
    "check_served_form",
    "extreme_histories",
    "make_rater",
    "padded_inputs",
    "probe_histories",
    "rated",
]
