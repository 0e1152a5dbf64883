"""Content-based recommender: TF-IDF item vectors, recency-weighted user profiles, cosine scores.

Items are described only by their catalog row (genres, tags, title words, free text, release year), so
the model scores items nobody has interacted with yet, and :meth:`Content.score_items` scores items that
are not even in the fitted catalog. A history becomes a profile: the sum of its items' vectors, weighted
by recency (exponential decay over positions, newest first) and, in Python only, by rating.

Cold start (empty history):
- with ``histories.users`` pointing at a known row of the users table, one ridge regression learned at
  fit time from one-hot user attributes (age band, gender, occupation, zip region, ...) predicts two
  things: the user's content profile (scored by cosine, weight ``cold_content_weight``) and, with
  ``cold_prior="attributes"``, the user's interaction row, i.e. popularity among users with similar
  attributes, on the same log scale as the global prior. Why the second: for users whose history is
  hidden, the attribute -> profile map alone ranks far below popularity and, blended with the global
  prior at validation-chosen weights, still does not beat it; the attribute-conditioned prior does, and
  validation then gives the profile cosine weight 0 (the default);
- otherwise the global popularity prior: ``log1p(training count) / log1p(max count)``, in ``[0, 1]``.

The exported graph takes only the padded history: it reproduces :meth:`Content.score` exactly when
``histories.users`` and ``histories.ratings`` are None, or when ``rating_power`` is 0 and no empty history
has a known user. Attribute-based cold start and rating weights stay Python-side until the serving graph
gets those inputs. With ``text_encoder: minilm`` (optional extra ``fuserec[text]``) item vectors also
carry sentence embeddings of title and text, computed offline from weights shipped inside a pip package.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Literal, Self

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from pydantic import Field

from fuserec.api import Algorithm, AlgorithmConfig, Choice, FloatRange, Histories, SearchDim
from fuserec.features import (
    DEFAULTS,
    USER_ATTRIBUTES,
    encode_attributes,
    fit_tfidf,
    transform_tfidf,
    unit_rows,
)

if TYPE_CHECKING:
    from fuserec.data.dataset import Dataset

_EPS = 1e-12
PROFILE_BLOCK = 4096  # users per block when computing training profiles


class ContentConfig(AlgorithmConfig):
    search_space: ClassVar[dict[str, SearchDim]] = {
        "title_weight": FloatRange(0.0, 1.0),
        "year_weight": FloatRange(0.0, 2.0),
        "half_life": FloatRange(1.0, 100.0, log=True),
        "sublinear_tf": Choice((True, False)),
    }

    genre_weight: float = Field(
        DEFAULTS.genre_weight, ge=0.0, description="weight of the genres block of an item vector"
    )
    tag_weight: float = Field(
        DEFAULTS.tag_weight, ge=0.0, description="weight of the tags block ('|'-joined phrases)"
    )
    title_weight: float = Field(
        DEFAULTS.title_weight, ge=0.0, description="weight of title words (year in parentheses removed)"
    )
    text_weight: float = Field(
        DEFAULTS.text_weight, ge=0.0, description="weight of free-text words, when the catalog has text"
    )
    year_weight: float = Field(
        DEFAULTS.year_weight, ge=0.0, description="weight of the release-year tokens; 0 drops the year"
    )
    year_tokens: Literal["decade", "year", "both"] = Field(
        DEFAULTS.year_tokens,
        description="what the year field contributes: the decade ('1990s'), the year, or both",
    )
    min_df: int = Field(
        DEFAULTS.min_df, ge=1, description="a term must occur in this many items: rarer terms match nothing"
    )
    max_features: int = Field(
        DEFAULTS.max_features, ge=1, description="keep the most frequent terms (item vectors are dense)"
    )
    sublinear_tf: bool = Field(
        DEFAULTS.sublinear_tf, description="term frequency 1 + log(count) instead of count"
    )
    half_life: float | None = Field(
        3.0, gt=0.0, description="recency half-life in history positions (newest = 0); None weighs all alike"
    )
    rating_power: float = Field(
        0.0, ge=0.0, description="history item weight *= rating ** power (Python-side only; 0 = off)"
    )
    cold_ridge: float = Field(100.0, gt=0.0, description="ridge penalty of the attribute maps (cold start)")
    cold_content_weight: float = Field(
        0.0, ge=0.0, description="weight of the attribute-predicted profile's cosine in cold-start scores"
    )
    cold_prior: Literal["global", "attributes"] = Field(
        "attributes",
        description="prior added to cold-start scores: global popularity, or popularity among similar users",
    )
    text_encoder: Literal["none", "minilm"] = Field(
        "none",
        description="add sentence embeddings of title/text (minilm: needs pip install 'fuserec[text]')",
    )
    embedding_weight: float = Field(1.0, ge=0.0, description="weight of the sentence-embedding block")
    attribute_min_count: int = Field(
        DEFAULTS.attribute_min_count, ge=1, description="attribute values rarer than this get no column"
    )
    numeric_bins: int = Field(
        DEFAULTS.numeric_bins, ge=2, description="quantile bands of numeric attributes (e.g. age)"
    )


class Content(Algorithm):
    """TF-IDF content model; see the module docstring for cold start and export parity."""

    Config = ContentConfig
    user_attributes: ClassVar[frozenset[str]] = USER_ATTRIBUTES  # one-hot bands, user side
    config: ContentConfig

    # -- fitting ------------------------------------------------------------------------------------
    def fit(self, data: Dataset) -> Self:
        n_items = data.n_items
        vocab, fields, idf, vectors = fit_tfidf(data.items, self.config, n_items)
        self.vocab_, self.term_fields_, self.idf_ = vocab, fields, idf
        self.item_vectors_ = self._with_embeddings(data.items, vectors)
        self._index_distinct_vectors()
        counts = data.item_popularity().astype(np.float64)
        top = math.log1p(counts.max()) if len(counts) and counts.max() > 0 else 1.0
        self.log_scale_ = np.float32(1.0 / top)
        self.prior_ = (np.log1p(counts) * self.log_scale_).astype(np.float32)
        self.n_items_ = n_items
        self._fit_cold_start(data)
        return self

    def _fit_cold_start(self, data: Dataset) -> None:
        """Ridge from one-hot attributes to training profiles and interaction rows.

        Why: a new user's attributes hint at their taste (profile) and at what people like them watch
        (prior); both maps share one solve, so fitting costs one ``f x f`` system.
        """
        features = encode_attributes(data.users, self.config)
        n_items, d = self.item_vectors_.shape
        hist = data.histories()
        warm = np.flatnonzero(hist.lengths > 0)
        self.user_features_ = features if features.shape[1] and len(warm) else np.zeros((0, 0), np.float32)
        f = self.user_features_.shape[1]
        self.ridge_weights_ = np.zeros((f, d), dtype=np.float32)
        self.ridge_bias_ = np.zeros(d, dtype=np.float32)
        self.prior_weights_ = np.zeros((f, n_items), dtype=np.float32)
        self.prior_bias_ = np.zeros(n_items, dtype=np.float32)
        if f == 0:
            return
        x = features[warm].astype(np.float64)
        x_mean = x.mean(axis=0)
        xc = x - x_mean
        solve = np.linalg.inv(xc.T @ xc + self.config.cold_ridge * np.eye(f))
        # Centred features sum to zero, so xc.T @ (Y - mean(Y)) = xc.T @ Y: no dense centred targets.
        # Profiles go in blocks of users so memory stays O(block x d) on large datasets.
        warm_hist = hist.select(warm)
        xty, profile_sum = np.zeros((f, d)), np.zeros(d)
        for start in range(0, len(warm), PROFILE_BLOCK):
            rows = np.arange(start, min(start + PROFILE_BLOCK, len(warm)))
            profiles = self._profiles(warm_hist.select(rows)).astype(np.float64)
            xty += xc[rows].T @ profiles
            profile_sum += profiles.sum(axis=0)
        weights = solve @ xty
        self.ridge_weights_ = weights.astype(np.float32)
        self.ridge_bias_ = (profile_sum / len(warm) - x_mean @ weights).astype(np.float32)
        # Interaction rows times the number of warm users: predictions are counts, like the prior's.
        y = warm_hist.to_csr().astype(np.float64) * len(warm)
        weights = solve @ np.asarray((y.T @ xc).T)
        self.prior_weights_ = weights.astype(np.float32)
        self.prior_bias_ = (np.asarray(y.mean(axis=0)).ravel() - x_mean @ weights).astype(np.float32)

    # -- representations ----------------------------------------------------------------------------
    def item_representation(self) -> np.ndarray:
        """L2-normalised TF-IDF vectors ``[n_items, n_terms]``; term names are in ``vocab_``."""
        self._check_fitted()
        return self.item_vectors_

    def user_representation(self, histories: Histories) -> np.ndarray:
        """Unit-norm profiles; empty histories get the attribute profile when known, else zeros."""
        self._check_fitted()
        profiles = self._profiles(histories)
        cold = self._attribute_rows(histories)
        if cold is not None:
            rows, users = cold
            profiles[rows] = unit_rows(self.user_features_[users] @ self.ridge_weights_ + self.ridge_bias_)
        return profiles

    def history_weights(self, histories: Histories) -> np.ndarray:
        """Weight of each history entry (aligned with ``histories.items``): recency x rating."""
        lengths = histories.lengths
        age = np.repeat(histories.indptr[1:], lengths) - 1 - np.arange(len(histories.items))
        if self.config.half_life is None:
            weights = np.ones(len(histories.items), dtype=np.float32)
        else:
            weights = np.exp2(-age / self.config.half_life).astype(np.float32)
        if self.config.rating_power > 0 and histories.ratings is not None:
            r = np.asarray(histories.ratings, dtype=np.float64)
            ok = np.isfinite(r) & (r > 0)
            weights *= np.where(ok, np.power(np.where(ok, r, 1.0), self.config.rating_power), 1.0).astype(
                np.float32
            )
        return weights

    def _profiles(self, histories: Histories) -> np.ndarray:
        """Unit-norm weighted sums of history item vectors (zeros for empty histories)."""
        weights = self.history_weights(histories)
        mat = sp.csr_matrix(
            (weights, histories.items, histories.indptr), shape=(len(histories), self._check_fitted())
        )
        return unit_rows(np.asarray(mat @ self.item_vectors_, dtype=np.float32))

    def _attribute_rows(self, histories: Histories) -> tuple[np.ndarray, np.ndarray] | None:
        """(history rows, users-table rows) of empty histories whose user has known attributes."""
        if histories.users is None or self.user_features_.shape[1] == 0:
            return None
        users = np.asarray(histories.users, dtype=np.int64)
        rows = np.flatnonzero((histories.lengths == 0) & (users >= 0) & (users < len(self.user_features_)))
        return (rows, users[rows]) if len(rows) else None

    # -- scoring ------------------------------------------------------------------------------------
    def _index_distinct_vectors(self) -> None:
        """Items with the same content share one row, so they get bit-identical scores.

        A BLAS product split 20 identical vectors into two scores 1 ulp apart on an AVX2 CPU while the
        exported graph tied them: rank-based fusers then ranked them apart in Python only.
        """
        distinct, inverse = np.unique(self.item_vectors_, axis=0, return_inverse=True)
        self.distinct_vectors_ = np.ascontiguousarray(distinct, dtype=np.float32)
        self.distinct_index_ = np.asarray(inverse, dtype=np.int64).reshape(-1)

    def _cosines(self, profiles: np.ndarray) -> np.ndarray:
        return (profiles @ self.distinct_vectors_.T)[:, self.distinct_index_]

    def score(self, histories: Histories) -> np.ndarray:
        self._check_fitted()
        profiles = self.user_representation(histories)
        scores = self._cosines(profiles)
        empty = histories.lengths == 0
        scores[empty] = self.prior_
        cold = self._attribute_rows(histories)
        if cold is not None:
            rows, users = cold
            scores[rows] = self.config.cold_content_weight * self._cosines(profiles[rows])
            scores[rows] += (
                self.attribute_prior(users) if self.config.cold_prior == "attributes" else self.prior_
            )
        return np.ascontiguousarray(scores, dtype=np.float32)

    def attribute_prior(self, users: np.ndarray) -> np.ndarray:
        """``[len(users), n_items]`` popularity among users with the same attributes, on the prior's scale.

        The ridge predicts each user's training counts; ``log1p`` of the (clipped) prediction over
        ``log1p`` of the largest global count puts it on the global prior's ``[0, 1]`` scale.
        """
        counts = self.user_features_[users] @ self.prior_weights_ + self.prior_bias_
        return (np.log1p(np.maximum(counts, 0.0)) * self.log_scale_).astype(np.float32)

    def embed_items(self, items: pd.DataFrame) -> np.ndarray:
        """Vectors of catalog rows (same columns as the items table) in the fitted vocabulary."""
        self._check_fitted()
        tfidf = transform_tfidf(items, self.vocab_, self.term_fields_, self.idf_, self.config)
        return self._with_embeddings(items, tfidf)

    def _with_embeddings(self, items: pd.DataFrame, tfidf: np.ndarray) -> np.ndarray:
        """TF-IDF rows, joined with weighted sentence embeddings when ``text_encoder`` is set, unit norm.

        Why join rather than replace: genres and year carry most of the signal on catalogs like
        MovieLens; embeddings add what titles and descriptions say, at a weight chosen on validation.
        """
        if self.config.text_encoder == "none":
            return tfidf
        from fuserec.text_embeddings import encode_texts, item_texts

        emb = encode_texts(item_texts(items), self.config.text_encoder)
        return unit_rows(np.hstack([tfidf, self.config.embedding_weight * emb]))

    def score_items(self, histories: Histories, items: pd.DataFrame) -> np.ndarray:
        """Scores ``[len(histories), len(items)]`` of items known only by content (e.g. brand-new ones).

        Why: a new item has no interactions, so content is the only way to rank it. Cosine with each
        history's profile; an empty history without known attributes scores 0 (new items have no
        popularity yet).
        """
        profiles = self.user_representation(histories)
        return np.ascontiguousarray(profiles @ self.embed_items(items).T, dtype=np.float32)

    def explain(self, history: np.ndarray, item: int) -> dict[str, object]:
        """Shared terms driving the score, and each history item's contribution."""
        hist = Histories.from_lists([list(map(int, history))], self._check_fitted())
        profile = self._profiles(hist)[0]
        target = self.item_vectors_[item]
        terms = profile * target
        top = np.argsort(-terms)[:5]
        weights = self.history_weights(hist)
        norm = max(float(np.linalg.norm(np.asarray(weights) @ self.item_vectors_[hist.items])), _EPS)
        contributions: dict[int, float] = {}
        for h, w in zip(hist.items.tolist(), weights.tolist(), strict=True):
            contributions[h] = contributions.get(h, 0.0) + w * float(self.item_vectors_[h] @ target) / norm
        return {
            "score": float(terms.sum()),
            "terms": [(self._term_name(int(t)), float(terms[t])) for t in top if terms[t] > 0],
            "contributions": sorted(contributions.items(), key=lambda kv: -kv[1]),
        }

    def _term_name(self, t: int) -> str:
        """A vocabulary term, or ``embedding[j]`` for a sentence-embedding dimension."""
        return str(self.vocab_[t]) if t < len(self.vocab_) else f"embedding[{t - len(self.vocab_)}]"

    def to_torch(self) -> torch.nn.Module:
        self._check_fitted()
        return _ContentModule(
            torch.from_numpy(self.item_vectors_),
            torch.from_numpy(self.prior_),
            self.config.half_life,
            torch.from_numpy(self.distinct_vectors_),
            torch.from_numpy(self.distinct_index_),
        )

    # -- persistence --------------------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        return {
            "vocab": np.asarray(self.vocab_, dtype=str),
            "term_fields": self.term_fields_,
            "idf": self.idf_,
            "item_vectors": self.item_vectors_,
            "prior": self.prior_,
            "user_features": self.user_features_,
            "ridge_weights": self.ridge_weights_,
            "ridge_bias": self.ridge_bias_,
            "prior_weights": self.prior_weights_,
            "prior_bias": self.prior_bias_,
            "log_scale": np.asarray(self.log_scale_, dtype=np.float32),
        }

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.vocab_ = np.asarray(state["vocab"], dtype=str)
        self.term_fields_ = state["term_fields"].astype(np.int8)
        self.idf_ = state["idf"].astype(np.float32)
        self.item_vectors_ = state["item_vectors"].astype(np.float32)
        self._index_distinct_vectors()
        self.prior_ = state["prior"].astype(np.float32)
        self.user_features_ = state["user_features"].astype(np.float32)
        self.ridge_weights_ = state["ridge_weights"].astype(np.float32)
        self.ridge_bias_ = state["ridge_bias"].astype(np.float32)
        self.prior_weights_ = state["prior_weights"].astype(np.float32)
        self.prior_bias_ = state["prior_bias"].astype(np.float32)
        self.log_scale_ = np.float32(state["log_scale"])


class _ContentModule(torch.nn.Module):
    """Padded history -> recency-weighted profile -> cosine with every item; empty -> popularity prior."""

    vectors: torch.Tensor
    distinct: torch.Tensor
    distinct_index: torch.Tensor
    prior: torch.Tensor

    def __init__(
        self,
        vectors: torch.Tensor,
        prior: torch.Tensor,
        half_life: float | None,
        distinct: torch.Tensor,
        distinct_index: torch.Tensor,
    ) -> None:
        super().__init__()
        self.register_buffer("vectors", vectors)
        self.register_buffer("distinct", distinct)  # one row per distinct item vector: ties stay exact
        self.register_buffer("distinct_index", distinct_index)
        self.register_buffer("prior", prior)
        self.decay = 0.0 if half_life is None else math.log(2.0) / half_life
        self.n_items = vectors.shape[0]

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        valid = (history >= 0) & (history < self.n_items)
        index = torch.where(valid, history, torch.full_like(history, self.n_items))
        mask = valid.to(torch.float32)
        position = torch.cumsum(mask, dim=1) - 1.0  # rank among valid entries, oldest = 0
        length = mask.sum(dim=1, keepdim=True)
        weights = torch.exp((position - (length - 1.0)) * self.decay) * mask
        batch = history.shape[0]
        dense = torch.zeros(batch, self.n_items + 1, dtype=torch.float32, device=history.device)
        dense = dense.scatter_add(1, index, weights)[:, : self.n_items]
        profile = dense @ self.vectors
        norm = torch.sqrt((profile * profile).sum(dim=1, keepdim=True))
        profile = profile / torch.clamp(norm, min=_EPS)
        scores = (profile @ self.distinct.T).index_select(1, self.distinct_index)
        return torch.where(length > 0, scores, self.prior.unsqueeze(0).expand(batch, -1))
