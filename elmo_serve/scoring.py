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


def build_index(vectors: torch.Tensor, kind: str = "flat", nlist: int = 0, nprobe: int = 8):
    """An inner-product faiss index over (N, D) vectors: "flat" (exact) or "ivf" (IndexIVFFlat, nlist lists).

    Moved to GPU 0 only when faiss reports a GPU (faiss-cpu and CPU machines keep it on the CPU).
    """
    faiss = import_faiss()
    v = vectors.detach().float().cpu().contiguous().numpy()
    n, d = v.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = nlist or max(1, min(4096, int(4 * math.sqrt(n))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, min(nlist, n), faiss.METRIC_INNER_PRODUCT)
        index.train(v)
        index.nprobe = nprobe
    else:
        raise ValueError(f"faiss index kind must be 'flat' or 'ivf', got {kind!r}")
    index.add(v)
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


def _pad_rows(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([list(r) + [-1] * (width - len(r)) for r in rows], dtype=torch.int64).view(len(rows), width)


class Scorer:
    """Top-k head rows of queries against a padded (L_pad, D) head; rows >= num_labels are never returned."""

    def __init__(
        self,
        weights: torch.Tensor,
        num_labels: int,
        backend: str = "auto",
        *,
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
        self.backend, self.num_labels = backend, num_labels
        gpu = backend == "triton" and torch.cuda.is_available()
        self.device = torch.device(device or ("cuda" if gpu else "cpu"))
        self.weights = weights.to(self.device)
        # CPU torch path over an fp8/bf16 head: a bf16 screen + exact fp32 rescoring (see elmo_kernels.topk.cpu), ~7x
        # faster than streaming an fp32 copy of the head, with the same answer.
        self._screened = None
        if backend == "torch" and self.device.type == "cpu" and self.weights.dtype != torch.float32:
            self._screened = ScreenedTopk(self.weights, num_labels)
        self.index = None
        if backend == "faiss":
            self.index = build_index(weights[:num_labels].float(), faiss_index, nlist, nprobe)
        # Small batches on the GPU: an eager top-k call costs the host more than the GPU work, so they replay a CUDA
        # graph (elmo_kernels.topk.CapturedTopk) captured per (batch bucket, k, exclusion-width bucket).
        self.cuda_graphs = cuda_graphs and backend == "triton" and self.device.type == "cuda"
        self._graphs: OrderedDict[tuple[int, int, int], CapturedTopk] = OrderedDict()

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
            return self._screened(prepare_queries(x.float(), self.weights.dtype, False)[0], k, excl)
        if self.cuda_graphs and x.shape[0] <= GRAPH_MAX_BATCH:
            graph = self._graph_for(x.shape[0], k, 0 if excl is None else excl.shape[1])
            if graph is not None:
                s, i = graph(x.float(), excl)
                return s.cpu(), i.cpu()
        if self.backend != "triton":
            s, i = topk_scores(x, self.weights, k, self.num_labels, excl, impl="torch")
            return s.cpu(), i.cpu()
        B = x.shape[0]
        rows = max(B, pad_to)
        rows += -rows % EAGER_ROW_MULTIPLE
        if rows > B:
            x = torch.cat([x, x[-1:].expand(rows - B, -1)])
            if excl is not None:
                excl = torch.cat([excl, excl[-1:].expand(rows - B, -1)])
        s, i = topk_scores(x, self.weights, k, self.num_labels, excl, impl="triton")
        return s[:B].cpu(), i[:B].cpu()

    def _graph_for(self, batch: int, k: int, width: int) -> CapturedTopk | None:
        """The captured top-k for this call's shape bucket, captured on first use; None where a graph cannot hold it
        (too many exclusions for the bucket's width)."""
        bucket = 1 << max(0, (batch - 1).bit_length())
        wbucket = 0 if width == 0 else 1 << max(0, (width - 1).bit_length())
        if wbucket > self.num_labels - k:
            return None
        key = (bucket, k, wbucket)
        graph = self._graphs.get(key)
        if graph is None:
            graph = CapturedTopk(
                self.weights, k, self.num_labels, bucket, exclude_width=wbucket, query_dtype=torch.float32
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
        scores, rows = self.index.search(q, min(k + extra, self.num_labels))
        scores, rows = torch.from_numpy(scores), torch.from_numpy(rows)
        if exclude is None:
            return scores[:, :k].contiguous(), rows[:, :k].contiguous()
        out_s, out_i = torch.empty(len(q), k), torch.empty(len(q), k, dtype=torch.int64)
        for b in range(len(q)):
            keep = ~torch.isin(rows[b], torch.tensor(list(exclude[b]), dtype=torch.int64)) & (rows[b] >= 0)
            out_s[b], out_i[b] = scores[b][keep][:k], rows[b][keep][:k]
        return out_s, out_i
