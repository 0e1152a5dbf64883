"""Knowledge graph: LightGCN-style propagation over users, items and entities, scored from histories.

The graph has four kinds of node: items, item entities (``genres:drama``, ``year:1990s``, tags, from
:func:`fuserec.features.item_entities`, plus the exact release year ``year:1994``: decades are too coarse,
1,348 of ML-100k's 1,682 items are ``year:1990s``), user-attribute entities (``occupation:engineer``,
``age:2``, from :func:`fuserec.features.user_attribute_matrix`) and the training users. Edges: user - item
for each training positive, item - entity (weight ``entity_weight``), user - attribute. With the
symmetric-normalised adjacency ``A = D^-1/2 W D^-1/2`` and learned base vectors ``E`` for items,
entities and attributes (users have none: they are pure connectors, so nothing per user is stored),
``layers`` propagation steps give ``H_k = A^k E`` and each item's vector is the layer mean
``V_i = mean_k H_k[i]`` (LightGCN). An item with few interactions still gets a meaningful vector: its
entities feed it at every layer.

Why users are transient: fuserec scores histories, so the user is a node added at scoring time, linked
to its history items with recency weights ``w = 2 ** (-age / half_life)`` (age in positions, newest 0)
and, when ``histories.users`` is known, to its attributes. One propagation step from the items gives

    u(h) = sum_j w_j C_j / sqrt(sum_j w_j [+ n_attributes])      C_j = mean_{k<layers} H_k[j] / sqrt(d_j)

(the attribute terms use the attributes' ``C``), and ``score(h, i) = u(h) . V_i``. ``C`` and ``V`` are
constant after fit, so new users and fresh events are served without retraining and the exported graph
is weighted multi-hot(history) -> two matmuls. The ONNX graph takes the attributes as its optional
``user_features`` input (zeros = unknown user), so served and measured scores agree.

Training mimics the protocol's future prediction. Each epoch every user's history is cut at a random
point: the items before the cut are the input (recency weights counted from the cut), the next
``holdout`` share are the targets, and the targets' edges are removed from that epoch's graph, so no item
vector contains the edge it is asked to predict. The loss is the multinomial log-likelihood of the
targets over the whole catalog with the inputs masked out (as seen items are at evaluation), trained
with logit adjustment: ``tau * log prior_i`` is added to the logits during training only, so the
embeddings need not encode popularity (Menon et al. 2021, long-tail learning). Epochs are chosen by
:func:`fuserec.training.fit_early_stopped` (validation NDCG@10), then the model is refit on all data.
Cutting each history in time (rather than holding out a random share of it) and weighting the input by
recency were both chosen on validation: they train the model on the question the protocol asks.
``logit_adjust`` (tau) is kept moderate: a full-weight prior made training unstable.

Tail slot: a softmax-trained model ranks items with few training positives far down, because they are
rarely chosen. With ``tail_rank`` = p the
scores of the tail items (fewer than ``tail_below`` training positives) are lifted together, by the
amount that puts the best unseen tail item just above the p-th best unseen familiar item; tail items
keep their order among themselves, so which one is shown is the graph's choice. The slot is gated: only
histories whose tail affinity (mean ``log(1 + training popularity)`` of their items) is among the lowest
``tail_users`` share of the training users' get it, because those users hold most of the rare held-out
items and their best tail pick hits far more often than the average user's. The default (a slot at rank
1 for the lowest tenth) was chosen on the validation carve as the largest rare-item NDCG@10 for a small
loss of overall NDCG@10; the entity edges are what make the tail picks good. It is part of ``score`` and
of the exported graph; ``tail_rank`` 0 turns it off.

Explanations walk the graph: each history item's exact share of the score (``u`` is linear in the
history) is spread over its two-hop paths to the item (through a shared entity, or through the users
who interacted with both) in proportion to their normalised-adjacency walk weights; the heaviest path
is ``best_path``. :meth:`KnowledgeGraph.explain_state` is the part of the state those explanations read
(``C``, ``V``, the scoring constants, the item-entity and item-user incidence, user degrees), so the
service can walk the same paths from the exported model folder; it grows with the catalogue and the
training positives (co-user edges), not with anything per request.

Cost: an epoch is ``users / user_batch`` steps, each a sparse propagation over the graph and a dense
``[user_batch, n_items]`` softmax, about one second on ML-100k on one core. A step's propagation costs
the same whatever its batch, so with more users than ``user_batch * max_steps`` the batch grows instead
of the step count: an epoch then costs ``max_steps`` propagations plus a softmax over every user, linear
in the data, instead of hundreds of full propagations per epoch at the ML-10M
shape. ML-100k and ML-1M have fewer users than 128 x 64 and are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import Field

from fuserec.api import Algorithm, FloatRange, Histories, IntRange, SearchDim, multi_hot
from fuserec.features import USER_ATTRIBUTES, field_tokens, item_entities, user_attribute_matrix
from fuserec.segments import RARE_ITEM_BELOW
from fuserec.training import TorchConfig, fit_early_stopped, resolve_device, torch_threads

if TYPE_CHECKING:
    from fuserec.data.dataset import Dataset

INIT_STD = 0.1
MASKED = -1e9  # logit of a masked item; finite, so masked rows never produce NaN
TAIL_MARGIN = 1e-3  # the lifted best tail item lands this far above the familiar item it passes
MODULE_ARRAYS = ("context", "item_vectors", "attr_context", "tail", "log_popularity", "tail_gate")
MAX_PATHS = 10  # paths listed by explain()


class KGConfig(TorchConfig):
    search_space: ClassVar[dict[str, SearchDim]] = {
        "factors": IntRange(32, 128, log=True),
        "layers": IntRange(1, 3),
        "lr": FloatRange(1e-2, 1e-1, log=True),
        "reg": FloatRange(1e-7, 1e-4, log=True),
        "entity_weight": FloatRange(0.3, 3.0, log=True),
        "half_life": FloatRange(5.0, 80.0, log=True),
        "holdout": FloatRange(0.1, 0.5),
        "logit_adjust": FloatRange(0.0, 1.0),
        "tail_rank": IntRange(1, 10),
        "tail_users": FloatRange(0.05, 1.0),
    }

    factors: int = Field(64, ge=1, description="dimension of every node's embedding")
    layers: int = Field(2, ge=1, description="propagation steps over the graph (2 reaches item-entity-item)")
    lr: float = Field(0.05, gt=0.0, description="Adam learning rate")
    reg: float = Field(1e-5, ge=0.0, description="Adam weight decay on the base embeddings")
    entity_weight: float = Field(1.0, gt=0.0, description="weight of item-entity edges (user-item edges: 1)")
    year_entities: bool = Field(True, description="add exact release-year entities (year:1994) to decades")
    user_attributes: bool = Field(True, description="link users to their attribute entities")
    half_life: float = Field(
        20.0, gt=0.0, description="recency half-life, in history positions, of user edges"
    )
    holdout: float = Field(
        0.35, gt=0.0, lt=1.0, description="share of a history after the cut used as targets"
    )
    logit_adjust: float = Field(0.5, ge=0.0, description="tau: training logits + tau * log item prior")
    tail_rank: int = Field(1, ge=0, description="lift tail items so the best reaches this rank (0: off)")
    tail_users: float = Field(
        0.1,
        gt=0.0,
        le=1.0,
        description="share of training users, least popular histories first, given the slot",
    )
    tail_below: int = Field(RARE_ITEM_BELOW, ge=1, description="tail items have fewer training positives")
    threads: int | None = Field(
        1, ge=1, description="torch CPU threads while training (small steps: 1 is fastest)"
    )
    user_batch: int = Field(128, ge=1, description="users per optimiser step (at least; see max_steps)")
    max_steps: int = Field(
        64, ge=1, description="optimiser steps per epoch at most: each re-propagates the whole graph"
    )
    score_batch_size: int = Field(1024, ge=1, description="histories scored per block in score()")
    max_epochs: int = Field(
        80, ge=1, description="upper bound on epochs (early stopping usually ends sooner)"
    )
    patience: int = Field(6, ge=1, description="epochs without a validation gain before stopping")


@dataclass
class _Graph:
    """The knowledge graph of one dataset: incidence matrices and node names (no embeddings)."""

    item_entity: sp.csr_matrix  # [n_items, n_entities], binary
    user_attr: sp.csr_matrix  # [n_users, n_attrs], binary
    user_item: sp.csr_matrix  # [n_users, n_items], binary training positives
    entity_names: list[str]
    attr_names: list[str]

    @classmethod
    def build(cls, data: Dataset, cfg: KGConfig) -> _Graph:
        ents = item_entities(data.items)
        if cfg.year_entities:
            for row, years in zip(ents, field_tokens(data.items, "year", "year"), strict=True):
                row.extend(f"year:{y}" for y in years if f"year:{y}" not in row)
        names = sorted({e for row in ents for e in row})
        index = {e: k for k, e in enumerate(names)}
        rows = np.repeat(np.arange(len(ents)), [len(r) for r in ents])
        cols = np.array([index[e] for r in ents for e in r], dtype=np.int64)
        item_entity = _binary(rows, cols, (data.n_items, len(names)))
        if cfg.user_attributes:
            onehot, attr_names = user_attribute_matrix(data.users)
            user_attr = sp.csr_matrix((np.asarray(onehot) > 0).astype(np.float32))
        else:
            user_attr, attr_names = sp.csr_matrix((data.n_users, 0), dtype=np.float32), []
        user_item = data.matrix().astype(np.float32)
        return cls(item_entity, user_attr, user_item, names, list(attr_names))

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        """Node counts: items, entities, attributes, users (the order of the adjacency's blocks)."""
        return (
            self.user_item.shape[1],
            self.item_entity.shape[1],
            self.user_attr.shape[1],
            self.user_item.shape[0],
        )

    def adjacency(self, entity_weight: float, user_item: sp.csr_matrix | None = None) -> sp.csr_matrix:
        """Symmetric weighted adjacency over [items | entities | attributes | users]."""
        ui = self.user_item if user_item is None else user_item
        ie, ua = entity_weight * self.item_entity, self.user_attr
        return sp.bmat(
            [
                [None, ie, None, ui.T],
                [ie.T, None, None, None],
                [None, None, None, ua.T],
                [ui, None, ua, None],
            ],
            format="csr",
            dtype=np.float32,
        )


def _binary(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    mat = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)
    mat.sum_duplicates()
    mat.data[:] = 1.0
    return mat


def _normalised(adj: sp.csr_matrix, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``D^-1/2 W D^-1/2`` as a torch sparse tensor, and ``D^-1/2`` (0 for isolated nodes)."""
    deg = np.asarray(adj.sum(axis=1), dtype=np.float64).ravel()
    inv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-12)), 0.0)
    coo = (sp.diags(inv) @ adj @ sp.diags(inv)).tocoo()
    idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    values = torch.from_numpy(coo.data.astype(np.float32))
    mat = torch.sparse_coo_tensor(idx, values, coo.shape, check_invariants=False).coalesce()
    return mat.to(device), torch.from_numpy(inv.astype(np.float32)).to(device)


def recency_weights(histories: Histories, half_life: float) -> np.ndarray:
    """``2 ** (-age / half_life)`` per history entry (aligned with ``histories.items``); newest age 0."""
    lengths = histories.lengths
    age = np.repeat(histories.indptr[1:], lengths) - 1 - np.arange(len(histories.items))
    return np.exp2(-age / half_life).astype(np.float32)


class KnowledgeGraph(Algorithm):
    """LightGCN over users, items and entities with transient users; see the module docstring."""

    Config = KGConfig
    config: KGConfig
    user_attributes: ClassVar[frozenset[str]] = USER_ATTRIBUTES  # user -> attribute-value edges
    _module: _KGModule | None  # built lazily from the fitted state
    _graph: _ExplainGraph | None  # the explanations' walks, built lazily from the state

    def fit(self, data: Dataset) -> Self:
        cfg = self.config
        with torch_threads(cfg.threads):
            device = resolve_device(cfg.device)
            trainer, log = fit_early_stopped(lambda d: _Trainer(d, cfg, device), data, cfg, "kg")
        self.training_log_: list[dict[str, Any]] = log
        graph = trainer.graph
        module = trainer.scorer()
        titles = data.items.get("title")
        item_names = [
            str(titles.iloc[i]) if titles is not None and isinstance(titles.iloc[i], str) else f"item {i}"
            for i in range(data.n_items)
        ]
        self.set_state(
            {
                **{k: v.numpy().copy() for k, v in module.arrays().items()},
                "user_attr": graph.user_attr.toarray(),
                "item_entity_indptr": graph.item_entity.indptr.astype(np.int64),
                "item_entity_indices": graph.item_entity.indices.astype(np.int64),
                "user_item_indptr": graph.user_item.indptr.astype(np.int64),
                "user_item_indices": graph.user_item.indices.astype(np.int64),
                "item_names": np.array(item_names, dtype=str),
                "entity_names": np.array(graph.entity_names, dtype=str),
                "attr_names": np.array(graph.attr_names, dtype=str),
            }
        )
        self.n_items_ = data.n_items
        return self

    # -- scoring ------------------------------------------------------------------------------------
    def _scorer(self) -> _KGModule:
        module: _KGModule | None = getattr(self, "_module", None)
        if module is None:
            s = self.state_
            context, item_vectors, attr_context, tail, log_popularity, tail_gate = (
                torch.from_numpy(s[k]) for k in MODULE_ARRAYS
            )
            module = self._module = _KGModule(
                context,
                item_vectors,
                attr_context,
                tail,
                log_popularity,
                tail_gate,
                self.config.half_life,
                self.config.tail_rank,
            ).eval()
        return module

    def _blocks(self, histories: Histories) -> Any:
        """Per block of histories: rows, recency-weighted multi-hot, seen mask, attribute rows (or None)."""
        step = self.config.score_batch_size
        user_attr = self.state_.get("user_attr")  # absent from an explain state: no attributes there
        for start in range(0, len(histories), step):
            rows = np.arange(start, min(start + step, len(histories)))
            sub = histories.select(rows)
            shape = (len(rows), histories.n_items)
            weights = sp.csr_matrix(
                (recency_weights(sub, self.config.half_life), sub.items, sub.indptr), shape
            )
            attrs: torch.Tensor | None = None
            if sub.users is not None and user_attr is not None and user_attr.shape[1]:
                users = np.asarray(sub.users, dtype=np.int64)
                known = (users >= 0) & (users < len(user_attr))
                attr_rows = np.zeros((len(rows), user_attr.shape[1]), dtype=np.float32)
                attr_rows[known] = user_attr[users[known]]
                attrs = torch.from_numpy(attr_rows)
            yield (
                rows,
                torch.from_numpy(weights.toarray()),
                torch.from_numpy(sub.to_csr().toarray() > 0),
                attrs,
            )

    def score(self, histories: Histories) -> np.ndarray:
        """``u(h) . V_i`` with the tail slot; attributes join ``u`` when ``histories.users`` is known."""
        self._check_fitted()
        module = self._scorer()
        out = np.empty((len(histories), histories.n_items), dtype=np.float32)
        with torch.no_grad():
            for rows, weights, seen, attrs in self._blocks(histories):
                out[rows] = module.scores(weights, seen, attrs).numpy()
        return out

    def user_representation(self, histories: Histories) -> np.ndarray:
        """The transient user vectors ``u(h)``, ``[n_users, factors]``."""
        self._check_fitted()
        out = np.empty((len(histories), self.config.factors), dtype=np.float32)
        with torch.no_grad():
            for rows, weights, _, attrs in self._blocks(histories):
                out[rows] = self._scorer().user_vectors(weights, attrs).numpy()
        return out

    def item_representation(self) -> np.ndarray:
        """Propagated item vectors ``V`` (layer means), what user vectors are dotted with."""
        self._check_fitted()
        return self.state_["item_vectors"]

    def to_torch(self) -> torch.nn.Module:
        """``forward(history, user_features=None)``; ``user_feature_names``: the attributes it reads."""
        self._check_fitted()
        module = self._scorer()
        names = self.state_.get("attr_names")
        reads = names is not None and len(names) > 0 and module.attr_context.shape[0] == len(names)
        module.user_feature_names = tuple(str(n) for n in names) if reads and names is not None else ()
        return module

    # -- explanations -------------------------------------------------------------------------------
    def explain(self, history: np.ndarray, item: int) -> dict[str, Any]:
        """The heaviest graph paths from the history to ``item``, with each path's weight.

        A history item's weight is its exact share of ``u(h) . V_item``; it is spread over its two-hop
        paths to the item (shared entity; users who interacted with both) in proportion to their walk
        weights ``A[j, n] A[n, item]``. A history item with no two-hop path keeps its share on a
        ``latent`` path (its influence travels along longer walks).
        """
        n_items = self._check_fitted()
        s = self.state_
        hist = np.asarray(history, dtype=np.int64)
        full = self.score(Histories.from_lists([hist.tolist()], n_items))[0, item]
        weights = recency_weights(Histories.from_lists([hist.tolist()], n_items), self.config.half_life)
        norm = 1.0 / np.sqrt(max(float(weights.sum()), 1.0))
        share: dict[int, float] = {}
        for j, w in zip(hist.tolist(), weights.tolist(), strict=True):
            share[j] = share.get(j, 0.0) + float(w * norm * s["context"][j] @ s["item_vectors"][item])
        base = float(sum(share.values()))
        graph = self._explain_graph()
        saved = s.get("item_names")  # absent from an explain state: whoever shows the paths names items

        def name(j: int) -> str:
            return str(saved[j]) if saved is not None else f"item {j}"

        paths: list[dict[str, Any]] = []
        for j, part in share.items():
            walks = graph.two_hop(j, item)
            total = sum(walk["walk"] for walk in walks)
            if total <= 0:
                walks = [{"via": "latent", "node": "longer walks", "walk": 0.0}]
            for walk in walks:
                frac = walk["walk"] / total if total > 0 else 1.0
                paths.append(
                    {
                        "path": [name(j), walk["node"], name(item)],
                        "from_item": j,
                        "via": walk["via"],
                        "weight": part * frac,
                        "walk_share": frac,
                        **{k: v for k, v in walk.items() if k not in ("via", "node", "walk")},
                    }
                )
        paths.sort(key=lambda p: -p["weight"])
        return {
            "item": int(item),
            "item_name": name(item),
            "score": float(full),
            "tail_lift": float(full - base),
            "best_path": paths[0] if paths else None,
            "paths": paths[:MAX_PATHS],
            "contributions": sorted(share.items(), key=lambda kv: -kv[1]),
        }

    def explain_state(self) -> dict[str, np.ndarray]:
        """What :meth:`explain` reads, so the service can walk the same paths: ``C``, ``V`` and the
        scoring constants (the score and its tail lift), the item-entity and item-user incidence and the
        users' degrees (the walks). Not the user-attribute rows or any names but the entities' (the
        service's catalogue has the titles)."""
        self._check_fitted()
        s = self.state_
        return {k: s[k] for k in MODULE_ARRAYS} | self._explain_graph().arrays()

    def _explain_graph(self) -> _ExplainGraph:
        graph: _ExplainGraph | None = getattr(self, "_graph", None)
        if graph is None:  # built once: a served explanation must not re-transpose the graph per request
            graph = self._graph = _ExplainGraph.from_state(self.state_, self.config.entity_weight)
        return graph

    # -- persistence --------------------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        return dict(self.state_)

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self.state_ = {
            k: (np.asarray(v) if np.asarray(v).dtype.kind in "iuU" else np.asarray(v, dtype=np.float32))
            for k, v in state.items()
        }
        self._module = None
        self._graph = None


@dataclass
class _ExplainGraph:
    """The saved graph, for walk weights: incidence lists and weighted degrees."""

    item_entity: sp.csr_matrix  # [n_items, n_entities], binary
    item_user: sp.csr_matrix  # [n_items, n_users], binary training positives
    entity_names: np.ndarray
    item_degree: np.ndarray
    entity_degree: np.ndarray
    user_degree: np.ndarray  # training positives plus attributes of each user
    entity_weight: float

    @classmethod
    def from_state(cls, s: dict[str, np.ndarray], entity_weight: float) -> _ExplainGraph:
        """From a fitted state, or from an explain state (which keeps the incidence as walked)."""
        n_entities = len(s["entity_names"])
        if "item_user_indptr" in s:
            n_items = len(s["item_user_indptr"]) - 1
            ie = _incidence(s["item_entity_indptr"], s["item_entity_indices"], (n_items, n_entities))
            iu = _incidence(s["item_user_indptr"], s["item_user_indices"], (n_items, len(s["user_degree"])))
            return cls.build(ie, iu, s["entity_names"], s["user_degree"], entity_weight)
        n_items = len(s["item_names"])
        ie = _incidence(s["item_entity_indptr"], s["item_entity_indices"], (n_items, n_entities))
        n_users = len(s["user_item_indptr"]) - 1
        ui = _incidence(s["user_item_indptr"], s["user_item_indices"], (n_users, n_items))
        user_degree = np.asarray(ui.sum(1)).ravel() + s["user_attr"].sum(1)
        return cls.build(ie, ui.T.tocsr(), s["entity_names"], user_degree, entity_weight)

    @classmethod
    def build(
        cls,
        item_entity: sp.csr_matrix,
        item_user: sp.csr_matrix,
        entity_names: np.ndarray,
        user_degree: np.ndarray,
        entity_weight: float,
    ) -> _ExplainGraph:
        """Degrees from the incidence: one way for a fitted and an explain state, so both walk alike."""
        n_entities = item_entity.shape[1]
        entity_count = np.bincount(item_entity.indices, minlength=n_entities).astype(np.float32)
        item_degree = np.diff(item_user.indptr).astype(np.float32) + np.float32(entity_weight) * np.diff(
            item_entity.indptr
        ).astype(np.float32)
        return cls(
            item_entity,
            item_user,
            entity_names,
            item_degree,
            np.float32(entity_weight) * entity_count,
            np.asarray(user_degree, dtype=np.float32),
            entity_weight,
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """The incidence as :meth:`from_state` reads it back (int32 indices: half the bytes)."""
        return {
            "item_entity_indptr": self.item_entity.indptr.astype(np.int64),
            "item_entity_indices": self.item_entity.indices.astype(np.int32),
            "item_user_indptr": self.item_user.indptr.astype(np.int64),
            "item_user_indices": self.item_user.indices.astype(np.int32),
            "user_degree": self.user_degree,
            "entity_names": self.entity_names,
        }

    def two_hop(self, j: int, i: int) -> list[dict[str, Any]]:
        """Walk weights ``A[j, n] A[n, i]`` of the two-hop paths j -> n -> i (n: entity, or users)."""
        ends = np.sqrt(max(self.item_degree[j], 1e-12) * max(self.item_degree[i], 1e-12))
        out: list[dict[str, Any]] = []
        ent_j = self.item_entity.indices[self.item_entity.indptr[j] : self.item_entity.indptr[j + 1]]
        ent_i = self.item_entity.indices[self.item_entity.indptr[i] : self.item_entity.indptr[i + 1]]
        for e in np.intersect1d(ent_j, ent_i):
            walk = self.entity_weight**2 / (self.entity_degree[e] * ends)
            out.append(
                {"via": "entity", "node": str(self.entity_names[e]), "entity": int(e), "walk": float(walk)}
            )
        users_j = self.item_user.indices[self.item_user.indptr[j] : self.item_user.indptr[j + 1]]
        users_i = self.item_user.indices[self.item_user.indptr[i] : self.item_user.indptr[i + 1]]
        both = np.intersect1d(users_j, users_i)
        if len(both):
            walk = float((1.0 / np.maximum(self.user_degree[both], 1e-12)).sum() / ends)
            node = f"{len(both)} co-interacting user" + ("s" if len(both) > 1 else "")
            out.append({"via": "users", "node": node, "n_users": len(both), "walk": walk})
        return out


def _incidence(indptr: np.ndarray, indices: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """A binary CSR matrix from saved index arrays."""
    return sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=shape)


def epoch_batch(n_users: int, user_batch: int, max_steps: int) -> int:
    """Users per step: ``user_batch``, or more when that would need over ``max_steps`` steps."""
    return max(user_batch, -(-n_users // max_steps))


def _tail_gate(seen: sp.csr_matrix, log_popularity: np.ndarray, share: float) -> float:
    """Tail affinity below which a history gets the slot: the ``share`` quantile over training users.

    Halfway between two neighbouring users' affinities, so float rounding cannot flip a training user.
    """
    counts = np.diff(seen.indptr)
    if not (counts > 0).any():
        return -np.inf
    affinity = np.sort(np.asarray(seen @ log_popularity, dtype=np.float64)[counts > 0] / counts[counts > 0])
    if share >= 1.0:
        return float(affinity[-1]) + 1.0
    k = int(np.floor(share * (len(affinity) - 1)))
    return float((affinity[k] + affinity[k + 1]) / 2.0)


class _KGModule(torch.nn.Module):
    """Fitted constants and scoring; ``forward`` (padded history -> scores) is the exported graph."""

    user_feature_names: tuple[str, ...] = ()  # attribute columns of forward's user_features

    context: torch.Tensor
    item_vectors: torch.Tensor
    attr_context: torch.Tensor
    tail: torch.Tensor
    log_popularity: torch.Tensor
    tail_gate: torch.Tensor

    def __init__(
        self,
        context: torch.Tensor,
        item_vectors: torch.Tensor,
        attr_context: torch.Tensor,
        tail: torch.Tensor,
        log_popularity: torch.Tensor,
        tail_gate: torch.Tensor,
        half_life: float,
        tail_rank: int,
    ) -> None:
        super().__init__()
        self.register_buffer("context", context.float())
        self.register_buffer("item_vectors", item_vectors.float())
        self.register_buffer("attr_context", attr_context.float())
        self.register_buffer("tail", tail.float())
        self.register_buffer("log_popularity", log_popularity.float())
        self.register_buffer("tail_gate", tail_gate.float().reshape(1))
        self.half_life = float(half_life)
        n_familiar = int((tail < 0.5).sum())
        self.tail_rank = min(int(tail_rank), n_familiar) if bool((tail > 0.5).any()) else 0

    def arrays(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in MODULE_ARRAYS}

    def user_vectors(self, weights: torch.Tensor, attrs: torch.Tensor | None = None) -> torch.Tensor:
        """``u(h)`` from recency-weighted ``[B, n_items]`` histories and optional one-hot attributes."""
        summed = weights @ self.context
        degree = weights.sum(dim=1, keepdim=True)
        if attrs is not None:
            summed = summed + attrs @ self.attr_context
            degree = degree + attrs.sum(dim=1, keepdim=True)
        return summed * torch.rsqrt(torch.clamp(degree, min=1.0))

    def tail_affinity(self, seen: torch.Tensor) -> torch.Tensor:
        """Mean ``log(1 + training popularity)`` of the history's items (low: a taste for the tail)."""
        hot = seen.to(torch.float32)
        return (hot @ self.log_popularity) / torch.clamp(hot.sum(dim=1), min=1.0)

    def lift_tail(self, scores: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """Lift tail items so the best unseen one passes the ``tail_rank``-th best unseen familiar item.

        Only for non-empty histories whose tail affinity is at most ``tail_gate``.
        """
        if self.tail_rank <= 0:
            return scores
        tail = self.tail > 0.5
        familiar = scores.masked_fill(seen | tail, MASKED)
        threshold = torch.topk(familiar, self.tail_rank, dim=1).values[:, -1]
        best_tail = scores.masked_fill(seen | ~tail, MASKED).max(dim=1).values
        valid = (threshold > MASKED / 2) & (best_tail > MASKED / 2) & seen.any(dim=1)
        valid = valid & (self.tail_affinity(seen) <= self.tail_gate)
        lift = torch.where(
            valid, torch.relu(threshold + TAIL_MARGIN - best_tail), torch.zeros_like(threshold)
        )
        return scores + lift.unsqueeze(1) * self.tail

    def scores(
        self, weights: torch.Tensor, seen: torch.Tensor, attrs: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.lift_tail(self.user_vectors(weights, attrs) @ self.item_vectors.T, seen)

    def forward(self, history: torch.Tensor, user_features: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of padded histories; ``user_features`` (one-hot attributes, zeros = unknown) optional."""
        n_items = self.item_vectors.shape[0]
        valid = history >= 0
        lengths = valid.sum(dim=1, keepdim=True)
        position = torch.arange(history.shape[1], device=history.device).unsqueeze(0)
        age = torch.clamp(lengths - 1 - position, min=0).to(torch.float32)
        w = torch.where(valid, torch.exp2(-age / self.half_life), torch.zeros_like(age))
        idx = torch.where(valid, history, torch.full_like(history, n_items))
        weights = torch.zeros(history.shape[0], n_items + 1, dtype=torch.float32, device=history.device)
        weights = weights.scatter_add(1, idx, w)[:, :n_items]
        return self.scores(weights, multi_hot(history, n_items) > 0.5, user_features)


class _Trainer:
    """One model being trained on one dataset; what :func:`fit_early_stopped` drives epoch by epoch."""

    def __init__(self, data: Dataset, cfg: KGConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.graph = _Graph.build(data, cfg)
        self.hist = data.histories()
        self.rng = np.random.default_rng(cfg.seed)
        init = torch.Generator().manual_seed(cfg.seed)  # CPU: the same initial weights on any device
        n_items, n_entities, n_attrs, _ = self.graph.sizes
        base = torch.randn(n_items + n_entities + n_attrs, cfg.factors, generator=init) * INIT_STD
        self.base = torch.nn.Parameter(base.to(device))
        self.opt = torch.optim.Adam([self.base], lr=cfg.lr, weight_decay=cfg.reg)
        popularity = data.item_popularity().astype(np.float64) + 1.0
        log_prior = cfg.logit_adjust * np.log(popularity / popularity.sum())
        self.log_prior = torch.from_numpy(log_prior.astype(np.float32)).to(device)
        self.tail = torch.from_numpy((data.item_popularity() < cfg.tail_below).astype(np.float32))
        self.log_popularity = torch.from_numpy(np.log1p(data.item_popularity()).astype(np.float32))
        self.tail_gate = torch.tensor(
            [_tail_gate(self.hist.to_csr(), self.log_popularity.numpy(), cfg.tail_users)]
        )
        self.user_attr = torch.from_numpy(self.graph.user_attr.toarray()).to(device)
        self._scoring: KnowledgeGraph | None = None  # this epoch's parameters, for score()

    def propagate(
        self, adj: torch.Tensor, inv_sqrt_degree: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Context ``C`` of items and attributes, and item vectors ``V`` (see the module docstring)."""
        n_items, n_entities, n_attrs, n_users = self.graph.sizes
        k = self.cfg.layers
        h = torch.cat([self.base, torch.zeros(n_users, self.cfg.factors, device=self.device)])
        context, total = torch.zeros_like(h), h
        for _ in range(k):
            context = context + h
            h = torch.sparse.mm(adj, h)
            total = total + h
        context = context / (k + 1) * inv_sqrt_degree.unsqueeze(1)
        attrs = context[n_items + n_entities : n_items + n_entities + n_attrs]
        return context[:n_items], attrs, total[:n_items] / (k + 1)

    def _split(self) -> tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix]:
        """This epoch's cut of every history: (weighted inputs, targets, graph edges without targets)."""
        hist, cfg = self.hist, self.cfg
        lengths = hist.lengths
        n_users = len(lengths)
        user_of = np.repeat(np.arange(n_users), lengths)
        position = np.arange(len(hist.items)) - np.repeat(hist.indptr[:-1], lengths)
        cut = 1 + np.floor(self.rng.random(n_users) * np.maximum(lengths - 1, 0)).astype(np.int64)
        n_targets = np.maximum(1, np.rint(cfg.holdout * lengths)).astype(np.int64)
        cut_of = cut[user_of]
        inputs = position < cut_of
        targets = (position >= cut_of) & (position < cut_of + n_targets[user_of]) & (lengths[user_of] > 1)
        weights = np.exp2(-(cut_of - 1 - position) / cfg.half_life).astype(np.float32)
        shape = self.graph.user_item.shape

        def matrix(mask: np.ndarray, values: np.ndarray) -> sp.csr_matrix:
            return sp.csr_matrix((values[mask], (user_of[mask], hist.items[mask])), shape=shape)

        ones = np.ones(len(hist.items), np.float32)
        edges = _binary(user_of[~targets], hist.items[~targets], shape)
        return matrix(inputs, weights), matrix(targets, ones), edges

    def train_epoch(self) -> float:
        cfg = self.cfg
        inputs, targets, edges = self._split()
        adj, inv_sqrt_degree = _normalised(self.graph.adjacency(cfg.entity_weight, edges), self.device)
        users = self.rng.permutation(np.flatnonzero(np.diff(targets.indptr)))
        total, count = 0.0, 0
        step = epoch_batch(len(users), cfg.user_batch, cfg.max_steps)
        for start in range(0, len(users), step):
            batch = users[start : start + step]
            context, attr_context, items = self.propagate(adj, inv_sqrt_degree)
            x_in = torch.from_numpy(inputs[batch].toarray()).to(self.device)
            x_target = torch.from_numpy(targets[batch].toarray()).to(self.device)
            summed, degree = x_in @ context, x_in.sum(dim=1)
            if self.user_attr.shape[1]:
                attrs = self.user_attr[torch.from_numpy(batch).to(self.device)]
                summed, degree = summed + attrs @ attr_context, degree + attrs.sum(dim=1)
            user = summed * torch.rsqrt(torch.clamp(degree, min=1.0)).unsqueeze(1)
            logits = (user @ items.T + self.log_prior).masked_fill(x_in > 0, MASKED)
            n_targets = x_target.sum()
            loss = -(torch.log_softmax(logits, dim=1) * x_target).sum() / n_targets
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            total += float(loss.detach()) * float(n_targets)
            count += int(n_targets)
        self._scoring = None
        return total / max(count, 1)

    def scorer(self) -> _KGModule:
        """The current parameters as a CPU scoring module (constants; the full training graph)."""
        with torch.no_grad():
            adj, inv_sqrt_degree = _normalised(self.graph.adjacency(self.cfg.entity_weight), self.device)
            context, attr_context, items = self.propagate(adj, inv_sqrt_degree)
        return _KGModule(
            context.cpu(),
            items.cpu(),
            attr_context.cpu(),
            self.tail,
            self.log_popularity,
            self.tail_gate,
            self.cfg.half_life,
            self.cfg.tail_rank,
        )

    def score(self, histories: Histories) -> np.ndarray:
        """Scores with this epoch's parameters; one propagation per epoch, however many blocks ask."""
        if self._scoring is None:
            algo = KnowledgeGraph(self.cfg)
            algo.state_ = {
                **{k: v.numpy() for k, v in self.scorer().arrays().items()},
                "user_attr": self.graph.user_attr.toarray(),
            }
            algo._module = None
            algo.n_items_ = self.graph.sizes[0]
            self._scoring = algo
        return self._scoring.score(histories)
