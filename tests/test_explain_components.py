"""``/explain``'s component sections are the components' own reasoning, not stand-ins.

The served model here fuses kg and sasrec with Borda: nothing is learned, and each component's share of
an item's score is its own rank points (positive among its top ``depth`` unseen items, zero beyond), so
both a supported and an unsupported item exist for certain.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from fuserec.explain_states import MAX_EXPLAIN_STATE_BYTES
from fuserec.histories import Histories
from fuserec.layout import Layout
from fuserec.manifest import file_sha256, read_json, write_json
from fuserec.onnx_model import OnnxRecommender
from fuserec.plugins.kg import KnowledgeGraph
from fuserec.serving.app import create_app
from fuserec.serving.service import RECENT_SHOWN

from .conftest import SMALL, write_params

DEPTH = 20  # Borda's points reach each component's top 20 unseen items


@pytest.fixture(scope="module")
def kg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run (synthetic data) whose exported model is Borda over kg and sasrec."""
    from fuserec.config import load_params
    from fuserec.tasks.clean import clean
    from fuserec.tasks.export import export
    from fuserec.tasks.fuse import fuse
    from fuserec.tasks.split import split
    from fuserec.tasks.train import train
    from fuserec.tasks.validate import validate

    root = tmp_path_factory.mktemp("kg-sasrec")
    sections = {
        **SMALL,
        "train": {"algorithms": ["kg", "sasrec"]},
        "fuse": {"fusers": ["borda"], "components": ["kg", "sasrec"]},
        "fusers": {"borda": {"depth": DEPTH}},
        "export": {"algorithm": "borda"},
    }
    params = load_params(write_params(root, **sections))
    for stage in (validate, clean, split, train, fuse, export):
        stage.fn(params)
    return params.outputs_dir


def _catalog(outputs: Path) -> list[str]:
    return pd.read_parquet(Layout(outputs).export / "catalog.parquet")["item_id"].astype(str).tolist()


def _reader(client: TestClient, items: list[str], history: list[int]) -> None:
    """A new user whose stored history is exactly ``history`` (catalogue indices, oldest first)."""
    events = [
        {"user_id": "reader", "item_id": items[i], "timestamp": 10**9 + n} for n, i in enumerate(history)
    ]
    assert client.post("/events", json={"events": events}).status_code == 200


HISTORY = [3, 11, 19, 27, 35, 43, 51]


def test_the_export_lists_a_checked_bounded_explain_state_for_kg_only(kg_run: Path) -> None:
    folder = Layout(kg_run).export
    states = read_json(folder / "manifest.json")["explain_states"]
    assert set(states) == {"kg"}  # sasrec explains from the graph's own leave-one-out runs
    entry = states["kg"]
    path = folder / entry["file"]
    assert entry["sha256"] == file_sha256(path) and entry["bytes"] == path.stat().st_size
    assert entry["plugin"] == "kg" and entry["bytes"] < MAX_EXPLAIN_STATE_BYTES


def test_kg_paths_are_the_kg_plugins_own(kg_run: Path, tmp_path: Path) -> None:
    items = _catalog(kg_run)
    kg = KnowledgeGraph.load(Layout(kg_run).model("kg"))
    with TestClient(create_app(kg_run, tmp_path / "e.sqlite")) as client:
        _reader(client, items, HISTORY)
        top = client.post("/recommend", json={"user_id": "reader", "k": 10}).json()["items"]
        supported = [x for x in top if x["contributions"]["kg"] > 0]
        assert supported, "kg's top items are in the fused top 10"
        for entry in supported[:3]:
            why = client.get("/explain", params={"user_id": "reader", "item_id": entry["item_id"]}).json()
            section, target = why["kg"], items.index(entry["item_id"])
            own = kg.explain(np.asarray(HISTORY), target)
            assert section["available"] and section["supports_item"] and section["component"] == "kg"
            assert section["contribution"] == pytest.approx(entry["contributions"]["kg"], abs=1e-6)
            assert section["kg_score"] == pytest.approx(own["score"], rel=1e-5, abs=1e-6)
            assert section["tail_lift"] == pytest.approx(own["tail_lift"], rel=1e-5, abs=1e-6)
            assert len(section["paths"]) == len(own["paths"]) > 0
            for got, want in zip(section["paths"], own["paths"], strict=True):
                assert got["liked_item_id"] == items[want["from_item"]]
                assert (got["via"], got["through"]) == (want["via"], want["path"][1])
                assert got["n_users"] if want["via"] == "users" else "n_users" not in got
                assert got["weight"] == pytest.approx(want["weight"], rel=1e-5, abs=1e-7)
                assert got["walk_share"] == pytest.approx(want["walk_share"], rel=1e-5)
                assert got["path"][0] == "user reader" and got["path"][2] == want["path"][1]
            assert "kg_paths" not in why


def test_kg_says_so_when_its_share_of_the_score_is_not_positive(kg_run: Path, tmp_path: Path) -> None:
    items = _catalog(kg_run)
    kg = KnowledgeGraph.load(Layout(kg_run).model("kg"))
    scores = kg.score(Histories.from_lists([HISTORY], len(items)))[0]
    scores[HISTORY] = np.inf
    worst = int(np.argmin(scores))  # far below kg's top DEPTH: no Borda points from kg
    with TestClient(create_app(kg_run, tmp_path / "e.sqlite")) as client:
        _reader(client, items, HISTORY)
        section = client.get("/explain", params={"user_id": "reader", "item_id": items[worst]}).json()["kg"]
        cold = client.get("/explain", params={"user_id": "nobody", "item_id": items[worst]}).json()
    assert section["available"] and not section["supports_item"] and section["paths"] == []
    assert section["contribution"] <= 0 and "not positive" in section["reason"]
    assert not cold["kg"]["available"] and "no history" in cold["kg"]["reason"]
    assert not cold["sequence"]["available"]


def test_sequence_lists_the_recent_items_whose_removal_lowers_sasrecs_share(
    kg_run: Path, tmp_path: Path
) -> None:
    items = _catalog(kg_run)
    folder = Layout(kg_run).export
    m = read_json(folder / "manifest.json")["components"].index("sasrec")
    with TestClient(create_app(kg_run, tmp_path / "e.sqlite")) as client:
        _reader(client, items, HISTORY)
        top = client.post("/recommend", json={"user_id": "reader", "k": 3}).json()["items"]
        answers = [
            client.get("/explain", params={"user_id": "reader", "item_id": x["item_id"]}).json() for x in top
        ]
    # independently: the exported graph's sasrec share with each history item left out
    lists = [HISTORY] + [HISTORY[:p] + HISTORY[p + 1 :] for p in range(len(HISTORY))]
    padded = Histories.from_lists(lists, len(items)).to_padded()
    parts = OnnxRecommender(folder / "model.onnx").run_with_contributions(padded)[3][m]
    for entry, why in zip(top, answers, strict=True):
        target = items.index(entry["item_id"])
        drops = {items[i]: float(parts[0, target] - parts[1 + p, target]) for p, i in enumerate(HISTORY)}
        section = why["sequence"]
        assert section["available"] and section["component"] == "sasrec"
        assert section["method"] == "leave_one_out" and section["items_tried"] == len(HISTORY)
        assert section["contribution"] == pytest.approx(entry["contributions"]["sasrec"], abs=1e-6)
        listed = section["recent_items"]
        assert len(listed) == min(RECENT_SHOWN, len(HISTORY))
        for x in listed:
            assert x["contribution_drop"] == pytest.approx(drops[x["item_id"]], abs=1e-6)
        want = sorted(drops.values(), reverse=True)[: len(listed)]
        assert [x["contribution_drop"] for x in listed] == pytest.approx(want, abs=1e-6)


def test_components_that_are_not_served_are_said_to_be_unavailable(serving_run: Path, tmp_path: Path) -> None:
    items = _catalog(serving_run)
    with TestClient(create_app(serving_run, tmp_path / "e.sqlite")) as client:
        _reader(client, items, HISTORY[:4])
        why = client.get("/explain", params={"user_id": "reader", "item_id": items[5]}).json()
    assert why["kg"] == {"available": False, "reason": "kg is not part of the served model"}
    assert why["sequence"] == {"available": False, "reason": "sasrec is not part of the served model"}
    assert "kg_paths" not in why


def test_a_changed_explain_state_is_refused(kg_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "outputs"
    shutil.copytree(kg_run, copy)
    entry = read_json(Layout(copy).export / "manifest.json")["explain_states"]["kg"]
    path = Layout(copy).export / entry["file"]
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="changed after export"):
        create_app(copy, tmp_path / "e.sqlite")


def test_an_explain_state_over_the_bound_is_left_out_and_the_service_says_why(
    kg_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fuserec.explain_states as states

    kg = KnowledgeGraph.load(Layout(kg_run).model("kg"))
    monkeypatch.setattr(states, "MAX_EXPLAIN_STATE_BYTES", 1000)
    entries = states.write_explain_states(kg, "kg", tmp_path / "model")
    assert entries["kg"]["file"] is None and "over the 1,000" in entries["kg"]["reason"]
    assert not (tmp_path / "model").exists()
    copy = tmp_path / "outputs"
    shutil.copytree(kg_run, copy)
    manifest = read_json(Layout(copy).export / "manifest.json")
    write_json(Layout(copy).export / "manifest.json", manifest | {"explain_states": entries})
    items = _catalog(copy)
    with TestClient(create_app(copy, tmp_path / "e.sqlite")) as client:
        _reader(client, items, HISTORY)
        top = client.post("/recommend", json={"user_id": "reader", "k": 1}).json()["items"][0]
        section = client.get("/explain", params={"user_id": "reader", "item_id": top["item_id"]}).json()["kg"]
    assert not section["available"] and "over the 1,000" in section["reason"]
