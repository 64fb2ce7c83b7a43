"""Exact top-k labels of x @ W^T without materializing the B x L score matrix.

`topk_scores(..., impl=)` is the entry point: "triton" runs one of three Triton paths, "torch" a chunked torch path.
One module per path, in Cut Cross-Entropy's layout:
- running.py: a running top-k kernel (each program keeps its rows' best k over a label range); the choice for small
  eager batches, and the others' fallback for rows their candidate slots cannot answer;
- screened.py: GEMM tiles that keep only labels beating the row's current k-th best, over label ranges of growing
  size;
- two_pass.py, for many queries: tile maxima first, then only the tiles that may hold a top-k label, each read once
  for the rows that chose it;
- tl_utils.py: the device helpers they share (one tile scorer, keys, exclusions, the screening epilogue);
- triton_path.py: the choice among them; config.py: their launch options (`TopkConfig`);
- graphs.py: `CapturedTopk`, the Triton path replayed from a CUDA graph;
- keys.py: the sortable keys and `merge_topk` for label-sharded heads; inputs.py: argument checks and query
  quantisation; cpu.py: `ScreenedTopk`, the serving CPU path (a bf16 screen, then exact fp32 rescoring);
- here: `topk_scores`, its torch path and the plain full-logits reference `reference_topk`.

Score definition (shared by every path): score[b, l] = inv_scale[b] * sum_d xq[b, d] * W[l, d], accumulated in fp32
(except that Hopper's fp8 MMA accumulates with fewer mantissa bits: ~0.2% score error measured at D = 768, so paths
with different D chunks can order near-ties differently; each ranks its own scores exactly), where
xq = `prepare_queries(x, ...)` is exactly what the kernel multiplies:
- fp8 dots (fp8 weights on an sm_89+ GPU, or `fp8_dots=True`): each query row is scaled by a power of two s_b so that
  max|x_b| * s_b <= 448, rounded to float8_e4m3fn (nearest), and inv_scale = 1 / s_b (exact);
- otherwise: xq = x rounded to bf16 for fp8/bf16 weights (fp32 for fp32 weights), inv_scale = 1.

Ranking: scores descending, equal scores by the lower label id (-0.0 counts as +0.0, NaN as -inf), through one
sortable int64 key per (score, id) pair (elmo_kernels.topk.keys); ids must stay below 2^32 - 1.

Dead rows (`dead=`, a bool/uint8 mask over the head's rows, the live label catalogue's retired labels and unwritten
spare rows): never returned, like padding, and live labels rank exactly as without the mask. In the Triton kernels
the mask enters once, as the validity of a tile's labels (`score_tile`), behind a HAS_DEAD constexpr, so running
lists, tile maxima and screening thresholds all ignore dead rows. A query with fewer than k labels neither dead nor
excluded: eager calls raise ValueError (as for exclusions); a `CapturedTopk` replay cannot check without a host
synchronisation, and returns (-inf, -1) in the slots past its returnable labels (as `reference_topk` does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from elmo_kernels.common import interpreting
from elmo_kernels.topk.config import DEFAULT_MAX_PARTIAL_BYTES, TWO_PASS_BLOCK_L, TopkConfig
from elmo_kernels.topk.cpu import ScreenedTopk
from elmo_kernels.topk.graphs import CapturedTopk, capture_cuda_graph
from elmo_kernels.topk.inputs import (
    QUERY_DTYPES,
    WEIGHT_DTYPES,
    check_args,
    check_dead,
    check_exclude,
    prepare_queries,
    quantize_queries,
    resolve_fp8_dots,
)
from elmo_kernels.topk.keys import (
    KEY_EMPTY,
    KEY_FULL,
    KEY_REAL_MIN,
    MAX_LABELS,
    keys_to_scores,
    merge_topk,
    scores_to_keys,
)
from elmo_kernels.topk.triton_path import triton_scores

__all__ = [
    "DEFAULT_MAX_PARTIAL_BYTES",
    "KEY_EMPTY",
    "KEY_FULL",
    "KEY_REAL_MIN",
    "MAX_LABELS",
    "QUERY_DTYPES",
    "TWO_PASS_BLOCK_L",
    "WEIGHT_DTYPES",
    "CapturedTopk",
    "ScreenedTopk",
    "TopkConfig",
    "capture_cuda_graph",
    "keys_to_scores",
    "merge_topk",
    "prepare_queries",
    "quantize_queries",
    "reference_topk",
    "scores_to_keys",
    "topk_scores",
]


def topk_scores(
    x: torch.Tensor,
    weights: torch.Tensor,
    k: int,
    num_labels: int,
    exclude: torch.Tensor | Sequence[Sequence[int]] | None = None,
    *,
    impl: str = "auto",
    fp8_dots: bool | None = None,
    config: TopkConfig | None = None,
    chunk_size: int | None = None,
    dead: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k labels of each query: (scores fp32 (B, k) sorted descending, ids int64 (B, k)).

    x: (B, D) bf16/fp32 queries. weights: (L_pad, D) float8_e4m3fn/bf16/fp32 head; rows >= num_labels are padding and
    never returned. k in [1, num_labels]. exclude: per-query ids never returned, a (B, E) integer tensor padded with
    -1 or a list of B lists; each row must keep >= k labels. impl: "triton" (GPU, or CPU under TRITON_INTERPRET=1),
    "torch" (chunked matmul + topk, bounded memory), "auto" (triton on CUDA, torch otherwise). fp8_dots: quantize x
    to e4m3 and use fp8 x fp8 dots (needs fp8 weights); None = where the GPU has fp8 tensor cores (sm_89+).
    dead: (>= num_labels,) bool or uint8 on the weights' device, nonzero = a row never returned (like padding), for
    every query; each query must keep >= k labels neither dead nor excluded (checked: one host synchronisation when
    there are dead rows and no exclusions, none more with exclusions). Live labels rank exactly as without the mask.
    Scores and tie rule: see the package docstring.
    """
    check_args(x, weights, k, num_labels)
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if impl == "auto":
        impl = "triton" if x.is_cuda else "torch"
    if impl == "triton" and not x.is_cuda and not interpreting():
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    fp8_dots = resolve_fp8_dots(weights, fp8_dots)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B = x.shape[0]
    dead = check_dead(dead, num_labels, weights.device)
    exclude = check_exclude(exclude, B, k, num_labels, x.device, dead)
    if B == 0:
        return torch.empty((0, k), dtype=torch.float32, device=x.device), torch.empty(
            (0, k), dtype=torch.int64, device=x.device
        )
    if weights.stride(1) != 1:
        weights = weights.contiguous()
    if impl == "torch":
        xq, inv_scale = prepare_queries(x, weights.dtype, fp8_dots)
        return _topk_torch(xq.contiguous(), inv_scale, weights, k, num_labels, exclude, chunk_size, dead)
    return triton_scores(x, weights, k, num_labels, exclude, fp8_dots, config or TopkConfig(), dead)


def _topk_torch(xq, inv_scale, weights, k, num_labels, exclude, chunk_size, dead=None):
    """The torch path: fp32 logits a chunk of labels at a time, each chunk's top-k merged into the running one."""
    B = xq.shape[0]
    chunk = chunk_size or max(1024, min(1 << 20, (1 << 24) // max(B, 1)))
    xf = xq.float()
    best = None
    for start in range(0, num_labels, chunk):
        stop = min(start + chunk, num_labels)
        ids = torch.arange(start, stop, device=xq.device)
        logits = (xf @ weights[start:stop].float().T) * inv_scale[:, None]
        keys = scores_to_keys(logits, ids[None, :])
        if exclude is not None:
            local = exclude - start
            hit = (local >= 0) & (local < stop - start)
            rows, cols = hit.nonzero(as_tuple=True)
            keys[rows, local[rows, cols]] = KEY_EMPTY
        if dead is not None:
            keys.masked_fill_(dead[None, start:stop] != 0, KEY_EMPTY)
        keys = torch.topk(keys, min(k, stop - start), dim=1).values
        best = keys if best is None else torch.topk(torch.cat([best, keys], dim=1), k, dim=1).values
    return keys_to_scores(best)


def reference_topk(
    x: torch.Tensor,
    weights: torch.Tensor,
    k: int,
    num_labels: int,
    exclude: torch.Tensor | Sequence[Sequence[int]] | None = None,
    fp8_dots: bool = False,
    *,
    dead: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain reference: full (B, num_labels) fp32 logits, stable descending sort, excluded ids and dead rows (as in
    `topk_scores`) after every other label; slots that only they could fill come back as (-inf, -1)."""
    xq, inv_scale = prepare_queries(x, weights.dtype, fp8_dots)
    logits = (xq.float() @ weights[:num_labels].float().T) * inv_scale[:, None]
    blocked = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    if exclude is not None:
        for b, row in enumerate(exclude.tolist() if isinstance(exclude, torch.Tensor) else exclude):
            for i in row:
                if i >= 0:
                    blocked[b, i] = True
    dead = check_dead(dead, num_labels, weights.device)
    if dead is not None:
        blocked |= dead[None, :] != 0
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(blocked.gather(1, order).to(torch.uint8), dim=1, stable=True).indices)[:, :k]
    scores = logits.gather(1, order).masked_fill(blocked.gather(1, order), float("-inf"))
    return scores, order.masked_fill(blocked.gather(1, order), -1)
