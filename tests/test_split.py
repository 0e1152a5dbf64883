import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from fuserec.config import SplitConfig
from fuserec.splitting import split_all, split_frame


def _frame(lengths: list[int], seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for u, n in enumerate(lengths):
        items = rng.choice(100, size=n, replace=False)
        times = rng.integers(0, 5, size=n)  # many equal timestamps: order falls back to item index
        rows += [(u, int(i), 5.0, int(t)) for i, t in zip(items, times, strict=True)]
    return pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=12))
def test_temporal_user_split_follows_protocol(lengths: list[int]) -> None:
    frame = _frame(lengths)
    train, test = split_frame(frame, SplitConfig())
    assert len(train) + len(test) == len(frame)
    for u, n in enumerate(lengths):
        expected = int(np.floor(0.2 * n + 0.5)) if n >= 5 else 0
        user_test = test[test["user"] == u]
        assert len(user_test) == expected
        user_train = train[train["user"] == u]
        if expected and len(user_train):
            # Every test item comes after every train item in (timestamp, item) order.
            last_train = max(zip(user_train["timestamp"], user_train["item"], strict=True))
            first_test = min(zip(user_test["timestamp"], user_test["item"], strict=True))
            assert last_train < first_test


def test_leave_last_out_and_global_time() -> None:
    frame = _frame([6, 7, 3])
    _, test = split_frame(frame, SplitConfig(method="leave_last_out"))
    assert test.groupby("user").size().to_dict() == {0: 1, 1: 1}
    train, test = split_frame(frame, SplitConfig(method="global_time", test_fraction=0.3))
    assert train["timestamp"].max() < test["timestamp"].min()


def test_validation_carve_is_the_same_split_of_train() -> None:
    frame = _frame([10, 20, 5, 4])
    parts = split_all(frame, SplitConfig())
    assert len(parts["train_inner"]) + len(parts["valid"]) == len(parts["train"])
    _, valid = split_frame(parts["train"], SplitConfig())
    pd.testing.assert_frame_equal(valid, parts["valid"])
