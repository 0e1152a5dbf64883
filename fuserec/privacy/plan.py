"""What validate does to people's data under a set of params, resolved once: the key read, the plugins'
declarations gathered. Validate applies it; the stage cache keys on :meth:`PrivacyPlan.cache_fields`, so a
new key or a new set of kept attributes reruns validate even though no params value changed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from fuserec.privacy.erasure import erased_subjects, subject_hash
from fuserec.privacy.minimise import age_labels, kept_user_columns
from fuserec.privacy.pseudonyms import Pseudonymiser, load_key

if TYPE_CHECKING:
    from fuserec.config import Params


@dataclass(frozen=True)
class PrivacyPlan:
    """Pseudonymise user ids (when ``pseudonymiser`` is set), keep only ``user_columns`` of the users
    table (None: every column) and replace ages by the groups of ``age_buckets`` (None: exact ages)."""

    pseudonymiser: Pseudonymiser | None = None
    user_columns: frozenset[str] | None = None
    age_buckets: tuple[int, ...] | None = None
    erased: frozenset[str] = frozenset()  # the erasure register's keyed hashes
    erasure_key: bytes | None = None  # the key of those hashes (None when nobody was erased)

    @classmethod
    def from_params(cls, params: Params) -> PrivacyPlan:
        """The plan of ``params``: raises MissingKeyError when pseudonymisation is on without a key."""
        from fuserec.registry import resolve_names

        cfg = params.privacy
        keep = kept_user_columns(
            resolve_names(params.train.algorithms), cfg.cold_start_attributes, cfg.drop_user_columns
        )
        pseudonymiser = Pseudonymiser.from_params(params)
        erased = frozenset(erased_subjects(Path(cfg.erasures)))
        key = None
        if erased:  # raises MissingKeyError without the key: erased people must never come back
            key = pseudonymiser.key if pseudonymiser is not None else load_key(cfg)
        return cls(pseudonymiser, keep, tuple(cfg.age_buckets) if cfg.age_buckets else None, erased, key)

    def drop_erased(self, raw: pd.DataFrame) -> tuple[pd.DataFrame, int]:
        """``raw`` (a source table with a ``user_id`` column) without the rows of erased people, and how
        many rows went: they leave before any rule runs, so not even the rejects keep them."""
        if not self.erased or self.erasure_key is None or "user_id" not in raw.columns:
            return raw, 0
        key = self.erasure_key

        def gone(value: object) -> bool:
            try:
                return subject_hash(key, str(value)) in self.erased
            except ValueError:  # an empty id names nobody
                return False

        values = raw["user_id"].astype(str)
        hits = {v for v in values.unique() if gone(v)}
        if not hits:
            return raw, 0
        mask = values.isin(hits).to_numpy()
        return raw.loc[~mask].reset_index(drop=True), int(mask.sum())

    def record(self) -> dict[str, Any]:
        """The validation report's ``privacy`` entry: what was done, the key's fingerprint, never the key."""
        return {
            "pseudonymised": self.pseudonymiser is not None,
            "key_fingerprint": self.pseudonymiser.fingerprint if self.pseudonymiser else None,
            "user_columns_allowed": sorted(self.user_columns) if self.user_columns is not None else None,
            "age_groups": age_labels(self.age_buckets) if self.age_buckets else None,
        }

    def cache_fields(self) -> dict[str, Any]:
        """What besides params and files decides validate's outputs (for the Prefect cache key)."""
        record = self.record()
        fields = {f"privacy.{k}": record[k] for k in ("key_fingerprint", "user_columns_allowed")}
        fields["privacy.erased"] = sorted(self.erased)  # a new erasure reruns validate
        return fields
