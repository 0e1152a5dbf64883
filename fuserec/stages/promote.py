"""Promote: a retrained candidate replaces the served model only if it is not worse; nothing is half-served.

A retrain writes a *candidate*: the run's ``outputs/`` (``metrics.json``, ``model/`` and the data the
served model reads). The *served* model lives apart, in ``promote.served_dir``::

    served/
      releases/<stamp>/      each promoted run's served parts (SERVED_PARTS) and promotion.json
      current -> releases/<stamp>    relative symlink: what batch jobs and `fuserec serve` read
      previous -> releases/<older>   relative symlink: the release current replaced (one step of rollback)
      rejected/<stamp>/      candidates that lost, kept for inspection
      promotions.jsonl       one JSON line per decision: both metric sets, tolerance, decision, reason

A promotion copies the candidate into a staging folder under ``releases/``, renames it to its final name
once complete, and only then moves the ``current`` pointer: a new link renamed over the old one, one atomic
rename (:func:`fuserec.atomic.point_symlink`). A crash at any point leaves ``current`` naming a complete
release, the old one or the new one. ``previous`` then takes the old release, and releases neither points
to are deleted. :func:`rollback` swaps the two pointers (atomically on Linux) and logs it. A served folder
of the older layout (``current/`` and ``previous/`` as real folders) is moved into ``releases/`` on the
next promotion or rollback.

Nothing a service writes belongs in a release: promotion copies only ``SERVED_PARTS`` (never an event
store such as ``events.sqlite``), and a release that holds one anyway (a service started on
``served/current`` without ``--store``) is never deleted, only reported.

The decision compares ``promote.metric`` (default ``ndcg@10``) of ``promote.algorithm`` (default: the
exported one, ``export.algorithm`` with ``auto`` resolved to the run's choice on validation). The values
are test-split metrics from ``metrics.json`` (validation scores only chose what to export), so each side's
value is its own run's held-out score under the same protocol. When the data grows between retrains the
two test sets differ; ``promote.tolerance`` absorbs that noise, and the log keeps both metric sets so a
reviewer can see it. Nothing served yet: the first candidate is always promoted.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from fuserec.atomic import exchange, fsync_dir, fsync_tree, pid_alive, point_symlink, remove, replace_dir
from fuserec.config import Params
from fuserec.layout import Layout
from fuserec.manifest import read_json, write_json

CURRENT, PREVIOUS, REJECTED, RELEASES = "current", "previous", "rejected", "releases"
LOG_FILE = "promotions.jsonl"
RECORD_FILE = "promotion.json"  # in each release: what was promoted, from where, with which value
# What a served folder keeps of a run: the model, its metrics, and what batch scoring / the service and the
# next drift check read (training histories, id tables, the validated interactions; the test split dates
# each user's test period, before which the service's import takes their low ratings).
SERVED_PARTS = (
    "metrics.json",
    "model",
    "clean",
    "split/train.parquet",
    "split/test.parquet",
    "split/summary.json",
    "validated/interactions.parquet",
    "validation_report.json",
    "drift_report.json",
    "report.html",
)
REQUIRED_PARTS = ("metrics.json", "model")
# What a running service writes (the event store, with SQLite's journal files): never part of a release,
# and a release found holding one is kept rather than deleted, so no recorded event is lost.
STATE_FILES = ("events.sqlite", "events.sqlite-wal", "events.sqlite-shm", "events.sqlite-journal")
STAGING_PREFIX = ".staging-"


@dataclass
class Decision:
    """One promotion decision, as written to ``promotions.jsonl``."""

    decision: str  # "promoted" | "rejected"
    reason: str
    metric: str
    algorithm: str
    candidate_value: float
    served_value: float | None
    tolerance: float
    candidate: str
    served: str
    decided_at: str
    candidate_metrics: dict[str, Any] = field(default_factory=dict)
    served_metrics: dict[str, Any] | None = None
    kept_at: str | None = None  # where the candidate now lives (releases/<stamp>/ or rejected/<stamp>/)

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"


@dataclass
class Rollback:
    """One rollback (``current`` and ``previous`` swapped), as written to ``promotions.jsonl``."""

    decision: str  # "rolled-back"
    reason: str
    served: str
    decided_at: str
    restored: str  # the release now current
    replaced: str  # the release now previous (rolling back again restores it)
    restored_record: dict[str, Any] = field(default_factory=dict)  # its promotion.json
    replaced_record: dict[str, Any] = field(default_factory=dict)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _stamp(decided_at: str) -> str:
    return decided_at.replace(":", "").replace("-", "")


def metric_value(
    metrics: dict[str, Any], algorithm: str, metric: str, where: Path
) -> tuple[float, dict[str, Any]]:
    """``metric`` of ``algorithm`` (a model or a fuser) in a metrics.json, and its whole metric set."""
    for kind in ("models", "fusers"):
        scores = (metrics.get(kind) or {}).get(algorithm)
        if scores is not None:
            if metric not in scores:
                raise KeyError(
                    f"{where}: {algorithm} has no metric {metric!r} (it has {sorted(scores)[:8]}...); "
                    f"set promote.metric to one of them, or add the k to evaluate.ks"
                )
            return float(scores[metric]), dict(scores)
    known = sorted({*(metrics.get("models") or {}), *(metrics.get("fusers") or {})})
    raise KeyError(
        f"{where}: no metrics for {algorithm!r} (found {known}); set promote.algorithm (or "
        f"export.algorithm) to a trained model or fitted fuser"
    )


def _copy_run(src: Path, dest: Path) -> None:
    """The served parts of a run folder into ``dest`` (missing optional parts are skipped)."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in SERVED_PARTS:
        path = src / part
        if not path.exists():
            continue
        target = dest / part
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, target)
        else:
            shutil.copy2(path, target)


def _unique(folder: Path, name: str) -> str:
    """``name``, or ``name-1``, ``name-2``... when taken (two decisions in one second)."""
    unique, suffix = name, 1
    while os.path.lexists(folder / unique):
        unique, suffix = f"{name}-{suffix}", suffix + 1
    return unique


def _settle(build: Callable[[Path], object], folder: Path, name: str) -> Path:
    """Run ``build(staging)`` on a staging folder in ``folder``, then rename it to ``folder/name``.

    The final name only ever holds a complete copy; a failure removes the staging folder.
    """
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f"{STAGING_PREFIX}{name}-{os.getpid()}"
    remove(staging)
    try:
        build(staging)
        fsync_tree(staging)
        os.rename(staging, folder / name)
    except BaseException:
        remove(staging)
        raise
    fsync_dir(folder)
    return folder / name


def release_of(served_dir: str | Path, pointer: str = CURRENT) -> Path | None:
    """The folder ``served_dir/<pointer>`` (``current`` or ``previous``) names now, resolved; None if none.

    A reader that opens several files of the served model should open them under this path: it stays the
    same release even if a promotion moves ``current`` meanwhile.
    """
    path = Path(served_dir) / pointer
    return path.resolve() if path.is_dir() else None


def _link_text(path: Path) -> str | None:
    return os.readlink(path) if path.is_symlink() else None


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a file (no second copy of a large model); copy it where links are not possible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_tree(src: Path, dest: Path) -> None:
    shutil.copytree(src, dest, symlinks=True, copy_function=_link_or_copy)


def migrate_legacy(served_dir: str | Path) -> list[Path]:
    """Turn real ``current/`` and ``previous/`` folders (the older layout) into releases and pointers.

    Each folder's files are hard-linked into ``releases/<stamp>/`` (its promotion time, else
    ``legacy-<pointer>``), then a link to that release replaces the folder: atomically on Linux (see
    :func:`fuserec.atomic.replace_dir`), so ``current`` names a complete model throughout. Returns the new
    releases (none when there was nothing to migrate).
    """
    served_dir = Path(served_dir)
    releases = served_dir / RELEASES
    made: list[Path] = []
    for pointer in (CURRENT, PREVIOUS):
        folder = served_dir / pointer
        if folder.is_symlink() or not folder.is_dir():
            continue
        record = read_json(folder / RECORD_FILE) if (folder / RECORD_FILE).exists() else {}
        stamp = _stamp(record["promoted_at"]) if record.get("promoted_at") else f"legacy-{pointer}"
        name = _unique(releases, stamp)
        release = _settle(partial(_link_tree, folder), releases, name)
        link = served_dir / f".{pointer}-link-{os.getpid()}"
        remove(link)
        os.symlink(f"{RELEASES}/{name}", link)
        try:
            replace_dir(link, folder)  # the real folder's names go; its files live on in the release
        except BaseException:
            link.unlink(missing_ok=True)
            raise
        made.append(release)
    return made


def collect_garbage(served_dir: str | Path) -> list[Path]:
    """Delete releases that neither ``current`` nor ``previous`` names, and staging folders of dead runs.

    A release holding an event store (:data:`STATE_FILES`) is kept and reported instead. Returns what was
    deleted.
    """
    served_dir = Path(served_dir)
    releases = served_dir / RELEASES
    if not releases.is_dir():
        return []
    keep = {p for p in (release_of(served_dir, CURRENT), release_of(served_dir, PREVIOUS)) if p is not None}
    removed: list[Path] = []
    for entry in sorted(releases.iterdir()):
        if entry.name.startswith(STAGING_PREFIX):
            pid = entry.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not pid_alive(int(pid)):
                remove(entry)
                removed.append(entry)
            continue
        if entry.name.startswith(".") or entry.resolve() in keep:
            continue
        state = [name for name in STATE_FILES if (entry / name).exists()]
        if state:
            print(
                f"promote: kept {entry}, which neither current nor previous names, because it holds "
                f"{', '.join(state)} (a service's events); move that store out of the release (serve with "
                f"--store outside {releases}), then delete the folder"
            )
            continue
        remove(entry)
        removed.append(entry)
    return removed


def promote_candidate(
    candidate: str | Path,
    served_dir: str | Path,
    metric: str = "ndcg@10",
    algorithm: str = "stacking",
    tolerance: float = 0.005,
) -> Decision:
    """Compare, then make the candidate the ``current`` release (promoted) or keep it in ``rejected/<ts>/``.

    Promoted when there is nothing served, or ``candidate >= served - tolerance`` (higher is better). The
    decision is logged once it has taken effect.
    """
    candidate, served_dir = Path(candidate), Path(served_dir)
    for part in REQUIRED_PARTS:
        if not (candidate / part).exists():
            raise FileNotFoundError(
                f"candidate {candidate} has no {part}; run the pipeline first (fuserec run, or the "
                f"train-pipeline flow) so that evaluate and export have written it"
            )
    cand_value, cand_metrics = metric_value(
        read_json(candidate / "metrics.json"), algorithm, metric, candidate
    )
    current = served_dir / CURRENT
    served_now = release_of(served_dir)  # one release throughout, even if current moves meanwhile
    served_value: float | None = None
    served_metrics: dict[str, Any] | None = None
    if served_now is not None and (served_now / "metrics.json").exists():
        # the served side is scored as it was exported, even if export.algorithm changed since
        record = read_json(served_now / RECORD_FILE) if (served_now / RECORD_FILE).exists() else {}
        served_metrics_all = read_json(served_now / "metrics.json")
        served_value, served_metrics = metric_value(
            served_metrics_all, record.get("algorithm", algorithm), metric, current
        )
    decided_at = _now()
    stamp = _stamp(decided_at)
    if served_value is None:
        decision, reason = "promoted", "nothing served yet: the first candidate is always promoted"
    elif cand_value >= served_value - tolerance:
        decision = "promoted"
        reason = (
            f"{algorithm} {metric} {cand_value:.6f} >= served {served_value:.6f} - tolerance {tolerance} "
            f"(change {cand_value - served_value:+.6f})"
        )
    else:
        decision = "rejected"
        reason = (
            f"{algorithm} {metric} {cand_value:.6f} is worse than served {served_value:.6f} by "
            f"{served_value - cand_value:.6f} > tolerance {tolerance}; the served model is kept"
        )
    served_dir.mkdir(parents=True, exist_ok=True)
    if decision == "promoted":
        kept_at = _install(candidate, served_dir, stamp, algorithm, metric, cand_value, decided_at)
    else:
        rejected = served_dir / REJECTED
        kept_at = _settle(lambda staging: _copy_run(candidate, staging), rejected, _unique(rejected, stamp))
    result = Decision(
        decision=decision,
        reason=reason,
        metric=metric,
        algorithm=algorithm,
        candidate_value=cand_value,
        served_value=served_value,
        tolerance=tolerance,
        candidate=str(candidate),
        served=str(current),
        decided_at=decided_at,
        candidate_metrics=cand_metrics,
        served_metrics=served_metrics,
        kept_at=str(kept_at),
    )
    _log(served_dir, asdict(result))
    return result


def _install(
    candidate: Path,
    served_dir: Path,
    stamp: str,
    algorithm: str,
    metric: str,
    value: float,
    decided_at: str,
) -> Path:
    """Copy the candidate into a new release, point ``current`` at it and ``previous`` at the old one."""
    migrate_legacy(served_dir)
    releases = served_dir / RELEASES
    name = _unique(releases, stamp)

    def build(staging: Path) -> None:
        _copy_run(candidate, staging)
        write_json(
            staging / RECORD_FILE,
            {
                "algorithm": algorithm,
                "metric": metric,
                "value": value,
                "promoted_at": decided_at,
                "from": str(candidate.resolve()),
                "release": name,
            },
        )

    release = _settle(build, releases, name)
    current, previous = served_dir / CURRENT, served_dir / PREVIOUS
    old = _link_text(current)
    try:
        point_symlink(current, f"{RELEASES}/{name}")  # the commit point: one atomic rename
    except BaseException:
        remove(release)  # nothing names it: current still names the old, complete release
        raise
    if old is not None:
        point_symlink(previous, old)
    collect_garbage(served_dir)
    return release


def rollback(served_dir: str | Path) -> Rollback:
    """Serve the ``previous`` release again: swap the ``current`` and ``previous`` pointers; log it.

    The swap is one atomic exchange on Linux (two link renames elsewhere, ``current`` first; it always
    names a complete release). Rolling back twice restores the rolled-back release.
    """
    served_dir = Path(served_dir)
    migrate_legacy(served_dir)
    current, previous = served_dir / CURRENT, served_dir / PREVIOUS
    restored, replaced = release_of(served_dir, PREVIOUS), release_of(served_dir, CURRENT)
    if restored is None or replaced is None:
        raise FileNotFoundError(
            f"nothing to roll back to in {served_dir}: it needs both {CURRENT} and {PREVIOUS} "
            f"(a second promotion makes {PREVIOUS})"
        )
    if not exchange(current, previous):
        # no atomic exchange here: two renames, current first, so it names a complete release throughout
        was_current, was_previous = os.readlink(current), os.readlink(previous)
        point_symlink(current, was_previous)
        point_symlink(previous, was_current)
    fsync_dir(served_dir)

    def record(release: Path) -> dict[str, Any]:
        return read_json(release / RECORD_FILE) if (release / RECORD_FILE).exists() else {}

    result = Rollback(
        decision="rolled-back",
        reason=f"rollback: {restored.name} is served again in place of {replaced.name}",
        served=str(current),
        decided_at=_now(),
        restored=str(restored),
        replaced=str(replaced),
        restored_record=record(restored),
        replaced_record=record(replaced),
    )
    _log(served_dir, asdict(result))
    return result


def _log(served_dir: Path, entry: dict[str, Any]) -> None:
    with open(served_dir / LOG_FILE, "a") as log:
        log.write(json.dumps(entry, sort_keys=False) + "\n")
        log.flush()
        os.fsync(log.fileno())


def read_log(served_dir: str | Path) -> list[dict[str, Any]]:
    """Every decision so far (promotions, rejections, rollbacks), oldest first."""
    path = Path(served_dir) / LOG_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def promote(params: Params) -> dict[str, Any]:
    """The run in ``params.outputs`` against ``promote.served_dir``; returns the logged decision."""
    from fuserec.artifacts import chosen_algorithm  # loads torch: only when a decision is made

    cfg = params.promote
    layout = Layout(params.outputs_dir)
    decision = promote_candidate(
        layout.root,
        cfg.served_dir,
        cfg.metric,
        cfg.algorithm or chosen_algorithm(params, layout),  # auto: what the candidate run exported
        cfg.tolerance,
    )
    print(f"promote: {decision.decision} - {decision.reason}")
    return asdict(decision)
