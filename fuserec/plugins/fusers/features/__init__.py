"""Feature fusion: join the item representations the components expose and learn one scorer over them.

Model fusion combines the components' *scores*; feature fusion combines what they *know about items*:
collaborative factors (ALS, BPR), content vectors (TF-IDF), item-kNN similarity rows, popularity. Every
component whose ``item_representation()`` is not None gives one block ``I_b [n_items, d_b]``: reduced to at
most ``dims`` dimensions (top singular directions, as stacking reduces content), rows L2-normalised (a
one-dimensional block, such as popularity, is scaled to max |x| = 1 instead: a normalised scalar keeps only
its sign), times the configured ``block_weights[name]`` (default 1).

The user side must run inside the exported graph, from the padded history. Components compute their
``user_representation`` in numpy (ALS's conjugate-gradient fold-in, user-kNN's similarities to every
training user), which is not part of any exported module, so the user vector of every block is the mean of
the history's item vectors in that block, ``u_b = mean_{j in h} I_b[j]`` (zero for an empty history).
Components that expose only a user representation (user-kNN) or none (EASE) add no block.

The scorer is block-additive bilinear, so each block's term is its component's contribution::

    score(u, i) = sum_b  u_b^T W_b I_b[i] + v_b^T I_b[i],      W_b = a_b * Id + D_b

``a_b`` is the learned weight of block b (start 1: the cosine of the item to the history's centre), ``D_b``
a learned diagonal (default) or full (``bilinear: full``; it over-fitted ML-100k's validation carve)
correction and ``v_b`` a learned item-side linear term (popularity-like directions), both L2-penalised.
Training is on the validation carve only (components fitted on train', validation truth), with the
listwise softmax loss over the full catalogue and the early stopping of
:mod:`fuserec.plugins.fusers.gating`, seeded.

``scorer: mlp`` learns one hidden layer over ``[u; x_i; u * x_i]`` instead, optionally over an
autoencoder's code of the joined blocks (``autoencoder``), with contributions kept exact by the rescale
rule (:mod:`fuserec.plugins.fusers.features.mlp`).

Factor spaces are not identifiable: ALS refitted on full train returns factors in another basis than ALS
on train', and ``W_b`` was learned in the train' basis. With ``item_vectors: aligned`` (the default), the
bound components' blocks are rotated onto the fitted ones by orthogonal Procrustes over the catalogue
before scoring; with ``fitted``, the train' item vectors are kept and the bound components are not read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from fuserec.api import Algorithm, FloatRange, IntRange, SearchDim
from fuserec.fusion import Fuser, ValidationScores, single_component
from fuserec.listwise import (
    ListwiseConfig,
    fit_on_validation,
    listwise_loss,
    restore_training,
    training_state,
    truth_rows,
)
from fuserec.plugins.fusers.features.mlp import (
    ENCODER_KEYS,
    MLP_KEYS,
    block_slices,
    code_parts,
    init_mlp,
    mlp_parts,
    mlp_score,
    train_autoencoder,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    import pandas as pd

    from fuserec.data.dataset import Dataset


class FeatureFusionConfig(ListwiseConfig):
    search_space: ClassVar[dict[str, SearchDim]] = {
        "dims": IntRange(8, 128, log=True),
        "learning_rate": FloatRange(1e-3, 0.1, log=True),
        "weight_decay": FloatRange(1e-6, 1e-1, log=True),
    }

    learning_rate: float = Field(0.02, gt=0.0, le=1.0)
    dims: int = Field(64, ge=1, description="each block is reduced to at most this many dimensions")
    bilinear: Literal["full", "diagonal"] = Field(
        "diagonal", description="form of each block's correction D_b"
    )
    block_weights: dict[str, float] = Field(
        default_factory=dict, description="fixed multiplier of a component's block (default 1; 0 drops it)"
    )
    learn_block_weights: bool = Field(True, description="learn a_b; False keeps W_b = Id + D_b")
    initial_scale: float = Field(10.0, gt=0.0, description="starting temperature of the scores")
    item_vectors: Literal["aligned", "fitted"] = Field(
        "aligned", description="serve the bound components' item vectors (Procrustes-aligned) or train''s"
    )
    scorer: Literal["bilinear", "mlp"] = Field(
        "bilinear", description="the block-additive bilinear form, or an MLP over [u; x; u * x] (feature_mlp)"
    )
    hidden: int = Field(32, ge=1, description="units of the mlp scorer's hidden layer")
    autoencoder: int = Field(
        0,
        ge=0,
        description="mlp only: the scorer reads a one-layer autoencoder's code of this size of the joined "
        "blocks (0 = the joined blocks themselves)",
    )
    autoencoder_steps: int = Field(500, ge=1, description="full-batch Adam steps of the autoencoder")
    fallback: bool = Field(
        True, description="serve the best component alone when the scorer does not beat it on held-out users"
    )

    @model_validator(mode="after")
    def _autoencoder_needs_mlp(self) -> FeatureFusionConfig:
        if self.autoencoder and self.scorer != "mlp":
            raise ValueError(
                f"features.autoencoder is {self.autoencoder} but features.scorer is {self.scorer!r}: the "
                "autoencoder's code feeds the MLP scorer; set features.scorer: mlp or features.autoencoder: 0"
            )
        return self


class FeatureFusion(Fuser):
    """Block-additive bilinear scorer over the components' joined item representations (module docstring)."""

    Config = FeatureFusionConfig
    config: FeatureFusionConfig

    # -- blocks -------------------------------------------------------------------------------------
    def item_blocks(self, components: Mapping[str, Algorithm]) -> tuple[list[str], list[np.ndarray]]:
        """``(names, tables)``: the components with an item representation and their prepared blocks."""
        n_items = self._check_fitted()
        names, tables = [], []
        for name in self._check_fitted_names():
            weight = float(self.config.block_weights.get(name, 1.0))
            raw = components[name].item_representation()
            if raw is None or weight == 0.0:
                continue
            raw = np.asarray(raw, dtype=np.float32)
            if raw.ndim != 2 or raw.shape[0] != n_items:
                raise ValueError(
                    f"{name}.item_representation() has shape {raw.shape}; feature fusion needs "
                    f"[n_items={n_items}, d]"
                )
            names.append(name)
            tables.append(weight * _normalise(_reduce(raw, self.config.dims)))
        if not names:
            raise ValueError(
                f"feature fusion needs item representations, and none of the components "
                f"{self._check_fitted_names()} exposes one (item_representation() returned None). "
                f"Plugins that do: {', '.join(representation_plugins())}; add one of them to fuse.components"
            )
        return names, tables

    def bind(self, components: Mapping[str, Algorithm], data: Dataset | None = None) -> FeatureFusion:
        super().bind(components, data)
        self._use_tables(self._serving_tables())
        return self

    def _use_tables(self, tables: list[np.ndarray]) -> None:
        """Serve these blocks; with the autoencoder, also their code's parts (fixed until the next bind)."""
        self.tables_ = tables
        if self.config.autoencoder:
            self.item_parts_ = code_parts(tables, self.encoder_)

    def _serving_tables(self) -> list[np.ndarray]:
        if self.config.item_vectors == "fitted":
            return self.reference_
        names, tables = self.item_blocks(self.components_)
        if names != self.blocks_:
            raise ValueError(
                f"{type(self).__name__} learned blocks {self.blocks_} but the bound components expose "
                f"item representations for {names}; bind the same plugins with the same settings"
            )
        return [_align(table, ref) for table, ref in zip(tables, self.reference_, strict=True)]

    @property
    def block_weights(self) -> dict[str, float]:
        """The learned weight ``a_b`` of each block (times the score scale), by component name.

        The MLP scorer has no per-block weight: there it is the configured ``block_weights`` multiplier.
        """
        return dict(zip(self.blocks_, self.block_scale_.tolist(), strict=True))

    # -- the combination ----------------------------------------------------------------------------
    def block_scores(
        self,
        seen: torch.Tensor,
        tables: list[torch.Tensor],
        matrices: list[torch.Tensor],
        biases: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        """Per block ``[B, n]``: ``u_b^T W_b I_b^T + I_b v_b``, ``u_b`` the mean of the history's items."""
        hot = seen.to(torch.float32)
        count = torch.clamp(hot.sum(dim=1, keepdim=True), min=1.0)
        out = []
        for table, matrix, bias in zip(tables, matrices, biases, strict=True):
            user = (hot @ table) / count
            out.append((user @ matrix) @ table.t() + (table @ bias).unsqueeze(0))
        return out

    def mlp_block_scores(self, seen: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
        """Per block ``[B, n]``: its exact share of the MLP's score (:func:`feature_mlp.mlp_parts`)."""
        hot = seen.to(torch.float32)
        count = torch.clamp(hot.sum(dim=1, keepdim=True), min=1.0)
        mlp = {k: torch.from_numpy(v).to(device) for k, v in self.mlp_.items()}
        if self.config.autoencoder:  # parts of one code: one per block, then the encoder bias's
            items = [torch.from_numpy(p).to(device) for p in self.item_parts_]
            slices = None
        else:
            items = [torch.from_numpy(t).to(device) for t in self.tables_]
            slices = block_slices(self.tables_)
        users = [(hot @ item) / count for item in items]
        _, parts, shared = mlp_parts(users, items, mlp, slices)
        n_blocks = len(self.blocks_)
        spread = (shared + parts[n_blocks:].sum(dim=0)) / n_blocks  # the biases' share, evenly
        return [parts[b] + spread for b in range(n_blocks)]

    def combine(self, scores: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def tensors(arrays: list[np.ndarray]) -> list[torch.Tensor]:
            return [torch.from_numpy(a).to(scores.device) for a in arrays]

        if getattr(self, "fallback_", -1) >= 0:  # lost to a component on held-out users: serve it alone
            return single_component(scores, self.fallback_)
        if self.config.scorer == "mlp":
            blocks = self.mlp_block_scores(seen, scores.device)
        else:
            blocks = self.block_scores(
                seen, tensors(self.tables_), tensors(self.matrices_), tensors(self.biases_)
            )
        by_name = dict(zip(self.blocks_, blocks, strict=True))
        zero = torch.zeros_like(scores[0])
        parts = torch.stack([by_name.get(name, zero) for name in self._check_fitted_names()])
        return parts.sum(dim=0), parts

    # -- learning -----------------------------------------------------------------------------------
    def fit_combination(self, data: Dataset, truth: pd.DataFrame) -> None:
        cfg = self.config
        self.blocks_, self.reference_ = self.item_blocks(self.components_)
        val = ValidationScores(self, data, truth, cfg.max_users, cfg.seed, cfg.cold_copies)
        if cfg.scorer == "mlp":
            self.fit_mlp(val)
            return
        self.tables_ = self.reference_
        tables = [torch.from_numpy(t) for t in self.reference_]
        dims = [t.shape[1] for t in tables]

        def build() -> torch.nn.ParameterDict:
            full = cfg.bilinear == "full"
            params = {"log_scale": torch.nn.Parameter(torch.tensor(float(np.log(cfg.initial_scale))))}
            for b, d in enumerate(dims):
                params[f"a{b}"] = torch.nn.Parameter(torch.ones(()), requires_grad=cfg.learn_block_weights)
                params[f"d{b}"] = torch.nn.Parameter(torch.zeros((d, d) if full else (d,)))
                params[f"v{b}"] = torch.nn.Parameter(torch.zeros(d))
            return torch.nn.ParameterDict(params)

        def weights(module: torch.nn.ParameterDict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            scale = torch.exp(module["log_scale"])
            matrices, biases = [], []
            for b, d in enumerate(dims):
                correction = module[f"d{b}"]
                if correction.dim() == 1:
                    correction = torch.diag(correction)
                matrices.append(scale * (module[f"a{b}"] * torch.eye(d) + correction))
                biases.append(scale * module[f"v{b}"])
            return matrices, biases

        def fused(module: torch.nn.ParameterDict, rows: np.ndarray) -> torch.Tensor:
            matrices, biases = weights(module)
            seen = val.seen[torch.from_numpy(rows)]
            return torch.stack(self.block_scores(seen, tables, matrices, biases)).sum(dim=0)

        def loss(module: torch.nn.ParameterDict, rows: np.ndarray) -> torch.Tensor:
            penalty = sum(module[f"{k}{b}"].square().sum() for b in range(len(dims)) for k in "dv")
            exclude = val.exclude[torch.from_numpy(rows)]
            return (
                listwise_loss(fused(module, rows), exclude, truth_rows(val, rows))
                + cfg.weight_decay * penalty
            )

        module, self.training_, self.held_out_, self.fallback_ = fit_on_validation(
            build, loss, fused, val, cfg, cfg.fallback
        )
        with torch.no_grad():
            matrices, biases = weights(module)
            scale = float(torch.exp(module["log_scale"]))
            self.block_scale_ = np.asarray(
                [scale * float(module[f"a{b}"]) for b in range(len(dims))], np.float32
            )
        self.matrices_ = [m.numpy().astype(np.float32) for m in matrices]
        self.biases_ = [v.numpy().astype(np.float32) for v in biases]

    def fit_mlp(self, val: ValidationScores) -> None:
        """The MLP scorer on the validation carve, after the autoencoder (if any) learned the catalogue."""
        cfg = self.config
        self.autoencoder_error_ = float("nan")
        if cfg.autoencoder:
            self.encoder_, self.autoencoder_error_ = train_autoencoder(
                np.concatenate(self.reference_, axis=1),
                cfg.autoencoder,
                cfg.autoencoder_steps,
                cfg.learning_rate,
                cfg.seed,
            )
        self._use_tables(self.reference_)
        joined = self.item_parts_.sum(axis=0) if cfg.autoencoder else np.concatenate(self.reference_, axis=1)
        item = torch.from_numpy(np.ascontiguousarray(joined, dtype=np.float32))

        def fused(module: torch.nn.ParameterDict, rows: np.ndarray) -> torch.Tensor:
            hot = val.seen[torch.from_numpy(rows)].to(torch.float32)
            user = (hot @ item) / torch.clamp(hot.sum(dim=1, keepdim=True), min=1.0)
            return mlp_score(user, item, dict(module.items()))

        def loss(module: torch.nn.ParameterDict, rows: np.ndarray) -> torch.Tensor:
            penalty = sum(module[k].square().sum() for k in MLP_KEYS if k != "mlp_bias")
            exclude = val.exclude[torch.from_numpy(rows)]
            listwise = listwise_loss(fused(module, rows), exclude, truth_rows(val, rows))
            return listwise + cfg.weight_decay * penalty

        module, self.training_, self.held_out_, self.fallback_ = fit_on_validation(
            lambda: init_mlp(item.shape[1], cfg.hidden, cfg.seed), loss, fused, val, cfg, cfg.fallback
        )
        self.mlp_ = {k: v.detach().numpy().astype(np.float32) for k, v in module.items()}
        self.block_scale_ = np.asarray([cfg.block_weights.get(b, 1.0) for b in self.blocks_], np.float32)

    # -- persistence --------------------------------------------------------------------------------
    @property
    def holdout_ndcg(self) -> dict[str, float]:
        """Held-out validation NDCG@10: this fuser, equal z-score weights, the best component alone."""
        keys = ("fused", "uniform", "best_single")
        return {k: float(self.training_[f"holdout_{k}"]) for k in keys}

    def get_state(self) -> dict[str, np.ndarray]:
        names = self._check_fitted_names()
        state: dict[str, np.ndarray] = {
            "blocks": np.asarray([names.index(n) for n in self.blocks_], dtype=np.int64)
        }
        state["block_scale"] = self.block_scale_
        for b in range(len(self.blocks_)):
            state[f"reference_{b}"] = self.reference_[b]
            if self.config.scorer == "bilinear":
                state |= {f"matrix_{b}": self.matrices_[b], f"bias_{b}": self.biases_[b]}
        if self.config.scorer == "mlp":
            state |= self.mlp_ | {"autoencoder_error": np.asarray(self.autoencoder_error_)}
            if self.config.autoencoder:
                state |= self.encoder_
        return state | training_state(self.training_) | {"fallback": np.asarray(self.fallback_, np.int64)}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        names = self._check_fitted_names()
        self.fallback_ = int(state["fallback"]) if "fallback" in state else -1  # saved before it existed
        self.blocks_ = [names[int(i)] for i in state["blocks"]]
        self.block_scale_ = state["block_scale"]
        count = len(self.blocks_)
        self.reference_ = [state[f"reference_{b}"] for b in range(count)]
        if self.config.scorer == "bilinear":
            self.matrices_ = [state[f"matrix_{b}"] for b in range(count)]
            self.biases_ = [state[f"bias_{b}"] for b in range(count)]
        else:
            self.mlp_ = {k: state[k] for k in MLP_KEYS}
            self.autoencoder_error_ = float(state["autoencoder_error"])
            if self.config.autoencoder:
                self.encoder_ = {k: state[k] for k in ENCODER_KEYS}
        self._use_tables(self.reference_)  # until bound: bind() aligns the bound components' vectors
        self.training_ = restore_training(state)


def representation_plugins() -> list[str]:
    """Installed algorithm plugins whose class implements ``item_representation``."""
    from fuserec.registry import discover

    return [
        p.name
        for p in discover()
        if p.ok
        and p.cls is not None
        and issubclass(p.cls, Algorithm)  # always, in the algorithms group: narrows the type
        and p.cls.item_representation is not Algorithm.item_representation
    ]


def _reduce(vectors: np.ndarray, dims: int, exact_flops: float = 2e10) -> np.ndarray:
    """``U_k S_k`` of ``vectors``' top ``dims`` singular directions; unchanged when ``d <= dims``.

    An exact SVD where it is affordable, else a seeded randomized one (range finder with power
    iterations); each direction's sign is fixed by its largest entry, so the same input always gives the
    same basis, which a bilinear form learned in that basis needs (ARPACK's ``svds`` can flip signs).
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    n, d = vectors.shape
    if d <= dims:
        return vectors.astype(np.float32)
    if float(n) * d * min(n, d) <= exact_flops:
        u, s, _ = np.linalg.svd(vectors, full_matrices=False)
    else:
        basis = vectors @ np.random.default_rng(0).standard_normal((d, min(2 * dims + 10, n, d)))
        for _ in range(4):
            basis, _ = np.linalg.qr(basis)
            basis, _ = np.linalg.qr(vectors @ (vectors.T @ basis))
        small_u, s, _ = np.linalg.svd(basis.T @ vectors, full_matrices=False)
        u = basis @ small_u
    u, s = u[:, :dims], s[:dims]
    signs = np.sign(u[np.abs(u).argmax(axis=0), np.arange(u.shape[1])])
    return (u * np.where(signs == 0, 1.0, signs) * s).astype(np.float32)


def _normalise(block: np.ndarray) -> np.ndarray:
    """Rows to unit L2 norm (zero rows stay zero); a one-column block to max |x| = 1."""
    block = np.asarray(block, dtype=np.float32)
    if block.shape[1] == 1:
        return (block / max(float(np.abs(block).max()), 1e-12)).astype(np.float32)
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return (block / np.maximum(norms, 1e-12)).astype(np.float32)


def _align(block: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``block @ R`` with ``R`` the (semi-)orthogonal map that best carries ``block`` onto ``reference``."""
    u, _, vt = np.linalg.svd(block.astype(np.float64).T @ reference.astype(np.float64), full_matrices=False)
    aligned = block.astype(np.float64) @ (u @ vt)
    if block.shape[1] != reference.shape[1]:  # semi-orthogonal: give rows back the reference's norms
        norms = np.linalg.norm(aligned, axis=1, keepdims=True)
        aligned *= np.linalg.norm(reference, axis=1, keepdims=True) / np.maximum(norms, 1e-12)
    return np.asarray(aligned, dtype=np.float32)
