"""Conformance checks: each a plain function that raises ConformanceError saying what to fix."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from fuserec.api import STATE_FILE, Algorithm
from fuserec.config import SplitConfig
from fuserec.data.dataset import Dataset, interactions_matrix
from fuserec.histories import Histories
from fuserec.metrics import evaluate_scores, top_k


class ConformanceError(AssertionError):
    """A plugin breaks the contract; the message names the check and the fix."""


def _fail(cls: type[Algorithm], check: str, problem: str, fix: str) -> None:
    raise ConformanceError(f"{cls.__name__} fails '{check}': {problem}. To fix: {fix}")


def make(cls: type[Algorithm], config: dict[str, Any] | None, seed: int = 0) -> Algorithm:
    return cls(cls.Config.model_validate({**(config or {}), "seed": seed}))


def check_config(
    cls: type[Algorithm], config: dict[str, Any] | None, bad_configs: list[dict[str, Any]]
) -> None:
    """The config round-trips through JSON and rejects unknown keys and each declared bad value."""
    cfg = cls.Config.model_validate(config or {})
    if cls.Config.model_validate_json(cfg.model_dump_json()) != cfg:
        _fail(
            cls,
            "config round-trip",
            "Config does not survive model_dump_json/model_validate_json",
            "use JSON-serialisable field types (numbers, strings, lists, nested pydantic models)",
        )
    for bad in [{"no_such_option": 1}, *bad_configs]:
        try:
            cls.Config.model_validate({**(config or {}), **bad})
        except ValidationError as exc:
            if not any(str(key) in str(exc) for key in bad):
                _fail(
                    cls,
                    "config rejects bad values",
                    f"the error for {bad} does not name the field",
                    "raise from a field validator, or use Field(ge=..., le=...) constraints",
                )
            continue
        _fail(
            cls,
            "config rejects bad values",
            f"{bad} was accepted",
            "derive Config from fuserec.api.AlgorithmConfig (extra='forbid') and constrain fields",
        )


def check_scores(algo: Algorithm, histories: Histories) -> np.ndarray:
    cls = type(algo)
    scores = algo.score(histories)
    want = (len(histories), histories.n_items)
    if not isinstance(scores, np.ndarray) or scores.shape != want:
        _fail(
            cls,
            "score shape",
            f"score() returned {getattr(scores, 'shape', type(scores))}, expected {want}",
            "return a dense float32 array [n_users, n_items] covering the whole catalog",
        )
    if scores.dtype != np.float32:
        _fail(cls, "score dtype", f"score() returned {scores.dtype}", "cast scores to np.float32")
    if not np.isfinite(scores).all():
        _fail(
            cls,
            "finite scores",
            "score() returned NaN or inf",
            "guard divisions (empty histories, items without interactions) and clip logs",
        )
    return scores


def check_deterministic(
    cls: type[Algorithm], config: dict[str, Any] | None, data: Dataset, hist: Histories
) -> None:
    a = make(cls, config).fit(data).score(hist)
    b = make(cls, config).fit(data).score(hist)
    if not np.allclose(a, b, atol=1e-6):
        _fail(
            cls,
            "deterministic fit",
            "two fits with the same seed score differently",
            "derive every random generator from config.seed (np.random.default_rng, torch.Generator)",
        )


def check_exclusion(algo: Algorithm, hist: Histories) -> None:
    scores = check_scores(algo, hist)
    seen = hist.to_csr()
    top = top_k(scores, 10, exclude=seen)
    for u in range(len(hist)):
        if set(top[u][top[u] >= 0].tolist()) & set(hist.user(u).tolist()):
            _fail(
                type(algo),
                "seen items excluded",
                "top_k returned a seen item",
                "do not return -inf/NaN tricks that defeat exclusion; return plain finite scores",
            )


def check_save_load(algo: Algorithm, hist: Histories) -> None:
    cls = type(algo)
    with tempfile.TemporaryDirectory() as tmp:
        algo.save(tmp)
        try:
            with np.load(Path(tmp) / STATE_FILE, allow_pickle=False) as npz:
                _ = [npz[k] for k in npz.files]
        except ValueError:
            _fail(
                cls,
                "save without pickle",
                "state.npz needs pickle to load",
                "return only numeric numpy arrays from get_state()",
            )
        back = cls.load(tmp)
        if not np.allclose(back.score(hist), algo.score(hist), atol=1e-6):
            _fail(
                cls,
                "save/load round-trip",
                "the loaded model scores differently",
                "put every fitted array in get_state() and restore it in set_state()",
            )


def check_onnx_parity(algo: Algorithm, hist: Histories, atol: float = 1e-4) -> dict[str, Any]:
    from fuserec.onnx_model import OnnxRecommender, export_onnx
    from fuserec.parity import contributions_agree, parity_check

    cls = type(algo)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = export_onnx(algo, Path(tmp) / "model.onnx", k=10)
        except Exception as exc:
            _fail(
                cls,
                "ONNX export",
                f"torch.onnx.export(dynamo=True) failed: {type(exc).__name__}: {exc}",
                "make to_torch() return a module with forward(int64 [B, L]) -> float32 [B, n_items] "
                "using tensor ops only (no numpy, no data-dependent Python control flow)",
            )
        session = OnnxRecommender(path)
        report = parity_check(algo, session, hist, 10)
        # a batch whose longest history has one item: the length-1 case the exporter may specialise
        single = parity_check(algo, session, Histories.from_lists([[0], []], hist.n_items), 10)
        if (
            not single["top_items_match_up_to_ties"]
            or not single["top_scores_match"]
            or single["max_rel_diff"] > report["max_rel_diff"]
        ):
            report = single
    if not getattr(algo, "exact_scores", True):  # rank-based fusers: the ranking is what must agree
        if not report["top_items_match_up_to_ties"]:
            _fail(
                cls,
                "ONNX parity (top-k)",
                f"onnxruntime's top-k differs from score()'s: {report}",
                "make to_torch() compute what score() computes, ranks with the same tie rule",
            )
    elif report["max_rel_diff"] > atol or not report["top_scores_match"]:
        _fail(
            cls,
            "ONNX parity",
            f"onnxruntime differs from score(): {report}",
            "make to_torch() compute exactly what score() computes (same normalisation, -1 padding ignored)",
        )
    if not contributions_agree(report, getattr(algo, "exact_scores", True)):
        _fail(
            cls,
            "ONNX contributions",
            f"onnxruntime's per-component contributions at the top-k differ from Python's: {report}",
            "make combine()'s contributions come from the same tensors as its fused scores",
        )
    return report


def check_planted_structure(
    cls: type[Algorithm], config: dict[str, Any] | None, data: Dataset
) -> dict[str, float]:
    """NDCG@10 on a temporal hold-out of the planted data must beat popularity's."""
    from fuserec.plugins.popularity import Popularity
    from fuserec.splitting import split_frame

    train, test = split_frame(data.interactions, SplitConfig())
    train_data = data.with_interactions(train)
    hist = train_data.histories()
    truth = interactions_matrix(test, data.n_users, data.n_items)
    users = np.unique(test["user"].to_numpy())
    result = {}
    for name, algo in (("algorithm", make(cls, config)), ("popularity", Popularity())):
        algo.fit(train_data)

        def score(rows: np.ndarray, a: Algorithm = algo) -> np.ndarray:
            return a.score(hist.select(rows))

        metrics, _ = evaluate_scores(
            score,
            users,
            train_data.matrix(),
            truth,
            [10],
            train_data.item_popularity(),
        )
        result[name] = metrics["ndcg@10"]
    if result["algorithm"] <= result["popularity"]:
        _fail(
            cls,
            "recovers planted structure",
            f"NDCG@10 {result['algorithm']:.4f} <= popularity's {result['popularity']:.4f}",
            "check that score() uses the history (a bug often makes every user score alike)",
        )
    return result


def probe_histories(data: Dataset) -> Histories:
    """A few real histories, an empty one, and one naming the cold item."""
    hist = data.histories().select(np.arange(min(12, data.n_users)))
    lists = [hist.user(i).tolist() for i in range(len(hist))] + [[], [data.n_items - 1, 0]]
    return Histories.from_lists(lists, data.n_items)
