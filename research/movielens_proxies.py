"""Other MovieLens data from ML-100k, for checking that one fusion configuration holds beyond it.

Does the same fusion configuration, unchanged, still beat the best single plugin on other MovieLens
data? Only ML-100k is on this machine, so this writes subsets of it in the ML-1M file format
(``ratings.dat``, ``movies.dat``, ``users.dat``, ``::``-separated, ages as ML-1M's groups and occupations
as codes): a random share of the users, a random share of the items, or the earliest share of the ratings
by time. ``fuserec run -s data.source=movielens-1m -s data.path=<folder>`` then reads each one through the
ML-1M loader with no per-dataset file in ``fuserec/dataset_settings/`` (there is none for
``movielens-1m``), i.e. with the settings an unknown MovieLens release would get.

``--format latest`` writes them in ml-latest-small's layout instead (``ratings.csv``, ``movies.csv``, no
users file, so no demographics), plus ``all``: every rating. ``fuserec run -s data.source=movielens-latest``
reads those, again with no per-dataset settings.

They are not independent of ML-100k (same users, films and months), so they check robustness to a
different sample, not to a different population. The data is not redistributable: write it outside the
repository.

Usage:
    python research/movielens_proxies.py --source ../shared/data/ml-100k --out /tmp/proxies
    for p in users-a users-b items items-[b-i] early; do
        fuserec run -s data.source=movielens-1m -s data.path=/tmp/proxies/$p -s outputs=/tmp/proxy-runs/$p
    done
    python research/movielens_proxies.py --summarize /tmp/proxy-runs/* \
        --json research/results/movielens-proxies.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd

ML1M_AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)  # ML-1M codes an age by the lower bound of its group
SUBSETS = {  # name: (what is sampled, share kept, seed)
    "users-a": ("users", 0.67, 11),
    "users-b": ("users", 0.67, 12),
    "items": ("items", 0.6, 13),
    "items-b": ("items", 0.6, 14),  # more draws of the films: each leaves ~60 real cold test users
    "items-c": ("items", 0.6, 15),
    **{f"items-{c}": ("items", 0.6, seed) for c, seed in zip("defghi", range(16, 22), strict=True)},
    "early": ("time", 0.6, 0),
}


def read_ml100k(source: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ratings = pd.read_csv(source / "u.data", sep="\t", names=["user", "item", "rating", "timestamp"])
    genre_lines = (source / "u.genre").read_text(encoding="latin-1").splitlines()
    genres = [line.split("|")[0] for line in genre_lines if line.strip()]
    raw = pd.read_csv(source / "u.item", sep="|", header=None, encoding="latin-1")
    flags = raw.iloc[:, 5 : 5 + len(genres)].to_numpy(bool)
    movies = pd.DataFrame(
        {
            "item": raw[0],
            "title": raw[1],
            "genres": [
                "|".join(g for g, on in zip(genres, row, strict=True) if on) or "unknown" for row in flags
            ],
        }
    )
    users = pd.read_csv(source / "u.user", sep="|", names=["user", "age", "gender", "occupation", "zip"])
    return ratings, movies, users


def subset(ratings: pd.DataFrame, what: str, share: float, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    if what == "time":
        return ratings[ratings["timestamp"] <= ratings["timestamp"].quantile(share)]
    column = {"users": "user", "items": "item"}[what]
    ids = np.unique(ratings[column].to_numpy())
    kept = rng.choice(ids, round(share * len(ids)), replace=False)
    return ratings[ratings[column].isin(kept)]


def write_ml1m(folder: Path, ratings: pd.DataFrame, movies: pd.DataFrame, users: pd.DataFrame) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{r.user}::{r.item}::{r.rating}::{r.timestamp}" for r in ratings.itertuples(index=False)]
    (folder / "ratings.dat").write_text("\n".join(lines) + "\n", encoding="latin-1")
    movies = movies[movies["item"].isin(ratings["item"].unique())]  # a catalogue of the films kept
    lines = [f"{m.item}::{m.title}::{m.genres}" for m in movies.itertuples(index=False)]
    (folder / "movies.dat").write_text("\n".join(lines) + "\n", encoding="latin-1")
    users = users[users["user"].isin(ratings["user"].unique())]
    codes = {name: code for code, name in enumerate(sorted(users["occupation"].unique()))}
    lines = [
        f"{u.user}::{u.gender}::{max(a for a in ML1M_AGE_GROUPS if a <= max(u.age, 1))}::"
        f"{codes[u.occupation]}::{u.zip}"
        for u in users.itertuples(index=False)
    ]
    (folder / "users.dat").write_text("\n".join(lines) + "\n", encoding="latin-1")


def write_latest(folder: Path, ratings: pd.DataFrame, movies: pd.DataFrame) -> None:
    """ml-latest-small's layout: ratings.csv and movies.csv with headers, ratings as "4.0", no users file.

    No demographics reach the run, so the fusers learn without user attributes, as on every "latest" release.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "ratings.csv").open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["userId", "movieId", "rating", "timestamp"])
        writer.writerows(
            (r.user, r.item, f"{float(r.rating):.1f}", r.timestamp) for r in ratings.itertuples()
        )
    movies = movies[movies["item"].isin(ratings["item"].unique())]
    with (folder / "movies.csv").open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, lineterminator="\n")  # quotes titles that hold commas, as GroupLens does
        writer.writerow(["movieId", "title", "genres"])
        for m in movies.itertuples(index=False):
            genres = m.genres if m.genres != "unknown" else "(no genres listed)"
            writer.writerow([m.item, m.title, genres])


def summarize(outputs: Path) -> dict:
    """One finished run: the best single plugin, every fuser, and the paired tests, from its metrics.json."""
    metrics = json.loads((outputs / "metrics.json").read_text())
    significance = metrics["significance"]
    keys = ("n_users", "candidate_mean", "baseline_mean", "relative_gain", "ci95", "p_value")

    def test(segment: str) -> dict:
        found = significance.get(segment, {})
        return {k: found.get(k) for k in ("best_single_on_segment", *keys) if k in found}

    return {
        "run": outputs.name,
        "best_single": significance["best_single"],
        "best_single_ndcg@10": metrics["models"][significance["best_single"]]["ndcg@10"],
        "fusers_ndcg@10": {name: values["ndcg@10"] for name, values in metrics["fusers"].items()},
        "best_fuser": significance["best_fuser"],
        "all_users": test("all_users"),
        "cold_users": test("cold_users"),
        "cold_simulated": test("cold_simulated"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="the ml-100k folder")
    parser.add_argument("--out", type=Path, help="where to write one folder per subset")
    parser.add_argument(
        "--format",
        choices=["ml-1m", "latest"],
        default="ml-1m",
        help="ML-1M's '::' files with users.dat, or ml-latest-small's CSVs (no users; adds 'all')",
    )
    parser.add_argument("--summarize", type=Path, nargs="+", help="finished runs' outputs folders to report")
    parser.add_argument(
        "--json", type=Path, default=None, help="with --summarize: write the summary here too"
    )
    args = parser.parse_args()
    if args.summarize:
        rows = [summarize(outputs) for outputs in args.summarize]
        for row in rows:
            a = row["all_users"]
            print(
                f"{row['run']}: {row['best_fuser']} {a['candidate_mean']:.4f} vs {row['best_single']} "
                f"{a['baseline_mean']:.4f} ({a['relative_gain']:+.1%}, p = {a['p_value']:.2g})"
            )
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
        return
    if args.source is None or args.out is None:
        parser.error("give --source and --out to write the subsets, or --summarize with finished runs")
    ratings, movies, users = read_ml100k(args.source)
    subsets = SUBSETS if args.format == "ml-1m" else {"all": ("users", 1.0, 0), **SUBSETS}
    for name, (what, share, seed) in subsets.items():
        part = subset(ratings, what, share, seed)
        if args.format == "ml-1m":
            write_ml1m(args.out / name, part, movies, users)
        else:
            write_latest(args.out / name, part, movies)
        print(f"{name}: {len(part)} ratings, {part['user'].nunique()} users, {part['item'].nunique()} items")


if __name__ == "__main__":
    main()
