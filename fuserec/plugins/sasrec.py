"""SASRec (Kang & McAuley 2018): a causal self-attention model over the user's latest items, in time order.

Set-based models (EASE, ALS, BPR) read a history as a bag; SASRec reads it as a sequence, so it can learn
that what a user watched last says most about what comes next. The input is the user's latest ``max_len``
items, oldest first and LEFT-aligned to the window's end (so the newest item always sits at the last
position): item embeddings (scaled by ``sqrt(hidden)``) plus learned positional embeddings, dropout, then
``blocks`` pre-LayerNorm transformer blocks (multi-head CAUSAL self-attention, a two-layer ReLU
feed-forward, residuals, dropout) and a final LayerNorm. The output at the last position, dotted with the
same item embeddings (tied, as in the paper), plus an optional item bias, scores the whole catalog.

Training is next-item prediction at every position of every user's window, with a full softmax
cross-entropy over the catalog by default (1,682 items on ML-100k: a ``[positions, n_items]`` product per
step is cheap and beats the paper's one-negative BCE), or, for big catalogs, a sampled softmax or BCE over
``negatives`` items shared by a batch. ``horizon`` > 1 also asks each position to predict the next
``horizon`` items (a multi-target softmax): under the protocol's temporal split every one of a user's
held-out items counts, not only the next, so a context that spreads mass over the next several items is
what is evaluated. Dropout masks draw from a seeded generator, so a seed fixes a CPU run.

Padding and empty histories: a pad input is the zero vector WITHOUT a positional embedding, and every
position may attend to itself (real positions never attend to pads; masked scores are a large finite
negative, never -inf, so no row of the softmax is all-masked and nothing turns NaN in ONNX). So every pad
position computes the same "empty context" vector. Each training window starts with one pad before the
user's first item, which teaches that context to predict first items: an empty history gets finite,
learned scores. ``forward(history)`` takes any ``[B, L]`` right-padded (or -1 anywhere) history and moves
its last ``max_len`` real items into the model's window with one scatter, so the exported graph handles
any L, shorter or longer than ``max_len``.

Cost: a step is ``O(B x W^2 x hidden)`` attention plus ``O(positions x n_items x hidden)`` for the
softmax. Users are bucketed by window length so a batch of short histories is not padded to ``max_len``.
Epochs are chosen by :func:`fuserec.training.fit_early_stopped` (validation NDCG@10), then the model is
refit on all data for that many epochs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

import numpy as np
import torch
from pydantic import Field, model_validator

from fuserec.api import Algorithm, Choice, FloatRange, Histories, IntRange, SearchDim
from fuserec.training import TorchConfig, fit_early_stopped, resolve_device, torch_threads

if TYPE_CHECKING:
    from fuserec.data.dataset import Dataset

MASKED = -1e9  # attention score of a masked pair: finite, so a softmax row never becomes NaN
LN_EPS = 1e-8


class SASRecConfig(TorchConfig):
    search_space: ClassVar[dict[str, SearchDim]] = {
        "max_len": Choice((50, 100, 200)),
        "hidden": Choice((32, 64, 128)),
        "blocks": IntRange(1, 2),
        "heads": Choice((1, 2)),
        "dropout": FloatRange(0.1, 0.6),
        "lr": FloatRange(3e-4, 3e-3, log=True),
        "batch_size": IntRange(8, 64, log=True),
        "horizon": IntRange(1, 10, log=True),
    }

    max_len: int = Field(200, ge=1, description="the latest this many items of a history are read")
    hidden: int = Field(64, ge=1, description="width of item and position embeddings and of every block")
    blocks: int = Field(1, ge=1, description="transformer blocks (causal self-attention + feed-forward)")
    heads: int = Field(1, ge=1, description="attention heads; must divide hidden")
    dropout: float = Field(0.4, ge=0.0, lt=1.0, description="dropout on embeddings, attention and blocks")
    loss: Literal["softmax", "sampled_softmax", "bce"] = Field(
        "softmax", description="full softmax over the catalog, or (big catalogs) sampled softmax / BCE"
    )
    negatives: int = Field(256, ge=1, description="uniform negatives shared by a batch (sampled losses)")
    horizon: int = Field(3, ge=1, description="each position predicts this many next items (1: next only)")
    item_bias: bool = Field(True, description="add a learned per-item bias to the output scores")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="Adam L2 weight decay on every parameter")
    batch_size: int = Field(16, ge=1, description="user windows per optimiser step")
    random_crop: bool = Field(
        False, description="train on a random window of histories longer than max_len (else the latest)"
    )
    score_batch_size: int = Field(128, ge=1, description="histories scored per block in score()")
    max_epochs: int = Field(
        200, ge=1, description="upper bound on epochs (early stopping usually ends sooner)"
    )
    patience: int = Field(8, ge=1, description="epochs without a validation gain before stopping")
    threads: int | None = Field(
        1,
        ge=1,
        description="torch CPU threads while training (None = torch's); small steps run fastest on one",
    )

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> Self:
        if self.hidden % self.heads:
            raise ValueError(f"heads={self.heads} must divide hidden={self.hidden}")
        return self


class SASRec(Algorithm):
    Config = SASRecConfig
    config: SASRecConfig
    _module: _SASRecModule | None  # built lazily from the fitted state

    def fit(self, data: Dataset) -> Self:
        cfg = self.config
        with torch_threads(cfg.threads):
            device = resolve_device(cfg.device)
            trainer, log = fit_early_stopped(lambda d: _Trainer(d, cfg, device), data, cfg, "sasrec")
        self.training_log_: list[dict[str, Any]] = log
        self.set_state({k: v.detach().cpu().numpy().copy() for k, v in trainer.module.state_dict().items()})
        self.n_items_ = data.n_items
        return self

    # -- scoring ------------------------------------------------------------------------------------
    def _scorer(self) -> _SASRecModule:
        module: _SASRecModule | None = getattr(self, "_module", None)
        if module is None:
            module = self._module = _SASRecModule.from_state(self.state_, self.config.heads).eval()
        return module

    def _run(self, histories: Histories, what: str, width: int) -> np.ndarray:
        self._check_fitted()
        return _run(self._scorer(), histories, self.config, what, width, torch.device("cpu"))

    def score(self, histories: Histories) -> np.ndarray:
        """Tied-embedding scores (plus item bias) at the last position of each history's window."""
        return self._run(histories, "forward", histories.n_items)

    def user_representation(self, histories: Histories) -> np.ndarray:
        """The final hidden state at the last position, ``[n_users, hidden]`` (what items are dotted with)."""
        return self._run(histories, "context", self.config.hidden)

    def item_representation(self) -> np.ndarray:
        """Item embeddings ``[n_items, hidden]``: the input embeddings, tied to the output ones."""
        self._check_fitted()
        return self.state_["items"][:-1]

    def explain(self, history: np.ndarray, item: int) -> dict[str, Any]:
        """Leave-one-out: how much ``item``'s score drops when each item of the window is removed.

        Attention weights are not attributions (values, residuals and later blocks mix them), so this
        asks the model directly, in one batched forward pass of up to ``max_len`` histories. Items older
        than the window are absent (removing one changes nothing); removing a window item lets the next
        older item in, as the model would see it.
        """
        n_items = self._check_fitted()
        hist = np.asarray(history, dtype=np.int64)
        window = range(max(0, len(hist) - self.config.max_len), len(hist))  # older items have no effect
        lists = [hist.tolist()] + [np.delete(hist, j).tolist() for j in window]
        scores = self.score(Histories.from_lists(lists, n_items))[:, item]
        deltas: dict[int, float] = {}
        for k, j in enumerate(window):  # a repeated item: its largest effect
            key = int(hist[j])
            deltas[key] = max(deltas.get(key, -math.inf), float(scores[0] - scores[1 + k]))
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


def _run(
    module: _SASRecModule,
    histories: Histories,
    cfg: SASRecConfig,
    what: str,
    width: int,
    device: torch.device,
) -> np.ndarray:
    """``module.<what>(padded)`` over blocks of ``score_batch_size`` histories, as float32 numpy.

    Histories go shortest first, so a block of short ones runs a narrow window (leading pads change
    nothing: a real position never attends to a pad), which is what makes per-epoch validation cheap.
    """
    out = np.empty((len(histories), width), dtype=np.float32)
    order = np.argsort(histories.lengths, kind="stable")
    step = cfg.score_batch_size
    with torch.no_grad():
        for start in range(0, len(order), step):
            rows = order[start : start + step]
            padded = torch.from_numpy(histories.select(rows).to_padded(cfg.max_len)).to(device)
            out[rows] = getattr(module, what)(padded, trim=True).cpu().numpy()
    return out


def training_windows(
    indptr: np.ndarray,
    users: np.ndarray,
    ends: np.ndarray,
    max_len: int,
    horizon: int,
    pad: int,
    items: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-aligned inputs ``[B, W]`` and targets ``[B, W, horizon]`` for windows ending at ``ends``.

    User u's window predicts its items ``[max(0, end - max_len), end)``; the input at each position is
    the item before its target (``pad`` before the first item: the empty context). Target ``j`` of a
    position is the item ``j`` steps after its first target (``-1`` past the user's last item). ``W`` is
    the longest window of the batch; shorter windows are padded on the left.
    """
    starts, lengths = indptr[users], indptr[users + 1] - indptr[users]
    low = np.maximum(0, ends - max_len)
    width = int((ends - low).max())
    target = ends[:, None] - width + np.arange(width)[None, :]  # index within the user's sequence
    real = target >= low[:, None]
    prev = target - 1
    inputs = np.where(real & (prev >= 0), items[starts[:, None] + np.maximum(prev, 0)], pad)
    ahead = target[:, :, None] + np.arange(horizon)[None, None, :]
    ok = real[:, :, None] & (ahead < lengths[:, None, None])
    targets = np.where(ok, items[starts[:, None, None] + np.where(ok, ahead, 0)], -1)
    return inputs.astype(np.int64), targets.astype(np.int64)


class _Trainer:
    """One model being trained on one dataset; what :func:`fit_early_stopped` drives epoch by epoch."""

    def __init__(self, data: Dataset, cfg: SASRecConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        hist = data.histories()
        self.indptr, self.items = hist.indptr.astype(np.int64), hist.items.astype(np.int64)
        self.lengths = np.diff(self.indptr)
        self.users = np.flatnonzero(self.lengths)
        self.n_items = data.n_items
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        init = torch.Generator().manual_seed(cfg.seed)  # CPU: the same initial weights on any device
        self.module = _SASRecModule.initial(data.n_items, cfg, init).to(device)
        self.opt = torch.optim.Adam(self.module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _batches(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(users, window ends) per batch: bucketed by window length (less padding), in random order."""
        cfg = self.cfg
        lengths = self.lengths[self.users]
        ends = lengths.copy()
        long = lengths > cfg.max_len
        if cfg.random_crop and long.any():
            ends[long] = self.rng.integers(cfg.max_len, lengths[long] + 1)
        width = np.minimum(ends, cfg.max_len)
        order = np.lexsort((self.rng.random(len(width)), width))
        cuts = range(0, len(order), cfg.batch_size)
        batches = [order[c : c + cfg.batch_size] for c in cuts]
        return [(self.users[b], ends[b]) for b in (batches[i] for i in self.rng.permutation(len(batches)))]

    def train_epoch(self) -> float:
        cfg = self.cfg
        self.module.train()
        total, seen = 0.0, 0
        for users, ends in self._batches():
            inputs, targets = training_windows(
                self.indptr, users, ends, cfg.max_len, cfg.horizon, self.n_items, self.items
            )
            x = torch.from_numpy(inputs).to(self.device)
            t = torch.from_numpy(targets).to(self.device)
            hidden = self.module.encode(x, self.gen, cfg.dropout)
            has = t[:, :, 0] >= 0
            negatives = None
            if cfg.loss != "softmax":
                negatives = torch.randint(
                    0, self.n_items, (cfg.negatives,), generator=self.gen, device=self.device
                )
            loss = self.module.loss(hidden[has], t[has], cfg.loss, negatives)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            n = int(has.sum())
            total += float(loss.detach()) * n
            seen += n
        return total / max(seen, 1)

    def score(self, histories: Histories) -> np.ndarray:
        self.module.eval()
        return _run(self.module, histories, self.cfg, "forward", histories.n_items, self.device)


def _dropout(x: torch.Tensor, p: float, gen: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout drawing from ``gen`` (a seed fixes the run); identity when ``gen`` is None."""
    if gen is None or p <= 0.0:
        return x
    keep = torch.rand(x.shape, generator=gen, device=x.device) >= p
    return x * keep / (1.0 - p)


def _linear(n_in: int, n_out: int) -> torch.nn.Linear:
    """A Linear layer without torch's own (global-RNG) initialisation: weights are set from a seeded one."""
    return torch.nn.utils.skip_init(torch.nn.Linear, n_in, n_out)


class _Block(torch.nn.Module):
    """Pre-LayerNorm block: causal multi-head self-attention, then a ReLU feed-forward; both residual."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_attn = torch.nn.LayerNorm(hidden, eps=LN_EPS)
        self.qkv = _linear(hidden, 3 * hidden)
        self.out = _linear(hidden, hidden)
        self.ln_ffn = torch.nn.LayerNorm(hidden, eps=LN_EPS)
        self.ffn_in = _linear(hidden, hidden)
        self.ffn_out = _linear(hidden, hidden)

    def forward(
        self, x: torch.Tensor, allowed: torch.Tensor, gen: torch.Generator | None, p: float
    ) -> torch.Tensor:
        batch, width, hidden = x.shape
        dh = hidden // self.heads
        q, k, v = self.qkv(self.ln_attn(x)).view(batch, width, 3, self.heads, dh).permute(2, 0, 3, 1, 4)
        logits = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(dh))
        logits = torch.where(allowed, logits, torch.full_like(logits, MASKED))
        attn = _dropout(torch.softmax(logits, dim=-1), p, gen)
        mixed = torch.matmul(attn, v).transpose(1, 2).reshape(batch, width, hidden)
        x = x + _dropout(self.out(mixed), p, gen)
        h = torch.relu(self.ffn_in(self.ln_ffn(x)))
        return x + _dropout(self.ffn_out(_dropout(h, p, gen)), p, gen)


class _SASRecModule(torch.nn.Module):
    """Embeddings, blocks and scoring; ``forward`` (padded history -> scores) is the exported graph."""

    def __init__(self, n_items: int, max_len: int, hidden: int, blocks: int, heads: int) -> None:
        super().__init__()
        self.n_items = n_items
        self.max_len = max_len
        self.items = torch.nn.Parameter(torch.zeros(n_items + 1, hidden))  # row n_items: the pad (zero)
        self.positions = torch.nn.Parameter(torch.zeros(max_len, hidden))
        self.bias = torch.nn.Parameter(torch.zeros(n_items))
        self.blocks = torch.nn.ModuleList([_Block(hidden, heads) for _ in range(blocks)])
        self.ln_out = torch.nn.LayerNorm(hidden, eps=LN_EPS)

    @classmethod
    def initial(cls, n_items: int, cfg: SASRecConfig, gen: torch.Generator) -> _SASRecModule:
        """Xavier-normal matrices and embeddings, zero biases, unit LayerNorm gains; the pad row zero."""
        module = cls(n_items, cfg.max_len, cfg.hidden, cfg.blocks, cfg.heads)
        with torch.no_grad():
            for param in module.parameters():
                if param.ndim == 2:
                    fan_out, fan_in = param.shape
                    param.copy_(torch.randn(param.shape, generator=gen) * (2.0 / (fan_in + fan_out)) ** 0.5)
                else:
                    param.zero_()
            for layer in module.modules():
                if isinstance(layer, torch.nn.LayerNorm):
                    layer.weight.fill_(1.0)
            module.items[n_items].zero_()
            if not cfg.item_bias:
                module.bias.requires_grad_(False)
        return module

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], heads: int) -> _SASRecModule:
        n_items = state["items"].shape[0] - 1
        max_len, hidden = state["positions"].shape
        blocks = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        module = cls(n_items, max_len, hidden, blocks, heads)
        module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        return module

    def window(self, history: torch.Tensor) -> torch.Tensor:
        """``[B, max_len]``: each row's last ``max_len`` real items, right-aligned, pad (``n_items``) before.

        Real items are the entries in ``[0, n_items)`` wherever they sit (right padding, or -1 anywhere);
        one scatter moves the k-th-from-last real item to column ``max_len - k``, dropped ones to a spare.
        """
        real = (history >= 0) & (history < self.n_items)
        count = real.to(torch.int64).sum(dim=1, keepdim=True)
        rank = torch.cumsum(real.to(torch.int64), dim=1) - 1  # 0-based rank among the row's real items
        column = self.max_len - count + rank
        keep = real & (column >= 0)
        column = torch.where(keep, column, torch.full_like(column, self.max_len))
        values = torch.where(keep, history, torch.full_like(history, self.n_items))
        out = torch.full(
            (history.shape[0], self.max_len + 1), self.n_items, dtype=torch.int64, device=history.device
        )
        return out.scatter(1, column, values)[:, : self.max_len]

    def encode(self, seq: torch.Tensor, gen: torch.Generator | None = None, p: float = 0.0) -> torch.Tensor:
        """Hidden states ``[B, W, hidden]`` of left-padded windows ``seq`` (pad = ``n_items``, W <= max_len).

        Dropout applies only when ``gen`` is given (training).
        """
        width = seq.shape[1]
        real = seq < self.n_items
        hidden = self.items.shape[1]
        x = self.items[seq] * math.sqrt(hidden) + self.positions[self.max_len - width :].unsqueeze(0)
        x = _dropout(x * real.unsqueeze(-1).to(x.dtype), p, gen)  # a pad is the zero vector
        causal = torch.tril(torch.ones(width, width, dtype=torch.bool, device=seq.device))
        eye = torch.eye(width, dtype=torch.bool, device=seq.device)
        allowed = ((causal & real.unsqueeze(1)) | eye).unsqueeze(1)  # [B, 1, query, key]
        for block in self.blocks:
            x = block(x, allowed, gen, p)
        return self.ln_out(x)

    def context(self, history: torch.Tensor, trim: bool = False) -> torch.Tensor:
        """The final hidden state at the last window position, ``[B, hidden]``.

        ``trim`` drops the window's leading columns beyond the input's width L: a history of L entries has
        at most L real items, so those columns hold only pads whatever the padding layout. The exported
        graph trims too (a dynamic slice), so a short history does not pay ``max_len`` attention.
        """
        seq = self.window(history)
        if trim:
            seq = seq[:, self.max_len - torch.sym_min(self.max_len, history.shape[1]) :]
        return self.encode(seq)[:, -1]

    def forward(self, history: torch.Tensor, trim: bool = True) -> torch.Tensor:
        return self.context(history, trim) @ self.items[: self.n_items].T + self.bias

    def loss(
        self, hidden: torch.Tensor, targets: torch.Tensor, kind: str, negatives: torch.Tensor | None
    ) -> torch.Tensor:
        """Mean loss of states ``[N, hidden]`` against targets ``[N, horizon]`` (-1: none).

        ``softmax``: cross-entropy over the full catalog. ``sampled_softmax``: over the target and the
        shared ``negatives`` (a negative equal to the target is masked). ``bce``: the target against each
        negative, as in the paper (with many negatives instead of one).
        """
        ok = targets >= 0
        safe = torch.where(ok, targets, torch.zeros_like(targets))
        weights = self.items[: self.n_items]
        if kind == "softmax":
            logp = torch.log_softmax(hidden @ weights.T + self.bias, dim=1)
            nll = -torch.gather(logp, 1, safe)
        else:
            assert negatives is not None
            pos = (hidden.unsqueeze(1) * weights[safe]).sum(-1) + self.bias[safe]  # [N, horizon]
            neg = hidden @ weights[negatives].T + self.bias[negatives]  # [N, m]
            if kind == "sampled_softmax":
                hit = negatives.view(1, 1, -1) == safe.unsqueeze(-1)  # [N, horizon, m]
                neg3 = torch.where(hit, torch.full_like(hit, MASKED, dtype=neg.dtype), neg.unsqueeze(1))
                nll = torch.logsumexp(torch.cat([pos.unsqueeze(-1), neg3], dim=-1), dim=-1) - pos
            else:
                nll = -torch.nn.functional.logsigmoid(pos) - torch.nn.functional.logsigmoid(-neg).mean(
                    1, keepdim=True
                )
        return (nll * ok).sum() / ok.sum().clamp(min=1)
