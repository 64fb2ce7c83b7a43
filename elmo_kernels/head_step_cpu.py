"""The head's SGD step in plain torch with torch's RNG for the rounding bits: the CPU path of `training.model.XMCHead`.

The mathematics of `elmo_kernels.head_step`, chunk by chunk (Lc labels at a time, only a B x Lc tile of logits alive):

    G  = sigmoid(X W^T [+ master bias]) - Y       (Y from the positive (row, label) pairs; excluded pairs: G = 0)
    dX += G W                                     (W before its update)
    W  <- SR(W - lr (G^T X + wd W))               (with Kahan: the compensation joins the update, the rounding
                                                   error of the first H rows is kept for the next step)

GEMMs run on bf16 operands on CPU (fp32 on CUDA). The rounding bits come from a `torch.Generator` (16 per element):
the Philox stream of `elmo_kernels.reference` is drawn in numpy, ~2 s a step at 42K labels; this path is ~10x faster,
at the price of a stream that cannot skip ahead (a label shard draws its own). fp32 weights take the plain update.

Master bias (`MasterBias`): the last input column of X is a constant c and the last weight column is a per-label
bias stored as bias / unit (unit = c, the true-unit value of one stored unit). Its master copy is an fp32 vector;
the logits use the master instead of the rounded column, the master takes the column's SGD step in fp32 (lr unit^2
times the batch-summed gradient, decay by 1 - lr wd), the column gets no weight update of its own and is then set
to the master rounded to nearest (saturating for e4m3): an e4m3 column alone resolves a bias near -10 only to about
+-0.6 logits, and stochastic rounding of its small updates adds noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from elmo_kernels import reference
from elmo_kernels.common import FP8_E4M3, FP8_E4M3_MAX
from elmo_kernels.head_step import HeadStepOutput

ROUNDED_DTYPES = (torch.bfloat16, FP8_E4M3)  # storage dtypes updated with stochastic rounding


@dataclass
class MasterBias:
    """fp32 master of the bias column: values (L_pad,) in true units, updated in place; unit: the true-unit value of
    one stored unit of the column (the column's input value)."""

    values: torch.Tensor
    unit: float

    def column(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """True-unit biases -> the stored column in `dtype`, rounded to nearest (saturating for e4m3)."""
        col = values / self.unit
        return (col.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX) if dtype == FP8_E4M3 else col).to(dtype)


def stochastic_round_with(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """fp32 x -> dtype (bf16 / e4m3) with unbiased stochastic rounding: the kernels' rounding rule, with 16 random
    bits per element drawn from `generator`. Other dtypes: a plain cast."""
    if dtype not in ROUNDED_DTYPES:
        return x.to(dtype)
    rand16 = torch.randint(0, 1 << 16, x.shape, generator=generator, dtype=torch.int32, device=x.device)
    return reference.round_to(x, dtype, rand16).to(dtype)


def _check_inputs(chunks, x, positives, exclude, num_labels, kahan, bias, generator) -> int:
    if not chunks:
        raise ValueError("chunks must hold at least one weight chunk")
    dtype, dim = chunks[0].dtype, chunks[0].shape[-1]
    if any(w.dim() != 2 or w.dtype != dtype or w.shape[1] != dim or w.device != x.device for w in chunks):
        raise ValueError("chunks must be 2-D, of one dtype and width, on the device of x")
    if x.dim() != 2 or x.shape[1] != dim or not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating (B, {dim}) tensor, got {x.dtype} {tuple(x.shape)}")
    rows = sum(w.shape[0] for w in chunks)
    num_labels = rows if num_labels is None else num_labels
    if not 0 <= num_labels <= rows:
        raise ValueError(f"num_labels must be in [0, {rows}] (rows of the chunks), got {num_labels}")
    for name, pairs in (("positives", positives), ("exclude", exclude)):
        if pairs is None:
            continue
        if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.dtype.is_floating_point:
            raise ValueError(f"{name} must be a (P, 2) integer tensor of (row, label) pairs, got {tuple(pairs.shape)}")
        if len(pairs):
            (lo_row, lo_label), (hi_row, hi_label) = torch.stack([pairs.amin(0), pairs.amax(0)]).tolist()
            if lo_row < 0 or hi_row >= x.shape[0]:
                raise ValueError(f"{name} rows must lie in [0, {x.shape[0]})")
            if lo_label < 0 or hi_label >= num_labels:
                raise ValueError(f"{name} labels must lie in [0, {num_labels}) (padded labels take no pairs)")
    if kahan is not None and (kahan.dim() != 2 or kahan.shape[1] != dim or kahan.shape[0] > num_labels):
        raise ValueError(f"kahan must be (H, {dim}) with H <= num_labels={num_labels}, got {tuple(kahan.shape)}")
    if bias is not None and bias.values.shape != (rows,):
        raise ValueError(f"the master bias must hold one value per weight row ({rows}), got {tuple(bias.values.shape)}")
    if dtype in ROUNDED_DTYPES and generator is None:
        raise ValueError(f"{dtype} weights are rounded stochastically: pass a torch.Generator")
    return num_labels


@torch.no_grad()
def head_step_cpu(
    chunks: list[torch.Tensor],
    x: torch.Tensor,
    positives: torch.Tensor,
    *,
    lr: float,
    weight_decay: float = 0.0,
    generator: torch.Generator | None = None,
    num_labels: int | None = None,
    kahan: torch.Tensor | None = None,
    bias: MasterBias | None = None,
    exclude: torch.Tensor | None = None,
    compute_loss: bool = False,
) -> HeadStepOutput:
    """One SGD step of the summed BCE, in place on `chunks` (and `kahan`, `bias.values`); returns dX and the loss.

    chunks: contiguous row blocks of the head in label order, each (Lc_i, D) fp32 / bf16 / float8_e4m3fn; rows past
    num_labels are padding and never change. x: (B, D) float (fp32 from the head). positives / exclude: (P, 2) int64
    (row, label) pairs: the targets, and the pairs that get no gradient and no loss. lr, weight_decay: in the units
    of the stored weights. generator: the rounding bits (bf16 / fp8 weights). kahan: (H, D) bf16 compensation of the
    first H labels. bias: the fp32 master of the last weight column (module doc). Loss: summed BCE / B, if asked.
    """
    num_labels = _check_inputs(chunks, x, positives, exclude, num_labels, kahan, bias, generator)
    fp32 = chunks[0].dtype == torch.float32
    gemm = torch.bfloat16 if x.device.type == "cpu" else torch.float32
    xq = x.to(gemm)
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    loss = 0.0
    start = 0
    # the column's SGD step in true units: lr unit^2 times the batch-summed gradient; its decay multiplies by
    # 1 - lr wd. The fp32 master gets the same, so the recipe does not change with the precision.
    bias_lr = lr * bias.unit * bias.unit if bias is not None else 0.0
    for w in chunks:
        n = w.shape[0]
        valid = max(0, min(n, num_labels - start))
        if valid == 0:
            break
        wv = w[:valid]
        wf = wv.float()
        wg = wv if wv.dtype == gemm else wf.to(gemm)
        z = (xq @ wg.T).float()
        if bias is not None:
            bv = bias.values[start : start + valid]
            z += bv - wf[:, -1] * bias.unit  # the master replaces the column's rounded value
        y = torch.zeros_like(z)
        sel = (positives[:, 1] >= start) & (positives[:, 1] < start + valid)
        y[positives[sel, 0], positives[sel, 1] - start] = 1.0
        g = torch.sigmoid(z) - y
        if exclude is not None and len(exclude):
            e = (exclude[:, 1] >= start) & (exclude[:, 1] < start + valid)
            g[exclude[e, 0], exclude[e, 1] - start] = 0.0
        if compute_loss:
            loss += float(torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum"))
        gq = g.to(gemm)
        dx += (gq @ wg).float()
        delta = (gq.T @ xq).float()
        if weight_decay:
            delta.add_(wf, alpha=weight_decay)
        delta.mul_(-lr)
        if bias is not None:
            delta[:, -1] = 0.0
            if weight_decay:
                bv.mul_(1.0 - lr * weight_decay)
            bv.add_(g.sum(0), alpha=-bias_lr)  # in place: a view of bias.values
        if fp32:
            wv.add_(delta)
        else:
            _rounded_update(wv, wf, delta, kahan, start, generator)
        if bias is not None:
            wv[:, -1] = bias.column(bv, wv.dtype)
        start += n
    return HeadStepOutput(dx, loss / x.shape[0] if compute_loss else None)


def _rounded_update(wv, wf, delta, kahan, start, generator) -> None:
    """wv <- SR(wf + delta) in place; the first rows that have a Kahan row subtract their compensation from the
    update and keep the new rounding error (what the rounding lost of the compensated update)."""
    h = 0 if kahan is None else max(0, min(len(kahan) - start, wv.shape[0]))
    if h:
        comp = kahan[start : start + h].float()
        delta[:h] -= comp
    new = stochastic_round_with(wf + delta, wv.dtype, generator)
    if h:
        lost = (new[:h].float() - wf[:h]) - delta[:h]
        kahan[start : start + h] = lost.to(torch.bfloat16)
    wv.copy_(new)
