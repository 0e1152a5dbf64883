"""The service's privacy: client ids become pseudonyms at the edge, a person can be shown everything held
about them and erased through the API, and the access log carries no id."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from fuserec.config import ServeConfig
from fuserec.layout import Layout
from fuserec.privacy.erasure import Places, subject_hash
from fuserec.serving.app import create_app
from fuserec.serving.privacy import UserPrivacy

KEY = b"s" * 32
RAW = "carol-5551234"  # a client's id; never stored as such


def _pseudonym(raw: str) -> int:
    return int.from_bytes(hmac.new(KEY, raw.encode(), hashlib.sha256).digest()[:8], "big") >> 1


def test_ids_are_pseudonymised_at_the_edge_exported_and_erased(
    serving_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    items = pd.read_parquet(Layout(serving_run).export / "catalog.parquet")["item_id"].astype(str).tolist()
    stored = str(_pseudonym(RAW))
    outputs = tmp_path / "outputs"
    (outputs / "validated").mkdir(parents=True)
    pd.DataFrame({"user_id": [int(stored), 1], "age": [33, 44]}).to_parquet(
        outputs / "validated/users.parquet"
    )
    store = tmp_path / "events.sqlite"
    places = Places(tables=[outputs], stores=[], caches=[], register=tmp_path / "erasures.jsonl")
    privacy = UserPrivacy(KEY, _pseudonym, places)
    app = create_app(serving_run, store, settings=ServeConfig(), privacy=privacy)
    caplog.set_level(logging.INFO)
    with TestClient(app) as client:
        posted = client.post(
            "/events", json={"events": [{"user_id": RAW, "item_id": i, "kind": "like"} for i in items[:5]]}
        )
        assert posted.status_code == 200, posted.text
        warm = client.post("/recommend", json={"user_id": RAW}).json()
        assert warm["strategy"] == "history" and warm["user_id"] == RAW
        assert client.get("/events", params={"user_id": RAW}).json()["user_id"] == RAW
        explained = client.get("/explain", params={"user_id": RAW, "item_id": warm["items"][0]["item_id"]})
        assert explained.status_code == 200

        document = client.get(f"/admin/users/{RAW}").json()
        assert [e["item_id"] for e in document["events"]] == items[:5]
        assert (
            document["pseudonymised"]
            and document["tables"]["outputs/validated/users.parquet"][0]["age"] == 33
        )
        assert document["recommendations"]["items"] == warm["items"]
        assert document["explanation_of_first"]["item_id"] == warm["items"][0]["item_id"]

        gone = client.delete(f"/users/{RAW}").json()
        assert gone["store_events"] == 5 and gone["residue"] == []
        assert gone["tables"] == {"outputs/validated/users.parquet": 1}
        cold = client.post("/recommend", json={"user_id": RAW}).json()
        assert cold["strategy"] != "history"  # a new user's list
        assert client.get("/events", params={"user_id": RAW}).json()["events"] == []

    for path in tmp_path.glob("events.sqlite*"):
        assert stored.encode() not in path.read_bytes() and RAW.encode() not in path.read_bytes()
    (entry,) = [json.loads(line) for line in (tmp_path / "erasures.jsonl").read_text().splitlines()]
    assert entry["subject"] == subject_hash(KEY, RAW) and entry["by"] == "api"
    assert pd.read_parquet(outputs / "validated/users.parquet")["user_id"].tolist() == [1]
    access = [r.getMessage() for r in caplog.records if r.name == "fuserec.access"]
    assert any('"DELETE /users/{user_id}" 200' in line for line in access)
    # the service's loggers (the test client's own logger prints the URLs it requested)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("fuserec", "uvicorn")))
    assert RAW not in logged and stored not in logged


def test_without_a_key_erasure_and_access_say_how_to_configure_one(serving_run: Path, tmp_path: Path) -> None:
    with TestClient(create_app(serving_run, tmp_path / "e.sqlite")) as client:
        for method, path in (("DELETE", "/users/7"), ("GET", "/admin/users/7")):
            answer = client.request(method, path)
            assert answer.status_code == 501 and "privacy.key_file" in answer.json()["detail"]


def test_an_id_of_spaces_only_is_a_422_not_a_500(tmp_path: Path) -> None:
    """The pseudonymiser strips ids, so a blank one would be the empty id: refused, saying why."""
    from fastapi import HTTPException

    from fuserec.privacy.erasure import Places
    from fuserec.serving.privacy import UserPrivacy

    places = Places(tables=[], stores=[], caches=[], register=tmp_path / "erasures.jsonl")
    privacy = UserPrivacy(b"k" * 32, None, places)
    with pytest.raises(HTTPException) as caught:
        privacy.forget(["   "], None, where="api")
    assert caught.value.status_code == 422 and "space" in str(caught.value.detail)
