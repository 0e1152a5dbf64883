"""Erasure: a user's rows leave every table, the store's bytes and the cache; the register names no id."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuserec.privacy.erasure import (
    Places,
    erase,
    erased_subjects,
    residue,
    subject_hash,
    subjects_for,
)
from fuserec.serving.store import Event, SQLiteEventStore

KEY = b"k" * 32
GONE = "4815162342"  # distinctive enough for a byte search
KEPT = "2718281828"


def _tree(root: Path) -> None:
    """An outputs tree shaped like the pipeline's: ids in validated/ and rejects/, an index elsewhere."""
    (root / "validated").mkdir(parents=True)
    (root / "clean").mkdir()
    (root / "split").mkdir()
    (root / "rejects").mkdir()
    (root / ".cache" / "validate").mkdir(parents=True)
    pd.DataFrame({"user_id": [int(GONE), int(KEPT)], "age": [30, 40]}).to_parquet(
        root / "validated/users.parquet"
    )
    pd.DataFrame({"user": [0, 1], "user_id": [int(GONE), int(KEPT)]}).to_parquet(root / "clean/users.parquet")
    ratings = pd.DataFrame({"user": [0, 0, 1], "item": [1, 2, 3], "rating": [5.0, 4.0, 3.0]})
    ratings.to_parquet(root / "clean/ratings.parquet")
    ratings.to_parquet(root / "split/train.parquet")
    pd.DataFrame({"user_id": [GONE], "raw": ["a line"], "rule": ["x"]}).to_parquet(
        root / "rejects/interactions.parquet"
    )
    pd.DataFrame({"user_id": [GONE, KEPT], "item_id": ["1", "2"]}).to_csv(root / "batch.csv", index=False)
    (root / ".cache" / "validate" / "users.parquet").write_bytes(
        (root / "validated/users.parquet").read_bytes()
    )


def _store(path: Path) -> None:
    store = SQLiteEventStore(path)
    store.append([Event(GONE, str(i), 1_000 + i) for i in range(200)] + [Event(KEPT, "7", 5)])
    store.close()


def test_forget_removes_every_row_the_store_bytes_and_the_cache(tmp_path: Path) -> None:
    outputs, store = tmp_path / "outputs", tmp_path / "served" / "events.sqlite"
    _tree(outputs)
    _store(store)
    subjects = subjects_for([GONE], KEY, None)
    assert residue([outputs, store], subjects)  # the search finds it before
    places = Places(
        tables=[outputs], stores=[store], caches=[outputs / ".cache"], register=tmp_path / "e.jsonl"
    )

    report = erase(subjects, places)

    assert report.residue == [] and report.store_events == 200 and report.retrain
    assert report.tables == {
        "outputs/validated/users.parquet": 1,
        "outputs/clean/users.parquet": 1,
        "outputs/clean/ratings.parquet": 2,
        "outputs/split/train.parquet": 2,
        "outputs/rejects/interactions.parquet": 1,
        "outputs/batch.csv": 1,
    }
    assert not (outputs / ".cache").exists()
    # the others are untouched
    assert pd.read_parquet(outputs / "clean/ratings.parquet")["user"].tolist() == [1]
    assert pd.read_parquet(outputs / "validated/users.parquet")["user_id"].tolist() == [int(KEPT)]
    kept = SQLiteEventStore(store)
    assert kept.count() == 1 and kept.events(KEPT, 10)[0].item_id == "7"
    kept.close()
    for path in (store, *store.parent.glob("events.sqlite*")):
        assert GONE.encode() not in path.read_bytes()
    # the register: one line, the keyed hash only, and what was removed
    (line,) = (tmp_path / "e.jsonl").read_text().splitlines()
    entry = json.loads(line)
    assert GONE not in line and entry["subject"] == subject_hash(KEY, GONE)
    assert entry["store_events"] == 200 and entry["rows"] == 8
    assert erased_subjects(tmp_path / "e.jsonl") == {subject_hash(KEY, GONE)}


def test_a_pseudonymised_id_is_searched_as_text_and_as_int64(tmp_path: Path) -> None:
    pseudonym = 6_022_140_857_747_474_747
    (subject,) = subjects_for(["alice"], KEY, lambda raw: pseudonym)
    assert subject.stored == str(pseudonym)
    blob = tmp_path / "state.bin"
    blob.write_bytes(b"\x00" * 16 + pseudonym.to_bytes(8, "little") + b"\x00" * 16)
    assert residue([tmp_path], [subject]) == [str(blob)]
    blob.write_bytes(b"\x00" * 40)
    assert residue([tmp_path], [subject]) == []


@settings(max_examples=50, deadline=None)
@given(
    st.text(min_size=1, max_size=40).filter(lambda s: s.strip() != ""), st.binary(min_size=16, max_size=32)
)
def test_the_register_hash_is_keyed_and_is_not_the_id(raw: str, key: bytes) -> None:
    digest = subject_hash(key, raw)
    assert digest == subject_hash(key, f" {raw} ")  # the id as a client sends it, trimmed
    assert digest != subject_hash(key + b"x", raw)
    assert len(digest) == 64


def test_fuserec_forget_scrubs_a_project_and_says_when_a_key_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from fuserec.cli import app

    outputs, served = tmp_path / "outputs", tmp_path / "served"
    _tree(outputs)
    _store(served / "events.sqlite")
    params = tmp_path / "params.yaml"
    params.write_text(
        f"outputs: {outputs}\npromote:\n  served_dir: {served}\n"
        f"privacy:\n  pseudonymise: false\n  erasures: {tmp_path / 'erasures.jsonl'}\n"
        f"  key_file: {tmp_path / 'no.key'}\n"
    )
    monkeypatch.delenv("FUSEREC_PSEUDONYM_KEY", raising=False)
    missing = CliRunner().invoke(app, ["forget", GONE, "--params", str(params)])
    assert missing.exit_code == 2 and "privacy key" in missing.output
    monkeypatch.setenv("FUSEREC_PSEUDONYM_KEY", "x" * 64)
    done = CliRunner().invoke(app, ["forget", GONE, "--params", str(params)])
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert report["store_events"] == 200 and report["residue"] == [] and report["rows"] == 8
    assert not (outputs / ".cache").exists() and len(erased_subjects(tmp_path / "erasures.jsonl")) == 1
    assert residue([outputs, served], subjects_for([GONE], b"x" * 64, None)) == []
