"""The served model: an artifact (or any encoder + head) as a Serve replica and `elmo predict` hold it.

`load_model(path)` reads and checks an artifact (`training.artifact.load_artifact`) and scores a probe with it (a
text, or one sparse feature for a model trained on BoW features); `ServingModel.predict_batch` is the batched call
path: the scorer deployment's `@serve.batch` method calls it, and so do `elmo predict` and the direct (Ray-less)
benchmarks. Like `elmo_serve.scoring`, this module imports only torch, kernels and training at load time, so it runs
on a machine without Ray, pydantic or faiss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from elmo_serve.scoring import Scorer, build_index

if TYPE_CHECKING:
    import scipy.sparse as sp


@dataclass
class Query:
    """One request of a batch: its texts (or, for a model trained on sparse features, per item its (index, value)
    pairs, and texts empty), k, and label ids to leave out of every item's answer."""

    texts: list[str]
    k: int
    exclude: list[int] = field(default_factory=list)
    features: list[list[tuple[int, float]]] | None = None

    @property
    def size(self) -> int:
        return len(self.features) if self.features is not None else len(self.texts)


def features_csr(items: Sequence[Sequence[tuple[int, float]]], num_features: int) -> sp.csr_matrix:
    """Per item (index, value) pairs -> the (items, num_features) float32 CSR that `training.data.read_bow` reads a
    BoW split into (duplicates summed, indices sorted), so an item embeds as that row of the training data does."""
    import numpy as np
    import scipy.sparse as sp

    counts = [len(pairs) for pairs in items]
    rows = np.repeat(np.arange(len(items), dtype=np.int64), counts)
    cols = np.fromiter((i for pairs in items for i, _ in pairs), dtype=np.int64, count=sum(counts))
    vals = np.fromiter((v for pairs in items for _, v in pairs), dtype=np.float32, count=sum(counts))
    m = sp.csr_matrix((vals, (rows, cols)), shape=(len(items), num_features))
    m.sum_duplicates()
    return m


@dataclass
class ServingModel:
    """What a replica serves: queries (texts -> head queries), scorer over the head, label table, version.

    `queries(texts)` returns the (B, D) fp32 queries that the stored head rows multiply (the head's input scaling and
    bias column included: `training.artifact.Artifact.queries`). A model trained on sparse BoW features takes
    features instead: `feature_queries(csr)` maps a (B, num_features) CSR to the same queries, and `queries` is not
    used. Head row j is label id `row_ids[j]` (identity when
    None). `label_vectors` (L, d) back the "embedding" mode of /v1/similar (faiss over normalized vectors); by default
    the head rows' first `vector_dim` columns (all columns when None).
    """

    version: str
    queries: Callable[[Sequence[str]], torch.Tensor]
    scorer: Scorer
    uids: list[str]
    titles: list[str]
    row_ids: torch.Tensor | None = None
    label_vectors: torch.Tensor | None = None
    vector_dim: int | None = None
    info: dict = field(default_factory=dict)
    feature_queries: Callable[[sp.csr_matrix], torch.Tensor] | None = None
    num_features: int | None = None  # the feature index range of a model that takes features
    _uid_index: dict[str, int] = field(default_factory=dict, repr=False)
    _id_rows: torch.Tensor | None = field(default=None, repr=False)
    _item_index: object = field(default=None, repr=False)

    def __post_init__(self):
        n = self.scorer.num_labels
        if len(self.uids) != n or len(self.titles) != n:
            raise ValueError(f"label table has {len(self.uids)} uids / {len(self.titles)} titles for {n} labels")
        self._uid_index = {u: i for i, u in enumerate(self.uids)}
        if (self.feature_queries is None) != (self.num_features is None):
            raise ValueError("a model that takes features needs both feature_queries and num_features")
        if self.row_ids is not None:
            self.row_ids = torch.as_tensor(self.row_ids, dtype=torch.int64)
            if sorted(self.row_ids.tolist()) != list(range(n)):
                raise ValueError("row_ids must be a permutation of the label ids")
            self._id_rows = torch.empty(n, dtype=torch.int64)
            self._id_rows[self.row_ids] = torch.arange(n)

    @property
    def num_labels(self) -> int:
        return self.scorer.num_labels

    @property
    def takes_features(self) -> bool:
        return self.feature_queries is not None

    def _encode(self, queries: Sequence[Query]) -> torch.Tensor:
        """The head queries of every item of `queries`, in order: from their texts, or their features."""
        if self.takes_features:
            if any(q.features is None for q in queries):
                raise ValueError("this model takes features, not text")
            return self.feature_queries(features_csr([p for q in queries for p in q.features], self.num_features))
        if any(q.features is not None for q in queries):
            raise ValueError("this model takes texts, not features")
        return self.queries([t for q in queries for t in q.texts])

    def id_of(self, uid: str) -> int | None:
        return self._uid_index.get(uid)

    def _to_ids(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.row_ids is None else self.row_ids[rows]

    def _to_rows(self, ids: Sequence[int]) -> list[int]:
        return list(ids) if self._id_rows is None else self._id_rows[torch.as_tensor(ids, dtype=torch.int64)].tolist()

    @torch.inference_mode()
    def predict_batch(self, queries: Sequence[Query], *, pad_to: int = 0) -> list[list[tuple[list[int], list[float]]]]:
        """Per query, per item (text or feature list): (label ids, scores), best first. Encodes all items at once, one
        top-k call (pad_to: see `Scorer.topk`)."""
        owner = [j for j, q in enumerate(queries) for _ in range(q.size)]
        if not owner:
            return [[] for _ in queries]
        excl = [self._to_rows(queries[j].exclude) for j in owner]
        kmax = max(q.k for q in queries)
        if kmax + max(len(set(e)) for e in excl) > self.num_labels:
            # One call cannot give every row kmax labels: answer the queries one by one.
            return [self.predict_batch([q])[0] for q in queries] if len(queries) > 1 else self._one_by_one(queries[0])
        scores, rows = self.scorer.topk(self._encode(queries), kmax, excl, pad_to=pad_to)
        ids = self._to_ids(rows)
        out: list[list[tuple[list[int], list[float]]]] = [[] for _ in queries]
        for b, j in enumerate(owner):
            k = queries[j].k
            out[j].append((ids[b, :k].tolist(), scores[b, :k].tolist()))
        return out

    def _one_by_one(self, q: Query):
        x = self._encode([q])
        s, r = self.scorer.topk(x, q.k, [self._to_rows(q.exclude)] * q.size)
        ids = self._to_ids(r)
        return [(ids[b].tolist(), s[b].tolist()) for b in range(q.size)]

    def item_text(self, label_id: int) -> str:
        return self.titles[label_id] or self.uids[label_id]

    @torch.inference_mode()
    def similar_by_embedding(self, label_id: int, k: int) -> tuple[list[int], list[float]]:
        """Nearest labels by cosine of their vectors (faiss flat index, built on first use), the item excluded."""
        if self._item_index is None:
            v = self.label_vectors
            if v is None:
                rows = self._id_rows if self._id_rows is not None else torch.arange(self.num_labels)
                v = self.scorer.weights[rows.to(self.scorer.weights.device), : self.vector_dim]
            v = torch.nn.functional.normalize(v.float().cpu(), dim=1)
            self.label_vectors = v
            self._item_index = build_index(v, "flat")
        q = self.label_vectors[label_id : label_id + 1].contiguous().numpy()
        scores, ids = self._item_index.search(q, min(k + 1, self.num_labels))
        pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0 and i != label_id]
        return [i for i, _ in pairs[:k]], [s for _, s in pairs[:k]]


def serving_model(path: str | Path, backend: str = "auto") -> ServingModel:
    """The artifact at `path` as a ServingModel: its queries (`Artifact.queries`), head and label table."""
    from training.artifact import load_artifact

    scorer_device = "cuda" if backend in ("auto", "triton") and torch.cuda.is_available() else "cpu"
    art = load_artifact(path, device=scorer_device)
    manifest = art.manifest
    # From the content (manifest.json and every file's checksum): weights changed in place get a new version.
    version = f"{Path(path).resolve().name}-{art.version}"
    info = {
        "artifact": str(Path(path).resolve()),
        "dim": manifest["dim"],
        "head_dtype": manifest["head"]["dtype"],
        "encoder": manifest["encoder"]["kind"],
        "metrics": manifest.get("metrics", {}),
        "manifest": {k: v for k, v in manifest.items() if k not in ("training", "metrics")},
    }
    m, bow = art.model, art.model.featurizer is None and manifest["encoder"]["kind"] == "hashed"

    def feature_queries(x: sp.csr_matrix) -> torch.Tensor:
        # The evaluation path of a BoW split (`training.build.encoder_inputs` with its features), then the head input.
        return m.head.head_input(m.embed(*m.encoder_inputs(features=x))).float()

    return ServingModel(
        version=version,
        queries=art.queries,
        scorer=Scorer(art.model.head.weight, art.num_labels, backend),
        uids=[str(x.get("uid", x["id"])) for x in art.labels],
        titles=[x["title"] for x in art.labels],
        vector_dim=manifest["dim"],  # /v1/similar mode=embedding: the label vectors without the bias column
        info=info,
        # trained on sparse BoW features: no featurizer for texts, and an embedding table over the data's features
        feature_queries=feature_queries if bow else None,
        num_features=manifest["encoder"]["config"]["num_features"] if bow else None,
    )


def load_model(path: str | Path | ServingModel | Callable[[], ServingModel], backend: str = "auto") -> ServingModel:
    """Load and validate an artifact (`serving_model`) and score a probe text with it.

    A ServingModel, or a function that builds one in the replica, is taken as it is (embedding the app in a Python
    program, synthetic benchmarks, tests).
    """
    if isinstance(path, ServingModel):
        return path
    if callable(path):
        return path()
    model = serving_model(path, backend)
    # The probe: encoder + head run end to end (a model trained on features: one feature).
    probe = Query([], 1, features=[[(0, 1.0)]]) if model.takes_features else Query([model.item_text(0)], 1)
    model.predict_batch([probe])
    return model
