"""Mult-VAE: the conformance kit, plus the model's own pieces (annealing, ELBO, fold-in, explanations)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch

from fuserec.histories import Histories
from fuserec.plugins.multvae import MultVAE, _Trainer, _VAEModule, kl_weight
from fuserec.testing import AlgorithmTests, planted_dataset

FAST = {
    "hidden": 32,
    "latent": 16,
    "lr": 1e-2,
    "batch_size": 32,
    "anneal_steps": 50,
    "max_epochs": 30,
    "patience": 5,
    "threads": 1,
    "progress": False,
}
BINARY = {**FAST, "recency_boost": 0.0}  # the paper's binary input: scoring is a set function of the history


class TestMultVAE(AlgorithmTests):
    algorithm = MultVAE
    config: ClassVar[dict] = FAST
    bad_configs: ClassVar[list[dict]] = [
        {"hidden": -1},
        {"latent": 0},
        {"dropout": 1.0},
        {"anneal_cap": -0.1},
        {"lr": 0.0},
        {"device": "gpu"},
    ]


@pytest.fixture(scope="module")
def fitted() -> MultVAE:
    return MultVAE(BINARY).fit(planted_dataset())


def test_kl_weight_rises_linearly_to_the_cap() -> None:
    assert kl_weight(0, 0.2, 100) == 0.0
    assert kl_weight(50, 0.2, 100) == pytest.approx(0.1)
    assert kl_weight(100, 0.2, 100) == pytest.approx(0.2)
    assert kl_weight(10_000, 0.2, 100) == pytest.approx(0.2)
    assert kl_weight(0, 0.3, 0) == pytest.approx(0.3)  # no annealing: full weight from the start


def test_elbo_terms_match_a_direct_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    module = _VAEModule.initial(7, 5, 3, gen)
    x = torch.tensor([[1, 0, 1, 0, 0, 1, 0], [0, 1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    with torch.no_grad():
        nll, kl = module.elbo_terms(x, 0.0, torch.Generator().manual_seed(1))
        # Redo it by hand with the same noise draw.
        h = x / x.sum(1, keepdim=True).sqrt()
        out = module.enc_out(torch.tanh(module.enc_hidden(h)))
        mu, logvar = out[:, :3], out[:, 3:]
        eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(1))
        probs = torch.softmax(module.decode(mu + torch.exp(0.5 * logvar) * eps), 1)
        var = torch.exp(logvar)
        want_kl = 0.5 * (var + mu**2 - 1 - torch.log(var)).sum(1).mean()
    want_nll = -np.mean([np.log(probs[u, x[u] > 0].numpy()).sum() for u in range(2)])
    assert float(nll) == pytest.approx(want_nll, rel=1e-5)
    assert float(kl) == pytest.approx(float(want_kl), rel=1e-5)
    assert float(kl) >= 0.0


def test_training_improves_validation_and_refits_best_epoch(fitted: MultVAE) -> None:
    log = fitted.training_log_
    val = [r for r in log if r["phase"] == "validation"]
    fit = [r for r in log if r["phase"] == "fit"]
    best = max(val, key=lambda r: r["val_ndcg@10"])
    assert best["val_ndcg@10"] > val[0]["val_ndcg@10"]  # training helps beyond one epoch
    assert len(fit) == best["epoch"]  # the refit runs exactly the chosen number of epochs
    assert fit[-1]["loss"] < fit[0]["loss"]


def test_scoring_is_deterministic_set_function_of_history(fitted: MultVAE) -> None:
    n = fitted.n_items_
    hist = Histories.from_lists([[3, 7, 11], [11, 3, 7, 7], [], [3, 7, 11]], n)
    scores = fitted.score(hist)
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-6, atol=1e-6)  # order and repeats ignored
    np.testing.assert_array_equal(scores[0], scores[3])  # no sampling or dropout at inference
    assert not np.allclose(scores[0], scores[2])  # the history matters
    with torch.no_grad():
        out = fitted.to_torch()(torch.from_numpy(hist.to_padded())).numpy()
    np.testing.assert_allclose(out, scores, rtol=1e-5, atol=1e-5)


def test_new_user_is_folded_into_their_cluster(fitted: MultVAE) -> None:
    # Planted: item i belongs to cluster i % 4. New users (not in training) with a cluster's items.
    n_items = fitted.n_items_
    cluster = np.arange(n_items) % 4
    hist = Histories.from_lists([[c, c + 4, c + 8, c + 12] for c in range(4)], n_items)
    scores = fitted.score(hist)
    unseen = np.arange(n_items) >= 16
    for c in range(4):
        assert scores[c, (cluster == c) & unseen].mean() > scores[c, (cluster != c) & unseen].mean()
    reps = fitted.user_representation(hist)
    assert reps.shape == (4, FAST["latent"])
    # Two histories from the same cluster sit closer in mu-space than histories from different clusters.
    other = fitted.user_representation(
        Histories.from_lists([[c + 16, c + 20, c + 24] for c in range(4)], n_items)
    )
    dist = np.linalg.norm(reps[:, None, :] - other[None, :, :], axis=2)
    assert (np.diag(dist) < np.where(np.eye(4, dtype=bool), np.inf, dist).min(axis=1)).all()
    assert fitted.item_representation().shape == (n_items, FAST["hidden"])


def test_explain_gives_leave_one_out_deltas(fitted: MultVAE) -> None:
    n = fitted.n_items_
    history = np.array([0, 4, 8, 1])
    item = 12  # cluster 0, like three of the four history items
    out = fitted.explain(history, item)
    assert out["method"] == "leave_one_out"
    full = fitted.score(Histories.from_lists([history.tolist()], n))[0, item]
    assert out["score"] == pytest.approx(float(full), rel=1e-5, abs=1e-5)
    deltas = dict(out["contributions"])
    assert sorted(deltas) == [0, 1, 4, 8]
    without = fitted.score(Histories.from_lists([[0, 4, 8]], n))[0, item]
    assert deltas[1] == pytest.approx(float(full - without), rel=1e-4, abs=1e-5)
    # The off-cluster item supports a cluster-0 item less than any cluster-0 history item does.
    assert deltas[1] < min(deltas[0], deltas[4], deltas[8])


def test_no_hidden_layer_variant_trains_and_exports() -> None:
    algo = MultVAE({**FAST, "hidden": 0, "max_epochs": 3, "early_stopping": False}).fit(planted_dataset())
    assert algo.item_representation().shape == (algo.n_items_, FAST["latent"])
    assert [r["phase"] for r in algo.training_log_] == ["fit"] * 3
    hist = Histories.from_lists([[1, 2], []], algo.n_items_)
    with torch.no_grad():
        out = algo.to_torch()(torch.from_numpy(hist.to_padded())).numpy()
    np.testing.assert_allclose(out, algo.score(hist), rtol=1e-5, atol=1e-5)


def test_weight_average_lags_the_trained_weights_by_the_decay() -> None:
    data = planted_dataset()
    cfg = MultVAE.Config.model_validate({**BINARY, "batch_size": data.n_users, "ema_decay": 0.75})
    trainer = _Trainer(data, cfg, torch.device("cpu"))
    before = [p.detach().clone() for p in trainer.module.parameters()]
    trainer.train_epoch()  # one optimiser step: the batch holds every user
    for start, now, avg in zip(
        before, trainer.module.parameters(), trainer.average.parameters(), strict=True
    ):
        assert not torch.equal(start, now)
        torch.testing.assert_close(avg, start + 0.25 * (now.detach() - start))
    hist = Histories.from_lists([[1, 2, 3]], data.n_items)
    with torch.no_grad():
        want = trainer.average.from_multi_hot(torch.from_numpy(hist.to_csr().toarray())).numpy()
    np.testing.assert_allclose(trainer.score(hist), want)  # validation scores the averaged weights


def test_recency_weighting_reads_order_and_exports() -> None:
    from fuserec.plugins.multvae import weighted_rows

    hist = Histories.from_lists([[3, 7, 11], [11, 7, 3], [], [5, 5]], 20)
    rows = weighted_rows(hist, 10.0, 5.0)
    assert rows[0, 11] == pytest.approx(11.0) and rows[0, 3] == pytest.approx(1 + 10 * 0.5 ** (2 / 5))
    assert rows[3, 5] == pytest.approx(11.0) and rows[2].sum() == 0.0  # a repeat keeps its latest weight
    algo = MultVAE({**FAST, "max_epochs": 3}).fit(planted_dataset())
    hist = Histories.from_lists([[3, 7, 11], [11, 7, 3], [], [4]], algo.n_items_)
    scores = algo.score(hist)
    assert not np.allclose(scores[0], scores[1])  # the latest item weighs most
    with torch.no_grad():
        out = algo.to_torch()(torch.from_numpy(hist.to_padded())).numpy()
    np.testing.assert_allclose(out, scores, rtol=1e-5, atol=1e-5)
