"""The service's side of privacy: ids a client sends become stored ids, and a person can be erased or
shown everything held about them.

A client knows people by their own ids; the event store, the model's tables and everything the pipeline
wrote hold pseudonyms when ``privacy.pseudonymise`` is on. :class:`UserPrivacy` maps one to the other at
the edge of the service (the same keyed hash validation applies), so no handler below it ever sees a raw
id, and answers ``DELETE /users/{id}`` and ``GET /admin/users/{id}`` with the same functions as
``fuserec forget`` and ``fuserec export-user`` (:mod:`fuserec.privacy.erasure`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException

from fuserec.config import Params
from fuserec.privacy.erasure import Places, erase, rows_about, subjects_for
from fuserec.privacy.pseudonyms import MissingKeyError, Pseudonymiser, load_key
from fuserec.serving.service import RecommendIn, Service


def read_privacy_record(root: Path) -> dict[str, Any] | None:
    """The ``privacy`` entry of the validation report of the run served from ``root`` (a run folder or a
    served release), None when there is none (a run made before ids were pseudonymised)."""
    path = root / "validation_report.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8")).get("privacy")
    return record if isinstance(record, dict) else None


@dataclass(frozen=True)
class UserPrivacy:
    """The key (for the register's hashes), the pseudonym function (None: ids are stored as sent) and
    where this project keeps user data."""

    key: bytes
    pseudonym: Callable[[str], int] | None
    places: Places

    @classmethod
    def from_params(
        cls, params: Params, also: Iterable[Path] = (), store: Path | None = None
    ) -> UserPrivacy | None:
        """The project's privacy settings: its key, pseudonyms when on, and every place it keeps data
        (the outputs tree, the served releases, the stage cache, ``also``; ``store`` when no running
        service holds it). None when there is no key and ids are not pseudonymised.

        Raises ``MissingKeyError`` when pseudonymisation is on and the key is missing.
        """
        pseudonymiser = Pseudonymiser.from_params(params)
        try:
            key = pseudonymiser.key if pseudonymiser is not None else load_key(params.privacy)
        except MissingKeyError:
            return None
        outputs = Path(params.outputs_dir)
        places = Places(
            tables=[outputs, Path(params.promote.served_dir), *also],
            stores=[store] if store is not None else [],
            caches=[params.cache_dir],
            register=Path(params.privacy.erasures),
        )
        return cls(key, pseudonymiser.user if pseudonymiser is not None else None, places)

    def stored(self, raw: str) -> str:
        """The id the store and the model know a client's id by."""
        return raw if self.pseudonym is None else str(self.pseudonym(_named(raw).strip()))

    def forget(self, raw_ids: list[str], service: Service | None, where: str) -> dict[str, Any]:
        """Erase the people everywhere this project keeps data, the running service's store included."""
        subjects = subjects_for([_named(r) for r in raw_ids], self.key, self.pseudonym)
        report = erase(subjects, self.places, where=where, live=service.store if service else None)
        if service is not None:  # what the running model holds in memory goes too, not at the next reload
            stored = [s.stored for s in subjects]
            service.attributes.forget(stored)
            cold = getattr(service, "cold", None)  # a rating-task service has no cold-start rules
            if cold is not None:
                for user_id in stored:
                    cold.user_attributes.pop(user_id, None)
        return {"forgotten": len(subjects), **report.as_dict()}

    def export(self, raw: str, service: Service) -> dict[str, Any]:
        """Everything held about one person, as one JSON document: what the store holds, every table row
        (attributes, rejected lines, batch outputs), and the current recommendations with the top one's
        explanation."""
        stored = self.stored(raw)
        events = service.store.events(stored, service.settings.history_cap)
        recommended: dict[str, Any] | None = None
        explanation = None
        if hasattr(service, "recommend"):  # a rating-task service recommends nothing
            recommended = service.recommend(RecommendIn(user_id=stored))
            top = recommended["items"][0]["item_id"] if recommended.get("items") else None
            explanation = service.explain(stored, top) if top is not None else None
        for document in (recommended, explanation):
            if document is not None:
                document["user_id"] = raw
        return {
            "user_id": raw,
            "pseudonymised": self.pseudonym is not None,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "events": [
                {"item_id": e.item_id, "timestamp": e.timestamp, "kind": e.kind, "rating": e.rating}
                for e in events
            ],
            "tables": rows_about(self.places.tables, {stored}),
            "recommendations": recommended,
            "explanation_of_first": explanation,
        }


def _named(raw: str) -> str:
    """``raw`` if it names someone; a 422 for an id of spaces only, which no pseudonym can stand for
    (the pseudonymiser strips ids, so it would be the empty id)."""
    if not raw.strip():
        raise HTTPException(
            status_code=422, detail="a user id needs at least one character that is not a space"
        )
    return raw
