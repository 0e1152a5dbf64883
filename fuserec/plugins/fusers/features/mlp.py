"""Feature fusion's MLP scorer, optionally over an autoencoder's code of the joined item blocks.

The bilinear scorer of :mod:`fuserec.plugins.fusers.features` is linear in each block; this one learns a
hidden layer over the user and item vectors and their element-wise product (as NCF's MLP and GMF read
``[u; i]``)::

    score(u, i) = w^T relu(A^T u + C^T x_i + E^T (u * x_i) + b)

``x_i`` is the item's joined vector: the blocks side by side, or, with ``autoencoder: c``, the code
``relu(W_e^T [blocks] + b_e)`` of a one-layer autoencoder trained on the catalogue's joined blocks (item
side only: no user data). ``u`` is the mean of the history's ``x_j``, as for the bilinear scorer.

Contributions stay exact. Each of ``u`` and ``x_i`` is a sum of *parts*, one per component block (with
the code, the rescale rule splits it: ``relu(p) = 1[p > 0] * sum_b W_b^T x_b + 1[p > 0] * b_e``, the last
part the encoder's bias). A part's pre-activation is its linear terms plus half of each product it takes
part in (``u * x = 1/2 sum_p (u_p * x + u * x_p)``), and its contribution ``w^T (1[pre > 0] * pre_p)``:
DeepLIFT's rescale rule with a zero reference, which for ReLU is the unit's on/off gate. Parts that belong
to no component (the biases) are shared evenly between the blocks, so the contributions add up to the
score exactly.
"""

from __future__ import annotations

import numpy as np
import torch

MLP_KEYS = ("mlp_a", "mlp_c", "mlp_e", "mlp_bias", "mlp_w")
ENCODER_KEYS = ("encoder_w", "encoder_b")


def block_slices(tables: list[np.ndarray]) -> list[slice]:
    """Each block's columns in the joined vector."""
    ends = np.cumsum([t.shape[1] for t in tables])
    return [slice(int(e - t.shape[1]), int(e)) for e, t in zip(ends, tables, strict=True)]


def init_mlp(width: int, hidden: int, seed: int) -> torch.nn.ParameterDict:
    """Seeded uniform(+-1/sqrt(fan-in)) weights, zero hidden bias: the same draw for the same seed."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(rows: int, cols: int) -> torch.nn.Parameter:
        bound = 1.0 / np.sqrt(rows)
        return torch.nn.Parameter((torch.rand(rows, cols, generator=gen) * 2 - 1) * bound)

    params = {key: uniform(width, hidden) for key in MLP_KEYS[:3]}
    params["mlp_bias"] = torch.nn.Parameter(torch.zeros(hidden))
    params["mlp_w"] = torch.nn.Parameter(uniform(hidden, 1).squeeze(1).detach())
    return torch.nn.ParameterDict(params)


def pre_activation(user: torch.Tensor, item: torch.Tensor, mlp: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, n, H]`` without the bias; ``user [B, d]``, ``item [n, d]`` (any slice of the code)."""
    product = torch.einsum("bd,nd,dh->bnh", user, item, mlp["mlp_e"])
    return (user @ mlp["mlp_a"]).unsqueeze(1) + (item @ mlp["mlp_c"]).unsqueeze(0) + product


def mlp_score(user: torch.Tensor, item: torch.Tensor, mlp: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, n]`` scores: the fast path for training, without contributions."""
    return torch.relu(pre_activation(user, item, mlp) + mlp["mlp_bias"]) @ mlp["mlp_w"]


def mlp_parts(
    user_parts: list[torch.Tensor],
    item_parts: list[torch.Tensor],
    mlp: dict[str, torch.Tensor],
    slices: list[slice] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(score [B, n], per-part contributions [P, B, n], the biases' share [B, n])``, summing exactly.

    ``slices``: each part's columns when the parts are disjoint blocks of the joined vector (``user_parts[p]``
    and ``item_parts[p]`` then hold those columns only); None when every part spans the whole code.
    """
    if slices is None:
        user, item = torch.stack(user_parts).sum(0), torch.stack(item_parts).sum(0)
    else:
        user, item = torch.cat(user_parts, dim=1), torch.cat(item_parts, dim=1)
    pre = pre_activation(user, item, mlp) + mlp["mlp_bias"]
    gate = (pre > 0).to(pre.dtype) * mlp["mlp_w"]  # [B, n, H]: w_h where unit h is on
    parts = []
    for p, (user_p, item_p) in enumerate(zip(user_parts, item_parts, strict=True)):
        if slices is None:  # shared code: half of each product the part takes part in
            e = mlp["mlp_e"]
            half = torch.einsum("bd,nd,dh->bnh", user_p, item, e)
            half = half + torch.einsum("bd,nd,dh->bnh", user, item_p, e)
            own = (user_p @ mlp["mlp_a"]).unsqueeze(1) + (item_p @ mlp["mlp_c"]).unsqueeze(0) + 0.5 * half
        else:  # disjoint blocks: the product u * x is block by block
            cols = slices[p]
            sliced = {k: mlp[k][cols] for k in MLP_KEYS[:3]}
            own = pre_activation(user_p, item_p, sliced)
        parts.append((gate * own).sum(-1))
    return (torch.relu(pre) @ mlp["mlp_w"]), torch.stack(parts), (gate * mlp["mlp_bias"]).sum(-1)


def train_autoencoder(
    joined: np.ndarray, code: int, steps: int, learning_rate: float, seed: int
) -> tuple[dict[str, np.ndarray], float]:
    """Encoder weights of a one-layer ReLU autoencoder (linear decoder, MSE), and its relative error.

    Full-batch Adam over the catalogue's joined blocks, seeded; the decoder is dropped after training (the
    scorer reads the code). Relative error: squared reconstruction error over the squared norm of the data.
    """
    x = torch.from_numpy(np.asarray(joined, dtype=np.float32))
    width = x.shape[1]
    gen = torch.Generator().manual_seed(seed)
    bound_in, bound_code = 1.0 / np.sqrt(width), 1.0 / np.sqrt(code)
    enc_w = torch.nn.Parameter((torch.rand(width, code, generator=gen) * 2 - 1) * bound_in)
    enc_b = torch.nn.Parameter(torch.zeros(code))
    dec_w = torch.nn.Parameter((torch.rand(code, width, generator=gen) * 2 - 1) * bound_code)
    dec_b = torch.nn.Parameter(torch.zeros(width))
    optimiser = torch.optim.Adam([enc_w, enc_b, dec_w, dec_b], lr=learning_rate)
    total = float(x.square().sum()) or 1.0
    for _ in range(steps):
        optimiser.zero_grad()
        error = (torch.relu(x @ enc_w + enc_b) @ dec_w + dec_b - x).square().sum() / total
        error.backward()
        optimiser.step()
    with torch.no_grad():
        error = (torch.relu(x @ enc_w + enc_b) @ dec_w + dec_b - x).square().sum() / total
    weights = {"encoder_w": enc_w.detach().numpy().copy(), "encoder_b": enc_b.detach().numpy().copy()}
    return weights, float(error)


def code_parts(blocks: list[np.ndarray], encoder: dict[str, np.ndarray]) -> np.ndarray:
    """``float32 [blocks + 1, n, c]``: each block's part of the items' code, the encoder bias's last.

    The parts add up to ``relu(joined @ W_e + b_e)`` (the rescale rule: each part passes the unit's gate).
    """
    w, b = encoder["encoder_w"].astype(np.float64), encoder["encoder_b"].astype(np.float64)
    slices = block_slices(blocks)
    linear = [blk.astype(np.float64) @ w[cols] for blk, cols in zip(blocks, slices, strict=True)]
    gate = (sum(linear) + b) > 0
    parts = [np.where(gate, term, 0.0) for term in linear] + [np.where(gate, b, 0.0)]
    return np.stack(parts).astype(np.float32)
