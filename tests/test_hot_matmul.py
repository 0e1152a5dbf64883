"""``fuserec.api.hot_matmul``: the dense product's result, reading only the rows a batch uses, in torch and
exported to onnxruntime (one history, a batch, and a batch of empty histories)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fuserec.api import hot_matmul, multi_hot

N_ITEMS, DIM = 40, 7


@st.composite
def histories(draw: st.DrawFn) -> np.ndarray:
    batch = draw(st.integers(1, 6))
    length = draw(st.integers(1, 12))
    ids = st.integers(-1, N_ITEMS - 1)  # -1 is padding; repeats allowed
    return np.asarray(
        draw(st.lists(st.lists(ids, min_size=length, max_size=length), min_size=batch, max_size=batch))
    )


WEIGHTS = torch.from_numpy(np.random.default_rng(0).normal(size=(N_ITEMS, DIM)).astype(np.float32))


@settings(max_examples=60, deadline=None)
@given(histories())
def test_equals_the_dense_product(history: np.ndarray) -> None:
    hot = multi_hot(torch.from_numpy(history), N_ITEMS)
    got = hot_matmul(hot, WEIGHTS)
    assert got.shape == (len(history), DIM)
    torch.testing.assert_close(got, hot @ WEIGHTS, rtol=1e-5, atol=1e-5)


def test_weighted_rows_and_no_rows_at_all() -> None:
    hot = torch.zeros(3, N_ITEMS)
    assert torch.equal(hot_matmul(hot, WEIGHTS), torch.zeros(3, DIM))  # nothing used: zeros, not an error
    hot[1, 4], hot[2, 9] = 0.5, -2.0  # any non-zero value counts, as in the product
    torch.testing.assert_close(hot_matmul(hot, WEIGHTS), hot @ WEIGHTS)


class _Module(torch.nn.Module):
    weights: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weights", WEIGHTS)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return hot_matmul(multi_hot(history, N_ITEMS), self.weights)


@pytest.mark.parametrize(
    "history",
    [[[3, 5, 5, -1]], [[1, 2, -1, -1], [2, 30, 31, 39], [-1, -1, -1, -1]], [[-1, -1], [-1, -1]]],
    ids=["one history", "a batch", "empty histories"],
)
def test_exported_graph_equals_torch(history: list[list[int]], tmp_path: Path) -> None:
    example = torch.tensor([[0, 1, -1], [2, -1, -1]])
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    program = torch.onnx.export(
        _Module(), (example,), dynamo=True, dynamic_shapes={"history": {0: batch, 1: length}}
    )
    program.save(str(tmp_path / "m.onnx"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    padded = np.asarray(history, dtype=np.int64)
    (got,) = session.run(None, {session.get_inputs()[0].name: padded})
    want = (multi_hot(torch.from_numpy(padded), N_ITEMS) @ WEIGHTS).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
