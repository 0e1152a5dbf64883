"""Implicit-feedback ALS (Hu, Koren & Volinsky 2008), scored by folding each history in.

Training is delegated to ``implicit`` (its CPU solver is fast, multi-threaded and deterministic for a given
``random_state``): on the binary matrix with confidence ``c = 1 + alpha·x`` it learns item factors ``Y``.
Only ``Y`` is kept. fuserec's part is scoring from histories, which is what lets a new user or a fresh
event be served without retraining: each history ``p_u`` is folded onto the fixed ``Y`` by solving

    (YᵀY + λI + alpha · Σ_{i ∈ h} y_i y_iᵀ) x_u = (1 + alpha) · Σ_{i ∈ h} y_i

(that is ``(YᵀY + Yᵀ(C_u − I)Y + λI) x_u = Yᵀ C_u p_u``), then ``scores = x_u · Yᵀ``.

The solve is a fixed number of preconditioned conjugate-gradient steps written as batched matrix
products over the gathered history factors (no per-user loop, no ``linalg.solve``), so the very same
torch code runs in :meth:`ALS.score` and exports to ONNX. The preconditioner is ``G⁻¹ = (YᵀY + λI)⁻¹``,
computed once at fit time. Why it works so well: ``Σ_{i ∈ h} y_i y_iᵀ ⪯ YᵀY ⪯ G``, so every eigenvalue of
the preconditioned system lies in ``[1, 1 + alpha]``; the condition number is at most ``1 + alpha``
whatever the data, and CG's error shrinks by ``(√κ − 1)/(√κ + 1)`` per step. ``cg_steps=None`` picks
the step count from that bound (about 7 steps for alpha = 1, 20 for alpha = 10); alpha = 0 is exact in
one step. Work per step is ``O(B · L · factors)`` for B histories of length L, independent of the catalog.

``alpha`` here is the paper's: confidence ``1 + alpha`` on a positive. ``implicit``'s own ``alpha``
argument multiplies the matrix instead (its confidence is ``alpha · x``), so implicit's ``alpha=a``
on a binary matrix equals ``alpha = a − 1`` here.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Self

import numpy as np
import torch
from pydantic import Field

from fuserec.api import Algorithm, AlgorithmConfig, FloatRange, Histories, IntRange, SearchDim

if TYPE_CHECKING:
    from fuserec.data.dataset import Dataset

CG_TOLERANCE = 1e-5  # target of the CG error bound when cg_steps is None (the actual error is lower)
MAX_AUTO_CG_STEPS = 64
# score() batches: rows x padded length (the gathered factors [rows, L, factors] stay cache-sized, which
# is far faster than large blocks) and rows x output width (the [rows, n_items] block).
SCORE_CELLS = 1 << 13
OUTPUT_CELLS = 1 << 22


class ALSConfig(AlgorithmConfig):
    search_space: ClassVar[dict[str, SearchDim]] = {
        "factors": IntRange(16, 256, log=True),
        "regularization": FloatRange(0.1, 300.0, log=True),
        "alpha": FloatRange(0.0, 20.0),
        "iterations": IntRange(5, 30),
    }

    factors: int = Field(128, ge=1, description="latent dimensions")
    regularization: float = Field(
        10.0, gt=0.0, description="λ: L2 penalty on the factors; > 0 keeps YᵀY + λI (the fold-in) invertible"
    )
    alpha: float = Field(1.0, ge=0.0, description="confidence of a positive is 1 + alpha (unobserved: 1)")
    iterations: int = Field(15, ge=1, description="ALS sweeps (users then items)")
    num_threads: int = Field(0, ge=0, description="implicit's fitting threads; 0 = all cores")
    cg_steps: int | None = Field(
        None, ge=1, le=256, description="fold-in CG steps; None: from the κ ≤ 1 + alpha bound (auto_cg_steps)"
    )


class ALS(Algorithm):
    Config = ALSConfig
    config: ALSConfig
    _module: _ALSModule | None  # built lazily from the fitted state

    def fit(self, data: Dataset) -> Self:
        from threadpoolctl import threadpool_limits

        cfg = self.config
        confidence = data.matrix().astype(np.float32)
        confidence.data[:] = 1.0 + cfg.alpha
        # implicit parallelises over users itself; a multi-threaded BLAS underneath it oversubscribes the
        # cores and is many times slower (implicit warns about exactly this), so BLAS gets one thread.
        with threadpool_limits(1, "blas"):
            from implicit.cpu.als import AlternatingLeastSquares

            model = AlternatingLeastSquares(
                factors=cfg.factors,
                regularization=cfg.regularization,
                alpha=1.0,  # the confidences are already in the matrix
                iterations=cfg.iterations,
                num_threads=cfg.num_threads,
                random_state=cfg.seed,
            )
            model.fit(confidence, show_progress=False)
        self.item_factors_ = np.ascontiguousarray(model.item_factors, dtype=np.float32)
        # implicit's own user factors (end of the last sweep): kept for diagnostics, not saved or scored.
        self.train_user_factors_ = np.ascontiguousarray(model.user_factors, dtype=np.float32)
        self.n_items_ = data.n_items
        self._module = None
        return self

    # -- fold-in --------------------------------------------------------------------------------------
    @property
    def n_cg_steps(self) -> int:
        """Steps of preconditioned CG: the configured count, or the fewest the κ ≤ 1 + alpha bound needs."""
        if self.config.cg_steps is not None:
            return self.config.cg_steps
        return auto_cg_steps(self.config.alpha)

    def _fold_module(self) -> _ALSModule:
        module: _ALSModule | None = getattr(self, "_module", None)
        if module is None:
            self._check_fitted()
            y = self.item_factors_.astype(np.float64)
            gram = y.T @ y + self.config.regularization * np.eye(y.shape[1])
            module = self._module = _ALSModule(
                torch.from_numpy(self.item_factors_),
                torch.from_numpy(gram.astype(np.float32)),
                torch.from_numpy(np.linalg.inv(gram).astype(np.float32)),
                self.config.alpha,
                self.n_cg_steps,
            ).eval()
        return module

    def _batched(self, histories: Histories, width: int, fn_name: str) -> np.ndarray:
        """Run the module in batches of similar-length histories so padding (and memory) stays small."""
        module = self._fold_module()
        fn = getattr(module, fn_name)
        out = np.zeros((len(histories), width), dtype=np.float32)
        order = np.argsort(histories.lengths, kind="stable")
        lengths = histories.lengths[order]
        max_rows = max(1, OUTPUT_CELLS // max(width, 1))
        start = 0
        with torch.no_grad():
            while start < len(order):
                # lengths ascend, so a batch's last row is its longest: grow while rows x longest fits
                stop = start + 1
                while (
                    stop < len(order)
                    and stop - start < max_rows
                    and (stop + 1 - start) * max(int(lengths[stop]), 1) <= SCORE_CELLS
                ):
                    stop += 1
                rows = order[start:stop]
                padded = histories.select(rows).to_padded(max(int(lengths[stop - 1]), 1))
                out[rows] = fn(torch.from_numpy(padded)).numpy()
                start = stop
        return out

    def score(self, histories: Histories) -> np.ndarray:
        return self._batched(histories, self._check_fitted(), "forward")

    def user_representation(self, histories: Histories) -> np.ndarray:
        """Each history's folded-in user factors ``x_u`` (what :meth:`score` multiplies by ``Yᵀ``)."""
        self._check_fitted()
        return self._batched(histories, self.item_factors_.shape[1], "fold_in")

    def item_representation(self) -> np.ndarray:
        self._check_fitted()
        return self.item_factors_

    def to_torch(self) -> torch.nn.Module:
        return self._fold_module()

    def get_state(self) -> dict[str, np.ndarray]:
        return {"item_factors": self.item_factors_}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.item_factors_ = np.ascontiguousarray(state["item_factors"], dtype=np.float32)
        self._module = None


def auto_cg_steps(alpha: float, tol: float = CG_TOLERANCE) -> int:
    """Fewest CG steps with ``2 ρ^m ≤ tol``, ``ρ = (√κ − 1)/(√κ + 1)``, ``κ = 1 + alpha`` (the PCG bound)."""
    root = math.sqrt(1.0 + alpha)
    rho = (root - 1.0) / (root + 1.0)
    if rho <= 0.0:
        return 1
    return int(min(MAX_AUTO_CG_STEPS, max(1, math.ceil(math.log(tol / 2.0) / math.log(rho)))))


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` that is 0 where ``den`` is 0 (then ``num`` is 0 too: a converged or empty history).

    Not ``den + tiny``: the ONNX exporter rounds a constant like 1e-30 to 0, which brings back 0/0 = NaN.
    """
    return num / torch.where(den > 0, den, torch.ones_like(den))


class _ALSModule(torch.nn.Module):
    """Padded histories -> folded user factors (:meth:`fold_in`) -> scores (``forward``)."""

    item_factors: torch.Tensor
    gram: torch.Tensor
    gram_inv: torch.Tensor

    def __init__(
        self, item_factors: torch.Tensor, gram: torch.Tensor, gram_inv: torch.Tensor, alpha: float, steps: int
    ) -> None:
        super().__init__()
        self.register_buffer("item_factors", item_factors)
        self.register_buffer("gram", gram)  # YᵀY + λI
        self.register_buffer("gram_inv", gram_inv)  # its inverse: the preconditioner
        self.alpha = float(alpha)
        self.steps = int(steps)

    def fold_in(self, history: torch.Tensor) -> torch.Tensor:
        # An item repeated in a history counts once (the binary matrix). The solve does not depend on the
        # order of the history, so sort each row and keep the first of each run of equal ids: O(B·L log L),
        # where counting ids would need a [B, n_items] buffer per batch (the cost of scoring itself).
        ordered = torch.sort(history, dim=1).values
        repeat = ordered[:, 1:] == ordered[:, :-1]
        # (the leading True comes from `ordered`, not `repeat`: for a one-item history `repeat` has no column)
        first = torch.cat([torch.ones_like(ordered[:, :1], dtype=torch.bool), ~repeat], dim=1)
        valid = ordered >= 0
        weight = (valid & first).to(torch.float32).unsqueeze(1)  # [B, 1, L]
        factors = self.item_factors[torch.where(valid, ordered, torch.zeros_like(ordered))]  # [B, L, k]
        factors_t = factors.transpose(1, 2)  # [B, k, L]
        conf_weight = self.alpha * weight
        # Vectors are [B, 1, k] rows so every product below is one batched matmul (few ONNX nodes per step).
        b = (1.0 + self.alpha) * (weight @ factors)
        x = torch.zeros_like(b)
        r = b
        z = r @ self.gram_inv
        p = z
        rz = (r * z).sum(2, keepdim=True)
        for _ in range(self.steps):  # unrolled: a fixed graph for ONNX
            # A p = (YᵀY + λI) p + alpha Σ_{i∈h} y_i (y_i · p)
            ap = p @ self.gram + (conf_weight * (p @ factors_t)) @ factors
            step = _ratio(rz, (p * ap).sum(2, keepdim=True))
            x = x + step * p
            r = r - step * ap
            z = r @ self.gram_inv
            rz_new = (r * z).sum(2, keepdim=True)
            p = z + _ratio(rz_new, rz) * p
            rz = rz_new
        return x.squeeze(1)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return self.fold_in(history) @ self.item_factors.T
