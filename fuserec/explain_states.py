"""Explain states: what a served component needs to explain its own scores, saved beside the graph.

The service holds the exported folder (graph, catalogue, users, manifest), not the training artifacts,
so a plugin whose explanation reads its fitted state (the knowledge graph's walks) could not explain in
the served process. A plugin opts in with :meth:`fuserec.api.Algorithm.explain_state`: the arrays its
``explain`` reads. The export writes them for each component of the served scorer (a fuser's
components, or the single algorithm) to ``explain/<component>.npz`` (``allow_pickle=False``) and lists
them in the manifest under ``explain_states``: the plugin's registry name, its config and catalogue size,
the file, its sha256 and byte size. The service verifies the bytes, restores each state into a fresh
instance of that plugin (:func:`load_explainers`) and calls its ``explain`` on the request's history, so
a served explanation is the plugin's own, computed from the same numbers.

Bounded: a component whose state is over :data:`MAX_EXPLAIN_STATE_BYTES` is not written; the manifest
records why, and the service says its explanation is unavailable. The knowledge graph's state is its
context and item vectors (``2 x n_items x factors`` floats), the item-entity and item-user incidence
(int32 per edge) and one degree per training user: 1.1 MB on ML-100k with 64 factors (its full state
is 2.0 MB), an estimated 22 MB at ML-10M's shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fuserec.api import Algorithm
from fuserec.manifest import file_sha256
from fuserec.registry import find, get_algorithm

if TYPE_CHECKING:
    from fuserec.fusion import Fuser

EXPLAIN_DIR = "explain"  # inside the exported model folder
MAX_EXPLAIN_STATE_BYTES = 128 << 20  # per component; a larger state is left out (the manifest says so)


def components_of(scorer: Algorithm | Fuser, name: str) -> dict[str, Algorithm]:
    """The served scorer's components by name: a fuser's bound components, or the algorithm itself."""
    if isinstance(scorer, Algorithm):
        return {name: scorer}
    return dict(scorer.components_)


def write_explain_states(scorer: Algorithm | Fuser, name: str, folder: Path) -> dict[str, dict[str, Any]]:
    """Save each component's explain state under ``folder/explain``; returns the manifest's entries.

    Components whose plugin has none are left out; one that cannot be restored by its registry name
    (not the plugin registered under it) or is too large gets an entry with ``file`` None and a reason.
    """
    entries: dict[str, dict[str, Any]] = {}
    for component, algo in components_of(scorer, name).items():
        state = algo.explain_state()
        if state is None:
            continue
        info = find(component)
        entry: dict[str, Any] = {"plugin": component, "file": None}
        size = sum(np.asarray(v).nbytes for v in state.values())
        if info is None or info.cls is not type(algo):
            entry["reason"] = f"no plugin is registered as {component!r} to restore it in the service"
        elif size > MAX_EXPLAIN_STATE_BYTES:
            entry["reason"] = (
                f"its explain state has {size:,} bytes, over the {MAX_EXPLAIN_STATE_BYTES:,} the export keeps"
            )
        else:
            path = folder / EXPLAIN_DIR / f"{component}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **{k: np.asarray(v) for k, v in state.items()})  # type: ignore[arg-type]  # stub: **kwds
            entry |= {
                "file": f"{EXPLAIN_DIR}/{path.name}",
                "sha256": file_sha256(path),
                "bytes": path.stat().st_size,
                "n_items": algo._check_fitted(),
                "config": algo.config.model_dump(mode="json"),
            }
        entries[component] = entry
    return entries


def load_explainers(
    folder: Path, entries: dict[str, dict[str, Any]]
) -> tuple[dict[str, Algorithm], dict[str, str]]:
    """Plugins restored from the manifest's ``explain_states``, by component, and why others are not.

    A file whose bytes differ from the manifest's sha256 is refused (RuntimeError), as the graph is.
    """
    explainers: dict[str, Algorithm] = {}
    missing: dict[str, str] = {}
    for component, entry in entries.items():
        if not entry.get("file"):
            missing[component] = str(entry.get("reason", "the export kept no explain state"))
            continue
        path = folder / str(entry["file"])
        if not path.is_file():
            raise RuntimeError(
                f"{path} is listed in {folder / 'manifest.json'} but missing; re-export the model"
            )
        actual, expected = file_sha256(path), str(entry.get("sha256"))
        if actual != expected:
            raise RuntimeError(
                f"{path} has sha256 {actual[:12]}..., but its manifest records {expected[:12]}...: "
                "the file changed after export (a partial copy, a manual edit); re-export or restore it"
            )
        cls = get_algorithm(str(entry["plugin"]))
        algo = cls(cls.Config.model_validate(entry["config"]))
        with np.load(path, allow_pickle=False) as npz:
            algo.set_state({k: npz[k] for k in npz.files})
        algo.n_items_ = int(entry["n_items"])
        explainers[component] = algo
    return explainers, missing
