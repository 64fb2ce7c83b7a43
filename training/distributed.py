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
from kernels.topk import MAX_LABELS, merge_topk, topk_scores


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


def _gather_pairs(
    rows: torch.Tensor, cols: torch.Tensor, per_rank: int, new_index: torch.Tensor, group, most: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' (row-in-local-batch, label) pairs as (row-in-global-batch, label), in rank order.

    most: the largest pair count of any rank, when the caller already exchanged the counts."""
    world, _ = _world(group)
    if most is None:
        count = torch.tensor([[rows.numel()]], device=rows.device)
        most = int(_all_gather_rows(count, group).max())
    pairs = torch.full((max(most, 1), 2), -1, dtype=torch.int64, device=rows.device)
    pairs[: rows.numel(), 0] = rows
    pairs[: rows.numel(), 1] = cols
    pairs_all = _all_gather_rows(pairs, group).view(world, -1, 2)
    owner = torch.arange(world, device=rows.device)[:, None].expand(world, pairs_all.shape[1])
    keep = pairs_all[..., 0] >= 0
    return new_index[pairs_all[..., 0][keep] + owner[keep] * per_rank], pairs_all[..., 1][keep]


def gather_batch(
    x: torch.Tensor, pos_rows: torch.Tensor, pos_cols: torch.Tensor, group=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """All-gather the local batches: (x_global, rows_global, cols_global, real, rows_per_rank).

    The global batch is the ranks' real rows in rank order (what one worker would see). Local batches travel padded
    to the largest one; `real` marks the real rows of the padded (world * rows_per_rank) layout, in which rank r
    owns rows [r * rows_per_rank, r * rows_per_rank + its batch size).
    """
    # one exchange (one host sync) for both sizes: rows of x and positive pairs
    sizes = _all_gather_rows(torch.tensor([[x.shape[0], pos_rows.numel()]], device=x.device), group)
    per_rank, most = (int(v) for v in sizes.max(0).values.tolist())
    x_pad = torch.zeros((per_rank, x.shape[1]), dtype=x.dtype, device=x.device)
    x_pad[: x.shape[0]] = x
    real = (torch.arange(per_rank, device=x.device)[None, :] < sizes[:, :1]).flatten()
    new_index = torch.cumsum(real, 0) - 1  # padded row -> row of the global batch
    x_all = _all_gather_rows(x_pad, group)[real]
    rows, cols = _gather_pairs(pos_rows, pos_cols, per_rank, new_index, group, most)
    return x_all, rows, cols, real, per_rank


# torch 2.13 renamed reduce_scatter_tensor (still present, deprecated); the GPU machine has torch 2.11.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# step_fn(x_global, pos_rows, pos_cols, exclude_rows, exclude_cols) -> (dx_global, loss or None), labels local to
# the shard: the single-worker head step of whatever implementation (kernels, XMCHead.step).
StepFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    tuple[torch.Tensor, float | None],
]


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
    x_all, rows, cols, real, per_rank = gather_batch(x, pos_rows, pos_cols, group)
    mine = (cols >= shard_start) & (cols < shard_start + shard_labels)
    ex_rows = ex_cols = None
    if exclude_rows is not None:
        new_index = torch.cumsum(real, 0) - 1
        ex_all_rows, ex_all_cols = _gather_pairs(exclude_rows, exclude_cols, per_rank, new_index, group)
        ex_mine = (ex_all_cols >= shard_start) & (ex_all_cols < shard_start + shard_labels)
        ex_rows, ex_cols = ex_all_rows[ex_mine], ex_all_cols[ex_mine] - shard_start
    dx, loss = step_fn(x_all, rows[mine], cols[mine] - shard_start, ex_rows, ex_cols)
    dx_pad = torch.zeros((real.numel(), x.shape[1]), dtype=dx.dtype, device=x.device)
    dx_pad[real] = dx
    dx_local = torch.empty((per_rank, x.shape[1]), dtype=dx.dtype, device=x.device)
    _reduce_scatter(dx_local, dx_pad, group=group)
    COMM.add(dx_local, dist.get_world_size(group))
    if loss is not None:
        # Each shard's loss is its labels' summed BCE over the global batch divided by that batch's size.
        total = torch.tensor([loss], dtype=torch.float64, device=x.device)
        dist.all_reduce(total, group=group)
        loss = float(total)
    return HeadStepOutput(dx_local[: x.shape[0]], loss)


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
    """Top-k global label ids for this worker's queries x: every shard scores the whole batch, then one merge.

    Collective. k must not exceed the total label count; a shard with fewer than k labels pads its list with
    (-inf, MAX_LABELS) entries, which sort after every real one.
    """
    _, rank = _world(group)
    empty = torch.zeros(0, dtype=torch.int64, device=x.device)
    x_all, _, _, real, per_rank = gather_batch(x, empty, empty, group)
    scores, ids, offsets, start = [], [], [], 0
    for w in shard:
        n = max(0, min(w.shape[0], shard_labels - start))
        if n:
            s, i = topk_scores(x_all, w, min(k, n), n)
            scores.append(s)
            ids.append(i)
            offsets.append(shard_start + start)
        start += w.shape[0]
    local_k = min(k, sum(t.shape[1] for t in scores))
    s, i = merge_topk(scores, ids, local_k, id_offsets=offsets)
    pad = k - local_k
    s = torch.cat([s, s.new_full((s.shape[0], pad), float("-inf"))], dim=1)
    i = torch.cat([i, i.new_full((i.shape[0], pad), MAX_LABELS)], dim=1)
    all_s = _all_gather_rows(s[None], group)
    all_i = _all_gather_rows(i[None], group)
    s, i = merge_topk(list(all_s), list(all_i), k)
    first = int(real[: rank * per_rank].sum())
    return s[first : first + x.shape[0]], i[first : first + x.shape[0]]
