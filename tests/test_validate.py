"""Validation stage: every rule on the bad-input fixture, loader errors, the threshold, a property test.

The expected outcomes are the ones listed line by line in tests/fixtures/bad_input/README.md.
Great Expectations is imported once per process (fuserec.tasks.validate caches its context); the
fixture runs are module-scoped so each is validated once.
"""

from __future__ import annotations

import ast
import codecs
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuserec.stages.validate as validate_module
from fuserec.config import DataConfig, ValidateConfig
from fuserec.data.delimited import read_delimited
from fuserec.data.generic import load_generic
from fuserec.data.movielens import load_movielens_100k
from fuserec.data.raw import RawSource
from fuserec.manifest import read_json
from fuserec.stages.validate import (
    ValidationError,
    check_reconciles,
    decode_counting,
    scan_text_file,
    validate_source,
)

FIXTURE = Path(__file__).parent / "fixtures" / "bad_input"
GENERIC = FIXTURE / "generic"
LENIENT = ValidateConfig(max_reject_share=1.0)
TABLES = ("interactions", "items", "users")

EXPECTED_REJECTS = {
    "interactions": {
        7: "user_id_not_null",
        8: "item_id_not_null",
        9: "rating_not_null",
        10: "rating_in_range",
        11: "rating_in_range",
        12: "rating_numeric",
        13: "user_id_non_negative_integer",
        14: "user_id_non_negative_integer",
        15: "item_id_non_negative_integer",
        16: "timestamp_integer",
        17: "timestamp_in_range",
        18: "timestamp_in_range",
        19: "unknown_item",
        20: "unknown_user",
        21: "duplicate_row",
        22: "unknown_item",
        23: "unknown_user",
        24: "malformed_line",
        25: "malformed_line",
        26: "user_id_not_null; rating_in_range",
        29: "duplicate_row",
    },
    "items": {
        6: "duplicate_item_id",
        7: "item_id_non_negative_integer",
        8: "item_id_not_null",
        9: "malformed_line",
    },
    "users": {5: "duplicate_user_id", 6: "user_id_non_negative_integer", 8: "malformed_line"},
}
EXPECTED_COUNTS = {
    "interactions": {
        "malformed_line": 2,
        "user_id_not_null": 2,
        "user_id_non_negative_integer": 2,
        "item_id_not_null": 1,
        "item_id_non_negative_integer": 1,
        "rating_not_null": 1,
        "rating_numeric": 1,
        "rating_in_range": 3,
        "timestamp_not_null": 0,
        "timestamp_integer": 1,
        "timestamp_in_range": 2,
        "duplicate_row": 2,
        "unknown_item": 2,
        "unknown_user": 2,
    },
    "items": {
        "malformed_line": 1,
        "item_id_not_null": 1,
        "item_id_non_negative_integer": 1,
        "duplicate_item_id": 1,
    },
    "users": {
        "malformed_line": 1,
        "user_id_not_null": 0,
        "user_id_non_negative_integer": 1,
        "duplicate_user_id": 1,
    },
}
EXPECTATIONS = {
    "user_id_not_null": "expect_column_values_to_not_be_null",
    "user_id_non_negative_integer": "expect_column_values_to_match_regex",
    "rating_numeric": "expect_column_values_to_match_regex",
    "rating_in_range": "expect_column_values_to_be_between",
    "timestamp_in_range": "expect_column_values_to_be_between",
    "duplicate_row": "expect_column_values_to_be_null",
    "unknown_item": "expect_column_values_to_be_in_set",
    "unknown_user": "expect_column_values_to_be_in_set",
    "malformed_line": None,
}


def generic_config(**files: str) -> DataConfig:
    names = {"interactions": "interactions.csv", "items": "items.csv", "users": "users.csv", **files}
    return DataConfig.model_validate(
        {"source": "csv", "path": str(GENERIC), "files": {k: v for k, v in names.items() if v}}
    )


@pytest.fixture(scope="module")
def generic_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("generic")
    source = load_generic(GENERIC, generic_config())
    return out, validate_source(source, LENIENT, out)


def rejects(out: Path, table: str) -> pd.DataFrame:
    return pd.read_parquet(out / "rejects" / f"{table}.parquet")


def rules_of(entry: dict) -> dict[str, dict]:
    return {r["rule"]: r for r in entry["rules"]}


# --------------------------------------------------------------------------------------------------
# Generic CSV fixture: every rule


def test_loader_keeps_raw_strings_and_malformed_lines() -> None:
    source = load_generic(GENERIC, generic_config())
    assert list(source.interactions.columns) == [
        "user_id",
        "item_id",
        "rating",
        "timestamp",
        "_source",
        "_line",
    ]
    assert source.interactions["user_id"].iloc[5] == ""  # line 7, an empty field stays a string
    assert source.interactions["_line"].tolist()[:3] == [2, 3, 4]
    assert list(source.items.columns)[:4] == ["item_id", "title", "genres", "year"]
    assert sorted(source.malformed["_line"][source.malformed["table"] == "interactions"]) == [24, 25]
    assert source.files["items"] == str(GENERIC / "items.csv")


@pytest.mark.parametrize("table", TABLES)
def test_every_rule_reported_with_count_and_samples(generic_run: tuple[Path, dict], table: str) -> None:
    _, report = generic_run
    entry = report["tables"][table]
    rules = rules_of(entry)
    assert {name: rules[name]["count"] for name in EXPECTED_COUNTS[table]} == EXPECTED_COUNTS[table]
    assert {name: r["count"] for name, r in rules.items() if r["count"]} == {
        k: v for k, v in EXPECTED_COUNTS[table].items() if v
    }
    for name, rule in rules.items():
        if name in EXPECTATIONS:
            assert rule["expectation"] == EXPECTATIONS[name]
        assert len(rule["samples"]) == min(rule["count"], LENIENT.sample_rows)
        lines = [s["line"] for s in rule["samples"]]
        assert lines == sorted(lines)
        assert all(name in EXPECTED_REJECTS[table][line] for line in lines)
    assert entry["file"] == str(GENERIC / f"{table}.csv")


def test_samples_show_line_and_values(generic_run: tuple[Path, dict]) -> None:
    _, report = generic_run
    rules = rules_of(report["tables"]["interactions"])
    assert rules["rating_numeric"]["samples"] == [
        {"line": 12, "values": {"user_id": "2", "item_id": "4", "rating": "five", "timestamp": "881250959"}}
    ]
    assert rules["rating_in_range"]["kwargs"] == {"min_value": 0.5, "max_value": 5.0}
    assert [s["duplicate_of_line"] for s in rules["duplicate_row"]["samples"]] == [2, 6]
    assert rules["malformed_line"]["samples"][0]["raw"] == "1,2,3"
    assert rules["unknown_item"]["columns"] == ["item_id"]


@pytest.mark.parametrize("table", TABLES)
def test_rejects_written_with_reasons(generic_run: tuple[Path, dict], table: str) -> None:
    out, _ = generic_run
    frame = rejects(out, table)
    got = {int(line): rule.split(":")[0] for line, rule in zip(frame["_line"], frame["rule"], strict=True)}
    assert got == EXPECTED_REJECTS[table]
    assert list(frame.columns[-4:]) == ["raw", "_source", "_line", "rule"]
    assert (frame["_source"] == str(GENERIC / f"{table}.csv")).all()


def test_rejects_keep_raw_values(generic_run: tuple[Path, dict]) -> None:
    out, _ = generic_run
    frame = rejects(out, "interactions").set_index("_line")
    assert frame.loc[12, "rating"] == "five"
    assert frame.loc[14, "user_id"] == "abc"
    assert frame.loc[7, "user_id"] == ""
    assert frame.loc[25, "raw"] == "2,6,4,881250967,extra"
    assert frame.loc[25, "rule"].startswith("malformed_line: expected 4 fields")
    assert pd.isna(frame.loc[25, "user_id"])


@pytest.mark.parametrize("table", TABLES)
def test_counts_reconcile(generic_run: tuple[Path, dict], table: str) -> None:
    out, report = generic_run
    entry = report["tables"][table]
    assert entry["rows_in"] == entry["rows_kept"] + entry["rows_rejected"]
    assert entry["rows_rejected"] == len(rejects(out, table)) == len(EXPECTED_REJECTS[table])
    assert entry["rows_kept"] == len(pd.read_parquet(out / "validated" / f"{table}.parquet"))
    assert read_json(out / "validation_report.json") == report


def test_valid_interactions_all_kept_with_types(generic_run: tuple[Path, dict]) -> None:
    out, report = generic_run
    frame = pd.read_parquet(out / "validated" / "interactions.parquet")
    assert report["tables"]["interactions"]["rows_kept"] == 8
    assert dict(frame.dtypes.astype(str)) == {
        "user_id": "int64",
        "item_id": "int64",
        "rating": "float64",
        "timestamp": "int64",
    }
    expected = pd.DataFrame(
        {
            "user_id": [1, 1, 2, 2, 3, 4, 6, 1],
            "item_id": [1, 2, 1, 3, 6, 6, 3, 4],
            "rating": [4.0, 3.5, 5.0, 1.0, 2.5, 4.5, 1.5, 4.0],
            "timestamp": [
                881250949,
                881250950,
                881250951,
                881250952,
                881250953,
                881250969,
                881250970,
                881250957,
            ],
        }
    )
    pd.testing.assert_frame_equal(frame, expected)  # file order; line 30 kept (its twin line 10 was bad)


def test_valid_items_and_users_with_types(generic_run: tuple[Path, dict]) -> None:
    out, report = generic_run
    items = pd.read_parquet(out / "validated" / "items.parquet")
    assert items["item_id"].tolist() == [1, 2, 3, 4, 6]
    assert items["item_id"].dtype == np.int64
    assert items["title"].tolist()[3] == "Mars Bakery"
    assert items["tags"].tolist() == [""] * 5  # absent text column -> empty strings
    assert str(items["year"].dtype) == "Int64"
    assert items["year"].isna().tolist() == [False, False, False, True, False]
    assert any("year" in note for note in report["tables"]["items"]["notes"])
    users = pd.read_parquet(out / "validated" / "users.parquet")
    assert users["user_id"].tolist() == [1, 2, 3, 4, 6]
    assert users["age"].tolist() == ["24", "53", "31", "thirty", "45"]  # not all numeric: kept as text
    assert any("age kept as text" in note for note in report["tables"]["users"]["notes"])
    assert "_line" not in users and "_source" not in items


# --------------------------------------------------------------------------------------------------
# MovieLens-100k layout


def test_ml100k_fixture(tmp_path: Path) -> None:
    # Stored as *.fixture so no file in the repo is named like a (non-redistributable) MovieLens file.
    source = tmp_path / "ml100k"
    source.mkdir()
    for fixture in (FIXTURE / "ml100k").glob("*.fixture"):
        shutil.copy(fixture, source / fixture.stem)
    report = validate_source(load_movielens_100k(source), LENIENT, tmp_path / "out")
    counts = {t: (e["rows_in"], e["rows_kept"], e["rows_rejected"]) for t, e in report["tables"].items()}
    assert counts == {"interactions": (12, 5, 7), "items": (4, 3, 1), "users": (4, 3, 1)}
    got = rejects(tmp_path / "out", "interactions")
    assert dict(zip(got["_line"], got["rule"].str.split(":").str[0], strict=True)) == {
        6: "user_id_non_negative_integer",
        7: "rating_in_range",
        8: "unknown_item",
        9: "unknown_user",
        10: "duplicate_row",
        11: "malformed_line",
        12: "unknown_item",
    }
    assert rejects(tmp_path / "out", "items")["_line"].tolist() == [4]
    items = pd.read_parquet(tmp_path / "out" / "validated" / "items.parquet")
    assert items["genres"].tolist() == ["Drama", "Comedy|Drama|Romance", "Sci-Fi"]
    assert items["year"].tolist() == [1994, 1995, 1996]


# --------------------------------------------------------------------------------------------------
# Table-level errors name the file and rule


def test_missing_file_names_it() -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(GENERIC / "absent.csv"))):
        load_generic(GENERIC, generic_config(interactions="absent.csv"))
    with pytest.raises(FileNotFoundError, match="users file not found"):
        load_generic(GENERIC, generic_config(users="absent.csv"))


def test_missing_column_names_file_columns_and_mapping() -> None:
    with pytest.raises(ValueError) as err:
        load_generic(GENERIC, generic_config(interactions="renamed_interactions.csv", items="", users=""))
    message = str(err.value)
    assert str(GENERIC / "renamed_interactions.csv") in message
    assert "missing_column" in message
    assert "['user_id', 'item_id']" in message
    assert "['userId', 'movieId', 'score', 'ts']" in message
    assert "data:" in message and "columns:" in message and "user_id: userId" in message
    # The mapping the message asks for makes it load.
    cfg = generic_config(interactions="renamed_interactions.csv", items="", users="")
    cfg = cfg.model_copy(
        update={"columns": cfg.columns.model_validate({"user_id": "userId", "item_id": "movieId",
                                                       "rating": "score", "timestamp": "ts"})}
    )  # fmt: skip
    source = load_generic(GENERIC, cfg)
    assert source.interactions["rating"].tolist() == ["4", "5", "2.5"]


def test_explicitly_mapped_optional_column_must_exist() -> None:
    cfg = DataConfig.model_validate(
        {"source": "csv", "files": {"interactions": "renamed_interactions.csv"},
         "columns": {"user_id": "userId", "item_id": "movieId", "rating": "stars"}}
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"\['stars'\] not found \(rule: missing_column\)"):
        load_generic(GENERIC, cfg)


def test_item_columns_mapping_error_names_its_key(tmp_path: Path) -> None:
    (tmp_path / "i.csv").write_text("user_id,item_id\n1,1\n")
    (tmp_path / "m.csv").write_text("movie,name\n1,A\n")
    cfg = DataConfig.model_validate({"source": "csv", "files": {"interactions": "i.csv", "items": "m.csv"}})
    with pytest.raises(ValueError, match="item_columns") as err:
        load_generic(tmp_path, cfg)
    assert str(tmp_path / "m.csv") in str(err.value)


@pytest.mark.parametrize("name", ["header_only.csv", "zero_bytes.csv"])
def test_empty_file_names_file_and_rule(name: str, tmp_path: Path) -> None:
    source = load_generic(GENERIC, generic_config(interactions=name, items="", users=""))
    assert len(source.interactions) == 0  # not the loader's error
    with pytest.raises(ValidationError, match=rf"{re.escape(str(GENERIC / name))}.*rule: empty_file"):
        validate_source(source, LENIENT, tmp_path)


def test_validate_missing_required_column(tmp_path: Path) -> None:
    frame = pd.DataFrame({"user": ["1"], "item_id": ["2"], "_source": "x.csv", "_line": [2]})
    source = RawSource(interactions=frame, files={"interactions": "x.csv"})
    with pytest.raises(
        ValidationError, match=r"x.csv: interactions lacks required column\(s\) \['user_id'\]"
    ):
        validate_source(source, LENIENT, tmp_path)


# --------------------------------------------------------------------------------------------------
# Threshold


def test_threshold_raises_after_writing_rejects_and_report(tmp_path: Path) -> None:
    source = load_generic(GENERIC, generic_config())
    with pytest.raises(ValidationError) as err:
        validate_source(source, ValidateConfig(), tmp_path)
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert str(GENERIC / "interactions.csv") in message
    assert "21 of 29 interactions rows rejected (72.4% > validate.max_reject_share = 5.0%)" in message
    assert "rating_in_range: 3" in message and "unknown_user: 2" in message and "malformed_line: 2" in message
    assert str(GENERIC / "users.csv") in message  # 3 of 8 users rejected
    assert str(tmp_path / "rejects") in message and "validation_report.json" in message
    report = read_json(tmp_path / "validation_report.json")
    assert report["passed"] is False and report["tables"]["interactions"]["passed"] is False
    for table in TABLES:
        assert len(rejects(tmp_path, table)) == len(EXPECTED_REJECTS[table])
        assert (tmp_path / "validated" / f"{table}.parquet").exists()


# --------------------------------------------------------------------------------------------------
# Other source shapes


def test_parquet_source_with_typed_columns(tmp_path: Path) -> None:
    inter = pd.DataFrame(
        {
            "u": np.array([1, 2, 3, 4], dtype=np.int64),
            "i": np.array([10.0, 11.0, np.nan, 10.0]),  # a float id column with a null
            "stars": [4.0, 5.5, 3.0, 2.0],
            "when": np.array([100, 200, 300, 400], dtype=np.int64),
            "device": ["web", "app", "web", "tv"],  # a column the table does not use: never read
        }
    )
    inter.to_parquet(tmp_path / "inter.parquet", index=False)
    pd.DataFrame({"item": [10, 11], "name": ["Ten", "Eleven"], "year": [2001, 2002]}).to_parquet(
        tmp_path / "items.parquet", index=False
    )
    cfg = DataConfig.model_validate(
        {
            "source": "parquet",
            "columns": {"user_id": "u", "item_id": "i", "rating": "stars", "timestamp": "when"},
            "files": {"interactions": "inter.parquet", "items": "items.parquet",
                      "item_columns": {"item_id": "item", "title": "name"}},
        }
    )  # fmt: skip
    source = load_generic(tmp_path, cfg)
    assert source.interactions["_line"].tolist() == [1, 2, 3, 4]
    out = tmp_path / "out"
    report = validate_source(source, LENIENT, out)
    got = rejects(out, "interactions")
    assert dict(zip(got["_line"], got["rule"], strict=True)) == {2: "rating_in_range", 3: "item_id_not_null"}
    assert got["rating"].tolist() == ["5.5", "3.0"]  # raw values as strings
    kept = pd.read_parquet(out / "validated" / "interactions.parquet")
    assert kept["item_id"].tolist() == [10, 10] and kept["item_id"].dtype == np.int64
    items = pd.read_parquet(out / "validated" / "items.parquet")
    assert items["title"].tolist() == ["Ten", "Eleven"] and items["year"].tolist() == [2001, 2002]
    assert report["tables"]["users"]["derived_from"] == "interactions"


def test_parquet_reads_only_the_columns_a_table_uses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet as pq

    pd.DataFrame({"u": [1, 2], "i": [3, 4], "device": ["web", "tv"], "blob": ["x" * 100] * 2}).to_parquet(
        tmp_path / "inter.parquet", index=False
    )
    asked: list[list[str] | None] = []
    real = pq.read_table

    def recording(path: object, columns: list[str] | None = None, **kw: object) -> object:
        asked.append(columns)
        return real(path, columns=columns, **kw)

    monkeypatch.setattr(pq, "read_table", recording)
    cfg = DataConfig.model_validate(
        {"source": "parquet", "columns": {"user_id": "u", "item_id": "i", "rating": None, "timestamp": None},
         "files": {"interactions": "inter.parquet"}}
    )  # fmt: skip
    source = load_generic(tmp_path, cfg)
    assert asked == [["u", "i"]] and source.interactions["user_id"].tolist() == [1, 2]


def test_missing_parquet_file(tmp_path: Path) -> None:
    cfg = DataConfig.model_validate({"source": "parquet", "files": {"interactions": "nope.parquet"}})
    with pytest.raises(FileNotFoundError, match=r"nope\.parquet"):
        load_generic(tmp_path, cfg)


def test_implicit_source_without_items_users_rating_timestamp(tmp_path: Path) -> None:
    (tmp_path / "clicks.csv").write_text("user;item\n3;7\n3;8\n4;7\n4;x\n")
    cfg = DataConfig.model_validate(
        {"source": "csv", "columns": {"item_id": "item", "user_id": "user"},
         "files": {"interactions": "clicks.csv", "separator": ";"}}
    )  # fmt: skip
    report = validate_source(load_generic(tmp_path, cfg), LENIENT, tmp_path / "out")
    frame = pd.read_parquet(tmp_path / "out" / "validated" / "interactions.parquet")
    assert frame["timestamp"].tolist() == [2, 3, 4]  # line numbers stand in for time
    assert frame["rating"].isna().all()
    notes = " ".join(report["tables"]["interactions"]["notes"])
    assert "no rating column" in notes and "no timestamp column" in notes
    items = pd.read_parquet(tmp_path / "out" / "validated" / "items.parquet")
    assert items["item_id"].tolist() == [7, 8]
    users = pd.read_parquet(tmp_path / "out" / "validated" / "users.parquet")
    assert users["user_id"].tolist() == [3, 4]
    for table in ("items", "users"):
        entry = report["tables"][table]
        assert entry["derived_from"] == "interactions" and entry["rows_in"] == 0
        assert entry["rows_written"] == 2
        assert rejects(tmp_path / "out", table).empty  # written even when empty
    assert "unknown_item" not in rules_of(report["tables"]["interactions"])


def test_rejects_schema_is_strings_when_empty(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    frame = pd.DataFrame({"user_id": ["1"], "item_id": ["2"], "_source": "x", "_line": [1]})
    validate_source(RawSource(frame, files={"interactions": "x"}), LENIENT, tmp_path)
    schema = pq.read_schema(tmp_path / "rejects" / "interactions.parquet")
    assert {f.name: str(f.type) for f in schema} == {
        "user_id": "string", "item_id": "string", "raw": "string", "_source": "string", "_line": "int64",
        "rule": "string",
    }  # fmt: skip


def test_scales_to_1e5_interactions(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 100_000
    frame = pd.DataFrame(
        {
            "user_id": rng.integers(0, 2000, n).astype(str),
            "item_id": rng.integers(0, 3000, n).astype(str),
            "rating": rng.integers(1, 6, n).astype(str),
            "timestamp": rng.integers(10**9, 2 * 10**9, n).astype(str),
        }
    )
    frame.loc[:99, "rating"] = "11"
    frame["_source"], frame["_line"] = "big.csv", np.arange(1, n + 1)
    start = time.perf_counter()
    report = validate_source(RawSource(frame, files={"interactions": "big.csv"}), ValidateConfig(), tmp_path)
    assert time.perf_counter() - start < 30  # ~1 s here; 10^6 rows take ~8 s
    entry = report["tables"]["interactions"]
    assert rules_of(entry)["rating_in_range"]["count"] == 100
    assert entry["rows_kept"] + entry["rows_rejected"] == n


# --------------------------------------------------------------------------------------------------
# Property: rows in = kept + rejected, and every kept row satisfies every rule (checked independently)

_ID = st.sampled_from(["1", "2", "3", "4", "12", " 3", "", "-1", "x", "3.0", "007", "١٢", "３", "1٢"])
_RATING = st.sampled_from(
    ["1", "4.5", "5", "0.5", "", "0", "9", "nan", "inf", "abc", "2e0", " 3 ", "٤", "４.５", "1e٠"]
)
_TS = st.sampled_from(["100", "200", "100", "", "-5", "1.5", "x", "+300", "99999999999", "١٠٠", "２００"])
CFG = ValidateConfig(max_reject_share=1.0, timestamp_min=0, timestamp_max=10**9)


def _is_id(text: str) -> bool:
    return re.fullmatch(r"[0-9]{1,18}", text.strip()) is not None


def _number(text: str) -> float | None:
    text = text.strip()
    if not re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", text):
        return None
    return float(text)


def _oracle(inter: list[tuple[str, str, str, str]], items: list[str], users: list[str]) -> list[int]:
    """Indices of the interaction rows that pass every rule, by plain Python."""

    def ids_kept(values: list[str]) -> set[int]:
        return {int(v) for v in values if _is_id(v)}

    known_items, known_users = ids_kept(items), ids_kept(users)
    passed, seen = [], set()
    for k, (u, i, r, t) in enumerate(inter):
        rating, ts = _number(r), t.strip()
        row_ok = (
            _is_id(u)
            and _is_id(i)
            and rating is not None
            and CFG.rating_min <= rating <= CFG.rating_max
            and re.fullmatch(r"[+-]?[0-9]{1,18}", ts) is not None
            and CFG.timestamp_min <= int(ts) <= CFG.timestamp_max
        )
        if not row_ok:
            continue
        key = (int(u), int(i), int(ts))
        if key in seen or int(i) not in known_items or int(u) not in known_users:
            seen.add(key)
            continue
        seen.add(key)
        passed.append(k)
    return passed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    inter=st.lists(st.tuples(_ID, _ID, _RATING, _TS), min_size=1, max_size=25),
    items=st.lists(_ID, min_size=1, max_size=6),
    users=st.lists(_ID, min_size=1, max_size=6),
)
def test_property_kept_plus_rejected_is_in_and_kept_rows_are_valid(
    inter: list[tuple[str, str, str, str]], items: list[str], users: list[str]
) -> None:
    def frame(columns: dict[str, list[str]], name: str) -> pd.DataFrame:
        n = len(next(iter(columns.values())))
        return pd.DataFrame({**columns, "_source": name, "_line": np.arange(2, n + 2)}, dtype=object)

    u, i, r, t = (list(c) for c in zip(*inter, strict=True))
    source = RawSource(
        interactions=frame({"user_id": u, "item_id": i, "rating": r, "timestamp": t}, "i.csv"),
        items=frame({"item_id": items}, "m.csv"),
        users=frame({"user_id": users}, "u.csv"),
        files={"interactions": "i.csv", "items": "m.csv", "users": "u.csv"},
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        report = validate_source(source, CFG, out)
        kept = pd.read_parquet(out / "validated" / "interactions.parquet")
        kept_items = pd.read_parquet(out / "validated" / "items.parquet")
        kept_users = pd.read_parquet(out / "validated" / "users.parquet")
        rej = {t: rejects(out, t) for t in TABLES}
    for table, n_in in (("interactions", len(inter)), ("items", len(items)), ("users", len(users))):
        entry = report["tables"][table]
        assert entry["rows_in"] == n_in == entry["rows_kept"] + entry["rows_rejected"]
        assert len(rej[table]) == entry["rows_rejected"] and rej[table]["rule"].str.len().gt(0).all()
    # Every kept row satisfies every rule.
    assert kept["rating"].between(CFG.rating_min, CFG.rating_max).all()
    assert kept["timestamp"].between(CFG.timestamp_min, CFG.timestamp_max).all()
    assert (kept[["user_id", "item_id"]] >= 0).all().all()
    assert not kept.duplicated(["user_id", "item_id", "timestamp"]).any()
    assert (
        kept["item_id"].isin(kept_items["item_id"]).all()
        and kept["user_id"].isin(kept_users["user_id"]).all()
    )
    assert kept_items["item_id"].is_unique and kept_users["user_id"].is_unique
    # Exactly the rows an independent check accepts are kept, in file order.
    expected = _oracle(inter, items, users)
    assert kept["user_id"].tolist() == [int(inter[k][0]) for k in expected]
    assert kept["item_id"].tolist() == [int(inter[k][1]) for k in expected]
    kept_lines = set(range(2, len(inter) + 2)) - set(rej["interactions"]["_line"])
    assert sorted(kept_lines) == [k + 2 for k in expected]


def test_file_of_only_malformed_lines_is_all_rejected(tmp_path: Path) -> None:
    (tmp_path / "i.csv").write_text("user_id,item_id,rating\n1,2\n3\n")
    cfg = DataConfig.model_validate({"source": "csv", "files": {"interactions": "i.csv"}})
    with pytest.raises(ValidationError, match=r"2 of 2 interactions rows rejected.*malformed_line: 2"):
        validate_source(load_generic(tmp_path, cfg), ValidateConfig(), tmp_path / "out")
    assert rejects(tmp_path / "out", "interactions")["_line"].tolist() == [2, 3]
    assert pd.read_parquet(tmp_path / "out" / "validated" / "interactions.parquet").empty


# --------------------------------------------------------------------------------------------------
# Non-ASCII digits: rejected with their rule, never read as numbers (int("١٢٣") == 123)


def test_non_ascii_digits_rejected_not_merged_nor_implicit(tmp_path: Path) -> None:
    (tmp_path / "i.csv").write_text(
        "user_id,item_id,rating,timestamp\n"
        "123,1,4,100\n"
        "١٢٣,1,4,101\n"  # Arabic-Indic 123
        "１２３,2,3,102\n"  # full-width 123
        "5,1,٤,103\n"  # Arabic-Indic 4: not NaN-then-implicit, rejected
        "5,٢,4,104\n"
        "6,1,4.５,105\n"
        "6,2,4,１０６\n"
        "7,1,4,107\n",
        encoding="utf-8",
    )
    cfg = DataConfig.model_validate({"source": "csv", "files": {"interactions": "i.csv"}})
    report = validate_source(load_generic(tmp_path, cfg), LENIENT, tmp_path / "out")
    got = rejects(tmp_path / "out", "interactions")
    assert dict(zip(got["_line"], got["rule"], strict=True)) == {
        3: "user_id_non_negative_integer",
        4: "user_id_non_negative_integer",
        5: "rating_numeric",
        6: "item_id_non_negative_integer",
        7: "rating_numeric",
        8: "timestamp_integer",
    }
    assert got["user_id"].tolist()[:2] == ["١٢٣", "１２３"]  # quarantined as read
    assert got["rating"].tolist()[2] == "٤"
    kept = pd.read_parquet(tmp_path / "out" / "validated" / "interactions.parquet")
    assert kept["user_id"].tolist() == [123, 7] and kept["rating"].tolist() == [4.0, 4.0]
    assert not kept["rating"].isna().any()  # nothing became an implicit positive
    users = pd.read_parquet(tmp_path / "out" / "validated" / "users.parquet")
    assert users["user_id"].tolist() == [7, 123]  # no second 123 merged in
    rules = rules_of(report["tables"]["interactions"])
    assert "ASCII digits 0-9" in rules["user_id_non_negative_integer"]["description"]
    assert rules["user_id_non_negative_integer"]["kwargs"] == {"regex": "^[0-9]{1,18}$"}


_NON_ASCII_DIGITS = st.text(
    st.characters(categories=["Nd"], exclude_characters="0123456789"), min_size=1, max_size=18
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(digits=_NON_ASCII_DIGITS)
def test_property_non_ascii_decimal_digits_never_kept(digits: str) -> None:
    assert int(digits) >= 0  # what a \d pattern followed by int() would have accepted
    inter = pd.DataFrame(
        {
            "user_id": ["1", digits, "2"],
            "item_id": ["1", "1", digits],
            "rating": [digits, "4", "4"],
            "_source": "i.csv",
            "_line": [2, 3, 4],
        },
        dtype=object,
    )
    with tempfile.TemporaryDirectory() as tmp:
        validate_source(RawSource(inter, files={"interactions": "i.csv"}), LENIENT, Path(tmp))
        got = rejects(Path(tmp), "interactions")
        kept = pd.read_parquet(Path(tmp) / "validated" / "interactions.parquet")
    assert dict(zip(got["_line"], got["rule"], strict=True)) == {
        2: "rating_numeric",
        3: "user_id_non_negative_integer",
        4: "item_id_non_negative_integer",
    }
    assert kept.empty


def test_numeric_conversions_refuse_non_ascii_digits() -> None:
    text = pd.Series(["4", "٤", "４.５", "1e٣", "2e1", None], dtype="str")
    number = validate_module._number(text)
    assert number.iloc[[0, 4]].tolist() == [4.0, 20.0] and number.iloc[[1, 2, 3, 5]].isna().all()
    assert validate_module._ascii_int64(pd.Series(["12", "+3"], dtype="str"), "x").tolist() == [12, 3]
    with pytest.raises(RuntimeError, match=r"t.csv: 1 value\(s\) passed the integer rules but are not ASCII"):
        validate_module._ascii_int64(pd.Series(["12", "١٢"], dtype="str"), "t.csv")


def test_year_and_age_with_non_ascii_digits_are_not_numbers(tmp_path: Path) -> None:
    items = pd.DataFrame({"item_id": ["1", "2"], "year": ["1999", "١٩٩٩"], "_source": "m", "_line": [2, 3]})
    users = pd.DataFrame({"user_id": ["1", "2"], "age": ["30", "٣٠"], "_source": "u", "_line": [2, 3]})
    inter = pd.DataFrame({"user_id": ["1"], "item_id": ["1"], "_source": "i", "_line": [2]})
    report = validate_source(RawSource(inter, items, users), LENIENT, tmp_path)
    kept_items = pd.read_parquet(tmp_path / "validated" / "items.parquet")
    assert kept_items["year"].tolist()[0] == 1999 and pd.isna(kept_items["year"].tolist()[1])
    assert any("year: 1 value(s)" in n and "[3]" in n for n in report["tables"]["items"]["notes"])
    kept_users = pd.read_parquet(tmp_path / "validated" / "users.parquet")
    assert kept_users["age"].tolist() == ["30", "٣٠"]  # kept as text, not read as 30
    assert any("age kept as text" in n for n in report["tables"]["users"]["notes"])


# --------------------------------------------------------------------------------------------------
# Line breaks other than \n (str.splitlines also breaks on U+0085, U+2028, \x0b, ...)


def _items_with_nel(tmp_path: Path) -> tuple[Path, bytes]:
    data = "item_id,title\n1,Before\u0085After\n2,Two\nx,Three\n4,Four\n".encode()
    (tmp_path / "m.csv").write_bytes(data)
    (tmp_path / "i.csv").write_text("user_id,item_id\n1,1\n1,2\n1,4\n")
    return tmp_path / "m.csv", data


def test_title_with_nel_stays_one_row_and_later_lines_keep_their_numbers(tmp_path: Path) -> None:
    """Rows as a loader splitting on \\n only gives them: validation keeps them and their lines as is."""
    path, data = _items_with_nel(tmp_path)
    body = data.decode("utf-8").split("\n")[1:-1]
    items = pd.DataFrame(
        [line.split(",") for line in body], columns=["item_id", "title"], dtype=object
    ).assign(_source=str(path), _line=[2, 3, 4, 5])
    inter = pd.DataFrame(
        {"user_id": ["1"] * 3, "item_id": ["1", "2", "4"], "_source": "i", "_line": [2, 3, 4]}
    )
    report = validate_source(RawSource(inter, items, files={"items": str(path)}), LENIENT, tmp_path / "out")
    kept = pd.read_parquet(tmp_path / "out" / "validated" / "items.parquet")
    assert kept["title"].tolist() == ["Before\u0085After", "Two", "Four"]
    got = rejects(tmp_path / "out", "items")
    assert dict(zip(got["_line"], got["rule"], strict=True)) == {4: "item_id_non_negative_integer"}
    [entry] = report["tables"]["items"]["text_files"]
    assert entry["other_line_breaks"] == 1 and entry["other_line_break_lines"] == [2]
    assert entry["physical_lines"] == 5 and entry["last_line_read"] == 5
    assert entry["line_numbers_consistent"] is True


def test_report_flags_line_numbers_shifted_by_a_splitlines_loader(tmp_path: Path) -> None:
    path, _ = _items_with_nel(tmp_path)
    # What str.splitlines makes of it: "1,Before" on line 2, "After" malformed on 3, every later line +1.
    items = pd.DataFrame(
        {"item_id": ["1", "2", "x", "4"], "title": ["Before", "Two", "Three", "Four"],
         "_source": str(path), "_line": [2, 4, 5, 6]}
    )  # fmt: skip
    bad = pd.DataFrame(
        {
            "table": ["items"],
            "_source": [str(path)],
            "_line": [3],
            "raw": ["After"],
            "rule": ["malformed_line"],
        }
    )
    inter = pd.DataFrame({"user_id": ["1"], "item_id": ["1"], "_source": "i", "_line": [2]})
    report = validate_source(
        RawSource(inter, items, None, bad, {"items": str(path)}), LENIENT, tmp_path / "o"
    )
    [entry] = report["tables"]["items"]["text_files"]
    assert entry["line_numbers_consistent"] is False
    assert (entry["physical_lines"], entry["last_line_read"]) == (5, 6)
    assert any("shifted after line 2" in note for note in report["tables"]["items"]["notes"])


def test_generic_loader_keeps_title_with_nel_in_one_row(tmp_path: Path) -> None:
    _items_with_nel(tmp_path)
    cfg = DataConfig.model_validate({"source": "csv", "files": {"interactions": "i.csv", "items": "m.csv"}})
    source = load_generic(tmp_path, cfg)
    assert source.items is not None
    assert source.items["title"].tolist() == ["Before\u0085After", "Two", "Three", "Four"]
    assert source.items["_line"].tolist() == [2, 3, 4, 5] and source.malformed.empty


def test_latin1_reader_keeps_byte_0x85_in_one_row(tmp_path: Path) -> None:
    (tmp_path / "u.item").write_bytes(b"1|Les Mis\x85rables|x\n2|Two|y\n")  # cp1252 ellipsis byte
    rows, bad = read_delimited(
        tmp_path / "u.item", "|", ["item_id", "title", "g"], "items", encoding="latin-1"
    )
    assert rows["_line"].tolist() == [1, 2] and bad.empty


def test_byte_0x85_in_utf8_file_is_one_row_and_counted_as_replaced(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_bytes(b"item_id,title\n1,Les Mis\x85rables\n2,Two\nx,Three\n")
    (tmp_path / "i.csv").write_text("user_id,item_id\n1,1\n1,2\n")
    cfg = DataConfig.model_validate({"source": "csv", "files": {"interactions": "i.csv", "items": "m.csv"}})
    report = validate_source(load_generic(tmp_path, cfg), LENIENT, tmp_path / "out")
    kept = pd.read_parquet(tmp_path / "out" / "validated" / "items.parquet")
    assert kept["title"].tolist() == ["Les Mis\ufffdrables", "Two"]
    assert rejects(tmp_path / "out", "items")["_line"].tolist() == [4]
    entry = report["tables"]["items"]
    assert entry["encoding_errors_replaced"] == 1
    assert entry["text_files"][0]["encoding_error_lines"] == [2]
    assert entry["text_files"][0]["line_numbers_consistent"] is True


# --------------------------------------------------------------------------------------------------
# Encoding errors replaced on reading are counted in the report (lines, never values)


def test_invalid_utf8_bytes_counted_in_report(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_bytes(
        b"item_id,title\n"
        + "1,Café\n".encode()
        + "2,Already \ufffd in the file\n".encode()  # valid UTF-8: not a replacement
        + b"3,Bad \xff\xfe bytes\n"  # two invalid bytes: two U+FFFD
        + b"4,Lone \xc3 lead\n"
        + b"5,Fine\n"
        + b"6,Trunc \xe2\x82\n"  # a cut 3-byte sequence: one U+FFFD
    )
    (tmp_path / "i.csv").write_text("user_id,item_id\n1,1\n")
    cfg = DataConfig.model_validate({"source": "csv", "files": {"interactions": "i.csv", "items": "m.csv"}})
    report = validate_source(load_generic(tmp_path, cfg), LENIENT, tmp_path / "out")
    items = report["tables"]["items"]
    [entry] = items["text_files"]
    assert items["encoding_errors_replaced"] == entry["encoding_errors_replaced"] == 4
    assert entry["encoding_error_lines"] == [4, 5, 7] and entry["invalid_utf8_sequences"] == 4
    assert entry["file"] == str(tmp_path / "m.csv")
    assert "Bad" not in json.dumps(items["text_files"])  # line numbers only, no raw values
    assert any("4 byte sequence(s) are not valid UTF-8" in note for note in items["notes"])
    assert report["tables"]["interactions"]["encoding_errors_replaced"] == 0
    assert report["tables"]["users"]["text_files"] == []  # derived: no file
    assert read_json(tmp_path / "out" / "validation_report.json") == report


def test_latin1_file_is_not_counted_as_replaced(tmp_path: Path) -> None:
    source = tmp_path / "ml100k"
    source.mkdir()
    for fixture in (FIXTURE / "ml100k").glob("*.fixture"):
        shutil.copy(fixture, source / fixture.stem)
    item = source / "u.item"
    item.write_bytes(item.read_bytes().replace(b"|", b"\xe9|", 1))  # é in latin-1: not UTF-8
    report = validate_source(load_movielens_100k(source), LENIENT, tmp_path / "out")
    entry = report["tables"]["items"]["text_files"][0]
    assert entry["invalid_utf8_sequences"] == 1 and entry["encoding_errors_replaced"] == 0
    assert report["tables"]["items"]["encoding_errors_replaced"] == 0
    assert any("nothing replaced" in note for note in report["tables"]["items"]["notes"])


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=64))
def test_property_decode_counting_counts_replacements_only(data: bytes) -> None:
    text, starts = decode_counting(data)
    assert text == data.decode("utf-8", errors="replace")
    assert len(starts) == text.count("\ufffd") - data.count("\ufffd".encode())
    assert starts == sorted(starts)


_LINE_BYTES = st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))


@settings(max_examples=100, deadline=None)
@given(lines=st.lists(_LINE_BYTES, max_size=12), chunk=st.integers(1, 40), newline_end=st.booleans())
def test_property_scan_lines_match_a_split_on_newline(
    lines: list[bytes], chunk: int, newline_end: bool
) -> None:
    data = b"\n".join(lines) + (b"\n" if newline_end and lines else b"")

    def invalid(line: bytes) -> int:
        seen: list[int] = []
        codecs.register_error("test.count", lambda e: (seen.append(1), ("\ufffd", e.end))[1])  # type: ignore[arg-type]
        line.decode("utf-8", errors="test.count")
        return len(seen)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.txt"
        path.write_bytes(data)
        with mock.patch.object(validate_module, "_SCAN_CHUNK", chunk):
            scan = scan_text_file(path, n=3)
    counts = [invalid(line) for line in lines]
    assert scan.invalid_utf8 == sum(counts)
    assert scan.invalid_utf8_lines == [k + 1 for k, c in enumerate(counts) if c][:3]
    assert scan.physical_lines == len(lines) - (1 if lines and not newline_end and lines[-1] == b"" else 0)
    latin1 = [k + 1 for k, line in enumerate(lines) if re.search(rb"[\x0b\x0c\x1c-\x1e\x85]", line)]
    assert scan.breaks_latin1_lines == latin1[:3]


# --------------------------------------------------------------------------------------------------
# rows in = kept + rejected is a real check (no assert: python -O removes those)


def test_validate_module_has_no_assert_statements() -> None:
    tree = ast.parse(Path(validate_module.__file__).read_text(encoding="utf-8"))
    assert [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)] == []


def test_reconcile_check_raises_with_file_and_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_reconciles("items", "m.csv", 5, 3, 2)  # consistent: no error
    with pytest.raises(RuntimeError, match=r"m.csv: items rows do not reconcile: 5 rows in != 3 kept \+ 1"):
        check_reconciles("items", "m.csv", 5, 3, 1)
    real = validate_module._rejects

    def losing_one(result: object, columns: list[str], *rest: object) -> pd.DataFrame:
        return real(result, columns, *rest).iloc[1:]  # type: ignore[arg-type]

    monkeypatch.setattr(validate_module, "_rejects", losing_one)
    with pytest.raises(
        RuntimeError, match=r"interactions.csv: interactions rows do not reconcile: 29 rows in"
    ):
        validate_source(load_generic(GENERIC, generic_config()), LENIENT, tmp_path)
