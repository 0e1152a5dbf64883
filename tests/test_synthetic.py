"""The synthetic generator: exact, seeded, and carrying the structure models are meant to find."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuserec.config import SyntheticConfig
from fuserec.data import synthetic
from fuserec.data.raw import LINE_COL, SOURCE_COL, RawSource
from fuserec.data.synthetic import DAY, GENRES, START, generate


@pytest.fixture(scope="module")
def medium() -> RawSource:
    return generate(SyntheticConfig(n_interactions=100_000, seed=7))


def _first_genre(raw: RawSource) -> np.ndarray:
    """Each interaction's item's first genre."""
    first = raw.items["genres"].str.split("|").str[0].to_numpy()
    return first[raw.interactions["item_id"].to_numpy()]


def _favourite(users: np.ndarray, genre: np.ndarray) -> pd.DataFrame:
    """Per user: the most frequent genre and the share of the history it covers."""
    pairs = pd.DataFrame({"user": users, "genre": genre}).groupby(["user", "genre"]).size()
    best = pairs.groupby(level="user").idxmax()
    share = pairs.groupby(level="user").max() / pairs.groupby(level="user").sum()
    return pd.DataFrame({"genre": [g for _, g in best], "share": share})


def _generate_capturing_release(cfg: SyntheticConfig, monkeypatch: pytest.MonkeyPatch):
    """generate(cfg) plus each item's release day, which the items table only shows as a year."""
    seen: dict[str, np.ndarray] = {}
    make_items = synthetic._make_items

    def capture(*args, **kwargs):
        out = make_items(*args, **kwargs)
        seen["release_day"] = out[2]
        return out

    monkeypatch.setattr(synthetic, "_make_items", capture)
    return generate(cfg), seen["release_day"]


def _check_invariants(raw: RawSource, cfg: SyntheticConfig, release_day: np.ndarray) -> None:
    inter, items, users = raw.interactions, raw.items, raw.users
    assert len(inter) == cfg.n_interactions
    assert list(inter.columns) == ["user_id", "item_id", "rating", "timestamp", SOURCE_COL, LINE_COL]
    assert list(items.columns) == ["item_id", "title", "genres", "tags", "text", "year", SOURCE_COL, LINE_COL]
    assert list(users.columns) == ["user_id", "age", "gender", "occupation", SOURCE_COL, LINE_COL]
    if cfg.n_users is not None:
        assert len(users) == cfg.n_users
    if cfg.n_items is not None:
        assert len(items) == cfg.n_items
    assert not inter.duplicated(["user_id", "item_id"]).any()
    assert inter["rating"].between(1, 5).all()
    assert pd.api.types.is_integer_dtype(inter["rating"])
    assert items["item_id"].tolist() == list(range(len(items)))
    assert users["user_id"].tolist() == list(range(len(users)))
    assert inter["user_id"].between(0, len(users) - 1).all()
    assert inter["item_id"].between(0, len(items) - 1).all()
    ts = inter["timestamp"].to_numpy()
    assert (ts >= START + release_day[inter["item_id"].to_numpy()] * DAY).all()  # never before release
    assert ts.min() >= START and ts.max() <= START + synthetic.SPAN
    assert (inter.groupby("user_id")["timestamp"].diff().dropna() >= 0).all()  # histories in time order
    for frame in (inter, items, users):
        assert (frame[SOURCE_COL] == "synthetic").all()
        assert frame[LINE_COL].tolist() == list(range(1, len(frame) + 1))
    assert items["genres"].str.split("|").explode().isin(GENRES).all()


def test_same_config_same_frames_other_seed_other_frames() -> None:
    cfg = SyntheticConfig(n_interactions=5_000, seed=3)
    a, b = generate(cfg), generate(cfg)
    for name in ("interactions", "items", "users"):
        pd.testing.assert_frame_equal(a.table(name), b.table(name))
    c = generate(cfg.model_copy(update={"seed": 4}))
    assert not a.interactions.equals(c.interactions)


def test_default_sizes_are_derived_from_the_interaction_count(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = SyntheticConfig()  # 20_000 interactions
    raw, release_day = _generate_capturing_release(cfg, monkeypatch)
    assert (len(raw.interactions), len(raw.users), len(raw.items)) == (20_000, 400, 666)
    _check_invariants(raw, cfg, release_day)
    small = generate(SyntheticConfig(n_interactions=1_000))
    assert (len(small.users), len(small.items)) == (50, 50)  # clamped


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1_000, 4_000),
    n_users=st.one_of(st.none(), st.integers(10, 80)),
    n_items=st.one_of(st.none(), st.integers(10, 300)),
    n_clusters=st.integers(1, 20),
    seed=st.integers(0, 2**32),
)
def test_invariants_hold_for_any_small_config(
    monkeypatch: pytest.MonkeyPatch,
    n: int,
    n_users: int | None,
    n_items: int | None,
    n_clusters: int,
    seed: int,
) -> None:
    cfg = SyntheticConfig(
        n_interactions=n, n_users=n_users, n_items=n_items, n_clusters=n_clusters, seed=seed
    )
    users = n_users if n_users is not None else max(50, n // 50)
    items = n_items if n_items is not None else max(50, n // 30)
    if n > users * items or n_clusters > items:
        with pytest.raises(ValueError, match="synthetic"):
            generate(cfg)
        return
    raw, release_day = _generate_capturing_release(cfg, monkeypatch)
    _check_invariants(raw, cfg, release_day)


def test_dense_grid_is_filled_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = SyntheticConfig(n_interactions=1_000, n_users=10, n_items=100, n_clusters=3)
    raw, release_day = _generate_capturing_release(cfg, monkeypatch)
    _check_invariants(raw, cfg, release_day)
    assert raw.interactions.groupby("user_id").size().eq(100).all()  # every pair, once


def test_impossible_size_is_refused() -> None:
    with pytest.raises(ValueError, match="n_users"):
        generate(SyntheticConfig(n_interactions=2_000, n_users=10, n_items=100))


def test_popularity_is_heavy_tailed(medium: RawSource) -> None:
    counts = np.sort(np.bincount(medium.interactions["item_id"], minlength=len(medium.items)))[::-1]
    top = counts[: len(counts) // 10].sum() / counts.sum()
    assert top > 0.4, top
    activity = medium.interactions.groupby("user_id").size()
    assert activity.max() > 8 * activity.median()  # heavy-tailed users too


def test_users_stick_to_few_genres(medium: RawSource) -> None:
    """A user's most frequent genre covers far more of the history than if items were random."""
    genre = _first_genre(medium)
    users = medium.interactions["user_id"].to_numpy()
    shuffled = np.random.default_rng(0).permutation(genre)
    real, chance = _favourite(users, genre)["share"].mean(), _favourite(users, shuffled)["share"].mean()
    assert real > chance + 0.1, (real, chance)


def test_ratings_are_higher_on_taste(medium: RawSource) -> None:
    inter = medium.interactions.assign(genre=_first_genre(medium))
    favourite = _favourite(inter["user_id"].to_numpy(), inter["genre"].to_numpy())["genre"]
    on_taste = inter["genre"].to_numpy() == favourite.loc[inter["user_id"]].to_numpy()
    ratings = inter["rating"].to_numpy()
    assert ratings[on_taste].mean() > ratings[~on_taste].mean() + 0.2
    assert set(np.unique(ratings)) == {1, 2, 3, 4, 5}


def test_taste_drifts_over_time(medium: RawSource) -> None:
    """The genre mix of the first quarter of the log differs from the last one beyond chance."""
    genre = _first_genre(medium)
    ts = medium.interactions["timestamp"].to_numpy()
    early, late = genre[ts < np.quantile(ts, 0.25)], genre[ts > np.quantile(ts, 0.75)]

    def distance(a: np.ndarray, b: np.ndarray) -> float:
        pa, pb = pd.Series(a).value_counts(normalize=True), pd.Series(b).value_counts(normalize=True)
        return 0.5 * float(pa.sub(pb, fill_value=0).abs().sum())

    mixed = np.random.default_rng(0).permutation(genre)
    assert distance(early, late) > 3 * distance(mixed[: len(early)], mixed[-len(late) :])


def test_user_attributes_follow_taste(medium: RawSource) -> None:
    genre = _first_genre(medium)
    favourite = _favourite(medium.interactions["user_id"].to_numpy(), genre)["genre"]
    users = medium.users.set_index("user_id").assign(favourite=favourite)
    spread = users.groupby("favourite")["age"].mean().std()
    shuffled = users.assign(favourite=np.random.default_rng(0).permutation(users["favourite"].to_numpy()))
    assert spread > 2 * shuffled.groupby("favourite")["age"].mean().std()
    assert users["gender"].isin(["M", "F"]).all()
    assert users["age"].between(10, 80).all()


def test_items_carry_content(medium: RawSource) -> None:
    items = medium.items
    assert (items["title"].str.len() > 0).all()
    assert (items["text"].str.len() > 20).all()
    assert items["title"].str.extract(r"\((\d{4})\)$", expand=False).astype(int).eq(items["year"]).all()
    popular = np.bincount(medium.interactions["item_id"], minlength=len(items)).argsort()[::-1][:50]
    assert (items["tags"].iloc[popular] != "").mean() > 0.8  # popular items get tagged, as in MovieLens
    assert items["year"].between(1900, 2023).all()


def test_a_million_interactions_is_quick() -> None:
    start = time.perf_counter()
    raw = generate(SyntheticConfig(n_interactions=1_000_000))
    print(f"generated 10^6 interactions in {time.perf_counter() - start:.2f}s")
    assert len(raw.interactions) == 1_000_000
