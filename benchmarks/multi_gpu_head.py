"""The label-sharded FP8 head on 1-8 GPUs (torchrun + NCCL): step time, memory, scaling, comm share, sharded top-k.

    python3 -m torch.distributed.run --standalone --nproc-per-node W benchmarks/multi_gpu_head.py \\
        --labels 8623847 --scaling-labels-per-gpu 2812281 --fit 50000000 100000000 --out $OUT/multi_gpu_W.json

Every rank holds a contiguous label shard (`training.distributed.shard_range`) of an FP8 head (D = 768, chunks of
262,144 rows, random weights) and B / W rows of each global batch of B = 128 (Zipf-like positives, ~5 per row).
A step is `training.distributed.sharded_head_step`: all-gather of the embeddings, the fused kernels on the shard for
the whole batch, reduce-scatter of dX. Per configuration:
  - step ms (median over --steps, CUDA events, after --warmup steps), peak memory per GPU;
  - the same step without communication (the shard's `head_step` on the gathered batch): comm share =
    1 - local / sharded; and the all-gather / reduce-scatter alone at the step's sizes;
  - scaling: W x --scaling-labels-per-gpu labels (fixed labels per GPU); efficiency = t(W=1) / t(W), where t(W=1)
    comes from a W = 1 run of this script (pass its JSON with --baseline);
  - the largest label count of --fit that fits (all ranks agree; an out-of-memory is caught and reported);
  - sharded top-k (`sharded_topk`, k = --k): ms per batch and queries/s at B = 1 and B = 1024, and the shard's own
    `topk_scores` over the whole batch (no collectives, no merges).
Rank 0 prints a table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from elmo_kernels.head_step import HeadStepConfig, head_step  # noqa: E402
from elmo_kernels.topk import topk_scores  # noqa: E402
from training.distributed import CapturedShardedTopk, gather_batch, shard_range, sharded_head_step, sharded_topk  # noqa: E402

GIB = 2**30
CHUNK = 262_144


def make_shard(rows: int, dim: int, device) -> torch.Tensor:
    """Random FP8 weights for `rows` labels, padded to 16 rows, one contiguous tensor (as XMCHead keeps them)."""
    padded = -(-rows // 16) * 16
    shard = torch.empty(padded, dim, dtype=torch.float8_e4m3fn, device=device)
    for start in range(0, padded, CHUNK):
        n = min(CHUNK, padded - start)
        shard[start : start + n] = (torch.randn(n, dim, device=device) * 0.5).to(torch.float8_e4m3fn)
    return shard


def local_batch(batch: int, world: int, rank: int, labels: int, dim: int, step: int, device):
    """This rank's rows of the global batch and its (row, label) positives, skewed towards low label ids."""
    lo, hi = batch * rank // world, batch * (rank + 1) // world
    g = torch.Generator(device=device).manual_seed(1000 * step + rank)
    x = torch.randn(hi - lo, dim, device=device, generator=g).to(torch.bfloat16)
    rows = torch.arange(hi - lo, device=device).repeat_interleave(5)
    cols = (torch.rand(rows.numel(), device=device, generator=g) ** 4 * labels).long().clamp_max(labels - 1)
    return x, torch.stack([rows, cols], 1)


def timed(fn, steps: int, warmup: int) -> float:
    """Median ms of fn() over `steps` calls (CUDA events), all ranks in step."""
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(steps):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(warmup + i)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def host_syncs(fn) -> int:
    """How many times one call of fn(0) waits for the GPU (torch's sync debug mode: one warning per wait)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn(0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def all_agree(ok: bool, device) -> bool:
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def step_config(labels: int, args, world: int, rank: int, device, with_topk: bool) -> dict:
    """Time the sharded step (and optionally top-k) at `labels` total labels; raises torch.cuda.OutOfMemoryError."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start, end = shard_range(labels, world, rank)
    shard = make_shard(end - start, args.dim, device)
    chunks = list(shard.split(CHUNK))  # the step's chunks: views, updated in place

    # every step's batch made before the clock starts; "local" gets the same global batches, gathered in advance
    calls = args.warmup + args.steps
    batches = [local_batch(args.batch, world, rank, labels, args.dim, i, device) for i in range(calls)]
    gathered = []
    for b in batches:
        x_all, pos_all, _ = gather_batch(*b)
        mine = (pos_all[:, 1] >= start) & (pos_all[:, 1] < end)
        gathered.append((x_all, pos_all[mine, 0], pos_all[mine, 1] - start))

    def sharded(i: int) -> None:
        x, pos = batches[i % calls]
        sharded_head_step(chunks, start, end - start, x, pos, HeadStepConfig(lr=0.01, seed=i), impl="triton")

    def local(i: int) -> None:
        x_all, rows, cols = gathered[i % calls]
        head_step(chunks, x_all, rows, cols, HeadStepConfig(lr=0.01, seed=i), num_labels=end - start, impl="triton")

    out = {"labels": labels, "labels_per_gpu": end - start}
    out["step_ms"] = timed(sharded, args.steps, args.warmup)
    out["local_step_ms"] = timed(local, args.steps, args.warmup)
    out["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    out["host_syncs_step"], out["host_syncs_local"] = host_syncs(sharded), host_syncs(local)
    # the collectives alone, at the step's sizes
    x_rows = torch.zeros(args.batch // world, args.dim, dtype=torch.bfloat16, device=device)
    parts = [torch.empty_like(x_rows) for _ in range(world)]
    out["all_gather_ms"] = timed(lambda i: dist.all_gather(parts, x_rows), args.steps, args.warmup)
    dx_all = torch.zeros(args.batch // world * world, args.dim, device=device)
    dx_mine = torch.empty(args.batch // world, args.dim, device=device)
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    out["reduce_scatter_ms"] = timed(lambda i: reduce_scatter(dx_mine, dx_all), args.steps, args.warmup)
    out["comm_share"] = max(0.0, 1 - out["local_step_ms"] / out["step_ms"])
    if with_topk:
        for b in (1, 1024):
            lo, hi = b * rank // world, b * (rank + 1) // world
            q = torch.randn(hi - lo, args.dim, device=device).to(torch.bfloat16)
            ms = timed(lambda i, q=q: sharded_topk([shard], start, end - start, q, args.k), args.steps, args.warmup)
            out[f"topk_b{b}_ms"] = ms
            out[f"topk_b{b}_qps"] = b / ms * 1e3
            out[f"topk_b{b}_host_syncs"] = host_syncs(
                lambda i, q=q: sharded_topk([shard], start, end - start, q, args.k)
            )
            # the shard's own top-k over the whole batch, no collectives or merges: what the sharding adds
            q_all = torch.randn(b, args.dim, device=device).to(torch.bfloat16)
            local_topk = lambda i, q=q_all: topk_scores(q, shard, args.k, end - start)  # noqa: E731
            out[f"topk_b{b}_local_ms"] = timed(local_topk, args.steps, args.warmup)
            # the same sharded top-k replayed as one CUDA graph (collectives captured), checked against the eager call
            try:
                graph = CapturedShardedTopk([shard], start, end - start, args.k, -(-b // world))
                same = torch.equal(graph(q)[1], sharded_topk([shard], start, end - start, q, args.k)[1])
                out[f"topk_b{b}_graph_same_ids"] = all_agree(same, device)
                out[f"topk_b{b}_graph_ms"] = timed(lambda i, q=q, g=graph: g(q), args.steps, args.warmup)
                del graph
            except Exception as e:  # reported, not fatal: the eager figures above stand
                out[f"topk_b{b}_graph_error"] = repr(e)[:400]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", type=int, nargs="*", default=[8_623_847], help="total label counts to time")
    p.add_argument("--scaling-labels-per-gpu", type=int, default=2_812_281)
    p.add_argument("--fit", type=int, nargs="*", default=[], help="label counts to try for 'largest that fits'")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--baseline", default="", help="JSON of a W = 1 run, for the scaling efficiency")
    p.add_argument("--out", default="multi_gpu_head.json")
    args = p.parse_args()
    dist.init_process_group("nccl")
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    rows = []
    plan = [(n, "labels", True) for n in args.labels]
    plan.append((args.scaling_labels_per_gpu * world, "scaling", False))
    plan += [(n, "fit", False) for n in sorted(args.fit)]
    for labels, kind, with_topk in plan:
        t0 = time.perf_counter()
        try:
            r = step_config(labels, args, world, rank, device, with_topk)
            ok = True
        except torch.cuda.OutOfMemoryError as e:
            r, ok = {"labels": labels, "error": f"out of memory: {str(e).splitlines()[0]}"}, False
            torch.cuda.empty_cache()
        ok = all_agree(ok, device)
        r.update(kind=kind, fits=ok, seconds=time.perf_counter() - t0)
        if rank == 0:
            print(json.dumps(r), flush=True)
        rows.append(r)
        if kind == "fit" and not ok:
            break
    if rank != 0:
        dist.destroy_process_group()
        return
    base = None
    if args.baseline:
        base = next(r for r in json.loads(Path(args.baseline).read_text())["rows"] if r["kind"] == "scaling")
    print(f"\nW = {world} x {torch.cuda.get_device_name()}, B = {args.batch}, D = {args.dim}, FP8 head")
    print(
        "| labels | per GPU | step ms | no-comm ms | comm share | all-gather ms | reduce-scatter ms | peak GiB/GPU "
        "| host syncs step / no-comm |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["fits"] and "step_ms" in r:
            print(
                f"| {r['labels']:,} | {r['labels_per_gpu']:,} | {r['step_ms']:.2f} | {r['local_step_ms']:.2f} | "
                f"{100 * r['comm_share']:.1f}% | {r['all_gather_ms']:.3f} | {r['reduce_scatter_ms']:.3f} | "
                f"{r['peak_gib']:.2f} | {r['host_syncs_step']} / {r['host_syncs_local']} |"
            )
        else:
            print(f"| {r['labels']:,} | does not fit | | | | | | | |")
    scaling = next(r for r in rows if r["kind"] == "scaling")
    if base is not None and scaling.get("fits"):
        scaling["efficiency"] = base["step_ms"] / scaling["step_ms"]
        print(f"scaling at {args.scaling_labels_per_gpu:,} labels/GPU: efficiency {scaling['efficiency']:.2f}")
    for r in rows:
        if "topk_b1_ms" in r:
            print(
                f"sharded top-{args.k} at {r['labels']:,} labels: B=1 {r['topk_b1_ms']:.3f} ms "
                f"({r['topk_b1_qps']:.0f} q/s; shard alone {r['topk_b1_local_ms']:.3f}; "
                f"{r['topk_b1_host_syncs']} host syncs; graph {r.get('topk_b1_graph_ms', float('nan')):.3f}), "
                f"B=1024 {r['topk_b1024_ms']:.2f} ms "
                f"({r['topk_b1024_qps']:.0f} q/s; shard alone {r['topk_b1024_local_ms']:.2f}; "
                f"graph {r.get('topk_b1024_graph_ms', float('nan')):.2f})"
            )
    fits = [r["labels"] for r in rows if r["kind"] == "fit" and r["fits"]]
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"{world} x {torch.cuda.get_device_name()}",
        "world": world,
        "args": vars(args),
        "largest_fitting_tried": max(fits) if fits else None,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
