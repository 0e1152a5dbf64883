"""Promote: a retrained candidate replaces the served model only if it is not worse.

A retrain writes a *candidate*: the run's ``outputs/`` (``metrics.json``, ``model/`` and the data the
served model reads). The *served* model lives apart, in ``promote.served_dir``::

    served/
      current/               what batch jobs and `fuserec serve --outputs served/current` use
      previous/              the model current replaced (one step of rollback: swap the folders)
      rejected/<timestamp>/  candidates that lost, kept for inspection
      promotions.jsonl       one JSON line per decision: both metric sets, tolerance, decision, reason

The decision compares ``promote.metric`` (default ``ndcg@10``) of ``promote.algorithm`` (default: the
exported one). ``metrics.json`` holds test-split metrics only (the validation carve is consumed by the
fusers and tuning; no validation score of the exported model is written), so each side's value is its own
run's held-out score under the same protocol. When the data grows between retrains the two test sets
differ; ``promote.tolerance`` absorbs that noise, and the log keeps both metric sets so a reviewer can see
it. Nothing served yet: the first candidate is always promoted.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fuserec.config import Params
from fuserec.layout import Layout
from fuserec.manifest import read_json, write_json

CURRENT, PREVIOUS, REJECTED = "current", "previous", "rejected"
LOG_FILE = "promotions.jsonl"
RECORD_FILE = "promotion.json"  # inside current/: what was promoted, from where, with which value
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
    kept_at: str | None = None  # where the candidate now lives (current/ or rejected/<ts>/)

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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


def promote_candidate(
    candidate: str | Path,
    served_dir: str | Path,
    metric: str = "ndcg@10",
    algorithm: str = "stacking",
    tolerance: float = 0.005,
) -> Decision:
    """Compare, then move the candidate into ``current/`` (promoted) or ``rejected/<ts>/``; log the decision.

    Promoted when there is nothing served, or ``candidate >= served - tolerance`` (higher is better).
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
    served_value: float | None = None
    served_metrics: dict[str, Any] | None = None
    if (current / "metrics.json").exists():
        # the served side is scored as it was exported, even if export.algorithm changed since
        record = read_json(current / RECORD_FILE) if (current / RECORD_FILE).exists() else {}
        served_metrics_all = read_json(current / "metrics.json")
        served_value, served_metrics = metric_value(
            served_metrics_all, record.get("algorithm", algorithm), metric, current
        )
    decided_at = _now()
    stamp = decided_at.replace(":", "").replace("-", "")
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
        staging = served_dir / f".staging-{stamp}"
        shutil.rmtree(staging, ignore_errors=True)
        _copy_run(candidate, staging)
        write_json(
            staging / RECORD_FILE,
            {
                "algorithm": algorithm,
                "metric": metric,
                "value": cand_value,
                "promoted_at": decided_at,
                "from": str(candidate.resolve()),
            },
        )
        previous = served_dir / PREVIOUS
        if current.exists():
            shutil.rmtree(previous, ignore_errors=True)
            current.rename(previous)
        staging.rename(current)
        kept_at = current
    else:
        kept_at = served_dir / REJECTED / stamp
        suffix = 1
        while kept_at.exists():  # two decisions in one second
            kept_at, suffix = served_dir / REJECTED / f"{stamp}-{suffix}", suffix + 1
        _copy_run(candidate, kept_at)
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
    with open(served_dir / LOG_FILE, "a") as log:
        log.write(json.dumps(asdict(result), sort_keys=False) + "\n")
    return result


def read_log(served_dir: str | Path) -> list[dict[str, Any]]:
    """Every decision so far, oldest first."""
    path = Path(served_dir) / LOG_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def promote(params: Params) -> dict[str, Any]:
    """The run in ``params.outputs`` against ``promote.served_dir``; returns the logged decision."""
    cfg = params.promote
    decision = promote_candidate(
        Layout(params.outputs_dir).root,
        cfg.served_dir,
        cfg.metric,
        cfg.algorithm or params.export.algorithm,
        cfg.tolerance,
    )
    print(f"promote: {decision.decision} - {decision.reason}")
    return asdict(decision)
