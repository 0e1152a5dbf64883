import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from fuserec.config import CleanConfig
from fuserec.stages.clean import build_dataset, kcore

rows = st.lists(
    st.tuples(
        st.integers(0, 6),
        st.integers(0, 9),
        st.sampled_from([1.0, 2.0, 3.0, 4.0, 5.0, np.nan]),
        st.integers(0, 50),
    ),
    min_size=1,
    max_size=60,
)


def _frames(data: list[tuple]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    inter = pd.DataFrame(data, columns=["user_id", "item_id", "rating", "timestamp"])
    items = pd.DataFrame({"item_id": np.arange(12), "title": [f"t{i}" for i in range(12)]})
    users = pd.DataFrame({"user_id": np.arange(8)})
    return inter, items, users


@settings(max_examples=60, deadline=None)
@given(rows, st.sampled_from([None, 3.0, 4.0]))
def test_clean_keeps_every_row_and_earliest_positive(data: list[tuple], threshold: float | None) -> None:
    inter, items, users = _frames(data)
    dataset, ratings, counts = build_dataset(inter, items, users, CleanConfig(implicit_threshold=threshold))
    # Nothing is lost: every distinct (user, item) pair is in ratings, flagged positive or not.
    assert len(ratings) == inter[["user_id", "item_id"]].drop_duplicates().shape[0]
    assert counts["duplicates_dropped"] + len(ratings) == len(inter)
    pos = dataset.interactions
    assert not pos.duplicated(["user", "item"]).any()
    assert len(pos) == int(ratings["positive"].sum())
    # Ids map to contiguous indices over the whole catalog; index = position of the sorted raw id.
    assert dataset.items["item"].tolist() == list(range(12))
    assert (dataset.items["item_id"].to_numpy() == np.arange(12)).all()
    first = inter.sort_values("timestamp", kind="stable").drop_duplicates(["user_id", "item_id"])
    for row in pos.itertuples():
        orig = first[(first.user_id == row.user) & (first.item_id == row.item)].iloc[0]
        assert row.timestamp == orig.timestamp
        if threshold is not None and not np.isnan(orig.rating):
            assert orig.rating >= threshold


@settings(max_examples=60, deadline=None)
@given(rows, st.integers(1, 4))
def test_kcore_leaves_only_dense_users_and_items(data: list[tuple], k: int) -> None:
    inter = pd.DataFrame(data, columns=["user_id", "item_id", "rating", "timestamp"])
    inter = inter.drop_duplicates(["user_id", "item_id"])
    core = kcore(inter, k)
    if len(core):
        assert core["user_id"].value_counts().min() >= k
        assert core["item_id"].value_counts().min() >= k
    # Maximality: the k-core of the k-core is itself.
    assert len(kcore(core, k)) == len(core)
