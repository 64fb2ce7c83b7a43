"""The label-sharded head over plain torch.distributed (gloo on CPU, NCCL on GPUs; Ray Train or torchrun around it).

Each worker holds a contiguous shard of the labels. Per step the embeddings and positives of the global batch are
all-gathered, every worker runs the fused head step on its shard for the whole batch, and the partial input
gradients are reduce-scattered back to the rows' owners. Shards start at multiples of 16 and pass their global start
as `label_offset`, so the stochastic rounding draws the same random bits as on one worker: W workers and one worker
produce the same weights (up to fp32 summation order in dX).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from kernels.head_step import LABEL_ALIGN, HeadStepConfig, HeadStepOutput, head_step
from kernels.topk import MAX_LABELS, TopkConfig, capture_cuda_graph, keys_to_scores, scores_to_keys, topk_scores

# the key of a (-inf, MAX_LABELS) entry: below every real label's key
_PAD_KEY = int(scores_to_keys(torch.tensor([float("-inf")]), torch.tensor([MAX_LABELS]))[0])


def shard_range(num_labels: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of the labels owned by `rank`: contiguous, starts aligned to 16, sizes as even as possible."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    blocks = -(-num_labels // LABEL_ALIGN)
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


def _all_gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    COMM.add(t, world)
    return torch.cat(parts)


def _exchange_counts(counts: list[int], device: torch.device, group) -> list[list[int]]:
    """Every rank's `counts` (same length on all ranks), in rank order: the one host synchronisation of a call."""
    return _all_gather_rows(torch.tensor([counts], device=device), group).tolist()


def _unpad(gathered: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The real rows of an all-gather of per-rank blocks padded to max(counts) rows (slices: no synchronisation)."""
    per_rank = gathered.shape[0] // len(counts)
    if all(c == per_rank for c in counts):
        return gathered
    return torch.cat([gathered[r * per_rank : r * per_rank + c] for r, c in enumerate(counts)])


def _pad_rows(t: torch.Tensor, rows: int, fill: float = 0) -> torch.Tensor:
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
        self.x_padded = _all_gather_rows(_pad_rows(x, self.per_rank), group)  # rank r: rows from r * per_rank
        self.x_all = _unpad(self.x_padded, self.sizes)

    def pairs(self, which: int, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' (local row, label) pairs of kind `which` (its index in pair_counts) as (global row, label)."""
        counts = [c[1 + which] for c in self.counts]
        pairs = torch.stack([rows.to(torch.int64) + self.offset, cols.to(torch.int64)], 1)
        gathered = _all_gather_rows(_pad_rows(pairs, max(max(counts), 1), -1), self.group)
        pairs_all = _unpad(gathered, counts)
        return pairs_all[:, 0], pairs_all[:, 1]

    def reduce_scatter(self, dx_all: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of dx_all (rows of the global batch), this rank's rows only."""
        if len(set(self.sizes)) > 1:
            parts = [dx_all[s : s + n] for s, n in zip(_starts(self.sizes), self.sizes, strict=True)]
            dx_all = torch.cat([_pad_rows(p, self.per_rank) for p in parts])
        mine = torch.empty((self.per_rank, dx_all.shape[1]), dtype=dx_all.dtype, device=dx_all.device)
        _reduce_scatter(mine, dx_all.contiguous(), group=self.group)
        COMM.add(mine, len(self.sizes))
        return mine[: self.sizes[self.rank]]


def gather_batch(
    x: torch.Tensor, pos_rows: torch.Tensor, pos_cols: torch.Tensor, group=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """All-gather the local batches: (x_global, rows_global, cols_global, every rank's batch size).

    The global batch is the ranks' rows in rank order (what one worker would see): rank r owns rows
    [sum(sizes[:r]), sum(sizes[:r + 1])). Uneven batches travel padded to the largest; one host synchronisation.
    """
    batch = _GlobalBatch(x, [pos_rows.numel()], group)
    rows, cols = batch.pairs(0, pos_rows, pos_cols)
    return batch.x_all, rows, cols, batch.sizes


# torch 2.13 renamed reduce_scatter_tensor (still present, deprecated); the GPU machine has torch 2.11.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# step_fn(x_global, pos_rows, pos_cols, exclude_rows, exclude_cols) -> (dx_global, loss or None), labels local to
# the shard: the single-worker head step of whatever implementation (kernels, XMCHead.step).
StepFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    tuple[torch.Tensor, float | None],
]


def _shard_pairs(rows: torch.Tensor, cols: torch.Tensor, start: int, labels: int):
    """The pairs whose label lies in [start, start + labels), labels made shard-local (one synchronisation)."""
    keep = torch.nonzero((cols >= start) & (cols < start + labels)).squeeze(1)
    return rows.index_select(0, keep), cols.index_select(0, keep) - start


def sharded_step(
    step_fn: StepFn,
    shard_start: int,
    shard_labels: int,
    x: torch.Tensor,
    pos_rows: torch.Tensor,
    pos_cols: torch.Tensor,
    *,
    exclude_rows: torch.Tensor | None = None,
    exclude_cols: torch.Tensor | None = None,
    group=None,
) -> HeadStepOutput:
    """One step of a label-sharded head; returns dX for this worker's own rows (and the global loss, if asked).

    x, pos_rows, pos_cols: this worker's batch with global label ids; exclude_rows/exclude_cols: this worker's
    (row, global label) pairs that get no gradient. Collective: every rank must call it.
    """
    excluding = exclude_rows is not None
    batch = _GlobalBatch(x, [pos_rows.numel()] + ([exclude_rows.numel()] if excluding else []), group)
    rows, cols = _shard_pairs(*batch.pairs(0, pos_rows, pos_cols), shard_start, shard_labels)
    ex_rows = ex_cols = None
    if excluding:
        ex_rows, ex_cols = _shard_pairs(*batch.pairs(1, exclude_rows, exclude_cols), shard_start, shard_labels)
    dx, loss = step_fn(batch.x_all, rows, cols, ex_rows, ex_cols)
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
    pos_rows: torch.Tensor,
    pos_cols: torch.Tensor,
    config: HeadStepConfig,
    *,
    kahan: torch.Tensor | None = None,
    impl: str = "auto",
    exclude_rows: torch.Tensor | None = None,
    exclude_cols: torch.Tensor | None = None,
    group=None,
) -> HeadStepOutput:
    """`sharded_step` of the fused kernels' step: shard holds this worker's chunks, covering global labels
    [shard_start, shard_start + shard_labels) (plus padding)."""

    def step(x_all, rows, cols, ex_rows, ex_cols):
        excluded = {} if ex_rows is None else {"exclude_rows": ex_rows, "exclude_cols": ex_cols}
        out = head_step(
            shard,
            x_all,
            rows,
            cols,
            config,
            num_labels=shard_labels,
            kahan=kahan,
            impl=impl,
            label_offset=shard_start,
            **excluded,
        )
        return out.dx, out.loss

    return sharded_step(
        step,
        shard_start,
        shard_labels,
        x,
        pos_rows,
        pos_cols,
        exclude_rows=exclude_rows,
        exclude_cols=exclude_cols,
        group=group,
    )


def sharded_topk(
    shard: list[torch.Tensor], shard_start: int, shard_labels: int, x: torch.Tensor, k: int, group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k global label ids for this worker's queries x: every shard ranks the whole batch, each worker merges
    the shards' lists of its own queries.

    Collective. k must not exceed the total label count; a shard with fewer than k labels pads its list with
    (-inf, MAX_LABELS) entries, which sort after every real one. One host synchronisation (the batch sizes); for
    few queries, where launches dominate, `CapturedShardedTopk` replays the same work as one CUDA graph.
    """
    batch = _GlobalBatch(x, [], group)
    keys = _own_rows_topk(batch.x_padded, shard, shard_start, shard_labels, k, group)
    return keys_to_scores(keys[: x.shape[0]])


def _own_rows_topk(x_padded, shard, shard_start, shard_labels, k, group, config: TopkConfig | None = None):
    """Merged top-k keys (per_rank, k) of this rank's rows, given every rank's queries padded to per_rank rows each
    (rank r's at rows [r * per_rank, (r + 1) * per_rank)): the shard scores them all, rank r receives every shard's
    lists of its own rows (one all-to-all) and merges them."""
    world, _ = _world(group)
    per_rank = x_padded.shape[0] // world
    keys, start = [], 0
    for w in shard:
        n = max(0, min(w.shape[0], shard_labels - start))
        if n:
            s, i = topk_scores(x_padded, w, min(k, n), n, config=config)
            keys.append(scores_to_keys(s, i + (shard_start + start)))
        start += w.shape[0]
    keys = torch.cat(keys, 1) if keys else x_padded.new_empty((x_padded.shape[0], 0), dtype=torch.int64)
    if keys.shape[1] > k:
        keys = torch.topk(keys, k, dim=1).values
    keys = torch.cat([keys, keys.new_full((keys.shape[0], k - keys.shape[1]), _PAD_KEY)], 1)
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
            x_padded = _all_gather_rows(self._x, group)
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
        return keys_to_scores(self._keys[:n])
