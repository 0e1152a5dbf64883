import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuserec.histories import Histories

lists = st.lists(st.lists(st.integers(0, 19), max_size=12), min_size=1, max_size=8)


@given(lists, st.integers(1, 15))
def test_padded_keeps_most_recent_in_order(histories: list[list[int]], max_len: int) -> None:
    h = Histories.from_lists(histories, 20)
    padded = h.to_padded(max_len)
    assert padded.shape[0] == len(histories) and padded.shape[1] >= 1
    for row, items in zip(padded, histories, strict=True):
        kept = row[row >= 0].tolist()
        assert kept == items[len(items) - len(kept) :]
        assert len(kept) == min(len(items), max_len)


@given(lists)
def test_csr_is_binary_and_select_roundtrips(histories: list[list[int]]) -> None:
    h = Histories.from_lists(histories, 20)
    dense = h.to_csr().toarray()
    for row, items in zip(dense, histories, strict=True):
        assert set(np.flatnonzero(row)) == set(items)
        assert set(np.unique(row)) <= {0.0, 1.0}
    order = list(range(len(histories)))[::-1]
    back = h.select(order)
    assert [back.user(i).tolist() for i in range(len(order))] == [histories[i] for i in order]


def test_out_of_catalog_items_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        Histories.from_lists([[1, 5]], 5)


@given(lists, st.data())
def test_latest_keeps_each_users_most_recent_items(histories: list[list[int]], data: st.DataObject) -> None:
    stamps = [[10 * j for j in range(len(items))] for items in histories]
    h = Histories.from_lists(histories, 20, stamps)
    keep = data.draw(st.lists(st.integers(-1, 15), min_size=len(histories), max_size=len(histories)))
    short = h.latest(keep)
    assert len(short) == len(histories)
    for i, (items, k) in enumerate(zip(histories, keep, strict=True)):
        n = min(max(k, 0), len(items))
        assert short.user(i).tolist() == items[len(items) - n :]
        assert short.timestamps is not None
        assert short.timestamps[short.indptr[i] : short.indptr[i + 1]].tolist() == stamps[i][len(items) - n :]


def test_latest_refuses_a_count_per_other_batch() -> None:
    with pytest.raises(ValueError, match="one count per history"):
        Histories.from_lists([[1, 2], [3]], 5).latest([1])


@given(lists, lists)
def test_concat_is_the_batches_in_order(first: list[list[int]], second: list[list[int]]) -> None:
    a, b = Histories.from_lists(first, 20, [[1] * len(x) for x in first]), Histories.from_lists(second, 20)
    both = Histories.concat([a, b])
    assert [both.user(i).tolist() for i in range(len(both))] == first + second
    assert both.timestamps is None  # b has none: the field is dropped, not padded with made-up times
    assert Histories.concat([a, a]).timestamps is not None
