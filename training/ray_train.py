"""Label-sharded training on a Ray cluster: Ray Train's TorchTrainer around `training.worker.train_worker`.

    elmo train --data ../shared/data/debian-deps --workers 2                     # a local Ray, CPU workers (gloo)
    elmo train --data /srv/elmo/data/deps --workers 8 --use-gpu --address auto   # a cluster's GPUs (NCCL)

Ray places W worker processes (ScalingConfig), sets up their torch.distributed group and keeps the checkpoints:
every worker reports its own files of each checkpoint (its head shard; rank 0 also the encoder and optimizers) and
Ray Train stores them together in one checkpoint directory, in the layout of every run (`training.checkpoint`:
`elmo eval OUT` and `elmo export OUT ART` find the latest under the default storage `OUT/ray/`). When a worker dies,
Ray restarts the group, which resumes from the latest checkpoint (up to `max_failures` times).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

from training.config import TrainConfig
from training.worker import train_worker


class RayCheckpointer:
    """Checkpoints through `ray.train.report`; restores from `ray.train.get_checkpoint()` (after a restart)."""

    @contextlib.contextmanager
    def restore(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def save(self, write: Callable[[Path], None], metrics: dict) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="elmo-ckpt-") as directory:
            write(Path(directory))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def report(self, metrics: dict) -> None:
        import ray.train

        ray.train.report(metrics)


def _loop(config: dict) -> None:
    """The function every Ray Train worker runs."""
    import ray.train.torch

    cfg = TrainConfig(**config["train"])
    device = ray.train.torch.get_device() if cfg.use_gpu else None
    train_worker(cfg, RayCheckpointer(), device=device, on_step=config.get("on_step"))


def _absolute(cfg: TrainConfig) -> TrainConfig:
    """Paths as the workers must see them (their working directory is not the driver's)."""

    def resolve(p: str) -> str:
        return p if not p or "://" in p else str(Path(p).resolve())

    return replace(
        cfg, data=resolve(cfg.data), out=resolve(cfg.out), export=resolve(cfg.export), hf_path=resolve(cfg.hf_path)
    )


def fit(cfg: TrainConfig, on_step: Callable[[int], None] | None = None) -> dict:
    """Run `cfg` on cfg.workers Ray Train workers; returns the final metrics (and train_seconds, step_ms).

    Joins the Ray cluster at cfg.address (or starts a local one). on_step(step) runs in every worker after each
    step (tests inject failures with it). Raises RuntimeError when the run fails beyond cfg.max_failures."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if cfg.workers < 1:
        raise ValueError(f"workers must be at least 1, got {cfg.workers}")
    cfg = _absolute(cfg)
    if not ray.is_initialized():
        ray.init(address=cfg.address or None, configure_logging=False)
    storage = cfg.ray_storage or str(Path(cfg.out) / "ray")
    trainer = TorchTrainer(
        _loop,
        train_loop_config={"train": asdict(cfg), "on_step": on_step},
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=Path(cfg.out).name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"Ray Train run {cfg.out} failed: {result.error}") from result.error
    metrics = dict(result.metrics or {})  # what the latest checkpoint was reported with
    written = Path(cfg.out) / "metrics.json"  # rank 0's final summary, where the driver can read it
    if written.is_file():
        final = json.loads(written.read_text())
        summary = ("train_seconds", "step_ms", "comm_mb_per_step", "workers")
        metrics.update(final["metrics"], **{k: final[k] for k in summary})
    return metrics
