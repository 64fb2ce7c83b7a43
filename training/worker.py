"""One worker of a label-sharded run, over plain torch.distributed: what it does where a single process differs.

The same function runs under Ray Train (`training.ray_train`, `elmo train --workers W`) and under torchrun
(`torchrun --nproc-per-node W -m elmo_serve.cli train ...`): Ray only starts the processes, sets up the process
group and stores the checkpoints. Every worker runs the one training loop (`training.train.train`) with
`LabelShards` as its `Parallelism`.

Every worker reads the data and builds the same model from the seed (featurizer, encoder, the head's init), then
keeps only its label shard of the head (`shard_head`). Per step, the single-process trainer's global batch is cut
into W contiguous slices, one per worker; each worker encodes its slice; the head step runs sharded
(`training.distributed.sharded_step`: all-gather of the embeddings, the fused step on the shard for the whole batch,
reduce-scatter of dL/dx); the encoder gradients are summed over workers, so W workers take the optimizer step one
worker takes on the whole batch. Dense encoders (transformers) go through DDP; an encoder with sparse embedding
gradients (the hashed bag) has them summed by an all-gather of its touched rows, which NCCL cannot all-reduce.

Checkpoints have the layout of every run (`training.checkpoint`: `common.pt` from rank 0, `shard-{rank}.pt` from
each worker), so `elmo eval` and `elmo export` read a sharded run's checkpoint as they read any other. Evaluation
merges the shards' top-k lists; at the end the head is gathered on rank 0, which writes metrics.json, the plots and
the artifact.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist

from training import data as xd
from training.checkpoint import Checkpointer, place_shards
from training.config import TrainConfig
from training.distributed import COMM, all_gather_rows, shard_range, sharded_step, sharded_topk_replicated
from training.evaluation import evaluate_model, filter_pairs
from training.model import XMCHead, XMCModel
from training.train import train


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
    head = shard.head
    weight = _gather_rows(head.weight, shard.end - shard.start, group)
    bias = _gather_rows(head.bias, shard.end - shard.start if head.config.bias else 0, group)
    kahan = _gather_rows(head.kahan, len(head.kahan), group)
    if weight is None:
        return None
    world = dist.get_world_size(group)
    spans = [shard_range(full.num_labels, world, r) for r in range(world)]
    parts = [
        {"head": {"weight": w, "bias": b, "kahan": k, "scale": head.scale}, "start": start, "end": end}
        for w, b, k, (start, end) in zip(weight, bias, kahan, spans, strict=True)
    ]
    full.to(head.weight.device)
    place_shards(full, parts)
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
        count = all_gather_rows(torch.tensor([[idx.numel()]], device=idx.device), self.group)
        most = int(count.max())
        idx_pad = torch.full((most,), -1, dtype=torch.int64, device=idx.device)
        idx_pad[: idx.numel()] = idx
        val_pad = torch.zeros((most, *val.shape[1:]), dtype=val.dtype, device=val.device)
        val_pad[: idx.numel()] = val
        all_idx = all_gather_rows(idx_pad[None], self.group).flatten()
        all_val = all_gather_rows(val_pad[None], self.group).flatten(0, 1)
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
    """`training.evaluation.evaluate_model` over a sharded head (`training.distributed.sharded_topk_replicated`):
    each rank ranks a slice of the test batch on every shard, the lists merge. Every rank returns the same metrics.
    Collective."""

    def merged_topk(x: torch.Tensor, filtered) -> torch.Tensor:
        rank_shard = functools.partial(shard.head.topk, master_bias=master_bias)
        span = shard.end - shard.start
        return sharded_topk_replicated(rank_shard, shard.start, span, x, k, group, exclude=filter_pairs(filtered))[1]

    return evaluate_model(model, ds, feats, propensity, rank=merged_topk)


class LabelShards:
    """The `training.train.Parallelism` of one worker of a label-sharded run (the process group initialised)."""

    def __init__(self, device: torch.device | None = None, group=None):
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.is_main = self.rank == 0
        self._device = device
        self.shard: Shard | None = None
        self.full_head: XMCHead | None = None
        self.grads: EncoderGradients | None = None

    def device(self, cfg: TrainConfig) -> torch.device:
        if self._device is None:
            self._device = worker_device(cfg)
        return self._device

    def prepare(self, model: XMCModel, device: torch.device) -> tuple[int, int]:
        start, end = shard_range(model.head.num_labels, self.world, self.rank)
        self.full_head = model.head  # the whole head stays on the CPU only until the export
        self.shard = Shard(start, end, shard_head(model.head, start, end))
        model.head = self.shard.head
        model.to(device)
        self.grads = EncoderGradients(model.encoder, device, self.group)
        return start, end

    def batch_rows(self, size: int) -> tuple[int, int]:
        return size * self.rank // self.world, size * (self.rank + 1) // self.world

    def encode(self, model: XMCModel, inputs: tuple) -> torch.Tensor:
        return self.grads.forward(*(t.to(self._device) for t in inputs)).float()

    def head_step(self, head, x, pos, exclude, **step) -> tuple[torch.Tensor, float | None]:
        def step_fn(x_all, pos_all, exclude_all):
            return head.step(x_all, pos_all, exclude=exclude_all, **step)

        start, span = self.shard.start, self.shard.end - self.shard.start
        pos, exclude = pos.to(self._device), exclude.to(self._device) if exclude is not None else None
        out = sharded_step(step_fn, start, span, x.detach(), pos, exclude=exclude, group=self.group)
        return out.dx * self.grads.dx_scale, out.loss

    def reduce_gradients(self) -> None:
        self.grads.reduce()

    def evaluate(self, model, ds, feats, propensity, master_bias: bool = False) -> dict:
        return evaluate_sharded(model, self.shard, ds, feats, propensity, master_bias=master_bias, group=self.group)

    def whole_model(self, model: XMCModel) -> XMCModel | None:
        whole = gather_head(self.shard, self.full_head, self.group)
        if whole is None:
            return None
        model.head = whole
        return model.to("cpu")

    def all_finite(self, finite: torch.Tensor) -> bool:
        # NaN rows of one worker's batch reach only its own rows of dL/dx: without this, that worker would stop and
        # the others would wait for it in the next step's collectives.
        flag = finite.to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def barrier(self) -> None:
        dist.barrier(self.group)

    def comm_bytes(self) -> int:
        return COMM.bytes


def train_worker(
    cfg: TrainConfig,
    checkpointer: Checkpointer | None = None,
    *,
    device: torch.device | None = None,
    group=None,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Train (or resume) this worker's part of the run; every rank returns the same metrics.

    The process group must be initialised. checkpointer: default `<cfg.out>/checkpoint/` (a filesystem all
    workers share). on_step(step) is called after each optimizer step (tests use it to kill a worker). Rank 0
    writes metrics.json, the plots and the artifact (cfg.export) into cfg.out."""
    return train(cfg, parallel=LabelShards(device, group), checkpointer=checkpointer, on_step=on_step)


def run_distributed(cfg: TrainConfig) -> dict:
    """`elmo train` as one worker of a torchrun group (RANK, WORLD_SIZE, MASTER_ADDR... in the environment):
    NCCL on GPUs, gloo on CPUs; checkpoints in cfg.out/checkpoint on a filesystem all workers share."""
    device = worker_device(cfg)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return train_worker(cfg, device=device)
    finally:
        dist.destroy_process_group()


def worker_device(cfg: TrainConfig) -> torch.device:
    """A worker's device: the CPU, or the GPU of its LOCAL_RANK (made current)."""
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)
