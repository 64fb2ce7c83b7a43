"""Zero-shot head rows for label titles: the one function family behind label-feature init (`training.build`), the
re-set of labels with no training point at the end of training, and labels added to a served artifact (issue 21).

A title's zero-shot vector is v = gain * e / |e|^2, e the encoder's embedding of the title (fp32): <v, e> = gain, so a
text the encoder embeds like the title scores `gain` before the bias. Its head row in true units is
[v, bias / bias_input] (the layout of `training.model.XMCHead`: scores = x @ v + bias); the stored row is that times
the head's scale, rounded to nearest in the head's dtype (`XMCHead.stored_rows`, the rounding `init_weights` uses).

The calibration (gain, bias) of a trained model: at init the gain is TrainConfig.label_init_gain and the bias the
frequency prior of a label with 0 training points (`frequency_prior`). After training, `calibrate` measures it from
the trained rows of tail labels (few training points), which started from the same function: gain = the median
logit their trained rows give their own title (<W_j, e_j>), bias = the median of their trained biases. The
calibration is kept in the artifact's manifest under ZERO_SHOT_KEY (`training.artifact`).

The title map (`TitleMap`, `fit_title_map`): a map learned on the trained labels from a title to its head row, used
for new labels instead of the title row when a model has one. With u = e / |e|^2 (the title vector at gain 1):
v = u @ weight (weight D x D), bias = u @ bias_weight + intercept. It is fitted after training, with the encoder and
the trained rows fixed, as a label tower: the one-vs-all BCE of the rows it gives the trained labels' titles on the
training rows (every positive, sampled negatives reweighted to stand for all, the filter pairs left out), from the
title row (weight = gain x I, bias_weight = 0, intercept = the calibrated bias), with Adam. Its intercept is then
shifted by the gap between the trained labels' biases and the map's, weighted by their training points: the rows the
map gives would otherwise lose top slots to trained rows, which their own points made more confident (BENCHMARKS.md,
labels added zero-shot). Export fits it and stores it in the artifact (`training.artifact`, MAP_FILE).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp
import torch

from training.model import XMCModel

ZERO_SHOT_KEY = "zero_shot"  # manifest.json key holding Calibration.as_dict()
MAP_KEY = "zero_shot_map"  # manifest.json key of the title map: {"file": MAP_FILE, "details"} (`training.artifact`)
MAP_FILE = "zero_shot_map.safetensors"  # the title map's tensors (`TitleMap.tensors`)
EMBED_BATCH = 4096  # titles embedded at a time
CALIBRATIONS = ("config", "tail")  # how `calibrate` chooses (gain, bias): module doc
DEFAULT_CALIBRATION = "tail"  # what export records and the re-set uses (measured best: BENCHMARKS.md, Quality)
TAIL_POINTS = (1, 2)  # training points of the labels `calibrate` measures ("tail")
MAP_LABELS_PER_DIM = 4  # a title map (D x D) needs 4 x D labels with training points; fewer: no map (title rows)


@dataclass(frozen=True)
class Calibration:
    """The gain and bias (true units) of zero-shot rows, and how they were chosen (`method`, measured `details`)."""

    gain: float
    bias: float
    method: str = "config"
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"gain": self.gain, "bias": self.bias, "method": self.method, "details": dict(self.details)}

    @classmethod
    def from_dict(cls, value: object, where: str = "zero_shot") -> Calibration:
        """The calibration of a manifest's ZERO_SHOT_KEY; ValueError naming the bad field."""
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be an object {{gain, bias, method, details}}")
        for key in ("gain", "bias"):
            v = value.get(key)
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{where} {key!r} must be a finite number, got {v!r}")
        details = value.get("details", {})
        if not isinstance(details, dict):
            raise ValueError(f"{where} 'details' must be an object")
        return cls(float(value["gain"]), float(value["bias"]), str(value.get("method", "config")), details)


@dataclass(frozen=True)
class MapConfig:
    """How `fit_title_map` fits (the defaults: measured on the DebianDeps holdout, BENCHMARKS.md)."""

    steps: int = 480  # Adam steps (6 passes over DebianDeps' 40,952 rows: ~12 s on 2 CPU threads)
    lr: float = 3e-3  # Adam
    batch: int = 512  # training rows per step, passes over a shuffled order
    negatives: int = 2048  # labels sampled per step besides the batch's positives
    max_rows: int = 480 * 512  # training rows used at most (a seeded sample): what the steps can visit
    seed: int = 0


@dataclass(frozen=True)
class TitleMap:
    """A learned map from a title's embedding to its head row (module doc): v = u @ weight, bias = u @ bias_weight +
    intercept, u = e / |e|^2. weight (D, D) and bias_weight (D,) fp32; details: how it was fitted."""

    weight: torch.Tensor
    bias_weight: torch.Tensor
    intercept: float
    details: dict = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the artifact stores (MAP_FILE): "weight", "bias_weight", "intercept" (a () tensor), fp32, CPU."""
        return {
            "weight": self.weight.detach().float().cpu().contiguous(),
            "bias_weight": self.bias_weight.detach().float().cpu().contiguous(),
            "intercept": torch.tensor(float(self.intercept)),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], dim: int, details: dict | None = None) -> TitleMap:
        """The map of `tensors()`; ValueError naming a missing, misshapen or non-finite tensor."""
        shapes = {"weight": (dim, dim), "bias_weight": (dim,), "intercept": ()}
        for name, shape in shapes.items():
            t = tensors.get(name)
            if t is None or tuple(t.shape) != shape:
                got = None if t is None else tuple(t.shape)
                raise ValueError(f"title map tensor {name!r} must have shape {shape}, got {got}")
            if not torch.isfinite(t.float()).all():
                raise ValueError(f"title map tensor {name!r} is not finite")
        return cls(
            tensors["weight"].float(), tensors["bias_weight"].float(), float(tensors["intercept"]), dict(details or {})
        )

    def vectors_and_biases(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((n, D) vectors, (n,) biases) in true units for title embeddings (n, D)."""
        u = title_vectors(embeddings, 1.0)
        return u @ self.weight.to(u.device), u @ self.bias_weight.to(u.device) + self.intercept


def frequency_prior(counts: np.ndarray, num_rows: int) -> np.ndarray:
    """P(label) from training counts, smoothed: (count + 0.5) / (rows + 1); the bias starts at its logit."""
    return (np.asarray(counts, dtype=np.float64) + 0.5) / (num_rows + 1.0)


def unseen_bias(num_rows: int) -> float:
    """The initial bias (logit of `frequency_prior`) of a label with 0 of `num_rows` training points."""
    p = float(frequency_prior(np.zeros(1), num_rows)[0])
    return math.log(p / (1 - p))


@torch.no_grad()
def title_embeddings(model: XMCModel, titles: Sequence[str], batch: int = EMBED_BATCH) -> torch.Tensor:
    """(n, dim) fp32 encoder embeddings of `titles` on the head's device (the encoder as it is: eval mode is the
    caller's choice; the hashed encoder has no dropout unless configured)."""
    titles = list(titles)
    if not titles:
        return torch.zeros(0, model.head.config.dim, device=model.head.weight.device)
    if not all(isinstance(t, str) for t in titles):
        raise ValueError("titles must be strings")
    parts = [model.embed(*model.encoder_inputs(titles[i : i + batch])) for i in range(0, len(titles), batch)]
    return torch.cat(parts).float()


def title_vectors(embeddings: torch.Tensor, gain: float) -> torch.Tensor:
    """gain * e / |e|^2 per row of `embeddings` (n, dim): the label-feature init vectors (true units)."""
    return gain * embeddings / embeddings.pow(2).sum(1, keepdim=True).clamp_min(1e-6)


def true_rows(
    model: XMCModel, titles: Sequence[str], cal: Calibration, title_map: TitleMap | None = None
) -> torch.Tensor:
    """(n, in_dim) fp32 head rows in true units for `titles`: [vector, bias / bias_input] (no column without bias).
    With `title_map` the map's rows, else the title rows (gain * e / |e|^2 and the calibrated bias)."""
    e = title_embeddings(model, titles)
    if title_map is not None:
        v, b = title_map.vectors_and_biases(e)
    else:
        v, b = title_vectors(e, cal.gain), e.new_full((e.shape[0],), cal.bias)
    head = model.head
    if not head.config.bias:
        return v
    return torch.cat([v, (b / head.config.bias_input)[:, None]], dim=1)


def stored_rows(
    model: XMCModel, titles: Sequence[str], cal: Calibration, title_map: TitleMap | None = None
) -> torch.Tensor:
    """(n, in_dim) rows in the head's storage dtype (times its scale, rounded as `XMCHead.stored_rows`)."""
    return model.head.stored_rows(true_rows(model, titles, cal, title_map))


@torch.no_grad()
def set_rows(
    model: XMCModel, rows: np.ndarray, titles: Sequence[str], cal: Calibration, title_map: TitleMap | None = None
) -> None:
    """Re-set head rows `rows` (head order) to the zero-shot rows of `titles` (`true_rows`): weights, fp32 master
    bias, Kahan."""
    head = model.head
    rows_t = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    if len(rows_t) != len(titles):
        raise ValueError(f"{len(rows_t)} rows but {len(titles)} titles")
    if len(rows_t) and (int(rows_t.min()) < 0 or int(rows_t.max()) >= head.num_labels):
        raise ValueError(f"rows must lie in [0, {head.num_labels})")
    if not len(rows_t):
        return
    dev = head.weight.device
    rows_t = rows_t.to(dev)
    true = true_rows(model, titles, cal, title_map).to(dev)
    head.weight[rows_t] = head.stored_rows(true)
    if head.config.bias:
        head.bias[rows_t] = true[:, -1] * head.config.bias_input
    kahan = rows_t[rows_t < len(head.kahan)]
    head.kahan[kahan] = 0


def reset_unseen(
    model: XMCModel,
    titles: Sequence[str],
    counts: np.ndarray,
    *,
    gain: float,
    num_rows: int,
    method: str = DEFAULT_CALIBRATION,
    labels: sp.spmatrix | None = None,
    texts: Sequence[str] | None = None,
    exclude: np.ndarray | None = None,
    offset: float = 0.0,
) -> dict:
    """Re-set the rows of the labels with no training point (head order: titles[j], counts[j] are row j's) to their
    zero-shot rows through the trained encoder, with `calibrate`'s calibration of this model; training pushed only
    negatives into them. With the training split's `labels` (rows x head labels) and `texts` (and its filter pairs
    `exclude`), the rows come from the title map fitted on them (`fit_title_map`, what export stores). `offset`
    (logits) moves their biases (`set_unseen`). Returns {"calibration", "labels"} (how many were re-set), "offset"
    and "title_map" (its details, or None), for metrics.json."""
    cal, title_map = unseen_source(
        model, titles, counts, gain=gain, num_rows=num_rows, method=method, labels=labels, texts=texts, exclude=exclude
    )
    count = set_unseen(model, titles, counts, cal, title_map, offset)
    return {
        "calibration": cal.as_dict(),
        "labels": count,
        "offset": float(offset),
        "title_map": None if title_map is None else title_map.details,
    }


def unseen_source(
    model: XMCModel,
    titles: Sequence[str],
    counts: np.ndarray,
    *,
    gain: float,
    num_rows: int,
    method: str = DEFAULT_CALIBRATION,
    labels: sp.spmatrix | None = None,
    texts: Sequence[str] | None = None,
    exclude: np.ndarray | None = None,
) -> tuple[Calibration, TitleMap | None]:
    """(calibration, title map or None) that `reset_unseen` gives labels with no training point (its arguments),
    measured with the model in eval mode."""
    was_training = model.training
    model.eval()
    try:
        cal = calibrate(model, titles, counts, gain=gain, num_rows=num_rows, method=method)
        title_map = None
        if labels is not None and texts is not None:
            title_map = fit_title_map(model, titles, labels, texts, cal, exclude=exclude)
    finally:
        model.train(was_training)
    return cal, title_map


def set_unseen(
    model: XMCModel,
    titles: Sequence[str],
    counts: np.ndarray,
    cal: Calibration,
    title_map: TitleMap | None,
    offset: float = 0.0,
) -> int:
    """Re-set the rows with counts[j] == 0 to the zero-shot rows of their titles (`set_rows`), their biases moved by
    `offset` logits (how far below the trained labels' the rows of labels no point trained want to sit: chosen on a
    held-out slice of the training rows, `training.unseen_offset`); returns how many rows were re-set."""
    if title_map is not None:
        title_map = replace(title_map, intercept=title_map.intercept + float(offset))
    else:
        cal = replace(cal, bias=cal.bias + float(offset))
    unseen = np.flatnonzero(np.asarray(counts) == 0)
    was_training = model.training
    model.eval()
    try:
        set_rows(model, unseen, [titles[j] for j in unseen], cal, title_map)
    finally:
        model.train(was_training)
    return int(len(unseen))


def config_calibration(gain: float, num_rows: int) -> Calibration:
    """The init's own calibration: the configured gain and the prior bias of a label with 0 training points."""
    return Calibration(gain=float(gain), bias=unseen_bias(num_rows), method="config", details={"train_rows": num_rows})


@torch.no_grad()
def calibrate(
    model: XMCModel,
    titles: Sequence[str],
    counts: np.ndarray,
    *,
    gain: float,
    num_rows: int,
    method: str = DEFAULT_CALIBRATION,
    tail_points: tuple[int, int] = TAIL_POINTS,
    max_labels: int = 20000,
    seed: int = 0,
) -> Calibration:
    """The calibration of a trained model (head order: titles[j], counts[j] are head row j's).

    "config": `config_calibration(gain, num_rows)`. "tail": measured on up to `max_labels` labels (a seeded sample)
    with tail_points[0]..tail_points[1] training points: gain = median <W_j, e_j> (the logit a trained row gives its
    own title through the trained encoder), bias = median trained bias (fp32 master). Falls back to "config" when no
    label qualifies (the details say so)."""
    if method not in CALIBRATIONS:
        raise ValueError(f"method must be one of {CALIBRATIONS}, got {method!r}")
    base = config_calibration(gain, num_rows)
    if method == "config":
        return base
    counts = np.asarray(counts)
    if len(counts) != model.head.num_labels or len(titles) != model.head.num_labels:
        raise ValueError(f"titles and counts must cover the head's {model.head.num_labels} labels")
    lo, hi = tail_points
    pick = np.flatnonzero((counts >= lo) & (counts <= hi))
    if len(pick) > max_labels:
        pick = np.sort(np.random.default_rng(seed).choice(pick, max_labels, replace=False))
    if len(pick) == 0:
        return Calibration(base.gain, base.bias, "config", {**base.details, "tail_labels": 0})
    e = title_embeddings(model, [titles[j] for j in pick])
    w = model.head.true_weight()[torch.as_tensor(pick, device=e.device)][:, : e.shape[1]]
    own = (w * e).sum(1)
    bias = model.head.true_bias()[torch.as_tensor(pick, device=e.device)] if model.head.config.bias else own * 0
    details = {
        "train_rows": num_rows,
        "tail_points": [lo, hi],
        "tail_labels": len(pick),
        "own_logit_q25_q75": [float(own.quantile(0.25)), float(own.quantile(0.75))],
        "bias_q25_q75": [float(bias.quantile(0.25)), float(bias.quantile(0.75))],
        "config_gain": base.gain,
        "config_bias": base.bias,
    }
    return Calibration(float(own.median()), float(bias.median()), "tail", details)


def fit_title_map(
    model: XMCModel,
    titles: Sequence[str],
    labels: sp.spmatrix,
    texts: Sequence[str],
    cal: Calibration,
    *,
    exclude: np.ndarray | None = None,
    config: MapConfig = MapConfig(),
) -> TitleMap | None:
    """The title map of a trained model (module doc), or None when fewer than MAP_LABELS_PER_DIM x D labels have
    training points (or there are no texts).

    titles[j] is head row j's title; labels: (rows, head labels) the training split's targets in head order, texts its
    rows' texts; exclude: (P, 2) (row, label) filter pairs that get no loss (a package's own label); cal: the
    calibration the map starts from. The encoder and the head are not changed (eval mode is the caller's choice)."""
    head = model.head
    n_labels, dim = head.num_labels, head.config.dim
    if texts is None or titles is None:
        return None
    y = sp.csr_matrix(labels, dtype=np.float32)
    if y.shape != (len(texts), n_labels) or len(titles) != n_labels:
        raise ValueError(f"labels must be (len(texts), {n_labels}) and titles cover the head's labels")
    counts = np.asarray(y.sum(0)).ravel()
    if int((counts > 0).sum()) < MAP_LABELS_PER_DIM * dim:
        return None
    if exclude is not None and len(exclude):
        ex = np.asarray(exclude)
        skip = sp.csr_matrix((np.ones(len(ex), np.float32), (ex[:, 0], ex[:, 1])), shape=y.shape)
        y = y - y.multiply(skip)
        y.eliminate_zeros()
    else:
        skip = sp.csr_matrix(y.shape, dtype=np.float32)
    gen = torch.Generator().manual_seed(config.seed)
    keep = np.arange(len(texts))
    if len(keep) > config.max_rows:
        keep = np.sort(torch.randperm(len(keep), generator=gen)[: config.max_rows].numpy())
        y, skip = y[keep], skip[keep]
    with torch.no_grad():
        u = title_vectors(title_embeddings(model, titles), 1.0).cpu()  # (L, D): title rows at gain 1
        x = title_embeddings(model, [texts[i] for i in keep]).cpu()  # (N, D): the training rows
        # the biases as served: the stored column (a loaded artifact has no fp32 master)
        trained_bias = head.true_weight()[:, -1].cpu() * head.config.bias_input if head.config.bias else None
    scale = float(u.norm(dim=1).median().clamp_min(1e-6))  # u / scale has unit size: Adam steps alike for all
    delta = torch.zeros(dim, dim, requires_grad=True)  # weight = gain * (I + delta)
    a = torch.zeros(dim, requires_grad=True)  # bias_weight = a / scale
    c = torch.tensor(float(cal.bias), requires_grad=True)
    opt = torch.optim.Adam([delta, a, c], lr=config.lr)
    eye = torch.eye(dim)
    t0 = time.perf_counter()
    step, n = 0, len(keep)
    while step < config.steps:
        perm = torch.randperm(n, generator=gen).numpy()
        for start in range(0, n, config.batch):
            if step == config.steps:
                break
            step += 1
            idx = perm[start : start + config.batch]
            yb, sb = y[idx], skip[idx]
            pos = np.unique(yb.indices)
            neg = np.setdiff1d(torch.randint(0, n_labels, (config.negatives,), generator=gen).numpy(), pos)
            cols = np.concatenate([pos, neg])
            ub = u[torch.from_numpy(cols)]
            v = ub @ (cal.gain * (eye + delta))
            b = (ub / scale) @ a + c
            logits = x[torch.from_numpy(idx)] @ v.T + b
            target = torch.from_numpy(yb[:, cols].toarray())
            w = torch.ones(len(cols))
            w[len(pos) :] = (n_labels - len(pos)) / max(len(neg), 1)  # a sampled negative stands for the unsampled
            w = torch.where(target > 0, torch.ones_like(target), w.expand_as(target))
            w = w * (1 - torch.from_numpy(sb[:, cols].toarray()))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, weight=w, reduction="sum")
            opt.zero_grad()
            (loss / len(idx)).backward()
            opt.step()
    with torch.no_grad():
        weight = cal.gain * (eye + delta)
        bias_weight = a / scale
        points = torch.from_numpy(counts).float()
        gap = (
            0.0
            if trained_bias is None
            else float(((trained_bias - (u @ bias_weight + c)) * points).sum() / points.sum())
        )
        details = {
            "steps": config.steps,
            "lr": config.lr,
            "batch": config.batch,
            "negatives": config.negatives,
            "seed": config.seed,
            "train_rows": n,
            "labels_with_points": int((counts > 0).sum()),
            "start_gain": cal.gain,
            "start_bias": cal.bias,
            "bias_gap": gap,
            "fit_seconds": round(time.perf_counter() - t0, 2),
        }
        return TitleMap(weight.detach(), bias_weight.detach(), float(c) + gap, details)
