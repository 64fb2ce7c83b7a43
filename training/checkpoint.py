"""Checkpoints: one layout at every world size, read by `--resume`, `elmo eval` and `elmo export` alike.

A checkpoint is a directory:
    common.pt          config, world size, encoder state, label order, featurizer, optimizers, loop state, RNG
                       (written by the main process)
    shard-{rank}.pt    {"head": that worker's head state dict, "start", "end"}: labels [start, end) of the head
A single-process run is a world of one (`shard-0.pt` holds the whole head). A run directory keeps its latest
checkpoint in `<out>/checkpoint/` (`DirectoryCheckpointer`); Ray Train keeps them in its storage
(`<out>/ray/<name>/checkpoint_*/` by default, `training.ray_train.RayCheckpointer`). Reading one assembles the whole
head from the shards, so a checkpoint of W workers loads as one model, and resumes at any world size.
Each rank writes `sha256-{rank}.json` ({file: sha256} of the files it wrote) atomically after them; reading checks
every file against it (a torn, truncated or changed checkpoint is a ValueError naming the file, never a pickle
traceback) and that the restored tensors are finite. A checkpoint without them (written before) loads unverified.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from training import data as xd
from training.artifact import check_finite, file_sha256
from training.build import encoder_for_state, head_config, load_data
from training.config import TrainConfig
from training.encoders import HashedNgramFeaturizer
from training.model import XMCHead, XMCModel

COMMON = "common.pt"
LEGACY = "checkpoint.pt"  # the single-process layout before shards: one file holding the whole model
log = logging.getLogger(__name__)


def shard_file(rank: int) -> str:
    return f"shard-{rank}.pt"


def sums_file(rank: int) -> str:
    return f"sha256-{rank}.json"


def _write_sums(directory: Path, rank: int, names: list[str]) -> None:
    """This rank's checksums, written (atomically) after its files: a checkpoint torn before it lacks them."""
    tmp = directory / f".{sums_file(rank)}.tmp"
    tmp.write_text(json.dumps({n: file_sha256(directory / n) for n in names}, indent=1))
    os.replace(tmp, directory / sums_file(rank))


def _read_sums(path: Path) -> dict[str, str] | None:
    """{file: sha256} from every rank's checksum file of checkpoint `path`; None when it has none (an old one)."""
    files = sorted(path.glob("sha256-*.json"))
    if not files:
        return None
    sums: dict[str, str] = {}
    for f in files:
        try:
            part = json.loads(f.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"corrupt checkpoint: {f} is not valid JSON") from None
        if not isinstance(part, dict):
            raise ValueError(f"corrupt checkpoint: {f} is not a {{file: sha256}} map")
        sums.update(part)
    return sums


def _load(file: Path, sums: dict[str, str] | None) -> dict:
    """torch.load of one checkpoint file, its checksum checked first; any failure is a ValueError naming it."""
    if sums is not None:
        if file.name not in sums:
            raise ValueError(f"corrupt checkpoint: {file} has no checksum (a torn or mixed checkpoint)")
        if file_sha256(file) != sums[file.name]:
            raise ValueError(f"corrupt checkpoint: {file} does not match its checksum (changed or corrupt)")
    try:
        obj = torch.load(file, weights_only=False, map_location="cpu")
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - truncation shows as pickle, zip, EOF, Unicode or runtime errors
        raise ValueError(
            f"corrupt checkpoint: {file} is unreadable ({type(e).__name__}: truncated or corrupt)"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"corrupt checkpoint: {file} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def _tensors(obj, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) of every tensor in nested dicts/lists (model and optimizer states)."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}" if prefix else str(i))


def _check_restored(file: Path, obj: dict) -> None:
    """The float tensors a resume restores (model, head shard, optimizer states) are finite."""
    check_finite(dict(_tensors({k: v for k, v in obj.items() if k != "rng"})), f"corrupt checkpoint: {file}")


def rng_state() -> dict:
    """The torch, numpy and Python RNG states (saved in checkpoints: resumed runs draw the same numbers)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class Checkpointer(Protocol):
    """Where a run's checkpoints go: a directory all workers share, or Ray Train's checkpoint storage."""

    def restore(self) -> contextlib.AbstractContextManager[Path | None]: ...

    def save(self, write: Callable[[Path], None], metrics: dict) -> None: ...

    def report(self, metrics: dict) -> None: ...


class DirectoryCheckpointer:
    """Checkpoints in `out/checkpoint/` on a filesystem all workers share: written to a temporary directory, then
    renamed into place by rank 0 once every worker has written its shard (a kill never leaves half of one).
    `barrier` synchronises the workers (none for a single process)."""

    def __init__(self, out: str | Path, rank: int = 0, resume: bool = False, barrier: Callable[[], None] | None = None):
        self.path, self.rank, self.resume = Path(out) / "checkpoint", rank, resume
        self.barrier = barrier or (lambda: None)

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
        self.barrier()
        write(tmp)
        self.barrier()
        if self.rank == 0:
            if self.path.exists():
                shutil.rmtree(old, ignore_errors=True)
                self.path.rename(old)
            tmp.rename(self.path)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier()

    def report(self, metrics: dict) -> None:
        """The final metrics are in out/metrics.json."""


def write_checkpoint(
    directory: Path,
    model: XMCModel,
    labels: tuple[int, int],
    opts: list[torch.optim.Optimizer],
    state: dict,
    cfg: TrainConfig,
    *,
    rank: int = 0,
    world: int = 1,
) -> None:
    """This worker's files of a checkpoint: its head (labels [start, end)) and, on rank 0, everything else."""
    start, end = labels
    torch.save({"head": model.head.state_dict(), "start": start, "end": end}, directory / shard_file(rank))
    written = [shard_file(rank)]
    if rank == 0:
        common = {
            "config": asdict(cfg),
            "world": world,
            "encoder": model.encoder.state_dict(),
            "label_order": model.label_order.cpu(),
            "featurizer": model.featurizer.state_dict() if model.featurizer is not None else None,
            "optimizers": [o.state_dict() for o in opts],
            "state": state,
            "rng": rng_state(),
            "checksummed": True,  # its sha256-*.json follow: a checkpoint holding this without them is torn
        }
        torch.save(common, directory / COMMON)
        written.append(COMMON)
    _write_sums(directory, rank, written)


@torch.no_grad()
def place_shards(head: XMCHead, shards: list[dict]) -> None:
    """Copy every shard's rows (`{"head": state dict, "start", "end"}`) into `head`, the whole head of the run."""
    spans = sorted((s["start"], s["end"]) for s in shards)
    if [a for a, _ in spans] != [0] + [b for _, b in spans[:-1]] or spans[-1][1] != head.num_labels:
        raise ValueError(f"the head's shards cover {spans}, not the {head.num_labels} labels in one piece")
    for s in shards:
        start, end, part = s["start"], s["end"], s["head"]
        weight = part["weight"]
        if weight.dtype != head.weight.dtype or weight.shape[1] != head.weight.shape[1]:
            raise ValueError(
                f"shard {start}..{end} holds {weight.dtype} rows of {weight.shape[1]} columns, the head "
                f"{head.weight.dtype} rows of {head.weight.shape[1]}"
            )
        head.weight[start:end] = weight[: end - start].to(head.weight.device)
        head.scale.copy_(part["scale"])
        if head.config.bias:
            head.bias[start:end] = part["bias"][: end - start].to(head.bias.device)
        head.kahan[start : start + len(part["kahan"])] = part["kahan"].to(head.kahan.device)


@dataclass
class Checkpoint:
    """A checkpoint read back: rank 0's common part and every worker's head shard."""

    common: dict
    shards: list[dict]

    @property
    def config(self) -> TrainConfig:
        return TrainConfig(**self.common["config"])

    @property
    def state(self) -> dict:
        return self.common["state"]

    @property
    def num_labels(self) -> int:
        if self.shards:
            return max(s["end"] for s in self.shards)
        return len(self.common["model"]["label_order"])

    def load_into(self, model: XMCModel) -> None:
        """Featurizer, encoder, label order and the whole head (assembled from the shards) into `model`."""
        if self.common["featurizer"] is not None:
            model.featurizer = HashedNgramFeaturizer.from_state_dict(self.common["featurizer"])
        if "model" in self.common:  # the legacy single file
            model.load_state_dict(self.common["model"])
            return
        model.encoder.load_state_dict(self.common["encoder"])
        if "label_order" in self.common:  # else (sharded checkpoints before one layout) the data's order stays
            model.label_order.copy_(self.common["label_order"])
        place_shards(model.head, self.shards)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint in directory `path` (or a legacy single-file checkpoint), on the CPU."""
    path = Path(path)
    if path.is_file():
        legacy = _load(path, None)
        _check_restored(path, legacy)
        return Checkpoint(legacy, [])
    sums = _read_sums(path)
    if sums is None:
        log.warning("checkpoint %s has no checksums (written before they were): its files are not verified", path)
    common = _load(path / COMMON, sums)
    if sums is None and common.get("checksummed"):
        raise ValueError(f"corrupt checkpoint: {path} lacks its checksums {sums_file(0)} (torn while written)")
    _check_restored(path / COMMON, common)
    world = common.get("world")
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"corrupt checkpoint: {path / COMMON} has no world size")
    missing = [shard_file(r) for r in range(world) if not (path / shard_file(r)).is_file()]
    if missing:
        raise FileNotFoundError(f"the checkpoint in {path} lacks {', '.join(missing)}")
    shards = []
    for r in range(world):
        shard = _load(path / shard_file(r), sums)
        _check_restored(path / shard_file(r), shard)
        shards.append(shard)
    return Checkpoint(common, shards)


def find_checkpoint(run: str | Path) -> Path:
    """The latest checkpoint of a run directory (its `checkpoint/`, else Ray Train's default storage under it), or
    `run` itself when it is a checkpoint directory or file."""
    run = Path(run)
    if run.is_file() or (run / COMMON).is_file():
        return run
    for candidate in (run / "checkpoint", run / "checkpoint.old"):
        if (candidate / COMMON).is_file():
            return candidate
    if (run / LEGACY).is_file():
        return run / LEGACY
    stored = sorted(p.parent for p in run.glob(f"ray/*/checkpoint_*/{COMMON}"))
    if stored:
        return stored[-1]
    raise FileNotFoundError(f"no checkpoint in {run} (looked for checkpoint/{COMMON} and ray/*/checkpoint_*/)")


def model_from_checkpoint(path: str | Path, device: str = "cpu") -> tuple[XMCModel, TrainConfig, dict]:
    """(model, config, state) of a run directory's latest checkpoint (or a checkpoint), without reading the data;
    the head is whole whatever the run's world size."""
    ckpt = read_checkpoint(find_checkpoint(path))
    cfg = ckpt.config
    if "model" in ckpt.common:
        sd = ckpt.common["model"]
        encoder_state = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
    elif "label_order" in ckpt.common:
        encoder_state = ckpt.common["encoder"]
    else:
        raise ValueError(f"the checkpoint of {path} has no label order (written before 2026-12-03): resume it first")
    encoder, frozen = encoder_for_state(cfg, encoder_state)
    head = XMCHead(head_config(cfg, ckpt.num_labels, encoder.dim))
    model = XMCModel(encoder, head, frozen=frozen)
    ckpt.load_into(model)
    return model.to(device).eval(), cfg, ckpt.state


def export_run(run: str | Path, artifact: str | Path, data: str | None = None) -> Path:
    """Write the artifact of a run directory (its checkpoint; the data is read again for titles and fingerprint)."""
    from training.artifact import save_artifact

    model, cfg, state = model_from_checkpoint(run)
    if data is not None:
        cfg.data = data
    train_ds, _ = load_data(cfg)
    train_ds = xd.permute_labels(train_ds, model.label_order.cpu().numpy())
    return save_artifact(artifact, model, train_ds, metrics=state.get("metrics", {}), config=asdict(cfg))
