"""Feature fusion's MLP scorer and autoencoder: the kit's checks, exact parts, the code, the config rules."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fuserec.plugins.fusers.features import FeatureFusion
from fuserec.plugins.fusers.features.mlp import (
    block_slices,
    code_parts,
    init_mlp,
    mlp_parts,
    mlp_score,
    train_autoencoder,
)
from fuserec.testing import FuserTests
from fuserec.testing.fusers import default_case

FAST = {
    "steps": 60,
    "eval_every": 5,
    "patience": 4,
    "dims": 16,
    "hidden": 8,
    "fallback": False,
    "scorer": "mlp",
}


class TestFeatureFusionAutoencoder(FuserTests):
    """The whole conformance kit on the MLP over an autoencoder's code (ONNX parity included)."""

    fuser = FeatureFusion
    config: ClassVar[dict] = {**FAST, "autoencoder": 8, "autoencoder_steps": 100}
    bad_configs: ClassVar[list[dict]] = [{"hidden": 0}, {"autoencoder": -1}, {"scorer": "mlp2"}]


class TestFeatureFusionMLP(FuserTests):
    """The MLP straight over the joined blocks."""

    fuser = FeatureFusion
    config: ClassVar[dict] = FAST
    bad_configs: ClassVar[list[dict]] = [{"autoencoder_steps": 0}]


def test_the_autoencoder_needs_the_mlp_scorer_and_the_error_says_how_to_fix_it() -> None:
    with pytest.raises(ValidationError, match=r"set features\.scorer: mlp or features\.autoencoder: 0"):
        FeatureFusion.Config.model_validate({"autoencoder": 8})


def random_parts(shared: bool, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor], list | None]:
    gen = torch.Generator().manual_seed(seed)
    widths = [3, 1, 4]
    if shared:  # three parts of one 5-wide code
        users = [torch.randn(4, 5, generator=gen) for _ in widths]
        items = [torch.randn(7, 5, generator=gen) for _ in widths]
        return users, items, None
    users = [torch.randn(4, w, generator=gen) for w in widths]
    items = [torch.randn(7, w, generator=gen) for w in widths]
    return users, items, block_slices([np.zeros((1, w)) for w in widths])


@pytest.mark.parametrize("shared", [True, False])
def test_parts_and_the_biases_share_add_up_to_the_score(shared: bool) -> None:
    users, items, slices = random_parts(shared)
    width = 5 if shared else 8
    mlp = {k: v.detach() for k, v in init_mlp(width, 6, seed=1).items()}
    mlp["mlp_bias"] = torch.linspace(-0.5, 0.5, 6)  # non-zero, so the biases' share matters
    score, parts, bias_share = mlp_parts(users, items, mlp, slices)
    joined = (
        (torch.stack(users).sum(0), torch.stack(items).sum(0))
        if shared
        else (
            torch.cat(users, 1),
            torch.cat(items, 1),
        )
    )
    torch.testing.assert_close(score, mlp_score(*joined, mlp))  # the training path's score
    torch.testing.assert_close(parts.sum(0) + bias_share, score, atol=1e-5, rtol=1e-5)
    assert parts.shape == (3, 4, 7) and bool((parts.abs().sum((1, 2)) > 0).all())


def test_code_parts_add_up_to_the_code() -> None:
    rng = np.random.default_rng(0)
    blocks = [rng.normal(size=(20, 3)).astype(np.float32), rng.normal(size=(20, 2)).astype(np.float32)]
    encoder = {"encoder_w": rng.normal(size=(5, 4)), "encoder_b": rng.normal(size=4)}
    parts = code_parts(blocks, encoder)
    code = np.maximum(np.concatenate(blocks, 1) @ encoder["encoder_w"] + encoder["encoder_b"], 0)
    assert parts.shape == (3, 20, 4)
    np.testing.assert_allclose(parts.sum(0), code, atol=1e-5)


def test_the_autoencoder_learns_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(200, 3)) @ rng.normal(size=(3, 12))).astype(np.float32)  # rank 3
    _, error_1 = train_autoencoder(data, code=6, steps=1, learning_rate=0.02, seed=0)
    trained, error = train_autoencoder(data, code=6, steps=400, learning_rate=0.02, seed=0)
    again, _ = train_autoencoder(data, code=6, steps=400, learning_rate=0.02, seed=0)
    assert error < 0.1 < error_1
    np.testing.assert_array_equal(trained["encoder_w"], again["encoder_w"])


@pytest.fixture(scope="module")
def fitted() -> FeatureFusion:
    case = default_case()
    fuser = FeatureFusion({**FAST, "autoencoder": 8, "autoencoder_steps": 100})
    return fuser.fit(case.inner_models, case.inner.fit, case.inner.truth).bind(case.models, case.train)


def test_the_fitted_code_is_kept_with_its_error_and_rebuilt_on_load(fitted: FeatureFusion, tmp_path) -> None:
    assert fitted.item_parts_.shape == (len(fitted.blocks_) + 1, default_case().train.n_items, 8)
    assert 0.0 <= fitted.autoencoder_error_ < 1.0
    back = FeatureFusion.load(fitted.save(tmp_path), fitted.components_)
    np.testing.assert_array_equal(back.item_parts_, fitted.item_parts_)
    assert back.autoencoder_error_ == fitted.autoencoder_error_
    probe = default_case().probe
    np.testing.assert_allclose(back.score(probe), fitted.score(probe), atol=1e-6)
