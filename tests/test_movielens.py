"""MovieLens loaders: the real ML-100K when it is available, hand-written files in every other format."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fuserec.data.movielens import load_movielens_100k, load_movielens_dat, load_movielens_latest
from fuserec.data.raw import LINE_COL, MALFORMED_COLUMNS, SOURCE_COL

ML100K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k"
needs_ml100k = pytest.mark.skipif(
    not (ML100K / "u.data").is_file(), reason=f"real MovieLens 100K not found at {ML100K}"
)


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.shared
@needs_ml100k
def test_100k_loads_every_row_as_strings() -> None:
    raw = load_movielens_100k(ML100K)
    assert len(raw.interactions) == 100_000
    assert len(raw.items) == 1682
    assert len(raw.users) == 943
    assert raw.malformed.empty
    provenance = [SOURCE_COL, LINE_COL]
    assert list(raw.interactions.columns) == ["user_id", "item_id", "rating", "timestamp", *provenance]
    assert list(raw.items.columns) == ["item_id", "title", "genres", "year", "url", *provenance]
    assert list(raw.users.columns) == ["user_id", "age", "gender", "occupation", "zip", *provenance]
    for frame in (raw.interactions, raw.items, raw.users):
        data = frame.drop(columns=provenance)
        assert all(str(dtype) == "object" for dtype in data.dtypes)  # strings as read, derived too
    items = raw.items.set_index("item_id")
    assert items.loc["1", "genres"] == "Animation|Children's|Comedy"
    assert items.loc["1", "year"] == "1995"
    assert items.loc["1", "title"] == "Toy Story (1995)"
    assert items.loc["267", "genres"] == ""  # flagged only "unknown", which is not a genre
    assert items.loc["267", "year"] == ""  # no release date
    assert raw.items[LINE_COL].tolist() == list(range(1, 1683))
    assert raw.files == {
        "interactions": str(ML100K / "u.data"),
        "items": str(ML100K / "u.item"),
        "users": str(ML100K / "u.user"),
    }


def test_100k_format_with_a_malformed_line(tmp_path: Path) -> None:
    _write(tmp_path / "u.data", "1\t10\t5\t881250949\n\n2\t10\t3\n2\t11\t4\t881250950\n")
    flags = ["0"] * 19
    flags[1] = flags[5] = "1"  # Action, Comedy
    item = "|".join(["10", "Caf\xe9 (1996)", "01-Jan-1996", "", "http://x", *flags])
    unknown = "|".join(["11", "unknown", "", "", "", "1", *["0"] * 18])
    _write(tmp_path / "u.item", f"{item}\n{unknown}\n", encoding="latin-1")
    _write(tmp_path / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n")
    raw = load_movielens_100k(tmp_path)
    assert raw.interactions["user_id"].tolist() == ["1", "2"]
    assert raw.interactions[LINE_COL].tolist() == [1, 4]
    assert list(raw.malformed.columns) == list(MALFORMED_COLUMNS)
    assert raw.malformed[["table", LINE_COL, "raw"]].values.tolist() == [["interactions", 3, "2\t10\t3"]]
    assert raw.items["title"].tolist() == ["Café (1996)", "unknown"]
    assert raw.items["genres"].tolist() == ["Action|Comedy", ""]
    assert raw.items["year"].tolist() == ["1996", ""]


def test_1m_format(tmp_path: Path) -> None:
    _write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n1::914\n")
    movies = (
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::Misérables, Les (1995)::Drama|Musical\n"
    )
    _write(tmp_path / "movies.dat", movies, encoding="latin-1")
    _write(tmp_path / "users.dat", "1::F::1::10::48067\n")
    raw = load_movielens_dat(tmp_path)
    assert len(raw.interactions) == 2
    assert raw.malformed[["table", SOURCE_COL, LINE_COL, "raw"]].values.tolist() == [
        ["interactions", str(tmp_path / "ratings.dat"), 3, "1::914"]
    ]
    assert list(raw.items.columns) == ["item_id", "title", "genres", "year", SOURCE_COL, LINE_COL]
    assert raw.items["title"].tolist()[1] == "Misérables, Les (1995)"  # latin-1 detected
    assert raw.items["year"].tolist() == ["1975", "1995"]
    assert raw.items["genres"].tolist() == ["Drama", "Drama|Musical"]
    users = raw.users.drop(columns=[SOURCE_COL])
    assert users.columns.tolist() == ["user_id", "age", "gender", "occupation", "zip", LINE_COL]
    assert users.iloc[0].tolist() == ["1", "1", "F", "10", "48067", 1]  # codes kept as given
    assert set(raw.files) == {"interactions", "items", "users"}


def test_10m_format_aggregates_tags(tmp_path: Path) -> None:
    _write(tmp_path / "ratings.dat", "1::122::5::838985046\n1::185::4.5::838983525\n")
    movies = (
        "122::Boomerang (1992)::Comedy|Romance\n"
        "185::Net, The (1995)::(no genres listed)\n"
        "7::Amélie (2001)::Comedy\n"
    )
    _write(tmp_path / "movies.dat", movies)
    tags = (
        "15::122::Eddie Murphy::1215184630\n"
        "20::122::eddie murphy ::1215184631\n"  # same tag, other case and spacing
        "20::122::a|b::1\n"  # "|" is the join separator
        "15::185::tech::1\n"
    )
    _write(tmp_path / "tags.dat", tags + "bad line\n")
    raw = load_movielens_dat(tmp_path)
    assert raw.users is None
    items = raw.items.set_index("item_id")
    assert items.loc["122", "tags"] == "a b|eddie murphy"
    assert items.loc["185", "tags"] == "tech"
    assert items.loc["7", "tags"] == ""
    assert items.loc["7", "title"] == "Amélie (2001)"  # utf-8 detected
    assert items.loc["185", "genres"] == ""
    assert raw.items["tags"].dtype == object
    assert raw.malformed[["table", LINE_COL, "raw"]].values.tolist() == [["items", 5, "bad line"]]
    assert raw.files["tags"] == str(tmp_path / "tags.dat")


def test_latest_format_with_quoted_titles(tmp_path: Path) -> None:
    _write(
        tmp_path / "ratings.csv",
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,11,oops\n\n2,11,3.5,964982224\n",
    )
    movies = (
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        '12,"Say ""Hi"" (2001)",(no genres listed)\n'
        '13,"Two\nLines (1999)",Drama\n'
        "14,Too,Many,Fields\n"
        "15,Stranger Things,Drama\n"
    )
    _write(tmp_path / "movies.csv", movies)
    tags = 'userId,movieId,tag,timestamp\n2,11,"funny, clever",1\n2,1,Pixar,2\n3,1,pixar,3\n'
    _write(tmp_path / "tags.csv", tags)
    raw = load_movielens_latest(tmp_path)
    assert raw.interactions.columns.tolist()[:4] == ["user_id", "item_id", "rating", "timestamp"]
    assert raw.interactions[LINE_COL].tolist() == [2, 5]
    items = raw.items.set_index("item_id")
    assert items.loc["11", "title"] == "American President, The (1995)"
    assert items.loc["11", "year"] == "1995"
    assert items.loc["12", "title"] == 'Say "Hi" (2001)'
    assert items.loc["12", "genres"] == ""
    assert items.loc["13", "title"] == "Two\nLines (1999)"
    assert items.loc["15", "year"] == ""
    assert items.loc["1", "tags"] == "pixar"
    assert items.loc["11", "tags"] == "funny, clever"
    # line numbers are physical lines, also after a record spanning two of them
    assert raw.items[LINE_COL].tolist() == [2, 3, 4, 5, 8]
    bad = raw.malformed[["table", SOURCE_COL, LINE_COL, "raw"]].values.tolist()
    assert bad == [
        ["interactions", str(tmp_path / "ratings.csv"), 3, "1,11,oops"],
        ["items", str(tmp_path / "movies.csv"), 7, "14,Too,Many,Fields"],
    ]
    assert raw.users is None
    assert (raw.items.drop(columns=[LINE_COL]).dtypes.astype(str).isin(["object", "str"])).all()


def test_latest_without_tags_has_no_tags_column(tmp_path: Path) -> None:
    _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n")
    _write(tmp_path / "movies.csv", "movieId,title,genres\n1,Toy Story (1995),Comedy\n")
    raw = load_movielens_latest(tmp_path)
    assert "tags" not in raw.items.columns
    assert raw.malformed.empty
    assert "tags" not in raw.files


@pytest.mark.parametrize(
    ("loader", "present", "missing"),
    [
        (load_movielens_100k, [], "u.data"),
        (load_movielens_100k, ["u.data"], "u.item"),
        (load_movielens_dat, ["ratings.dat"], "movies.dat"),
        (load_movielens_latest, [], "ratings.csv"),
        (load_movielens_latest, ["ratings.csv"], "movies.csv"),
    ],
)
def test_missing_file_names_it(tmp_path: Path, loader, present: list[str], missing: str) -> None:
    for name in present:
        _write(tmp_path / name, "userId,movieId,rating,timestamp\n" if name.endswith(".csv") else "")
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*data\.path"):
        loader(tmp_path)


def test_latest_header_must_name_the_columns(tmp_path: Path) -> None:
    _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n")
    _write(tmp_path / "movies.csv", "id,title,genres\n1,x,y\n")
    with pytest.raises(ValueError, match="movieId"):
        load_movielens_latest(tmp_path)


def test_empty_files_give_empty_tables(tmp_path: Path) -> None:
    _write(tmp_path / "ratings.dat", "")
    _write(tmp_path / "movies.dat", "")
    raw = load_movielens_dat(tmp_path)
    assert raw.interactions.empty and raw.items.empty
    assert isinstance(raw.malformed, pd.DataFrame) and raw.malformed.empty


def test_every_downloadable_release_is_a_data_source() -> None:
    from typing import get_args

    from fuserec.config import Source
    from fuserec.data.download import ARCHIVES

    assert set(ARCHIVES) <= set(get_args(Source))


def test_latest_small_is_read_by_the_latest_loader(tmp_path: Path) -> None:
    from fuserec.config import DataConfig
    from fuserec.data.sources import load_source

    _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n7,3,4.5,964982703\n")
    _write(tmp_path / "movies.csv", 'movieId,title,genres\n3,"Grumpier Old Men, The (1995)",Comedy\n')
    raw = load_source(DataConfig(source="movielens-latest-small", path=str(tmp_path)))
    assert raw.interactions[["user_id", "item_id", "rating"]].values.tolist() == [["7", "3", "4.5"]]
    assert raw.items.set_index("item_id").loc["3", "year"] == "1995"
    assert raw.users is None
