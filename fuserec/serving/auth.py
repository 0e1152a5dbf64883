"""API keys with scopes: who may read recommendations, write events, or administer the service.

A key is a random secret shown once when it is made (``fuserec keys add``); the keys file keeps only its
SHA-256, its name and its scopes, so a leaked file lets nobody in. Keys are 256-bit random tokens, so a plain
hash is enough (a slow password hash protects guessable secrets; these are not guessable). Clients send the
key in the ``X-API-Key`` header.

Scopes: ``read`` (``/recommend``, ``/explain``, ``GET /items/{id}``), ``write`` (``POST /events``,
``POST /items``), ``admin`` (``/admin/*`` and a user's stored events, ``GET /events``). With no keys at
all the service is open, which :func:`check_open` allows only on a loopback address.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCOPES = ("read", "write", "admin")
HEADER = "X-API-Key"
PREFIX = "frk_"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    scopes: frozenset[str]


class KeyRing:
    """The keys of one service, loaded from its keys file (JSON: ``{"keys": [{name, sha256, scopes}]}``)."""

    def __init__(self, keys: list[ApiKey] | None = None, path: Path | None = None) -> None:
        self.path = path
        self.keys = list(keys or [])

    @classmethod
    def load(cls, path: str | Path) -> KeyRing:
        """The file's keys; a missing file is an empty ring (open access, loopback only)."""
        path = Path(path)
        if not path.exists():
            return cls([], path)
        try:
            raw = json.loads(path.read_text())
            keys = [
                ApiKey(str(k["name"]), str(k["sha256"]), frozenset(str(s) for s in k["scopes"]))
                for k in raw.get("keys", [])
            ]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"{path}: not a fuserec keys file ({exc}); "
                "recreate it with `fuserec keys add NAME --scope read`"
            ) from exc
        for key in keys:
            unknown = sorted(key.scopes - set(SCOPES))
            if unknown:
                raise ValueError(
                    f"{path}: key {key.name!r} has unknown scopes {unknown}; known: {list(SCOPES)}"
                )
        return cls(keys, path)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def find(self, secret: str | None) -> ApiKey | None:
        """The key whose hash matches ``secret`` (compared in constant time), or None."""
        if not secret:
            return None
        wanted = digest(secret)
        found = None
        for key in self.keys:
            if hmac.compare_digest(key.sha256, wanted):
                found = key
        return found

    def add(self, name: str, scopes: list[str]) -> str:
        """Make a key named ``name`` with ``scopes``, save the ring, and return the secret (shown once)."""
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown or not scopes:
            raise ValueError(f"scopes must be some of {list(SCOPES)}, got {scopes}")
        if any(k.name == name for k in self.keys):
            raise ValueError(f"a key named {name!r} exists; revoke it first or pick another name")
        secret = PREFIX + secrets.token_urlsafe(32)
        self.keys.append(ApiKey(name, digest(secret), frozenset(scopes)))
        self.save()
        return secret

    def revoke(self, name: str) -> bool:
        before = len(self.keys)
        self.keys = [k for k in self.keys if k.name != name]
        if len(self.keys) != before:
            self.save()
        return len(self.keys) != before

    def save(self) -> None:
        if self.path is None:
            raise ValueError("this key ring has no file to save to")
        payload: dict[str, Any] = {
            "keys": [{"name": k.name, "sha256": k.sha256, "scopes": sorted(k.scopes)} for k in self.keys]
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, self.path)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_open(keys: KeyRing, host: str) -> None:
    """Refuse to serve without keys anywhere but loopback; say how to make keys."""
    if not keys and not is_loopback(host):
        where = keys.path or "the keys file"
        raise PermissionError(
            f"refusing to serve on {host} without API keys: anyone who reaches the port could read "
            f"every user's events. Create keys with `fuserec keys add NAME --scope read --scope write` "
            f"(they go to {where}, serve.keys_file in params.yaml), or bind 127.0.0.1 for local use."
        )
