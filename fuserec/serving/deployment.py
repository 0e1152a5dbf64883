"""The served model as something that can be replaced while requests keep coming.

A :class:`Deployment` holds the event store and settings, which live as long as the process, and the current
:class:`~fuserec.serving.service.Service` (model, catalogue, scoring worker), which a reload replaces whole:
the new one is loaded beside the old, then one reference swap makes every new request use it. Requests
already holding the old one finish on it; its worker stops after the request timeout has passed, so none
of them is cut off. A model that fails to load (a bad file, a sha256 mismatch) leaves the old one serving.

Reloads come from ``POST /admin/reload`` or from watching the served path: promotion swaps the
``served/current`` symlink, and an export swaps ``outputs/model``; either changes the resolved folder or the
manifest's sha256, which :meth:`Deployment.changed` compares.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fuserec.config import ServeConfig
from fuserec.manifest import read_json
from fuserec.serving.batcher import Closed
from fuserec.serving.store import SQLiteEventStore

log = logging.getLogger("fuserec.serving")

Identity = tuple[str, str]  # (resolved run folder, the manifest's sha256)


def identity(outputs: Path) -> Identity:
    root = Path(os.path.realpath(outputs))
    manifest = read_json(root / "model" / "manifest.json")
    return str(root), str(manifest.get("sha256", ""))


class Deployment:
    """The store, the settings and the current service; :meth:`reload` swaps the service atomically.

    ``load(root, store)`` builds a service for a resolved run folder over the shared store.
    """

    def __init__(
        self,
        outputs: Path,
        store: SQLiteEventStore,
        settings: ServeConfig,
        load: Callable[[Path, SQLiteEventStore], Any],
    ) -> None:
        self.outputs = Path(outputs)
        self.store = store
        self.settings = settings
        self._load = load
        self._lock = threading.Lock()
        self.loaded = identity(self.outputs)
        self.current = load(Path(self.loaded[0]), store)
        self.reloads = 0
        self.listeners: list[Callable[[Any], None]] = []  # told of each new service (metrics labels)
        self.pruned = self.prune()

    def changed(self) -> bool:
        """Whether the served path now holds another model (a promotion or a re-export)."""
        try:
            return identity(self.outputs) != self.loaded
        except (OSError, ValueError):  # mid-swap or a broken folder: look again next time
            return False

    def reload(self) -> dict[str, Any]:
        """Load what the served path holds now and swap it in; the old service retires after the timeout."""
        with self._lock:
            found = identity(self.outputs)
            fresh = self._load(Path(found[0]), self.store)
            old, self.current, self.loaded = self.current, fresh, found
            self.reloads += 1
        for listener in self.listeners:
            try:
                listener(fresh)
            except Exception:  # a listener's failure must not undo a finished swap
                log.exception("reload listener failed")
        grace = self.settings.request_timeout_s + 1.0
        retire = threading.Timer(grace, old.close)
        retire.daemon = True
        retire.start()
        log.info("reloaded the served model: %s (sha256 %s)", found[0], found[1][:12])
        return {"reloaded": True, "folder": found[0], "sha256": found[1]}

    def call(self, method: str, *args: Any) -> Any:
        """``current.<method>(*args)``; when a reload closed that service in between, once more on the new."""
        try:
            return getattr(self.current, method)(*args)
        except Closed:
            return getattr(self.current, method)(*args)

    async def call_async(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.current, method)(*args)
        except Closed:
            return await getattr(self.current, method)(*args)

    def prune(self) -> int:
        """Drop events older than ``serve.retention_days`` (nothing when it is null)."""
        days = self.settings.retention_days
        if days is None:
            return 0
        removed = self.store.prune(int(time.time() - days * 86_400))
        if removed:
            log.info("retention: %d events older than %g days left the store", removed, days)
        return removed

    def close(self) -> None:
        self.current.close()
        self.store.close()
