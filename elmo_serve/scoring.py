"""Scoring: one top-k interface over three backends.

Backends of `Scorer` (all return head rows, scores descending, equal scores by the lower row):
- "triton": the fused chunked top-k kernel (`elmo_kernels.topk.topk_scores`, impl="triton") on a CUDA device; never
  materializes the B x L logits.
- "torch": on the CPU with an fp8/bf16 head, a bf16 screen of all labels and exact fp32 rescoring of the few that can
  be in the top-k (`elmo_kernels.topk.cpu`); otherwise the chunked torch path of `topk_scores` (impl="torch"). Exact.
- "faiss": an inner-product index over the head rows (IndexFlatIP: exact; IndexIVFFlat: approximate), on a GPU only
  when `faiss.get_num_gpus() > 0` (faiss-gpu), else on the CPU (faiss-cpu). Queries are rounded as the kernels
  round them, so a flat index ranks like the exact paths up to fp32 summation order.
"auto" picks triton when CUDA is available, else torch.

The served model around a Scorer (encoder + head + label table) is `elmo_serve.model.ServingModel`. This module
imports only torch and kernels at load time (faiss lazily), so it runs on a machine without Ray, pydantic or faiss.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from elmo_kernels.common import interpreting
from elmo_kernels.topk import CapturedTopk, ScreenedTopk, prepare_queries, topk_scores

BACKENDS = ("auto", "triton", "torch", "faiss")
# Triton backend: batches up to this many queries replay a CUDA graph (bucketed to powers of 2), as many as
# serve-gpu.yaml's max_batch_size. H200, 2.8M labels, k = 5 / 100: a B = 128 graph takes 0.71 / 1.08 ms, an eager call
# 1.27 / 1.43 (host launches); the scorer's whole call at B = 96 / 128 (k = 10): 1.49 / 1.65 ms vs 2.24 / 1.88 eager.
GRAPH_MAX_BATCH = 128
GRAPH_CACHE = 16  # captured graphs kept per scorer (least recently used dropped)
# Eager Triton calls run on a multiple of this many rows: Triton compiles a kernel again for a batch size that is not
# a multiple of 16 (H200, 42K labels: a first ragged B = 254 call took 6.1 s, then 1.6 ms).
EAGER_ROW_MULTIPLE = 16


def import_faiss():
    """faiss (faiss-gpu or faiss-cpu, whichever is installed), or ImportError with the install hint."""
    try:
        import faiss
    except ImportError as e:
        raise ImportError("the faiss backend needs faiss: pip install faiss-cpu (or faiss-gpu on a GPU machine)") from e
    return faiss


def spare_rows(num_labels: int) -> int:
    """The spare head rows kept for live labels: max(1024, 25 % of the labels) (`Scorer(spare=...)`)."""
    return max(1024, num_labels // 4)


def padded_rows(n: int) -> int:
    """`n` head rows rounded up to a multiple of 16, the padding rule of artifact heads (fp8 GEMM alignment)."""
    return -(-n // 16) * 16


class VectorIndex:
    """An inner-product faiss index over vectors keyed by integer ids that takes and drops vectors in place.

    kind "flat" (IndexFlatIP: exact) or "ivf" (IndexIVFFlat, `nlist` lists trained on the first vectors; vectors added
    later go to the nearest of those lists). Moved to GPU 0 only when faiss reports a GPU (faiss-cpu and CPU machines
    keep it on the CPU); there the CPU index is the one changed, and the GPU copy is made again after a change."""

    def __init__(
        self,
        vectors: torch.Tensor,
        ids: torch.Tensor | None = None,
        kind: str = "flat",
        nlist: int = 0,
        nprobe: int = 8,
    ):
        faiss = self._faiss = import_faiss()
        v = _np32(vectors)
        n, d = v.shape
        if kind == "flat":
            inner = faiss.IndexFlatIP(d)
        elif kind == "ivf":
            nlist = nlist or max(1, min(4096, int(4 * math.sqrt(n))))
            inner = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, min(nlist, n), faiss.METRIC_INNER_PRODUCT)
            inner.train(v)
            inner.nprobe = nprobe
        else:
            raise ValueError(f"faiss index kind must be 'flat' or 'ivf', got {kind!r}")
        self._inner = inner  # owned by the IDMap, which does not keep it alive from Python
        self.cpu = faiss.IndexIDMap2(inner)
        self.add(torch.arange(n) if ids is None else ids, vectors)

    @property
    def ntotal(self) -> int:
        return self.cpu.ntotal

    def add(self, ids: torch.Tensor | Sequence[int], vectors: torch.Tensor) -> None:
        """Add vectors (n, D) under `ids` (n ids not in the index)."""
        ids = torch.as_tensor(ids, dtype=torch.int64).contiguous().numpy()
        self.cpu.add_with_ids(_np32(vectors), ids)
        self._gpu = None

    def remove(self, ids: torch.Tensor | Sequence[int]) -> None:
        ids = torch.as_tensor(ids, dtype=torch.int64).contiguous().numpy()
        self.cpu.remove_ids(self._faiss.IDSelectorBatch(ids))
        self._gpu = None

    def search(self, q, k: int):
        """(scores (B, k) float32, ids (B, k) int64) numpy arrays, best first; id -1 where fewer than k vectors."""
        index = self.cpu
        if self._faiss.get_num_gpus() > 0:
            if self._gpu is None:
                self._gpu = self._faiss.index_cpu_to_gpu(self._faiss.StandardGpuResources(), 0, self.cpu)
            index = self._gpu
        return index.search(q, k)


def _np32(v: torch.Tensor):
    return v.detach().float().cpu().contiguous().numpy()


def build_index(vectors: torch.Tensor, kind: str = "flat", nlist: int = 0, nprobe: int = 8) -> VectorIndex:
    """An inner-product index over (N, D) vectors, ids 0..N-1 (`VectorIndex`)."""
    return VectorIndex(vectors, None, kind, nlist, nprobe)


def _pad_rows(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([list(r) + [-1] * (width - len(r)) for r in rows], dtype=torch.int64).view(len(rows), width)


@dataclass
class PreparedRows:
    """Head rows `Scorer.prepare` made ready and `Scorer.commit` puts live."""

    rows: list[int]
    old: torch.Tensor  # the rows among them already in use (written at commit)
    values: torch.Tensor
    num_labels: int  # rows in use after the commit
    weights: torch.Tensor  # the head (a bigger copy when it had too few spare rows)
    screened: ScreenedTopk | None
    written: bool  # new rows only: written by prepare, screen packed


class Scorer:
    """Top-k head rows of queries against a (capacity, D) head whose first `num_labels` rows are in use.

    Rows marked in `dead` (retired labels, and the spare rows >= num_labels) are never returned. A live catalogue
    writes rows in place (`write_rows`: an added label takes row num_labels, the first spare row; a retitled one
    keeps its row) and retires them (`retire_rows`: masked, never re-packed); the head is reallocated, bigger, only
    when its spare rows run out. `spare`: spare rows allocated beyond num_labels at the start (0: only the
    artifact's padding). Changes are not thread-safe against a running `topk`: the caller serialises them
    (`elmo_serve.model.ServingModel` does)."""

    def __init__(
        self,
        weights: torch.Tensor,
        num_labels: int,
        backend: str = "auto",
        *,
        spare: int = 0,
        faiss_index: str = "flat",
        nlist: int = 0,
        nprobe: int = 8,
        device: str | torch.device | None = None,
        cuda_graphs: bool = True,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            backend = "triton" if torch.cuda.is_available() else "torch"
        if backend == "triton" and not (torch.cuda.is_available() or interpreting()):
            raise ValueError("backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 on the CPU, for tests)")
        if not 1 <= num_labels <= weights.shape[0]:
            raise ValueError(f"num_labels={num_labels} must be in [1, {weights.shape[0]}] (the head's rows)")
        self.backend, self.num_labels = backend, num_labels
        gpu = backend == "triton" and torch.cuda.is_available()
        self.device = torch.device(device or ("cuda" if gpu else "cpu"))
        capacity = max(weights.shape[0], padded_rows(num_labels + spare))
        self.weights = self._allocate(weights, capacity)
        self.dead = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        self.dead[num_labels:] = True
        self.num_retired = 0
        self.index = None
        if backend == "faiss":
            self._index_args = (faiss_index, nlist, nprobe)
            self.index = VectorIndex(self.weights[:num_labels], None, faiss_index, nlist, nprobe)
        # Small batches on the GPU: an eager top-k call costs the host more than the GPU work, so they replay a CUDA
        # graph (elmo_kernels.topk.CapturedTopk) captured per (batch bucket, k, exclusion-width bucket).
        self.cuda_graphs = cuda_graphs and backend == "triton" and self.device.type == "cuda"
        self._graphs: OrderedDict[tuple[int, int, int], CapturedTopk] = OrderedDict()
        self._screened = None
        self._screen()

    def _allocate(self, weights: torch.Tensor, capacity: int) -> torch.Tensor:
        if weights.shape[0] == capacity:
            return weights.to(self.device)
        out = torch.zeros((capacity, weights.shape[1]), dtype=weights.dtype, device=self.device)
        out[: weights.shape[0]] = weights.to(self.device)
        return out

    def _screen(self) -> None:
        self._screened = self._screen_for(self.weights, self.num_labels)

    def _screen_for(self, weights: torch.Tensor, num_labels: int) -> ScreenedTopk | None:
        # CPU torch path over an fp8/bf16 head: a bf16 screen + exact fp32 rescoring (see elmo_kernels.topk.cpu), ~7x
        # faster than streaming an fp32 copy of the head, with the same answer. It packs a copy of the rows in use:
        # made again after rows are written (a retirement only flips the mask it is called with).
        if self.backend == "torch" and self.device.type == "cpu" and weights.dtype != torch.float32:
            return ScreenedTopk(weights, num_labels)
        return None

    def _dead(self) -> dict:
        """The `dead` keyword of calls over the rows in use: none while no row among them is retired."""
        return {"dead": self.dead} if self.num_retired else {}

    @property
    def capacity(self) -> int:
        """Rows allocated: rows in use plus spare ones."""
        return self.weights.shape[0]

    @property
    def num_live(self) -> int:
        """Rows in use that are not retired: the labels a query can get."""
        return self.num_labels - self.num_retired

    def write_rows(self, rows: Sequence[int], values: torch.Tensor) -> None:
        """Write head rows: rows in use (a retitled label's row, rewritten in place) or new ones, which must be
        num_labels, num_labels + 1, ... in order (added labels; num_labels grows, and the head is reallocated with
        more spare rows when it has too few: on the GPU its captured graphs are then dropped). values: (n, D), cast
        to the head's dtype. A retired row cannot be written. `commit(prepare(rows, values))`."""
        self.commit(self.prepare(rows, values))

    def prepare(self, rows: Sequence[int], values: torch.Tensor) -> PreparedRows:
        """The slow half of `write_rows`, which may run while `topk` calls do: checks, and for new rows only, their
        weights written into spare rows (which no call returns: beyond num_labels, and dead) and the CPU screen
        packed over them; a head too small is reallocated as a copy, which `commit` puts in place. Rows in use are
        written by `commit`. Nothing else may change the scorer between the two."""
        rows = [int(r) for r in rows]
        if values.dim() != 2 or values.shape != (len(rows), self.weights.shape[1]):
            raise ValueError(f"values must be ({len(rows)}, {self.weights.shape[1]}), got {tuple(values.shape)}")
        new = [r for r in rows if r >= self.num_labels]
        if new != list(range(self.num_labels, self.num_labels + len(new))):
            raise ValueError(f"new rows must follow the {self.num_labels} in use in order, got {new[:5]}")
        old = torch.tensor([r for r in rows if r < self.num_labels], dtype=torch.int64)
        if len(old) and (
            int(old.min()) < 0 or len(old.unique()) < len(old) or bool(self.dead[old.to(self.device)].any())
        ):
            raise ValueError(f"rows {old.tolist()[:5]}: negative, repeated or retired rows cannot be written")
        need = self.num_labels + len(new)
        weights = self.weights
        if need > self.capacity:
            weights = self._allocate(weights, padded_rows(max(need, self.capacity + spare_rows(self.capacity))))
        values = values.to(device=self.device, dtype=weights.dtype)
        screened = None
        if not len(old):
            weights[torch.tensor(new, dtype=torch.int64, device=self.device)] = values
            screened = self._screen_for(weights, need)
        return PreparedRows(rows, old, values, need, weights, screened, written=not len(old))

    def commit(self, p: PreparedRows) -> None:
        """The quick half of `write_rows`: the rows live (and rows in use written), in no `topk` call's way."""
        if p.weights is not self.weights:
            grown = len(p.weights) - len(self.dead)
            self.weights = p.weights
            self.dead = torch.cat([self.dead, torch.ones(grown, dtype=torch.bool, device=self.device)])
            self._graphs.clear()  # captured on the old head's address
        idx = torch.tensor(p.rows, dtype=torch.int64, device=self.device)
        if not p.written:
            self.weights[idx] = p.values
        self.dead[idx] = False
        self.num_labels = p.num_labels
        if self.index is not None:
            self.index.remove(p.old)
            self.index.add(p.rows, self.weights[idx])
        self._screened = p.screened if p.written else self._screen_for(self.weights, self.num_labels)

    def retire_rows(self, rows: Sequence[int]) -> None:
        """Mark rows in use as dead: never returned again (their weights stay, nothing is re-packed)."""
        idx = torch.tensor([int(r) for r in rows], dtype=torch.int64)
        if len(idx) and not (0 <= int(idx.min()) and int(idx.max()) < self.num_labels):
            raise ValueError(f"rows {idx.tolist()[:5]}: not rows in use [0, {self.num_labels})")
        idx = idx.unique()
        fresh = idx[~self.dead[idx.to(self.device)].cpu()]
        self.dead[fresh.to(self.device)] = True
        self.num_retired += len(fresh)
        if self.index is not None and len(fresh):
            self.index.remove(fresh)

    def topk(
        self, x: torch.Tensor, k: int, exclude: Sequence[Sequence[int]] | None = None, *, pad_to: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, D) fp32 queries -> (scores fp32 (B, k), rows int64 (B, k)) on the CPU; exclude: rows per query.

        pad_to: an eager GPU call scores at least this many rows (copies of the last query, dropped from the answer),
        so that a stream's short last batch reuses the kernels compiled for its full ones: the screened path's
        candidate slots, a compile-time constant, follow the batch size."""
        if exclude is not None and not any(len(r) for r in exclude):
            exclude = None
        if self.backend == "faiss":
            return self._faiss_topk(x, k, exclude)
        excl = None if exclude is None else _pad_rows(exclude)
        x = x.to(self.device)
        if self._screened is not None:  # queries rounded as `topk_scores` rounds them for an fp8/bf16 head
            return self._screened(prepare_queries(x.float(), self.weights.dtype, False)[0], k, excl, **self._dead())
        if self.cuda_graphs and x.shape[0] <= GRAPH_MAX_BATCH:
            graph = self._graph_for(x.shape[0], k, 0 if excl is None else excl.shape[1])
            if graph is not None:
                s, i = graph(x.float(), excl)
                return s.cpu(), i.cpu()
        if self.backend != "triton":
            s, i = topk_scores(x, self.weights, k, self.num_labels, excl, impl="torch", **self._dead())
            return s.cpu(), i.cpu()
        B = x.shape[0]
        rows = max(B, pad_to)
        rows += -rows % EAGER_ROW_MULTIPLE
        if rows > B:
            x = torch.cat([x, x[-1:].expand(rows - B, -1)])
            if excl is not None:
                excl = torch.cat([excl, excl[-1:].expand(rows - B, -1)])
        s, i = topk_scores(x, self.weights, k, self.num_labels, excl, impl="triton", **self._dead())
        return s[:B].cpu(), i[:B].cpu()

    def _graph_for(self, batch: int, k: int, width: int) -> CapturedTopk | None:
        """The captured top-k for this call's shape bucket, captured on first use; None where a graph cannot hold it
        (too many exclusions for the bucket's width)."""
        bucket = 1 << max(0, (batch - 1).bit_length())
        wbucket = 0 if width == 0 else 1 << max(0, (width - 1).bit_length())
        if wbucket > self.num_live - k:
            return None
        key = (bucket, k, wbucket)
        graph = self._graphs.get(key)
        if graph is None:
            # Over every allocated row, spare ones dead: an added label flips its bit in place (no recapture).
            graph = CapturedTopk(
                self.weights, k, self.capacity, bucket, exclude_width=wbucket, query_dtype=torch.float32, dead=self.dead
            )
            self._graphs[key] = graph
            while len(self._graphs) > GRAPH_CACHE:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        return graph

    def _faiss_topk(self, x, k, exclude):
        # The kernels' query rounding (bf16 for bf16/fp8 weights), then exact fp32 inner products in faiss.
        xq, inv = prepare_queries(x.float(), self.weights.dtype, False)
        q = (xq.float() * inv[:, None]).cpu().contiguous().numpy()
        extra = max((len(r) for r in exclude), default=0) if exclude is not None else 0
        scores, rows = self.index.search(q, min(k + extra, self.index.ntotal))
        scores, rows = torch.from_numpy(scores), torch.from_numpy(rows)
        if exclude is None:
            return scores[:, :k].contiguous(), rows[:, :k].contiguous()
        out_s, out_i = torch.empty(len(q), k), torch.empty(len(q), k, dtype=torch.int64)
        for b in range(len(q)):
            keep = ~torch.isin(rows[b], torch.tensor(list(exclude[b]), dtype=torch.int64)) & (rows[b] >= 0)
            out_s[b], out_i[b] = scores[b][keep][:k], rows[b][keep][:k]
        return out_s, out_i
