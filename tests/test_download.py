"""fetch_movielens against a real HTTP server on 127.0.0.1 serving a zip built at test time.

The zip is made from the local ML-100K copy (never stored in the repository), so these tests skip
when that copy is absent, except the ones that need no MovieLens data at all.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fuserec.data.download import (
    ARCHIVES,
    CHECKSUMS_FILE,
    ChecksumMismatchError,
    DownloadError,
    fetch_movielens,
)
from fuserec.data.movielens import load_movielens_100k

ML100K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k"
needs_ml100k = pytest.mark.skipif(
    not (ML100K / "u.data").is_file(), reason=f"real MovieLens 100K not found at {ML100K}"
)


class _Server:
    """Serves ``payload`` at ``/<name>`` and counts every request."""

    def __init__(self) -> None:
        self.payload = b""
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                if self.path.endswith(".zip"):
                    self.send_response(200)
                    self.send_header("Content-Type", "application/zip")
                    self.send_header("Content-Length", str(len(outer.payload)))
                    self.end_headers()
                    self.wfile.write(outer.payload)
                else:
                    self.send_error(404)

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, name: str = "ml-100k.zip") -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/{name}"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    srv = _Server()
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
        srv.thread.join(timeout=5)


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def ml100k_zip(ml100k: Path) -> bytes:
    """ml-100k.zip as GroupLens lays it out (files under ``ml-100k/``), built from the ../shared copy."""
    return _zip({f"ml-100k/{p.name}": p.read_bytes() for p in sorted(ml100k.iterdir()) if p.is_file()})


def _leftovers(cache: Path) -> list[str]:
    """Anything a failed fetch must not leave behind (archives, partial downloads, staging folders)."""
    return sorted(p.name for p in cache.iterdir() if p.suffix in (".zip", ".part", ".unpack"))


@pytest.mark.shared
@needs_ml100k
def test_fetch_extracts_records_and_caches(server: _Server, ml100k_zip: bytes, tmp_path: Path) -> None:
    server.payload = ml100k_zip
    cache = tmp_path / "cache"
    folder = fetch_movielens("movielens-100k", cache, url=server.url())
    assert folder == cache / "ml-100k"
    assert (folder / "u.data").read_bytes() == (ML100K / "u.data").read_bytes()
    assert server.requests == 1
    record = json.loads((cache / CHECKSUMS_FILE).read_text())
    assert record == {server.url(): hashlib.sha256(ml100k_zip).hexdigest()}
    assert _leftovers(cache) == []

    assert fetch_movielens("movielens-100k", cache, url=server.url()) == folder
    assert server.requests == 1  # cache hit: no network I/O

    raw = load_movielens_100k(folder)
    assert (len(raw.interactions), len(raw.items), len(raw.users)) == (100_000, 1682, 943)


@pytest.mark.shared
@needs_ml100k
def test_explicit_checksum_mismatch(server: _Server, ml100k_zip: bytes, tmp_path: Path) -> None:
    server.payload = ml100k_zip
    wrong = "0" * 64
    got = hashlib.sha256(ml100k_zip).hexdigest()
    with pytest.raises(ChecksumMismatchError) as err:
        fetch_movielens("movielens-100k", tmp_path, url=server.url(), sha256=wrong)
    message = str(err.value)
    assert server.url() in message and wrong in message and got in message
    assert _leftovers(tmp_path) == []
    assert not (tmp_path / "ml-100k").exists()
    assert not (tmp_path / CHECKSUMS_FILE).exists()  # nothing trusted from a failed check

    # the right checksum passes
    folder = fetch_movielens("movielens-100k", tmp_path, url=server.url(), sha256=got.upper())
    assert (folder / "u.item").is_file()


@pytest.mark.shared
@needs_ml100k
def test_recorded_checksum_guards_later_downloads(server: _Server, ml100k_zip: bytes, tmp_path: Path) -> None:
    server.payload = ml100k_zip
    fetch_movielens("movielens-100k", tmp_path, url=server.url())
    first = hashlib.sha256(ml100k_zip).hexdigest()

    # The server now hands out other bytes; the cached folder is gone, so the archive is fetched again.
    changed = _zip({"ml-100k/u.data": b"1\t1\t5\t0\n"})
    server.payload = changed
    for marker in tmp_path.glob(".ml-100k*.json"):
        marker.unlink()
    with pytest.raises(ChecksumMismatchError, match=first) as err:
        fetch_movielens("movielens-100k", tmp_path, url=server.url())
    assert hashlib.sha256(changed).hexdigest() in str(err.value)
    assert server.requests == 2
    assert _leftovers(tmp_path) == []

    # An explicit checksum wins over the recorded one (and replaces it).
    new = hashlib.sha256(changed).hexdigest()
    folder = fetch_movielens("movielens-100k", tmp_path, url=server.url(), sha256=new)
    assert (folder / "u.data").read_bytes() == b"1\t1\t5\t0\n"
    assert not (folder / "u.item").exists()  # the old extraction was replaced, not merged
    assert json.loads((tmp_path / CHECKSUMS_FILE).read_text())[server.url()] == new


def test_rejects_members_escaping_the_folder(server: _Server, tmp_path: Path) -> None:
    server.payload = _zip({"ml-100k/u.data": b"x", "ml-100k/../../evil.txt": b"owned"})
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="unsafe archive member"):
        fetch_movielens("movielens-100k", cache, url=server.url())
    assert not (tmp_path / "evil.txt").exists()
    assert not (cache / "ml-100k").exists()
    assert _leftovers(cache) == []


def test_http_error_names_the_url(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"missing\.txt.*data\.path"):
        fetch_movielens("movielens-100k", tmp_path, url=server.url("missing.txt"))
    assert [p.name for p in tmp_path.iterdir()] == []


def test_registry_and_unknown_source(tmp_path: Path) -> None:
    assert ARCHIVES["movielens-100k"].url == "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
    assert {a.folder for a in ARCHIVES.values()} >= {"ml-100k", "ml-1m", "ml-10M100K", "ml-latest-small"}
    assert all(a.url.startswith("https://files.grouplens.org/") for a in ARCHIVES.values())
    with pytest.raises(ValueError, match="movielens-100k"):
        fetch_movielens("nope", tmp_path)
