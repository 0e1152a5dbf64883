"""SASRec: the conformance kit, plus the model's own logic (windows, masking, losses, sequence learning)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch

from fuserec.data.dataset import Dataset
from fuserec.histories import Histories
from fuserec.onnx_model import OnnxRecommender, export_onnx
from fuserec.plugins.sasrec import SASRec, SASRecConfig, _dropout, _SASRecModule, training_windows
from fuserec.testing import AlgorithmTests, planted_dataset

FAST = {
    "max_len": 10,
    "hidden": 16,
    "blocks": 1,
    "heads": 2,
    "dropout": 0.1,
    "lr": 5e-3,
    "batch_size": 32,
    "max_epochs": 15,
    "patience": 4,
    "threads": 1,
    "progress": False,
}


class TestSASRec(AlgorithmTests):
    algorithm = SASRec
    config: ClassVar[dict] = FAST
    bad_configs: ClassVar[list[dict]] = [
        {"max_len": 0},
        {"hidden": 0},
        {"heads": 3},  # does not divide hidden=16
        {"dropout": 1.0},
        {"loss": "hinge"},
        {"horizon": 0},
        {"lr": 0.0},
        {"device": "gpu"},
    ]


def _module(n_items: int = 12, max_len: int = 5, seed: int = 0, **cfg: object) -> _SASRecModule:
    config = SASRecConfig(max_len=max_len, hidden=8, blocks=2, heads=2, **cfg)
    return _SASRecModule.initial(n_items, config, torch.Generator().manual_seed(seed)).eval()


def test_training_windows_shift_inputs_and_crop_to_max_len() -> None:
    # User 0: items 10, 11, 12; user 1: items 13..17. Windows of at most 4 targets, horizon 2.
    indptr = np.array([0, 3, 8])
    items = np.arange(10, 18)
    inputs, targets = training_windows(indptr, np.array([0, 1]), np.array([3, 5]), 4, 2, 99, items)
    # The short user is left-padded; its first target (10) is predicted from the empty context (pad 99).
    assert inputs.tolist() == [[99, 99, 10, 11], [13, 14, 15, 16]]
    assert targets[..., 0].tolist() == [[-1, 10, 11, 12], [14, 15, 16, 17]]
    assert targets[..., 1].tolist() == [[-1, 11, 12, -1], [15, 16, 17, -1]]  # nothing past the last item
    # A window ending early (random crop) may still look ahead past its end, within the user's items.
    _, ahead = training_windows(indptr, np.array([1]), np.array([4]), 2, 3, 99, items)
    assert ahead[0].tolist() == [[15, 16, 17], [16, 17, -1]]


def test_window_keeps_the_last_max_len_real_items_whatever_the_layout() -> None:
    module = _module(max_len=4)
    pad = module.n_items
    history = torch.tensor(
        [
            [1, 2, 3, -1, -1, -1, -1],  # shorter than max_len
            [1, 2, 3, 4, 5, 6, 7],  # longer: keep 4..7
            [-1, -1, -1, -1, -1, -1, -1],  # empty
            [5, -1, 7, -1, 8, -1, -1],  # -1 in the middle is padding too
            [1, 2, 12, 3, -1, -1, -1],  # an id outside the catalog is padding
        ]
    )
    assert module.window(history).tolist() == [
        [pad, 1, 2, 3],
        [4, 5, 6, 7],
        [pad, pad, pad, pad],
        [pad, 5, 7, 8],
        [pad, 1, 2, 3],
    ]
    assert module.window(torch.tensor([[3, 4]])).tolist() == [[pad, pad, 3, 4]]  # L < max_len


def test_scores_depend_only_on_the_last_real_items_not_on_padding_width() -> None:
    module = _module(max_len=4)
    with torch.no_grad():
        long = module(torch.tensor([[9, 8, 1, 2, 3, 4]]))
        last = module(torch.tensor([[1, 2, 3, 4]]))
        short = module(torch.tensor([[2, 3, 4, -1, -1, -1, -1, -1]]))
        short_narrow = module(torch.tensor([[2, 3, 4]]))
        trimmed = module(torch.tensor([[2, 3, 4]]), trim=True)
        empty = module(torch.full((2, 3), -1))
        empty_wide = module(torch.full((1, 9), -1))
    torch.testing.assert_close(long, last)
    torch.testing.assert_close(short, short_narrow)
    torch.testing.assert_close(trimmed, short_narrow, rtol=1e-5, atol=1e-6)  # leading pads change nothing
    assert torch.isfinite(empty).all()
    torch.testing.assert_close(empty[0], empty_wide[0])
    assert not torch.allclose(short, last)  # the oldest item in the window matters


def test_attention_is_causal_and_ignores_pad_keys() -> None:
    module = _module(max_len=6)
    pad = module.n_items
    seq = torch.tensor([[pad, pad, 1, 2, 3, 4]])
    changed = torch.tensor([[pad, pad, 1, 2, 9, 4]])
    with torch.no_grad():
        a, b = module.encode(seq), module.encode(changed)
    torch.testing.assert_close(a[:, :4], b[:, :4])  # positions before the change cannot see it
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    # Every pad position computes the same empty context, wherever it sits.
    torch.testing.assert_close(a[0, 0], a[0, 1])
    with torch.no_grad():
        empty = module.encode(torch.full((1, 6), pad))
    torch.testing.assert_close(empty[0, -1], a[0, 0])


def test_order_matters_unlike_a_bag_of_items() -> None:
    module = _module()
    with torch.no_grad():
        forward = module(torch.tensor([[1, 2, 3]]))
        backward = module(torch.tensor([[3, 2, 1]]))
    assert not torch.allclose(forward, backward)


def test_losses_agree_with_direct_computations() -> None:
    module = _module(n_items=7)
    hidden = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        module.bias.copy_(torch.linspace(-1.0, 1.0, 7))
    targets = torch.tensor([[0, 3], [6, -1], [2, 2], [5, -1], [1, 4]])
    logits = hidden @ module.items[:7].T + module.bias
    logp = torch.log_softmax(logits, dim=1)
    ok = targets >= 0
    want = -(logp.gather(1, targets.clamp(min=0)) * ok).sum() / ok.sum()
    got = module.loss(hidden, targets, "softmax", None)
    torch.testing.assert_close(got, want)
    # Sampled softmax over every item as a negative (the target's own copy masked) is the full softmax.
    every = torch.arange(7)
    torch.testing.assert_close(module.loss(hidden, targets, "sampled_softmax", every), want)
    # BCE: the target against the mean of the negatives.
    negatives = torch.tensor([1, 5])
    pos = logits.gather(1, targets.clamp(min=0))
    neg = torch.nn.functional.logsigmoid(-logits[:, negatives]).mean(1, keepdim=True)
    want_bce = ((-torch.nn.functional.logsigmoid(pos) - neg) * ok).sum() / ok.sum()
    torch.testing.assert_close(module.loss(hidden, targets, "bce", negatives), want_bce)


def test_dropout_is_seeded_and_off_without_a_generator() -> None:
    x = torch.ones(200, 50)
    a = _dropout(x, 0.3, torch.Generator().manual_seed(3))
    b = _dropout(x, 0.3, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert 0.6 < float((a > 0).float().mean()) < 0.8
    torch.testing.assert_close(a.mean(), torch.tensor(1.0), atol=0.05, rtol=0.0)  # inverted: mean kept
    assert _dropout(x, 0.3, None) is x


def _cyclic_dataset(n_items: int = 30, n_users: int = 120, length: int = 8, seed: int = 0) -> Dataset:
    """Each user watches consecutive items (i, i+1, i+2, ... mod n_items) from a random start."""
    rng = np.random.default_rng(seed)
    rows = [
        (u, int((start + t) % n_items), 5.0, 1_600_000_000 + 3600 * t)
        for u, start in enumerate(rng.integers(0, n_items, n_users))
        for t in range(length)
    ]
    inter = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    inter["rating"] = inter["rating"].astype(np.float32)
    items = pd.DataFrame({"item": np.arange(n_items), "item_id": np.arange(n_items) + 1})
    users = pd.DataFrame({"user": np.arange(n_users), "user_id": np.arange(n_users) + 1})
    return Dataset(inter, items, users)


@pytest.mark.parametrize("loss", ["softmax", "sampled_softmax", "bce"])
def test_learns_what_comes_next_in_a_sequence(loss: str) -> None:
    data = _cyclic_dataset()
    config = {
        **FAST,
        "max_epochs": 25,
        "early_stopping": False,
        "dropout": 0.0,
        "loss": loss,
        "negatives": 16,
        "horizon": 1,  # next item only: with horizon > 1 the next few items share the mass
    }
    algo = SASRec(config).fit(data)
    log = [r["loss"] for r in algo.training_log_]
    assert log[-1] < log[0]
    # Histories no user had: the next unseen item must top the ranking; reversed, it must not.
    hist = Histories.from_lists([[s, s + 1, s + 2] for s in (0, 10, 20)] + [[22, 21, 20]], 30)
    scores = np.where(hist.to_csr().toarray() > 0, -np.inf, algo.score(hist))  # seen items excluded
    assert scores[:3].argmax(axis=1).tolist() == [3, 13, 23]
    if loss == "softmax":  # with full competition, order (not just the set) decides what comes next
        assert scores[3].argmax() != 23


def test_training_improves_validation_and_refits_best_epoch() -> None:
    algo = SASRec(FAST).fit(planted_dataset())
    val = [r for r in algo.training_log_ if r["phase"] == "validation"]
    fit = [r for r in algo.training_log_ if r["phase"] == "fit"]
    best = max(val, key=lambda r: r["val_ndcg@10"])
    assert best["val_ndcg@10"] > val[0]["val_ndcg@10"]
    assert len(fit) == best["epoch"]


def test_explain_and_representations_are_consistent_with_scores() -> None:
    data = _cyclic_dataset()
    algo = SASRec({**FAST, "max_epochs": 3, "early_stopping": False}).fit(data)
    history = np.array([4, 5, 6])
    out = algo.explain(history, 7)
    full = algo.score(Histories.from_lists([history.tolist()], 30))[0]
    assert out["score"] == pytest.approx(float(full[7]), rel=1e-5, abs=1e-5)
    deltas = dict(out["contributions"])
    without = algo.score(Histories.from_lists([[4, 6]], 30))[0, 7]
    assert deltas[5] == pytest.approx(float(full[7] - without), rel=1e-4, abs=1e-5)
    long = np.arange(12)  # longer than max_len=10: the two oldest items cannot matter
    assert sorted(dict(algo.explain(long, 12)["contributions"])) == list(range(2, 12))
    context = algo.user_representation(Histories.from_lists([history.tolist()], 30))
    items = algo.item_representation()
    assert context.shape == (1, FAST["hidden"]) and items.shape == (30, FAST["hidden"])
    np.testing.assert_allclose(context[0] @ items.T + algo.state_["bias"], full, rtol=1e-4, atol=1e-4)


# -- the exported graph: attention, causal and pad masks, and the window scatter under onnxruntime --------
@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[SASRec, OnnxRecommender]:
    # Two blocks of two heads, so stacked masked attention is exported, not only one layer of it.
    algo = SASRec({**FAST, "blocks": 2, "max_epochs": 2, "early_stopping": False}).fit(planted_dataset())
    path = export_onnx(algo, tmp_path_factory.mktemp("sasrec") / "model.onnx", k=10)
    return algo, OnnxRecommender(path)


def _padded(rows: list[list[int]], width: int) -> np.ndarray:
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        out[r, : len(row)] = row
    return out


def test_onnx_attention_and_masking_match_python(exported: tuple[SASRec, OnnxRecommender]) -> None:
    algo, session = exported
    n = algo.n_items_
    raw = [
        list(range(14)),  # longer than max_len=10: only the last 10 count
        [5, -1, 7, -1, 8],  # -1 in the middle is padding
        [3, 4],  # short, right-padded to the batch width
        [],  # empty: the learned empty context
        [1, 2, n, 3, n + 7],  # ids outside the catalog are padding
        [40, 41, 42, 43, 44, 45, 46, 47, 48, 49],  # exactly max_len
    ]
    padded = _padded(raw, 16)
    scores, _, _ = session.run(padded)
    real = [[i for i in row if 0 <= i < n] for row in raw]
    want = algo.score(Histories.from_lists(real, n))
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        eager = algo.to_torch()(torch.from_numpy(np.where(padded < n, padded, -1))).numpy()
    np.testing.assert_allclose(scores, eager, rtol=1e-4, atol=1e-4)


def test_onnx_padding_width_does_not_change_scores(exported: tuple[SASRec, OnnxRecommender]) -> None:
    _, session = exported
    history = [2, 3, 4]
    narrow = session.run(_padded([history], 3))[0]
    for width in (4, 10, 11, 25):
        np.testing.assert_allclose(session.run(_padded([history], width))[0], narrow, rtol=1e-5, atol=1e-5)
    # Items older than the window cannot matter, however long the history.
    last = list(range(20, 30))
    longer = session.run(_padded([[60, 61, 62, *last], last], 13))[0]
    np.testing.assert_allclose(longer[0], longer[1], rtol=1e-5, atol=1e-5)


def test_onnx_scores_depend_on_the_order_of_the_history(exported: tuple[SASRec, OnnxRecommender]) -> None:
    algo, session = exported
    history = [10, 21, 32, 43, 54]
    rows = [history, history[::-1], [21, 10, 32, 43, 54]]
    scores = session.run(_padded(rows, 5))[0]
    assert np.abs(scores[0] - scores[1]).max() > 1e-3  # same set, reversed order: a sequence, not a bag
    assert np.abs(scores[0] - scores[2]).max() > 1e-3  # even swapping the two oldest items matters
    np.testing.assert_allclose(scores, algo.score(Histories.from_lists(rows, algo.n_items_)), atol=1e-4)
