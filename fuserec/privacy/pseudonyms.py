"""Pseudonymous user ids: a keyed hash replaces each raw id, so what the pipeline writes names nobody.

Why a keyed hash and not a lookup table: the mapping needs no state to keep in sync between the pipeline
and the service (both hold the key, nothing else), a new user gets their pseudonym at once, and without
the key nobody can test a guessed id against the outputs. Why 63 bits: every stage keeps user ids as
non-negative int64 (validate's ``ID_BODY``), so a pseudonym is one too; at a million users the chance
that two share one is about 5e-8, and :meth:`Pseudonymiser.users` refuses such a clash rather than
merging two people.

The key never appears in any output: the validation report records :attr:`Pseudonymiser.fingerprint`
(a keyed hash of a constant), which tells which key made a run's pseudonyms and reveals nothing of it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from fuserec.config import Params, PrivacyConfig

KEY_MIN_CHARS = 32  # 32 random bytes as hex (what new_key_file writes) are 64
FINGERPRINT_MESSAGE = b"fuserec-pseudonym-key-fingerprint\x00"
FINGERPRINT_HEX = 16
_MAX_63 = (1 << 63) - 1


class MissingKeyError(RuntimeError):
    """Pseudonymisation is on but no key was found (or it is too short)."""


class PseudonymCollisionError(RuntimeError):
    """Two different raw ids hashed to one pseudonym; merging them would mix two people's data."""


class KeyMismatchError(RuntimeError):
    """A run's pseudonyms were made with another key (or none) than the one at hand."""


def canonical_id(raw: str | int) -> str:
    """The text a user id is hashed as: stripped, and ASCII digits without leading zeros.

    Validate reads ``"007"`` and ``"7"`` as the same user (int64 7), and the service receives ids as text,
    so both must hash the same text. Anything else (``"carol-5"``, ``"٧"``) is hashed as its stripped text;
    ``"٧"`` stays distinct from ``"7"``, as validate keeps it apart.
    """
    if isinstance(raw, bool) or not isinstance(raw, str | int | np.integer):
        raise TypeError(f"a user id is text or an integer, not {type(raw).__name__}")
    text = str(int(raw)) if not isinstance(raw, str) else raw.strip()
    if not text:
        raise ValueError("an empty user id has no pseudonym")
    if text.isascii() and text.isdigit():
        return text.lstrip("0") or "0"
    return text


class Pseudonymiser:
    """Raw user id -> pseudonym: the first 63 bits of HMAC-SHA-256(key, canonical id), as an int."""

    def __init__(self, key: bytes) -> None:
        if len(key) < KEY_MIN_CHARS:
            raise MissingKeyError(
                f"the pseudonym key has {len(key)} bytes; use at least {KEY_MIN_CHARS} "
                f"(new_key_file writes 64 hex characters)"
            )
        self._key = bytes(key)

    def __repr__(self) -> str:  # never the key
        return f"Pseudonymiser(fingerprint={self.fingerprint!r})"

    @property
    def key(self) -> bytes:
        """The key itself, for callers that derive other keyed hashes (e.g. the erasure register)."""
        return self._key

    @property
    def fingerprint(self) -> str:
        """Which key this is, safe to record: SHA-256 of HMAC(key, a constant), first 16 hex digits."""
        mac = hmac.new(self._key, FINGERPRINT_MESSAGE, hashlib.sha256).digest()
        return hashlib.sha256(mac).hexdigest()[:FINGERPRINT_HEX]

    def user(self, raw_id: str | int) -> int:
        """The pseudonym of one raw id: a non-negative int64 (the service stores its decimal text)."""
        return self._hash(canonical_id(raw_id))

    def stored(self, raw_id: str | int) -> str:
        """The pseudonym as the text the event store and the model's id tables hold."""
        return str(self.user(raw_id))

    def users(self, values: pd.Series | np.ndarray | Sequence[Any]) -> np.ndarray:
        """Pseudonyms of many ids (``int64``, same order): each distinct id is hashed once.

        Raises ValueError on a missing id and :class:`PseudonymCollisionError` when two distinct ids
        among ``values`` share a pseudonym.
        """
        series = pd.Series(values)
        if not pd.api.types.is_integer_dtype(series.dtype):
            series = series.astype(object)
        codes, uniques = pd.factorize(series, use_na_sentinel=True)
        if (codes < 0).any():
            raise ValueError(f"{int((codes < 0).sum())} missing user id(s) have no pseudonym")
        texts = [canonical_id(v) for v in uniques.tolist()]
        hashed = {t: self._hash(t) for t in dict.fromkeys(texts)}  # "7" and "007" are hashed once
        if len(set(hashed.values())) < len(hashed):
            raise PseudonymCollisionError(
                f"two of {len(hashed)} distinct user ids share a pseudonym (a 63-bit hash clash); "
                "rotate the key (docs/privacy.md) so they get different ones"
            )
        table = np.fromiter((hashed[t] for t in texts), dtype=np.int64, count=len(texts))
        return table[codes] if len(codes) else np.zeros(0, dtype=np.int64)

    def _hash(self, text: str) -> int:
        digest = hmac.digest(self._key, text.encode("utf-8"), "sha256")
        return int.from_bytes(digest[:8], "big") >> 1

    @classmethod
    def from_config(cls, cfg: PrivacyConfig) -> Pseudonymiser:
        """The pseudonymiser of the key ``cfg`` names (:func:`load_key`)."""
        return cls(load_key(cfg))

    @classmethod
    def from_params(cls, params: Params) -> Pseudonymiser | None:
        """The pseudonymiser these params use for ``data.source``; None when ids are kept as they are.

        Raises :class:`MissingKeyError` when pseudonymisation is on and no key is found.
        """
        if not params.privacy.enabled(params.data.source):
            return None
        return cls.from_config(params.privacy)


def load_key(cfg: PrivacyConfig) -> bytes:
    """The key from the environment variable ``cfg.key_env``, else from ``cfg.key_file``.

    The key is the variable's or the file's text, stripped (at least 32 characters). A key file that
    others can read is used, with a warning.
    """
    value = os.environ.get(cfg.key_env, "").strip()
    source = f"environment variable {cfg.key_env}"
    path = Path(cfg.key_file).expanduser()
    if not value and path.is_file():
        value, source = path.read_text(encoding="utf-8").strip(), str(path)
        if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.warn(
                f"the pseudonym key file {path} can be read by other users; run `chmod 600 {path}`",
                stacklevel=2,
            )
    if not value:
        raise MissingKeyError(_missing_key_message(cfg, path))
    if len(value) < KEY_MIN_CHARS:
        raise MissingKeyError(
            f"the pseudonym key in {source} has {len(value)} characters; a key needs at least "
            f"{KEY_MIN_CHARS}. {_how_to_create(path)}"
        )
    return value.encode("utf-8")


def _how_to_create(path: Path) -> str:
    return (
        f'Create one with: python -c "from fuserec.privacy.pseudonyms import new_key_file; '
        f"new_key_file('{path}')\" (docs/privacy.md explains keys and rotation)"
    )


def _missing_key_message(cfg: PrivacyConfig, path: Path) -> str:
    return (
        f"user ids are pseudonymised (privacy.pseudonymise: {cfg.pseudonymise}) but no key was found: "
        f"the environment variable {cfg.key_env} is unset and {path} does not exist. {_how_to_create(path)}, "
        f"or set {cfg.key_env} to a secret of at least {KEY_MIN_CHARS} characters. Keep the same key for "
        "the pipeline and the service; to work without pseudonyms set privacy.pseudonymise: false"
    )


def new_key_file(path: str | Path) -> Path:
    """Write a new random key (32 bytes as hex) to ``path``, readable by its owner only; returns the path.

    Refuses to overwrite an existing file: replacing a key changes every pseudonym (docs/privacy.md).
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise FileExistsError(
            f"{path} exists: a new key would change every pseudonym. To rotate the key on purpose, move "
            "the old file away first (docs/privacy.md says what must be recomputed)"
        ) from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secrets.token_hex(32) + "\n")
    return path


def check_key(pseudonymiser: Pseudonymiser | None, recorded: dict[str, Any] | None, where: str) -> None:
    """Raise :class:`KeyMismatchError` when a run's ``privacy`` record (the validation report's entry)
    was made with another key, or with none, than ``pseudonymiser``.

    Mapping incoming ids with another key than the run's would treat every known user as a stranger.
    A run without a record (made before ids were pseudonymised) counts as not pseudonymised.
    """
    was = bool(recorded and recorded.get("pseudonymised"))
    if pseudonymiser is None and not was:
        return
    if pseudonymiser is None:
        raise KeyMismatchError(
            f"{where} holds pseudonymised user ids, but pseudonymisation is off here: set "
            "privacy.pseudonymise and the key the run was made with"
        )
    if not was:
        raise KeyMismatchError(
            f"{where} holds raw user ids, but pseudonymisation is on here: rerun the pipeline from "
            "validate with this key, or set privacy.pseudonymise: false"
        )
    made_with = (recorded or {}).get("key_fingerprint")
    if made_with != pseudonymiser.fingerprint:
        raise KeyMismatchError(
            f"{where} was pseudonymised with the key of fingerprint {made_with}, but the key at hand has "
            f"{pseudonymiser.fingerprint}: use that run's key, or rerun the pipeline from validate with "
            "this one (docs/privacy.md, key rotation)"
        )
