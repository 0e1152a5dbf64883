"""Re-ranking objectives that `fuserec.rerank.mmr_top_k` does not implement, against it. Validation only.

Each answers one question about the accuracy/diversity frontier of the exported scorer:
- ``swaps``: does a better search help? Greedy picks, then up to 15 swaps (3 per tail slot), each the
  single swap of a listed item (outside the kept head) for a pool item that most raises ``(1 - w) * sum of
  relevance - w * c * sum of pairwise cosines`` of the list, while one does (``c`` = 1/9 and 2/9);
- ``log``, ``inv_sqrt``, ``inv``: does relevance shaped like a hit rate falling with rank help?
  Greedy with relevance ``1 / log2(p + 2)``, ``1 / sqrt(p + 1)`` or ``1 / (p + 1)`` of pool position p;
- ``calibration``: does mirroring the history's genre mix (Steck 2018) help? Each greedy step pays ``w``
  times the KL divergence from the history's mix to the list's (smoothed with 1% of the history's).

The scorer learns on half A of the validation users and half B is re-ranked, as in
``rerank_settings.py``; ``greedy`` is the shipped re-ranking (``Rerank`` defaults: pool 100, first 5
kept, mean-cosine penalty, min-max relevance, listed by score). Every variant keeps the same head and
lists by score. For each it prints the most diversity@10 gained with NDCG@10 lost under ``--max-loss``.

Usage (after a `fuserec run` on ML-100k, whose outputs hold the train' fits in ``inner_models/``):
    python research/rerank_variants.py --outputs /tmp/fusion/seed42 --seed 42 --splits 1 2 3
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from fusion_seeds import machine  # research/ is on sys.path when this runs as a script
from rerank_settings import scorer_on_half_b

from fuserec.data.dataset import interactions_matrix
from fuserec.features import item_content_vectors
from fuserec.fusion import top_in_protocol_order
from fuserec.metrics import evaluate_rankings
from fuserec.rerank import Rerank, intra_list_diversity, mmr_top_k, novelty_bonus, unit_vectors

K, DEPTH, KEEP = 10, 100, 5
RESULTS = Path(__file__).resolve().parent / "results" / "rerank-variants-ml100k.json"


class Pool:
    """One batch of users' top-``DEPTH`` unseen items, in score order, and what the variants read."""

    def __init__(
        self, scores: torch.Tensor, seen: torch.Tensor, vectors: np.ndarray, unit: torch.Tensor
    ) -> None:
        masked = scores.masked_fill(seen, float("-inf"))
        self.items = top_in_protocol_order(masked, DEPTH)
        values = masked.gather(1, self.items)
        low, high = values.amin(1, keepdim=True), values.amax(1, keepdim=True)
        self.minmax = (values - low) / torch.clamp(high - low, min=1e-12)
        listed = unit[self.items]  # ``unit``: the catalogue's L2-normalised content vectors
        self.sims = listed @ listed.transpose(1, 2)  # [B, DEPTH, DEPTH]
        mix = torch.from_numpy(np.abs(vectors) / np.maximum(np.abs(vectors).sum(1, keepdims=True), 1e-12))
        self.mix = mix.float()[self.items]  # each pool item's genre mix
        history = seen.float() @ mix.float()
        self.history_mix = history / history.sum(1, keepdim=True).clamp(min=1e-12)

    def listed(self, taken: torch.Tensor) -> np.ndarray:
        """The taken pool positions' items, by score."""
        positions = torch.where(taken, torch.arange(DEPTH), DEPTH)
        return self.items.gather(1, positions.sort(1).values[:, :K]).numpy()


Penalty = Callable[[Pool, torch.Tensor, int], torch.Tensor]  # (pool, taken, listed so far) -> [B, DEPTH]


def mean_cosine(pool: Pool, taken: torch.Tensor, n: int) -> torch.Tensor:
    return (pool.sims * taken.unsqueeze(1)).sum(2) / n


def calibration_kl(pool: Pool, taken: torch.Tensor, n: int) -> torch.Tensor:
    p = pool.history_mix.unsqueeze(1)
    q = ((pool.mix * taken.unsqueeze(2)).sum(1, keepdim=True) + pool.mix) / (n + 1)
    q = 0.99 * q + 0.01 * p
    return (p * (p.clamp(min=1e-12).log() - q.clamp(min=1e-12).log())).sum(2)


def greedy(pool: Pool, relevance: torch.Tensor, weight: float, penalty: Penalty) -> torch.Tensor:
    """``bool [B, DEPTH]`` taken: the head kept, then each step the best ``(1-w) rel - w penalty``."""
    taken = torch.zeros_like(relevance, dtype=torch.bool)
    taken[:, :KEEP] = True
    for n in range(KEEP, K):
        step = (1 - weight) * relevance - weight * penalty(pool, taken, n)
        taken = taken.scatter(1, step.masked_fill(taken, float("-inf")).argmax(1, keepdim=True), True)
    return taken


def swapped(pool: Pool, weight: float, c: float, passes: int = 3) -> torch.Tensor:
    """Greedy picks improved by up to ``passes`` x tail-size best single swaps under ``(1-w) sum rel - w c
    sum of pairwise cosines``."""
    taken = greedy(pool, pool.minmax, weight, mean_cosine)
    rows = torch.arange(len(taken))
    for _ in range(passes * (K - KEEP)):
        total = (pool.sims * taken.unsqueeze(1)).sum(2)  # each item's cosine sum to the list
        own = torch.diagonal(pool.sims, dim1=1, dim2=2)
        value = (1 - weight) * pool.minmax - weight * c * (total - own)  # a listed item's worth to the list
        best = torch.zeros(len(taken))
        out, into = torch.zeros(len(taken), dtype=torch.long), torch.zeros(len(taken), dtype=torch.long)
        tail = torch.where(taken, torch.arange(DEPTH), DEPTH).sort(1).values
        for slot in range(KEEP, K):  # the tail items, by pool position (the head is positions 0..KEEP-1)
            t = tail[:, slot]
            gain = (1 - weight) * pool.minmax - weight * c * (total - pool.sims[rows, :, t])
            gain, x = gain.masked_fill(taken, float("-inf")).max(1)
            delta = gain - value[rows, t]
            better = delta > best + 1e-9
            best, out, into = (
                torch.where(better, delta, best),
                torch.where(better, t, out),
                torch.where(better, x, into),
            )
        move = best > 1e-9
        if not move.any():
            break
        taken[rows[move], out[move]] = False
        taken[rows[move], into[move]] = True
    return taken


def variants(pool: Pool) -> dict[str, Callable[[float], np.ndarray]]:
    position = torch.arange(DEPTH, dtype=torch.float32).expand_as(pool.minmax)
    shapes = {
        "log": 1 / torch.log2(position + 2),
        "inv_sqrt": 1 / torch.sqrt(position + 1),
        "inv": 1 / (position + 1),
    }
    out: dict[str, Callable[[float], np.ndarray]] = {
        "swaps_c1/9": lambda w: pool.listed(swapped(pool, w, 1 / (K - 1))),
        "swaps_c2/9": lambda w: pool.listed(swapped(pool, w, 2 / (K - 1))),
        "calibration": lambda w: pool.listed(greedy(pool, pool.minmax, w, calibration_kl)),
    }
    for name, shape in shapes.items():
        scaled = (shape - shape.amin(1, keepdim=True)) / (
            shape.amax(1, keepdim=True) - shape.amin(1, keepdim=True)
        )
        out[name] = lambda w, r=scaled: pool.listed(greedy(pool, r, w, mean_cosine))
    return out


def split_rows(args: argparse.Namespace, split: int) -> list[dict[str, Any]]:
    """Every variant's curve on one A/B split of the validation users."""
    rows = []
    name, scorer, inner, valid, half_b = scorer_on_half_b(args.outputs, args.seed, split, args.source)
    vectors, popularity = item_content_vectors(inner.items), inner.item_popularity()
    matrix = inner.matrix()
    seen = sp.csr_matrix(matrix[half_b])
    n_with_history = int((np.diff(matrix.indptr) > 0).sum())
    truth = interactions_matrix(valid, inner.n_users, inner.n_items)[half_b]
    hist = inner.histories()
    scores = np.concatenate(
        [
            np.asarray(scorer.score(hist.select(half_b[s : s + 256])), np.float32)
            for s in range(0, len(half_b), 256)
        ]
    )
    scores_t, seen_t = torch.from_numpy(scores), torch.from_numpy(seen.toarray() > 0)
    unit = torch.from_numpy(unit_vectors(vectors))
    bonus = torch.from_numpy(novelty_bonus(popularity, n_with_history))
    pool = Pool(scores_t, seen_t, vectors, unit)

    def measure(topk: np.ndarray) -> tuple[float, float]:
        ndcg = evaluate_rankings(topk, truth, [K], popularity)[f"ndcg@{K}"]
        return ndcg, intra_list_diversity(topk, vectors)

    base_ndcg, base_div = measure(pool.items[:, :K].numpy())
    shipped = {"greedy": lambda w: mmr_top_k(scores_t, seen_t, unit, bonus, K, Rerank(diversity=w)).numpy()}
    for variant, lists in (shipped | variants(pool)).items():
        curve = []
        for w in args.weights:
            ndcg, div = measure(lists(w))
            curve.append(
                {
                    "weight": w,
                    "diversity_gain": round(div / base_div - 1, 4),
                    "ndcg_change": round(ndcg / base_ndcg - 1, 4),
                }
            )
        ok = [p for p in curve if p["ndcg_change"] > -args.max_loss]
        row = {"scorer": name, "seed": args.seed, "split": split, "variant": variant}
        row |= {"best_under_max_loss": max(ok, key=lambda p: p["diversity_gain"]) if ok else None}
        row |= {"largest_gain": max(p["diversity_gain"] for p in curve)}
        print(json.dumps(row), flush=True)
        rows.append(row | {"curve": curve, "machine": machine()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=Path, required=True, help="a finished run's outputs folder")
    parser.add_argument("--seed", type=int, default=42, help="the run's train.seed")
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 2, 3], help="seeds of the A/B halves")
    parser.add_argument("--source", default="movielens-100k")
    parser.add_argument(
        "--weights", type=float, nargs="+", default=[round(0.05 + 0.025 * i, 3) for i in range(37)]
    )
    parser.add_argument("--max-loss", type=float, default=0.05, help="largest relative NDCG@10 loss")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = [row for split in args.splits for row in split_rows(args, split)]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        best = [
            r["best_under_max_loss"]["diversity_gain"]
            for r in rows
            if r["variant"] == variant and r["best_under_max_loss"]
        ]
        print(json.dumps({"variant": variant, "mean_best_gain": round(float(np.mean(best)), 4)}), flush=True)
    args.results.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
