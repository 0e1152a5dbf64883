"""The side scorer of items without interactions (:mod:`fuserec.cold_items`) on its own: where a candidate
is placed, the merge the service and the evaluate stage share, the calibration fitted on validation,
exposure counting, and the saved state."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fuserec.cold_items import (
    COLD_ITEMS_FILE,
    DEPTH,
    Calibration,
    ColdItems,
    fit_calibration,
    fit_logistic,
    merged_top_k,
    period_exposure,
    placed_scores,
    served_top,
)
from fuserec.histories import Histories
from fuserec.metrics import top_k

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "War"]


def _catalog(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        genres = rng.choice(GENRES, size=int(rng.integers(1, 3)), replace=False)
        rows.append(
            {
                "item_id": str(i),
                "title": f"Film {i}",
                "genres": "|".join(genres),
                "tags": "",
                "text": " ".join(g.lower() for g in genres),
                "year": int(rng.integers(1990, 2000)),
            }
        )
    return pd.DataFrame(rows)


# -- placing a candidate in a served list -------------------------------------------------------------------
finite = st.floats(-100, 100, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    top=hnp.arrays(np.float64, st.integers(1, 30), elements=finite, unique=True),
    explore=st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=8),
    seen_tail=st.integers(0, 5),
)
def test_a_candidate_lands_between_the_served_scores_its_hit_probability_earns(
    top: np.ndarray, explore: list[float], seen_tail: int
) -> None:
    scores = -np.sort(-top)
    if seen_tail and seen_tail < len(scores):
        scores[-seen_tail:] = -np.inf  # fewer unseen items than slots
    depth = len(scores)
    hits = 0.5 / (1.0 + np.arange(depth))  # decreasing hit probability per slot
    e = np.asarray(explore)[None, :]
    placed = placed_scores(e, scores[None, :], hits)[0]
    m = int(np.isfinite(scores).sum())
    for value, p in zip(placed, e[0], strict=True):
        assert np.isfinite(value)
        if p <= 0:
            assert value < scores[m - 1]  # no evidence: after every served item
            continue
        slot = min(int((hits > p).sum()), m)  # the slots that hit more often come first
        if slot > 0:
            assert value <= scores[slot - 1]
        if slot < m:
            assert value >= scores[slot]
    # a higher probability never lands lower
    order = np.argsort(e[0], kind="stable")
    assert np.all(np.diff(placed[order]) >= -1e-9)


def test_placed_scores_bite_on_the_slot_rule() -> None:
    top = np.array([[10.0, 8.0, 6.0, 4.0]])
    hits = np.array([0.4, 0.3, 0.2, 0.1])
    placed = placed_scores(np.array([[0.5, 0.25, 0.15, 0.05, 0.0]]), top, hits)[0]
    assert placed[0] > 10.0  # beats the first slot
    assert 6.0 < placed[1] < 8.0  # between the second and the third served item
    assert 4.0 < placed[2] < 6.0
    assert placed[3] < 4.0 and placed[4] < placed[3]


# -- the merge --------------------------------------------------------------------------------------------
def _side(n: int = 40, cold: tuple[int, ...] = (3, 7, 11), weight: float = 50.0) -> ColdItems:
    catalog = _catalog(n)
    popularity = np.full(n, 5.0)
    popularity[list(cold)] = 0.0
    side = ColdItems.from_catalog(catalog, popularity)
    k = side.basis.shape[0] + 1
    cold_model = np.r_[-6.0, 4.0, 0.5, -0.2, np.zeros(k)]  # intercept, cosine, users, item terms
    slot_model = np.r_[-1.0, -0.8, 0.1, 0.0]
    return side.with_calibration(Calibration(cold_model, slot_model, weight))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    n_users=st.integers(1, 6),
    length=st.integers(0, 8),
    weight=st.sampled_from([0.0, 1.0, 50.0, 1e4]),
)
def test_the_serving_merge_and_the_fit_merge_rank_alike(
    seed: int, n_users: int, length: int, weight: float
) -> None:
    """The validation fit ranks with :func:`merged_top_k` over the served list and the candidates; the
    service and the evaluate stage sort merged score vectors. Both must give the same lists, or the
    weight chosen on validation would not be the one served."""
    side = _side(weight=weight)
    n = len(side.popularity)
    rng = np.random.default_rng(seed)
    warm = np.flatnonzero(~side.cold)
    lists = [list(rng.choice(warm, size=length, replace=False)) for _ in range(n_users)]
    histories = Histories.from_lists(lists, n)
    scores = rng.normal(size=(n_users, n)).astype(np.float32)
    seen = histories.to_csr().toarray() > 0
    merged = side.merge(scores, seen, histories)
    assert merged.shape == (n_users, n)
    # nothing but candidates moves, and a candidate only moves up
    moved = merged != scores
    assert not moved[:, ~side.cold].any()
    assert (merged[moved] > scores[moved]).all()
    served = top_k(merged, 10, exclude=sp.csr_matrix(seen))
    # the fit's path: the served list's top items and the candidates with their merged scores
    top = served_top(scores, seen)
    items = top_k(scores, top.shape[1], exclude=sp.csr_matrix(seen))
    profiles = side.profiles(histories)
    cand, cos = side.candidates(profiles, seen, np.zeros((0, side.vectors.shape[1])))
    features = side.item_features(side.vectors, side.exposure)[np.maximum(cand, 0)]
    explore = np.where(
        cand >= 0, side.calibration.exploration(cos, side.user_features(histories), features), 0
    )
    placed = placed_scores(
        explore, top, side.calibration.slot_hits(side.user_features(histories), top.shape[1])
    )
    graph = np.take_along_axis(scores, np.maximum(cand, 0), 1)
    cand_scores = np.where(explore > 0, np.maximum(graph, placed.astype(np.float32)), graph)
    fitted = merged_top_k(items, top, cand, cand_scores, 10)
    np.testing.assert_array_equal(fitted, served)


def test_added_items_are_placed_by_their_content_and_seen_ones_never_promoted() -> None:
    side = _side(weight=1e4)
    catalog = _catalog(40)
    n = len(catalog)
    drama = [i for i in range(n) if catalog["genres"].iat[i] == "Drama" and not side.cold[i]][:5]
    assert len(drama) >= 3
    like = pd.DataFrame([{"title": "New", "genres": "Drama", "tags": "", "text": "drama", "year": 1995}])
    unlike = pd.DataFrame([{"title": "Zq", "genres": "Zzyzx", "tags": "", "text": "plokta", "year": 1901}])
    extra = np.vstack([side.embed(like), side.embed(unlike)])
    assert np.allclose(side.embed(catalog.iloc[[drama[0]]]), side.vectors[drama[0]])  # one vocabulary
    histories = Histories.from_lists([drama, drama], n + 2)
    scores = np.zeros((2, n), dtype=np.float32) + np.linspace(1, 0, n, dtype=np.float32)
    seen = np.zeros((2, n + 2), dtype=bool)
    seen[:, drama] = True
    seen[1, n] = True  # the second user has an event on the first added item already
    merged = side.merge(scores, seen, histories, extra, np.array([3.0, 3.0]))
    assert merged.shape == (2, n + 2)
    order = np.argsort(-np.where(seen[0], -np.inf, merged[0]), kind="stable")
    assert list(order).index(n) < 10 < list(order).index(n + 1)  # like the history: listed; unlike: not
    assert merged[1, n] < merged[0, n]  # seen: placed after the list, never promoted
    off = side.with_calibration(Calibration(side.calibration.cold, side.calibration.slots, 0.0))
    quiet = off.merge(scores, seen, histories, extra)
    np.testing.assert_array_equal(quiet[:, :n], scores)  # weight 0: the graph's list, untouched
    assert (quiet[:, n:] < scores.min()).all()  # and added items after all of it


# -- fitting ----------------------------------------------------------------------------------------------
def test_fit_logistic_recovers_known_coefficients() -> None:
    rng = np.random.default_rng(3)
    x = np.column_stack([np.ones(40_000), rng.normal(size=40_000), rng.uniform(size=40_000)])
    beta = np.array([-2.0, 1.5, -0.7])
    y = rng.uniform(size=len(x)) < 1 / (1 + np.exp(-(x @ beta)))
    fitted = fit_logistic(x, y.astype(float), np.full(3, 1e-6))
    np.testing.assert_allclose(fitted, beta, atol=0.1)


def _validation(n_users: int, n: int, seed: int) -> tuple[ColdItems, Histories, sp.csr_matrix, np.ndarray]:
    """Users who each like one genre: they hit items of it, the cold ones among them too."""
    catalog = _catalog(n, seed)
    rng = np.random.default_rng(seed)
    popularity = np.full(n, 10.0)
    cold = rng.choice(n, size=n // 4, replace=False)
    popularity[cold] = 0.0
    side = ColdItems.from_catalog(catalog, popularity, popularity.copy())
    first = catalog["genres"].str.split("|").str[0].to_numpy()
    lists, truth = [], np.zeros((n_users, n), dtype=bool)
    for u in range(n_users):
        genre = GENRES[u % len(GENRES)]
        mine = [i for i in range(n) if first[i] == genre and popularity[i] > 0]
        history = [int(i) for i in rng.choice(mine, size=min(6, len(mine) // 2), replace=False)]
        lists.append(history)
        rest = [i for i in mine if i not in history]
        truth[u, rng.choice(rest, size=min(3, len(rest)), replace=False)] = True
        hits = [i for i in cold if first[i] == genre]
        truth[u, rng.choice(hits, size=min(2, len(hits)), replace=False)] = True
    return side, Histories.from_lists(lists, n), sp.csr_matrix(truth), popularity


def _collaborative(side: ColdItems, popularity: np.ndarray) -> Callable[[Histories], np.ndarray]:
    """A served scorer that knows the warm items (content similarity) and nothing of the cold ones."""

    def score(histories: Histories) -> np.ndarray:
        scores = side.profiles(histories) @ side.vectors.T
        return np.where(popularity > 0, scores, 0.0).astype(np.float32)

    return score


def test_the_calibration_learns_that_similar_cold_items_hit_and_spends_its_budget() -> None:
    side, histories, truth, popularity = _validation(300, 120, seed=1)
    score = _collaborative(side, popularity)
    cal, report = fit_calibration(side, histories, truth, popularity, popularity, score, 10, 0.05)
    assert cal.active and cal.cold[1] > 0 and cal.slots[1] < 0, report
    assert report["validation_candidate_hits"] >= 300
    tried = report["weights_tried"]
    kept = [t for t in tried if t["weight"] <= cal.weight]
    assert all(t["ndcg_loss"] <= 0.05 for t in kept)  # every weight up to the chosen one kept the budget
    assert tried[-1]["weight"] == cal.weight or tried[-1]["ndcg_loss"] > 0.05
    # promotion lists cold items of the user's genre: new-item NDCG rises above the served list's 0
    assert kept[-1]["new_items_ndcg"] > report["validation_new_items_ndcg@10"] == 0.0
    off, why = fit_calibration(side, histories, truth, popularity, popularity, score, 10, 0.0)
    assert not off.active and "0" in why["reason"]


def test_without_evidence_the_calibration_stays_off() -> None:
    side, histories, truth, popularity = _validation(60, 60, seed=2)
    no_cold = np.full(len(popularity), 3.0)
    score = _collaborative(side, popularity)
    cal, report = fit_calibration(side, histories, truth, no_cold, no_cold, score, 10, 0.05)
    assert not cal.active and "no item without train' interactions" in report["reason"]
    empty = sp.csr_matrix(truth.shape, dtype=np.float32)
    cal, report = fit_calibration(side, histories, empty, popularity, popularity, score, 10, 0.05)
    assert not cal.active and "nothing to calibrate on" in report["reason"]


# -- exposure and persistence -----------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 4), st.integers(0, 6), st.integers(0, 100), st.booleans()),
        max_size=40,
    ),
    cut=st.dictionaries(st.integers(0, 4), st.integers(0, 100), max_size=5),
)
def test_exposure_counts_positives_and_the_low_ratings_before_each_users_next_period(
    rows: list[tuple[int, int, int, bool]], cut: dict[int, int]
) -> None:
    ratings = pd.DataFrame(rows, columns=["user", "item", "timestamp", "positive"]).astype(
        {"user": np.int64, "item": np.int64, "timestamp": np.int64, "positive": bool}
    )
    positives = ratings[ratings["positive"].to_numpy()]
    later = pd.DataFrame({"user": list(cut), "timestamp": list(cut.values())})
    got = period_exposure(7, positives, ratings, [later])
    expected = np.zeros(7)
    for user, item, ts, positive in rows:
        if positive or user not in cut or ts < cut[user]:
            expected[item] += 1
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(
        period_exposure(7, positives, None, [later]), np.bincount(positives["item"], minlength=7)
    )


def test_the_side_scorer_round_trips_and_refuses_a_changed_file(tmp_path: Path) -> None:
    side = _side()
    entry = side.save(tmp_path, {"budget": 0.001})
    assert entry["file"] == COLD_ITEMS_FILE and entry["active"] and entry["cold_catalogue_items"] == 3
    back = ColdItems.load(tmp_path, entry)
    np.testing.assert_array_equal(back.vectors, side.vectors)
    np.testing.assert_array_equal(back.calibration.cold, side.calibration.cold)
    assert back.calibration.weight == side.calibration.weight and back.half_life == side.half_life
    histories = Histories.from_lists([[0, 1, 2]], len(side.popularity))
    seen = histories.to_csr().toarray() > 0
    scores = np.linspace(1, 0, len(side.popularity), dtype=np.float32)[None, :]
    np.testing.assert_array_equal(back.merge(scores, seen, histories), side.merge(scores, seen, histories))
    path = tmp_path / COLD_ITEMS_FILE
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(RuntimeError, match="changed after export"):
        ColdItems.load(tmp_path, entry)
    assert DEPTH >= 100  # the API's largest k is within what the calibration covers
