"""Added items reach the next retrain: ``fuserec store export-items`` writes them as rows of an items
table, and a csv/parquet data source that reads it puts them, with their metadata, in the catalogue."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from fuserec.cli import app
from fuserec.serving.store import ItemRecord, SQLiteEventStore

from .conftest import write_params


def _store(path: Path) -> None:
    store = SQLiteEventStore(path)
    try:
        store.upsert_items(
            [
                ItemRecord(
                    "1001", "Heat, Again (2031)", ("Crime", "Thriller"), ("heist",), "a second heist", 2031
                ),
                ItemRecord("1002", "Quiet Days", ("Drama",), (), "", None),
                ItemRecord("2", "Shadowed by the source", ("Comedy",), (), "", 1999),  # the file's row wins
            ],
            now=100,
        )
    finally:
        store.close()


def test_added_items_reach_the_catalogue_of_the_next_retrain(tmp_path: Path) -> None:
    from fuserec.config import load_params
    from fuserec.stages.clean import clean
    from fuserec.stages.validate import validate

    store = tmp_path / "events.sqlite"
    _store(store)
    data = tmp_path / "data"
    data.mkdir()
    base = pd.DataFrame(
        {
            "item_id": [str(i) for i in range(6)],
            "title": [f"Base {i}" for i in range(6)],
            "genres": ["Drama", "Comedy", "Action", "Drama|Comedy", "War", "Crime"],
            "year": [str(1990 + i) for i in range(6)],
        }
    )
    base.to_csv(tmp_path / "items_before.csv", index=False)
    rng = np.random.default_rng(0)
    ids = [*base["item_id"], "1001"]  # after the retrain the added item has interactions like any other
    rows = [
        (str(u), ids[int(i)], 5.0, 1000 + 10 * u + j)
        for u in range(30)
        for j, i in enumerate(rng.choice(7, 5, replace=False))
    ]
    pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).to_parquet(
        data / "interactions.parquet"
    )

    result = CliRunner().invoke(
        app,
        [
            "store",
            "export-items",
            str(data / "items.parquet"),
            "--store",
            str(store),
            "--merge",
            str(tmp_path / "items_before.csv"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "8 rows" in result.output and "2 added items" in result.output
    table = pd.read_parquet(data / "items.parquet")
    assert list(table["item_id"]) == [*base["item_id"], "1001", "1002"]
    assert table.loc[table["item_id"] == "2", "title"].iat[0] == "Base 2"  # the source's row wins

    params = load_params(
        write_params(
            tmp_path,
            data={
                "source": "parquet",
                "path": str(data),
                "files": {"interactions": "interactions.parquet", "items": "items.parquet"},
            },
        )
    )
    validate(params)
    clean(params)
    items = pd.read_parquet(params.outputs_dir / "clean" / "items.parquet")
    new = items[items["item_id"].astype(str) == "1001"]
    assert len(new) == 1
    assert new["title"].iat[0] == "Heat, Again (2031)" and new["genres"].iat[0] == "Crime|Thriller"
    assert str(new["tags"].iat[0]) == "heist" and int(new["year"].iat[0]) == 2031
    assert "1002" in set(items["item_id"].astype(str))  # an item nobody has touched yet is catalogued too


def test_a_csv_that_cannot_hold_a_value_is_refused_by_item(tmp_path: Path) -> None:
    store = tmp_path / "events.sqlite"
    _store(store)
    out = tmp_path / "items.csv"
    result = CliRunner().invoke(app, ["store", "export-items", str(out), "--store", str(store)])
    assert result.exit_code == 2 and "'1001'" in result.output and ".parquet" in result.output
    assert not out.exists()
    ok = CliRunner().invoke(
        app, ["store", "export-items", str(out), "--store", str(store), "--separator", ";"]
    )
    assert ok.exit_code == 0, ok.output
    lines = out.read_text().splitlines()
    assert lines[0] == "item_id;title;genres;tags;text;year" and lines[1].startswith(
        "1001;Heat, Again (2031);Crime|Thriller"
    )
    missing = CliRunner().invoke(
        app, ["store", "export-items", str(out), "--store", str(tmp_path / "none.sqlite")]
    )
    assert missing.exit_code == 2 and "does not exist" in missing.output
