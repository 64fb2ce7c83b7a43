"""Training: a flat config, the loop, evaluation and resumable checkpoints (nanoGPT-style, no Trainer classes).

    elmo train --data ../shared/data/debian-deps --precision fp8+kahan --epochs 3 --out runs/deps
    elmo train --config my.toml --head-lr 0.01          # flags override the file, the file overrides the defaults

Per step: encoder forward (autograd graph of the encoder only) -> the head's fused SGD step returns dL/dx ->
encoder backward with it -> SparseAdam (embedding table) + torch-optimi AdamW (dense encoder parameters, Kahan
summation when they are bf16). Losses are computed only every `loss_every` steps (skip-loss). A checkpoint
(model, optimizers, step, RNG states, config) is written atomically every `checkpoint_every` steps and at each epoch
end; `--resume` continues from it mid-epoch and reaches the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import optimi
import scipy.sparse as sp
import torch
from tqdm import tqdm

from training import data as xd
from training.config import TrainConfig
from training.encoders import (
    FrozenTextEmbedder,
    FusedEncoder,
    HashedBagConfig,
    HashedBagEncoder,
    HashedNgramFeaturizer,
    HFTextEncoder,
    resolve_pretrained,
)
from training.metrics import XMCMetrics, jain_propensity
from training.model import HeadConfig, XMCHead, XMCModel


def load_data(cfg: TrainConfig) -> tuple[xd.XMCDataset, xd.XMCDataset]:
    if not cfg.data:
        from training.embedded import build_embedded

        train, test = build_embedded(seed=cfg.seed)
    elif cfg.format == "lf":
        train, test = xd.read_lf(cfg.data, "trn"), xd.read_lf(cfg.data, "tst")
    elif cfg.format == "bow":
        train, test = xd.read_bow(Path(cfg.data) / "train.txt"), xd.read_bow(Path(cfg.data) / "test.txt")
    else:
        raise ValueError(f"format must be 'lf' or 'bow', got {cfg.format!r}")
    if cfg.train_rows:
        train = train.subset(np.arange(min(cfg.train_rows, train.num_rows)))
    if cfg.test_rows:
        test = test.subset(np.arange(min(cfg.test_rows, test.num_rows)))
    return train, test


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


def head_config(cfg: TrainConfig, num_labels: int, dim: int) -> HeadConfig:
    """The head of a run: its precision, bias, Kahan rows and chunking come from the training config."""
    return HeadConfig(
        num_labels=num_labels,
        dim=dim,
        precision=cfg.precision,
        bias=cfg.bias,
        kahan_labels=cfg.kahan_labels,
        chunk_budget_mb=cfg.chunk_budget_mb,
        batch_hint=cfg.batch_size,
    )


def build_model(cfg: TrainConfig, train: xd.XMCDataset, order: np.ndarray) -> XMCModel:
    """Encoder + head for this data, with label-feature init and the frequency prior for the bias."""
    torch.manual_seed(cfg.seed)
    featurizer = None
    if cfg.encoder == "hf":
        encoder = HFTextEncoder.from_pretrained(cfg.hf_path)
        if cfg.fp8_encoder:
            fp8_linears(encoder, _device(cfg))
    elif train.features is not None:
        encoder = HashedBagEncoder(HashedBagConfig(num_features=train.features.shape[1], dim=cfg.dim, sparse=True))
    else:
        lo, hi = (int(v) for v in cfg.char_ngrams.split("-"))
        featurizer = HashedNgramFeaturizer(char_ngrams=(lo, hi), min_df=cfg.min_df)
        featurizer.fit(list(train.texts) + list(train.label_titles or []))
        cfg_e = HashedBagConfig(num_features=featurizer.num_features, dim=cfg.dim, mlp_hidden=cfg.mlp_hidden)
        encoder = HashedBagEncoder(cfg_e, sparse=True)
    frozen = None
    if cfg.frozen_encoder:
        if featurizer is None:
            raise ValueError("frozen_encoder needs texts and the hashed encoder (encoder='hashed', LF data)")
        frozen = _frozen_embedder(cfg)
        encoder = FusedEncoder(encoder, frozen.dim)
    head = XMCHead(head_config(cfg, train.num_labels, encoder.dim))
    model = XMCModel(encoder, head, featurizer, order, frozen=frozen)
    vectors = None
    if cfg.label_init and train.label_titles is not None:
        with torch.no_grad():
            e = torch.cat(
                [
                    model.embed(*model.encoder_inputs(train.label_titles[i : i + 4096]))
                    for i in range(0, train.num_labels, 4096)
                ]
            )
        vectors = cfg.label_init_gain * e / e.pow(2).sum(1, keepdim=True).clamp_min(1e-6)
    prior = (train.label_counts() + 0.5) / (train.num_rows + 1.0)
    model.head.init_weights(vectors, prior, seed=cfg.seed)
    return model


def fp8_linears(encoder: torch.nn.Module, device: torch.device) -> None:
    """Swap the encoder's Linear layers (both sides multiples of 16) for torchao's FP8 training linears, in place."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError("fp8_encoder needs a CUDA GPU with FP8 tensor cores (sm_89 or newer)")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise ValueError("fp8_encoder needs torchao: pip install torchao") from e

    def divisible(module: torch.nn.Module, fqn: str) -> bool:
        linear = isinstance(module, torch.nn.Linear)
        return linear and module.in_features % 16 == 0 and module.out_features % 16 == 0

    convert_to_float8_training(encoder, module_filter_fn=divisible)


def _frozen_embedder(cfg: TrainConfig) -> FrozenTextEmbedder:
    path = resolve_pretrained(cfg.frozen_encoder)
    return FrozenTextEmbedder(path, max_length=cfg.frozen_max_length, cache_dir=cfg.frozen_cache)


def make_optimizers(model: XMCModel, lr: float) -> list[torch.optim.Optimizer]:
    sparse = [p for m in model.encoder.modules() if getattr(m, "sparse", False) for p in m.parameters(recurse=False)]
    ids = {id(p) for p in sparse}
    dense = [p for p in model.encoder.parameters() if id(p) not in ids and p.requires_grad]
    opts: list[torch.optim.Optimizer] = []
    if sparse:
        opts.append(torch.optim.SparseAdam(sparse, lr=lr))
    if dense:
        opts.append(optimi.AdamW(dense, lr=lr, weight_decay=0.0, kahan_sum=dense[0].dtype == torch.bfloat16))
    return opts


def encoder_inputs(model: XMCModel, ds: xd.XMCDataset, feats: sp.csr_matrix | None, rows: np.ndarray) -> tuple:
    if feats is not None:
        return model.encoder_inputs(features=feats[rows])
    return model.encoder_inputs(texts=[ds.texts[i] for i in rows])


def featurize(model: XMCModel, ds: xd.XMCDataset):
    if model.featurizer is not None:
        return model.featurize(ds.texts)
    return ds.features


def filter_pairs(filtered: sp.coo_matrix | None) -> torch.Tensor | None:
    """A batch's filter pairs (COO over its rows) as the (P, 2) (row, label) tensor `XMCHead.topk` excludes."""
    if filtered is None:
        return None
    return torch.from_numpy(np.stack([filtered.row, filtered.col], 1).astype(np.int64))


@torch.no_grad()
def ranked_batches(model: XMCModel, ds: xd.XMCDataset, feats, k: int, batch: int = 1024):
    """Yield (rows, top-k label ids (B, k) on the CPU) over a split, its filter pairs removed as in evaluation."""
    filt = ds.filter_matrix() if len(ds.filters) else None
    for start in range(0, ds.num_rows, batch):
        rows = np.arange(start, min(start + batch, ds.num_rows))
        x = model.embed(*encoder_inputs(model, ds, feats, rows))
        excl = filter_pairs(filt[rows].tocoo()) if filt is not None else None
        yield rows, model.head.topk(x, k, exclude=excl)[1].cpu()


# rank(x, filtered) -> (B, 5) label ids: x the batch's embeddings, filtered its (row, label) filter pairs (COO)
RankFn = Callable[[torch.Tensor, sp.coo_matrix | None], torch.Tensor]


@torch.no_grad()
def evaluate_model(
    model: XMCModel,
    ds: xd.XMCDataset,
    feats,
    propensity: np.ndarray | None,
    batch: int = 1024,
    master_bias: bool = False,
    rank: RankFn | None = None,
) -> dict[str, float]:
    """P@k, nDCG@k, PSP@k (k = 1, 3, 5) with the split's filter pairs removed before ranking; values in %.

    Scores use the head's stored bias column (what is exported and served), or with master_bias its fp32 master.
    `rank` replaces the head's own top-5 (a label-sharded head merges its shards' lists)."""

    def own_top5(x: torch.Tensor, filtered: sp.coo_matrix | None) -> torch.Tensor:
        return model.head.topk(x, 5, exclude=filter_pairs(filtered), master_bias=master_bias)[1]

    rank = rank or own_top5
    model.eval()
    metrics = XMCMetrics(propensity=propensity)
    filt = ds.filter_matrix() if len(ds.filters) else None
    for start in range(0, ds.num_rows, batch):
        rows = np.arange(start, min(start + batch, ds.num_rows))
        x = model.embed(*encoder_inputs(model, ds, feats, rows))
        ids = rank(x, filt[rows].tocoo() if filt is not None else None)
        metrics.update(ids.cpu(), ds.labels[rows])
    model.train()
    return {k: 100 * v for k, v in metrics.compute().items()}


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(path: Path, model: XMCModel, opts, state: dict, cfg: TrainConfig) -> None:
    """torch.save to a temporary file beside `path`, then os.replace: a kill never leaves half a checkpoint."""
    payload = {
        "config": asdict(cfg),
        "model": model.state_dict(),
        "featurizer": model.featurizer.state_dict() if model.featurizer is not None else None,
        "optimizers": [o.state_dict() for o in opts],
        "state": state,
        "rng": _rng_state(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) per `cfg`; returns {"metrics", "history", "train_seconds", "out"}.

    train_seconds counts data loading, featurization, model building and the steps; not evaluation or checkpoints.
    """
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    device = _device(cfg)
    train_ds, test_ds = load_data(cfg)
    (train_ds, test_ds), order = xd.reindex_by_frequency(train_ds, test_ds)
    ckpt = torch.load(ckpt_path, weights_only=False) if cfg.resume and ckpt_path.exists() else None
    if ckpt is not None:
        cfg = TrainConfig(**{**ckpt["config"], "resume": True, "stop_after": cfg.stop_after, "progress": cfg.progress})
    model = build_model(cfg, train_ds, order)
    if ckpt is not None:
        if ckpt["featurizer"] is not None:
            model.featurizer = HashedNgramFeaturizer.from_state_dict(ckpt["featurizer"])
        model.load_state_dict(ckpt["model"])
    model.to(device)
    opts = make_optimizers(model, cfg.encoder_lr)
    state = {"step": 0, "epoch": 0, "batch": 0, "train_seconds": 0.0, "history": [], "metrics": {}}
    if ckpt is not None:
        for o, s in zip(opts, ckpt["optimizers"], strict=True):
            o.load_state_dict(s)
        state = ckpt["state"]
        _set_rng_state(ckpt["rng"])
    train_feats, test_feats = featurize(model, train_ds), featurize(model, test_ds)
    counts = train_ds.label_counts()
    propensity = jain_propensity(counts, train_ds.num_rows, cfg.psp_a, cfg.psp_b)
    steps_per_epoch = math.ceil(train_ds.num_rows / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    filt = train_ds.filter_matrix() if cfg.exclude_self and len(train_ds.filters) else None
    bar = tqdm(total=total, initial=state["step"], unit="step", disable=not cfg.progress, dynamic_ncols=True)
    done_here = 0
    step_times: list[float] = []  # this process's steps (not checkpointed)
    while state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        batches = xd.iter_batches(train_ds, cfg.batch_size, seed=cfg.seed, epoch=epoch, start_batch=state["batch"])
        for b in batches:
            t_step = time.perf_counter()
            step = state["step"]
            f = lr_factor(step, total, cfg.warmup, cfg.min_lr)
            for o in opts:
                for g in o.param_groups:
                    g["lr"] = cfg.encoder_lr * f
            rows = b.rows.numpy()
            x = model.embed(*encoder_inputs(model, train_ds, train_feats, rows))
            excl = None
            if filt is not None:
                fr = filt[rows].tocoo()
                excl = torch.from_numpy(np.stack([fr.row, fr.col], 1).astype(np.int64)).to(device)
            want_loss = cfg.loss_every > 0 and step % cfg.loss_every == 0
            pos = b.positives.to(device)
            dx, loss = model.head.step(
                x,
                pos[:, 0],
                pos[:, 1],
                lr=cfg.head_lr * f,
                weight_decay=cfg.head_weight_decay,
                seed=cfg.seed * 1_000_003 + step,
                compute_loss=want_loss,
                exclude=excl,
            )
            x.backward(dx.to(x.dtype))
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
            state["step"] += 1
            state["batch"] += 1
            done_here += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - t_step)
            if loss is not None:
                state["history"].append({"step": step, "epoch": epoch, "loss": loss, "lr_factor": f})
                bar.set_postfix(
                    loss=f"{loss:.3f}", **{k: f"{v:.1f}" for k, v in state["metrics"].items() if k in ("P@1", "P@5")}
                )
            bar.update(1)
            if cfg.stop_after and done_here >= cfg.stop_after:
                bar.close()
                return {"stopped": True, "step": state["step"]}
            if cfg.checkpoint_every > 0 and state["step"] % cfg.checkpoint_every == 0:
                state["train_seconds"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                save_checkpoint(ckpt_path, model, opts, state, cfg)
        state["epoch"] += 1
        state["batch"] = 0
        state["train_seconds"] += time.perf_counter() - t0
        if state["epoch"] % max(1, cfg.eval_every) == 0 or state["epoch"] == cfg.epochs:
            m = evaluate_model(model, test_ds, test_feats, propensity)
            state["metrics"] = m
            state["history"].append({"step": state["step"], "epoch": state["epoch"], **m})
            bar.set_postfix({k: f"{v:.1f}" for k, v in m.items() if k in ("P@1", "P@5")})
        if cfg.checkpoint_every >= 0:
            save_checkpoint(ckpt_path, model, opts, state, cfg)
        t0 = time.perf_counter()
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "metrics": state["metrics"],
        # the same model scored with the fp32 master bias instead of the stored (exported) bias column
        "metrics_master_bias": evaluate_model(model, test_ds, test_feats, propensity, master_bias=True)
        if cfg.bias and cfg.precision != "fp32"
        else state["metrics"],
        "history": state["history"],
        "train_seconds": state["train_seconds"],
        "step_ms": step_milliseconds(step_times),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "out": str(out),
        "config": asdict(cfg),
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    _finish(cfg, model, train_ds, test_ds, test_feats, counts, result)
    return result


def _finish(cfg, model, train_ds, test_ds, test_feats, counts, result) -> None:
    """Plots and the optional export; never fails the run for a plot."""
    try:
        from training import plots

        plots.training_curve(result["history"], Path(cfg.out) / "training_curve.png")
        plots.precision_by_decile(model, test_ds, test_feats, counts, Path(cfg.out) / "p_at_k_by_decile.png")
    except Exception as e:  # noqa: BLE001 - plots are a by-product
        print(f"plots skipped: {e}")
    if cfg.export:
        from training.artifact import save_artifact

        save_artifact(cfg.export, model, train_ds, metrics=result["metrics"], config=asdict(cfg))


def model_from_checkpoint(path: str | Path, device: str = "cpu") -> tuple[XMCModel, TrainConfig, dict]:
    """(model, config, state) of a run directory's checkpoint (or a checkpoint file), without reading the data."""
    path = Path(path)
    ckpt = torch.load(path / "checkpoint.pt" if path.is_dir() else path, weights_only=False, map_location="cpu")
    cfg = TrainConfig(**ckpt["config"])
    sd = ckpt["model"]
    featurizer = HashedNgramFeaturizer.from_state_dict(ckpt["featurizer"]) if ckpt["featurizer"] else None
    frozen = None
    if cfg.encoder == "hf":
        encoder = HFTextEncoder.from_pretrained(cfg.hf_path)
    elif cfg.frozen_encoder:
        num_features, dim = sd["encoder.bag.bag.weight"].shape
        bag = HashedBagEncoder(HashedBagConfig(num_features=num_features, dim=dim, mlp_hidden=cfg.mlp_hidden))
        frozen = _frozen_embedder(cfg)
        encoder = FusedEncoder(bag, frozen.dim)
    else:
        num_features, dim = sd["encoder.bag.weight"].shape
        encoder = HashedBagEncoder(HashedBagConfig(num_features=num_features, dim=dim, mlp_hidden=cfg.mlp_hidden))
    head = XMCHead(head_config(cfg, len(sd["label_order"]), encoder.dim))
    model = XMCModel(encoder, head, featurizer, frozen=frozen)
    model.load_state_dict(sd)
    return model.to(device).eval(), cfg, ckpt["state"]


def evaluate_on(model: XMCModel, cfg: TrainConfig, split: str = "tst") -> dict[str, float]:
    """Metrics of a loaded model on the `split` of cfg.data, labels mapped through the model's label order."""
    train_ds, test_ds = load_data(cfg)
    ds = test_ds if split == "tst" else train_ds
    order = model.label_order.cpu().numpy()
    train_ds, ds = xd.permute_labels(train_ds, order), xd.permute_labels(ds, order)
    propensity = jain_propensity(train_ds.label_counts(), train_ds.num_rows, cfg.psp_a, cfg.psp_b)
    return evaluate_model(model, ds, featurize(model, ds), propensity)


def export_run(run: str | Path, artifact: str | Path, data: str | None = None) -> Path:
    """Write the artifact of a run directory (its checkpoint; the data is read again for titles and fingerprint)."""
    from training.artifact import save_artifact

    model, cfg, state = model_from_checkpoint(run)
    if data is not None:
        cfg.data = data
    train_ds, _ = load_data(cfg)
    train_ds = xd.permute_labels(train_ds, model.label_order.cpu().numpy())
    return save_artifact(artifact, model, train_ds, metrics=state.get("metrics", {}), config=asdict(cfg))
