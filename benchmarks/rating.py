"""Rating prediction on ML-100k under Surprise's published protocol, beside its published numbers.

Usage:
    python benchmarks/rating.py [--data ../shared/data/ml-100k] [--out benchmarks/results/rating-ml100k.json]

Protocol: the 100,000 ratings are shuffled with a fixed seed and cut into 5 equal folds; each rater of the
``fuserec.raters`` group is fitted on 4 folds and predicts the 5th fold's ratings. A prediction is made
the way fuserec serves: from the test user's rated history in the training folds (fold-in). Where a model
has fitted per-user parameters the plain fitted prediction is reported too, so the fold-in gap shows.

Fused predictor: a linear blend of the raters' predictions, learned by ridge regression on an inner
validation carve of each training fold (10% of its ratings; the raters are refitted on the other 90% to
predict it, from the same kind of history) and applied to the full-fold raters' test predictions. It is
compared with the best single rater by paired tests over the 5 folds' per-rating squared errors (plus a
per-user view, since ratings of one user are not independent).

Anchors: Surprise's benchmark of ML-100k (5-fold, default parameters). Its k-NN Baseline row ran with
Surprise's default similarity (MSD, user-based); ``knn_baseline`` here is the item-based shrunk
Pearson-baseline configuration, so that anchor is a reference, not the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ml-100k"
RATERS = ("baseline", "svd", "svdpp", "knn_baseline", "user_similarity")
#: Surprise's README table for ML-100k (5-fold CV, default parameters): (RMSE, MAE).
ANCHORS: dict[str, tuple[float, float]] = {
    "svd": (0.934, 0.737),
    "svdpp": (0.919, 0.721),
    "knn_baseline": (0.931, 0.733),
    "baseline": (0.944, 0.748),
}


def load_ratings(folder: Path) -> tuple[pd.DataFrame, int, int]:
    """``u.data`` with users and items mapped to contiguous indices (sorted raw ids)."""
    frame = pd.read_csv(folder / "u.data", sep="\t", names=["user_id", "item_id", "rating", "timestamp"])
    users, user_ids = pd.factorize(frame["user_id"], sort=True)
    items, item_ids = pd.factorize(frame["item_id"], sort=True)
    out = pd.DataFrame(
        {
            "user": users.astype(np.int64),
            "item": items.astype(np.int64),
            "rating": frame["rating"].to_numpy(np.float32),
            "timestamp": frame["timestamp"].to_numpy(np.int64),
        }
    )
    return out, len(user_ids), len(item_ids)


def errors(pred: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    diff = np.asarray(pred, np.float64) - actual
    return {"rmse": float(np.sqrt(np.mean(diff**2))), "mae": float(np.mean(np.abs(diff)))}


def fit_and_predict(
    name: str, config: dict[str, Any], train: pd.DataFrame, test: pd.DataFrame, n_users: int, n_items: int
) -> dict[str, Any]:
    """Fit ``name`` on ``train``; predict ``test`` by fold-in (and from fitted users where possible)."""
    from fuserec.rating import RatingData
    from fuserec.registry import get_rater

    cls = get_rater(name)
    start = time.perf_counter()
    model = cls(config).fit(train, n_users, n_items)
    fit_s = time.perf_counter() - start
    histories = RatingData.from_frame(train, n_users, n_items).histories()
    users, items = test["user"].to_numpy(), test["item"].to_numpy()
    start = time.perf_counter()
    folded = model.predict_pairs(histories, users, items)
    predict_s = time.perf_counter() - start
    plain = model.predict_fitted(users, items)
    return {
        "model": model,
        "fold_in": folded,
        "fitted": plain,
        "fit_s": fit_s,
        "predict_s": predict_s,
    }


def ridge_blend(features: np.ndarray, target: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Weights and intercept of ``target ≈ features @ w + b`` with an L2 penalty on ``w`` only."""
    mean_x, mean_y = features.mean(axis=0), target.mean()
    x, y = features - mean_x, target - mean_y
    w = np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ y)
    return w, float(mean_y - mean_x @ w)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from scipy import stats

    from fuserec.significance import paired_comparison

    frame, n_users, n_items = load_ratings(args.data)
    rng = np.random.default_rng(args.seed)
    folds = np.array_split(rng.permutation(len(frame)), args.folds)
    configs: dict[str, dict[str, Any]] = {name: {"seed": args.seed} for name in args.raters}
    if "svdpp" in configs and args.svdpp_epochs is not None:
        configs["svdpp"]["epochs"] = args.svdpp_epochs
    actual_all = frame["rating"].to_numpy(np.float64)
    fold_in_pred = {name: np.full(len(frame), np.nan) for name in args.raters}
    blend_pred = np.full(len(frame), np.nan)
    per_model: dict[str, list[dict[str, Any]]] = {name: [] for name in args.raters}
    per_blend: list[dict[str, Any]] = []
    for f, test_rows in enumerate(folds):
        train_rows = np.concatenate([fold for g, fold in enumerate(folds) if g != f])
        train, test = frame.iloc[train_rows], frame.iloc[test_rows]
        actual = test["rating"].to_numpy(np.float64)
        # the inner carve, for the blend's weights: never the test fold
        inner_rng = np.random.default_rng(args.seed + 1000 + f)
        inner_val = inner_rng.random(len(train)) < args.blend_carve
        inner_train, inner_test = train[~inner_val], train[inner_val]
        val_features, test_features = [], []
        for name in args.raters:
            out = fit_and_predict(name, configs[name], train, test, n_users, n_items)
            row = {
                "fold": f + 1,
                **errors(out["fold_in"], actual),
                "fit_s": round(out["fit_s"], 3),
                "predict_s": round(out["predict_s"], 3),
            }
            if out["fitted"] is not None:
                fitted = errors(out["fitted"], actual)
                row |= {"fitted_rmse": fitted["rmse"], "fitted_mae": fitted["mae"]}
            per_model[name].append(row)
            fold_in_pred[name][test_rows] = out["fold_in"]
            test_features.append(out["fold_in"])
            inner = fit_and_predict(name, configs[name], inner_train, inner_test, n_users, n_items)
            val_features.append(inner["fold_in"])
            print(
                f"fold {f + 1} {name:16s} rmse {row['rmse']:.4f} mae {row['mae']:.4f}"
                + (f" fitted {row['fitted_rmse']:.4f}" if "fitted_rmse" in row else "")
                + f"  fit {row['fit_s']:.1f}s",
                flush=True,
            )
        weights, intercept = ridge_blend(
            np.column_stack(val_features), inner_test["rating"].to_numpy(np.float64), args.ridge
        )
        low, high = float(train["rating"].min()), float(train["rating"].max())
        blended = np.clip(np.column_stack(test_features) @ weights + intercept, low, high)
        blend_pred[test_rows] = blended
        inner_fit = np.clip(np.column_stack(val_features) @ weights + intercept, low, high)
        per_blend.append(
            {
                "fold": f + 1,
                **errors(blended, actual),
                "inner_rmse": errors(inner_fit, inner_test["rating"].to_numpy(np.float64))["rmse"],
                "weights": dict(zip(args.raters, map(float, weights), strict=True)),
                "intercept": intercept,
            }
        )
        print(f"fold {f + 1} {'blend':16s} rmse {per_blend[-1]['rmse']:.4f} mae {per_blend[-1]['mae']:.4f}")

    def mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
        values = [r[key] for r in rows if key in r]
        return float(np.mean(values)) if values else None

    models: dict[str, Any] = {}
    for name, rows in per_model.items():
        summary = {
            key: mean_of(rows, key)
            for key in ("rmse", "mae", "fitted_rmse", "fitted_mae", "fit_s", "predict_s")
        }
        if summary["fitted_rmse"] is not None and summary["rmse"] is not None:
            summary["fold_in_gap_rmse"] = summary["rmse"] - summary["fitted_rmse"]
        anchor = ANCHORS.get(name)
        models[name] = {
            "config": configs[name],
            "folds": rows,
            "mean": summary,
            "anchor": {"rmse": anchor[0], "mae": anchor[1]} if anchor else None,
        }
    best = min(models, key=lambda n: models[n]["mean"]["rmse"])
    sq_blend = (blend_pred - actual_all) ** 2
    sq_best = (fold_in_pred[best] - actual_all) ** 2
    nonzero = (sq_blend - sq_best) != 0
    user_index = frame["user"].to_numpy()
    counts = np.bincount(user_index, minlength=n_users)
    per_user_blend = np.bincount(user_index, sq_blend, n_users) / np.maximum(counts, 1)
    per_user_best = np.bincount(user_index, sq_best, n_users) / np.maximum(counts, 1)
    rated = counts > 0
    fold_rmse_blend = [r["rmse"] for r in per_blend]
    fold_rmse_best = [r["rmse"] for r in per_model[best]]
    paired = {
        "best_single": best,
        "n_ratings": len(frame),
        "mean_squared_error_blend": float(sq_blend.mean()),
        "mean_squared_error_best": float(sq_best.mean()),
        "per_rating_ttest_p": float(stats.ttest_rel(sq_blend, sq_best).pvalue),
        "per_rating_wilcoxon_p": float(stats.wilcoxon(sq_blend[nonzero] - sq_best[nonzero]).pvalue),
        "ratings_better": int((sq_blend < sq_best).sum()),
        "ratings_worse": int((sq_blend > sq_best).sum()),
        # per user (negated MSE: positive differences favour the blend), ratings of a user averaged first
        "per_user": paired_comparison(-per_user_blend[rated], -per_user_best[rated], seed=args.seed),
        "per_fold_rmse_ttest_p": float(stats.ttest_rel(fold_rmse_blend, fold_rmse_best).pvalue),
    }
    return {
        "dataset": "movielens-100k",
        "data": str(args.data),
        "command": "python benchmarks/rating.py " + " ".join(sys.argv[1:]),
        "protocol": {
            "folds": args.folds,
            "seed": args.seed,
            "split": "shuffled ratings, equal folds (numpy default_rng(seed).permutation)",
            "prediction": "fold-in from the test user's training-fold rated history",
            "blend": f"ridge (alpha {args.ridge}) on an inner carve of {args.blend_carve:.0%} of each "
            "training fold",
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "models": models,
        "blend": {
            "folds": per_blend,
            "mean": {"rmse": mean_of(per_blend, "rmse"), "mae": mean_of(per_blend, "mae")},
        },
        "paired_test": paired,
        "anchor_source": "Surprise README, ML-100k, 5-fold CV, default parameters "
        "(its k-NN Baseline: MSD similarity, user-based)",
    }


def table(result: dict[str, Any]) -> str:
    def num(value: float | None, digits: int = 4) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "| rater | RMSE fold-in | MAE fold-in | RMSE fitted | MAE fitted | gap (RMSE) | fit s "
        "| Surprise RMSE / MAE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in result["models"].items():
        m, anchor = entry["mean"], entry["anchor"]
        published = "-" if anchor is None else f"{anchor['rmse']:.3f} / {anchor['mae']:.3f}"
        lines.append(
            f"| {name} | {num(m['rmse'])} | {num(m['mae'])} | {num(m['fitted_rmse'])} "
            f"| {num(m['fitted_mae'])} | {num(m.get('fold_in_gap_rmse'))} | {num(m['fit_s'], 2)} "
            f"| {published} |"
        )
    blend = result["blend"]["mean"]
    lines.append(f"| blend (ridge) | {num(blend['rmse'])} | {num(blend['mae'])} | - | - | - | - | - |")
    p = result["paired_test"]
    lines += [
        "",
        f"blend vs {p['best_single']} over {p['n_ratings']} ratings: "
        f"MSE {p['mean_squared_error_blend']:.4f} vs {p['mean_squared_error_best']:.4f}; "
        f"per-rating paired t-test p={p['per_rating_ttest_p']:.3g}, "
        f"Wilcoxon p={p['per_rating_wilcoxon_p']:.3g}; per-user t-test p={p['per_user']['p_value']:.3g} "
        f"({p['per_user']['users_better']} users better, {p['per_user']['users_worse']} worse); "
        f"per-fold RMSE t-test p={p['per_fold_rmse_ttest_p']:.3g}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding ML-100k's u.data")
    parser.add_argument("--out", type=Path, default=RESULTS / "rating-ml100k.json")
    parser.add_argument("--raters", nargs="+", default=list(RATERS))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42, help="shuffle, inner carves and every rater's seed")
    parser.add_argument(
        "--blend-carve", type=float, default=0.1, help="share of a training fold the blend learns on"
    )
    parser.add_argument("--ridge", type=float, default=1.0, help="L2 penalty of the blend's weights")
    parser.add_argument("--svdpp-epochs", type=int, default=None, help="fewer SVD++ epochs on a slow machine")
    args = parser.parse_args(argv)
    if not (args.data / "u.data").exists():
        print(f"skipped: MovieLens-100k not found at {args.data} (u.data missing; ../shared is absent here)")
        return 0
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table(result))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
