"""BPR with a history encoder: pairwise ranking on item factors, users folded in from their history.

Classic BPR-MF learns one vector per training user, which a history-scored contract cannot use for a new
user without an optimisation at serving time. Here the user vector is a function of the history, learned
jointly with the item factors (as in FISM / asymmetric SVD):

    u(h) = |h| ** -alpha * sum_{j in h} W_j        score(h, i) = b_i + u(h) . V_i

``W`` ("context" factors) and ``V`` (item factors) are ``[n_items, factors]``, ``b`` the item biases.
Training minimises the BPR loss ``-log sigmoid(score(h_u, i) - score(h_u, j))`` over each training
positive ``(u, i)`` with one uniformly sampled negative ``j``, where ``h_u`` leaves ``i`` out (so the
model cannot score an item by recognising it in its own history). The same fold-in serves training
users, new users and fresh events, is one multi-hot matmul in the exported graph, and needs no
per-user state. On the validation carve it beat BPR-MF scored with its own user vectors, and BPR-MF's
item factors with any fold-in tried (mean of item factors, a ridge map history -> user factors, a few
full-gradient BPR steps), on every seed: learning the fold-in with the factors is what pays.

Training is plain PyTorch on CPU: seeded generators, Adam, vectorised mini-batches of users, each step
taking every positive of its users once (so a history sum is gathered once per user per epoch, not once
per positive: an epoch costs O(interactions x factors)). Memory is ``3 x n_items x factors`` floats.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar, Self

import numpy as np
import torch
from pydantic import Field

from fuserec.api import Algorithm, AlgorithmConfig, FloatRange, Histories, IntRange, SearchDim, multi_hot
from fuserec.histories import concat_ranges

if TYPE_CHECKING:
    from fuserec.data.dataset import Dataset

INIT_STD = 0.01
NEGATIVE_RETRIES = 10  # rounds of resampling negatives that hit a positive of their user (cheap: few hit)


class BPRConfig(AlgorithmConfig):
    search_space: ClassVar[dict[str, SearchDim]] = {
        "factors": IntRange(16, 256, log=True),
        "epochs": IntRange(10, 80, log=True),
        "lr": FloatRange(1e-3, 2e-2, log=True),
        "reg": FloatRange(1e-5, 1e-2, log=True),
        "alpha": FloatRange(0.0, 1.0),
    }

    factors: int = Field(64, ge=1, description="dimension of item, context and user vectors")
    epochs: int = Field(40, ge=1, description="passes over the training positives")
    lr: float = Field(0.005, gt=0.0, description="Adam learning rate")
    reg: float = Field(1e-3, ge=0.0, description="L2 penalty on user vectors and sampled item factors")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="history normalisation: u = |h|^-alpha * sum W")
    batch_size: int = Field(1024, ge=1, description="about this many (user, pos, neg) triples per step")
    score_batch_size: int = Field(1024, ge=1, description="histories scored per block in score()")
    threads: int = Field(1, ge=1, description="torch threads while training; small steps run fastest on one")


class BPR(Algorithm):
    Config = BPRConfig
    config: BPRConfig
    _module: _BPRModule | None  # built lazily from the fitted state

    def fit(self, data: Dataset) -> Self:
        previous = torch.get_num_threads()
        torch.set_num_threads(self.config.threads)
        try:
            return self._fit(data)
        finally:
            torch.set_num_threads(previous)

    def _fit(self, data: Dataset) -> Self:
        cfg = self.config
        n_items = data.n_items
        csr = data.histories().to_csr()  # unique items per user
        indptr, items = csr.indptr.astype(np.int64), csr.indices.astype(np.int64)
        lengths = np.diff(indptr)
        known = np.repeat(np.arange(len(lengths)), lengths) * n_items + items  # sorted (user, item) codes

        gen = torch.Generator().manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        module = _BPRModule.initial(n_items, cfg.factors, cfg.alpha, gen)
        opt = torch.optim.Adam(module.parameters(), lr=cfg.lr)
        items_t = torch.from_numpy(items)
        self.losses_: list[float] = []
        active = np.flatnonzero(lengths)
        for _ in range(cfg.epochs if len(items) else 0):
            total = 0.0
            for users in _user_batches(rng.permutation(active), lengths, cfg.batch_size):
                # Every positive of these users once; each user's history sum is gathered once.
                counts = lengths[users]
                take = concat_ranges(indptr[users], counts)
                pair_user = np.repeat(np.arange(len(users)), counts)
                neg = _sample_negatives(rng, users[pair_user], n_items, known)
                loss = module.bpr_loss(
                    items_t[take],
                    torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]])),
                    torch.from_numpy(pair_user),
                    torch.from_numpy(counts[pair_user]),
                    torch.from_numpy(neg),
                    cfg.reg,
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(take)
            self.losses_.append(total / len(items))
        self._set_params(module)
        self.n_items_ = n_items
        return self

    def _set_params(self, module: _BPRModule) -> None:
        self.context_ = module.context.detach().numpy().copy()
        self.item_factors_ = module.items.detach().numpy().copy()
        self.item_bias_ = module.bias.detach().numpy().copy()
        self._module = None

    def _scorer(self) -> _BPRModule:
        module: _BPRModule | None = getattr(self, "_module", None)
        if module is None:
            module = self._module = _BPRModule(
                torch.from_numpy(self.context_),
                torch.from_numpy(self.item_factors_),
                torch.from_numpy(self.item_bias_),
                self.config.alpha,
            ).eval()
        return module

    def _blocks(self, histories: Histories) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Row indices and dense multi-hot of each block of ``score_batch_size`` histories."""
        step = self.config.score_batch_size
        for start in range(0, len(histories), step):
            rows = np.arange(start, min(start + step, len(histories)))
            yield rows, torch.from_numpy(histories.select(rows).to_csr().toarray())

    def score(self, histories: Histories) -> np.ndarray:
        self._check_fitted()
        module = self._scorer()
        out = np.empty((len(histories), histories.n_items), dtype=np.float32)
        with torch.no_grad():
            for rows, hot in self._blocks(histories):
                out[rows] = module.from_multi_hot(hot).numpy()
        return out

    def user_representation(self, histories: Histories) -> np.ndarray:
        """The folded-in user vectors ``u(h)``, ``[n_users, factors]``."""
        self._check_fitted()
        out = np.empty((len(histories), self.config.factors), dtype=np.float32)
        with torch.no_grad():
            for rows, hot in self._blocks(histories):
                out[rows] = self._scorer().user_vectors(hot).numpy()
        return out

    def item_representation(self) -> np.ndarray:
        """Item factors ``V`` (what user vectors are dotted with)."""
        return self.item_factors_

    def explain(self, history: np.ndarray, item: int) -> dict[str, object]:
        """Each history item's share of ``u(h) . V_item`` (the score is linear in the history)."""
        hist = np.unique(history)
        norm = max(len(hist), 1) ** -self.config.alpha
        parts = {int(j): float(norm * self.context_[j] @ self.item_factors_[item]) for j in hist}
        ranked = sorted(parts.items(), key=lambda kv: -kv[1])
        return {"score": float(self.item_bias_[item] + sum(parts.values())), "contributions": ranked}

    def to_torch(self) -> torch.nn.Module:
        self._check_fitted()
        return self._scorer()

    def get_state(self) -> dict[str, np.ndarray]:
        return {"context": self.context_, "item_factors": self.item_factors_, "item_bias": self.item_bias_}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.context_ = state["context"].astype(np.float32)
        self.item_factors_ = state["item_factors"].astype(np.float32)
        self.item_bias_ = state["item_bias"].astype(np.float32)
        self._module = None


def _user_batches(users: np.ndarray, lengths: np.ndarray, pairs: int) -> list[np.ndarray]:
    """Split ``users`` (in order) into batches of about ``pairs`` positives each."""
    before = np.cumsum(lengths[users]) - lengths[users]
    cuts = np.flatnonzero(np.diff(before // max(pairs, 1))) + 1
    return np.split(users, cuts)


def _sample_negatives(
    rng: np.random.Generator, users: np.ndarray, n_items: int, known: np.ndarray
) -> np.ndarray:
    """Uniform items, resampled a few times where they hit one of the user's positives (``known``: sorted)."""
    neg = rng.integers(0, n_items, size=len(users))
    for _ in range(NEGATIVE_RETRIES):
        codes = users * n_items + neg
        at = np.minimum(np.searchsorted(known, codes), max(len(known) - 1, 0))
        hit = known[at] == codes
        if not hit.any():
            break
        neg[hit] = rng.integers(0, n_items, size=int(hit.sum()))
    return neg


class _BPRModule(torch.nn.Module):
    """Parameters and scoring; ``forward`` (padded history -> scores) is the exported graph."""

    def __init__(self, context: torch.Tensor, items: torch.Tensor, bias: torch.Tensor, alpha: float) -> None:
        super().__init__()
        self.context = torch.nn.Parameter(context)
        self.items = torch.nn.Parameter(items)
        self.bias = torch.nn.Parameter(bias)
        self.alpha = alpha

    @classmethod
    def initial(cls, n_items: int, factors: int, alpha: float, gen: torch.Generator) -> _BPRModule:
        def normal() -> torch.Tensor:
            return torch.randn(n_items, factors, generator=gen) * INIT_STD

        return cls(normal(), normal(), torch.zeros(n_items), alpha)

    def _norm(self, length: torch.Tensor) -> torch.Tensor:
        return torch.pow(torch.clamp(length, min=1.0), -self.alpha)

    def user_vectors(self, hot: torch.Tensor) -> torch.Tensor:
        """``u(h)`` from binary ``[B, n_items]`` histories."""
        return (hot @ self.context) * self._norm(hot.sum(dim=1, keepdim=True))

    def from_multi_hot(self, hot: torch.Tensor) -> torch.Tensor:
        return self.user_vectors(hot) @ self.items.T + self.bias

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return self.from_multi_hot(multi_hot(history, self.items.shape[0]))

    def bpr_loss(
        self,
        flat: torch.Tensor,
        offsets: torch.Tensor,
        pair_user: torch.Tensor,
        pair_length: torch.Tensor,
        neg: torch.Tensor,
        reg: float,
    ) -> torch.Tensor:
        """Mean BPR loss over every positive of a batch of users (``flat``: their histories, concatenated).

        The positive of each pair is ``flat`` itself; its user vector leaves it out of the history sum.
        """
        sums = torch.nn.functional.embedding_bag(flat, self.context, offsets, mode="sum")
        rest = (pair_length - 1).to(torch.float32).unsqueeze(1)
        user = (sums[pair_user] - self.context[flat]) * self._norm(rest)
        v_pos, v_neg = self.items[flat], self.items[neg]
        diff = (user * (v_pos - v_neg)).sum(dim=1) + self.bias[flat] - self.bias[neg]
        penalty = (user.square().sum(1) + v_pos.square().sum(1) + v_neg.square().sum(1)).mean()
        return -torch.nn.functional.logsigmoid(diff).mean() + reg * penalty
