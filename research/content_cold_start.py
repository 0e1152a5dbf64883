"""Cold start on ML-100k: content's attribute-based scores for users whose history is hidden vs popularity.

Usage:
    python research/content_cold_start.py [OUTPUTS]   # default outputs/ (after validate, clean, split)

Every test user is scored with an EMPTY history whose ``users`` entry names their row of the users
table, so content can only use age/gender/occupation/zip (a ridge map to content profiles, blended with
its popularity prior); popularity scores everyone alike. Ranking follows the protocol (full catalog, the
user's training items excluded); the no-exclusion numbers are given too, as a real cold user's training
items would not be known.

The ridge penalty and the prior's weight are chosen on the VALIDATION carve only (same hidden-history
setting); test is scored once with that choice. Two test settings:
- ``hidden``: models fitted on the full training carve, histories hidden at scoring time (the user's own
  training profile did train the attribute map, as it trains popularity's counts);
- ``strict``: 5 folds of test users; each fold's users are removed from training before fitting both
  models, so neither has seen them at all.
Prints the numbers and writes ``research/results/content_cold_start.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fuserec.api import Algorithm
from fuserec.data.dataset import Dataset, interactions_matrix
from fuserec.evaluation import load_carve
from fuserec.histories import Histories
from fuserec.metrics import evaluate_scores
from fuserec.plugins.content import Content
from fuserec.plugins.popularity import Popularity
from fuserec.splitting import Carve

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "research" / "results"
RIDGES = (10.0, 30.0, 100.0, 300.0, 1000.0)
CONTENT_WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
PRIORS = ("global", "attributes")
COLD_KEYS = ("cold_ridge", "cold_content_weight", "cold_prior")
FOLDS = 5


def hidden(data: Dataset, rows: np.ndarray) -> Histories:
    """Empty histories of ``rows`` that still say which user they are."""
    rows = np.asarray(rows, dtype=np.int64)
    return Histories(
        np.zeros(len(rows) + 1, dtype=np.int64), np.zeros(0, dtype=np.int64), data.n_items, users=rows
    )


def evaluate_hidden(
    algo: Algorithm, data: Dataset, exclude: Dataset, truth_frame: Any, users: np.ndarray, exclusion: bool
) -> tuple[dict[str, float], np.ndarray]:
    """Metrics@10 and per-user NDCG@10 of ``algo`` on hidden histories of ``users``."""
    truth = interactions_matrix(truth_frame, data.n_users, data.n_items)
    seen = (
        exclude.matrix()
        if exclusion
        else interactions_matrix(truth_frame.iloc[:0], data.n_users, data.n_items)
    )
    metrics, per_user = evaluate_scores(
        lambda rows: algo.score(hidden(data, rows)), users, seen, truth, [10], exclude.item_popularity()
    )
    keep = {k: round(float(metrics[k]), 6) for k in ("ndcg@10", "recall@10", "hr@10", "coverage@10")}
    return keep, per_user["ndcg@10"]


def with_config(algo: Content, **update: Any) -> Content:
    """The same fitted model with other scoring-only settings (the blend enters score(), no refit)."""
    algo.config = algo.config.model_copy(update=update)
    return algo


class ProfileOnly:
    """Content's attribute -> profile map alone: cosine of the predicted profile, no prior."""

    def __init__(self, content: Content) -> None:
        self.content = content

    def score(self, histories: Histories) -> np.ndarray:
        return self.content.user_representation(histories) @ self.content.item_representation().T


def choose_on_validation(carve: Carve) -> dict[str, Any]:
    data = carve.fit
    users = np.unique(carve.truth["user"].to_numpy())
    pop, _ = evaluate_hidden(Popularity().fit(data), data, data, carve.truth, users, True)
    trials = []
    for ridge in RIDGES:
        algo = Content({"cold_ridge": ridge}).fit(data)
        for prior in PRIORS:
            for weight in CONTENT_WEIGHTS:
                with_config(algo, cold_content_weight=weight, cold_prior=prior)
                metrics, _ = evaluate_hidden(algo, data, data, carve.truth, users, True)
                trials.append(
                    {"cold_ridge": ridge, "cold_prior": prior, "cold_content_weight": weight, **metrics}
                )
    best = max(trials, key=lambda t: t["ndcg@10"])
    best_global = max((t for t in trials if t["cold_prior"] == "global"), key=lambda t: t["ndcg@10"])
    return {
        "popularity_ndcg@10": pop["ndcg@10"],
        "chosen": best,
        "best_global_prior": best_global,
        "trials": trials,
    }


def strict_folds(carve: Carve, config: dict[str, Any]) -> dict[str, Any]:
    """Fold users removed from training entirely, then scored cold; NDCG@10 averaged over all users."""
    data = carve.fit
    users = np.unique(carve.truth["user"].to_numpy())
    folds = np.array_split(np.random.default_rng(0).permutation(users), FOLDS)
    per_model: dict[str, list[np.ndarray]] = {"content": [], "content_profile_only": [], "popularity": []}
    for fold in folds:
        fold = np.sort(fold)
        fitted = data.with_interactions(data.interactions[~data.interactions["user"].isin(fold)])
        content = Content(config).fit(fitted)
        models = {
            "content": content,
            "content_profile_only": ProfileOnly(content),
            "popularity": Popularity().fit(fitted),
        }
        for name, algo in models.items():
            per_model[name].append(evaluate_hidden(algo, fitted, data, carve.truth, fold, True)[1])
    return {name: round(float(np.nanmean(np.concatenate(v))), 6) for name, v in per_model.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("outputs", nargs="?", default="outputs", help="outputs folder with clean/ and split/")
    args = parser.parse_args()
    start = time.perf_counter()

    validation = choose_on_validation(load_carve(args.outputs, "validation"))
    chosen, best_global = validation["chosen"], validation["best_global_prior"]
    config = {k: chosen[k] for k in COLD_KEYS}
    global_config = {k: best_global[k] for k in COLD_KEYS}
    print(
        f"validation (hidden histories): popularity NDCG@10 {validation['popularity_ndcg@10']:.4f}; "
        f"content best {chosen['ndcg@10']:.4f} at {config}; "
        f"best with the global prior {best_global['ndcg@10']:.4f} at {global_config}"
    )

    carve = load_carve(args.outputs, "test")
    data = carve.fit
    users = np.unique(carve.truth["user"].to_numpy())
    content = Content(config).fit(data)
    models: dict[str, Any] = {
        "content": content,
        "popularity": Popularity().fit(data),
        "content_profile_only": ProfileOnly(content),
        "content_global_prior": Content(global_config).fit(data),
    }
    test: dict[str, Any] = {"protocol_exclusion": {}, "no_exclusion": {}}
    for name, algo in models.items():
        test["protocol_exclusion"][name] = evaluate_hidden(algo, data, data, carve.truth, users, True)[0]
        if name in ("content", "popularity"):
            test["no_exclusion"][name] = evaluate_hidden(algo, data, data, carve.truth, users, False)[0]
    strict = strict_folds(carve, config)

    result = {
        "dataset": str(Path(args.outputs)),
        "test_users": len(users),
        "content_config": Content.Config.model_validate(config).model_dump(mode="json"),
        "validation": validation,
        "test_hidden": test,
        "test_strict_5_folds_ndcg@10": strict,
        "seconds": round(time.perf_counter() - start, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "content_cold_start.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"test, {len(users)} users with hidden histories (NDCG@10 / Recall@10 / HR@10 / Coverage@10):")
    for key, rows in test.items():
        for name, m in rows.items():
            print(
                f"  {key:<19}{name:<25}{m['ndcg@10']:.4f} / {m['recall@10']:.4f} / "
                f"{m['hr@10']:.4f} / {m['coverage@10']:.4f}"
            )
    print("test, strict (fold users never trained on), NDCG@10:")
    for name, v in strict.items():
        print(f"  {name:<25}{v:.4f}")


if __name__ == "__main__":
    main()
