"""RP3beta passes fuserec's conformance kit and computes the published formula."""

from typing import ClassVar

import numpy as np
from fuserec.api import Histories
from fuserec.registry import plugin_info
from fuserec.testing import AlgorithmTests, planted_dataset

from fuserec_rp3beta import RP3beta


class TestRP3beta(AlgorithmTests):
    algorithm = RP3beta
    bad_configs: ClassVar[list[dict]] = [{"k": 0}, {"alpha": -1.0}, {"beta": -0.5}]


def test_found_through_its_entry_point_with_its_distribution() -> None:
    info = plugin_info("rp3beta")
    assert (info.cls, info.distribution, info.version) == (RP3beta, "fuserec-rp3beta", "0.1.0")


def test_matches_the_dense_formula() -> None:
    # W = P_iu^a @ P_ui^a, column j divided by popularity(j)^b, no self-loops, every neighbour kept.
    data = planted_dataset(n_items=40)
    alpha, beta = 0.6, 0.4
    x = data.matrix().toarray().astype(np.float64)
    p_ui = x / np.maximum(x.sum(axis=1, keepdims=True), 1)
    p_iu = x.T / np.maximum(x.sum(axis=0)[:, None], 1)
    w = (p_iu**alpha) @ (p_ui**alpha) / np.maximum(x.sum(axis=0), 1)[None, :] ** beta
    np.fill_diagonal(w, 0.0)
    algo = RP3beta({"alpha": alpha, "beta": beta, "k": 39}).fit(data)
    hist = Histories.from_lists([[0, 1, 2], [], [25, 30, 25], [39]], 40)
    got = algo.score(hist)
    want = hist.to_csr().toarray() @ (w / w.max())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gather_export_matches_dense_export() -> None:
    # Large catalogs export a gather of neighbours instead of a dense matmul: both must score alike.
    import torch

    algo = RP3beta({"k": 7}).fit(planted_dataset())
    padded = torch.tensor([[0, 5, 5, -1], [-1, -1, -1, -1], [79, 3, 2, 1]])
    with torch.no_grad():
        dense, gather = algo.to_torch(dense=True)(padded), algo.to_torch(dense=False)(padded)
    torch.testing.assert_close(dense, gather)
    hist = Histories.from_lists([[0, 5], [], [79, 3, 2, 1]], 80)
    np.testing.assert_allclose(dense.numpy(), algo.score(hist), rtol=1e-6, atol=1e-7)
