"""The per-worker function of label-sharded training, over plain torch.distributed.

The same function runs under Ray Train (`training.ray_train`, `elmo train --workers W`) and under torchrun
(`torchrun --nproc-per-node W -m elmo_serve.cli train ...`): Ray only starts the processes, sets up the process
group and stores the checkpoints.

Every worker reads the data and builds the same model from the seed (featurizer, encoder, the head's init), then
keeps only its label shard of the head (`shard_head`). Per step, the single-process trainer's global batch is cut
into W contiguous slices, one per worker; each worker encodes its slice; the head step runs sharded
(`training.distributed.sharded_step`: all-gather of the embeddings, the fused step on the shard for the whole batch,
reduce-scatter of dL/dx); the encoder gradients are summed over workers, so W workers take the optimizer step one
worker takes on the whole batch. Dense encoders (transformers) go through DDP; an encoder with sparse embedding
gradients (the hashed bag) has them summed by an all-gather of its touched rows, which NCCL cannot all-reduce.

A checkpoint is a directory: `common.pt` (encoder, featurizer, optimizers, schedule state, RNG; from rank 0) and
`shard-{rank}.pt` (each worker's rows of the head). Evaluation merges the shards' top-k lists; the export gathers
the head on rank 0, which writes the usual artifact.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from kernels.topk import MAX_LABELS, merge_topk
from training import data as xd
from training.config import TrainConfig
from training.distributed import COMM, _all_gather_rows, shard_range, sharded_step
from training.metrics import jain_propensity
from training.model import XMCHead, XMCModel
from training.train import (
    _finish,
    _rng_state,
    _set_rng_state,
    build_model,
    encoder_inputs,
    evaluate_model,
    featurize,
    load_data,
    lr_factor,
    make_optimizers,
    step_milliseconds,
)


class Checkpointer(Protocol):
    """Where a worker's checkpoints go: a shared directory (torchrun) or Ray Train's checkpoint storage."""

    def restore(self) -> contextlib.AbstractContextManager[Path | None]: ...

    def save(self, write: Callable[[Path], None], metrics: dict) -> None: ...

    def report(self, metrics: dict) -> None: ...


class DirectoryCheckpointer:
    """Checkpoints in `out/checkpoint/` on a filesystem all workers share: written to a temporary directory, then
    renamed into place by rank 0 once every worker has written its shard (a kill never leaves half of one)."""

    def __init__(self, out: str | Path, rank: int, resume: bool):
        self.path, self.rank, self.resume = Path(out) / "checkpoint", rank, resume

    @contextlib.contextmanager
    def restore(self) -> Iterator[Path | None]:
        old = self.path.with_name("checkpoint.old")
        if self.resume and not self.path.exists() and old.exists():
            yield old  # killed between the two renames of `save`
        else:
            yield self.path if self.resume and self.path.exists() else None

    def save(self, write: Callable[[Path], None], metrics: dict) -> None:
        tmp, old = self.path.with_name("checkpoint.tmp"), self.path.with_name("checkpoint.old")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        write(tmp)
        dist.barrier()
        if self.rank == 0:
            if self.path.exists():
                shutil.rmtree(old, ignore_errors=True)
                self.path.rename(old)
            tmp.rename(self.path)
            shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def report(self, metrics: dict) -> None:
        """The final metrics are in out/metrics.json."""


@dataclass
class Shard:
    """This worker's labels [start, end) of num_labels, and its head over them."""

    start: int
    end: int
    head: XMCHead


def shard_head(head: XMCHead, start: int, end: int) -> XMCHead:
    """A head over labels [start, end) of `head` (same scale, bias, Kahan rows), rounding like those rows of it."""
    c = head.config
    cfg = replace(
        c,
        num_labels=end - start,
        scale=float(head.scale),
        kahan_labels=max(0, min(len(head.kahan), end) - start),
        label_offset=c.label_offset + start,
    )
    part = XMCHead(cfg)
    with torch.no_grad():
        part.weight[: end - start] = head.weight[start:end]
        if c.bias:
            part.bias[: end - start] = head.bias[start:end]
        part.kahan.copy_(head.kahan[start : start + len(part.kahan)])
    return part


def _gather_rows(t: torch.Tensor, rows: int, group=None) -> list[torch.Tensor] | None:
    """Every rank's first `rows` (its own count) rows of t, on rank 0 (None elsewhere). Travels as bytes: gloo has
    no fp8."""
    world = dist.get_world_size(group)
    counts = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([rows], device=t.device), group=group)
    most = max(int(c) for c in counts)
    raw = t[:rows].reshape(rows, math.prod(t.shape[1:])).view(torch.uint8)
    buf = torch.zeros((most, raw.shape[1]), dtype=torch.uint8, device=t.device)
    buf[:rows] = raw
    parts = [torch.empty_like(buf) for _ in range(world)] if dist.get_rank(group) == 0 else None
    dist.gather(buf, parts, dst=0, group=group)
    if parts is None:
        return None
    return [p[: int(c)].view(t.dtype).reshape(int(c), *t.shape[1:]) for p, c in zip(parts, counts, strict=True)]


def gather_head(shard: Shard, full: XMCHead, group=None) -> XMCHead | None:
    """The whole head on rank 0 (None elsewhere): every shard's rows copied into `full` (built with the global
    config). Collective."""
    n = shard.end - shard.start
    weight = _gather_rows(shard.head.weight, n, group)
    bias = _gather_rows(shard.head.bias, n if shard.head.config.bias else 0, group)
    kahan = _gather_rows(shard.head.kahan, len(shard.head.kahan), group)
    if weight is None:
        return None
    with torch.no_grad():
        full.weight.zero_()
        full.weight[: full.num_labels] = torch.cat(weight).to(full.weight.device)
        full.scale.copy_(shard.head.scale)
        if full.config.bias:
            full.bias.zero_()
            full.bias[: full.num_labels] = torch.cat(bias).to(full.bias.device)
        full.kahan.copy_(torch.cat(kahan).to(full.kahan.device))
    return full


class EncoderGradients:
    """Sums the encoder's gradients over the workers: DDP for dense encoders, an all-gather of the touched rows for
    sparse embedding gradients (NCCL cannot all-reduce sparse tensors). `forward` is the encoder call to use."""

    def __init__(self, encoder: torch.nn.Module, device: torch.device, group=None):
        self.params = [p for p in encoder.parameters() if p.requires_grad]
        sparse = any(getattr(m, "sparse", False) for m in encoder.modules())
        self.world = dist.get_world_size(group)
        self.group = group
        self.ddp = None
        if not sparse and self.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                encoder, device_ids=ids, process_group=group, find_unused_parameters=True
            )
        self.forward = self.ddp if self.ddp is not None else encoder

    @property
    def dx_scale(self) -> float:
        """DDP averages over workers; scaling dL/dx by W makes it the sum one worker would compute."""
        return float(self.world) if self.ddp is not None else 1.0

    def reduce(self) -> None:
        """After backward: sum the gradients DDP did not (all of them, without DDP)."""
        if self.ddp is not None or self.world == 1:
            return
        dense = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if p.grad.is_sparse:
                p.grad = self._sum_sparse(p.grad)
            else:
                dense.append(p.grad)
        if dense:
            flat = torch._utils._flatten_dense_tensors(dense)
            dist.all_reduce(flat, group=self.group)
            COMM.add(flat, self.world)
            for g, s in zip(dense, torch._utils._unflatten_dense_tensors(flat, dense), strict=True):
                g.copy_(s)

    def _sum_sparse(self, grad: torch.Tensor) -> torch.Tensor:
        g = grad.coalesce()
        idx, val = g.indices()[0], g.values()
        count = _all_gather_rows(torch.tensor([[idx.numel()]], device=idx.device), self.group)
        most = int(count.max())
        idx_pad = torch.full((most,), -1, dtype=torch.int64, device=idx.device)
        idx_pad[: idx.numel()] = idx
        val_pad = torch.zeros((most, *val.shape[1:]), dtype=val.dtype, device=val.device)
        val_pad[: idx.numel()] = val
        all_idx = _all_gather_rows(idx_pad[None], self.group).flatten()
        all_val = _all_gather_rows(val_pad[None], self.group).flatten(0, 1)
        keep = all_idx >= 0
        return torch.sparse_coo_tensor(all_idx[keep][None], all_val[keep], g.shape, check_invariants=False).coalesce()


@torch.no_grad()
def evaluate_sharded(
    model: XMCModel,
    shard: Shard,
    ds: xd.XMCDataset,
    feats,
    propensity: np.ndarray | None,
    k: int = 5,
    master_bias: bool = False,
    group=None,
) -> dict[str, float]:
    """`training.train.evaluate_model` over a sharded head: each shard ranks the whole test batch, the lists merge.
    Every rank returns the same metrics. Collective."""
    world = dist.get_world_size(group)

    def merged_topk(x: torch.Tensor, filtered) -> torch.Tensor:
        excl = None
        if filtered is not None:
            mine = (filtered.col >= shard.start) & (filtered.col < shard.end)
            pairs = np.stack([filtered.row[mine], filtered.col[mine] - shard.start], 1)
            excl = torch.from_numpy(pairs.astype(np.int64))
        s, i = shard.head.topk(x, k, exclude=excl, master_bias=master_bias)
        pad = k - s.shape[1]  # a shard with fewer than k labels
        s = torch.cat([s, s.new_full((s.shape[0], pad), -math.inf)], 1)
        i = torch.cat([i + shard.start, i.new_full((i.shape[0], pad), MAX_LABELS)], 1)
        all_s = [torch.empty_like(s) for _ in range(world)]
        all_i = [torch.empty_like(i) for _ in range(world)]
        dist.all_gather(all_s, s.contiguous(), group=group)
        dist.all_gather(all_i, i.contiguous(), group=group)
        return merge_topk(all_s, all_i, k)[1]

    return evaluate_model(model, ds, feats, propensity, rank=merged_topk)


def _local_slice(batch_rows: int, world: int, rank: int) -> tuple[int, int]:
    return batch_rows * rank // world, batch_rows * (rank + 1) // world


def train_worker(
    cfg: TrainConfig,
    checkpointer: Checkpointer,
    *,
    device: torch.device | None = None,
    group=None,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Train (or resume) this worker's part of the run; every rank returns the same metrics.

    The process group must be initialised. on_step(step) is called after each optimizer step (tests use it to kill
    a worker). Rank 0 writes metrics.json, the plots and the artifact (cfg.export) into cfg.out."""
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device = device or _worker_device(cfg)
    if cfg.batch_size < world:
        raise ValueError(f"batch_size {cfg.batch_size} is smaller than the {world} workers")
    train_ds, test_ds = load_data(cfg)
    (train_ds, test_ds), order = xd.reindex_by_frequency(train_ds, test_ds)
    model = build_model(cfg, train_ds, order)
    full_head = model.head
    start, end = shard_range(train_ds.num_labels, world, rank)
    shard = Shard(start, end, shard_head(full_head, start, end))
    model.head = shard.head  # the whole head stays on the CPU only until the export
    state = {"step": 0, "epoch": 0, "batch": 0, "train_seconds": 0.0, "history": [], "metrics": {}}
    step_times: list[float] = []  # this process's steps (not checkpointed)
    step_comm = 0  # bytes this rank received in the collectives of those steps
    with checkpointer.restore() as ckpt_dir:
        common = None
        if ckpt_dir is not None:
            common = torch.load(ckpt_dir / "common.pt", weights_only=False, map_location="cpu")
            if common["world"] != world:
                raise ValueError(f"the checkpoint in {ckpt_dir} has {common['world']} shards, not {world}")
            part = torch.load(ckpt_dir / f"shard-{rank}.pt", weights_only=False, map_location="cpu")
            if (part["start"], part["end"]) != (start, end):
                raise ValueError(
                    f"shard {rank} of {ckpt_dir} covers {part['start']}..{part['end']}, not {start}..{end}"
                )
            if common["featurizer"] is not None:
                from training.encoders import HashedNgramFeaturizer

                model.featurizer = HashedNgramFeaturizer.from_state_dict(common["featurizer"])
            model.encoder.load_state_dict(common["encoder"])
            shard.head.load_state_dict(part["head"])
    model.to(device)
    opts = make_optimizers(model, cfg.encoder_lr)
    if common is not None:
        for o, s in zip(opts, common["optimizers"], strict=True):
            o.load_state_dict(s)
        state = common["state"]
        _set_rng_state(common["rng"])
    grads = EncoderGradients(model.encoder, device, group)
    train_feats, test_feats = featurize(model, train_ds), featurize(model, test_ds)
    counts = train_ds.label_counts()
    propensity = jain_propensity(counts, train_ds.num_rows, cfg.psp_a, cfg.psp_b)
    total = math.ceil(train_ds.num_rows / cfg.batch_size) * cfg.epochs
    filt = train_ds.filter_matrix() if cfg.exclude_self and len(train_ds.filters) else None

    def write(directory: Path) -> None:
        torch.save({"head": shard.head.state_dict(), "start": start, "end": end}, directory / f"shard-{rank}.pt")
        if rank == 0:
            common = {
                "config": asdict(cfg),
                "world": world,
                "encoder": model.encoder.state_dict(),
                "featurizer": model.featurizer.state_dict() if model.featurizer is not None else None,
                "optimizers": [o.state_dict() for o in opts],
                "state": state,
                "rng": _rng_state(),
            }
            torch.save(common, directory / "common.pt")

    def save() -> None:
        checkpointer.save(write, {"step": state["step"], "epoch": state["epoch"], **state["metrics"]})

    bar = tqdm(total=total, initial=state["step"], unit="step", disable=not cfg.progress or rank != 0)
    done_here = 0
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        for b in xd.iter_batches(train_ds, cfg.batch_size, seed=cfg.seed, epoch=epoch, start_batch=state["batch"]):
            t_step = time.perf_counter()
            step = state["step"]
            f = lr_factor(step, total, cfg.warmup, cfg.min_lr)
            sent = COMM.bytes
            if len(b.rows) >= world:  # an epoch's last batch smaller than the world is skipped
                loss = _train_step(cfg, model, shard, grads, opts, train_ds, train_feats, filt, b, step, f, device)
            else:
                loss = None
            step_comm += COMM.bytes - sent
            state["step"] += 1
            state["batch"] += 1
            done_here += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - t_step)
            if loss is not None:
                state["history"].append({"step": step, "epoch": epoch, "loss": loss, "lr_factor": f})
                bar.set_postfix(loss=f"{loss:.3f}")
            bar.update(1)
            if on_step is not None:
                on_step(state["step"])
            if cfg.stop_after and done_here >= cfg.stop_after:
                bar.close()
                return {"stopped": True, "step": state["step"]}
            if cfg.checkpoint_every > 0 and state["step"] % cfg.checkpoint_every == 0:
                state["train_seconds"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                save()
        state["epoch"] += 1
        state["batch"] = 0
        state["train_seconds"] += time.perf_counter() - t0
        if state["epoch"] % max(1, cfg.eval_every) == 0 or state["epoch"] == cfg.epochs:
            m = evaluate_sharded(model, shard, test_ds, test_feats, propensity, group=group)
            state["metrics"] = m
            state["history"].append({"step": state["step"], "epoch": state["epoch"], **m})
            bar.set_postfix({k: f"{v:.1f}" for k, v in m.items() if k in ("P@1", "P@5")})
        if cfg.checkpoint_every >= 0:
            save()
        t0 = time.perf_counter()
    bar.close()
    master = state["metrics"]
    if cfg.bias and cfg.precision != "fp32":
        master = evaluate_sharded(model, shard, test_ds, test_feats, propensity, master_bias=True, group=group)
    result = {
        "metrics": state["metrics"],
        "metrics_master_bias": master,
        "history": state["history"],
        "train_seconds": state["train_seconds"],
        "step_ms": step_milliseconds(step_times),
        "comm_mb_per_step": step_comm / 2**20 / max(1, len(step_times)),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "workers": world,
        "out": str(cfg.out),
        "config": asdict(cfg),
    }
    whole = gather_head(shard, full_head, group)
    if rank == 0:
        import json

        model.head = whole
        model.to("cpu")
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".metrics.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, out / "metrics.json")
        _finish(cfg, model, train_ds, test_ds, test_feats, counts, result)
    dist.barrier(group)
    summary = {k: result[k] for k in ("train_seconds", "step_ms", "comm_mb_per_step", "workers")}
    checkpointer.report({**result["metrics"], **summary, "step": state["step"], "epoch": state["epoch"]})
    return result


def run_distributed(cfg: TrainConfig) -> dict:
    """`elmo train` as one worker of a torchrun group (RANK, WORLD_SIZE, MASTER_ADDR... in the environment):
    NCCL on GPUs, gloo on CPUs; checkpoints in cfg.out/checkpoint on a filesystem all workers share."""
    device = _worker_device(cfg)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return train_worker(cfg, DirectoryCheckpointer(cfg.out, dist.get_rank(), cfg.resume), device=device)
    finally:
        dist.destroy_process_group()


def _train_step(cfg, model, shard, grads, opts, train_ds, train_feats, filt, b, step, f, device) -> float | None:
    """One optimizer step of this worker: its slice of the global batch `b`, the sharded head step, the encoder."""
    world, rank = dist.get_world_size(grads.group), dist.get_rank(grads.group)
    for o in opts:
        for g in o.param_groups:
            g["lr"] = cfg.encoder_lr * f
    lo, hi = _local_slice(len(b.rows), world, rank)
    rows = b.rows.numpy()[lo:hi]
    pos = b.positives
    sel = (pos[:, 0] >= lo) & (pos[:, 0] < hi)
    pos_rows, pos_cols = (pos[sel, 0] - lo).to(device), pos[sel, 1].to(device)
    ex_rows = ex_cols = None
    if filt is not None:
        fr = filt[rows].tocoo()
        ex_rows = torch.from_numpy(fr.row.astype(np.int64)).to(device)
        ex_cols = torch.from_numpy(fr.col.astype(np.int64)).to(device)
    inputs = encoder_inputs(model, train_ds, train_feats, rows)
    x = grads.forward(*(t.to(device) for t in inputs)).float()
    want_loss = cfg.loss_every > 0 and step % cfg.loss_every == 0
    head = shard.head

    def head_step(x_all, r, c, er, ec):
        exclude = None if er is None else torch.stack([er, ec], 1)
        return head.step(
            x_all,
            r,
            c,
            lr=cfg.head_lr * f,
            weight_decay=cfg.head_weight_decay,
            seed=cfg.seed * 1_000_003 + step,
            compute_loss=want_loss,
            exclude=exclude,
        )

    out = sharded_step(
        head_step,
        shard.start,
        shard.end - shard.start,
        x.detach(),
        pos_rows,
        pos_cols,
        exclude_rows=ex_rows,
        exclude_cols=ex_cols,
        group=grads.group,
    )
    x.backward((out.dx * grads.dx_scale).to(x.dtype))
    grads.reduce()
    for o in opts:
        o.step()
        o.zero_grad(set_to_none=True)
    return out.loss


def _worker_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)
