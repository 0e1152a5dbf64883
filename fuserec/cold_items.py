"""Items without interactions: a content side scorer, calibrated onto the served model's ranked lists.

The exported graph learns nothing about an item nobody has interacted with, and knows nothing at all about
an item added to the service after the export. Both are scored here, beside the graph, from their content
only, so they can be listed without retraining:

1. **Embedding.** An item's metadata (title, genres, tags, free text, year) becomes a TF-IDF vector in the
   ``content`` plugin's own fitted vocabulary and idf (:class:`~fuserec.features.TfidfVocabulary`; the
   catalogue's vocabulary with the default settings when ``content`` was not trained). Catalogue items and
   items added later live in one space.
2. **Side score.** A history is profiled as the content plugin profiles it (recency-weighted sum of its
   items' vectors, half-life in positions, unit norm); an item's side score is its cosine with the profile.
   Added items a user interacted with are part of that history (the graph never sees them). A user's
   candidates are their :data:`DEPTH` unseen items without training interactions most similar by cosine.
3. **Calibration, fitted on validation at export** (train' histories, the validation split as truth; test
   is never read), as two hit probabilities:

   - a candidate's, ``P(hit | cosine, user, item)``: a logistic regression on the cosine, the user's
     history length and mean log popularity of its items (whether they reach for obscure items), and the
     item's content (its vector's first :data:`ITEM_DIMS` singular directions) and exposure (log1p of the
     events the item has had: low ratings and dislikes of a catalogue item in the training period, every
     stored event of an added item), with the item terms' ridge penalty chosen by two-fold cross-validation
     over users: *which* items nobody has interacted with positively still get watched;
   - each slot ``r`` of the served list's, ``P(hit | r, user)``: a logistic regression on ``log r`` and the
     same user features, measured on the served scorer bound to its fits on train'.

   A candidate goes into the user's served list in front of the first slot whose hit probability is at
   most ``weight * P(hit | candidate)``, with a score between its two neighbours' served scores: the
   calibrated score is on the served model's scale, per user, and the merge is a plain sort by score.
4. **Exploration weight.** On MovieLens-100k an item without interactions is hit tens of times less often
   than the tenth slot of the served list, so an unweighted comparison would list none, and an item that
   is never shown never gets the interactions that make it known. ``weight`` is the largest on a grid
   (factors of 2^(1/4)) whose validation NDCG@k loss, against the served list alone, stays within
   ``export.new_items_budget``, searched upwards and stopping at the first weight that exceeds it. A budget
   of 0 turns promotion off: added items are then placed after the served list's top :data:`DEPTH`.

Candidates are items without training interactions only: catalogue items whose training count is 0
(``cold``) and items added to the service later. A catalogue candidate's merged score is
``max(graph score, calibrated)``; an added item has no graph score. The export stage saves what this needs
(:data:`COLD_ITEMS_FILE`, listed in the manifest under ``cold_items``); the service and the evaluate stage
load it and merge alike, so the ``served`` row of ``metrics.json`` measures what ``/recommend`` lists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from fuserec.api import Algorithm
from fuserec.artifacts import load_algorithm, load_fuser, scorer_folder
from fuserec.config import Params
from fuserec.data.dataset import Dataset, interactions_matrix
from fuserec.explain_states import components_of
from fuserec.features import (
    DEFAULTS,
    ContentFeatures,
    ContentSettings,
    TfidfVocabulary,
    transform_tfidf,
    unit_rows,
)
from fuserec.fusion import Fuser
from fuserec.histories import Histories
from fuserec.layout import RATINGS_FILE, Layout
from fuserec.manifest import file_sha256
from fuserec.metrics import ndcg_at_k, top_k

COLD_ITEMS_FILE = "cold_items.npz"  # inside the exported model folder
DEPTH = 100  # slots of a served list the calibration covers (the API's largest k), and candidates per user
WEIGHTS = tuple(2.0 ** (p / 4) for p in range(81))  # exploration weights tried, smallest first
LAMBDAS = (0.1, 1.0, 10.0, 100.0)  # ridge penalties of the item terms, chosen by cross-validation
ITEM_DIMS = 32  # singular directions of the item vectors the candidate model reads
MAX_FIT_USERS = 3000  # validation users the calibration reads at most (a seeded sample beyond)
MIN_FIT_HITS = 3  # fewer validation hits on candidates than this: no calibration, promotion is off
FIT_SEED = 0
FIT_BATCH = 512
DEFAULT_HALF_LIFE = 3.0  # the content plugin's default, for exports without a fitted content model
N_USER = 2  # user features: log1p(history length), mean log1p(training count) of the history's items
_SETTINGS = tuple(f.name for f in fields(ContentFeatures))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


@dataclass(frozen=True)
class Calibration:
    """The candidate model ``cold`` (intercept, cosine, the two user features, item terms), the slot model
    ``slots`` (intercept, log slot, the two user features) and the exploration ``weight`` (0: off)."""

    cold: np.ndarray = field(default_factory=lambda: np.zeros(2 + N_USER))
    slots: np.ndarray = field(default_factory=lambda: np.zeros(2 + N_USER))
    weight: float = 0.0

    @property
    def active(self) -> bool:
        """Promotion is on: a weight, and models that say what they should (similar items hit more, a
        lower slot hits less)."""
        return self.weight > 0 and float(self.cold[1]) > 0 and float(self.slots[1]) < 0

    def exploration(self, cosines: np.ndarray, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """``weight * P(hit)`` of each candidate where its cosine is positive, else 0 (no evidence).

        ``cosines [B, C]``, ``users [B, N_USER]``, ``items [B, C, k]`` (item features of each candidate).
        """
        cosines = np.asarray(cosines, dtype=np.float64)
        if not self.active:
            return np.zeros(cosines.shape)
        c = self.cold
        z = c[0] + c[1] * cosines + (np.asarray(users) @ c[2 : 2 + N_USER])[:, None]
        if items.shape[-1] and len(c) > 2 + N_USER:
            z = z + np.asarray(items, dtype=np.float64) @ c[2 + N_USER :]
        return np.where(cosines > 0, self.weight * _sigmoid(z), 0.0)

    def slot_hits(self, users: np.ndarray, depth: int) -> np.ndarray:
        """``[B, depth]``: each slot's hit probability for each user (``inf``: promotion is off)."""
        users = np.asarray(users, dtype=np.float64)
        if not self.active:
            return np.full((len(users), depth), np.inf)
        s = self.slots
        z = s[0] + s[1] * np.log(np.arange(1, depth + 1))[None, :] + (users @ s[2 : 2 + N_USER])[:, None]
        return _sigmoid(z)


def placed_scores(exploration: np.ndarray, top: np.ndarray, slot_hits: np.ndarray) -> np.ndarray:
    """``float64 [B, C]``: where each candidate lands in its user's served list, as a served score.

    ``top``: each user's served scores of the unseen items, best first (``[B, D]``, ``-inf`` past the last
    unseen item); ``slot_hits``: each slot's hit probability, non-increasing (``[D]`` or ``[B, D]``). A
    candidate with exploration ``e > 0`` goes in front of the first slot whose hit probability is at most
    ``e`` and takes a score between its neighbours', higher for a larger ``e`` inside the gap, so both the
    order of candidates and their place among the served items follow ``e``. ``e = 0``, or a slot past
    the list: just below the list's last item.
    """
    e = np.asarray(exploration, dtype=np.float64)
    top = np.asarray(top, dtype=np.float64)
    b, depth = top.shape
    if b == 0 or e.shape[1] == 0:
        return np.zeros(e.shape)
    hits = np.broadcast_to(np.asarray(slot_hits, dtype=np.float64), (b, np.shape(slot_hits)[-1]))
    if hits.shape[1] < depth:
        hits = np.concatenate([hits, np.full((b, depth - hits.shape[1]), np.inf)], axis=1)
    hits = hits[:, :depth]
    m = np.isfinite(top).sum(axis=1)  # served (unseen) items per row
    rows = np.arange(b)
    first = np.where(m > 0, top[:, 0], 0.0)
    last = np.where(m > 0, top[rows, np.maximum(m - 1, 0)], 0.0)
    unit = np.maximum((first - last) / np.maximum(m - 1, 1), 1e-6 * np.maximum(1.0, np.abs(first)))
    slot = (hits[:, None, :] > e[:, :, None]).sum(axis=2)  # slots that hit more often than the candidate
    slot = np.where(e > 0, np.minimum(slot, m[:, None]), m[:, None])
    before = np.take_along_axis(top, np.maximum(slot - 1, 0), axis=1)
    after = np.take_along_axis(top, np.minimum(slot, depth - 1), axis=1)
    upper = np.where(slot > 0, before, first[:, None] + unit[:, None])
    lower = np.where(slot < m[:, None], after, last[:, None] - unit[:, None])
    hi_p = np.where(slot > 0, np.take_along_axis(hits, np.maximum(slot - 1, 0), axis=1), np.inf)
    lo_p = np.where(slot < depth, np.take_along_axis(hits, np.minimum(slot, depth - 1), axis=1), 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inside = (e - lo_p) / (hi_p - lo_p)
        ahead = 1.0 - hits[:, :1] / e  # in front of the first slot: how far e is above its probability
    frac = np.where(slot == 0, ahead, inside)
    frac = np.clip(np.nan_to_num(frac, nan=0.5, posinf=1.0, neginf=0.0), 0.0, 1.0)
    out = lower + (upper - lower) * (0.05 + 0.9 * frac)
    return np.where(m[:, None] > 0, out, 0.0)


def served_top(scores: np.ndarray, seen: np.ndarray, depth: int = DEPTH) -> np.ndarray:
    """``float64 [B, min(depth, n)]``: each row's best served scores of unseen items, best first (``-inf``
    past them). ``seen``: bool ``[B, >= n]``."""
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[1]
    masked = np.where(np.asarray(seen)[:, :n], -np.inf, scores)
    d = min(depth, n)
    if d == 0:
        return np.zeros((len(scores), 0))
    part = -np.partition(-masked, d - 1, axis=1)[:, :d] if d < n else masked
    return -np.sort(-part, axis=1)


def _dense(seen: np.ndarray | sp.spmatrix) -> np.ndarray:
    if isinstance(seen, np.ndarray):
        return seen.astype(bool, copy=False)
    return np.asarray(sp.csr_matrix(seen).toarray(), dtype=bool)


@dataclass(frozen=True)
class ColdItems:
    """The side scorer: the content vocabulary and the catalogue's vectors, each catalogue item's training
    count (``cold``: 0), the item-feature basis, the profiles' recency half-life, and the calibration."""

    vocabulary: TfidfVocabulary
    popularity: np.ndarray  # float [n_items]: training interactions per catalogue item
    basis: np.ndarray  # float32 [k, d]: the item vectors' top singular directions (item features)
    exposure: np.ndarray  # float [n_items]: events per catalogue item in the training period, any kind
    half_life: float | None = DEFAULT_HALF_LIFE
    calibration: Calibration = field(default_factory=Calibration)

    @property
    def vectors(self) -> np.ndarray:
        return self.vocabulary.item_vectors

    @property
    def cold(self) -> np.ndarray:
        return np.asarray(self.popularity) == 0

    @cached_property
    def cold_index(self) -> np.ndarray:
        return np.flatnonzero(self.cold)

    @cached_property
    def cold_features(self) -> np.ndarray:
        """:meth:`item_features` of the catalogue's cold items (computed once: every request reads them)."""
        return self.item_features(self.vectors[self.cold_index], self.exposure[self.cold_index])

    # -- building ---------------------------------------------------------------------------------------
    @classmethod
    def from_catalog(
        cls,
        items: pd.DataFrame,
        popularity: np.ndarray,
        exposure: np.ndarray | None = None,
        settings: ContentSettings = DEFAULTS,
        half_life: float | None = DEFAULT_HALF_LIFE,
        fitted: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> ColdItems:
        """From the catalogue, each item's training count and events (``exposure``; default: its count);
        ``fitted``: the content model's (vocab, term fields, idf), else a vocabulary fitted on ``items``
        with ``settings``."""
        settings = ContentFeatures(**{k: getattr(settings, k) for k in _SETTINGS})
        if fitted is None:
            vocabulary = TfidfVocabulary.fit(items, settings)
        else:
            vocab, term_fields = np.asarray(fitted[0], dtype=str), np.asarray(fitted[1]).astype(np.int8)
            idf = np.asarray(fitted[2], dtype=np.float32)
            vectors = transform_tfidf(items, vocab, term_fields, idf, settings)
            vocabulary = TfidfVocabulary(vocab, term_fields, idf, vectors, settings)
        basis = item_basis(vocabulary.item_vectors)
        popularity = np.asarray(popularity, dtype=np.float64)
        exposure = popularity if exposure is None else np.asarray(exposure, dtype=np.float64)
        return cls(vocabulary, popularity, basis, exposure, half_life)

    def with_calibration(self, calibration: Calibration) -> ColdItems:
        return ColdItems(
            self.vocabulary, self.popularity, self.basis, self.exposure, self.half_life, calibration
        )

    # -- features ---------------------------------------------------------------------------------------
    def embed(self, items: pd.DataFrame) -> np.ndarray:
        """Unit vectors of item rows (columns of the items table) in the fitted vocabulary."""
        return self.vocabulary.embed(items)

    def item_features(self, vectors: np.ndarray, exposure: np.ndarray) -> np.ndarray:
        """``[m, k + 1]``: the vectors on the basis' directions, and log1p(exposure)."""
        projected = np.asarray(vectors, dtype=np.float64) @ self.basis.T.astype(np.float64)
        return np.column_stack([projected, np.log1p(np.asarray(exposure, dtype=np.float64))])

    def profiles(self, histories: Histories, extra: np.ndarray | None = None) -> np.ndarray:
        """Unit-norm recency-weighted profiles; ``histories`` index the catalogue, then ``extra``'s rows."""
        vectors = self.vectors if extra is None or not len(extra) else np.vstack([self.vectors, extra])
        lengths = histories.lengths
        age = np.repeat(histories.indptr[1:], lengths) - 1 - np.arange(len(histories.items))
        if self.half_life is None:
            weights = np.ones(len(histories.items), dtype=np.float64)
        else:
            weights = np.exp2(-age / self.half_life)
        shape = (len(histories), len(vectors))
        mat = sp.csr_matrix((weights, histories.items, histories.indptr), shape=shape)
        return unit_rows(np.asarray(mat @ vectors, dtype=np.float32))

    def user_features(self, histories: Histories) -> np.ndarray:
        """``[B, N_USER]``: log1p(history length) and the mean log1p(training count) of its items (an
        item added after training counts 0): how much a user reads, and how far from the popular."""
        lengths = histories.lengths
        pop = np.concatenate(
            [np.log1p(self.popularity), np.zeros(max(0, histories.n_items - len(self.popularity)))]
        )
        sums = np.bincount(
            np.repeat(np.arange(len(histories)), lengths),
            weights=pop[histories.items],
            minlength=len(histories),
        )
        mean = np.divide(sums, lengths, out=np.zeros(len(histories)), where=lengths > 0)
        return np.stack([np.log1p(lengths), mean], axis=1)

    # -- merging ----------------------------------------------------------------------------------------
    def candidates(
        self, profiles: np.ndarray, seen: np.ndarray, extra: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each user's ``DEPTH`` unseen candidates most similar by cosine: ``(indices [B, C], cosines)``;
        indices count the catalogue, then ``extra``'s rows (-1 where a user has fewer candidates)."""
        n = len(self.popularity)
        pool = np.concatenate([self.cold_index, n + np.arange(len(extra))]).astype(np.int64)
        vectors = np.vstack([self.vectors[self.cold_index], extra]) if len(extra) else self.vectors[self.cold]
        cos = np.asarray(profiles, dtype=np.float64) @ np.asarray(vectors, dtype=np.float64).T
        cos = np.where(seen[:, pool], -np.inf, cos)
        c = min(DEPTH, len(pool))
        pick = np.argsort(-cos, axis=1, kind="stable")[:, :c]
        chosen = np.take_along_axis(cos, pick, axis=1)
        return np.where(np.isfinite(chosen), pool[pick], -1), np.where(np.isfinite(chosen), chosen, 0.0)

    def merge(
        self,
        scores: np.ndarray,
        seen: np.ndarray | sp.spmatrix,
        histories: Histories,
        extra: np.ndarray | None = None,
        extra_exposure: np.ndarray | None = None,
    ) -> np.ndarray:
        """``float32 [B, n + A]``: the served ``scores [B, n]`` with candidates promoted to their calibrated
        place, then the ``A`` items whose vectors are ``extra`` (events ``extra_exposure``) at theirs.

        ``histories``: what the user's profile is made of (over the catalogue, then ``extra``: the latest
        ``max_history`` positives, as the graph reads them plus added items). ``seen``: bool ``[B, >= n]``
        (``[B, n + A]`` with ``extra``), the history and every item the user has any event for: candidates
        are placed into the list of unseen items and a seen item is never promoted. Request filters and
        exclusions are not part of it; they apply to the merged list.
        """
        scores = np.asarray(scores, dtype=np.float32)
        b, n = scores.shape
        extra = np.zeros((0, self.vectors.shape[1]), dtype=np.float32) if extra is None else extra
        seen_all = np.zeros((b, n + len(extra)), dtype=bool)
        dense = _dense(seen)
        seen_all[:, : dense.shape[1]] = dense[:, : n + len(extra)]
        out = np.empty((b, n + len(extra)), dtype=np.float32)
        out[:, :n] = scores
        if b == 0:
            return out
        users = self.user_features(histories)
        profiles = self.profiles(histories, extra)
        cand, cos = self.candidates(profiles, seen_all, extra)
        events = np.zeros(len(extra)) if extra_exposure is None else np.asarray(extra_exposure, np.float64)
        pool_features = np.vstack([self.cold_features, self.item_features(extra, events)])
        # a candidate's row in the pool (cold catalogue items first, then the added ones)
        where = np.full(n + len(extra), -1, dtype=np.int64)
        where[self.cold_index] = np.arange(len(self.cold_index))
        where[n:] = len(self.cold_index) + np.arange(len(extra))
        explore = self.calibration.exploration(cos, users, pool_features[where[np.maximum(cand, 0)]])
        explore = np.where(cand >= 0, explore, 0.0)
        top = served_top(scores, seen_all)
        placed = placed_scores(explore, top, self.calibration.slot_hits(users, top.shape[1]))
        # every added item gets a place (after the list unless promoted), then candidates overwrite theirs
        if len(extra):
            zero = np.zeros((b, len(extra)))
            out[:, n:] = placed_scores(zero, top, np.full(top.shape[1], np.inf)).astype(np.float32)
        rows = np.broadcast_to(np.arange(b)[:, None], cand.shape)
        promote = (cand >= 0) & (explore > 0)
        r, c = rows[promote], cand[promote]
        graph = np.where(c < n, scores[r, np.minimum(c, n - 1)], -np.inf)
        out[r, c] = np.maximum(graph, placed[promote]).astype(np.float32)
        return out

    # -- persistence ------------------------------------------------------------------------------------
    def save(self, folder: Path, report: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write :data:`COLD_ITEMS_FILE` into ``folder``; returns the manifest's ``cold_items`` entry."""
        path = folder / COLD_ITEMS_FILE
        cal = self.calibration
        np.savez(
            path,
            vocab=np.asarray(self.vocabulary.vocab, dtype=str),
            term_fields=np.asarray(self.vocabulary.term_fields, dtype=np.int8),
            idf=np.asarray(self.vocabulary.idf, dtype=np.float32),
            item_vectors=np.asarray(self.vectors, dtype=np.float32),
            popularity=np.asarray(self.popularity, dtype=np.float64),
            exposure=np.asarray(self.exposure, dtype=np.float64),
            basis=np.asarray(self.basis, dtype=np.float32),
            cold_model=np.asarray(cal.cold, dtype=np.float64),
            slot_model=np.asarray(cal.slots, dtype=np.float64),
        )
        settings = self.vocabulary.settings
        return {
            "file": COLD_ITEMS_FILE,
            "sha256": file_sha256(path),
            "settings": {k: getattr(settings, k) for k in _SETTINGS},
            "half_life": self.half_life,
            "weight": cal.weight,
            "active": cal.active,
            "cold_catalogue_items": int(self.cold.sum()),
            **(report or {}),
        }

    @classmethod
    def load(cls, folder: Path, entry: dict[str, Any]) -> ColdItems:
        """The side scorer the export saved; refuses a file whose bytes differ from the manifest's."""
        path = folder / str(entry["file"])
        if not path.is_file():
            raise RuntimeError(f"{path} is listed in {folder / 'manifest.json'} but missing; re-export")
        actual, expected = file_sha256(path), str(entry.get("sha256"))
        if actual != expected:
            raise RuntimeError(
                f"{path} has sha256 {actual[:12]}..., but its manifest records {expected[:12]}...: "
                "the file changed after export (a partial copy, a manual edit); re-export or restore it"
            )
        known = {k: v for k, v in entry.get("settings", {}).items() if k in _SETTINGS}
        with np.load(path, allow_pickle=False) as npz:
            state = {k: npz[k] for k in npz.files}
        vocabulary = TfidfVocabulary.from_state(state, ContentFeatures(**known))
        half_life = entry.get("half_life")
        calibration = Calibration(state["cold_model"], state["slot_model"], float(entry.get("weight", 0.0)))
        return cls(
            vocabulary,
            state["popularity"].astype(np.float64),
            state["basis"].astype(np.float32),
            state["exposure"].astype(np.float64),
            None if half_life is None else float(half_life),
            calibration,
        )


def item_basis(vectors: np.ndarray, dims: int = ITEM_DIMS) -> np.ndarray:
    """``float32 [k, d]``: the top right singular vectors of the item vectors (k <= ``dims``), deterministic.

    Why a basis and not the vectors: the candidate model's item terms then have ``k`` weights whatever the
    vocabulary's size, and an item added later is projected on the same directions.
    """
    x = np.asarray(vectors, dtype=np.float64)
    k = min(dims, min(x.shape) - 1) if min(x.shape) > 1 else 0
    if k <= 0:
        return np.zeros((0, x.shape[1]), dtype=np.float32)
    from scipy.sparse.linalg import svds

    _, s, vt = svds(x, k=k, random_state=0)
    order = np.argsort(-s)
    basis = vt[order]
    signs = np.sign(basis[np.arange(len(basis)), np.abs(basis).argmax(axis=1)])  # a fixed sign per direction
    return (basis * np.where(signs == 0, 1.0, signs)[:, None]).astype(np.float32)


# -- fitting on validation ---------------------------------------------------------------------------------
def fit_logistic(
    x: np.ndarray, y: np.ndarray, ridge: Sequence[float] | np.ndarray, iterations: int = 30
) -> np.ndarray:
    """Coefficients of ``P(y) = sigmoid(x @ beta)`` (``x`` with its intercept column first), by Newton's
    method on the log-likelihood minus ``ridge * beta**2 / 2`` per coefficient."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    penalty = np.diag(np.maximum(np.asarray(ridge, dtype=np.float64), 1e-8))
    beta = np.zeros(x.shape[1])
    rate = float(np.clip(y.mean() if len(y) else 0.5, 1e-9, 1 - 1e-9))
    beta[0] = np.log(rate / (1 - rate))
    for _ in range(iterations):
        p = _sigmoid(x @ beta)
        grad = x.T @ (y - p) - penalty @ beta
        hess = (x * (p * (1 - p))[:, None]).T @ x + penalty
        step = np.linalg.solve(hess, grad)
        beta += step
        if np.abs(step).max() < 1e-6:  # Newton converges quadratically: a few more steps change nothing
            break
    return beta


def _log_likelihood(x: np.ndarray, y: np.ndarray, beta: np.ndarray) -> float:
    z = x @ beta
    return float((y * z - np.logaddexp(0.0, z)).sum())


def fit_candidate_model(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, float]:
    """The candidate model, its item terms' ridge penalty chosen from :data:`LAMBDAS` by the held-out
    log-likelihood of a two-fold split of the users (``groups``: each row's user)."""
    n_fixed = 2 + N_USER
    rng = np.random.default_rng(FIT_SEED)
    users = np.unique(groups)
    fold = np.isin(groups, users[rng.permutation(len(users))[: len(users) // 2]])
    best, best_ll = LAMBDAS[0], -np.inf
    for lam in LAMBDAS:
        ridge = np.r_[np.full(n_fixed, 1e-6), np.full(x.shape[1] - n_fixed, lam)]
        ll = 0.0
        for train in (fold, ~fold):
            if train.all() or not train.any() or y[train].sum() == 0:
                continue
            ll += _log_likelihood(x[~train], y[~train], fit_logistic(x[train], y[train], ridge))
        if ll > best_ll:
            best, best_ll = lam, ll
    ridge = np.r_[np.full(n_fixed, 1e-6), np.full(x.shape[1] - n_fixed, best)]
    return fit_logistic(x, y, ridge), best


def merged_top_k(
    top_items: np.ndarray,
    top_scores: np.ndarray,
    cand_items: np.ndarray,
    cand_scores: np.ndarray,
    k: int,
) -> np.ndarray:
    """``int64 [B, k]``: the best ``k`` of a served list and promoted candidates (score desc, ties to the
    lower index, as the service ranks); a candidate already in the list keeps its larger merged score."""
    dup = (top_items[:, :, None] == cand_items[:, None, :]).any(axis=2)
    scores = np.concatenate([np.where(dup, -np.inf, top_scores), cand_scores], axis=1)
    items = np.concatenate([top_items, cand_items], axis=1)
    scores = np.where(items < 0, -np.inf, scores)
    order = np.lexsort((items, -scores), axis=1)[:, :k]
    out = np.take_along_axis(items, order, axis=1)
    out[~np.isfinite(np.take_along_axis(scores, order, axis=1))] = -1
    return out


@dataclass
class _Collected:
    """What the fit keeps of each validation user: the served list, its hits, the candidates."""

    top_items: list[np.ndarray] = field(default_factory=list)
    top_scores: list[np.ndarray] = field(default_factory=list)
    slot_hits: list[np.ndarray] = field(default_factory=list)
    users: list[np.ndarray] = field(default_factory=list)
    cand: list[np.ndarray] = field(default_factory=list)
    cos: list[np.ndarray] = field(default_factory=list)
    cand_scores: list[np.ndarray] = field(default_factory=list)
    cand_hits: list[np.ndarray] = field(default_factory=list)

    def stacked(self, name: str) -> np.ndarray:
        return np.concatenate(getattr(self, name))


def fit_calibration(
    side: ColdItems,
    histories: Histories,
    truth: sp.csr_matrix,
    popularity: np.ndarray,
    exposure: np.ndarray,
    score: Callable[[Histories], np.ndarray],
    k: int,
    budget: float,
) -> tuple[Calibration, dict[str, Any]]:
    """The calibration and exploration weight, from validation.

    ``histories``: validation users' train' histories as the service sends them (the latest
    ``max_history``); ``truth``: their validation items; ``popularity``: each item's train' count (items
    at 0 are the candidates here, as items at 0 training interactions are when serving); ``exposure``:
    each item's events in the train' period (:func:`period_exposure`); ``score``: the served scorer
    fitted on train'. ``side`` gives the vocabulary and item features (its own counts are
    the full training split's and are not read). Returns the calibration (weight 0 when the budget is 0,
    when candidates never hit, or when the models do not say what they should) and a report for the
    manifest: what was measured, and why.
    """
    report: dict[str, Any] = {"budget": budget, "depth": DEPTH}
    pop, events = np.asarray(popularity, dtype=np.float64), np.asarray(exposure, dtype=np.float64)
    fit_side = ColdItems(side.vocabulary, pop, side.basis, events, side.half_life)
    truth = sp.csr_matrix(truth)
    users = np.arange(len(histories))
    if len(users) > MAX_FIT_USERS:
        users = np.sort(np.random.default_rng(FIT_SEED).choice(users, MAX_FIT_USERS, replace=False))
    report |= {"validation_users": len(users), "validation_cold_items": int(fit_side.cold.sum())}
    if budget <= 0:
        return Calibration(), report | {"reason": "export.new_items_budget is 0: promotion is off"}
    if not fit_side.cold.any() or not len(users):
        return Calibration(), report | {
            "reason": "no validation user, or no item without train' interactions"
        }
    n = truth.shape[1]
    depth = min(DEPTH, n)
    features = fit_side.item_features(fit_side.vectors, fit_side.exposure)
    got = _Collected()
    for start in range(0, len(users), FIT_BATCH):
        rows = users[start : start + FIT_BATCH]
        batch = histories.select(rows)
        seen = batch.to_csr().toarray() > 0
        scores = np.asarray(score(batch), dtype=np.float64)
        items = top_k(scores, depth, exclude=sp.csr_matrix(seen))
        hit_rows = truth[rows].toarray() > 0
        got.top_items.append(items)
        got.top_scores.append(
            np.where(items >= 0, np.take_along_axis(scores, np.maximum(items, 0), 1), -np.inf)
        )
        got.slot_hits.append(np.take_along_axis(hit_rows, np.maximum(items, 0), 1) & (items >= 0))
        got.users.append(fit_side.user_features(batch))
        cand, cos = fit_side.candidates(
            fit_side.profiles(batch), seen, np.zeros((0, fit_side.vectors.shape[1]))
        )
        got.cand.append(cand)
        got.cos.append(cos)
        got.cand_scores.append(
            np.where(cand >= 0, np.take_along_axis(scores, np.maximum(cand, 0), 1), -np.inf)
        )
        got.cand_hits.append(np.take_along_axis(hit_rows, np.maximum(cand, 0), 1) & (cand >= 0))
    user_x, cand, cos = got.stacked("users"), got.stacked("cand"), got.stacked("cos")
    cand_hits, slot_hits = got.stacked("cand_hits"), got.stacked("slot_hits")
    hits_total = int(cand_hits.sum())
    report["validation_candidate_hits"] = hits_total
    if hits_total < MIN_FIT_HITS:
        return Calibration(), report | {
            "reason": f"{hits_total} validation hits on candidates (items without train' interactions; "
            f"fewer than {MIN_FIT_HITS}): nothing to calibrate on"
        }
    # the slot model: one row per (user, slot of the served list)
    valid_slots = got.stacked("top_items") >= 0
    u_rows, s_cols = np.nonzero(valid_slots)
    x_slots = np.column_stack([np.ones(len(u_rows)), np.log(s_cols + 1.0), user_x[u_rows]])
    slots = fit_logistic(x_slots, slot_hits[u_rows, s_cols], np.full(x_slots.shape[1], 1e-6))
    # the candidate model: one row per (user, candidate with a positive cosine)
    c_rows, c_cols = np.nonzero((cand >= 0) & (cos > 0))
    x_cold = np.column_stack(
        [np.ones(len(c_rows)), cos[c_rows, c_cols], user_x[c_rows], features[cand[c_rows, c_cols]]]
    )
    cold, lam = fit_candidate_model(x_cold, cand_hits[c_rows, c_cols], c_rows)
    report |= {
        "candidate_model": {
            "intercept": cold[0],
            "cosine": cold[1],
            "users": cold[2 : 2 + N_USER].tolist(),
            "item_dims": len(cold) - 2 - N_USER,
            "item_ridge": lam,
        },
        "slot_model": {"intercept": slots[0], "log_slot": slots[1], "users": slots[2:].tolist()},
    }
    if cold[1] <= 0 or slots[1] >= 0:
        return Calibration(cold, slots, 0.0), report | {
            "reason": "on validation, higher similarity does not mean more hits, "
            "or lower slots do not hit less"
        }
    top_items, top_scores = got.stacked("top_items"), got.stacked("top_scores")
    cand_scores = got.stacked("cand_scores")
    cand_features = features[np.maximum(cand, 0)]
    fit_truth = truth[users]
    cold_truth = sp.csr_matrix(fit_truth.multiply(fit_side.cold[None, :].astype(np.float32)))

    def measured(weight: float) -> tuple[float, float, float]:
        cal = Calibration(cold, slots, weight)
        explore = np.where(cand >= 0, cal.exploration(cos, user_x, cand_features), 0.0)
        placed = placed_scores(explore, top_scores, cal.slot_hits(user_x, depth))
        merged = np.where(explore > 0, np.maximum(cand_scores, placed), cand_scores)
        lists = merged_top_k(top_items, top_scores, cand, merged, k)
        shown = float(np.isin(lists, np.flatnonzero(fit_side.cold)).sum() / max(len(lists), 1))
        ndcg = float(np.nanmean(ndcg_at_k(lists, fit_truth, k)))
        cold_ndcg = ndcg_at_k(lists, cold_truth, k)
        return ndcg, float(np.nanmean(cold_ndcg)) if np.isfinite(cold_ndcg).any() else 0.0, shown

    base, base_cold, _ = measured(0.0)
    chosen, tried = 0.0, []
    for weight in WEIGHTS:
        ndcg, cold_ndcg, shown = measured(weight)
        tried.append(
            {
                "weight": round(weight, 4),
                "ndcg_loss": round(base - ndcg, 6),
                "new_items_ndcg": round(cold_ndcg, 6),
                "new_items_per_list": round(shown, 4),
            }
        )
        if base - ndcg > budget:
            break
        chosen = weight
    report |= {
        f"validation_ndcg@{k}": round(base, 6),
        f"validation_new_items_ndcg@{k}": round(base_cold, 6),
        "weights_tried": tried,
    }
    return Calibration(cold, slots, chosen), report


def period_exposure(
    n_items: int,
    positives: pd.DataFrame,
    ratings: pd.DataFrame | None,
    later: list[pd.DataFrame],
) -> np.ndarray:
    """Events per item in a training period, as the service's first start imports them: the period's
    positives, and each user's non-positive ratings dated before their first row in ``later`` (the next
    carves in time order; all of them for a user with none), exactly the side information the protocol
    lets a model read (``fuserec.serving.batch.training_events`` for the training split)."""
    counts = np.bincount(positives["item"].to_numpy(np.int64), minlength=n_items).astype(np.float64)
    if ratings is None or "positive" not in ratings or not len(ratings):
        return counts
    low = ratings[~ratings["positive"].to_numpy(bool)]
    frames = [f[["user", "timestamp"]] for f in later if len(f)]
    if frames:
        first = pd.concat(frames).groupby("user")["timestamp"].min()
        cutoff = first.reindex(low["user"]).to_numpy(np.float64)
        keep = np.isnan(cutoff) | (low["timestamp"].to_numpy(np.float64) < cutoff)
        low = low[keep]
    return counts + np.bincount(low["item"].to_numpy(np.int64), minlength=n_items)[:n_items]


# -- the export stage's part ---------------------------------------------------------------------------------
def export_cold_items(
    params: Params,
    layout: Layout,
    scorer: Algorithm | Fuser,
    name: str,
    data: Dataset,
    test: pd.DataFrame,
    out: Path,
) -> dict[str, Any]:
    """Build, calibrate on validation and save the side scorer beside the exported graph in ``out``;
    returns the manifest's ``cold_items`` entry (what was fitted, on what, and the chosen weight).

    The vocabulary is the ``content`` plugin's (a component of ``scorer``, else its trained model), else
    one fitted on the catalogue. ``data``: the training split; ``test``: its first dates end each user's
    training period (low ratings before them count as exposure, as the service imports them).
    """
    content = components_of(scorer, name).get("content")
    if content is None and (layout.model("content") / "manifest.json").exists():
        content = load_algorithm(layout.model("content"))
    fitted = None
    if content is not None and all(hasattr(content, a) for a in ("vocab_", "term_fields_", "idf_")):
        fitted = (getattr(content, "vocab_"), getattr(content, "term_fields_"), getattr(content, "idf_"))  # noqa: B009
    settings: ContentSettings = content.config if fitted is not None else DEFAULTS  # type: ignore[union-attr,assignment]
    half_life = getattr(settings, "half_life", DEFAULT_HALF_LIFE)
    ratings_file = layout.clean / RATINGS_FILE
    ratings = pd.read_parquet(ratings_file) if ratings_file.exists() else None
    exposure = period_exposure(data.n_items, data.interactions, ratings, [test])
    side = ColdItems.from_catalog(data.items, data.item_popularity(), exposure, settings, half_life, fitted)
    report: dict[str, Any] = {"vocabulary": "the content plugin's" if fitted else "fitted on the catalogue"}
    inner_file, valid_file = layout.split_file("train_inner"), layout.split_file("valid")
    if not (inner_file.exists() and valid_file.exists()):
        report["reason"] = "no validation carve (split/train_inner, split/valid): promotion is off"
        return side.save(out, report)
    cfg = params.export
    inner = Dataset.load(layout.clean, interactions=inner_file)
    valid = pd.read_parquet(valid_file)
    fitted_scorer, method = _scorer_on_train_prime(layout, scorer, name, inner)
    users = np.unique(valid["user"].to_numpy())
    hist = inner.histories().select(users)
    hist = hist.latest(np.minimum(hist.lengths, cfg.max_history))
    truth = interactions_matrix(valid, inner.n_users, inner.n_items)[users]
    inner_exposure = period_exposure(inner.n_items, inner.interactions, ratings, [valid, test])
    calibration, fit_report = fit_calibration(
        side,
        hist,
        truth,
        inner.item_popularity(),
        inner_exposure,
        fitted_scorer.score,
        cfg.k,
        cfg.new_items_budget,
    )
    return side.with_calibration(calibration).save(out, report | {"validation_scorer": method} | fit_report)


def _scorer_on_train_prime(
    layout: Layout, scorer: Algorithm | Fuser, name: str, inner: Dataset
) -> tuple[Algorithm | Fuser, str]:
    """The served scorer as fitted on train' (a fuser bound to its components' fits on train'), so its
    validation lists are honest; the served scorer itself when no such fit was kept."""
    if isinstance(scorer, Fuser):
        names = scorer._check_fitted_names()
        if names and all((layout.inner_model(n) / "manifest.json").exists() for n in names):
            models = {n: load_algorithm(layout.inner_model(n)) for n in names}
            fuser = load_fuser(scorer_folder(layout, name), layout, models).bind(models, inner)
            return fuser, "the served fuser bound to its components' fits on train'"
    elif (layout.inner_model(name) / "manifest.json").exists():
        return load_algorithm(layout.inner_model(name)), "the served model's fit on train'"
    return scorer, (
        "the served scorer itself (no fit on train' was kept): it has seen the validation items, so its "
        "lists look better than they are and the weight comes out low"
    )


def merged_scorer(
    side: ColdItems, score: Callable[[Histories], np.ndarray], max_history: int
) -> Callable[[Histories], np.ndarray]:
    """``score`` followed by the side scorer's merge, as the service merges: each history's latest
    ``max_history`` items make the profile, and its items are what the user has seen."""

    def merged(batch: Histories) -> np.ndarray:
        scores = np.asarray(score(batch))
        latest = batch.latest(np.minimum(batch.lengths, max_history))
        return side.merge(scores, batch.to_csr(), latest)

    return merged
