"""A neural rating model over history-encoded users and content-aware items.

``r̂(h, j) = low + (high − low) · σ(MLP([H; C_j; H ⊙ C_j]) + w·[H; C_j; H ⊙ C_j] + b_j)``, ``[low, high]``
the training range (so a rating never leaves it).

- ``C_j = Q_j + W_c f_j`` is the item: a learned embedding plus a projection of its content features
  ``f_j`` (``side.item_features``; without them the embedding alone), and ``b_j = β_j + w_b·f_j`` its
  bias. An item no training rating reached keeps ``Q_j = β_j = 0``, so it is rated from its content alone.
- ``H`` is the user, a function of the rated history ``h`` (never a per-user parameter, so a new user or a
  fresh rating is folded in for free, by the forward pass itself). With ``e_i = Y_i + W_h f_i`` the history
  side of item ``i``, ``n = |h|``, ``a_i = r_i − μ − b̃_i`` a rating's residual from the global mean and
  the item's ALS baseline, and ``o = Σ a_i / (n + mean_prior)`` the user's shrunk mean residual (a bias
  estimate), a linear encoder reads ``[n^-α Σ (a_i − o) e_i ; n^-α Σ e_i ; o ; log(1 + n)]``: the rating-
  weighted and the plain sum of the history, as in Koren's asymmetric SVD, the user's offset and how much
  evidence there is. A projection of the user's attributes (``side.user_features``, looked up through
  ``Histories.users``; zeros for a user it does not know) is added.
- A plain linear ``W·[H; C_j] + b`` would be additive: the same user shift for every item, no interaction.
  The product ``H ⊙ C_j`` (through the linear "wide" term it is a learned dot product, as in matrix
  factorisation) and the hidden ReLU layer over it (with dropout) let a user like some items and not
  others.

Training: Adam on the squared error in minibatches of whole users (each user's history sums are gathered
once per step and every rating of the user is a target). The history of target ``(u, j)`` is ``u``'s
*other* ratings: the target's terms are subtracted from the sums, otherwise the model would learn to read
the answer from its input. Early stopping watches the RMSE of an inner carve of the training ratings
(``validation_share``), predicted from the rest as serving predicts; each epoch without a gain multiplies
the learning rate by ``lr_decay``, and the best epoch's parameters are kept. Seeded torch generators
(initial weights, dropout) make a CPU fit repeatable.

Serving and :meth:`NeuralRater.estimate` run one module, :meth:`NeuralRater.to_torch`, on padded
histories, so the exported graph is the measured model. Content is folded into per-item tables after
fitting (``e_i``, ``C_j`` and ``b_j`` are stored, not ``Y``, ``Q``, ``W``), so the state holds no item
feature matrix; the training users' attribute table is kept to look known users up.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import torch
from pydantic import Field

from fuserec.api import Choice, FloatRange, IntRange, SearchDim
from fuserec.histories import PAD, Histories, concat_ranges
from fuserec.rating import RatingAlgorithm, RatingConfig, RatingData
from fuserec.rating_ops import als_baselines, padded_entries, rows_by_length
from fuserec.training import resolve_device, torch_threads

INIT_STD = 0.05
#: ``estimate`` runs blocks of at most this many ``rows x (history + items) x dim`` cells.
ESTIMATE_CELLS = 1 << 22
NET_PREFIX = "net."
#: The item baselines that centre history ratings: Surprise's ALS baseline settings.
BASELINE_REG_USERS, BASELINE_REG_ITEMS, BASELINE_SWEEPS = 15.0, 10.0, 10


class NeuralRaterConfig(RatingConfig):
    """Defaults chosen on an inner carve of an ML-100k training fold (see docs/concepts/rating.md)."""

    search_space: ClassVar[dict[str, SearchDim]] = {
        "dim": IntRange(8, 128, log=True),
        "hidden": IntRange(8, 256, log=True),
        "lr": FloatRange(3e-4, 1e-2, log=True),
        "weight_decay": FloatRange(1e-5, 3e-3, log=True),
        "dropout": FloatRange(0.0, 0.5),
        "history_norm": FloatRange(0.0, 1.0),
        "batch_size": Choice((256, 512, 1024, 2048)),
        "lr_decay": FloatRange(0.2, 1.0),
    }

    dim: int = Field(64, ge=1, description="dimension of item embeddings and of the user vector H")
    hidden: int = Field(64, ge=1, description="width of the hidden layer over [H; C; H⊙C]")
    max_epochs: int = Field(40, ge=1, description="upper bound on epochs; early stopping usually ends sooner")
    lr: float = Field(0.003, gt=0.0, le=1.0, description="Adam learning rate")
    weight_decay: float = Field(1e-3, ge=0.0, description="Adam's (coupled) L2 penalty on every parameter")
    lr_decay: float = Field(
        0.5, gt=0.0, le=1.0, description="learning-rate factor after each epoch without a validation gain"
    )
    dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="dropout on the hidden layer's input while training"
    )
    batch_size: int = Field(1024, ge=1, description="about this many target ratings per step (whole users)")
    history_norm: float = Field(0.5, ge=0.0, le=1.0, description="α of the n^-α scaling of history sums")
    mean_prior: float = Field(
        3.0, ge=0.0, description="pseudo-ratings at zero that shrink a short history's mean residual"
    )
    item_baselines: bool = Field(
        True, description="centre history ratings on ALS item baselines (else on the global mean)"
    )
    validation_share: float = Field(
        0.05, ge=0.0, lt=1.0, description="share of the training ratings carved out for early stopping"
    )
    patience: int = Field(3, ge=1, description="epochs without a validation gain before stopping")
    threads: int | None = Field(
        1,
        ge=1,
        description="torch CPU threads while training: small steps run fastest on one (None = torch's)",
    )
    device: str = Field(
        "cpu",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="where to train; cpu (default) is repeatable and fast enough for this small model",
    )


class _Head(torch.nn.Module):
    """The part shared by training and serving: history sums -> ``H``, and ``(H, C_j, b_j)`` -> rating."""

    def __init__(self, config: NeuralRaterConfig, n_attributes: int, low: float, high: float, dropout: float):
        super().__init__()
        dim = config.dim
        self.low, self.high = low, high
        self.alpha, self.prior = config.history_norm, config.mean_prior
        hidden = config.hidden
        self.encoder = torch.nn.Linear(2 * dim + 2, dim)
        self.attributes = torch.nn.Linear(n_attributes, dim, bias=False) if n_attributes else None
        self.hidden = torch.nn.Linear(3 * dim, hidden)
        self.out = torch.nn.Linear(hidden, 1)
        self.wide = torch.nn.Linear(3 * dim, 1)
        self.dropout = dropout
        self.noise: torch.Generator | None = None  # seeded dropout masks while training

    def user(
        self,
        sum_e: torch.Tensor,
        sum_ae: torch.Tensor,
        sum_a: torch.Tensor,
        n: torch.Tensor,
        attributes: torch.Tensor | None,
    ) -> torch.Tensor:
        """``H [..., d]`` from a history's sums ``Σe``, ``Σ a e``, ``Σ a`` and its length ``n``, where
        ``a = r − μ − b̃_i`` is a rating's residual from the global mean and its item's baseline."""
        offset = sum_a / (n + self.prior)  # the user's shrunk mean residual: a bias estimate
        centred = sum_ae - offset.unsqueeze(-1) * sum_e  # Σ (a − offset) e
        scale = torch.pow(torch.clamp(n, min=1.0), -self.alpha).unsqueeze(-1)
        z = torch.cat(
            [centred * scale, sum_e * scale, offset.unsqueeze(-1), torch.log1p(n).unsqueeze(-1)], dim=-1
        )
        h = self.encoder(z)
        if self.attributes is not None and attributes is not None:
            h = h + self.attributes(attributes)
        return h

    def rate(self, h: torch.Tensor, c: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Ratings of items ``(c, bias)`` for users ``h`` (broadcast over leading dims)."""
        x = torch.cat([h, c, h * c], dim=-1)
        dropped = x
        if self.training and self.dropout > 0.0:
            keep = torch.rand(x.shape, generator=self.noise, device=x.device) >= self.dropout
            dropped = x * keep / (1.0 - self.dropout)
        logit = self.out(torch.relu(self.hidden(dropped))) + self.wide(x)
        return self.low + (self.high - self.low) * torch.sigmoid(logit.squeeze(-1) + bias)


class NeuralRatingModule(torch.nn.Module):
    """The served form: ``forward(history, history_ratings, items[, user_features]) -> float32 [B, m]``.

    ``history int64 [B, L]`` padded with -1 (anything outside ``[0, n_items)`` is padding and contributes
    nothing), ``history_ratings float32 [B, L]``, ``items int64 [B, m]``, ``user_features float32 [B, g]``
    (optional: left out, or zeros, for a user whose attributes are unknown).
    """

    user_feature_names: tuple[str, ...] = ()
    n_user_features: int = 1

    def __init__(
        self,
        history_vectors: torch.Tensor,
        item_vectors: torch.Tensor,
        item_bias: torch.Tensor,
        baseline: torch.Tensor,
        head: _Head,
    ):
        super().__init__()
        self.baseline = torch.nn.Parameter(baseline, requires_grad=False)
        self.history_vectors = torch.nn.Parameter(history_vectors, requires_grad=False)
        self.item_vectors = torch.nn.Parameter(item_vectors, requires_grad=False)
        self.item_bias = torch.nn.Parameter(item_bias, requires_grad=False)
        self.head = head

    def forward(
        self,
        history: torch.Tensor,
        history_ratings: torch.Tensor,
        items: torch.Tensor,
        user_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n_items = self.history_vectors.shape[0]
        valid = (history >= 0) & (history < n_items)
        mask = valid.to(torch.float32)
        safe = torch.where(valid, history, 0)
        e = self.history_vectors[safe] * mask.unsqueeze(-1)  # [B, L, d]
        # where(), not a product: a padding rating may be anything, NaN included
        a = torch.where(valid, history_ratings - self.baseline[safe], torch.zeros_like(history_ratings))
        h = self.head.user(e.sum(1), (a.unsqueeze(-1) * e).sum(1), a.sum(1), mask.sum(1), user_features)
        c = self.item_vectors[items]  # [B, m, d]
        return self.head.rate(h.unsqueeze(1).expand_as(c), c, self.item_bias[items])


class _Trainable(torch.nn.Module):
    """Raw parameters while fitting: embeddings, content projections and the head."""

    def __init__(
        self, n_items: int, content: torch.Tensor | None, head: _Head, dim: int, gen: torch.Generator
    ):
        super().__init__()
        self.history = torch.nn.Parameter(torch.randn(n_items, dim, generator=gen) * INIT_STD)
        self.target = torch.nn.Parameter(torch.randn(n_items, dim, generator=gen) * INIT_STD)
        self.bias = torch.nn.Parameter(torch.zeros(n_items))
        self.content = content  # fixed features, on the training device already
        f = 0 if content is None else content.shape[1]
        self.history_content = torch.nn.Linear(f, dim, bias=False) if f else None
        self.target_content = torch.nn.Linear(f, dim + 1, bias=False) if f else None
        with torch.no_grad():
            for layer in (self.history_content, self.target_content):
                if layer is not None:
                    layer.weight.normal_(0.0, INIT_STD, generator=gen)
        self.head = head

    def history_side(self, items: torch.Tensor) -> torch.Tensor:
        e = self.history[items]
        if self.history_content is not None and self.content is not None:
            e = e + self.history_content(self.content[items])
        return e

    def target_side(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, b = self.target[items], self.bias[items]
        if self.target_content is not None and self.content is not None:
            extra = self.target_content(self.content[items])
            c, b = c + extra[..., :-1], b + extra[..., -1]
        return c, b

    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(e [n, d], C [n, d], b [n])`` of every item, content folded in."""
        every = torch.arange(self.history.shape[0], device=self.history.device)
        c, b = self.target_side(every)
        return self.history_side(every), c, b


class _Ratings:
    """Training triples grouped by user (CSR), as tensors on the training device."""

    def __init__(
        self,
        users: np.ndarray,
        items: np.ndarray,
        ratings: np.ndarray,
        baseline: np.ndarray,
        n_users: int,
        device: torch.device,
    ):
        order = np.lexsort((items, users))
        counts = np.bincount(users, minlength=n_users)
        self.indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.lengths = counts.astype(np.int64)
        self.items = torch.from_numpy(items[order].astype(np.int64)).to(device)
        self.ratings = torch.from_numpy(ratings[order].astype(np.float32)).to(device)
        self.residuals = self.ratings - torch.from_numpy(baseline.astype(np.float32)).to(device)[self.items]
        self.device = device

    def sums(self, model: _Trainable, users: np.ndarray) -> tuple[torch.Tensor, ...]:
        """``(e, Σe, Σae, Σa, n, owner, take)`` of ``users``' histories: ``e`` per entry, sums per user;
        ``owner`` is each entry's place in ``users``, ``take`` its position in the CSR arrays."""
        counts = self.lengths[users]
        take = torch.from_numpy(concat_ranges(self.indptr[users], counts)).to(self.device)
        owner = torch.from_numpy(np.repeat(np.arange(len(users)), counts)).to(self.device)
        items, a = self.items[take], self.residuals[take]
        e = model.history_side(items)
        size = (len(users), e.shape[1])
        sum_e = torch.zeros(size, device=self.device).index_add(0, owner, e)
        sum_ae = torch.zeros(size, device=self.device).index_add(0, owner, a.unsqueeze(-1) * e)
        sum_a = torch.zeros(len(users), device=self.device).index_add(0, owner, a)
        n = torch.from_numpy(counts.astype(np.float32)).to(self.device)
        return e, sum_e, sum_ae, sum_a, n, owner, take


def _user_batches(users: np.ndarray, lengths: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """``users`` (in order) in batches of about ``size`` ratings each (a long history is a batch alone)."""
    before = np.cumsum(lengths[users]) - lengths[users]
    cuts = np.flatnonzero(np.diff(before // max(size, 1))) + 1
    yield from (b for b in np.split(users, cuts) if len(b))


def _attribute_rows(table: np.ndarray, users: np.ndarray | None, n: int) -> np.ndarray:
    """``float32 [n, g]``: the table's row of each known user (``users[b]`` in range), zeros otherwise."""
    out = np.zeros((n, table.shape[1]), dtype=np.float32)
    if users is None or table.shape[1] == 0:
        return out
    users = np.asarray(users, dtype=np.int64)
    known = (users >= 0) & (users < len(table))
    out[known] = table[users[known]]
    return out


def _names_array(names: tuple[str, ...]) -> np.ndarray:
    """Column names as UTF-8 JSON bytes: the state holds numeric arrays only."""
    return np.frombuffer(json.dumps(list(names)).encode(), dtype=np.uint8).copy()


def _names_from(array: np.ndarray) -> tuple[str, ...]:
    return tuple(str(n) for n in json.loads(np.asarray(array, dtype=np.uint8).tobytes().decode()))


class NeuralRater(RatingAlgorithm):
    Config = NeuralRaterConfig
    config: NeuralRaterConfig
    reads_user_features: ClassVar[bool] = True
    global_mean_: float
    params_: dict[str, np.ndarray]
    user_features_: np.ndarray
    user_feature_names_: tuple[str, ...]
    training_log_: list[dict[str, float]]
    _module: NeuralRatingModule | None

    # -- fitting ---------------------------------------------------------------------------------------
    def fit_ratings(self, data: RatingData) -> None:
        with torch_threads(self.config.threads):
            self._fit(data)

    def _fit(self, data: RatingData) -> None:
        cfg = self.config
        device = resolve_device(cfg.device)
        rng = np.random.default_rng(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        side = data.side
        attributes = (
            np.zeros((data.n_users, 0), np.float32)
            if side.user_features is None
            else np.asarray(side.user_features, dtype=np.float32)
        )
        content = None if side.item_features is None else np.asarray(side.item_features, dtype=np.float32)
        if content is not None and content.shape[1] == 0:
            content = None
        self.global_mean_ = data.global_mean
        low, high = self._output_range()
        head = _Head(cfg, attributes.shape[1], low, high, cfg.dropout)
        _init_head(head, gen, (self.global_mean_ - low) / (high - low))
        content_t = None if content is None else torch.from_numpy(content).to(device)
        model = _Trainable(data.n_items, content_t, head, cfg.dim, gen).to(device)
        head.noise = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        attributes_t = torch.from_numpy(attributes).to(device)

        carve = rng.random(len(data.ratings)) < cfg.validation_share
        if carve.all() or len(data.ratings) < 20:
            carve[:] = False
        part = RatingData(
            data.users[~carve], data.items[~carve], data.ratings[~carve], data.n_users, data.n_items
        )
        baseline = np.full(data.n_items, part.global_mean)
        if cfg.item_baselines:
            baseline += als_baselines(part, BASELINE_REG_USERS, BASELINE_REG_ITEMS, BASELINE_SWEEPS)[1]
        fit = _Ratings(part.users, part.items, part.ratings, baseline, data.n_users, device)
        val_users, val_items = data.users[carve], data.items[carve]
        val_ratings = data.ratings[carve]

        # Adam's coupled L2 shrinks a rarely rated item's embedding hard (its data gradient is rare, the
        # penalty is every step), so such items lean on content: better on ML-100k than a per-rating
        # penalty, AdamW, or a smaller decay on the dense layers (inner carve, 3 seeds)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        active = np.flatnonzero(fit.lengths)
        best = (math.inf, 0, {k: v.detach().clone() for k, v in model.state_dict().items()})
        stale = 0
        self.training_log_ = []
        for epoch in range(1, cfg.max_epochs + 1):
            model.train()
            total = 0.0
            for users in _user_batches(rng.permutation(active), fit.lengths, cfg.batch_size):
                e, sum_e, sum_ae, sum_a, n, owner, take = fit.sums(model, users)
                r, a = fit.ratings[take], fit.residuals[take]
                # leave the target out: its own term comes off its user's sums
                h = head.user(
                    sum_e[owner] - e,
                    sum_ae[owner] - a.unsqueeze(-1) * e,
                    sum_a[owner] - a,
                    n[owner] - 1.0,
                    attributes_t[torch.from_numpy(users).to(device)][owner],
                )
                c, b = model.target_side(fit.items[take])
                loss = torch.mean((head.rate(h, c, b) - r) ** 2)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(take)
            row = {"epoch": float(epoch), "loss": total / max(int(fit.lengths.sum()), 1)}
            if len(val_ratings):
                val = self._validation_rmse(model, fit, attributes_t, val_users, val_items, val_ratings)
                row["val_rmse"] = val
                if val < best[0] - 1e-5:
                    best = (val, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
                    stale = 0
                else:
                    stale += 1
                    for group in opt.param_groups:
                        group["lr"] *= cfg.lr_decay
            self.training_log_.append(row)
            if len(val_ratings) and stale >= cfg.patience:
                break
        if len(val_ratings):
            model.load_state_dict(best[2])
        self.best_epoch_ = best[1] if len(val_ratings) else cfg.max_epochs
        unseen = np.bincount(part.items, minlength=data.n_items) == 0  # never trained: content only
        self._keep(model, unseen, baseline, attributes, side.user_feature_names)

    @torch.no_grad()
    def _validation_rmse(
        self,
        model: _Trainable,
        fit: _Ratings,
        attributes: torch.Tensor,
        users: np.ndarray,
        items: np.ndarray,
        ratings: np.ndarray,
    ) -> float:
        """RMSE of held-out ratings predicted from the users' fit histories (as serving would)."""
        model.eval()
        every = np.arange(len(fit.lengths))
        _, sum_e, sum_ae, sum_a, n, _, _ = fit.sums(model, every)
        u = torch.from_numpy(users).to(fit.device)
        h = model.head.user(sum_e[u], sum_ae[u], sum_a[u], n[u], attributes[u])
        c, b = model.target_side(torch.from_numpy(items).to(fit.device))
        pred = model.head.rate(h, c, b).cpu().numpy().astype(np.float64)
        return float(np.sqrt(np.mean((pred - ratings) ** 2)))

    def _keep(
        self,
        model: _Trainable,
        unseen: np.ndarray,
        baseline: np.ndarray,
        attributes: np.ndarray,
        names: tuple[str, ...],
    ) -> None:
        """Fold content into per-item tables, zero what no rating trained, keep plain arrays."""
        with torch.no_grad():
            unseen_t = torch.from_numpy(unseen).to(model.history.device)
            model.history[unseen_t] = 0.0
            model.target[unseen_t] = 0.0
            model.bias[unseen_t] = 0.0
            e, c, b = model.tables()
        self.params_ = {
            "history_vectors": e.cpu().numpy().astype(np.float32),
            "item_vectors": c.cpu().numpy().astype(np.float32),
            "item_bias": b.cpu().numpy().astype(np.float32),
            "item_baseline": baseline.astype(np.float32),
            **{NET_PREFIX + k: v.detach().cpu().numpy().copy() for k, v in model.head.state_dict().items()},
        }
        self.user_features_ = attributes
        self.user_feature_names_ = tuple(str(n) for n in names) if attributes.shape[1] else ()
        self._module = None

    # -- serving ---------------------------------------------------------------------------------------
    def _output_range(self) -> tuple[float, float]:
        """The sigmoid's ``(low, high)``: the training range, widened when every rating was the same."""
        assert self.rating_range_ is not None
        low, high = self.rating_range_
        return (low - 0.5, high + 0.5) if high <= low else (low, high)

    def _scorer(self) -> NeuralRatingModule:
        module: NeuralRatingModule | None = getattr(self, "_module", None)
        if module is None:
            low, high = self._output_range()
            head = _Head(self.config, self.user_features_.shape[1], low, high, 0.0)
            head.load_state_dict(
                {
                    k[len(NET_PREFIX) :]: torch.from_numpy(np.asarray(v, dtype=np.float32))
                    for k, v in self.params_.items()
                    if k.startswith(NET_PREFIX)
                }
            )
            module = NeuralRatingModule(
                torch.from_numpy(self.params_["history_vectors"]),
                torch.from_numpy(self.params_["item_vectors"]),
                torch.from_numpy(self.params_["item_bias"]),
                torch.from_numpy(self.params_["item_baseline"]),
                head,
            ).eval()
            module.user_feature_names = self.user_feature_names_
            # the served graph always has a user_features input (reads_user_features is per class); a
            # model fitted without attributes takes one ignored column
            module.n_user_features = max(self.user_features_.shape[1], 1)
            self._module = module
        return module

    def to_torch(self) -> torch.nn.Module:
        """CPU module in eval mode (see :class:`NeuralRatingModule`); ``user_feature_names`` names the
        columns of its optional ``user_features`` input."""
        self._check_fitted()
        return self._scorer()

    def user_feature_rows(self, histories: Histories) -> np.ndarray:
        """``float32 [B, g]``: each history's attribute row through ``histories.users`` (zeros if unknown)."""
        return _attribute_rows(self.user_features_, histories.users, len(histories))

    def estimate(self, histories: Histories, items: np.ndarray) -> np.ndarray:
        assert histories.ratings is not None
        module = self._scorer()
        features = self.user_feature_rows(histories)
        out = np.zeros(items.shape, dtype=np.float32)
        if items.shape[1] == 0 or len(histories) == 0:
            return out
        width = self.config.dim * 3
        # one trailing padding entry, so the padded gather of an all-empty batch has something to read
        flat_items = np.append(histories.items, PAD)
        flat_ratings = np.append(histories.ratings, np.float32(0.0))
        with torch.no_grad():
            for rows in rows_by_length(histories.lengths + items.shape[1], ESTIMATE_CELLS // width, 1):
                entry, mask = padded_entries(histories, rows)
                history = np.where(mask, flat_items[entry], PAD)
                ratings = np.where(mask, flat_ratings[entry], 0.0).astype(np.float32)
                out[rows] = module(
                    torch.from_numpy(history),
                    torch.from_numpy(ratings),
                    torch.from_numpy(items[rows]),
                    torch.from_numpy(features[rows]) if features.shape[1] else None,
                ).numpy()
        return out

    # -- state -----------------------------------------------------------------------------------------
    def model_state(self) -> dict[str, np.ndarray]:
        return {
            **self.params_,
            "global_mean": np.asarray(self.global_mean_),
            "user_features": self.user_features_,
            "user_feature_names": _names_array(self.user_feature_names_),
        }

    def set_model_state(self, state: dict[str, np.ndarray]) -> None:
        self.global_mean_ = float(state["global_mean"])
        self.user_features_ = np.asarray(state["user_features"], dtype=np.float32)
        self.user_feature_names_ = _names_from(state["user_feature_names"])
        skip = ("global_mean", "user_features", "user_feature_names")
        self.params_ = {k: np.asarray(v, dtype=np.float32) for k, v in state.items() if k not in skip}
        self._module = None


def _init_head(head: _Head, gen: torch.Generator, start: float) -> None:
    """Seeded initial weights; the output starts at the global mean (σ⁻¹ of its place in the range)."""
    with torch.no_grad():
        for layer in (head.encoder, head.hidden, head.out, head.wide, head.attributes):
            if layer is None:
                continue
            bound = 1.0 / math.sqrt(max(layer.in_features, 1))
            layer.weight.uniform_(-bound, bound, generator=gen)
            if layer.bias is not None:
                layer.bias.zero_()
        head.wide.weight.mul_(0.1)
        start = min(max(start, 1e-3), 1 - 1e-3)
        assert head.wide.bias is not None
        head.wide.bias.fill_(math.log(start / (1 - start)))
