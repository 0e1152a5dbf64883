"""Fusers: the shared normalisations, the built-in fusers through the kit, and the fuse stage's rules."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fuserec.fusion import by_users, masked_minmax, masked_ranks, masked_zscore
from fuserec.metrics import top_k
from fuserec.plugins.fusers.voting import RRF, Borda
from fuserec.plugins.fusers.weighted import Weighted
from fuserec.registry import FUSERS_GROUP, available
from fuserec.testing import FuserTests
from fuserec.testing.fusers import default_case


class TestWeighted(FuserTests):
    fuser = Weighted
    config: ClassVar[dict] = {"n_trials": 15}
    bad_configs: ClassVar[list[dict]] = [{"n_trials": 0}, {"normalization": "softmax"}]


class TestBorda(FuserTests):
    fuser = Borda
    bad_configs: ClassVar[list[dict]] = [{"depth": 0}]


class TestRRF(FuserTests):
    fuser = RRF
    bad_configs: ClassVar[list[dict]] = [{"k": 0.0}]


def test_builtin_fusers_are_entry_point_plugins() -> None:
    assert {"weighted", "borda", "rrf", "stacking"} <= set(available(FUSERS_GROUP))


def test_ranks_follow_the_protocol_order_among_unseen_items() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (2, 3, 9), generator=gen).to(torch.float32)  # many ties
    seen = torch.zeros(3, 9, dtype=torch.bool)
    seen[0, [1, 4]] = True
    ranks = masked_ranks(scores, seen)
    for m in range(2):
        for u in range(3):
            unseen = (~seen[u]).nonzero().flatten().numpy()
            order = top_k(scores[m, u].numpy()[None], 9, exclude=None)[0]
            order = [i for i in order if i in set(unseen)]  # the protocol ranking of unseen items
            assert [int(ranks[m, u, i]) for i in order] == list(range(len(order)))
            assert (ranks[m, u, seen[u]] == 9).all()


def test_normalisations_ignore_seen_items() -> None:
    scores = torch.tensor([[[5.0, 100.0, 1.0, 3.0]]])
    seen = torch.tensor([[False, True, False, False]])
    mm = masked_minmax(scores, seen)[0, 0]
    assert mm.tolist() == [1.0, 0.0, 0.0, 0.5]  # the seen item's 100 does not squash the scale
    z = masked_zscore(scores, seen)[0, 0]
    assert float(z[1]) == 0.0 and abs(float(z[[0, 2, 3]].mean())) < 1e-6


def test_weighted_never_loses_to_a_component_on_validation() -> None:
    case = default_case()
    fuser = Weighted({"n_trials": 10}).fit(case.inner_models, case.inner.fit, case.inner.truth)
    from fuserec.fusion import ValidationScores

    val = ValidationScores(fuser, case.inner.fit, case.inner.truth)
    singles = [val.ndcg(val.scores[m]) for m in range(len(fuser.names_))]
    assert fuser.validation_ndcg_ >= max(singles) - 1e-9
    assert set(fuser.weights) == {"popularity", "itemknn", "content"}


def test_a_fuser_needs_components() -> None:
    case = default_case()
    with pytest.raises(ValueError, match="at least one"):
        RRF().fit({}, case.inner.fit, case.inner.truth)
    assert np.isfinite(RRF().fit(case.inner_models, case.inner.fit, case.inner.truth).score(case.probe)).all()


def test_zscore_of_a_constant_row_exports_without_nan(tmp_path) -> None:
    import onnxruntime as ort

    class Z(torch.nn.Module):
        def forward(self, scores: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
            return masked_zscore(scores, seen)

    scores = torch.ones(1, 2, 5)  # constant: variance 0, as item-kNN on an empty history
    seen = torch.zeros(2, 5, dtype=torch.bool)
    program = torch.onnx.export(Z(), (scores, seen), dynamo=True)
    program.save(str(tmp_path / "z.onnx"))
    session = ort.InferenceSession(str(tmp_path / "z.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    out = session.run(None, dict(zip(names, [scores.numpy(), seen.numpy()], strict=True)))[0]
    assert np.isfinite(out).all() and not out.any()


def test_shared_scores_score_each_batch_once_and_cannot_be_edited() -> None:
    from fuserec.fusion import SharedScores
    from fuserec.histories import Histories

    class Counting:
        calls = 0
        name = "counting"

        def score(self, histories: Histories) -> np.ndarray:
            Counting.calls += 1
            return np.arange(len(histories) * 4, dtype=np.float32).reshape(len(histories), 4)

    shared = SharedScores(Counting())  # type: ignore[arg-type]
    batch = Histories.from_lists([[0], [1, 2]], 4)
    first = shared.score(batch)
    assert shared.score(batch) is first and Counting.calls == 1 and shared.name == "counting"
    with pytest.raises(ValueError, match="read-only"):
        first[0, 0] = 1.0
    shared.score(Histories.from_lists([[0], [1, 2]], 4))  # an equal but new batch is scored again
    assert Counting.calls == 2


@pytest.mark.parametrize("depth", [1, 3, 5, 8])
def test_depth_limited_ranks_equal_the_full_sort_with_ties(depth: int) -> None:
    gen = torch.Generator().manual_seed(depth)
    for values in (3, 50):  # heavy ties at the cut, and few
        scores = torch.randint(0, values, (3, 6, 9), generator=gen).to(torch.float32)
        seen = torch.rand(6, 9, generator=gen) < 0.4
        seen[0] = True  # a history that has seen everything
        seen[1, :7] = True  # fewer unseen items than the depth
        full = masked_ranks(scores, seen)  # a stable sort of every item
        expected = full.clone()
        expected[(full >= depth) & ~seen.unsqueeze(0)] = depth  # unseen items below the depth share it
        assert torch.equal(masked_ranks(scores, seen, depth), expected)


@pytest.mark.parametrize("transform", [masked_minmax, masked_zscore])
def test_normalising_a_slice_of_users_at_a_time_equals_the_whole(transform) -> None:
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 11, 7, generator=gen)
    seen = torch.rand(11, 7, generator=gen) < 0.3
    seen[4] = True  # a user who saw everything
    whole = transform(scores, seen).numpy()
    np.testing.assert_allclose(by_users(transform, scores, seen, chunk=4).numpy(), whole, rtol=1e-6)
    by_users(transform, scores, seen, chunk=4, out=scores)  # in place: each slice read before written
    np.testing.assert_allclose(scores.numpy(), whole, rtol=1e-6)


def test_cold_copies_are_warm_users_cut_to_their_latest_items() -> None:
    from fuserec.fusion import ValidationScores

    case = default_case()
    fuser = Borda().fit(case.inner_models, case.inner.fit, case.inner.truth)
    plain = ValidationScores(fuser, case.inner.fit, case.inner.truth)
    val = ValidationScores(fuser, case.inner.fit, case.inner.truth, cold_copies=0.5)
    n = plain.n_real
    assert val.n_real == n and torch.equal(val.scores[:, :n], plain.scores)  # the real rows are unchanged
    copies = np.flatnonzero(val.simulated)
    assert len(copies) == round(0.5 * n) and len(set(val.origin[copies])) == len(copies)
    whole = case.inner.fit.histories()
    for row in copies:
        user, items = val.users[row], val.histories.user(row)
        assert user == val.users[val.origin[row]]
        assert 1 <= len(items) <= 5 < whole.lengths[user]
        assert items.tolist() == whole.user(user)[-len(items) :].tolist()  # the latest items, in order
        assert set(np.flatnonzero(val.seen[row].numpy())) == set(items.tolist())
        assert set(np.flatnonzero(val.exclude[row].numpy())) == set(whole.user(user).tolist())
        assert (val.truth[row] != val.truth[val.origin[row]]).nnz == 0
    assert (val.exclude_csr != sp.csr_matrix(val.exclude.numpy())).nnz == 0
    # A fused score that puts every excluded item first ranks like one that does not: they are excluded.
    fused = val.scores[0].clone()
    boosted = fused + 1e6 * val.exclude.to(torch.float32)
    assert val.ndcg(boosted) == pytest.approx(val.ndcg(fused))
    bounded = ValidationScores(fuser, case.inner.fit, case.inner.truth, max_users=30, cold_copies=0.5)
    assert len(bounded.users) == 30 and int(bounded.simulated.sum()) == 10
    every = ValidationScores(fuser, case.inner.fit, case.inner.truth, cold_copies=1.0)
    warm = int((whole.select(every.users[: every.n_real]).lengths > 5).sum())
    copied = every.origin[every.simulated]
    assert len(copied) == warm == len(set(copied.tolist()))  # every warm user copied once, none twice


def test_early_stopping_holds_out_a_user_with_its_cold_copies_and_judges_real_users() -> None:
    from fuserec.listwise import fit_listwise
    from fuserec.plugins.fusers.gating import GatingConfig

    origin = np.concatenate([np.arange(40), np.arange(0, 40, 2)])  # 40 users, 20 of them copied
    learned: set[int] = set()

    def build() -> torch.nn.Module:
        return torch.nn.Linear(1, 1)

    def loss(module: torch.nn.Module, rows: np.ndarray) -> torch.Tensor:
        learned.update(rows.tolist())
        return module.weight.square().sum()

    cfg = GatingConfig(steps=30, batch_users=8, refit=False, eval_every=5, patience=100)
    _, record = fit_listwise(build, loss, lambda module, rows: 0.0, origin, cfg)
    hold = record["holdout_rows"]
    assert len(set(origin[hold])) == 8  # 20% of the 40 users
    assert not set(origin[hold]) & set(origin[sorted(learned)])
    assert (origin[hold] == hold).all()  # only real rows are judged
    unused = {r for r in range(len(origin)) if origin[r] in set(origin[hold])} - set(hold)
    assert set(hold) | learned | unused == set(range(len(origin))) and not unused & learned
