"""The label-sharded head over plain torch.distributed (gloo on CPU, NCCL on GPUs; Ray Train or torchrun around it).

Each worker holds a contiguous shard of the labels. Per step the embeddings and positives of the global batch are
all-gathered, every worker runs the fused head step on its shard for the whole batch, and the partial input
gradients are reduce-scattered back to the rows' owners. Shards start at multiples of 16 and pass their global start
as `label_offset`, so the stochastic rounding draws the same random bits as on one worker: W workers and one worker
produce the same weights (up to fp32 summation order in dX). (row, label) pairs travel as (P, 2) int64 tensors, the
form `training.data.Batch` carries, and are split into rows and labels only at the kernel call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from elmo_kernels.common import LABEL_ALIGN, round_up
from elmo_kernels.head_step import HeadStepConfig, HeadStepOutput, head_step
from elmo_kernels.topk import KEY_EMPTY, TopkConfig, capture_cuda_graph, keys_to_scores, scores_to_keys
from training.data import pairs_in_rows
from training.model import chunked_topk


def shard_range(num_labels: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of the labels owned by `rank`: contiguous, starts aligned to 16, sizes as even as possible."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    blocks = round_up(num_labels) // LABEL_ALIGN
    if blocks < world_size:
        raise ValueError(f"{num_labels} labels make {blocks} blocks of {LABEL_ALIGN}: too few for {world_size} workers")
    per, extra = divmod(blocks, world_size)
    start_block = rank * per + min(rank, extra)
    end_block = start_block + per + (1 if rank < extra else 0)
    return min(num_labels, start_block * LABEL_ALIGN), min(num_labels, end_block * LABEL_ALIGN)


def _world(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


class CommCounter:
    """Bytes this rank received through the collectives of this module (a step's communication volume)."""

    def __init__(self) -> None:
        self.bytes = 0

    def add(self, t: torch.Tensor, parts: int) -> None:
        self.bytes += t.numel() * t.element_size() * (parts - 1)


COMM = CommCounter()


def all_gather_rows(t: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's t (the same shape on every rank) stacked along dim 0 in rank order. Collective."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    COMM.add(t, world)
    return torch.cat(parts)


def _exchange_counts(counts: list[int], device: torch.device, group) -> list[list[int]]:
    """Every rank's `counts` (same length on all ranks), in rank order: the one host synchronisation of a call."""
    return all_gather_rows(torch.tensor([counts], device=device), group).tolist()


def _unpad(gathered: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The real rows of an all-gather of per-rank blocks padded to max(counts) rows (slices: no synchronisation)."""
    per_rank = gathered.shape[0] // len(counts)
    if all(c == per_rank for c in counts):
        return gathered
    return torch.cat([gathered[r * per_rank : r * per_rank + c] for r, c in enumerate(counts)])


def _extend_to_rows(t: torch.Tensor, rows: int, fill: float = 0) -> torch.Tensor:
    """t with rows of `fill` appended up to `rows` rows (the equal blocks collectives want)."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_full((rows - t.shape[0], *t.shape[1:]), fill)])


def _starts(sizes: list[int]) -> list[int]:
    return [sum(sizes[:r]) for r in range(len(sizes))]


class _GlobalBatch:
    """The queries of every rank, gathered, and where each rank's rows sit among them (known on the host)."""

    def __init__(self, x: torch.Tensor, pair_counts: list[int], group) -> None:
        _, rank = _world(group)
        self.group = group
        # one host synchronisation: every later shape follows from these counts
        self.counts = _exchange_counts([x.shape[0], *pair_counts], x.device, group)
        self.sizes = [c[0] for c in self.counts]
        self.per_rank = max(self.sizes)
        self.rank, self.offset = rank, sum(self.sizes[:rank])
        self.x_padded = all_gather_rows(_extend_to_rows(x, self.per_rank), group)  # rank r: rows from r * per_rank
        self.x_all = _unpad(self.x_padded, self.sizes)

    def pairs(self, which: int, pairs: torch.Tensor, padded: bool = False) -> torch.Tensor:
        """All ranks' (P, 2) (local row, label) pairs of kind `which` (its index in pair_counts), rows made rows of
        x_all (or of x_padded with `padded`)."""
        counts = [c[1 + which] for c in self.counts]
        offset = self.rank * self.per_rank if padded else self.offset
        pairs = pairs.to(device=self.x_all.device, dtype=torch.int64)
        pairs = pairs + pairs.new_tensor([offset, 0])
        gathered = all_gather_rows(_extend_to_rows(pairs, max(max(counts), 1), -1), self.group)
        return _unpad(gathered, counts)

    def reduce_scatter(self, dx_all: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of dx_all (rows of the global batch), this rank's rows only."""
        if len(set(self.sizes)) > 1:
            parts = [dx_all[s : s + n] for s, n in zip(_starts(self.sizes), self.sizes, strict=True)]
            dx_all = torch.cat([_extend_to_rows(p, self.per_rank) for p in parts])
        mine = torch.empty((self.per_rank, dx_all.shape[1]), dtype=dx_all.dtype, device=dx_all.device)
        _reduce_scatter(mine, dx_all.contiguous(), group=self.group)
        COMM.add(mine, len(self.sizes))
        return mine[: self.sizes[self.rank]]


def gather_batch(x: torch.Tensor, positives: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """All-gather the local batches: (x_global, positives_global (P, 2), every rank's batch size).

    The global batch is the ranks' rows in rank order (what one worker would see): rank r owns rows
    [sum(sizes[:r]), sum(sizes[:r + 1])). Uneven batches travel padded to the largest; one host synchronisation.
    """
    batch = _GlobalBatch(x, [len(positives)], group)
    return batch.x_all, batch.pairs(0, positives), batch.sizes


# torch 2.13 renamed reduce_scatter_tensor (still present, deprecated); the GPU machine has torch 2.11.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# step_fn(x_global, positives, exclude) -> (dx_global, loss or None): (P, 2) (row, label) pairs, labels local to
# the shard, exclude None when the step has none: the single-worker head step of any implementation (XMCHead.step).
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, float | None]]

# topk_fn(x, k, exclude) -> (scores fp32 (B, k') descending, shard-local label ids (B, k'), -1 for an empty slot),
# k' <= k: one shard's own top-k of queries x, exclude (P, 2) (row, shard-local label) pairs or None (XMCHead.topk).
ShardTopkFn = Callable[[torch.Tensor, int, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def _shard_pairs(pairs: torch.Tensor, start: int, labels: int) -> torch.Tensor:
    """The pairs whose label lies in [start, start + labels), labels made shard-local (one synchronisation)."""
    keep = torch.nonzero((pairs[:, 1] >= start) & (pairs[:, 1] < start + labels)).squeeze(1)
    return pairs.index_select(0, keep) - pairs.new_tensor([0, start])


def sharded_step(
    step_fn: StepFn,
    shard_start: int,
    shard_labels: int,
    x: torch.Tensor,
    positives: torch.Tensor,
    *,
    exclude: torch.Tensor | None = None,
    group=None,
) -> HeadStepOutput:
    """One step of a label-sharded head; returns dX for this worker's own rows (and the global loss, if asked).

    x, positives: this worker's batch, (P, 2) (row, global label) pairs; exclude: this worker's (row, global label)
    pairs that get no gradient (None on every rank, or a tensor on every rank). Collective: every rank calls it.
    """
    batch = _GlobalBatch(x, [len(positives)] + ([len(exclude)] if exclude is not None else []), group)
    pos = _shard_pairs(batch.pairs(0, positives), shard_start, shard_labels)
    ex = None if exclude is None else _shard_pairs(batch.pairs(1, exclude), shard_start, shard_labels)
    dx, loss = step_fn(batch.x_all, pos, ex)
    dx_local = batch.reduce_scatter(dx)
    if loss is not None:
        # Each shard's loss is its labels' summed BCE over the global batch divided by that batch's size.
        total = torch.tensor([loss], dtype=torch.float64, device=x.device)
        dist.all_reduce(total, group=group)
        loss = float(total)
    return HeadStepOutput(dx_local, loss)


def sharded_head_step(
    shard: list[torch.Tensor],
    shard_start: int,
    shard_labels: int,
    x: torch.Tensor,
    positives: torch.Tensor,
    config: HeadStepConfig,
    *,
    kahan: torch.Tensor | None = None,
    impl: str = "auto",
    exclude: torch.Tensor | None = None,
    group=None,
) -> HeadStepOutput:
    """`sharded_step` of the fused kernels' step: shard holds this worker's chunks, covering global labels
    [shard_start, shard_start + shard_labels) (plus padding)."""

    def step(x_all: torch.Tensor, pos: torch.Tensor, ex: torch.Tensor | None) -> tuple[torch.Tensor, float | None]:
        excluded = {} if ex is None else {"exclude_rows": ex[:, 0], "exclude_cols": ex[:, 1]}
        out = head_step(
            shard,
            x_all,
            pos[:, 0],
            pos[:, 1],
            config,
            num_labels=shard_labels,
            kahan=kahan,
            impl=impl,
            label_offset=shard_start,
            **excluded,
        )
        return out.dx, out.loss

    return sharded_step(step, shard_start, shard_labels, x, positives, exclude=exclude, group=group)


def sharded_topk(
    shard: list[torch.Tensor] | ShardTopkFn,
    shard_start: int,
    shard_labels: int,
    x: torch.Tensor,
    k: int,
    group=None,
    *,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores fp32, global label ids int64) for this worker's queries x: every shard ranks the whole batch,
    each worker merges the shards' lists of its own queries.

    shard: this worker's chunks (x: head queries, as `elmo_kernels.topk.topk_scores` takes them), or a function ranking
    queries against the shard (`ShardTopkFn`, e.g. a shard head's `XMCHead.topk`; x: what it takes). exclude: this
    worker's (row, global label) pairs never returned (None on every rank, or a tensor on every rank). Collective.
    k must not exceed the total label count; a row left with fewer than k labels ends in (-inf, -1) entries. One
    host synchronisation (the batch sizes); for few queries, where launches dominate, `CapturedShardedTopk` replays
    the same work as one CUDA graph.
    """
    keys = _sharded_topk_keys(shard, shard_start, shard_labels, x, k, group, exclude)
    return _decode(keys)


def sharded_topk_replicated(
    shard: list[torch.Tensor] | ShardTopkFn,
    shard_start: int,
    shard_labels: int,
    x: torch.Tensor,
    k: int,
    group=None,
    *,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sharded_topk` of one batch x that every rank holds alike (evaluation): rank r ranks its contiguous slice of
    the rows, and every rank gets the lists of all of them back (one all-gather). exclude: (row, global label) pairs
    of x's rows. Collective."""
    world, rank = _world(group)
    bounds = [x.shape[0] * r // world for r in range(world + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    mine = None if exclude is None else pairs_in_rows(exclude, lo, hi)
    keys = _sharded_topk_keys(shard, shard_start, shard_labels, x[lo:hi], k, group, mine)
    sizes = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    gathered = all_gather_rows(_extend_to_rows(keys, max(sizes), KEY_EMPTY), group)
    return _decode(_unpad(gathered, sizes))


def _sharded_topk_keys(shard, shard_start, shard_labels, x, k, group, exclude) -> torch.Tensor:
    batch = _GlobalBatch(x, [] if exclude is None else [len(exclude)], group)
    ex = None
    if exclude is not None:
        ex = _shard_pairs(batch.pairs(0, exclude, padded=True), shard_start, shard_labels)
    return _own_rows_topk(batch.x_padded, shard, shard_start, shard_labels, k, group, exclude=ex)[: x.shape[0]]


def _decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, ids) of merged keys; KEY_EMPTY slots become (-inf, -1)."""
    scores, ids = keys_to_scores(keys)
    empty = keys == KEY_EMPTY
    return scores.masked_fill(empty, float("-inf")), ids.masked_fill(empty, -1)


def _own_rows_topk(
    x_padded, shard, shard_start, shard_labels, k, group, config: TopkConfig | None = None, exclude=None
) -> torch.Tensor:
    """Merged top-k keys (per_rank, k) of this rank's rows, given every rank's queries padded to per_rank rows each
    (rank r's at rows [r * per_rank, (r + 1) * per_rank)): the shard ranks them all (exclude: (row of x_padded,
    shard-local label) pairs), rank r receives every shard's lists of its own rows (one all-to-all) and merges them."""
    world, _ = _world(group)
    per_rank = x_padded.shape[0] // world
    if callable(shard):
        s, i = shard(x_padded, k, exclude)
    else:
        s, i = chunked_topk(x_padded, shard, min(k, shard_labels), shard_labels, exclude, config=config)
    keys = scores_to_keys(s, i + shard_start).masked_fill_(i < 0, KEY_EMPTY)
    keys = torch.cat([keys, keys.new_full((keys.shape[0], k - keys.shape[1]), KEY_EMPTY)], 1)
    mine = torch.empty_like(keys)
    dist.all_to_all_single(mine, keys, group=group)
    COMM.add(mine[:per_rank], world)
    lists = mine.view(world, per_rank, k).permute(1, 0, 2).reshape(per_rank, world * k)
    return torch.topk(lists, k, dim=1).values


class CapturedShardedTopk:
    """`sharded_topk` for up to `rows_per_rank` queries per rank, captured once (collectives included) and replayed
    as one CUDA graph per call: no host synchronisation, one launch.

    Every rank constructs it and calls it together (collective). Queries are padded to rows_per_rank on every rank.
    The shard's tensors must stay at their addresses (in-place updates are fine).
    """

    def __init__(
        self,
        shard: list[torch.Tensor],
        shard_start: int,
        shard_labels: int,
        k: int,
        rows_per_rank: int,
        *,
        query_dtype: torch.dtype = torch.bfloat16,
        group=None,
    ) -> None:
        if not shard or not all(isinstance(w, torch.Tensor) and w.is_cuda for w in shard):
            raise ValueError("CapturedShardedTopk needs the shard as CUDA tensors (CUDA graphs)")
        if isinstance(rows_per_rank, bool) or not isinstance(rows_per_rank, int) or rows_per_rank < 1:
            raise ValueError(f"rows_per_rank must be an int >= 1, got {rows_per_rank!r}")
        device = shard[0].device
        self.rows_per_rank, self.k = rows_per_rank, k
        self._x = torch.zeros((rows_per_rank, shard[0].shape[1]), dtype=query_dtype, device=device)
        config = TopkConfig(screen=True)  # the screened path: few launches' worth of work, replayed

        def run() -> torch.Tensor:
            x_padded = all_gather_rows(self._x, group)
            return _own_rows_topk(x_padded, shard, shard_start, shard_labels, k, group, config)

        with torch.inference_mode():
            self._graph, self._keys = capture_cuda_graph(run, device)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores fp32, global ids int64) of the top-k labels of this rank's queries x (at most rows_per_rank)."""
        if x.dim() != 2 or x.shape[1] != self._x.shape[1] or x.shape[0] > self.rows_per_rank:
            raise ValueError(f"x must be (n <= {self.rows_per_rank}, {self._x.shape[1]}), got {tuple(x.shape)}")
        n = x.shape[0]
        self._x[:n].copy_(x)
        self._x[n:].zero_()
        self._graph.replay()
        return _decode(self._keys[:n])
