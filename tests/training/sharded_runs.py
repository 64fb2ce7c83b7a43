"""Runs of the label-sharded trainer in W local processes (gloo), as torchrun would start them."""

import datetime
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.config import TrainConfig


def _work(rank: int, world: int, init_file: str, kw: dict, results: str, nan_at: tuple[int, int] | None) -> None:
    from training.train import train
    from training.worker import LabelShards, train_worker

    class NaNFrom(LabelShards):
        """This worker's embeddings turn NaN from its call `nan_at[1]` of encode on."""

        calls = 0

        def encode(self, model, inputs):
            x = super().encode(model, inputs)
            self.calls += 1
            return x * float("nan") if self.calls > nan_at[1] else x

    # a collective that waits 2 minutes waits for a worker that stopped: fail instead of hanging the suite
    group = {"timeout": datetime.timedelta(seconds=120)}
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, **group)
    try:
        cfg = TrainConfig(**kw)
        try:
            out = train(cfg, parallel=NaNFrom()) if nan_at is not None and nan_at[0] == rank else train_worker(cfg)
        except ValueError as e:
            if nan_at is None:
                raise
            out = {"error": str(e)}
        torch.save(out, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def run_sharded(world: int, nan_at: tuple[int, int] | None = None, **kw) -> list[dict]:
    """train_worker in `world` processes; each rank's returned dict. nan_at (rank, n): that rank's embeddings are NaN
    after n steps, and each rank's ValueError comes back as {"error": message}."""
    fd, init_file = tempfile.mkstemp(prefix="elmo-init-")
    os.close(fd)
    os.unlink(init_file)
    results = str(Path(kw["out"]).with_name(Path(kw["out"]).name + "-result"))
    mp.spawn(_work, args=(world, init_file, kw, results, nan_at), nprocs=world)
    return [torch.load(f"{results}.{r}", weights_only=False) for r in range(world)]


def sharded_head_weights(path: str | Path) -> torch.Tensor:
    """The whole head of a checkpoint (a run directory's, or a checkpoint directory) in true units (L, D_in)."""
    directory = Path(path) / "checkpoint" if (Path(path) / "checkpoint").is_dir() else Path(path)
    parts = sorted(directory.glob("shard-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    rows = []
    for p in parts:
        s = torch.load(p, weights_only=False)
        rows.append(s["head"]["weight"][: s["end"] - s["start"]].float() / s["head"]["scale"])
    return torch.cat(rows)
