"""Rating prediction on ML-100k under Surprise's published protocol, beside its published numbers.

Usage:
    python benchmarks/rating.py [--data ../shared/data/ml-100k] [--out benchmarks/results/rating-ml100k.json]

Protocol: the 100,000 ratings are shuffled with a fixed seed and cut into 5 equal folds; each rater of the
``fuserec.raters`` group is fitted on 4 folds and predicts the 5th fold's ratings. A prediction is made
the way fuserec serves: from the test user's rated history in the training folds (fold-in). Where a model
has fitted per-user parameters the plain fitted prediction is reported too, so the fold-in gap shows.

Fused predictors: :func:`fuserec.rating_fusion.fit_rating_ensemble`, the function the pipeline calls, runs
on each training fold: every rater is cross-fitted over ``--inner-folds`` folds of the training ratings
(never the test fold) to give out-of-fold predictions of every training rating, the fusers (``blend``,
``stacker``, ``per_user``) learn on those, the raters are refitted on the whole training fold, and the
served predictor is chosen out of fold (``auto``). Every fuser and the auto choice are scored on the test
fold beside the raters, with paired tests (per rating, per user, per fold) of the best fused predictor
against the best single rater. ``--carve`` replaces cross-fitting with one 10% carve (cheaper, fewer rows).

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
FUSERS = ("blend", "stacker", "per_user")
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


def load_side(folder: Path) -> Any:
    """Item content (genres, year, title words) and user attributes (age, gender, occupation; no zip code,
    as the pipeline's privacy defaults drop it) of ML-100k, rows in :func:`load_ratings`' index order,
    encoded as the pipeline encodes them for raters (:mod:`fuserec.features`)."""
    from fuserec.data.movielens import load_movielens_100k
    from fuserec.features import item_content_vectors, user_attribute_matrix
    from fuserec.rating import RatingSide

    raw = load_movielens_100k(folder)
    items = raw.items.assign(order=raw.items["item_id"].astype(int)).sort_values("order")
    users = raw.users.assign(order=raw.users["user_id"].astype(int)).sort_values("order")
    users = users[["user_id", "age", "gender", "occupation"]].assign(age=lambda u: u["age"].astype(float))
    matrix, names = user_attribute_matrix(users.reset_index(drop=True))
    content = item_content_vectors(items[["item_id", "title", "genres", "year"]].reset_index(drop=True))
    return RatingSide(content.astype(np.float32), matrix.astype(np.float32), tuple(names))


def errors(pred: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    diff = np.asarray(pred, np.float64) - actual
    return {"rmse": float(np.sqrt(np.mean(diff**2))), "mae": float(np.mean(np.abs(diff)))}


def components_to_fuse(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Raters to fuse: ``--raters``, plus ``neural`` when it is registered (and not ``--no-neural``)."""
    from fuserec.registry import RATERS_GROUP, available

    names = list(args.raters)
    if not args.no_neural and "neural" not in names and "neural" in available(RATERS_GROUP):
        names.append("neural")
    configs: dict[str, dict[str, Any]] = {name: {"seed": args.seed} for name in names}
    if "svdpp" in configs and args.svdpp_epochs is not None:
        configs["svdpp"]["epochs"] = args.svdpp_epochs
    return configs


def paired(sq_a: np.ndarray, sq_b: np.ndarray, users: np.ndarray, n_users: int, seed: int) -> dict[str, Any]:
    """Paired tests of per-rating squared errors ``sq_a`` (candidate) against ``sq_b`` (baseline)."""
    from scipy import stats

    from fuserec.significance import paired_comparison

    nonzero = (sq_a - sq_b) != 0
    counts = np.bincount(users, minlength=n_users)
    per_user_a = np.bincount(users, sq_a, n_users) / np.maximum(counts, 1)
    per_user_b = np.bincount(users, sq_b, n_users) / np.maximum(counts, 1)
    rated = counts > 0
    return {
        "n_ratings": len(sq_a),
        "mean_squared_error_fused": float(sq_a.mean()),
        "mean_squared_error_best": float(sq_b.mean()),
        "per_rating_ttest_p": float(stats.ttest_rel(sq_a, sq_b).pvalue),
        "per_rating_wilcoxon_p": float(stats.wilcoxon(sq_a[nonzero] - sq_b[nonzero]).pvalue),
        "ratings_better": int((sq_a < sq_b).sum()),
        "ratings_worse": int((sq_a > sq_b).sum()),
        # per user (negated MSE: positive differences favour the fused predictor), a user's ratings averaged
        "per_user": paired_comparison(-per_user_a[rated], -per_user_b[rated], seed=seed),
    }


def mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if key in r and r[key] is not None]
    return float(np.mean(values)) if values else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    from scipy import stats

    from fuserec.rating import RatingData
    from fuserec.rating_fusion import fit_rating_ensemble
    from fuserec.rating_meta import pair_meta

    frame, n_users, n_items = load_ratings(args.data)
    side = None if args.no_side else load_side(args.data)
    if side is not None:
        assert side.item_features is not None and side.user_features is not None
        if (len(side.item_features), len(side.user_features)) != (n_items, n_users):
            raise ValueError("u.item / u.user do not list the same ids as u.data: cannot align side features")
    rng = np.random.default_rng(args.seed)
    folds = np.array_split(rng.permutation(len(frame)), args.folds)
    configs = components_to_fuse(args)
    fuser_configs: dict[str, dict[str, Any]] = {name: {"seed": args.seed} for name in args.fusers}
    names = list(configs)
    print(f"components fused: {', '.join(names)}; fusers: {', '.join(fuser_configs)}", flush=True)
    actual_all = frame["rating"].to_numpy(np.float64)
    predicted = {name: np.full(len(frame), np.nan) for name in [*names, *fuser_configs, "auto"]}
    per_model: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    per_fuser: dict[str, list[dict[str, Any]]] = {name: [] for name in [*fuser_configs, "auto"]}
    reports: list[dict[str, Any]] = []
    run_folds = args.only_folds or list(range(1, args.folds + 1))
    for f, test_rows in enumerate(folds):
        if f + 1 not in run_folds:
            continue
        train_rows = np.concatenate([fold for g, fold in enumerate(folds) if g != f])
        train, test = frame.iloc[train_rows], frame.iloc[test_rows]
        actual = test["rating"].to_numpy(np.float64)
        start = time.perf_counter()
        ensemble, report, oof = fit_rating_ensemble(
            train,
            n_users,
            n_items,
            configs,
            fuser_configs,
            folds=args.inner_folds,
            seed=args.seed,
            crossfit=not args.carve,
            carve=0.1,
            side=side,
            log=print if args.verbose else None,
        )
        ensemble_s = time.perf_counter() - start
        histories = RatingData.from_frame(train, n_users, n_items).histories()
        users, items = test["user"].to_numpy(), test["item"].to_numpy()
        columns = []
        for name in names:
            model = ensemble.components[name]
            begin = time.perf_counter()
            folded = model.predict_pairs(histories, users, items)
            predict_s = time.perf_counter() - begin
            columns.append(folded)
            row = {
                "fold": f + 1,
                **errors(folded, actual),
                "fit_s": round(report["seconds"]["refit"][name], 3),
                "crossfit_s": round(report["seconds"]["crossfit_per_component"][name], 3),
                "predict_s": round(predict_s, 3),
            }
            plain = model.predict_fitted(users, items)
            if plain is not None:
                fitted = errors(plain, actual)
                row |= {"fitted_rmse": fitted["rmse"], "fitted_mae": fitted["mae"]}
            per_model[name].append(row)
            predicted[name][test_rows] = folded
            print(
                f"fold {f + 1} {name:16s} rmse {row['rmse']:.4f} mae {row['mae']:.4f}"
                + (f" fitted {row['fitted_rmse']:.4f}" if "fitted_rmse" in row else "")
                + f"  fit {row['fit_s']:.1f}s cross-fit {row['crossfit_s']:.1f}s predict {predict_s:.1f}s",
                flush=True,
            )
        preds = np.column_stack(columns).astype(np.float32)
        meta = pair_meta(histories, users, items, ensemble.stats)
        validation = {r["name"]: r["rmse"] for r in report["selection"]["ranking"]}
        for name in [*fuser_configs, "auto"]:
            served = ensemble.chosen if name == "auto" else name
            begin = time.perf_counter()
            fused, _ = ensemble.combine(preds, meta, served)
            row = {
                "fold": f + 1,
                **errors(fused, actual),
                "combine_s": round(time.perf_counter() - begin, 3),
                "validation_rmse": validation.get(served),
            }
            if name == "auto":
                row["chosen"] = served
            else:
                row["fit_s"] = round(report["seconds"]["fusers"][name], 3)
            per_fuser[name].append(row)
            predicted[name][test_rows] = fused
            print(
                f"fold {f + 1} {name:16s} rmse {row['rmse']:.4f} mae {row['mae']:.4f}"
                + (f"  (serves {served})" if name == "auto" else f"  fit {row['fit_s']:.1f}s")
                + f"  validation rmse {row['validation_rmse']:.4f}",
                flush=True,
            )
        reports.append({"fold": f + 1, "ensemble_s": round(ensemble_s, 1), **report})
        print(f"fold {f + 1} ensemble fitted in {ensemble_s:.0f}s; {report['reason']}", flush=True)
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            oof.to_parquet(args.dump / f"oof-{f + 1}.parquet")
            test_frame = test[["user", "item", "rating"]].reset_index(drop=True).copy()
            for j, name in enumerate(names):
                test_frame[f"pred:{name}"] = preds[:, j]
            for j, feature in enumerate(np.asarray(oof.filter(like="meta:").columns)):
                test_frame[feature] = meta[:, j]
            test_frame.to_parquet(args.dump / f"test-{f + 1}.parquet")

    models: dict[str, Any] = {}
    for name, rows in per_model.items():
        keys = ("rmse", "mae", "fitted_rmse", "fitted_mae", "fit_s", "crossfit_s", "predict_s")
        summary = {key: mean_of(rows, key) for key in keys}
        if summary["fitted_rmse"] is not None and summary["rmse"] is not None:
            summary["fold_in_gap_rmse"] = summary["rmse"] - summary["fitted_rmse"]
        anchor = ANCHORS.get(name)
        models[name] = {
            "config": configs[name],
            "folds": rows,
            "mean": summary,
            "anchor": {"rmse": anchor[0], "mae": anchor[1]} if anchor else None,
        }
    fusers: dict[str, Any] = {
        name: {
            "config": fuser_configs.get(name, "the lowest validation RMSE among fusers and raters"),
            "folds": rows,
            "mean": {key: mean_of(rows, key) for key in ("rmse", "mae", "fit_s", "validation_rmse")},
        }
        for name, rows in per_fuser.items()
    }
    done = np.concatenate([folds[f - 1] for f in run_folds])
    best = min(models, key=lambda n: models[n]["mean"]["rmse"])
    best_fused = min(fusers, key=lambda n: fusers[n]["mean"]["rmse"])
    user_index = frame["user"].to_numpy()[done]
    sq_best = (predicted[best][done] - actual_all[done]) ** 2
    tests = {}
    for name in fusers:
        sq = (predicted[name][done] - actual_all[done]) ** 2
        tests[name] = paired(sq, sq_best, user_index, n_users, args.seed)
        if len(run_folds) > 1:
            fold_fused = [r["rmse"] for r in per_fuser[name]]
            fold_best = [r["rmse"] for r in per_model[best]]
            tests[name]["per_fold_rmse_ttest_p"] = float(stats.ttest_rel(fold_fused, fold_best).pvalue)
    target = 0.900
    return {
        "dataset": "movielens-100k",
        "data": str(args.data),
        "command": "python benchmarks/rating.py " + " ".join(sys.argv[1:]),
        "protocol": {
            "folds": args.folds,
            "folds_run": run_folds,
            "seed": args.seed,
            "split": "shuffled ratings, equal folds (numpy default_rng(seed).permutation)",
            "prediction": "fold-in from the test user's training-fold rated history",
            "side": "none"
            if args.no_side
            else "item content (genres, year, title) and user attributes (age band, gender, occupation)",
            "fusion": (
                "fuserec.rating_fusion.fit_rating_ensemble on each training fold: "
                + (
                    "one 10% carve"
                    if args.carve
                    else f"cross-fitting over {args.inner_folds} folds of the training ratings"
                )
                + "; fusers learn on the out-of-fold rows; auto = lowest RMSE on held-out users' rows"
            ),
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "components": names,
        "models": models,
        "fusers": fusers,
        "best_single": best,
        "best_fused": best_fused,
        "target_rmse": target,
        "target_reached": bool(fusers[best_fused]["mean"]["rmse"] <= target),
        "auto_reaches_target": bool(fusers["auto"]["mean"]["rmse"] <= target),
        "paired_test": {"best_single": best, "best_fused": best_fused, **tests[best_fused]},
        "paired_tests": tests,
        "ensembles": reports,
        "seconds": round(time.perf_counter() - args.started, 1),
        "anchor_source": "Surprise README, ML-100k, 5-fold CV, default parameters "
        "(its k-NN Baseline: MSD similarity, user-based)",
    }


def table(result: dict[str, Any]) -> str:
    def num(value: float | None, digits: int = 4) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    folds = result["protocol"]["folds_run"]
    lines = [
        "| predictor | " + " | ".join(f"fold {f} RMSE / MAE" for f in folds) + " | mean RMSE | mean MAE "
        "| RMSE fitted | gap (RMSE) | fit s | Surprise RMSE / MAE |",
        "|---" * (len(folds) + 7) + "|",
    ]
    for name, entry in result["models"].items():
        m, anchor = entry["mean"], entry["anchor"]
        published = "-" if anchor is None else f"{anchor['rmse']:.3f} / {anchor['mae']:.3f}"
        per_fold = " | ".join(f"{r['rmse']:.4f} / {r['mae']:.4f}" for r in entry["folds"])
        lines.append(
            f"| {name} | {per_fold} | {num(m['rmse'])} | {num(m['mae'])} | {num(m['fitted_rmse'])} "
            f"| {num(m.get('fold_in_gap_rmse'))} | {num(m['fit_s'], 2)} | {published} |"
        )
    for name, entry in result["fusers"].items():
        m = entry["mean"]
        per_fold = " | ".join(
            f"{r['rmse']:.4f} / {r['mae']:.4f}" + (f" ({r['chosen']})" if "chosen" in r else "")
            for r in entry["folds"]
        )
        label = "auto (chosen out of fold)" if name == "auto" else f"fused: {name}"
        lines.append(
            f"| {label} | {per_fold} | {num(m['rmse'])} | {num(m['mae'])} | - | - "
            f"| {num(m.get('fit_s'), 2)} | - |"
        )
    p = result["paired_test"]
    lines += [
        "",
        f"components fused: {', '.join(result['components'])}",
        f"best fused ({p['best_fused']}) vs best single ({p['best_single']}) over {p['n_ratings']} ratings: "
        f"MSE {p['mean_squared_error_fused']:.4f} vs {p['mean_squared_error_best']:.4f}; "
        f"per-rating paired t-test p={p['per_rating_ttest_p']:.3g}, "
        f"Wilcoxon p={p['per_rating_wilcoxon_p']:.3g}; per-user t-test p={p['per_user']['p_value']:.3g} "
        f"({p['per_user']['users_better']} users better, {p['per_user']['users_worse']} worse)"
        + (
            f"; per-fold RMSE t-test p={p['per_fold_rmse_ttest_p']:.3g}"
            if "per_fold_rmse_ttest_p" in p
            else ""
        ),
        f"target RMSE <= {result['target_rmse']}: "
        + ("reached" if result["target_reached"] else "NOT reached")
        + f" (best fused {result['fusers'][p['best_fused']]['mean']['rmse']:.4f}, "
        f"auto {result['fusers']['auto']['mean']['rmse']:.4f}); run took {result['seconds']:.0f}s",
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
    parser.add_argument("--fusers", nargs="+", default=list(FUSERS), help="rating fusers to learn")
    parser.add_argument(
        "--inner-folds", type=int, default=5, help="cross-fitting folds of each training fold"
    )
    parser.add_argument("--carve", action="store_true", help="one 10%% carve instead of cross-fitting")
    parser.add_argument("--no-neural", action="store_true", help="leave the neural rater out even if present")
    parser.add_argument(
        "--no-side", action="store_true", help="fit without item content and user attributes (as before)"
    )
    parser.add_argument("--only-folds", type=int, nargs="+", default=None, help="run these outer folds only")
    parser.add_argument("--dump", type=Path, default=None, help="write out-of-fold and test rows here")
    parser.add_argument("--verbose", action="store_true", help="print each cross-fitting step")
    parser.add_argument("--svdpp-epochs", type=int, default=None, help="fewer SVD++ epochs on a slow machine")
    args = parser.parse_args(argv)
    args.started = time.perf_counter()
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
