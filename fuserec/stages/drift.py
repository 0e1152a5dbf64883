"""Drift check: the incoming interactions against the last training set, before a retrain.

A nightly retrain must not quietly learn from a broken export (an empty or truncated file, ids renumbered,
ratings on another scale), and a changed audience or catalogue is worth a warning even when the data is
sound. The check compares, with simple robust statistics that need no model:

* user activity and item popularity (interactions per user / per item): population stability index over
  the reference's quantile bins and the two-sample Kolmogorov-Smirnov statistic;
* which items are popular: total-variation distance between the two item-share distributions (catches a
  popularity shift that leaves the shape of the counts unchanged);
* the rating mix: total-variation distance between the rating value frequencies;
* the share of rows whose user / item id the reference never saw, and the volume ratio.

With pseudonymous user ids (``privacy.pseudonymise``) the incoming ids are mapped with the same key as
validate maps them, so they compare with the reference's; when the reference's validation report says it
was made with another key (or without one), its user ids cannot be compared and only their activity is.

Moderate drift logs a warning; a broken feed raises :class:`BrokenFeedError` naming the file, the
statistic, its value, the threshold and the way out. Thresholds live in ``params.yaml`` under ``drift:``.
The result goes to ``<outputs>/drift_report.json``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fuserec.config import DriftConfig, Params
from fuserec.layout import DRIFT_REPORT_FILE
from fuserec.manifest import read_json, write_json
from fuserec.privacy.pseudonyms import KeyMismatchError, Pseudonymiser, check_key

SERVED_REFERENCE = Path("current") / "validated" / "interactions.parquet"
EPS = 1e-6  # keeps PSI finite when a bin is empty on one side
VALID_ID = r"[0-9]{1,18}"  # validate's id rule (ASCII digits, fits int64)
INVALID_ID = "<invalid id>"  # what an id validate would reject is compared as (it is unknown anyway)
log = logging.getLogger(__name__)


class BrokenFeedError(ValueError):
    """The incoming interactions cannot be trained on; the retrain stops before touching anything."""


@dataclass(frozen=True)
class Interactions:
    """Interactions reduced to what the check compares: string ids and numeric ratings (NaN = none)."""

    user_id: np.ndarray
    item_id: np.ndarray
    rating: np.ndarray
    source: str

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, source: str) -> Interactions:
        """Raw loaders hand strings, validated parquet hands numbers: compare both as stripped text."""
        ids = {col: frame[col].astype(str).str.strip().to_numpy() for col in ("user_id", "item_id")}
        if "rating" in frame:
            rating = pd.to_numeric(frame["rating"], errors="coerce").to_numpy(dtype=float)
        else:
            rating = np.full(len(frame), np.nan)
        return cls(ids["user_id"], ids["item_id"], rating, source)

    def __len__(self) -> int:
        return len(self.user_id)


def read_interactions(path: str | Path) -> Interactions:
    """An interactions table (.parquet or .csv with ``user_id``, ``item_id`` and optionally ``rating``)."""
    path = Path(path)
    frame = pd.read_csv(path, dtype=str) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    missing = {"user_id", "item_id"} - set(frame.columns)
    if missing:
        raise BrokenFeedError(
            f"{path}: columns {sorted(missing)} are missing (found {list(frame.columns)}); map them with "
            f"data.columns in params.yaml"
        )
    return Interactions.from_frame(frame, str(path))


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``current`` against ``reference`` over the reference's quantile bins.

    Rules of thumb: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 large shift.
    """
    if len(reference) == 0 or len(current) == 0:
        return float("inf")
    edges = np.unique(np.quantile(reference, np.linspace(0.0, 1.0, bins + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    if len(edges) < 2:
        edges = np.array([-np.inf, np.inf])
    ref = np.histogram(reference, edges)[0] / len(reference) + EPS
    cur = np.histogram(current, edges)[0] / len(current) + EPS
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def ks_statistic(reference: np.ndarray, current: np.ndarray) -> float:
    """Largest gap between the two empirical CDFs (0 = same distribution, 1 = disjoint)."""
    from scipy.stats import ks_2samp

    if len(reference) == 0 or len(current) == 0:
        return 1.0
    return float(ks_2samp(reference, current).statistic)


def tv_distance(reference: pd.Series, current: pd.Series) -> float:
    """Total-variation distance between two categorical distributions given as counts (0..1)."""
    ref, cur = reference / max(reference.sum(), 1), current / max(current.sum(), 1)
    both = pd.concat([ref, cur], axis=1).fillna(0.0)
    return float(0.5 * np.abs(both.iloc[:, 0] - both.iloc[:, 1]).sum())


def _counts(ids: np.ndarray) -> pd.Series:
    return pd.Series(ids).value_counts()


def _bad_ratings(data: Interactions, rating_min: float, rating_max: float) -> float:
    """Share of ratings missing or outside the range; 0 for a feed without any rating (implicit)."""
    r = data.rating
    if len(r) == 0 or np.isnan(r).all():
        return 0.0
    bad = np.isnan(r) | (r < rating_min) | (r > rating_max)
    return float(bad.mean())


def compare(
    new: Interactions,
    reference: Interactions | None,
    cfg: DriftConfig,
    rating_range: tuple[float, float] = (0.5, 5.0),
    users_incomparable: str | None = None,
) -> dict[str, Any]:
    """Every statistic, which ones warn, which ones fail. Pure: raising is :func:`check_drift`'s job.

    ``users_incomparable``: why the two sides' user ids cannot be compared (another pseudonym key), in
    which case the share of unknown users is not computed; None compares them.
    """
    report: dict[str, Any] = {
        "new": {"source": new.source, "rows": len(new)},
        "reference": None if reference is None else {"source": reference.source, "rows": len(reference)},
        "statistics": {},
        "warnings": [],
        "failures": [],
    }
    stats: dict[str, float] = report["statistics"]
    warnings: list[dict[str, Any]] = report["warnings"]
    failures: list[dict[str, Any]] = report["failures"]

    def flag(
        into: list[dict[str, Any]], name: str, value: float, threshold: float, key: str, why: str
    ) -> None:
        into.append({"statistic": name, "value": value, "threshold": threshold, "param": key, "why": why})

    if len(new) == 0:
        flag(failures, "rows", 0, 1, "-", "the file has no interactions")
        report["status"] = "broken"
        return report
    stats["bad_rating_share"] = _bad_ratings(new, *rating_range)
    if stats["bad_rating_share"] > cfg.max_bad_rating_share:
        flag(
            failures,
            "bad_rating_share",
            stats["bad_rating_share"],
            cfg.max_bad_rating_share,
            "drift.max_bad_rating_share",
            f"ratings missing or outside validate.rating_min..max = {rating_range[0]}..{rating_range[1]}",
        )
    if reference is not None and len(reference) > 0:
        stats["volume_ratio"] = len(new) / len(reference)
        if stats["volume_ratio"] < cfg.min_volume_ratio:
            flag(
                failures,
                "volume_ratio",
                stats["volume_ratio"],
                cfg.min_volume_ratio,
                "drift.min_volume_ratio",
                "far fewer rows than the last training set: a truncated or partial export?",
            )
        id_checks = [
            ("users", new.user_id, reference.user_id, cfg.unknown_users_warn, cfg.unknown_users_fail),
            ("items", new.item_id, reference.item_id, cfg.unknown_items_warn, cfg.unknown_items_fail),
        ]
        if users_incomparable is not None:
            report["notes"] = [f"unknown_users_share not computed: {users_incomparable}"]
            id_checks = id_checks[1:]
        for kind, new_ids, ref_ids, warn, fail in id_checks:
            share = float((~np.isin(new_ids, np.unique(ref_ids))).mean())
            stats[f"unknown_{kind}_share"] = share
            key = f"drift.unknown_{kind}_fail"
            if share > fail:
                flag(failures, f"unknown_{kind}_share", share, fail, key, f"{kind} ids renumbered?")
            elif share > warn:
                flag(warnings, f"unknown_{kind}_share", share, warn, f"drift.unknown_{kind}_warn", "new ids")
        for kind, new_ids, ref_ids in (
            ("user_activity", new.user_id, reference.user_id),
            ("item_popularity", new.item_id, reference.item_id),
        ):
            new_counts, ref_counts = _counts(new_ids), _counts(ref_ids)
            log_new, log_ref = np.log1p(new_counts.to_numpy()), np.log1p(ref_counts.to_numpy())
            stats[f"{kind}_psi"] = psi(log_ref, log_new, cfg.bins)
            stats[f"{kind}_ks"] = ks_statistic(log_ref, log_new)
            if stats[f"{kind}_psi"] > cfg.psi_warn:
                flag(warnings, f"{kind}_psi", stats[f"{kind}_psi"], cfg.psi_warn, "drift.psi_warn", "shape")
            if stats[f"{kind}_ks"] > cfg.ks_warn:
                flag(warnings, f"{kind}_ks", stats[f"{kind}_ks"], cfg.ks_warn, "drift.ks_warn", "shape")
            if kind == "item_popularity":
                stats["item_popularity_tv"] = tv_distance(ref_counts, new_counts)
                if stats["item_popularity_tv"] > cfg.popularity_tv_warn:
                    flag(
                        warnings,
                        "item_popularity_tv",
                        stats["item_popularity_tv"],
                        cfg.popularity_tv_warn,
                        "drift.popularity_tv_warn",
                        "different items are popular",
                    )
        ref_r, new_r = reference.rating[~np.isnan(reference.rating)], new.rating[~np.isnan(new.rating)]
        if len(ref_r) and len(new_r):
            mix = tv_distance(_counts(np.round(ref_r * 2) / 2), _counts(np.round(new_r * 2) / 2))
            stats["rating_mix_tv"] = mix
            if mix > cfg.rating_tv_warn:
                flag(warnings, "rating_mix_tv", mix, cfg.rating_tv_warn, "drift.rating_tv_warn", "rating mix")
    report["status"] = "broken" if failures else "drift" if warnings else "ok"
    return report


def check_drift(
    new: Interactions,
    reference: Interactions | None,
    cfg: DriftConfig,
    out: Path | None = None,
    rating_range: tuple[float, float] = (0.5, 5.0),
    users_incomparable: str | None = None,
) -> dict[str, Any]:
    """:func:`compare`, its report written to ``out``, a warning per drifted statistic; raises if broken."""
    report = {"checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())} | compare(
        new, reference, cfg, rating_range, users_incomparable
    )
    if out is not None:
        write_json(out, report)
    for w in report["warnings"]:
        log.warning(
            "drift in %s: %s = %.4f > %s = %s (%s)",
            new.source,
            w["statistic"],
            w["value"],
            w["param"],
            w["threshold"],
            w["why"],
        )
    if report["failures"]:
        lines = [
            f"  {f['statistic']} = {f['value']:.4g} (threshold {f['param']} = {f['threshold']}): {f['why']}"
            for f in report["failures"]
        ]
        against = f" against {reference.source}" if reference is not None else ""
        raise BrokenFeedError(
            f"incoming interactions {new.source}{against} look broken; the retrain stopped before "
            f"training:\n"
            + "\n".join(lines)
            + f"\nReport: {out}. Fix the export, or if the change is real, raise the threshold in "
            f"params.yaml (or --set drift.KEY=VALUE for one run; --set drift.enabled=false skips the check)."
        )
    return report


def reference_path(params: Params) -> Path | None:
    """The set the served model was trained on, else the last run's validated interactions, else None."""
    if params.drift.reference:
        return Path(params.drift.reference)
    for candidate in (
        Path(params.promote.served_dir) / SERVED_REFERENCE,
        params.outputs_dir / "validated" / "interactions.parquet",
    ):
        if candidate.exists():
            return candidate.resolve()  # the release itself: served/current moves at the next promotion
    return None


def pseudonymous_ids(user_ids: np.ndarray, pseudonymiser: Pseudonymiser) -> np.ndarray:
    """Raw user ids (stripped text) as validate stores them: the pseudonym's text, or :data:`INVALID_ID`
    for an id validate would reject (so no raw id reaches the report or the comparison)."""
    text = pd.Series(user_ids, dtype=object).astype(str)
    valid = text.str.fullmatch(VALID_ID).to_numpy(dtype=bool)
    out = np.full(len(text), INVALID_ID, dtype=object)
    if valid.any():
        out[valid] = pseudonymiser.users(text[valid].to_numpy()).astype(str)
    return out


def _key_difference(pseudonymiser: Pseudonymiser | None, reference: Path) -> str | None:
    """Why ``reference``'s user ids cannot be compared with ids mapped by ``pseudonymiser``, or None.

    Only a reference inside a run (``<run>/validated/...``, whose ``validation_report.json`` records how
    its ids were made) can be checked; a file of your own is taken to hold ids as this run stores them.
    """
    report = reference.parent.parent / "validation_report.json"
    if reference.parent.name != "validated" or not report.is_file():
        return None
    try:
        check_key(pseudonymiser, read_json(report).get("privacy"), str(reference))
    except KeyMismatchError as exc:
        return str(exc)
    return None


def drift(params: Params) -> dict[str, Any]:
    """Load ``data.source`` as the validate stage would and check it against the reference."""
    from fuserec.data.sources import load_source

    out = params.outputs_dir / DRIFT_REPORT_FILE
    if not params.drift.enabled:
        report = {"status": "skipped", "why": "drift.enabled is false"}
        write_json(out, report)
        return report
    pseudonymiser = Pseudonymiser.from_params(params)  # a missing key fails before the data is read
    raw = load_source(params.data)
    source = raw.files.get("interactions") or params.data.source
    new = Interactions.from_frame(raw.interactions, str(source))
    if pseudonymiser is not None:
        new = replace(new, user_id=pseudonymous_ids(new.user_id, pseudonymiser))
    ref_path = reference_path(params)
    if params.drift.reference and ref_path is not None and not ref_path.exists():
        raise FileNotFoundError(
            f"drift.reference = {ref_path} does not exist; point it at an interactions parquet/csv "
            f"or set it to null to use the served model's training set"
        )
    reference = read_interactions(ref_path) if ref_path is not None else None
    rating_range = (params.validate_.rating_min, params.validate_.rating_max)
    other_key = _key_difference(pseudonymiser, ref_path) if ref_path is not None else None
    return check_drift(new, reference, params.drift, out, rating_range, other_key)
