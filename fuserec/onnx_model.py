"""The served graph: padded histories in; all scores, top-k item indices, their scores and each model's
contribution out.

Inputs: ``history`` always; ``last_time`` when the scorer reads time (stacking); ``user_features`` when a
component reads user attributes (two-tower, kg): one-hot columns named in the graph's metadata
(:data:`FEATURE_NAMES_KEY`), all zeros for a user whose attributes are unknown, which scores exactly as
a history-only graph would.

The same wrapper turns any ``Algorithm.to_torch()`` scorer into the exported model, so every plugin (and
later every fuser) is served the same way, and new users or fresh events need no retraining.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from fuserec.api import USER_FEATURES, Algorithm, multi_hot, user_feature_names
from fuserec.rerank import Rerank, mmr_top_k, unit_vectors
from fuserec.trees import TRANSLATIONS

if TYPE_CHECKING:
    from fuserec.fusion import FusedModule, Fuser

INPUT_NAME = "history"
TIME_INPUT = "last_time"
OUTPUT_NAMES = ("scores", "top_items", "top_scores")
#: ``float32 [M, B, n_items]``: each component's share of ``scores`` (a fuser's components in manifest
#: order; a single algorithm is its own one component). What ``/explain`` and ``/recommend`` report.
CONTRIBUTIONS = "contributions"
#: The graph's metadata key listing the ``user_features`` columns (JSON list of ``"column:value"``).
FEATURE_NAMES_KEY = "fuserec.user_features"


Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def uses_time(scorer: object) -> bool:
    """Whether ``scorer`` (e.g. a stacking fuser) also reads each user's latest event time."""
    return bool(getattr(scorer, "uses_time", False))


class TopKModel(torch.nn.Module):
    """Wraps a scorer: sanitises ids, excludes seen items, takes the top ``k``.

    Ids outside ``[0, n_items)`` are treated as padding before any Gather, so a bad id can never index
    out of bounds (onnxruntime on CUDA does not bound-check). Top-k ties go to the lower item index
    (ONNX TopK's rule), as in the evaluation protocol.
    """

    def __init__(
        self, scorer: torch.nn.Module, n_items: int, k: int, reranker: Reranker | None = None
    ) -> None:
        super().__init__()
        self.scorer = scorer
        self.n_items = n_items
        self.k = min(k, n_items)
        self.reranker = reranker

    def forward(self, history: torch.Tensor) -> Outputs:
        return self.top_k(history, None)

    def top_k(
        self, history: torch.Tensor, last_time: torch.Tensor | None, user_features: torch.Tensor | None = None
    ) -> Outputs:
        valid = (history >= 0) & (history < self.n_items)
        history = torch.where(valid, history, torch.full_like(history, -1))
        if hasattr(self.scorer, "contributions"):  # a fuser: its components' shares come along
            fused = cast("FusedModule", self.scorer)
            scores, parts = fused.contributions(history, last_time, user_features)
        else:
            scores = self.scorer(history) if user_features is None else self.scorer(history, user_features)
            parts = scores.unsqueeze(0)
        seen = multi_hot(history, self.n_items) > 0
        if self.reranker is not None:
            top_items = self.reranker(scores, seen, self.k)
            top_scores = scores.gather(1, torch.clamp(top_items, min=0))
            return scores, top_items, top_scores, parts
        masked = scores.masked_fill(seen, float("-inf"))
        top_scores, top_items = torch.topk(masked, self.k, dim=1)
        return scores, top_items, top_scores, parts


class Reranker(torch.nn.Module):
    """MMR diversity and novelty re-ranking (see :mod:`fuserec.rerank`) as part of the served graph."""

    vectors: torch.Tensor
    bonus: torch.Tensor

    def __init__(self, rerank: Rerank, vectors: np.ndarray, bonus: np.ndarray) -> None:
        super().__init__()
        self.rerank = rerank
        self.register_buffer("vectors", torch.from_numpy(unit_vectors(vectors)))
        self.register_buffer("bonus", torch.from_numpy(np.asarray(bonus, dtype=np.float32)))

    def forward(self, scores: torch.Tensor, seen: torch.Tensor, k: int) -> torch.Tensor:
        return mmr_top_k(scores, seen, self.vectors, self.bonus, k, self.rerank)


class TimedTopKModel(TopKModel):
    """:class:`TopKModel` for scorers that read time: a second input, ``last_time int64 [B]``."""

    def forward(self, history: torch.Tensor, last_time: torch.Tensor) -> Outputs:  # type: ignore[override]
        return self.top_k(history, last_time)


class FeaturedTopKModel(TopKModel):
    """:class:`TopKModel` for scorers that read attributes: a second input, ``user_features [B, f]``."""

    def forward(self, history: torch.Tensor, user_features: torch.Tensor) -> Outputs:  # type: ignore[override]
        return self.top_k(history, None, user_features)


class TimedFeaturedTopKModel(TopKModel):
    """Both: ``history``, ``last_time``, ``user_features``."""

    def forward(  # type: ignore[override]
        self, history: torch.Tensor, last_time: torch.Tensor, user_features: torch.Tensor
    ) -> Outputs:
        return self.top_k(history, last_time, user_features)


def export_onnx(
    algo: Algorithm | Fuser, path: str | Path, k: int, opset: int = 18, reranker: Reranker | None = None
) -> Path:
    """Export ``algo``'s scoring as one ONNX graph with dynamic batch and history length.

    With a ``reranker``, ``top_items`` are the re-ranked (diversified) list and ``top_scores`` their scores.
    The file is self-contained unless the weights pass :data:`EXTERNAL_DATA_BYTES` (protobuf cannot hold
    2 GiB, e.g. userknn's dense user matrix at ML-10M size): then they go to ``<file>.data`` beside it,
    which onnxruntime reads from the same folder.
    """
    from torch.export import Dim

    n_items = algo._check_fitted()
    scorer = algo.to_torch()
    features = user_feature_names(scorer)
    example = torch.tensor([[0, min(1, n_items - 1), -1], [min(2, n_items - 1), -1, -1]], dtype=torch.int64)
    batch = Dim("batch")
    inputs: list[torch.Tensor] = [example]
    shapes: list[dict[int, Any]] = [{0: batch, 1: Dim("history_len")}]
    names = [INPUT_NAME]
    if uses_time(algo):
        inputs.append(torch.tensor([10**9, 10**9 + 1], dtype=torch.int64))
        shapes.append({0: batch})
        names.append(TIME_INPUT)
    if features:
        onehot = torch.zeros(2, len(features), dtype=torch.float32)
        onehot[0, 0] = 1.0
        inputs.append(onehot)
        shapes.append({0: batch})
        names.append(USER_FEATURES)
    wrapper = {
        (False, False): TopKModel,
        (True, False): TimedTopKModel,
        (False, True): FeaturedTopKModel,
        (True, True): TimedFeaturedTopKModel,
    }[(uses_time(algo), bool(features))]
    model = wrapper(scorer, n_items, k, reranker).eval()
    # the column names travel inside the graph: whoever feeds it encodes the same way
    metadata = {FEATURE_NAMES_KEY: json.dumps(list(features))} if features else {}
    return save_onnx(model, inputs, names, [*OUTPUT_NAMES, CONTRIBUTIONS], shapes, path, opset, metadata)


def save_onnx(
    module: torch.nn.Module,
    inputs: list[torch.Tensor],
    input_names: list[str],
    output_names: list[str],
    shapes: list[dict[int, Any]],
    path: str | Path,
    opset: int,
    metadata: dict[str, str],
) -> Path:
    """Export ``module`` (with the trees' translations) to ``path`` with ``metadata`` in the file.

    What every served graph goes through, ranking or rating. The weights go to ``<file>.data`` beside it
    when they pass :data:`EXTERNAL_DATA_BYTES` (protobuf cannot hold 2 GiB).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            tuple(inputs),
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=tuple(shapes),
            opset_version=opset,
            external_data=False,
            verbose=False,
            custom_translation_table=TRANSLATIONS,
        )
    assert program is not None  # dynamo=True always returns the ONNXProgram
    program.model.metadata_props.update(metadata)
    program.save(str(path), external_data=weight_bytes(module) > EXTERNAL_DATA_BYTES)
    return path


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers: what the exported graph stores as initializers."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


EXTERNAL_DATA_BYTES = 1 << 30  # above 1 GiB of weights, store them beside the graph (protobuf: 2 GiB)


def inference_session(
    path: str | Path,
    providers: list[str] | None = None,
    threads: int = 0,
    spinning: bool = True,
    prepack: bool = True,
) -> Any:
    """An ``onnxruntime.InferenceSession`` over ``path`` on exactly ``providers`` (default CPU), quiet.

    A provider that is not installed is an error naming the ones that are, never a silent fallback.
    ``threads``: intra-op threads (0 = one per core); ``spinning=False`` lets idle pool threads sleep (a
    server sharing its cores); ``prepack=False`` keeps a second, pre-packed copy of MatMul weights out of
    memory.
    """
    import onnxruntime as ort

    providers = providers or ["CPUExecutionProvider"]
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise RuntimeError(
            f"onnxruntime providers {missing} are not available here "
            f"(available: {ort.get_available_providers()}); set export.providers in params.yaml"
        )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


class OnnxRecommender:
    """An onnxruntime session over an exported model, with its providers named explicitly."""

    def __init__(
        self,
        path: str | Path,
        providers: list[str] | None = None,
        threads: int = 0,
        spinning: bool = True,
        prepack: bool = False,
    ) -> None:
        """``threads`` intra-op threads (0 = onnxruntime's default, one per core); ``spinning=False`` makes
        idle pool threads sleep instead of busy-waiting, which a server sharing its cores needs.

        ``prepack=False`` keeps onnxruntime from re-packing MatMul weights at load, which holds a second
        copy of them: on a large model that roughly doubles the session's memory for no speed that
        matters (``export.prepack``)."""
        self.session = inference_session(path, providers, threads, spinning, prepack)
        self.providers = self.session.get_providers()

        inputs = {i.name for i in self.session.get_inputs()}
        self.uses_time = TIME_INPUT in inputs
        self.outputs = [o.name for o in self.session.get_outputs()]
        #: the ``user_features`` columns (empty: the graph reads no attributes)
        self.feature_names: tuple[str, ...] = ()
        if USER_FEATURES in inputs:
            meta = self.session.get_modelmeta().custom_metadata_map
            self.feature_names = tuple(json.loads(meta[FEATURE_NAMES_KEY]))

    def _feed(
        self, padded: np.ndarray, last_time: np.ndarray | None, features: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        feed = {INPUT_NAME: padded.astype(np.int64)}
        if self.feature_names:  # unknown attributes (None or zero rows) score as a history-only graph
            shape = (len(padded), len(self.feature_names))
            feed[USER_FEATURES] = (
                np.zeros(shape, np.float32) if features is None else np.asarray(features, np.float32)
            )
            if feed[USER_FEATURES].shape != shape:
                raise ValueError(
                    f"user_features must be float32 {list(shape)} (columns: the graph's feature_names), "
                    f"got {list(feed[USER_FEATURES].shape)}"
                )
        if self.uses_time:
            if last_time is None:
                raise ValueError(
                    "this model reads time: pass last_time, int64 [B] unix seconds of each user's latest "
                    "event (the request time for a user with no history)"
                )
            feed[TIME_INPUT] = np.asarray(last_time, dtype=np.int64).reshape(-1)
        return feed

    def run(
        self, padded: np.ndarray, last_time: np.ndarray | None = None, features: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, top item indices, top scores) for ``int64 [B, L]`` padded histories.

        Models with a ``last_time`` input (fusers that read time) need each user's latest event time;
        ``features`` are the ``user_features`` rows where the graph reads attributes (None: unknown).
        """
        scores, items, top = self.session.run(list(OUTPUT_NAMES), self._feed(padded, last_time, features))
        return scores, items, top

    def run_with_contributions(
        self, padded: np.ndarray, last_time: np.ndarray | None = None, features: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`run`'s outputs plus ``contributions [M, B, n_items]``, each component's share of scores."""
        if CONTRIBUTIONS not in self.outputs:
            raise RuntimeError(
                f"this model has no {CONTRIBUTIONS!r} output (exported by an older fuserec): re-run the "
                "export stage (`fuserec stage export`) to serve contributions and explanations"
            )
        scores, items, top, parts = self.session.run(
            [*OUTPUT_NAMES, CONTRIBUTIONS], self._feed(padded, last_time, features)
        )
        return scores, items, top, parts
