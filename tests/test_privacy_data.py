"""Privacy in the data path: pseudonymous user ids from validate on, minimal user attributes, training
retention, and the same quality with pseudonyms as without."""

from __future__ import annotations

import hashlib
import hmac
import json
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuserec.config import CleanConfig, Params, PrivacyConfig, load_params
from fuserec.layout import Layout
from fuserec.privacy.minimise import (
    age_group,
    age_groups,
    age_labels,
    apply_retention,
    edges_from_labels,
    kept_user_columns,
)
from fuserec.privacy.plan import PrivacyPlan
from fuserec.privacy.pseudonyms import (
    KeyMismatchError,
    MissingKeyError,
    PseudonymCollisionError,
    Pseudonymiser,
    canonical_id,
    check_key,
    load_key,
    new_key_file,
)
from fuserec.stages.clean import build_dataset, clean
from fuserec.stages.validate import validate

from .conftest import write_params

KEY = b"a-test-key-of-more-than-32-characters-0123"
RAW = "987654321"  # a distinctive raw user id: nothing validate writes may hold it
keys = st.binary(min_size=32, max_size=64)
ids = st.integers(0, 10**18 - 1)
pytestmark = pytest.mark.filterwarnings("ignore::fuserec.config.MissingDatasetSettingsWarning")  # csv


# -- the keyed hash ----------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(keys, ids)
def test_pseudonym_is_the_first_63_bits_of_hmac_sha256_and_deterministic(key: bytes, raw: int) -> None:
    expected = int.from_bytes(hmac.new(key, str(raw).encode(), hashlib.sha256).digest()[:8], "big") >> 1
    first, again = Pseudonymiser(key).user(str(raw)), Pseudonymiser(key).user(str(raw))
    assert first == again == expected
    assert 0 <= first < 2**63 and np.int64(first) == first  # a non-negative int64, as every stage keeps ids


@settings(max_examples=200, deadline=None)
@given(keys, keys, ids)
def test_different_keys_give_different_pseudonyms(one: bytes, other: bytes, raw: int) -> None:
    if one != other:
        assert Pseudonymiser(one).user(raw) != Pseudonymiser(other).user(raw)
        assert Pseudonymiser(one).fingerprint != Pseudonymiser(other).fingerprint


@settings(max_examples=200, deadline=None)
@given(ids, st.integers(0, 3), st.sampled_from(["", " ", "\t", " \n"]))
def test_an_ids_text_is_canonical(raw: int, zeros: int, pad: str) -> None:
    """ "007", " 7 ", 7 and np.int64(7) are one user, as validate reads them; "٧" (not ASCII) is not."""
    p = Pseudonymiser(KEY)
    forms = [str(raw), f"{pad}{'0' * zeros}{raw}{pad}", raw, np.int64(raw)]
    assert {canonical_id(f) for f in forms} == {str(raw)}
    assert len({p.user(f) for f in forms}) == 1
    assert p.stored(raw) == str(p.user(raw))
    arabic = str(raw).translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))
    assert p.user(arabic) != p.user(raw)


@settings(max_examples=50, deadline=None)
@given(st.lists(ids, max_size=50))
def test_many_ids_at_once_equal_one_by_one(values: list[int]) -> None:
    p = Pseudonymiser(KEY)
    expected = [p.user(v) for v in values]
    assert p.users(np.asarray(values, dtype=np.int64)).tolist() == expected
    assert p.users(pd.Series([str(v) for v in values], dtype=object)).tolist() == expected
    assert p.users(values).dtype == np.int64


def test_a_hash_clash_or_a_missing_id_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    p = Pseudonymiser(KEY)
    with pytest.raises(ValueError, match="missing"):
        p.users(pd.Series(["1", None], dtype=object))
    monkeypatch.setattr(Pseudonymiser, "_hash", lambda self, text: 7)
    with pytest.raises(PseudonymCollisionError, match="rotate the key"):
        p.users(["1", "2"])
    assert p.users(["3", "03"]).tolist() == [7, 7]  # one user written two ways is no clash


def test_the_fingerprint_names_the_key_without_revealing_it() -> None:
    p = Pseudonymiser(KEY)
    assert len(p.fingerprint) == 16 and p.fingerprint == Pseudonymiser(KEY).fingerprint
    assert KEY.decode() not in repr(p) and p.fingerprint in repr(p)
    with pytest.raises(MissingKeyError, match="at least 32"):
        Pseudonymiser(b"short")


# -- the key ------------------------------------------------------------------------------------------------
def test_the_key_comes_from_the_environment_else_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = new_key_file(tmp_path / "keys" / "pseudonym.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text().strip()) == 64
    with pytest.raises(FileExistsError, match="change every pseudonym"):
        new_key_file(path)
    cfg = PrivacyConfig(key_env="FUSEREC_TEST_KEY", key_file=str(path))
    monkeypatch.delenv("FUSEREC_TEST_KEY", raising=False)
    assert load_key(cfg) == path.read_text().strip().encode()
    monkeypatch.setenv("FUSEREC_TEST_KEY", KEY.decode())
    assert load_key(cfg) == KEY
    monkeypatch.setenv("FUSEREC_TEST_KEY", "too short")
    with pytest.raises(MissingKeyError, match="at least 32"):
        load_key(cfg)


def test_a_missing_key_stops_validate_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = _csv_params(tmp_path, privacy={"key_file": str(tmp_path / "nowhere.key")})
    monkeypatch.delenv("FUSEREC_PSEUDONYM_KEY")
    with pytest.raises(MissingKeyError) as err:
        validate(params)
    message = str(err.value)
    assert "FUSEREC_PSEUDONYM_KEY" in message and str(tmp_path / "nowhere.key") in message
    assert "new_key_file" in message and "docs/privacy.md" in message
    assert "privacy.pseudonymise: false" in message
    assert not (params.outputs_dir / "validated").exists()


def test_pseudonymisation_is_on_for_real_sources_and_off_for_synthetic(small_params: Params) -> None:
    assert PrivacyPlan.from_params(small_params).pseudonymiser is None
    cfg = PrivacyConfig()
    assert cfg.enabled("movielens-100k") and cfg.enabled("csv") and not cfg.enabled("synthetic")
    assert PrivacyConfig(pseudonymise=True).enabled("synthetic")
    assert not PrivacyConfig(pseudonymise=False).enabled("csv")


def test_check_key_tells_a_run_made_with_another_key() -> None:
    p, other = Pseudonymiser(KEY), Pseudonymiser(b"another-key-of-more-than-32-characters!")
    check_key(p, {"pseudonymised": True, "key_fingerprint": p.fingerprint}, "run")
    check_key(None, {"pseudonymised": False}, "run")
    check_key(None, None, "run")
    for held, recorded in (
        (p, {"pseudonymised": True, "key_fingerprint": other.fingerprint}),
        (p, {"pseudonymised": False}),
        (None, {"pseudonymised": True, "key_fingerprint": p.fingerprint}),
    ):
        with pytest.raises(KeyMismatchError):
            check_key(held, recorded, "run")


# -- validate with pseudonyms: no raw id anywhere -----------------------------------------------------------
def _write_source(folder: Path) -> Path:
    """Interactions and users of a CSV source; user RAW rates, is rejected once and is in a malformed line."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["user_id,item_id,rating,timestamp"]
    users = [RAW, *(str(u) for u in range(1, 20))]
    for n, user in enumerate(users):
        for item in range(1, 9):
            rows.append(f"{user},{item},{1 + (n + item) % 5},{1_000_000 + 3600 * (n * 10 + item)}")
    rows += [
        f"{RAW},3,9,1000000",  # rating out of range: rejected
        "12x4,2,4,1000000",  # not an id: rejected
        f"{RAW},2",  # malformed: too few fields
        "55,2,4,1000000",  # unknown user: rejected
    ]
    (folder / "interactions.csv").write_text("\n".join(rows) + "\n")
    lines = ["user_id,age,gender,occupation,zip,income"]
    for n, user in enumerate(users):
        lines.append(f"{user},{15 + 3 * n},{'MF'[n % 2]},{['writer', 'doctor'][n % 2]},9{n:04d},{1000 * n}")
    lines.append(f"{RAW},33,F,writer,90210,5")  # a duplicate user row: rejected
    (folder / "users.csv").write_text("\n".join(lines) + "\n")
    return folder


def _csv_params(tmp_path: Path, **sections: dict) -> Params:
    folder = _write_source(tmp_path / "raw")
    data = {"source": "csv", "path": str(folder), "files": {"users": "users.csv"}}
    sections = {"validate": {"max_reject_share": 0.5}, **sections}
    return load_params(write_params(tmp_path, data=data, **sections))


def _holds(path: Path, needle: str) -> bool:
    """The file holds ``needle`` as bytes (text or int64), or any of its table cells equals it."""
    data = path.read_bytes()
    if needle.encode() in data or int(needle).to_bytes(8, "little") in data:
        return True
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
        return bool(frame.astype(str).apply(lambda c: c.str.contains(needle, regex=False)).any().any())
    return False


def test_validate_writes_no_raw_user_id_anywhere(tmp_path: Path) -> None:
    params = _csv_params(tmp_path, train={"algorithms": ["popularity", "twotower"]})
    validate(params)
    out = params.outputs_dir
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"interactions.parquet", "users.parquet", "validation_report.json"}
    assert [str(p) for p in files if _holds(p, RAW)] == []

    key = load_key(params.privacy)
    p = Pseudonymiser(key)
    stored = p.user(RAW)
    inter = pd.read_parquet(out / "validated" / "interactions.parquet")
    assert (inter["user_id"] == stored).sum() == 8 and inter["user_id"].dtype == np.int64
    assert set(inter["user_id"]) == set(pd.read_parquet(out / "validated" / "users.parquet")["user_id"])

    rejects = pd.read_parquet(out / "rejects" / "interactions.parquet").set_index("_line")
    assert rejects["user_id"].replace({np.nan: None}).to_dict() == {
        162: str(stored),  # its pseudonym
        163: "<invalid id, 4 chars>",
        164: None,  # the malformed line: no fields
        165: str(p.user("55")),
    }
    assert rejects.loc[164, "raw"] == "<malformed line, 11 chars>"

    report = json.loads((out / "validation_report.json").read_text())
    assert report["privacy"]["pseudonymised"] and report["privacy"]["key_fingerprint"] == p.fingerprint
    assert key.decode() not in (out / "validation_report.json").read_text()
    samples = {r["rule"]: r["samples"] for r in report["tables"]["interactions"]["rules"] if r["samples"]}
    assert samples["rating_in_range"][0]["values"]["user_id"] == str(stored)
    assert samples["malformed_line"][0]["raw"] == "<malformed line, 11 chars>"
    user_samples = {r["rule"]: r["samples"] for r in report["tables"]["users"]["rules"] if r["samples"]}
    assert set(user_samples["duplicate_user_id"][0]["values"]) == {"user_id", "age", "gender", "occupation"}
    assert user_samples["duplicate_user_id"][0]["values"]["age"] == "25-34"


# -- minimisation --------------------------------------------------------------------------------------------
def test_only_declared_attributes_are_kept_ages_grouped_zip_dropped(tmp_path: Path) -> None:
    params = _csv_params(tmp_path, train={"algorithms": ["popularity", "twotower"]})
    validate(params)
    users = pd.read_parquet(params.outputs_dir / "validated" / "users.parquet")
    assert list(users.columns) == ["user_id", "age", "gender", "occupation"]  # zip and income are gone
    assert set(users["age"]) <= set(age_labels([18, 25, 35, 45, 50, 56])) and "<18" in set(users["age"])
    rejects = pd.read_parquet(params.outputs_dir / "rejects" / "users.parquet")
    assert "zip" not in rejects.columns and "income" not in rejects.columns
    record = json.loads((params.outputs_dir / "validation_report.json").read_text())["privacy"]
    assert record["user_columns_dropped"] == ["zip", "income"]

    # No plugin reads attributes and the cold-start rule is told to read none: only the ids remain.
    bare = _csv_params(
        tmp_path / "bare", train={"algorithms": ["popularity"]}, privacy={"cold_start_attributes": []}
    )
    validate(bare)
    assert list(pd.read_parquet(bare.outputs_dir / "validated" / "users.parquet").columns) == ["user_id"]


def test_kept_columns_are_the_declared_ones_less_the_dropped() -> None:
    assert kept_user_columns(["popularity", "itemknn"], [], ["zip"]) == frozenset()
    assert kept_user_columns(["twotower"], [], ["zip"]) == {"age", "gender", "occupation"}
    assert kept_user_columns(["content"], [], []) == {"age", "gender", "occupation", "zip"}
    assert kept_user_columns(["popularity"], ["gender"], ["ZIP"]) == {"gender"}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 99), min_size=1, max_size=8, unique=True).map(sorted),
    st.floats(0, 130, allow_nan=False),
)
def test_an_age_falls_in_the_group_its_label_names(edges: list[int], age: float) -> None:
    label = age_group(age, edges)
    assert label in age_labels(edges)
    if label.startswith("<"):
        assert age < int(label[1:]) == edges[0]
    elif label.endswith("+"):
        assert age >= int(label[:-1]) == edges[-1]
    else:
        low, high = (int(x) for x in label.split("-"))
        assert low <= age < high + 1
    assert edges_from_labels(age_labels(edges)) == tuple(edges)


def test_age_groups_of_text_and_numbers() -> None:
    edges = [18, 25, 35]
    got, unparsed = age_groups(pd.Series(["17", " 25 ", "thirty", None, "٣٠", "40.5"], dtype=object), edges)
    assert got.tolist() == ["<18", "25-34", None, None, None, "35+"] and unparsed == 2
    got, unparsed = age_groups(pd.Series([18, None, 70], dtype="Int64"), edges)
    assert got.tolist() == ["18-24", None, "35+"] and unparsed == 0
    assert edges_from_labels(["30", "45"]) is None  # exact ages are not groups


def test_cold_start_bands_a_requests_age_as_the_users_table_stores_it(tmp_path: Path) -> None:
    from fuserec.serving.coldstart import ColdStart, attribute_values

    layout = Layout(tmp_path)
    layout.split.mkdir(parents=True)
    layout.clean.mkdir(parents=True)
    pd.DataFrame({"user": [0, 0, 1], "item": [0, 1, 2]}).to_parquet(layout.split_file("train"))
    users = pd.DataFrame({"user": [0, 1], "user_id": [11, 12], "age": ["25-34", "56+"]})
    users.to_parquet(layout.clean / "users.parquet")
    cold = ColdStart(layout, 3, [frozenset()] * 3)
    assert cold.age_edges == (25, 35, 56) and cold.age_band(30) == "25-34" and cold.age_band(90) == "56+"
    got = cold.scores(None, attribute_values(67, None, None))
    assert got.strategy == "attributes" and int(np.argmax(got.scores)) == 2  # what the 56+ user liked
    assert cold.scores("12").strategy == "attributes"


# -- retention -----------------------------------------------------------------------------------------------
def test_retention_drops_old_interactions_and_counts_them(tmp_path: Path) -> None:
    day = 86_400
    inter = pd.DataFrame(
        {
            "user_id": [1, 1, 2, 2, 3],
            "item_id": [0, 1, 0, 2, 1],
            "rating": [5.0, 5.0, 5.0, 1.0, 5.0],
            "timestamp": [100 * day, 95 * day, 91 * day, 89 * day, 10 * day],
        }
    )
    items = pd.DataFrame({"item_id": [0, 1, 2]})
    users = pd.DataFrame({"user_id": [1, 2, 3, 4]})
    kept, counts = apply_retention(inter, 10)
    assert kept["timestamp"].min() >= 90 * day and counts["retention_dropped"] == 2
    assert counts["retention_cutoff"] == 90 * day and counts["retention_newest"] == 100 * day
    assert apply_retention(inter, None) == (inter, {})

    data, ratings, counts = build_dataset(inter, items, users, CleanConfig(implicit_threshold=4.0), 10)
    assert counts["retention_dropped"] == 2 and counts["retention_users_dropped"] == 1  # user 3: all old
    assert counts["rows_in"] == 5 and counts["duplicates_dropped"] == 0 and len(ratings) == 3
    assert data.users["user_id"].tolist() == [1, 2, 4]  # 4 had no interactions to expire
    _, _, plain = build_dataset(inter, items, users, CleanConfig(implicit_threshold=4.0))
    assert "retention_dropped" not in plain and plain["users"] == 4

    # The stage: counted in clean/summary.json, not silent.
    params = _csv_params(tmp_path, privacy={"retention_days": 0.5})
    validate(params)
    clean(params)
    summary = json.loads((params.outputs_dir / "clean" / "summary.json").read_text())
    assert summary["retention_days"] == 0.5 and summary["retention_dropped"] > 0
    assert summary["rows_in"] == summary["retention_dropped"] + summary["duplicates_dropped"] + len(
        pd.read_parquet(params.outputs_dir / "clean" / "ratings.parquet")
    )


# -- the drift check and the stage cache see pseudonyms too --------------------------------------------------
def test_drift_compares_incoming_ids_as_pseudonyms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fuserec.stages.drift import drift

    served = {"served_dir": str(tmp_path / "served")}  # none: the reference is this run's validated table
    params = _csv_params(tmp_path, promote=served)
    validate(params)
    report = drift(params)
    assert report["statistics"]["unknown_users_share"] < 0.05, report
    assert RAW not in json.dumps(report)

    # After a key rotation the reference's ids are another key's: only their activity is compared.
    monkeypatch.setenv("FUSEREC_OTHER_KEY", "another-key-of-more-than-32-characters!")
    rotated = _csv_params(
        tmp_path / "rotated",
        outputs=str(params.outputs_dir),
        promote=served,
        privacy={"key_env": "FUSEREC_OTHER_KEY"},
    )
    report = drift(rotated)
    assert "unknown_users_share" not in report["statistics"] and "user_activity_psi" in report["statistics"]
    assert "fingerprint" in report["notes"][0] and report["status"] != "broken"


def test_the_validate_cache_key_follows_the_pseudonym_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fuserec.flows.stages import stage_spec

    params = _csv_params(tmp_path)
    read = stage_spec("validate", params).params
    assert read["privacy.key_fingerprint"] == Pseudonymiser(load_key(params.privacy)).fingerprint
    assert read["privacy.user_columns_allowed"] == ["age", "gender", "occupation"]  # every plugin
    monkeypatch.setenv("FUSEREC_PSEUDONYM_KEY", "another-key-of-more-than-32-characters!")
    rotated = stage_spec("validate", params).params["privacy.key_fingerprint"]
    assert rotated != read["privacy.key_fingerprint"]


# -- quality: the same with pseudonyms as without (real MovieLens-100k) --------------------------------------
@pytest.mark.shared
def test_ml100k_ndcg_is_the_same_with_pseudonyms(ml100k: Path, tmp_path: Path) -> None:
    """Deterministic plugins learn nothing from the ids themselves: pseudonyms only reorder the users."""
    from fuserec.evaluation import load_carve, score_config
    from fuserec.registry import get_algorithm
    from fuserec.stages.split import split

    ndcg: dict[bool, dict[str, float]] = {}
    for on in (True, False):
        overrides = [
            "data.source=movielens-100k",
            f"data.path={ml100k}",
            f"outputs={tmp_path / str(on)}",
            f"privacy.pseudonymise={str(on).lower()}",
        ]
        params = load_params(write_params(tmp_path), overrides)
        for stage in (validate, clean, split):
            stage(params)
        users = pd.read_parquet(params.outputs_dir / "clean" / "users.parquet")["user_id"]
        assert (users.max() > 10**9) == on  # ML-100k's ids are 1..943
        carve = load_carve(params.outputs_dir, "test")
        ndcg[on] = {}
        for name in ("popularity", "itemknn"):
            config = {"seed": params.train.seed, **params.algorithm_config(name)}
            ndcg[on][name] = score_config(get_algorithm(name), config, carve, [10])[0]["ndcg@10"]
    for name, value in ndcg[False].items():
        assert round(ndcg[True][name], 4) == round(value, 4), (name, ndcg)
    assert round(ndcg[False]["popularity"], 4) == 0.0771  # the protocol's anchor (docs/protocol.md)


# -- erasure: the next run does not see the person -----------------------------------------------------
def test_a_forgotten_user_leaves_the_outputs_and_the_next_validate_drops_them(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fuserec.cli import app
    from fuserec.privacy.erasure import residue, subjects_for

    params = _csv_params(
        tmp_path, train={"algorithms": ["popularity"]}, privacy={"erasures": str(tmp_path / "e.jsonl")}
    )
    validate(params)
    clean(params)
    out = params.outputs_dir
    pseudonymiser = Pseudonymiser(load_key(params.privacy))
    (person,) = subjects_for([RAW], pseudonymiser.key, pseudonymiser.user)
    assert residue([out], [person])  # the pseudonym is in validated/, clean/ and rejects/
    params_file = tmp_path / "params.yaml"
    forgot = CliRunner().invoke(app, ["forget", RAW, "--params", str(params_file)])
    assert forgot.exit_code == 0, forgot.output
    assert json.loads(forgot.output)["residue"] == [] and residue([out], [person]) == []

    validate(params)  # the raw data still holds the person: validate drops their rows before any rule
    report = json.loads((out / "validation_report.json").read_text())
    assert report["privacy"]["erased_rows"] == {"interactions": 9, "users": 2}
    assert residue([out], [person]) == []
    assert report["tables"]["interactions"]["passed"]
