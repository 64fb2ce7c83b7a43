"""Label-sharded head over torch.distributed (gloo, 2 CPU processes) against one worker."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from elmo_kernels.head_step import HeadStepConfig, head_step
from elmo_kernels.topk import topk_scores
from training.distributed import (
    CapturedShardedTopk,
    shard_range,
    sharded_head_step,
    sharded_topk,
    sharded_topk_replicated,
)
from training.model import chunked_topk

LABELS, DIM, STEPS = 200, 24, 4
BATCHES = (4, 3)  # uneven local batches: rank 0 has 4 rows, rank 1 has 3


def _problem(dtype):
    g = torch.Generator().manual_seed(0)
    head = (torch.randn(208, DIM, generator=g) * 0.3).to(dtype)
    steps = []
    for _ in range(STEPS):
        xs = [torch.randn(b, DIM, generator=g).to(torch.bfloat16) for b in BATCHES]
        pos = [_pairs(g, b, 5) for b in BATCHES]
        ex = [_pairs(g, b, 3) for b in BATCHES]
        steps.append((xs, pos, ex))
    return head, steps


def _pairs(g, rows, n):
    """n random (row, label) pairs, (n, 2) int64: the form the sharded step takes."""
    return torch.stack([torch.randint(0, rows, (n,), generator=g), torch.randint(0, LABELS, (n,), generator=g)], 1)


def _exclusions(ids):
    """(row, label) pairs excluding each row's best label and its 5th, given the rows' ranked label ids (B, >= 5)."""
    rows = torch.arange(ids.shape[0])
    return torch.cat([torch.stack([rows, ids[:, 0]], 1), torch.stack([rows, ids[:, 4]], 1)])


def _worker(rank, world, init_file, dtype, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    head, steps = _problem(dtype)
    start, end = shard_range(LABELS, world, rank)
    shard = [head[start : start + -(-(end - start) // 16) * 16].clone()]
    cfg = HeadStepConfig(lr=0.2, weight_decay=0.01, seed=9, compute_loss=True)
    dxs, losses = [], []
    for step, (xs, pos, ex) in enumerate(steps):
        out = sharded_head_step(
            shard,
            start,
            end - start,
            xs[rank],
            pos[rank],
            HeadStepConfig(**{**cfg.__dict__, "seed": step}),
            impl="torch",
            exclude=ex[rank],
        )
        dxs.append(out.dx)
        losses.append(out.loss)
    # k = 120 exceeds each shard's label count: the shards' lists are padded before the merge
    x = steps[0][0][rank].float()
    topk = {k: sharded_topk(shard, start, end - start, x, k=k) for k in (7, 120)}
    # (row, label) exclusions; the whole batch held by every rank, ranked through a function of the shard
    excluded = sharded_topk(shard, start, end - start, x, 7, exclude=_exclusions(topk[7][1]))
    every = torch.cat([s[0][r] for s in steps[:2] for r in range(world)]).float()
    n = end - start

    def rank_shard(q, k, exclude):
        return chunked_topk(q, shard, min(k, n), n, exclude)

    plain = sharded_topk_replicated(rank_shard, start, n, every, 6)
    replicated = sharded_topk_replicated(rank_shard, start, n, every, 6, exclude=_exclusions(plain[1]))
    torch.save(
        {
            "shard": shard[0],
            "start": start,
            "end": end,
            "dx": dxs,
            "loss": losses,
            "topk": topk,
            "excluded": excluded,
            "plain": plain,
            "replicated": replicated,
        },
        f"{out_file}.{rank}",
    )
    dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_two_workers_match_one(tmp_path, dtype):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), dtype, str(tmp_path / "out")), nprocs=2)
    parts = [torch.load(tmp_path / f"out.{r}") for r in range(2)]
    assert parts[0]["end"] == parts[1]["start"] and parts[0]["start"] == 0 and parts[1]["end"] == LABELS
    # One worker, the same global batches (rank 0's rows, then rank 1's).
    head, steps = _problem(dtype)
    whole = [head.clone()]
    for step, (xs, pos, ex) in enumerate(steps):
        x = torch.cat(xs)
        shift = torch.tensor([BATCHES[0], 0])
        positives, exclude = torch.cat([pos[0], pos[1] + shift]), torch.cat([ex[0], ex[1] + shift])
        out = head_step(
            whole,
            x,
            positives[:, 0],
            positives[:, 1],
            HeadStepConfig(lr=0.2, weight_decay=0.01, seed=step, compute_loss=True),
            num_labels=LABELS,
            impl="torch",
            exclude_rows=exclude[:, 0],
            exclude_cols=exclude[:, 1],
        )
        dx = torch.cat([parts[0]["dx"][step], parts[1]["dx"][step]])
        torch.testing.assert_close(dx, out.dx, rtol=1e-5, atol=1e-5)
        assert parts[0]["loss"][step] == pytest.approx(out.loss, rel=1e-5)
    sharded = torch.cat([p["shard"][: p["end"] - p["start"]] for p in parts])
    # Same Philox stream per global label: identical weights up to a rare fp32-summation-order flip.
    differ = (sharded.float() != whole[0][:LABELS].float()).float().mean().item()
    assert differ <= 1e-3, f"{differ:.4%} of the weights differ"
    # every rank gets the top-k of its own queries, as one worker ranks them (the trained head)
    for rank, p in enumerate(parts):
        for k, (scores, ids) in p["topk"].items():
            want_scores, want_ids = topk_scores(steps[0][0][rank].float(), whole[0], k, LABELS, impl="torch")
            assert torch.equal(ids, want_ids)
            torch.testing.assert_close(scores, want_scores)
        x = steps[0][0][rank].float()
        dropped = p["topk"][7][1][:, [0, 4]]  # the (B, E) form of the same exclusions
        want = topk_scores(x, whole[0], 7, LABELS, impl="torch", exclude=dropped)
        assert torch.equal(p["excluded"][1], want[1])
        assert not (p["excluded"][1][:, :, None] == dropped[:, None, :]).any()
    # the batch every rank holds: every rank gets all of its rows' lists
    every = torch.cat([s[0][r] for s in steps[:2] for r in range(2)]).float()
    want = topk_scores(every, whole[0], 6, LABELS, impl="torch")
    want_excluded = topk_scores(every, whole[0], 6, LABELS, impl="torch", exclude=want[1][:, [0, 4]])
    for p in parts:
        assert torch.equal(p["plain"][1], want[1])
        assert torch.equal(p["replicated"][1], want_excluded[1])
        torch.testing.assert_close(p["replicated"][0], want_excluded[0])


def test_shard_range():
    ranges = [shard_range(1009, 3, r) for r in range(3)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 1009
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert all(start % 16 == 0 for start, _ in ranges)
    with pytest.raises(ValueError, match="too few"):
        shard_range(20, 4, 0)
    with pytest.raises(ValueError, match="rank"):
        shard_range(100, 2, 2)


def test_captured_sharded_topk_needs_cuda_shards():
    with pytest.raises(ValueError, match="CUDA"):
        CapturedShardedTopk([torch.zeros(16, 8)], 0, 16, 5, 4)
    with pytest.raises(ValueError, match="CUDA"):
        CapturedShardedTopk([], 0, 16, 5, 4)
