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
