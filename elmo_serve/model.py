"""The served model: an artifact (or any encoder + head) as a Serve replica and `elmo predict` hold it.

`load_model(path)` reads and checks an artifact (`training.artifact.load_artifact`) and scores a probe with it (a
text, or one sparse feature for a model trained on BoW features); `ServingModel.predict_batch` is the batched call
path: the scorer deployment's `@serve.batch` method calls it, and so do `elmo predict` and the direct (Ray-less)
benchmarks. Like `elmo_serve.scoring`, this module imports only torch, kernels and training at load time, so it runs
on a machine without Ray, pydantic or faiss.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from elmo_serve.scoring import Scorer, VectorIndex, spare_rows

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


class LabelChange(Protocol):
    """A change of the label table, as a catalogue log record holds it (`elmo_serve.catalogue_log.Record`)."""

    op: str  # "add" | "update" | "retire"
    uid: str
    title: str | None


class SharedLock:
    """Many holders of `shared()` at once, or one of `exclusive()`; a waiting exclusive holder goes before new shared
    ones (a replica that is never idle would starve it otherwise). Not reentrant."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared, self._exclusive, self._waiting = 0, False, 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass
class ServingModel:
    """What a replica serves: queries (texts -> head queries), scorer over the head, label table, version.

    `queries(texts)` returns the (B, D) fp32 queries that the stored head rows multiply (the head's input scaling and
    bias column included: `training.artifact.Artifact.queries`). A model trained on sparse BoW features takes
    features instead: `feature_queries(csr)` maps a (B, num_features) CSR to the same queries, and `queries` is not
    used. Head row j is label id `row_ids[j]` (identity when
    None). `label_vectors` (L, d) back the "embedding" mode of /v1/similar (faiss over normalized vectors); by default
    the head rows' first `vector_dim` columns (all columns when None).

    Live labels (`apply`): an added label takes the next id and the next head row, whose weights
    `zero_shot_rows(titles)` gives ((n, D) head rows of new labels' titles, in the head's dtype); a retitled label's
    row is written again in place; a retired label keeps its id and row, masked (`Scorer.retire_rows`): never
    returned by `predict_batch` or `similar_by_embedding` again. Thread safety: the scorer replica runs
    `predict_batch` and `similar_by_embedding` in worker threads, several at a time; they hold `lock.shared()`, and
    `apply` writes the head and swaps in the new label table under `lock.exclusive()`, so a change lands between two
    calls, never in one (the new titles' rows are computed before, outside the lock). Readers of `uids` / `titles`
    outside a call see whole lists: they are replaced, never changed in place.
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
    zero_shot_rows: Callable[[Sequence[str]], torch.Tensor] | None = None  # new labels' head rows (see above)
    lock: SharedLock = field(default_factory=SharedLock, repr=False)
    _apply_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    retired: frozenset[int] = frozenset()  # label ids retired by `apply`
    _uid_index: dict[str, int] = field(default_factory=dict, repr=False)
    _id_rows: torch.Tensor | None = field(default=None, repr=False)
    _item_index: VectorIndex | None = field(default=None, repr=False)
    _explicit_vectors: bool = field(default=False, repr=False)

    def __post_init__(self):
        n = self.scorer.num_labels
        if len(self.uids) != n or len(self.titles) != n:
            raise ValueError(f"label table has {len(self.uids)} uids / {len(self.titles)} titles for {n} labels")
        self._uid_index = {u: i for i, u in enumerate(self.uids)}
        self._explicit_vectors = self.label_vectors is not None
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
        """Label ids handed out (0..num_labels-1), retired ones included."""
        return self.scorer.num_labels

    @property
    def num_live(self) -> int:
        """Labels that can be returned: num_labels minus the retired ones."""
        return self.scorer.num_live

    def apply(self, changes: Sequence[LabelChange]) -> list[int]:
        """Apply changes in order (add: a new uid and its title; update: a new title; retire) and return the label id
        of each. A change that does not fit (an existing uid added, an unknown or retired one changed) raises
        ValueError before anything changes. The catalogue (`elmo_serve.catalogue`) checks changes before they are
        logged; this applies what the log holds, so both hand out the same ids."""
        with self._apply_lock:  # one change at a time: prepare and commit must not interleave with another's
            return self._apply(changes)

    def _apply(self, changes: Sequence[LabelChange]) -> list[int]:
        if self._explicit_vectors:
            raise ValueError("this model's label vectors were given (label_vectors): live labels need the head's")
        uids, titles, index, retired = list(self.uids), list(self.titles), dict(self._uid_index), set(self.retired)
        written: dict[int, str] = {}
        out = []
        for c in changes:
            i = index.get(c.uid)
            if c.op == "add":
                if i is not None:
                    raise ValueError(f"add {c.uid!r}: the uid exists (label id {i})")
                i = index[c.uid] = len(uids)
                uids.append(c.uid)
                titles.append(c.title)
            elif c.op not in ("update", "retire"):
                raise ValueError(f"unknown change {c.op!r}")
            elif i is None or i in retired:
                raise ValueError(f"{c.op} {c.uid!r}: {'unknown' if i is None else 'retired'} label")
            elif c.op == "update":
                titles[i] = c.title
            else:
                retired.add(i)
            if c.op != "retire":
                written[i] = c.title
            out.append(i)
        ids = sorted(written)
        if ids and self.zero_shot_rows is None:
            raise ValueError("this model has no zero-shot rows for new labels' titles (zero_shot_rows)")
        values = self.zero_shot_rows([written[i] for i in ids]) if ids else None
        n_old, n_new = len(self.uids), len(uids)
        # New ids take the new rows, in order; adds are made ready beside the running predictions (Scorer.prepare).
        extend = torch.arange(n_old, n_new)
        row_of = dict(zip(extend.tolist(), extend.tolist(), strict=True))
        rows = [row_of[i] if i >= n_old else self._to_rows([i])[0] for i in ids]
        prepared = self.scorer.prepare(rows, values) if ids else None
        with self.lock.exclusive():
            if n_new > n_old and self.row_ids is not None:
                self.row_ids = torch.cat([self.row_ids, extend])
                self._id_rows = torch.cat([self._id_rows, extend])
            if prepared is not None:
                self.scorer.commit(prepared)
            gone = sorted(retired - self.retired)
            if gone:
                self.scorer.retire_rows(self._to_rows(gone))
            self.uids, self.titles, self._uid_index, self.retired = uids, titles, index, frozenset(retired)
            if self._item_index is not None:  # built already: changed in place, as the head was
                vectors = self._vectors(ids)
                grown = torch.empty(n_new, self.label_vectors.shape[1])
                grown[:n_old] = self.label_vectors
                grown[ids] = vectors
                self.label_vectors = grown
                self._item_index.remove([i for i in ids if i < n_old] + gone)
                keep = [j for j, i in enumerate(ids) if i not in retired]
                self._item_index.add([ids[j] for j in keep], vectors[keep])
        return out

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
        top-k call (pad_to: see `Scorer.topk`). Retired labels are never returned (excluding one changes nothing)."""
        with self.lock.shared():
            return self._predict_batch(queries, pad_to)

    def _live_rows(self, ids: Sequence[int]) -> list[int]:
        """The head rows of `ids` that are not retired (a retired row is masked anyway)."""
        return self._to_rows([i for i in ids if i not in self.retired] if self.retired else ids)

    def _predict_batch(self, queries: Sequence[Query], pad_to: int = 0) -> list[list[tuple[list[int], list[float]]]]:
        owner = [j for j, q in enumerate(queries) for _ in range(q.size)]
        if not owner:
            return [[] for _ in queries]
        excl = [self._live_rows(queries[j].exclude) for j in owner]
        kmax = max(q.k for q in queries)
        if kmax + max(len(set(e)) for e in excl) > self.num_live:
            # One call cannot give every row kmax labels: answer the queries one by one.
            if len(queries) > 1:
                return [self._predict_batch([q])[0] for q in queries]
            return self._one_by_one(queries[0])
        scores, rows = self.scorer.topk(self._encode(queries), kmax, excl, pad_to=pad_to)
        ids = self._to_ids(rows)
        out: list[list[tuple[list[int], list[float]]]] = [[] for _ in queries]
        for b, j in enumerate(owner):
            k = queries[j].k
            out[j].append((ids[b, :k].tolist(), scores[b, :k].tolist()))
        return out

    def _one_by_one(self, q: Query):
        x = self._encode([q])
        s, r = self.scorer.topk(x, q.k, [self._live_rows(q.exclude)] * q.size)
        ids = self._to_ids(r)
        return [(ids[b].tolist(), s[b].tolist()) for b in range(q.size)]

    def item_text(self, label_id: int) -> str:
        return self.titles[label_id] or self.uids[label_id]

    def _vectors(self, ids: Sequence[int]) -> torch.Tensor:
        """The normalized fp32 CPU vectors of labels `ids` for /v1/similar mode=embedding: their head rows' first
        `vector_dim` columns."""
        rows = torch.as_tensor(self._to_rows(ids), dtype=torch.int64, device=self.scorer.weights.device)
        return torch.nn.functional.normalize(self.scorer.weights[rows, : self.vector_dim].float().cpu(), dim=1)

    @torch.inference_mode()
    def similar_by_embedding(self, label_id: int, k: int) -> tuple[list[int], list[float]]:
        """Nearest labels by cosine of their vectors (faiss flat index, built on first use), the item and retired
        labels excluded."""
        with self.lock.shared():
            if self._item_index is None:
                v = self.label_vectors
                if v is None:
                    v = self._vectors(range(self.num_labels))
                v = torch.nn.functional.normalize(v.float().cpu(), dim=1)
                live = torch.tensor([i for i in range(self.num_labels) if i not in self.retired], dtype=torch.int64)
                self.label_vectors = v
                self._item_index = VectorIndex(v[live], live, "flat")
            q = self.label_vectors[label_id : label_id + 1].contiguous().numpy()
            scores, ids = self._item_index.search(q, min(k + 1, self._item_index.ntotal))
        pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0 and i != label_id]
        return [i for i, _ in pairs[:k]], [s for _, s in pairs[:k]]


def serving_model(path: str | Path, backend: str = "auto", *, live_labels: bool = False) -> ServingModel:
    """The artifact at `path` as a ServingModel: its queries (`Artifact.queries`), head and label table, and the
    zero-shot rows of new labels (`Artifact.zero_shot_rows`). live_labels: allocate the head with spare rows
    (`elmo_serve.scoring.spare_rows`), so that added labels need no reallocation."""
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
        scorer=Scorer(
            art.model.head.weight, art.num_labels, backend, spare=spare_rows(art.num_labels) if live_labels else 0
        ),
        uids=[str(x.get("uid", x["id"])) for x in art.labels],
        titles=[x["title"] for x in art.labels],
        vector_dim=manifest["dim"],  # /v1/similar mode=embedding: the label vectors without the bias column
        info=info,
        # trained on sparse BoW features: no featurizer for texts, and an embedding table over the data's features
        feature_queries=feature_queries if bow else None,
        num_features=manifest["encoder"]["config"]["num_features"] if bow else None,
        zero_shot_rows=art.zero_shot_rows,
    )


def load_model(
    path: str | Path | ServingModel | Callable[[], ServingModel], backend: str = "auto", *, live_labels: bool = False
) -> ServingModel:
    """Load and validate an artifact (`serving_model`, with spare head rows when live_labels) and score a probe text
    with it.

    A ServingModel, or a function that builds one in the replica, is taken as it is (embedding the app in a Python
    program, synthetic benchmarks, tests).
    """
    if isinstance(path, ServingModel):
        return path
    if callable(path):
        return path()
    model = serving_model(path, backend, live_labels=live_labels)
    # The probe: encoder + head run end to end (a model trained on features: one feature).
    probe = Query([], 1, features=[[(0, 1.0)]]) if model.takes_features else Query([model.item_text(0)], 1)
    model.predict_batch([probe])
    return model
