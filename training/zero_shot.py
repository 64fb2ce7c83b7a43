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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from training.model import XMCModel

ZERO_SHOT_KEY = "zero_shot"  # manifest.json key holding Calibration.as_dict()
EMBED_BATCH = 4096  # titles embedded at a time
CALIBRATIONS = ("config", "tail")  # how `calibrate` chooses (gain, bias): module doc
DEFAULT_CALIBRATION = "tail"  # what export records and the re-set uses (measured best: BENCHMARKS.md, Quality)
TAIL_POINTS = (1, 2)  # training points of the labels `calibrate` measures ("tail")


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


def true_rows(model: XMCModel, titles: Sequence[str], cal: Calibration) -> torch.Tensor:
    """(n, in_dim) fp32 head rows in true units for `titles`: [vector, bias / bias_input] (no column without bias)."""
    v = title_vectors(title_embeddings(model, titles), cal.gain)
    head = model.head
    if not head.config.bias:
        return v
    return torch.cat([v, v.new_full((v.shape[0], 1), cal.bias / head.config.bias_input)], dim=1)


def stored_rows(model: XMCModel, titles: Sequence[str], cal: Calibration) -> torch.Tensor:
    """(n, in_dim) rows in the head's storage dtype (times its scale, rounded as `XMCHead.stored_rows`)."""
    return model.head.stored_rows(true_rows(model, titles, cal))


@torch.no_grad()
def set_rows(model: XMCModel, rows: np.ndarray, titles: Sequence[str], cal: Calibration) -> None:
    """Re-set head rows `rows` (head order) to the zero-shot rows of `titles`: weights, fp32 master bias, Kahan."""
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
    head.weight[rows_t] = stored_rows(model, titles, cal).to(dev)
    if head.config.bias:
        head.bias[rows_t] = cal.bias
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
) -> dict:
    """Re-set the rows of the labels with no training point (head order: titles[j], counts[j] are row j's) to their
    zero-shot rows through the trained encoder, with `calibrate`'s calibration of this model; training pushed only
    negatives into them. Returns {"calibration", "labels"} (how many were re-set), for metrics.json."""
    was_training = model.training
    model.eval()
    try:
        cal = calibrate(model, titles, counts, gain=gain, num_rows=num_rows, method=method)
        unseen = np.flatnonzero(np.asarray(counts) == 0)
        set_rows(model, unseen, [titles[j] for j in unseen], cal)
    finally:
        model.train(was_training)
    return {"calibration": cal.as_dict(), "labels": int(len(unseen))}


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
