"""Device helpers shared by the head-step kernels (`head_step_fused`, `head_step_three`): dots, targets, G.

For one block of labels (W rows) and the batch X (B x D):

    Z^T = W X^T (fp32, over all of D),  G^T = sigmoid(Z^T) - Y^T  (0 for padding rows and labels, excluded pairs)

and G is stored twice, (B, L) and (L, B), quantised as the dots consume it (bf16 to nearest, or e4m3 of G * 2^8
rounded stochastically on the stream seed + 1), so that every tensor-core operand is read along its contraction
dimension (what FP8 MMAs need).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from elmo_kernels.rounding import cast_on_grid, nearest_bf16, random_u16, round_to, saturate


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Scratch buffers (G, dX partials) whose every read element a kernel writes first; tests poison them."""
    return torch.empty(shape, dtype=dtype, device=device)


def sorted_pairs(rows: torch.Tensor, cols: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, label) pairs sorted by label then row (int64 rows, int64 labels). Duplicates stay (the kernels count a
    listed cell once): a sort needs no host synchronisation, where removing them (torch.unique) does."""
    keys = torch.sort(cols.to(torch.int64) * batch + rows.to(torch.int64)).values
    return keys % batch, keys // batch


@triton.jit
def mma(a, b, acc, DOT_DTYPE: tl.constexpr):
    # fp32 operands only under the interpreter, whose bf16 dot multiplies raw bit patterns (triton issue 11584).
    if DOT_DTYPE == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)


@triton.jit
def pair_hits(row_ptr, col_ptr, start, end, labels, rows, BLOCK_P: tl.constexpr, HOT_DTYPE: tl.constexpr):
    # How often each (label, row) cell of this tile is listed: H = C R^T, with C / R the one-hot labels / rows of
    # the block's pairs (sorted by label on the host). A few small dots, no dense L x B matrix.
    hits = tl.zeros((labels.shape[0], rows.shape[0]), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < end
        p_row = tl.load(row_ptr + p, mask=p_ok, other=-1)
        p_col = tl.load(col_ptr + p, mask=p_ok, other=-1)
        col_hot = tl.where(labels[:, None] == p_col[None, :], 1.0, 0.0)
        row_hot = tl.where(p_row[:, None] == rows[None, :], 1.0, 0.0)
        hits = mma(col_hot, row_hot, hits, HOT_DTYPE)
    return hits


@triton.jit
def block_gradient(
    x_ptr,
    w_ptr,
    pos_row_ptr,
    pos_col_ptr,
    pos_start_ptr,
    ex_row_ptr,
    ex_col_ptr,
    ex_start_ptr,
    loss_ptr,
    labels,
    B,
    D,
    num_valid,
    row_offset,
    stride_xb,
    stride_wl,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    HOT_DTYPE: tl.constexpr,
    COMPUTE_LOSS: tl.constexpr,
    HAS_EXCLUDE: tl.constexpr,
):
    """G^T (BLOCK_L x BLOCK_B fp32) of one block of labels (local ids `labels` into w_ptr, global row_offset + ...).

    Computed as Z^T = W X^T, labels along the MMA's M: the layout in which G^T is stored and its random bits are
    drawn, so only G (B, L) needs a transpose. pos_start_ptr / ex_start_ptr point at this block's [start, end)
    entries in the sorted pair lists.
    """
    rows = tl.arange(0, BLOCK_B)
    row_ok = rows < B
    label_ok = labels < num_valid
    zt = tl.zeros((labels.shape[0], BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        w = tl.load(
            w_ptr + labels[:, None].to(tl.int64) * stride_wl + d[None, :],
            mask=label_ok[:, None] & (d[None, :] < D),
            other=0.0,
        )
        x = tl.load(x_ptr + rows[:, None] * stride_xb + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
        zt = mma(w, tl.trans(x), zt, DOT_DTYPE)

    # Targets from this block's positive pairs; excluded pairs (e.g. an item's own label) get no gradient.
    global_labels = row_offset + labels
    p_start, p_end = tl.load(pos_start_ptr), tl.load(pos_start_ptr + 1)
    y = tl.minimum(pair_hits(pos_row_ptr, pos_col_ptr, p_start, p_end, global_labels, rows, BLOCK_P, HOT_DTYPE), 1.0)
    valid = label_ok[:, None] & row_ok[None, :]
    if HAS_EXCLUDE:
        e_start, e_end = tl.load(ex_start_ptr), tl.load(ex_start_ptr + 1)
        hidden = pair_hits(ex_row_ptr, ex_col_ptr, e_start, e_end, global_labels, rows, BLOCK_P, HOT_DTYPE)
        valid = valid & (hidden == 0.0)
    if COMPUTE_LOSS:
        # BCE with logits, stably: max(z, 0) - y z + log(1 + exp(-|z|)).
        bce = tl.maximum(zt, 0.0) - y * zt + tl.log(1.0 + tl.exp(-tl.abs(zt)))
        tl.atomic_add(loss_ptr, tl.sum(tl.sum(tl.where(valid, bce, 0.0), axis=1), axis=0))
    return tl.where(valid, tl.sigmoid(zt) - y, 0.0)


@triton.jit
def store_gradient(
    gt,
    g_ptr,
    gt_ptr,
    labels,
    B,
    num_rows,
    row_offset,
    seed,
    stride_gb,
    stride_gtl,
    BLOCK_B: tl.constexpr,
    G_FP8: tl.constexpr,
):
    """Quantise G^T (L x B) and store it as (B, L) at g_ptr and (L, B) at gt_ptr, for labels < num_rows."""
    rows = tl.arange(0, BLOCK_B)
    row_ok = rows < B
    g_ptrs = g_ptr + rows[:, None] * stride_gb + labels[None, :]
    gt_ptrs = gt_ptr + labels[:, None].to(tl.int64) * stride_gtl + rows[None, :]
    g_mask = row_ok[:, None] & (labels[None, :] < num_rows)
    gt_mask = (labels[:, None] < num_rows) & row_ok[None, :]
    if G_FP8:
        # |G| < 1: scale by 2^8 so that small gradients stay above e4m3's subnormals, and round stochastically
        # (stream seed + 1, element (label, batch row)) so that the quantised G is unbiased.
        rand16 = random_u16(seed + 1, row_offset + labels, rows)
        gq = cast_on_grid(round_to(gt * 256.0, rand16, tl.float8e4nv, True), tl.float8e4nv)
    else:
        gq = nearest_bf16(gt).to(tl.bfloat16)
    tl.store(gt_ptrs, gq, mask=gt_mask)
    tl.store(g_ptrs, tl.trans(gq), mask=g_mask)


@triton.jit
def update_tile(
    w_ptr,
    kahan_ptr,
    wf,
    dw,
    rand16,
    labels,
    d,
    num_valid,
    num_kahan,
    kahan_row0,
    grad_coef,
    decay_coef,
    D,
    stride_wl,
    stride_kl,
    W_DTYPE: tl.constexpr,
    KAHAN_DTYPE: tl.constexpr,
    HAS_KAHAN: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    """W <- round(W - lr (G^T X + wd W)) for one (labels x d) tile: wf = the old tile (fp32), dw = G^T X, rand16
    the tile's random bits (`random_u16` of its global rows and columns).

    Labels whose Kahan row kahan_row0 + label is < num_kahan also carry the compensation buffer.
    """
    label_ok = labels < num_valid
    d_ok = d < D
    w_mask = label_ok[:, None] & d_ok[None, :]
    w_offs = labels[:, None].to(tl.int64) * stride_wl + d[None, :]
    delta = dw * grad_coef + wf * decay_coef  # -lr (G^T X + wd W), constants folded on the host
    if HAS_KAHAN:
        # Kahan: c holds what earlier roundings lost; feed it back, then keep what this rounding loses.
        k_rows = kahan_row0 + labels
        k_mask = (label_ok & (k_rows < num_kahan))[:, None] & d_ok[None, :]
        k_offs = k_rows[:, None].to(tl.int64) * stride_kl + d[None, :]
        comp = tl.load(kahan_ptr + k_offs, mask=k_mask, other=0.0).to(tl.float32)
        corrected = delta - comp
        new_w = saturate(round_to(wf + corrected, rand16, W_DTYPE, STOCHASTIC), W_DTYPE)
        new_comp = round_to((new_w - wf) - corrected, rand16, KAHAN_DTYPE, False)
        tl.store(kahan_ptr + k_offs, cast_on_grid(new_comp, KAHAN_DTYPE), mask=k_mask)
    else:
        new_w = round_to(wf + delta, rand16, W_DTYPE, STOCHASTIC)
    tl.store(w_ptr + w_offs, cast_on_grid(new_w, W_DTYPE), mask=w_mask)


@dataclass
class StepInputs:
    """Host-side inputs of one head step as the kernels take them (built once per call by `head_step`)."""

    config: object  # elmo_kernels.head_step.HeadStepConfig
    xq: torch.Tensor  # (B, D) X as the dots consume it (bf16, or e4m3 with fp8 dots)
    xt: torch.Tensor  # (D, B) its transpose, the K-major operand of G^T X
    pos_rows: torch.Tensor  # int32, sorted by label
    pos_cols: torch.Tensor  # int64 global label ids (label_offset added)
    ex_rows: torch.Tensor
    ex_cols: torch.Tensor
    has_exclude: bool
    num_labels: int
    label_offset: int
    fp8_dots: bool
    dot_dtype: object  # tl dtype of the dot operands (fp32 under the interpreter)
    hot_dtype: object
    num_sms: int
    dx: torch.Tensor  # (B, D) fp32, accumulated by the paths
    loss: torch.Tensor  # (1,) fp32, summed BCE when asked for

    def pair_starts(self, offset: int, rows: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per block of `block` labels from global id `offset` over `rows` labels: where its pairs start (int32)."""
        bounds = offset + torch.arange(triton.cdiv(rows, block) + 1, device=self.xq.device) * block
        return self.starts_at(bounds)

    def starts_at(self, bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.searchsorted(self.pos_cols, bounds).to(torch.int32)
        ex = torch.searchsorted(self.ex_cols, bounds).to(torch.int32) if self.has_exclude else pos
        return pos, ex
