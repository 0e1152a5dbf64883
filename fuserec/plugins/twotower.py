"""Two-tower hybrid: one model that reads interactions AND content, so rare and brand-new items get scores.

Collaborative models (EASE, ALS, BPR) learn one vector per item from its interactions: an item with few
positives gets a noisy vector, and an item added after fitting gets none. The content model scores every
item but ignores what people actually do. This model joins them in one network (the "unified deep
framework"): an item is an id embedding PLUS a projection of its content, and the content path is trained
to carry signal on its own.

Item tower: ``e_i = P(c_i) + k_i E_i + (1 - k0_i) e0`` and bias ``b_i = w . c_i + k_i beta_i + (1 - k0_i)
(b0 + cold_offset)``. ``c_i`` is the item's TF-IDF content vector (genres, tags, year, text: a fitted
:class:`fuserec.features.TfidfVocabulary` is kept in the state, so a catalog row added later is embedded
with the same vocabulary), ``P`` a linear map or a small ReLU MLP, ``E``/``beta`` the id embedding and
bias. The id part is switched off
- for items with fewer than ``id_min_count`` training positives (``k0_i = 0``), and for brand-new items
  (:meth:`TwoTower.score_items`): they are scored from content plus a learned "unknown item" token
  ``e0``/``b0`` (as an out-of-vocabulary word is). Why: a full softmax pushes every item that is seldom a
  target down, so a rare item's id vector mostly learns "rare", while its content still says what it is;
- in training, for a random ``id_dropout`` share of the catalog at every step (``k_i = k0_i * keep``), so
  the content path must rank items alone (the DropoutNet idea): without it the id part explains
  everything and ``P`` stays weak.
``cold_offset`` (scoring only) lifts the id-less items: the model is trained to be calibrated, and a
calibrated model ranks an item with 2 training positives below the head for nearly everyone, so without a
lift no rare item reaches a top-10 list.

User tower: the history's item-tower vectors (``history="shared"``; ``"separate"`` learns its own id
embeddings and content map) pooled as ``p = (sum_j w_j h_j) / (sum_j w_j) ** alpha`` with recency weights
``w_j = 2 ** (-age_j / half_life)`` (age 0 = newest; all 1 without ``half_life``), then a residual MLP over
the pooled vector and the user's one-hot attributes (:func:`fuserec.features.user_attribute_matrix`):
``u = p + W2 relu(W1 p + A a + b1) + b2``. Score: ``u . e_i + b_i``.

Training: each positive is predicted by a full softmax over the catalog (1,682 items on ML-100k) from its
user's history with the target LEFT OUT (as in ``bpr.py``: the model must not find the target in its own
input). ``folds=0`` is exact leave-one-out (one softmax row per positive); ``folds=k`` splits each user's
positives into k random folds per epoch and predicts every positive of a fold from the other folds (one
row per fold: several times cheaper, same validation accuracy). Adam; the scoring weights are an
exponential moving average of the trained ones (``ema_decay``: without it validation NDCG jumps from
epoch to epoch); epochs chosen by :func:`fuserec.training.fit_early_stopped` on validation NDCG@10,
then a refit on all data.

The defaults were chosen on the validation carve, trading a little overall NDCG@10 for rare-item NDCG@10
(``cold_offset``), where the collaborative plugins score almost nothing. Choices that mattered: recency
weights (``half_life``), one shared set of item vectors for the history (``history="shared"``),
``id_min_count`` (with id vectors, rare items stay out of the top 10 whatever the offset), and an MLP
content map (``content_hidden``: less overall NDCG lost per rare-item gain than a linear one).

User attributes and the exported graph: ``score()`` reads attributes when ``histories.users`` is given
(row of the users table; -1 or out of range = unknown = zero attributes). The module's
``forward(history, user_features=None)`` takes the padded history and an OPTIONAL ``float32 [B, f]``
attribute input (columns named in ``attribute_names_``, as :func:`fuserec.features.user_attribute_matrix`
names them); the exported graph has the same optional input (``user_features``, zeros = unknown user),
so the service and the evaluate stage feed a known user's attributes as ``score()`` reads them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from fuserec.api import Algorithm, Choice, FloatRange, Histories, IntRange, SearchDim
from fuserec.features import (
    DEFAULTS,
    USER_ATTRIBUTES,
    ContentFeatures,
    TfidfVocabulary,
    user_attribute_matrix,
)
from fuserec.histories import concat_ranges
from fuserec.training import TorchConfig, fit_early_stopped, resolve_device, torch_threads

if TYPE_CHECKING:
    from fuserec.data.dataset import Dataset

INIT_STD = 0.01
CONTENT_PREFIX = "content."  # state keys of the fitted TF-IDF vocabulary (vocabulary, idf, item vectors)
MIN_WEIGHT = 1e-6  # floor of a history's total weight before the |h|^-alpha normalisation


class TwoTowerConfig(TorchConfig):
    search_space: ClassVar[dict[str, SearchDim]] = {
        "dim": Choice((32, 64, 128)),
        "user_hidden": Choice((0, 128, 256)),
        "content_hidden": Choice((0, 64, 128)),
        "history": Choice(("shared", "separate")),
        "id_dropout": FloatRange(0.0, 0.5),
        "id_min_count": IntRange(1, 10),
        "alpha": FloatRange(0.3, 0.7),
        "half_life": Choice((None, 10.0, 20.0, 40.0)),
        "lr": FloatRange(1e-3, 5e-3, log=True),
        "ema_decay": Choice((0.0, 0.9, 0.97)),
        "cold_offset": FloatRange(0.0, 3.5),
    }

    dim: int = Field(64, ge=1, description="dimension of item and user tower outputs")
    user_hidden: int = Field(
        128,
        ge=0,
        description="width of the user tower's residual MLP (0: pooled history + linear attributes)",
    )
    content_hidden: int = Field(
        64, ge=0, description="width of a ReLU hidden layer of the content projection (0: linear)"
    )
    history: Literal["separate", "shared"] = Field(
        "shared", description="history vectors: the item tower's output, or own id embedding + content map"
    )
    id_dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="share of the catalog whose id part is dropped at each training step"
    )
    id_min_count: int = Field(
        5, ge=0, description="items with fewer training positives are scored from content only (no id part)"
    )
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="pooling: sum of history vectors / weight^alpha")
    half_life: float | None = Field(
        20.0, gt=0.0, description="recency half-life in history positions (newest = 0); None weighs all alike"
    )
    item_bias: bool = Field(True, description="add a per-item bias (id part + content part) to scores")
    lr: float = Field(2e-3, gt=0.0, description="Adam learning rate")
    weight_decay: float = Field(1e-6, ge=0.0, description="Adam L2 weight decay on every parameter")
    folds: int = Field(
        5,
        ge=0,
        description="0: each positive is predicted from all its user's others (leave-one-out); k: each "
        "epoch splits a user's positives into k random folds, each predicted from the rest (cheaper)",
    )
    batch_size: int = Field(1024, ge=1, description="about this many (history, target) pairs per step")
    ema_decay: float = Field(
        0.97, ge=0.0, lt=1.0, description="score with a moving average of the weights (per step; 0: off)"
    )
    cold_offset: float = Field(
        3.0,
        description="added to scores of items without an id part (rare, brand-new): tail exposure",
    )
    score_batch_size: int = Field(512, ge=1, description="histories scored per block in score()")
    threads: int | None = Field(
        1,
        ge=1,
        description="torch CPU threads while training (None = torch's); small steps run fastest on one",
    )
    title_weight: float = Field(0.0, ge=0.0, description="content: weight of title words")
    year_weight: float = Field(0.75, ge=0.0, description="content: weight of release-year tokens")


class TwoTower(Algorithm):
    """Hybrid two-tower model; see the module docstring for the towers, training and the exported graph."""

    Config = TwoTowerConfig
    user_attributes: ClassVar[frozenset[str]] = USER_ATTRIBUTES  # the user tower's attribute input
    config: TwoTowerConfig
    _module: _TwoTowerModule | None  # built lazily from the fitted state

    def fit(self, data: Dataset) -> Self:
        cfg = self.config
        content = TfidfVocabulary.fit(data.items, self._content_settings())
        attributes, names = user_attribute_matrix(data.users)
        with torch_threads(cfg.threads):
            device = resolve_device(cfg.device)
            trainer, log = fit_early_stopped(
                lambda d: _Trainer(d, cfg, content.item_vectors, attributes, device),
                data,
                cfg,
                "twotower",
            )
        self.training_log_: list[dict[str, Any]] = log
        params = {k: v.detach().cpu().numpy().copy() for k, v in trainer.scoring.state_dict().items()}
        columns = np.asarray(names, dtype=str) if names else np.zeros(0, dtype="<U1")
        self.set_state(
            {**params, **_prefixed(content.get_state()), "attributes": attributes, "attribute_names": columns}
        )
        self.n_items_ = data.n_items
        return self

    def _content_settings(self) -> ContentFeatures:
        return replace(DEFAULTS, title_weight=self.config.title_weight, year_weight=self.config.year_weight)

    # -- scoring ------------------------------------------------------------------------------------
    def _scorer(self) -> _TwoTowerModule:
        module: _TwoTowerModule | None = getattr(self, "_module", None)
        if module is None:
            module = self._module = _TwoTowerModule.from_state(self.params_, self.config).eval()
        return module

    def _user_features(self, histories: Histories) -> np.ndarray | None:
        """Attribute rows of ``histories.users`` (unknown users: zeros); None without users or attributes."""
        return user_features(histories.users, self.attributes_)

    def score(self, histories: Histories) -> np.ndarray:
        """``u(h, a) . e_i + b_i`` for every catalog item, ``float32 [n, n_items]``."""
        self._check_fitted()
        return _run(
            self._scorer(),
            histories,
            self._user_features(histories),
            "forward",
            histories.n_items,
            self.config.score_batch_size,
            torch.device("cpu"),
        )

    def user_representation(self, histories: Histories) -> np.ndarray:
        """User tower outputs ``u(h, a)``, ``[n_users, dim]`` (attributes read as in :meth:`score`)."""
        self._check_fitted()
        return _run(
            self._scorer(),
            histories,
            self._user_features(histories),
            "users",
            self.config.dim,
            self.config.score_batch_size,
            torch.device("cpu"),
        )

    def item_representation(self) -> np.ndarray:
        """Item tower outputs ``e_i`` ``[n_items, dim]`` (id part only where ``id_min_count`` allows)."""
        self._check_fitted()
        with torch.no_grad():
            return self._scorer().item_vectors()[0].numpy().copy()

    def embed_items(self, items: pd.DataFrame) -> np.ndarray:
        """Content vectors of catalog rows in the fitted vocabulary (the item tower's content input)."""
        self._check_fitted()
        return self.content_.embed(items)

    def score_items(self, histories: Histories, items: pd.DataFrame) -> np.ndarray:
        """Scores ``float32 [len(histories), len(items)]`` of items known only by their catalog row.

        Why: a brand-new item has no id embedding, so the item tower runs on its content alone, exactly
        the path that ``id_dropout`` trained; the scores are on the same scale as :meth:`score`'s.
        """
        module = self._scorer()
        users = self.user_representation(histories)
        with torch.no_grad():
            vectors, bias = module.content_vectors(torch.from_numpy(self.embed_items(items)))
            out = torch.from_numpy(users) @ vectors.T + bias
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)

    def explain(self, history: np.ndarray, item: int) -> dict[str, Any]:
        """The score split into the item's id part and its content part, and each history item's share.

        ``id_part = u . E_i + beta_i`` (0 for an item scored from content only), ``content_part`` = the
        rest (``u . P(c_i) + w . c_i``, plus the unknown-item token for id-less items), so they sum to
        the score. History items are ranked by leave-one-out: how much the score drops when each is
        removed (the user tower is non-linear, so these need not sum to the score). No user attributes.
        """
        n_items = self._check_fitted()
        module = self._scorer()
        hist = np.asarray(history, dtype=np.int64)
        uniq = np.unique(hist)
        lists = [hist.tolist()] + [hist[hist != j].tolist() for j in uniq]
        batch = Histories.from_lists(lists, n_items)
        user = self.user_representation(batch.select([0]))[0]
        scores = self.score(batch)[:, item]
        uses_id = bool(module.id_ok[item] > 0)
        id_part = 0.0
        if uses_id:
            id_part = float(user @ self.params_["item_id"][item])
            id_part += float(self.params_["item_id_bias"][item]) if self.config.item_bias else 0.0
        deltas = sorted(
            ((int(j), float(scores[0] - scores[1 + k])) for k, j in enumerate(uniq)), key=lambda kv: -kv[1]
        )
        return {
            "score": float(scores[0]),
            "id_part": id_part,
            "content_part": float(scores[0]) - id_part,
            "uses_id": uses_id,
            "method": "leave_one_out",
            "contributions": deltas,
        }

    def to_torch(self) -> torch.nn.Module:
        """CPU module in eval mode: ``forward(history, user_features=None) -> [B, n_items]``.

        ``user_feature_names`` names the attribute columns it reads, so the exported graph gains the
        ``user_features`` input (:data:`fuserec.api.USER_FEATURES`) and serves what ``score`` measures.
        """
        self._check_fitted()
        module = self._scorer()
        reads = module.user_attr is not None and len(self.attribute_names_) > 0
        module.user_feature_names = tuple(str(n) for n in self.attribute_names_) if reads else ()
        return module

    # -- persistence --------------------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        return {
            **self.params_,
            **_prefixed(self.content_.get_state()),
            "attributes": self.attributes_,
            "attribute_names": self.attribute_names_,
        }

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        content = {k[len(CONTENT_PREFIX) :]: v for k, v in state.items() if k.startswith(CONTENT_PREFIX)}
        self.content_ = TfidfVocabulary.from_state(content, self._content_settings())
        self.attributes_ = np.asarray(state["attributes"], dtype=np.float32)
        self.attribute_names_ = np.asarray(state["attribute_names"], dtype=str)  # columns of user_features
        self.params_ = {
            k: np.asarray(v, dtype=np.float32)
            for k, v in state.items()
            if not k.startswith(CONTENT_PREFIX) and k not in ("attributes", "attribute_names")
        }
        self._module = None


def _prefixed(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {CONTENT_PREFIX + k: v for k, v in state.items()}


def user_features(users: np.ndarray | None, attributes: np.ndarray) -> np.ndarray | None:
    """``float32 [len(users), f]`` attribute rows (-1 / out of range: zeros); None if nothing to read."""
    if users is None or attributes.shape[1] == 0:
        return None
    users = np.asarray(users, dtype=np.int64)
    known = (users >= 0) & (users < len(attributes))
    out = np.zeros((len(users), attributes.shape[1]), dtype=np.float32)
    out[known] = attributes[users[known]]
    return out


def _run(
    module: _TwoTowerModule,
    histories: Histories,
    features: np.ndarray | None,
    what: str,
    width: int,
    step: int,
    device: torch.device,
) -> np.ndarray:
    """``module.<what>(padded, features)`` over blocks of histories, as one ``float32 [n, width]`` array."""
    out = np.empty((len(histories), width), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(histories), step):
            rows = np.arange(start, min(start + step, len(histories)))
            padded = torch.from_numpy(histories.select(rows).to_padded()).to(device)
            feats = None if features is None else torch.from_numpy(features[rows]).to(device)
            out[rows] = getattr(module, what)(padded, feats).cpu().numpy()
    return out


def recency_weights(lengths: np.ndarray, half_life: float | None) -> np.ndarray:
    """Per history entry (concatenated, oldest first per user): ``2 ** (-age / half_life)``, newest age 0."""
    total = int(lengths.sum())
    if half_life is None:
        return np.ones(total, dtype=np.float32)
    ends = np.repeat(np.cumsum(lengths), lengths)
    age = ends - 1 - np.arange(total)
    return np.exp2(-age / half_life).astype(np.float32)


class _Trainer:
    """One model being trained on one dataset; what :func:`fit_early_stopped` drives epoch by epoch."""

    def __init__(
        self,
        data: Dataset,
        cfg: TwoTowerConfig,
        content: np.ndarray,
        attributes: np.ndarray,
        device: torch.device,
    ) -> None:
        self.cfg = cfg
        self.device = device
        hist = data.histories()
        self.indptr, self.items, self.lengths = hist.indptr, hist.items, hist.lengths
        self.weights = recency_weights(self.lengths, cfg.half_life)
        self.active = np.flatnonzero(self.lengths)
        self.attributes = attributes
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        ok = (data.item_popularity() >= cfg.id_min_count).astype(np.float32)  # this data's own counts
        init = torch.Generator().manual_seed(cfg.seed)  # CPU: the same initial weights on any device
        self.module = _TwoTowerModule.initial(cfg, content, ok, attributes.shape[1], init).to(device)
        self.opt = torch.optim.Adam(self.module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # Scoring weights: the live module, or an exponential moving average of it (Polyak averaging).
        self.average = copy.deepcopy(self.module).eval() if cfg.ema_decay > 0 else None
        self.steps = 0

    def train_epoch(self) -> float:
        self.module.train()
        total, seen = 0.0, 0
        for users in _user_batches(self.rng.permutation(self.active), self.lengths, self.cfg.batch_size):
            counts = self.lengths[users]
            take = concat_ranges(self.indptr[users], counts)
            pair_user = np.repeat(np.arange(len(users)), counts)
            row, row_user = self._folds(pair_user, counts)
            feats = self.attributes[users] if self.attributes.shape[1] else None
            loss = self.module.loss(
                torch.from_numpy(self.items[take]).to(self.device),
                torch.from_numpy(self.weights[take]).to(self.device),
                torch.from_numpy(pair_user).to(self.device),
                len(users),
                torch.from_numpy(row).to(self.device),
                torch.from_numpy(row_user).to(self.device),
                None if feats is None else torch.from_numpy(feats).to(self.device),
                self.cfg.id_dropout,
                self.gen,
            )
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self._update_average()
            total += float(loss.detach()) * len(take)
            seen += len(take)
        return total / max(seen, 1)

    def _folds(self, pair_user: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each entry's example (row) and each row's user: leave-one-out, or ``folds`` random folds."""
        if self.cfg.folds == 0:
            return np.arange(len(pair_user)), pair_user
        k = np.minimum(counts, self.cfg.folds)[pair_user]
        fold = np.minimum((self.rng.random(len(pair_user)) * k).astype(np.int64), k - 1)
        rows, row = np.unique(pair_user * self.cfg.folds + fold, return_inverse=True)
        return row.astype(np.int64), rows // self.cfg.folds

    @property
    def scoring(self) -> _TwoTowerModule:
        """The module that scores (validation, final state): the averaged one when ``ema_decay`` > 0."""
        return self.module if self.average is None else self.average

    def _update_average(self) -> None:
        """``avg = d avg + (1 - d) live`` with ``d = min(ema_decay, (1 + t) / (10 + t))`` (warm start)."""
        self.steps += 1
        if self.average is None:
            return
        decay = min(self.cfg.ema_decay, (1.0 + self.steps) / (10.0 + self.steps))
        with torch.no_grad():
            for avg, live in zip(self.average.parameters(), self.module.parameters(), strict=True):
                avg.lerp_(live, 1.0 - decay)

    def score(self, histories: Histories) -> np.ndarray:
        self.module.eval()
        feats = user_features(histories.users, self.attributes)
        return _run(
            self.scoring,
            histories,
            feats,
            "forward",
            histories.n_items,
            self.cfg.score_batch_size,
            self.device,
        )


def _user_batches(users: np.ndarray, lengths: np.ndarray, pairs: int) -> list[np.ndarray]:
    """Split ``users`` (in order) into batches of about ``pairs`` positives each."""
    before = np.cumsum(lengths[users]) - lengths[users]
    cuts = np.flatnonzero(np.diff(before // max(pairs, 1))) + 1
    return np.split(users, cuts)


def _linear(n_in: int, n_out: int, gen: torch.Generator, bias: bool = True) -> torch.nn.Linear:
    """A Linear layer initialised from a seeded generator (Xavier-normal weights, zero bias)."""
    layer = torch.nn.utils.skip_init(torch.nn.Linear, n_in, n_out, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, n_in, generator=gen) * math.sqrt(2.0 / (n_in + n_out)))
        if bias:
            layer.bias.zero_()
    return layer


class _ContentMap(torch.nn.Module):
    """Content vector -> tower space: linear, or one ReLU hidden layer."""

    def __init__(self, n_in: int, n_out: int, hidden: int, gen: torch.Generator) -> None:
        super().__init__()
        self.hidden = _linear(n_in, hidden, gen) if hidden else None
        self.out = _linear(hidden or n_in, n_out, gen)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        if self.hidden is not None:
            c = torch.relu(self.hidden(c))
        return self.out(c)


class _TwoTowerModule(torch.nn.Module):
    """Both towers; ``forward(history, user_features=None)`` (padded history -> scores) is the ONNX graph."""

    user_feature_names: tuple[str, ...] = ()  # attribute columns of forward's user_features

    content: torch.Tensor
    id_ok: torch.Tensor

    def __init__(
        self,
        cfg: TwoTowerConfig,
        content: torch.Tensor,
        id_ok: torch.Tensor,
        n_attributes: int,
        gen: torch.Generator,
    ) -> None:
        super().__init__()
        n_items, d_c = content.shape
        d = cfg.dim
        self.register_buffer("content", content)
        self.register_buffer("id_ok", id_ok)
        self.alpha = cfg.alpha
        self.decay = 0.0 if cfg.half_life is None else math.log(2.0) / cfg.half_life
        self.shared = cfg.history == "shared"
        self.use_bias = cfg.item_bias
        self.n_items = n_items
        self.item_id = torch.nn.Parameter(torch.randn(n_items, d, generator=gen) * INIT_STD)
        self.item_id_bias = torch.nn.Parameter(torch.zeros(n_items))
        self.item_content = _ContentMap(d_c, d, cfg.content_hidden, gen)
        self.content_bias = _linear(d_c, 1, gen)
        # The "unknown item" token: what an item without an id part adds (learned from rare targets).
        self.item_cold = torch.nn.Parameter(torch.zeros(d))
        self.item_cold_bias = torch.nn.Parameter(torch.zeros(1))
        self.cold_offset = cfg.cold_offset
        if not self.shared:
            self.history_id = torch.nn.Parameter(torch.randn(n_items, d, generator=gen) * INIT_STD)
            self.history_content = _ContentMap(d_c, d, cfg.content_hidden, gen)
            self.history_cold = torch.nn.Parameter(torch.zeros(d))
        h = cfg.user_hidden
        self.user_in = _linear(d, h, gen) if h else None
        self.user_out = _linear(h, d, gen) if h else None
        self.user_attr = _linear(n_attributes, h or d, gen, bias=h == 0) if n_attributes else None

    @classmethod
    def initial(
        cls,
        cfg: TwoTowerConfig,
        content: np.ndarray,
        id_ok: np.ndarray,
        n_attributes: int,
        gen: torch.Generator,
    ) -> _TwoTowerModule:
        return cls(
            cfg, torch.from_numpy(content.astype(np.float32)), torch.from_numpy(id_ok), n_attributes, gen
        )

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], cfg: TwoTowerConfig) -> _TwoTowerModule:
        n_attributes = state["user_attr.weight"].shape[1] if "user_attr.weight" in state else 0
        gen = torch.Generator().manual_seed(0)  # shapes only: every value is overwritten below
        module = cls.initial(cfg, state["content"], state["id_ok"], n_attributes, gen)
        module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        return module

    # -- towers -------------------------------------------------------------------------------------
    def content_vectors(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Item tower of items WITHOUT an id part (content ``c``): ``P(c) + e0``, ``w . c + b0 + offset``.

        ``e0``/``b0`` are the learned "unknown item" token; ``offset`` is ``cold_offset`` (scoring only).
        """
        bias = self.content_bias(c).squeeze(1) + self.item_cold_bias + self.cold_offset
        return self.item_content(c) + self.item_cold, bias if self.use_bias else torch.zeros_like(bias)

    def item_vectors(
        self, keep: torch.Tensor | None = None, training: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Item tower over the catalog: ``e = P(c) + k E + (1 - k0) e0``, ``b`` likewise.

        ``k0`` = ``id_ok`` (the item has enough positives for an id part), ``k = k0 * keep`` (``keep``:
        this step's id dropout). ``cold_offset`` is added to id-less items' biases only when not training.
        """
        k = self.id_ok if keep is None else self.id_ok * keep
        cold = 1.0 - self.id_ok
        vectors = self.item_content(self.content) + k.unsqueeze(1) * self.item_id
        vectors = vectors + cold.unsqueeze(1) * self.item_cold
        bias = self.content_bias(self.content).squeeze(1) + k * self.item_id_bias
        bias = bias + cold * (self.item_cold_bias + (0.0 if training else self.cold_offset))
        return vectors, bias if self.use_bias else torch.zeros_like(bias)

    def history_vectors(self, keep: torch.Tensor | None, items: torch.Tensor) -> torch.Tensor:
        """History-side vectors ``h`` over the catalog (``items``: the item tower's, for ``shared``)."""
        if self.shared:
            return items
        k = self.id_ok if keep is None else self.id_ok * keep
        cold = (1.0 - self.id_ok).unsqueeze(1) * self.history_cold
        return self.history_content(self.content) + k.unsqueeze(1) * self.history_id + cold

    def user_tower(self, pooled: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """``u = p + W2 relu(W1 p + A a + b1) + b2`` (``p + A a + b`` without a hidden layer)."""
        if self.user_in is None or self.user_out is None:
            if self.user_attr is not None and features is not None:
                return pooled + self.user_attr(features)
            if self.user_attr is not None and self.user_attr.bias is not None:
                return pooled + self.user_attr.bias
            return pooled
        hidden = self.user_in(pooled)
        if self.user_attr is not None and features is not None:
            hidden = hidden + self.user_attr(features)
        return pooled + self.user_out(torch.relu(hidden))

    def pool(self, history: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Recency-weighted, ``weight^-alpha``-normalised sum of history vectors; -1 padding ignored."""
        valid = (history >= 0) & (history < self.n_items)
        index = torch.where(valid, history, torch.zeros_like(history))
        mask = valid.to(torch.float32)
        position = torch.cumsum(mask, dim=1) - 1.0  # rank among valid entries, oldest = 0
        length = mask.sum(dim=1, keepdim=True)
        weights = torch.exp((position - (length - 1.0)) * self.decay) * mask
        summed = (vectors[index] * weights.unsqueeze(2)).sum(dim=1)
        total = torch.clamp(weights.sum(dim=1, keepdim=True), min=MIN_WEIGHT)
        return summed * torch.pow(total, -self.alpha)

    def users(self, history: torch.Tensor, user_features: torch.Tensor | None = None) -> torch.Tensor:
        items, _ = self.item_vectors()
        return self.user_tower(self.pool(history, self.history_vectors(None, items)), user_features)

    def forward(self, history: torch.Tensor, user_features: torch.Tensor | None = None) -> torch.Tensor:
        """``float32 [B, n_items]`` scores; ``user_features`` (``[B, f]``) optional: None = unknown user."""
        items, bias = self.item_vectors()
        pooled = self.pool(history, self.history_vectors(None, items))
        return self.user_tower(pooled, user_features) @ items.T + bias

    # -- training -----------------------------------------------------------------------------------
    def loss(
        self,
        flat: torch.Tensor,
        weights: torch.Tensor,
        pair_user: torch.Tensor,
        n_users: int,
        row: torch.Tensor,
        row_user: torch.Tensor,
        features: torch.Tensor | None,
        id_dropout: float,
        gen: torch.Generator,
    ) -> torch.Tensor:
        """Mean full-softmax cross-entropy of each positive given its user's positives OUTSIDE its fold.

        ``flat``: the batch users' histories concatenated (each entry is also a target), ``weights`` their
        recency weights, ``pair_user`` the batch row of each entry's user. ``row`` puts each entry in a
        fold (one example: the user's history minus that fold, predicting each entry of the fold) and
        ``row_user`` is each fold's user; ``row = arange(len(flat))`` is leave-one-out. Ids of a random
        ``id_dropout`` share of the catalog are dropped for this step, on both sides.
        """
        keep = None
        if id_dropout > 0.0:
            keep = (torch.rand(self.n_items, generator=gen, device=flat.device) >= id_dropout).to(
                torch.float32
            )
        items, bias = self.item_vectors(keep, training=True)
        h = self.history_vectors(keep, items)[flat] * weights.unsqueeze(1)
        n_rows, d = len(row_user), h.shape[1]
        sums = torch.zeros(n_users, d, device=flat.device).index_add(0, pair_user, h)
        totals = torch.zeros(n_users, device=flat.device).index_add(0, pair_user, weights)
        fold_sums = torch.zeros(n_rows, d, device=flat.device).index_add(0, row, h)
        fold_totals = torch.zeros(n_rows, device=flat.device).index_add(0, row, weights)
        rest = torch.clamp(totals[row_user] - fold_totals, min=MIN_WEIGHT).unsqueeze(1)
        pooled = (sums[row_user] - fold_sums) * torch.pow(rest, -self.alpha)
        feats = None if features is None else features[row_user]
        logits = self.user_tower(pooled, feats) @ items.T + bias
        return -torch.log_softmax(logits, dim=1)[row, flat].mean()
