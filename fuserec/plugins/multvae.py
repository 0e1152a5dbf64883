"""Mult-VAE (Liang et al. 2018): a variational autoencoder with a multinomial likelihood over the catalog.

A user's history is a binary multi-hot ``x`` over the items. The encoder maps the L2-normalised (and, in
training, dropped-out) ``x`` through an MLP to a Gaussian ``q(z | x) = N(mu, diag(exp(logvar)))``; the
decoder maps a sample ``z`` through another MLP to logits over every item, and the likelihood is
multinomial: ``log p(x | z) = sum_i x_i log softmax(logits)_i``. The multinomial (rather than Gaussian or
logistic) likelihood is what makes it a ranking model: items compete for one unit of probability mass,
so the decoder spends its capacity on putting the held-out positives above the rest. Training maximises
the ELBO with the KL term weighted by ``beta``, annealed linearly from 0 to ``anneal_cap`` over
``anneal_steps`` optimiser steps (a full-weight KL over-regularises and loses accuracy; the paper's key
trick). Adam on mini-batches of users.

Why it fits the history-scored contract: the encoder IS a fold-in. Scoring takes the encoder mean
``mu`` (no sampling, no dropout), so it is deterministic and scores any history, including new users and
fresh events, with no per-user parameters. The exported graph is
``multi_hot(history) -> L2-normalise -> encoder -> mu -> decoder -> logits``.

Training on a small dataset is noisy: with a handful of optimiser steps per epoch, validation NDCG@10
moves from one epoch to the next, so early stopping would pick lucky or unlucky epochs. The weights that
score (validation, and the fitted model) are therefore an exponential moving average of the trained
weights (``ema_decay``), which flattens the curve; heavy input dropout regularises further.

Cost: an epoch is two dense ``[batch, n_items] x [n_items, hidden]`` products per step (forward and
back), about ``6 x users x n_items x hidden`` flops: on ML-100k (943 users, 1,682 items, hidden 600)
well under a second per epoch on one core. Memory is ``2 x n_items x hidden`` weights (plus Adam's
state). Epochs are chosen by :func:`fuserec.training.fit_early_stopped` (validation NDCG@10), then the
model is refit on all data for that many epochs. It defaults to one torch thread: these small steps run
slower on two threads of a busy machine.

The defaults were chosen on the validation carve only, over several seeds: no KL term (``anneal_cap`` 0,
a Mult-DAE-like model that keeps the sampling noise), batch 512 and input dropout 0.85 beat the
paper-like setting (an annealed KL cap, smaller batches, less dropout) on every seed.

A temporal split asks what comes next, so the input weighs recent items more (``recency_boost``,
``recency_half_life``: weight ``1 + boost * 0.5 ** (age / half_life)``, age 0 = the latest item; the same
weights are the reconstruction target; ``recency_boost`` 0 is the paper's binary input). The boost and
half-life were chosen on the validation carve; the measurements are in ``research/FINDINGS.md``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import Field

from fuserec.api import Algorithm, Choice, FloatRange, Histories, IntRange, SearchDim, hot_matmul, multi_hot
from fuserec.training import TorchConfig, fit_early_stopped, resolve_device, torch_threads

if TYPE_CHECKING:
    from fuserec.data.dataset import Dataset

BIAS_INIT_STD = 0.001  # as in the authors' code: Xavier-normal weights, near-zero random biases
NORM_EPS = 1e-12


class MultVAEConfig(TorchConfig):
    search_space: ClassVar[dict[str, SearchDim]] = {
        "hidden": Choice((0, 200, 600)),
        "latent": IntRange(32, 256, log=True),
        "dropout": FloatRange(0.0, 0.85),
        "anneal_cap": FloatRange(0.0, 1.0),
        "anneal_steps": IntRange(50, 5_000, log=True),
        "lr": FloatRange(3e-4, 1e-2, log=True),
        "weight_decay": FloatRange(1e-7, 1e-3, log=True),
        "batch_size": IntRange(32, 512, log=True),
        "ema_decay": FloatRange(0.0, 0.99),
    }

    hidden: int = Field(
        600, ge=0, description="width of the one tanh hidden layer of encoder and decoder (0: none)"
    )
    latent: int = Field(200, ge=1, description="dimension of z (and of user_representation)")
    dropout: float = Field(
        0.85, ge=0.0, lt=1.0, description="input dropout on the normalised history (training)"
    )
    anneal_cap: float = Field(
        0.0, ge=0.0, description="the largest KL weight beta (0: no KL term, the Mult-DAE-like variant)"
    )
    anneal_steps: int = Field(
        150,
        ge=0,
        description="optimiser steps over which beta rises linearly from 0 to anneal_cap (0: at once)",
    )
    lr: float = Field(2e-3, gt=0.0, description="Adam learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="Adam L2 weight decay on every parameter")
    batch_size: int = Field(512, ge=1, description="users per optimiser step")
    ema_decay: float = Field(
        0.95, ge=0.0, lt=1.0, description="score with an exponential moving average of the weights (0: off)"
    )
    recency_boost: float = Field(
        10.0,
        ge=0.0,
        description="extra input weight of recent items: 1 + boost * 0.5 ** (age / recency_half_life), "
        "age = 0 for the latest item (0: the binary history of the paper)",
    )
    recency_half_life: float = Field(5.0, gt=0.0, description="age (in items) at which the boost halves")
    score_batch_size: int = Field(1024, ge=1, description="histories scored per block in score()")
    max_epochs: int = Field(
        200, ge=1, description="upper bound on epochs (early stopping usually ends sooner)"
    )
    patience: int = Field(10, ge=1, description="epochs without a validation gain before stopping")
    threads: int | None = Field(
        1, ge=1, description="torch CPU threads while training; these small steps run fastest on one"
    )


class MultVAE(Algorithm):
    Config = MultVAEConfig
    config: MultVAEConfig
    _module: _VAEModule | None  # built lazily from the fitted state

    def fit(self, data: Dataset) -> Self:
        cfg = self.config
        with torch_threads(cfg.threads):
            device = resolve_device(cfg.device)
            trainer, log = fit_early_stopped(lambda d: _Trainer(d, cfg, device), data, cfg, "multvae")
        self.training_log_: list[dict[str, Any]] = log
        self.set_state({k: v.detach().cpu().numpy().copy() for k, v in trainer.average.state_dict().items()})
        self.n_items_ = data.n_items
        return self

    # -- scoring ------------------------------------------------------------------------------------
    def _scorer(self) -> _VAEModule:
        module: _VAEModule | None = getattr(self, "_module", None)
        if module is None:
            cfg = self.config
            module = self._module = _VAEModule.from_state(self.state_, cfg.hidden).eval()
            module.recency = (cfg.recency_boost, cfg.recency_half_life)
        return module

    def _run(self, histories: Histories, what: str, width: int) -> np.ndarray:
        self._check_fitted()
        module = self._scorer()
        out = np.empty((len(histories), width), dtype=np.float32)
        with torch.no_grad():
            cfg = self.config
            blocks = _blocks(
                histories, cfg.score_batch_size, torch.device("cpu"), cfg.recency_boost, cfg.recency_half_life
            )
            for rows, hot in blocks:
                out[rows] = getattr(module, what)(hot).numpy()
        return out

    def score(self, histories: Histories) -> np.ndarray:
        """Decoder logits at the encoder mean, ``float32 [n, n_items]`` (log-softmax only shifts rows)."""
        return self._run(histories, "from_multi_hot", histories.n_items)

    def user_representation(self, histories: Histories) -> np.ndarray:
        """The encoder mean ``mu``, ``[n_users, latent]``: where the history sits in the latent space."""
        return self._run(histories, "encode", self.config.latent)

    def item_representation(self) -> np.ndarray:
        """The decoder's output weights ``[n_items, d]`` (d = hidden, or latent without a hidden layer).

        An item's logit is ``a(h) . W_i + b_i`` where ``a(h)`` is the decoder's last activation, so these
        rows are the item vectors the model ranks with; they live in a different space from ``mu``
        whenever the decoder has a hidden layer.
        """
        self._check_fitted()
        return self.state_["dec_out.weight"]

    def explain(self, history: np.ndarray, item: int) -> dict[str, Any]:
        """Leave-one-out: how much ``item``'s score drops when each history item is removed.

        The model is non-linear, so these deltas need not sum to the score; they are exact for what they
        say (one extra batched forward pass of ``|history|`` histories) rather than a linearisation.
        """
        n_items = self._check_fitted()
        hist = np.unique(np.asarray(history, dtype=np.int64))
        lists = [hist.tolist()] + [np.delete(hist, j).tolist() for j in range(len(hist))]
        scores = self.score(Histories.from_lists(lists, n_items))[:, item]
        deltas = {int(j): float(scores[0] - scores[1 + k]) for k, j in enumerate(hist)}
        ranked = sorted(deltas.items(), key=lambda kv: -kv[1])
        return {"score": float(scores[0]), "method": "leave_one_out", "contributions": ranked}

    def to_torch(self) -> torch.nn.Module:
        self._check_fitted()
        return self._scorer()

    # -- persistence --------------------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        return dict(self.state_)

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.state_ = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}
        self._module = None


def _blocks(
    histories: Histories, step: int, device: torch.device, boost: float = 0.0, half_life: float = 10.0
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Row indices and dense (recency-weighted) multi-hot of each block of ``step`` histories."""
    for start in range(0, len(histories), step):
        rows = np.arange(start, min(start + step, len(histories)))
        yield rows, torch.from_numpy(weighted_rows(histories.select(rows), boost, half_life)).to(device)


def weighted_rows(histories: Histories, boost: float, half_life: float) -> np.ndarray:
    """``float32 [B, n_items]``: 1 + boost * 0.5 ** (age / half_life) per history item (max if repeated).

    Age counts items back from the latest (0). A temporal split asks what comes next, and the latest
    items say most about it; ``boost = 0`` gives the binary multi-hot.
    """
    out = np.zeros((len(histories), histories.n_items), dtype=np.float32)
    lengths = histories.lengths
    rows = np.repeat(np.arange(len(histories)), lengths)
    ends = np.repeat(histories.indptr[1:], lengths)
    age = (ends - 1 - np.arange(len(histories.items))).astype(np.float64)
    weight = (1.0 + boost * 0.5 ** (age / half_life)).astype(np.float32)
    np.maximum.at(out, (rows, histories.items), weight)
    return out


def kl_weight(step: int, cap: float, anneal_steps: int) -> float:
    """``beta`` after ``step`` optimiser steps: linear from 0 to ``cap`` over ``anneal_steps``, then flat."""
    if anneal_steps <= 0:
        return cap
    return cap * min(1.0, step / anneal_steps)


class _Trainer:
    """One model being trained on one dataset; what :func:`fit_early_stopped` drives epoch by epoch."""

    def __init__(self, data: Dataset, cfg: MultVAEConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        hist = data.histories()
        self.csr: sp.csr_matrix = sp.csr_matrix(weighted_rows(hist, cfg.recency_boost, cfg.recency_half_life))
        self.users = np.flatnonzero(np.diff(self.csr.indptr))  # users with no positive teach nothing
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        init = torch.Generator().manual_seed(cfg.seed)  # CPU: the same initial weights on any device
        self.module = _VAEModule.initial(data.n_items, cfg.hidden, cfg.latent, init).to(device)
        self.opt = torch.optim.Adam(self.module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        # The averaged copy is what scores (validation, refit result) when ema_decay > 0.
        self.average = copy.deepcopy(self.module) if cfg.ema_decay > 0 else self.module

    def train_epoch(self) -> float:
        cfg = self.cfg
        self.module.train()
        total, seen = 0.0, 0
        order = self.rng.permutation(self.users)
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start : start + cfg.batch_size]
            x = torch.from_numpy(self.csr[batch].toarray()).to(self.device)
            beta = kl_weight(self.step, cfg.anneal_cap, cfg.anneal_steps)
            nll, kl = self.module.elbo_terms(x, cfg.dropout, self.gen)
            loss = nll + beta * kl
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.step += 1
            if self.average is not self.module:
                with torch.no_grad():
                    for avg, now in zip(self.average.parameters(), self.module.parameters(), strict=True):
                        avg.lerp_(now, 1.0 - cfg.ema_decay)
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
        return total / max(seen, 1)

    def score(self, histories: Histories) -> np.ndarray:
        self.average.eval()
        out = np.empty((len(histories), histories.n_items), dtype=np.float32)
        with torch.no_grad():
            blocks = _blocks(
                histories,
                self.cfg.score_batch_size,
                self.device,
                self.cfg.recency_boost,
                self.cfg.recency_half_life,
            )
            for rows, hot in blocks:
                out[rows] = self.average.from_multi_hot(hot).cpu().numpy()
        return out


def _linear(n_in: int, n_out: int) -> torch.nn.Linear:
    """A Linear layer without torch's own (global-RNG) initialisation: weights are set from a seeded one."""
    return torch.nn.utils.skip_init(torch.nn.Linear, n_in, n_out)


class _VAEModule(torch.nn.Module):
    """Encoder and decoder; ``forward`` (padded history -> scores at the encoder mean) is the ONNX graph."""

    def __init__(self, n_items: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.n_items = n_items
        self.latent = latent
        width = hidden or latent
        self.enc_hidden = _linear(n_items, hidden) if hidden else None
        self.enc_out = _linear(hidden or n_items, 2 * latent)
        self.dec_hidden = _linear(latent, hidden) if hidden else None
        self.dec_out = _linear(width, n_items)

    @classmethod
    def initial(cls, n_items: int, hidden: int, latent: int, gen: torch.Generator) -> _VAEModule:
        module = cls(n_items, hidden, latent)
        with torch.no_grad():
            for layer in module.modules():
                if isinstance(layer, torch.nn.Linear):
                    fan_out, fan_in = layer.weight.shape
                    std = (2.0 / (fan_in + fan_out)) ** 0.5
                    layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * std)
                    layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * BIAS_INIT_STD)
        return module

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], hidden: int) -> _VAEModule:
        n_items = state["dec_out.weight"].shape[0]
        latent = state["enc_out.weight"].shape[0] // 2
        module = cls(n_items, hidden, latent)
        module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        return module

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        """Rows scaled to unit L2 norm; an empty history stays all-zero."""
        return x / torch.clamp(torch.sqrt((x * x).sum(dim=1, keepdim=True)), min=NORM_EPS)

    def _encode(self, x: torch.Tensor, sparse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)``; ``sparse``: the first layer reads only the item rows ``x`` uses (scoring)."""
        first = self.enc_hidden if self.enc_hidden is not None else self.enc_out
        out = hot_matmul(x, first.weight.t()) + first.bias if sparse else first(x)
        if self.enc_hidden is not None:
            out = self.enc_out(torch.tanh(out))
        return out[:, : self.latent], out[:, self.latent :]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.dec_hidden is not None:
            z = torch.tanh(self.dec_hidden(z))
        return self.dec_out(z)

    def encode(self, hot: torch.Tensor) -> torch.Tensor:
        """The encoder mean ``mu`` of binary ``[B, n_items]`` histories."""
        return self._encode(self.normalise(hot), sparse=True)[0]

    def from_multi_hot(self, hot: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(hot))

    recency: tuple[float, float] = (0.0, 10.0)  # (boost, half-life) of the input weights

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        boost, half_life = self.recency
        if boost == 0.0:
            return self.from_multi_hot(multi_hot(history, self.n_items))
        valid = history >= 0
        position = torch.arange(history.shape[1], device=history.device).unsqueeze(0)
        age = (valid.sum(dim=1, keepdim=True) - 1 - position).to(torch.float32)
        weight = torch.where(valid, 1.0 + boost * torch.pow(0.5, age / half_life), torch.zeros_like(age))
        idx = torch.where(valid, history, torch.full_like(history, self.n_items))
        hot = torch.zeros(history.shape[0], self.n_items + 1, dtype=torch.float32, device=history.device)
        hot = hot.scatter_reduce(1, idx, weight, reduce="amax")
        return self.from_multi_hot(hot[:, : self.n_items])

    def elbo_terms(
        self, x: torch.Tensor, dropout: float, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch means of the multinomial negative log-likelihood and of KL(q(z|x) || N(0, I)).

        Dropout and the reparameterisation noise draw from ``gen`` so a seed fixes the whole run.
        """
        h = self.normalise(x)
        if dropout > 0.0:
            keep = torch.rand(h.shape, generator=gen, device=h.device) >= dropout
            h = h * keep / (1.0 - dropout)
        mu, logvar = self._encode(h)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=gen, device=mu.device)
        logits = self.decode(z)
        nll = -(torch.log_softmax(logits, dim=1) * x).sum(dim=1).mean()
        kl = (0.5 * (torch.exp(logvar) + mu * mu - 1.0 - logvar).sum(dim=1)).mean()
        return nll, kl
