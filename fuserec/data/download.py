"""Fetch a MovieLens archive from GroupLens into a local cache, for users who are online.

Only called when ``data.download`` is true and ``data.path`` is unset: the pipeline never touches the
network on its own. GroupLens does not allow redistributing the data, so the archive comes from them.

Integrity: an archive with a known SHA-256 is checked against it. Where none is known (GroupLens
publishes no SHA-256 we could verify here), the first download's SHA-256 is recorded in
``<cache_dir>/checksums.json`` (trust on first use) and every later download of the same URL must
match it, so a silently changed or corrupted archive is noticed. An explicit ``sha256`` always wins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

log = logging.getLogger(__name__)

CHECKSUMS_FILE = "checksums.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Archive:
    """One downloadable release: where it is, the folder the zip holds, its SHA-256 when known."""

    url: str
    folder: str
    sha256: str | None = None


_BASE = "https://files.grouplens.org/datasets/movielens"
# Keys are ``data.source`` values. "movielens-latest" is the full ml-latest (hundreds of MB);
# "movielens-latest-small" is the ~1 MB ml-latest-small, read by the same loader.
ARCHIVES: dict[str, Archive] = {
    "movielens-100k": Archive(f"{_BASE}/ml-100k.zip", "ml-100k"),
    "movielens-1m": Archive(f"{_BASE}/ml-1m.zip", "ml-1m"),
    "movielens-10m": Archive(f"{_BASE}/ml-10m.zip", "ml-10M100K"),
    "movielens-latest-small": Archive(f"{_BASE}/ml-latest-small.zip", "ml-latest-small"),
    "movielens-latest": Archive(f"{_BASE}/ml-latest.zip", "ml-latest"),
}


class DownloadError(RuntimeError):
    """The archive could not be fetched or unpacked."""


class ChecksumMismatchError(DownloadError):
    """The downloaded bytes are not the expected ones (the bad file has been deleted)."""


def fetch_movielens(
    source: str,
    cache_dir: str | Path,
    *,
    url: str | None = None,
    sha256: str | None = None,
    timeout: float = 60,
) -> Path:
    """Download (once) and unpack the archive of ``source``; return the folder holding its files.

    ``url`` overrides the registry's URL (a mirror, or a local server in tests). A folder already
    unpacked from the same URL (and, when ``sha256`` is given, with that checksum) is returned without
    any network I/O. The download goes to a temporary file renamed into place, and the archive is
    unpacked into a temporary folder renamed into place, so an interrupted run leaves no half files.
    """
    if source not in ARCHIVES:
        raise ValueError(f"no download known for data.source={source!r}; known: {sorted(ARCHIVES)}")
    archive = ARCHIVES[source]
    url = url or archive.url
    expected = (sha256 or archive.sha256 or "").lower() or None
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    folder = cache / archive.folder
    marker = cache / f".{archive.folder}.fetched.json"

    done = _read_json(marker)
    if folder.is_dir() and done.get("url") == url and expected in (None, done.get("sha256")):
        return folder

    zip_path = cache / (PurePosixPath(urlparse(url).path).name or f"{archive.folder}.zip")
    got = _download(url, zip_path, timeout)
    records = _read_json(cache / CHECKSUMS_FILE)
    want = expected or records.get(url)
    if want is not None and got != want:
        zip_path.unlink(missing_ok=True)
        how = "given" if expected else f"recorded in {cache / CHECKSUMS_FILE} on first download"
        raise ChecksumMismatchError(
            f"checksum mismatch for {url}: expected sha256 {want} ({how}), got {got}; "
            f"the downloaded file was deleted. If the archive legitimately changed, delete its entry "
            f"from {cache / CHECKSUMS_FILE} and fetch again."
        )
    try:
        _extract(zip_path, folder)
    finally:
        zip_path.unlink(missing_ok=True)  # unpacked or unusable: either way not needed any more
    if records.get(url) != got:  # trust on first use: only an archive that unpacked cleanly
        records[url] = got
        _write_json(cache / CHECKSUMS_FILE, records)
    _write_json(marker, {"url": url, "sha256": got})
    log.info("fetched %s into %s", url, folder)
    return folder


def _download(url: str, dest: Path, timeout: float) -> str:
    """Stream ``url`` to a temporary file next to ``dest``, rename it to ``dest``; return its SHA-256."""
    log.info("downloading %s", url)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as err:
        tmp.unlink(missing_ok=True)
        raise DownloadError(
            f"could not download {url}: {err}. Check the connection, or download and unzip it yourself "
            f"and set data.path to the unzipped folder."
        ) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def _extract(zip_path: Path, folder: Path) -> None:
    """Unpack ``zip_path`` so that its data files end up directly in ``folder``.

    Member names are checked before anything is written: absolute paths, ``..`` parts, drive letters
    and symbolic links are refused (a crafted archive must not write outside the cache). The archive's
    own top folder (``ml-100k/``) is where the files come from; an archive without one is used as is.
    """
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".unpack"))
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                for info in zf.infolist():
                    _check_member(info, staging, zip_path)
                zf.extractall(staging)
        except zipfile.BadZipFile as err:
            raise DownloadError(f"{zip_path} is not a zip archive: {err}") from err
        entries = [p for p in staging.iterdir() if p.name != "__MACOSX"]
        if (staging / folder.name).is_dir():
            root = staging / folder.name
        elif len(entries) == 1 and entries[0].is_dir():
            root = entries[0]
        else:
            root = staging
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(root, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_member(info: zipfile.ZipInfo, staging: Path, zip_path: Path) -> None:
    name = info.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
    target = (staging / name).resolve()
    inside = target == staging.resolve() or staging.resolve() in target.parents
    if name.startswith("/") or ".." in parts or (parts and ":" in parts[0]) or is_link or not inside:
        raise DownloadError(f"{zip_path}: refusing unsafe archive member {info.filename!r}")


def _read_json(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, str]) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a record."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
