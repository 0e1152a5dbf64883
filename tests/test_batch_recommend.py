"""Batch top-k (``fuserec recommend``): right shape, seen items left out, unknown users served, and the
same rows as ``POST /recommend`` for the same user, from the training split and from the event store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fuserec.cli import app as cli
from fuserec.config import load_params
from fuserec.layout import Layout
from fuserec.serving.batch import OUTPUT_COLUMNS, rank_unseen, read_user_ids, recommend_batch
from fuserec.serving.service import RecommendIn, Service
from fuserec.serving.store import Event

from .conftest import SMALL, write_params

MAX_HISTORY = 6  # short, so long training histories are cut as the service cuts them
NOW = 1_700_000_000


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished small run whose exported model is a stacking fuser, so last_time matters."""
    from fuserec.tasks.clean import clean
    from fuserec.tasks.evaluate import evaluate
    from fuserec.tasks.export import export
    from fuserec.tasks.fuse import fuse
    from fuserec.tasks.split import split
    from fuserec.tasks.train import train
    from fuserec.tasks.validate import validate

    root = tmp_path_factory.mktemp("batch")
    sections = {
        **SMALL,
        "train": {"algorithms": ["popularity", "itemknn"]},
        "fuse": {"fusers": ["stacking"], "components": ["popularity", "itemknn"]},
        "fusers": {"stacking": {"n_estimators": 20, "folds": 3, "min_child_samples": 10}},
        "export": {"algorithm": "stacking", "max_history": MAX_HISTORY},
    }
    params = load_params(write_params(root, **sections))
    for stage in (validate, clean, split, train, fuse, export, evaluate):
        stage.fn(params)
    return params.outputs_dir


@pytest.fixture(scope="module")
def train_frame(outputs: Path) -> pd.DataFrame:
    """Training interactions with raw user ids."""
    layout = Layout(outputs)
    users = pd.read_parquet(layout.clean / "users.parquet")[["user", "user_id"]]
    return pd.read_parquet(layout.split / "train.parquet").merge(users, on="user")


def _some_users(train: pd.DataFrame, n: int = 4) -> list[str]:
    """Users with long and short training histories (longest first), so padding and cutting both happen."""
    counts = train["user_id"].astype(str).value_counts()
    return [*counts.index[:2], *counts.index[-(n - 2) :]]


def _service_rows(service: Service, user_id: str, k: int) -> list[tuple[str, float]]:
    got = service.recommend(RecommendIn(user_id=user_id, k=k, time=NOW))
    return [(x["item_id"], x["score"]) for x in got["items"]]


def _batch_rows(frame: pd.DataFrame, user_id: str) -> list[tuple[str, float]]:
    rows = frame[frame["user_id"] == user_id].sort_values("rank")
    return list(zip(rows["item_id"], rows["score"], strict=True))


def _assert_same(batch: list[tuple[str, float]], live: list[tuple[str, float]], user: str) -> None:
    assert [i for i, _ in batch] == [i for i, _ in live], user
    np.testing.assert_allclose([s for _, s in batch], [s for _, s in live], rtol=1e-6, atol=1e-7)


def test_rows_have_the_documented_shape_and_unknown_users_are_served(
    outputs: Path, train_frame: pd.DataFrame, tmp_path: Path
) -> None:
    known = _some_users(train_frame)
    users = tmp_path / "users.txt"
    users.write_text("\n".join([*known, "ghost-user", "", known[0]]) + "\n")
    summary = recommend_batch(outputs, users, tmp_path / "recs.parquet", k=7, batch_size=3, progress=False)
    frame = pd.read_parquet(tmp_path / "recs.parquet")
    assert list(frame.columns) == OUTPUT_COLUMNS
    assert summary.users == 5 and summary.duplicates == 1 and summary.rows == len(frame) == 5 * 7
    assert summary.unknown == 1 and summary.unknown_examples == ["ghost-user"]
    assert frame["user_id"].drop_duplicates().tolist() == [*known, "ghost-user"]
    for _, rows in frame.groupby("user_id"):
        assert rows["rank"].tolist() == list(range(1, 8))
        assert rows["score"].is_monotonic_decreasing and rows["item_id"].is_unique
    catalog = pd.read_parquet(Layout(outputs).export / "catalog.parquet")
    titles = dict(zip(catalog["item_id"].astype(str), catalog["title"].astype(str), strict=True))
    assert frame["title"].tolist() == [titles[i] for i in frame["item_id"]]
    # streamed: one Parquet row group per scored batch of 3 users, never the whole result in memory
    import pyarrow.parquet as pq

    assert pq.ParquetFile(tmp_path / "recs.parquet").num_row_groups == 2


def test_a_failed_batch_leaves_no_partial_file(tmp_path: Path) -> None:
    from fuserec.serving.batch import RowWriter

    out = tmp_path / "recs.parquet"
    row = pd.DataFrame({"user_id": ["u"], "rank": [1], "item_id": ["i"], "title": ["t"], "score": [1.0]})
    with pytest.raises(RuntimeError, match="scoring died"), RowWriter(out) as writer:
        writer.write(row)
        raise RuntimeError("scoring died")
    assert list(tmp_path.iterdir()) == []


def test_seen_items_are_excluded(outputs: Path, train_frame: pd.DataFrame, tmp_path: Path) -> None:
    users = _some_users(train_frame)
    (tmp_path / "users.csv").write_text("user_id\n" + "\n".join(users) + "\n")
    recommend_batch(outputs, tmp_path / "users.csv", tmp_path / "recs.csv", k=20, progress=False)
    frame = pd.read_csv(tmp_path / "recs.csv", dtype={"user_id": str, "item_id": str})
    ordered = train_frame.reset_index(drop=True)
    ordered = ordered.iloc[np.lexsort((np.arange(len(ordered)), ordered["timestamp"].to_numpy()))]
    catalog = pd.read_parquet(Layout(outputs).export / "catalog.parquet")["item_id"].astype(str).to_numpy()
    for user in users:
        served = ordered[ordered["user_id"].astype(str) == user]["item"].to_numpy()[-MAX_HISTORY:]
        assert len(served) > 0
        recommended = set(frame.loc[frame["user_id"] == user, "item_id"])
        assert len(recommended) == 20 and not recommended & set(catalog[served]), user


def test_rows_match_the_service_from_the_training_split(
    outputs: Path, train_frame: pd.DataFrame, tmp_path: Path
) -> None:
    users = [*_some_users(train_frame), "never-seen"]
    (tmp_path / "users.txt").write_text("\n".join(users))
    recommend_batch(
        outputs, tmp_path / "users.txt", tmp_path / "r.parquet", k=10, batch_size=2, now=NOW, progress=False
    )
    frame = pd.read_parquet(tmp_path / "r.parquet")
    service = Service(outputs, tmp_path / "events.sqlite")  # first start: imports the training split
    assert service.model.uses_time  # so each user's last_time has to agree too
    try:
        for user in users:
            _assert_same(_batch_rows(frame, user), _service_rows(service, user, 10), user)
    finally:
        service.store.close()


def test_rows_match_the_service_from_the_event_store(
    outputs: Path, train_frame: pd.DataFrame, tmp_path: Path
) -> None:
    store = tmp_path / "events.sqlite"
    catalog = pd.read_parquet(Layout(outputs).export / "catalog.parquet")["item_id"].astype(str).tolist()
    service = Service(outputs, store)
    fresh = [Event("fresh", catalog[i], NOW - 100 + i) for i in (5, 9, 13)]
    fresh.append(Event("fresh", "retired-item", NOW - 1))  # not in the catalogue: dropped by both paths
    long_user = _some_users(train_frame)[0]
    fresh.append(Event(long_user, catalog[1], NOW - 50))
    service.store.append(fresh)
    users = ["fresh", long_user, "nobody", _some_users(train_frame)[-1]]
    try:
        pd.DataFrame({"user_id": users}).to_parquet(tmp_path / "users.parquet")
        summary = recommend_batch(
            outputs, tmp_path / "users.parquet", tmp_path / "r.csv", k=5, store=store, now=NOW, progress=False
        )
        assert summary.unknown_examples == ["nobody"] and "event store" in summary.source
        frame = pd.read_csv(tmp_path / "r.csv", dtype={"user_id": str, "item_id": str, "title": str})
        for user in users:
            _assert_same(_batch_rows(frame, user), _service_rows(service, user, 5), user)
        assert catalog[1] not in set(frame.loc[frame["user_id"] == long_user, "item_id"])
    finally:
        service.store.close()


def _text(output: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(output.split())


def test_the_cli_writes_the_file_and_reports_unknown_users(
    outputs: Path, train_frame: pd.DataFrame, tmp_path: Path
) -> None:
    (tmp_path / "users.txt").write_text("\n".join([*_some_users(train_frame, 3), "who-1", "who-2"]))
    out = tmp_path / "recs" / "top.parquet"
    args = ["recommend", "--outputs", str(outputs), "--users", str(tmp_path / "users.txt"), "--out", str(out)]
    result = CliRunner().invoke(cli, [*args, "--k", "4", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "2 unknown" in _text(result.output) and "who-1" in _text(result.output)
    assert len(pd.read_parquet(out)) == 5 * 4

    bad = CliRunner().invoke(cli, [*args[:-1], str(tmp_path / "top.json")])
    assert bad.exit_code == 2 and ".parquet or .csv" in _text(bad.output)
    missing = CliRunner().invoke(cli, [*args, "--store", str(tmp_path / "none.sqlite")])
    assert missing.exit_code == 2 and "does not exist" in _text(missing.output)


def test_ranking_puts_ties_on_the_lower_index_and_never_returns_seen_items() -> None:
    scores = np.array([[1.0, 3.0, 3.0, 0.5, 3.0]])
    seen = np.array([[False, True, False, False, False]])
    order, valid = rank_unseen(scores, seen, 10)
    assert order[0, valid[0]].tolist() == [2, 4, 0, 3]


def test_user_files_keep_ids_as_text(tmp_path: Path) -> None:
    (tmp_path / "u.csv").write_text("user_id,other\n007,x\n42,y\n007,z\n,w\n")
    assert read_user_ids(tmp_path / "u.csv") == (["007", "42"], 1)
    (tmp_path / "u.csv").write_text("id\n1\n")
    with pytest.raises(ValueError, match="no user_id column"):
        read_user_ids(tmp_path / "u.csv")


def test_training_events_add_low_ratings_from_before_the_test_period(tmp_path: Path) -> None:
    from fuserec.serving.batch import training_events

    layout = Layout(tmp_path)
    layout.clean.mkdir(parents=True)
    layout.split.mkdir(parents=True)
    train = pd.DataFrame(
        {"user": [1, 0, 1], "item": [5, 2, 3], "rating": [4.0, 5.0, 4.0], "timestamp": [30, 10, 20]}
    )
    train.to_parquet(layout.split / "train.parquet")
    pd.DataFrame({"user": [0, 0], "item": [7, 8], "rating": [4.0, 5.0], "timestamp": [50, 40]}).to_parquet(
        layout.split / "test.parquet"
    )
    ratings = pd.DataFrame(
        {  # user 0's test period starts at 40; user 1 has no test positives, so all its low ratings count
            "user": [0, 0, 0, 1, 0, 0],
            "item": [2, 4, 6, 9, 1, 7],
            "rating": [5.0, 2.0, 1.0, 3.0, 3.0, 4.0],
            "timestamp": [10, 39, 40, 99, 45, 50],
            "positive": [True, False, False, False, False, True],
        }
    )
    ratings.to_parquet(layout.clean / "ratings.parquet")
    got = training_events(layout)
    assert got[["user", "item", "timestamp"]].values.tolist() == [
        [1, 5, 30],
        [0, 2, 10],
        [1, 3, 20],
        [0, 4, 39],
        [1, 9, 99],
    ]
    assert got["positive"].tolist() == [True, True, True, False, False]
    assert got["rating"].tolist() == [4.0, 5.0, 4.0, 2.0, 3.0]
    (layout.split / "test.parquet").unlink()  # no test period: every low rating is from before it
    assert training_events(layout)["item"].tolist() == [5, 2, 3, 4, 6, 9, 1]
    (layout.clean / "ratings.parquet").unlink()  # an older run: the positives alone
    assert training_events(layout)["item"].tolist() == [5, 2, 3]


def test_low_ratings_and_positives_older_than_the_window_are_never_listed(
    outputs: Path, train_frame: pd.DataFrame, tmp_path: Path
) -> None:
    """Both are things the user has seen: the service and batch leave them out, not just the history."""
    from fuserec.serving.batch import training_events

    layout = Layout(outputs)
    events = training_events(layout)
    users = pd.read_parquet(layout.clean / "users.parquet")[["user", "user_id"]]
    catalog = pd.read_parquet(layout.export / "catalog.parquet")["item_id"].astype(str).to_numpy()
    counts = events.groupby("user").size()
    ids = users.set_index("user")["user_id"].astype(str)
    chosen = [ids[u] for u in counts.sort_values(ascending=False).index[:6]]
    (tmp_path / "users.txt").write_text("\n".join(chosen))
    recommend_batch(outputs, tmp_path / "users.txt", tmp_path / "r.parquet", k=50, now=NOW, progress=False)
    frame = pd.read_parquet(tmp_path / "r.parquet")
    service = Service(outputs, tmp_path / "events.sqlite")
    beyond_window = 0
    try:
        for user in chosen:
            mine = events[
                events["user"] == int(users.loc[users["user_id"].astype(str) == user, "user"].iloc[0])
            ]
            assert (~mine["positive"]).any() and mine["positive"].sum() > MAX_HISTORY, user
            seen = set(catalog[mine["item"].to_numpy()])
            listed = set(frame.loc[frame["user_id"] == user, "item_id"])
            live = {
                x["item_id"] for x in service.recommend(RecommendIn(user_id=user, k=50, time=NOW))["items"]
            }
            assert len(listed) == 50 and not listed & seen and live == listed, user
            beyond_window += len(seen) - MAX_HISTORY
        # a live one-star rating of the top item takes it out of the next list at once
        user = chosen[0]
        top = service.recommend(RecommendIn(user_id=user, k=1, time=NOW))["items"][0]["item_id"]
        service.store.append([Event(user, top, NOW - 1, "rating", 1.0)])
        after = service.recommend(RecommendIn(user_id=user, k=10, time=NOW))
        assert top not in {x["item_id"] for x in after["items"]} and after["history_length"] == MAX_HISTORY
    finally:
        service.store.close()
    assert beyond_window > 0


def test_a_store_imported_before_low_ratings_gets_them_once(outputs: Path, tmp_path: Path) -> None:
    from fuserec.serving.batch import training_events
    from fuserec.serving.store import SQLiteEventStore

    layout = Layout(outputs)
    catalog = pd.read_parquet(layout.export / "catalog.parquet")["item_id"].astype(str).to_numpy()
    users = pd.read_parquet(layout.clean / "users.parquet")[["user", "user_id"]]
    frame = training_events(layout).merge(users, on="user", sort=False)
    frame = frame.assign(user_id=frame["user_id"].astype(str), item_id=catalog[frame["item"].to_numpy()])
    low = frame[~frame["positive"].to_numpy(bool)]
    assert len(low) > 0
    old = SQLiteEventStore(tmp_path / "old.sqlite")  # what the first-start import stored before: positives
    old.import_frame(frame.loc[frame["positive"].to_numpy(bool), ["user_id", "item_id", "timestamp"]])
    old.append([Event("live-user", catalog[0], NOW)])
    old.close()
    for _ in range(2):  # the second start imports nothing
        service = Service(outputs, tmp_path / "old.sqlite")
        try:
            assert service.store.count() == len(frame) + 1
            user = low["user_id"].iloc[0]
            assert set(low.loc[low["user_id"] == user, "item_id"]) <= set(service.store.seen(user))
        finally:
            service.store.close()
