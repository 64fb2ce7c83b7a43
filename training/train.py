"""Training: the one loop (nanoGPT-style, no Trainer classes), for a single process and for every worker of a
label-sharded run alike.

    elmo train --data ../shared/data/debian-deps --precision fp8+kahan --epochs 3 --out runs/deps
    elmo train --config my.toml --head-lr 0.01          # flags override the file, the file overrides the defaults

Per step: encoder forward (autograd graph of the encoder only) -> the head's fused SGD step returns dL/dx ->
encoder backward with it -> SparseAdam (embedding table) + torch-optimi AdamW (dense encoder parameters, Kahan
summation when they are bf16). Losses are computed only every `loss_every` steps (skip-loss). A checkpoint
(`training.checkpoint`: model, optimizers, step, RNG states, config) is written atomically every `checkpoint_every`
steps and at each epoch end; `--resume` continues from it mid-epoch and reaches the same result as an uninterrupted
run. A label-sharded worker (`training.worker`) runs this loop too and supplies only what differs (`Parallelism`):
its shard of the head, its step, its evaluation, gathering the head, and which process is the main one (it alone
logs, writes metrics.json, the plots and the artifact).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from training import data as xd
from training.build import build_model, device_of, encoder_inputs, featurize, load_data, make_optimizers
from training.checkpoint import Checkpointer, DirectoryCheckpointer, read_checkpoint, set_rng_state, write_checkpoint
from training.config import TrainConfig, check_resume
from training.evaluation import evaluate_model, propensity_of
from training.model import XMCHead, XMCModel
from training.recipe import recipe_for, user_set
from training.warm_start import adopt
from training.zero_shot import Calibration, reset_unseen


def lr_factor(step: int, total: int, warmup: float, min_lr: float) -> float:
    """Linear warmup over warmup * total steps, then cosine decay to min_lr."""
    w = max(1, int(warmup * total))
    if step < w:
        return (step + 1) / w
    t = min(1.0, (step - w) / max(1, total - w))
    return min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


def step_milliseconds(step_times: list[float], warmup: int = 3) -> float:
    """Median step time in ms, the first `warmup` steps (kernel compilation, allocator growth) left out."""
    timed = step_times[warmup:] if len(step_times) > 2 * warmup else step_times
    return 1e3 * float(np.median(timed)) if timed else float("nan")


def step_seed(cfg: TrainConfig, step: int) -> int:
    """The head step's rounding seed: a function of the run's seed and the global step only (any world size)."""
    return cfg.seed * 1_000_003 + step


class Parallelism(Protocol):
    """What a run does where a single process and a label-sharded worker differ (`SingleProcess`,
    `training.worker.LabelShards`). Methods marked collective are called by every worker together."""

    world: int
    rank: int
    is_main: bool  # logs, writes metrics.json, the plots and the artifact

    def device(self, cfg: TrainConfig) -> torch.device: ...

    def prepare(self, model: XMCModel, device: torch.device) -> tuple[int, int]:
        """Keep this worker's part of the head and move the model to `device`; returns the labels [start, end) held."""
        ...

    def batch_rows(self, size: int) -> tuple[int, int]:
        """This worker's slice [lo, hi) of a global batch of `size` rows."""
        ...

    def encode(self, model: XMCModel, inputs: tuple) -> torch.Tensor: ...

    def head_step(
        self, head: XMCHead, x: torch.Tensor, pos: torch.Tensor, exclude: torch.Tensor | None, **step: object
    ) -> tuple[torch.Tensor, float | None]:
        """The head step on this worker's rows: (dL/dx to back-propagate, the global loss or None). Collective."""
        ...

    def reduce_gradients(self) -> None:
        """After backward: the encoder's gradients summed over the workers. Collective."""
        ...

    def evaluate(self, model: XMCModel, ds: xd.XMCDataset, feats, propensity, master_bias: bool = False) -> dict:
        """`evaluate_model` of the whole head; every worker returns the same metrics. Collective."""
        ...

    def whole_model(self, model: XMCModel) -> XMCModel | None:
        """The model with the whole head on the main process (None elsewhere). Collective."""
        ...

    def all_finite(self, finite: torch.Tensor) -> bool:
        """True when every worker's `finite` (a bool tensor) is true: all stop at the same step. Collective."""
        ...

    def barrier(self) -> None: ...

    def comm_bytes(self) -> int:
        """Bytes this worker has received through collectives so far."""
        ...


class SingleProcess:
    """A run on one process: the whole head, no collectives."""

    world, rank, is_main = 1, 0, True

    def device(self, cfg: TrainConfig) -> torch.device:
        return device_of(cfg)

    def prepare(self, model: XMCModel, device: torch.device) -> tuple[int, int]:
        model.to(device)
        return 0, model.head.num_labels

    def batch_rows(self, size: int) -> tuple[int, int]:
        return 0, size

    def encode(self, model: XMCModel, inputs: tuple) -> torch.Tensor:
        return model.embed(*inputs)

    def head_step(self, head, x, pos, exclude, **step) -> tuple[torch.Tensor, float | None]:
        return head.step(x, pos, exclude=exclude, **step)

    def reduce_gradients(self) -> None:
        pass

    def evaluate(self, model, ds, feats, propensity, master_bias: bool = False) -> dict:
        return evaluate_model(model, ds, feats, propensity, master_bias=master_bias)

    def whole_model(self, model: XMCModel) -> XMCModel:
        return model

    def all_finite(self, finite: torch.Tensor) -> bool:
        return bool(finite)

    def barrier(self) -> None:
        pass

    def comm_bytes(self) -> int:
        return 0


def train(
    cfg: TrainConfig,
    *,
    parallel: Parallelism | None = None,
    checkpointer: Checkpointer | None = None,
    on_step: Callable[[int], None] | None = None,
    datasets: tuple[xd.XMCDataset, xd.XMCDataset] | None = None,
    after_training: Callable[..., dict] | None = None,
) -> dict:
    """Train (or resume) per `cfg`; returns {"metrics", "metrics_master_bias", "history", "train_seconds", ...}.

    `parallel`: this process's part of a label-sharded run (default: the whole run). checkpointer: default
    `<cfg.out>/checkpoint/`. on_step(step) is called after each optimizer step (tests use it to kill a worker).
    datasets: (train, test) splits instead of cfg.data's. after_training(model, train_ds, test_ds, test_feats) (head
    order) is called after the last epoch's evaluation; its dict is the result's "after_training".
    train_seconds counts data loading, featurization, model building and the steps (and the nested run that chooses
    the unseen labels' offset); not evaluation or checkpoints.
    """
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    par = parallel or SingleProcess()
    device = par.device(cfg)
    checkpointer = checkpointer or DirectoryCheckpointer(cfg.out, par.rank, cfg.resume, par.barrier)
    with checkpointer.restore() as ckpt_dir:
        ckpt = read_checkpoint(ckpt_dir) if ckpt_dir is not None else None
    cfg = check_resume(ckpt.config if ckpt is not None else None, cfg)
    train_ds, test_ds = datasets if datasets is not None else load_data(cfg)
    recipe = None
    if ckpt is None:  # a resumed run's saved config already holds the recipe it started with
        if cfg.init_from:  # the artifact's encoder fields, before the recipe (which leaves them alone)
            cfg = adopt(cfg, user_set(cfg))
        recipe = recipe_for(cfg, train_ds)
        cfg = recipe.apply(cfg)
        if par.is_main and recipe.levers:
            lines = "\n  ".join(recipe.lines())
            print(f"recipe chosen from the training data (--recipe off: the defaults):\n  {lines}", flush=True)
    if cfg.batch_size < par.world:
        raise ValueError(f"batch_size {cfg.batch_size} is smaller than the {par.world} workers")
    unseen_offset = None
    if ckpt is None and wants_unseen_offset(cfg, train_ds, par):
        unseen_offset = choose_unseen_offset(cfg, train_ds)
    (train_ds, test_ds), order = xd.reindex_by_frequency(train_ds, test_ds)
    warm: dict = {}
    model = build_model(cfg, train_ds, order, warm)
    if par.is_main and warm and ckpt is None:
        print(
            f"warm start from {warm['init_from']} (version {warm['version']}): {warm['carried']} labels carry its rows,"
            f" {warm['from_titles']} start from their titles, {warm['random']} at random; {warm['left_out']} of its "
            "labels are not in the data",
            flush=True,
        )
    if ckpt is not None:
        ckpt.load_into(model)
    labels = par.prepare(model, device)
    opts = make_optimizers(model, cfg)
    state = {"step": 0, "epoch": 0, "batch": 0, "train_seconds": 0.0, "history": [], "metrics": {}}
    state["recipe"] = recipe.as_dict() if recipe is not None else {}
    state["warm_start"] = warm
    state["unseen_offset"] = unseen_offset
    if ckpt is not None:
        for o, s in zip(opts, ckpt.common["optimizers"], strict=True):
            schedule = [{k: g[k] for k in ("base_lr", "warmup")} for g in o.param_groups]
            o.load_state_dict(s)
            for g, fresh in zip(o.param_groups, schedule, strict=True):  # a checkpoint from before per-group lrs
                for k, v in fresh.items():
                    g.setdefault(k, v)
        state = ckpt.state
        set_rng_state(ckpt.common["rng"])
    del ckpt
    train_feats, test_feats = featurize(model, train_ds), featurize(model, test_ds)
    counts = train_ds.label_counts()
    propensity = propensity_of(train_ds, cfg)
    total = math.ceil(train_ds.num_rows / cfg.batch_size) * cfg.epochs
    exclude_self = cfg.exclude_self and len(train_ds.filters) > 0  # the batches carry the filter pairs

    def save() -> None:
        def write(directory: Path) -> None:
            write_checkpoint(directory, model, labels, opts, state, cfg, rank=par.rank, world=par.world)

        checkpointer.save(write, {"step": state["step"], "epoch": state["epoch"], **state["metrics"]})

    bar = tqdm(
        total=total,
        initial=state["step"],
        unit="step",
        disable=not (cfg.progress and par.is_main),
        dynamic_ncols=True,
    )
    done_here = 0
    step_times: list[float] = []  # this process's steps (not checkpointed)
    step_comm = 0  # bytes this process received in the collectives of those steps
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        for b in xd.iter_batches(train_ds, cfg.batch_size, seed=cfg.seed, epoch=epoch, start_batch=state["batch"]):
            t_step = time.perf_counter()
            step = state["step"]
            f = lr_factor(step, total, cfg.warmup, cfg.min_lr)
            received = par.comm_bytes()
            loss = finite = None
            if len(b.rows) >= par.world:  # an epoch's last batch smaller than the world is skipped
                for o in opts:  # each group on its own lr and warmup (`make_optimizers`)
                    for g in o.param_groups:
                        g["lr"] = g["base_lr"] * lr_factor(step, total, g["warmup"], cfg.min_lr)
                lo, hi = par.batch_rows(len(b.rows))
                rows = b.rows.numpy()[lo:hi]
                x = par.encode(model, encoder_inputs(model, train_ds, train_feats, rows))
                # The pairs stay on the CPU: the head step checks and sorts them without a device synchronisation.
                excl = xd.pairs_in_rows(b.filtered, lo, hi) if exclude_self else None
                dx, loss = par.head_step(
                    model.head,
                    x,
                    xd.pairs_in_rows(b.positives, lo, hi),
                    excl,
                    lr=cfg.head_lr * f,
                    weight_decay=cfg.head_weight_decay,
                    seed=step_seed(cfg, step),
                    compute_loss=cfg.loss_every > 0 and step % cfg.loss_every == 0,
                )
                # Read after the step (the loop syncs there): a NaN/inf update stops the run before it is saved.
                finite = torch.isfinite(dx).all()
                x.backward(dx.to(x.dtype))
                par.reduce_gradients()
                for o in opts:
                    o.step()
                    o.zero_grad(set_to_none=True)
            step_comm += par.comm_bytes() - received
            state["step"] += 1
            state["batch"] += 1
            done_here += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - t_step)
            if loss is not None and not math.isfinite(loss):
                raise ValueError(f"step {step}: the loss is {loss}: training diverged or its inputs are corrupt")
            if finite is not None and not par.all_finite(finite):
                raise ValueError(
                    f"step {step}: the update is not finite (NaN/inf in dL/dx of the head step): the model or its "
                    "inputs are corrupt or training diverged; the run stops (its last checkpoint is from before)"
                )
            if loss is not None:
                state["history"].append({"step": step, "epoch": epoch, "loss": loss, "lr_factor": f})
                bar.set_postfix(
                    loss=f"{loss:.3f}", **{k: f"{v:.1f}" for k, v in state["metrics"].items() if k in ("P@1", "P@5")}
                )
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
        if state["epoch"] == cfg.epochs and cfg.zero_shot_unseen and cfg.label_init and train_ds.label_titles:
            start, end = labels  # this process's rows of the head
            f = train_ds.filters
            f = f[(f[:, 1] >= start) & (f[:, 1] < end)] - np.array([0, start])
            state["zero_shot"] = reset_unseen(
                model,
                train_ds.label_titles[start:end],
                counts[start:end],
                gain=cfg.label_init_gain,
                num_rows=train_ds.num_rows,
                labels=train_ds.labels[:, start:end],
                texts=train_ds.texts,
                exclude=f,
                offset=(state.get("unseen_offset") or {}).get("offset", 0.0),
            )
        if state["epoch"] % max(1, cfg.eval_every) == 0 or state["epoch"] == cfg.epochs:
            m = par.evaluate(model, test_ds, test_feats, propensity)
            state["metrics"] = m
            state["history"].append({"step": state["step"], "epoch": state["epoch"], **m})
            bar.set_postfix({k: f"{v:.1f}" for k, v in m.items() if k in ("P@1", "P@5")})
        if cfg.checkpoint_every >= 0:
            save()
        t0 = time.perf_counter()
    bar.close()
    result = {
        "metrics": state["metrics"],
        # the same model scored with the fp32 master bias instead of the stored (exported) bias column
        "metrics_master_bias": par.evaluate(model, test_ds, test_feats, propensity, master_bias=True)
        if cfg.bias and cfg.precision != "fp32"
        else state["metrics"],
        "history": state["history"],
        "train_seconds": state["train_seconds"],
        "step_ms": step_milliseconds(step_times),
        "comm_mb_per_step": step_comm / 2**20 / max(1, len(step_times)),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "workers": par.world,
        "out": str(cfg.out),
        "config": asdict(cfg),
        "recipe": state.get("recipe", {}),  # {field: {"value", "reason", "user_set"}} chosen at the run's start
        "warm_start": state.get("warm_start", {}),  # with init_from: what the artifact gave (`training.warm_start`)
        "zero_shot": state.get("zero_shot", {}),  # labels with no training point re-set: {calibration, labels}
        # the offset of their rows, chosen on a held-out slice (`training.unseen_offset`); None: not chosen
        "unseen_offset": state.get("unseen_offset"),
    }
    if after_training is not None:
        result["after_training"] = after_training(model, train_ds, test_ds, test_feats)
    whole = par.whole_model(model)
    if par.is_main:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".metrics.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, out / "metrics.json")
        finish(cfg, whole, train_ds, test_ds, test_feats, counts, result)
    par.barrier()
    summary = {k: result[k] for k in ("train_seconds", "step_ms", "comm_mb_per_step", "workers")}
    checkpointer.report({**result["metrics"], **summary, "step": state["step"], "epoch": state["epoch"]})
    return result


def wants_unseen_offset(cfg: TrainConfig, train_ds: xd.XMCDataset, par: Parallelism) -> bool:
    """Whether this run chooses its unseen labels' offset on a held-out slice: it re-sets them (zero_shot_unseen with
    label_init and titled labels), some label has no training point, and it runs as one process (a label-sharded
    run re-sets them with offset 0)."""
    wanted = cfg.zero_shot_unseen and cfg.label_init and cfg.zero_shot_holdout > 0
    if not (wanted and train_ds.label_titles and train_ds.texts is not None):
        return False
    if par.world > 1:
        if par.is_main:
            print("zero_shot_holdout: not in a label-sharded run; the unseen labels are re-set with offset 0")
        return False
    return bool((train_ds.label_counts() == 0).any()) and train_ds.num_rows >= 2


def choose_unseen_offset(cfg: TrainConfig, train_ds: xd.XMCDataset) -> dict:
    """The offset of the unseen labels' re-set rows (`training.unseen_offset`): a nested run of `cfg` (its recipe
    already applied) on all but cfg.zero_shot_holdout of the training rows, in <out>/unseen-holdout, measured on the
    rows left out. Returns `sweep_offsets`' dict."""
    from training.unseen_offset import holdout_split, sweep_offsets

    fit_ds, held_ds = holdout_split(train_ds, cfg.zero_shot_holdout, cfg.seed)
    nested = replace(
        cfg,
        recipe="off",
        zero_shot_unseen=False,
        zero_shot_holdout=0.0,
        export="",
        checkpoint_every=-1,
        eval_every=cfg.epochs,
        resume=False,
        stop_after=0,
        out=str(Path(cfg.out) / "unseen-holdout"),
    )
    if cfg.progress:
        print(
            f"choosing the offset of the labels with no training point: a run on {fit_ds.num_rows} rows, "
            f"{held_ds.num_rows} held out (--zero-shot-holdout {cfg.zero_shot_holdout:g}; 0: off)",
            flush=True,
        )

    def sweep(model, fit, held, held_feats) -> dict:
        return sweep_offsets(model, fit, held, held_feats, nested)

    chosen = train(nested, datasets=(fit_ds, held_ds), after_training=sweep)["after_training"]
    if cfg.progress:
        curve = ", ".join(f"{c['offset']:g}: {c['P@1']:.2f}/{c['unseen_R@5']:.1f}" for c in chosen["curve"])
        print(f"offset {chosen['offset']:g} (held-out P@1/unseen R@5 by offset: {curve})", flush=True)
    return chosen


def finish(cfg: TrainConfig, model: XMCModel, train_ds, test_ds, test_feats, counts: np.ndarray, result: dict) -> None:
    """Plots and the optional export of a finished run (the whole model); never fails the run for a plot."""
    try:
        from training import plots

        plots.training_curve(result["history"], Path(cfg.out) / "training_curve.png")
        plots.precision_by_decile(model, test_ds, test_feats, counts, Path(cfg.out) / "p_at_k_by_decile.png")
    except Exception as e:  # noqa: BLE001 - plots are a by-product
        print(f"plots skipped: {e}")
    if cfg.export:
        from training.artifact import save_artifact

        zs = result["zero_shot"].get("calibration")
        zero_shot = Calibration.from_dict(zs) if zs else None  # the re-set's calibration; else export measures it
        save_artifact(cfg.export, model, train_ds, metrics=result["metrics"], config=asdict(cfg), zero_shot=zero_shot)
