"""CUDA graphs: `CapturedTopk` replays the Triton path for one head, k and batch size (one launch instead of ~17),
and `capture_cuda_graph`, the capture both it and the sharded evaluation use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from elmo_kernels.topk.config import TopkConfig
from elmo_kernels.topk.inputs import check_args, check_dead, check_exclude, resolve_fp8_dots
from elmo_kernels.topk.triton_path import triton_scores


def capture_cuda_graph(run: Callable[[], Any], device: torch.device) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, outputs): `run()` once on a side stream (kernels compile, communicators set up: outside the capture),
    then captured; each replay rewrites the outputs of the captured call in place."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


class CapturedTopk:
    """`topk_scores` on a CUDA GPU for one head, k and batch size, replayed from a CUDA graph.

    An eager call launches ~17 kernels (two per label range) and spends more host time than the GPU needs for a few
    queries (H200, 2.8M labels, B = 1, with ~30 launches: ~0.75 ms of host work for ~0.55 ms of GPU work); a replay
    is one launch. Batches smaller than `batch_size` are padded with copies of their first query (the extra rows are
    scored and dropped).
    `exclude_width` > 0 reserves that many exclusion slots per query. The head must stay at the same address
    (weights updated in place are fine).
    `dead`: the caller's (>= num_labels,) bool/uint8 buffer on the head's device (nonzero = row never returned, as in
    `topk_scores`), read by address at every replay: flip entries in place (dead[i] = True, dead.copy_(...)) to
    retire labels or bring spare rows live, with no recapture. Never replace the tensor. Without it, the graph has no
    mask (and none can be added later: capture with an all-False buffer to keep the option). Checked at capture:
    >= k live rows; at a replay with exclusions, >= k rows neither dead nor excluded per query (the exclusion check's
    host synchronisation, no extra one). A replay without exclusions reads the buffer without synchronising: a query
    left with fewer than k returnable rows gets (-inf, -1) in the slots past them.
    """

    def __init__(
        self,
        weights: torch.Tensor,
        k: int,
        num_labels: int,
        batch_size: int,
        *,
        exclude_width: int = 0,
        query_dtype: torch.dtype = torch.bfloat16,
        fp8_dots: bool | None = None,
        config: TopkConfig | None = None,
        dead: torch.Tensor | None = None,
    ) -> None:
        if not isinstance(weights, torch.Tensor) or not weights.is_cuda:
            raise ValueError("CapturedTopk needs the head as a CUDA tensor (CUDA graphs)")
        for name, v in (("batch_size", batch_size), ("exclude_width", exclude_width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "batch_size" else 0):
                raise ValueError(f"{name} must be an int >= {1 if name == 'batch_size' else 0}, got {v!r}")
        x = torch.zeros((batch_size, weights.shape[1] if weights.dim() == 2 else 0), dtype=query_dtype)
        check_args(x.to(weights.device), weights, k, num_labels)
        if exclude_width > num_labels - k:
            raise ValueError(f"exclude_width={exclude_width} could leave fewer than k={k} of {num_labels} labels")
        fp8_dots = resolve_fp8_dots(weights, fp8_dots)
        if weights.stride(1) != 1:
            raise ValueError("weights must be contiguous along D")
        self._dead = check_dead(dead, num_labels, weights.device)
        check_exclude(None, batch_size, k, num_labels, weights.device, self._dead)
        self.weights, self.k, self.num_labels, self.batch_size = weights, k, num_labels, batch_size
        self.dead = dead
        with torch.inference_mode():  # the graph's buffers are inference tensors: every call runs in inference mode
            self._capture(x.to(weights.device), exclude_width, fp8_dots, config)

    def _capture(self, x, exclude_width, fp8_dots, config) -> None:
        weights, k, num_labels, batch_size = self.weights, self.k, self.num_labels, self.batch_size
        self._x = x
        self._exclude = (
            torch.full((batch_size, exclude_width), -1, dtype=torch.int64, device=weights.device)
            if exclude_width
            else None
        )
        cfg = config or TopkConfig(screen=True)
        run = lambda: triton_scores(self._x, weights, k, num_labels, self._exclude, fp8_dots, cfg, self._dead)  # noqa: E731
        self._graph, (self._scores, self._ids) = capture_cuda_graph(run, weights.device)

    @torch.inference_mode()
    def __call__(
        self, x: torch.Tensor, exclude: torch.Tensor | Sequence[Sequence[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores fp32 (B, k), ids int64 (B, k)) for x (B, D), B <= batch_size; as `topk_scores`."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self._x.shape[1]:
            raise ValueError(f"x must be (B, {self._x.shape[1]}), got {getattr(x, 'shape', type(x).__name__)}")
        B = x.shape[0]
        if not 1 <= B <= self.batch_size:
            raise ValueError(f"batch of {B} queries; this graph takes 1 to {self.batch_size}")
        if x.dtype != self._x.dtype:
            raise ValueError(f"x must be {self._x.dtype} (the graph's query_dtype), got {x.dtype}")
        ex = None
        if exclude is not None:
            if self._exclude is None:
                raise ValueError("this graph was captured without exclusion slots (exclude_width=0)")
            ex = check_exclude(exclude, B, self.k, self.num_labels, self._x.device, self._dead)
            if ex is not None and ex.shape[1] > self._exclude.shape[1]:
                raise ValueError(f"{ex.shape[1]} exclusions per query; this graph has {self._exclude.shape[1]} slots")
        self._x[:B].copy_(x)
        if B < self.batch_size:
            # Pad with copies of a real query: a zero row ties every label at 0, and in the two-pass path a row whose
            # tile maxima tie past its tile cap is recomputed by the running kernel (H200, 2.8M labels, 96 queries in
            # a 128-row graph: 11.7 ms with zero rows).
            self._x[B:].copy_(x[:1].expand(self.batch_size - B, -1))
        if self._exclude is not None:
            self._exclude.fill_(-1)
            if ex is not None:
                self._exclude[:B, : ex.shape[1]].copy_(ex)
        self._graph.replay()
        return self._scores[:B].clone(), self._ids[:B].clone()
