"""The fused ELMO classifier-head step: logits, gradient, dX and the stochastic-rounding SGD update of BF16/FP8 weights.

Per label chunk W (Lc x D), embeddings X (B x D) and targets Y (given as positive (row, label) pairs):

    G  = sigmoid(X W^T) - Y                       (the gradient of the summed BCE w.r.t. the logits)
    dX += G W                                      (with W before its update)
    W  <- SR(W - lr (G^T X + wd W))                (the weight gradient G^T X is never written to memory)

Two kernels per chunk, both streaming W:
  1. `_logits_grad_kernel`: one program per block of labels computes the B x BLOCK_L logits over all of D in
     registers, subtracts the targets and writes G (bf16, or e4m3 scaled by 2^8 for fp8 dots): B x Lc, the only
     per-chunk buffer (the B x Lc logits never exist in memory).
  2. `_update_kernel`: a program owns one D-tile and a contiguous group of label blocks. For each block it loads
     G and the old W tile once, accumulates dX += G W in registers, forms G^T X for that tile and writes the
     rounded new W (and Kahan compensation). Its dX partial is written once per program and summed on the host, so
     the result is deterministic. Programs of one group are adjacent in the grid, so their G tiles come from L2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.reference import GRAD_FP8_SCALE
from kernels.rounding import _TL_DTYPES, cast_on_grid, nearest_bf16, random_u16, round_to

WEIGHT_DTYPES = (torch.bfloat16, torch.float8_e4m3fn)
KAHAN_DTYPES = (torch.bfloat16, torch.float8_e5m2)
LABEL_ALIGN = 16  # fp8 GEMMs want 16-aligned leading dimensions; odd ones cost up to 7x in cuBLAS
MAX_BATCH = 256  # the logits tile of a label block lives in registers


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Scratch buffers (G, dX partials); tests replace this to poison them."""
    return torch.empty(shape, dtype=dtype, device=device)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class HeadStepConfig:
    """Hyper-parameters of one head step. fp8_dots=None uses FP8 tensor cores where the GPU has them (sm_89+)."""

    lr: float
    weight_decay: float = 0.0
    seed: int = 0
    compute_loss: bool = False
    fp8_dots: bool | None = None
    stochastic_rounding: bool = True  # False rounds weights to nearest: the ablation that shows why SR exists


class HeadStepOutput(NamedTuple):
    dx: torch.Tensor  # (B, D) fp32: gradient of the summed BCE w.r.t. the embeddings
    loss: float | None  # summed BCE over valid (row, label) pairs divided by B, when asked for


@triton.jit
def _mma(a, b, acc, DOT_DTYPE: tl.constexpr):
    # fp32 operands only under the interpreter, whose bf16 dot multiplies raw bit patterns (triton issue 11584).
    if DOT_DTYPE == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)


@triton.jit
def _pair_hits(row_ptr, col_ptr, start, end, rows, labels, BLOCK_P: tl.constexpr, HOT_DTYPE: tl.constexpr):
    # Which (row, label) cells of this tile are listed: H = R^T C, with R / C the one-hot rows / labels of the
    # block's pairs (sorted by label on the host, duplicates removed). A few small dots, no dense B x L matrix.
    hits = tl.zeros((rows.shape[0], labels.shape[0]), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < end
        p_row = tl.load(row_ptr + p, mask=p_ok, other=-1)
        p_col = tl.load(col_ptr + p, mask=p_ok, other=-1)
        row_hot = tl.where(rows[:, None] == p_row[None, :], 1.0, 0.0)
        col_hot = tl.where(p_col[:, None] == labels[None, :], 1.0, 0.0)
        hits = _mma(row_hot, col_hot, hits, HOT_DTYPE)
    return hits


@triton.jit
def _logits_grad_kernel(
    x_ptr,
    w_ptr,
    g_ptr,
    gt_ptr,
    pos_row_ptr,
    pos_col_ptr,
    block_start_ptr,
    ex_row_ptr,
    ex_col_ptr,
    ex_start_ptr,
    loss_ptr,
    B,
    D,
    num_rows,
    num_valid,
    row_offset,
    seed,
    stride_xb,
    stride_wl,
    stride_gb,
    stride_gtl,
    BLOCK_B: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    HOT_DTYPE: tl.constexpr,
    G_FP8: tl.constexpr,
    COMPUTE_LOSS: tl.constexpr,
    HAS_EXCLUDE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_B)
    labels = pid * BLOCK_L + tl.arange(0, BLOCK_L)
    row_ok = rows < B
    label_ok = labels < num_valid

    z = tl.zeros((BLOCK_B, BLOCK_L), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rows[:, None] * stride_xb + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
        w = tl.load(
            w_ptr + labels[:, None].to(tl.int64) * stride_wl + d[None, :],
            mask=label_ok[:, None] & (d[None, :] < D),
            other=0.0,
        )
        z = _mma(x, tl.trans(w), z, DOT_DTYPE)

    # Targets from this block's positive pairs; excluded pairs (e.g. an item's own label) get no gradient.
    global_labels = row_offset + labels
    p_start, p_end = tl.load(block_start_ptr + pid), tl.load(block_start_ptr + pid + 1)
    y = _pair_hits(pos_row_ptr, pos_col_ptr, p_start, p_end, rows, global_labels, BLOCK_P, HOT_DTYPE)
    valid = row_ok[:, None] & label_ok[None, :]
    if HAS_EXCLUDE:
        e_start, e_end = tl.load(ex_start_ptr + pid), tl.load(ex_start_ptr + pid + 1)
        hidden = _pair_hits(ex_row_ptr, ex_col_ptr, e_start, e_end, rows, global_labels, BLOCK_P, HOT_DTYPE)
        valid = valid & (hidden == 0.0)
    g = tl.where(valid, tl.sigmoid(z) - y, 0.0)
    if COMPUTE_LOSS:
        # BCE with logits, stably: max(z, 0) - y z + log(1 + exp(-|z|)).
        bce = tl.maximum(z, 0.0) - y * z + tl.log(1.0 + tl.exp(-tl.abs(z)))
        tl.atomic_add(loss_ptr, tl.sum(tl.sum(tl.where(valid, bce, 0.0), axis=1), axis=0))

    # G is stored twice, (B, Lc) for the dX GEMM and (Lc, B) for the weight update, so that both read their
    # tensor-core operand along the contraction dimension (what FP8 MMAs need); it is 1/6 of W's bytes at B = 128.
    g_ptrs = g_ptr + rows[:, None] * stride_gb + labels[None, :]
    gt_ptrs = gt_ptr + labels[:, None].to(tl.int64) * stride_gtl + rows[None, :]
    g_mask = row_ok[:, None] & (labels[None, :] < num_rows)
    gt_mask = (labels[:, None] < num_rows) & row_ok[None, :]
    if G_FP8:
        # |G| < 1: scale by 2^8 so that small gradients stay above e4m3's subnormals, and round stochastically
        # (stream seed + 1, counter per (label, batch row)) so that the quantised G is unbiased.
        counters = (row_offset + labels[:, None]).to(tl.int64) * ((B + 7) // 8) + tl.arange(0, BLOCK_B // 8)[None, :]
        gq = cast_on_grid(
            round_to(tl.trans(g) * 256.0, random_u16(seed + 1, counters), tl.float8e4nv, True), tl.float8e4nv
        )
        tl.store(gt_ptrs, gq, mask=gt_mask)
        tl.store(g_ptrs, tl.trans(gq), mask=g_mask)
    else:
        gq = nearest_bf16(g).to(tl.bfloat16)
        tl.store(g_ptrs, gq, mask=g_mask)
        tl.store(gt_ptrs, tl.trans(gq), mask=gt_mask)


@triton.jit
def _dx_kernel(
    g_ptr,
    w_ptr,
    dx_ptr,
    B,
    D,
    num_valid,
    labels_per_split,
    grad_scale_inv,
    stride_gb,
    stride_wl,
    stride_dxs,
    stride_dxb,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    # Split-K GEMM dX = G W over the labels of one split, for one D-tile; partials are summed on the host, so the
    # result does not depend on scheduling. Runs before the update: dX must see the old W.
    pid = tl.program_id(0)
    num_dtiles = tl.cdiv(D, BLOCK_D)
    tile = pid % num_dtiles
    split = pid // num_dtiles
    rows = tl.arange(0, BLOCK_B)
    row_ok = rows < B
    d = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    first = split * labels_per_split
    last = tl.minimum(first + labels_per_split, num_valid)
    for k0 in range(first, last, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < last
        g = tl.load(g_ptr + rows[:, None] * stride_gb + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(
            w_ptr + k[:, None].to(tl.int64) * stride_wl + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0
        )
        acc = _mma(g, w, acc, DOT_DTYPE)
    dx_ptrs = dx_ptr + split * stride_dxs + rows[:, None] * stride_dxb + d[None, :]
    tl.store(dx_ptrs, acc * grad_scale_inv, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _update_kernel(
    xt_ptr,
    w_ptr,
    gt_ptr,
    kahan_ptr,
    B,
    D,
    num_valid,
    num_kahan,
    row_offset,
    seed,
    grad_coef,
    decay_coef,
    stride_xtd,
    stride_wl,
    stride_gtl,
    stride_kl,
    BLOCK_B: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    W_DTYPE: tl.constexpr,
    KAHAN_DTYPE: tl.constexpr,
    HAS_KAHAN: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    # One block of labels, all of D: G^T (BLOCK_L x B) stays in registers while the program walks the D-tiles,
    # forming G^T X for one tile at a time and writing the rounded new weights.
    pid = tl.program_id(0)
    labels = pid * BLOCK_L + tl.arange(0, BLOCK_L)
    label_ok = labels < num_valid
    rows = tl.arange(0, BLOCK_B)
    row_ok = rows < B
    gt = tl.load(
        gt_ptr + labels[:, None].to(tl.int64) * stride_gtl + rows[None, :],
        mask=label_ok[:, None] & row_ok[None, :],
        other=0.0,
    )
    col_groups = (D + 7) // 8
    row_counter = (row_offset + labels[:, None]).to(tl.int64) * col_groups
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        xt = tl.load(xt_ptr + d[:, None] * stride_xtd + rows[None, :], mask=d_ok[:, None] & row_ok[None, :], other=0.0)
        dw = _mma(gt, tl.trans(xt), tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32), DOT_DTYPE)
        w_mask = label_ok[:, None] & d_ok[None, :]
        w_offs = labels[:, None].to(tl.int64) * stride_wl + d[None, :]
        wf = tl.load(w_ptr + w_offs, mask=w_mask, other=0.0).to(tl.float32)
        delta = dw * grad_coef + wf * decay_coef  # -lr (G^T X + wd W), constants folded on the host
        rand16 = random_u16(seed, row_counter + (d0 // 8 + tl.arange(0, BLOCK_D // 8))[None, :])
        if HAS_KAHAN:
            # Kahan: c holds what earlier roundings lost; feed it back, then keep what this rounding loses.
            k_mask = (labels < num_kahan)[:, None] & d_ok[None, :]
            k_offs = labels[:, None].to(tl.int64) * stride_kl + d[None, :]
            comp = tl.load(kahan_ptr + k_offs, mask=k_mask, other=0.0).to(tl.float32)
            corrected = delta - comp
            new_w = round_to(wf + corrected, rand16, W_DTYPE, STOCHASTIC)
            new_comp = round_to((new_w - wf) - corrected, rand16, KAHAN_DTYPE, False)
            tl.store(kahan_ptr + k_offs, cast_on_grid(new_comp, KAHAN_DTYPE), mask=k_mask)
        else:
            new_w = round_to(wf + delta, rand16, W_DTYPE, STOCHASTIC)
        tl.store(w_ptr + w_offs, cast_on_grid(new_w, W_DTYPE), mask=w_mask)


@dataclass(frozen=True)
class _LaunchPlan:
    block_b: int
    fwd_block_l: int
    fwd_block_d: int
    dx_block_k: int
    dx_block_d: int
    upd_block_l: int
    upd_block_d: int
    fwd_warps: int = 8
    dx_warps: int = 4
    upd_warps: int = 4
    fwd_stages: int = 3
    dx_stages: int = 3
    upd_stages: int = 2
    programs_per_sm: int = 4  # dX splits: enough programs to fill the GPU a few times over


def _launch_plan(batch: int, dim: int, fp8_dots: bool) -> _LaunchPlan:
    block_b = max(32 if fp8_dots else 16, triton.next_power_of_2(batch))
    if _interpreting():
        # The interpreter pays per program: few, large blocks.
        bd = min(256, max(16, triton.next_power_of_2(dim)))
        return _LaunchPlan(block_b, 64, bd, 64, bd, 64, bd, 4, 4, 4, 1, 1, 1, 1)
    big_b = block_b > 128
    # Swept on an H200 at 2.8M labels, B = 128 (benchmarks/head_step.py, 2026-11-29): fp8 8.7 ms, bf16 9.1 ms.
    return _LaunchPlan(
        block_b=block_b,
        fwd_block_l=64 if big_b or fp8_dots else 128,
        fwd_block_d=128 if fp8_dots else 64,
        dx_block_k=64 if big_b or not fp8_dots else 128,
        dx_block_d=64 if fp8_dots else 128,
        upd_block_l=64,
        upd_block_d=128 if fp8_dots and not big_b else 64,
        upd_warps=8 if fp8_dots else 4,
        upd_stages=3 if fp8_dots else 2,
    )


def _has_fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _check_inputs(chunks, x, pos_rows, pos_cols, num_labels, kahan) -> int:
    if not chunks:
        raise ValueError("chunks is empty: the head needs at least one (Lc, D) weight chunk")
    if x.dim() != 2:
        raise ValueError(f"x must be (B, D), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"x must be bfloat16 or float32, got {x.dtype}")
    batch, dim = x.shape
    if batch < 1:
        raise ValueError("x has no rows")
    dtype = chunks[0].dtype
    total = 0
    for i, w in enumerate(chunks):
        if w.dtype not in WEIGHT_DTYPES:
            raise ValueError(f"chunk {i} has dtype {w.dtype}; the head is bfloat16 or float8_e4m3fn")
        if w.dtype != dtype:
            raise ValueError(f"chunk {i} has dtype {w.dtype} but chunk 0 has {dtype}: all chunks share one dtype")
        if w.dim() != 2 or w.shape[1] != dim:
            raise ValueError(f"chunk {i} has shape {tuple(w.shape)}; expected (Lc, {dim}) to match x")
        if w.shape[0] % LABEL_ALIGN:
            raise ValueError(f"chunk {i} has {w.shape[0]} rows; pad each chunk to a multiple of {LABEL_ALIGN}")
        if w.device != x.device:
            raise ValueError(f"chunk {i} is on {w.device} but x is on {x.device}")
        if not w.is_contiguous():
            raise ValueError(f"chunk {i} is not contiguous: the update writes it in place")
        total += w.shape[0]
    num_labels = total if num_labels is None else num_labels
    if not 0 < num_labels <= total:
        raise ValueError(f"num_labels={num_labels} must be in [1, {total}] (the rows of all chunks)")
    _check_pairs(pos_rows, pos_cols, batch, num_labels, "pos")
    if kahan is not None:
        if kahan.dtype not in KAHAN_DTYPES:
            raise ValueError(f"kahan must be bfloat16 or float8_e5m2, got {kahan.dtype}")
        if kahan.dim() != 2 or kahan.shape[1] != dim or kahan.shape[0] > num_labels:
            raise ValueError(f"kahan must be (H, {dim}) with H <= num_labels={num_labels}, got {tuple(kahan.shape)}")
        if kahan.device != x.device or not kahan.is_contiguous():
            raise ValueError("kahan must be contiguous and on the device of x")
    return num_labels


def _check_pairs(rows: torch.Tensor, cols: torch.Tensor, batch: int, num_labels: int, name: str) -> None:
    if rows.shape != cols.shape or rows.dim() != 1:
        raise ValueError(f"{name}_rows and {name}_cols must be 1-D tensors of the same length")
    if rows.dtype.is_floating_point or cols.dtype.is_floating_point:
        raise ValueError(f"{name}_rows and {name}_cols must be integer tensors")
    if rows.numel():
        # one host synchronisation for the four bounds
        lo_row, hi_row, lo_col, hi_col = torch.stack([rows.min(), rows.max(), cols.min(), cols.max()]).tolist()
        if lo_row < 0 or hi_row >= batch:
            raise ValueError(f"{name}_rows must lie in [0, {batch})")
        if lo_col < 0 or hi_col >= num_labels:
            raise ValueError(f"{name}_cols must lie in [0, {num_labels}) (padded labels take no pairs)")


def _sorted_positives(pos_rows: torch.Tensor, pos_cols: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    keys = torch.unique(pos_cols.to(torch.int64) * batch + pos_rows.to(torch.int64))
    return keys % batch, keys // batch


def head_step(
    chunks: list[torch.Tensor],
    x: torch.Tensor,
    pos_rows: torch.Tensor,
    pos_cols: torch.Tensor,
    config: HeadStepConfig,
    *,
    num_labels: int | None = None,
    kahan: torch.Tensor | None = None,
    impl: Literal["auto", "triton", "torch"] = "auto",
    label_offset: int = 0,
    exclude_rows: torch.Tensor | None = None,
    exclude_cols: torch.Tensor | None = None,
) -> HeadStepOutput:
    """One SGD step of the whole head, in place on `chunks` (and `kahan`); returns dX for the encoder.

    chunks: label chunks of the head, each (Lc_i, D) bfloat16 or float8_e4m3fn with Lc_i a multiple of 16, in label
    order; rows past `num_labels` are padding and never change. x: (B, D) bf16/fp32, B <= 256 for impl="triton".
    pos_rows/pos_cols: the positive (batch row, global label) pairs. kahan: optional (H, D) bfloat16/float8_e5m2
    compensation for the first H labels. impl: "triton" (GPU, or CPU under TRITON_INTERPRET=1), "torch" (the
    reference, CPU fallback) or "auto" (triton on CUDA tensors, torch otherwise). label_offset: the global id of the
    first row when `chunks` is one shard of a larger head; it places the shard in the random stream, so a sharded
    step rounds exactly like the unsharded one (pos_cols stay shard-local). exclude_rows/exclude_cols: (row, label)
    pairs that get no gradient and no loss (e.g. an item's own label when it is filtered at evaluation).
    """
    num_labels = _check_inputs(chunks, x, pos_rows, pos_cols, num_labels, kahan)
    if not 0 <= config.seed < 2**62:
        raise ValueError(f"seed must be in [0, 2**62), got {config.seed}")
    if label_offset < 0:
        raise ValueError(f"label_offset must be >= 0, got {label_offset}")
    if impl == "auto":
        impl = "triton" if x.is_cuda else "torch"
    if impl not in ("triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    fp8_dots = config.fp8_dots
    if fp8_dots is None:
        fp8_dots = chunks[0].dtype == torch.float8_e4m3fn and _has_fp8_tensor_cores(x.device)
    if fp8_dots and chunks[0].dtype != torch.float8_e4m3fn:
        raise ValueError("fp8_dots needs float8_e4m3fn weights")
    rows, cols = _sorted_positives(pos_rows.to(x.device), pos_cols.to(x.device), x.shape[0])
    excluded = None
    if exclude_rows is not None or exclude_cols is not None:
        if exclude_rows is None or exclude_cols is None:
            raise ValueError("exclude_rows and exclude_cols go together")
        _check_pairs(exclude_rows, exclude_cols, x.shape[0], num_labels, "exclude")
        excluded = _sorted_positives(exclude_rows.to(x.device), exclude_cols.to(x.device), x.shape[0])
    if impl == "torch":
        return _head_step_torch(chunks, x, rows, cols, config, num_labels, kahan, fp8_dots, label_offset, excluded)
    if x.shape[0] > MAX_BATCH:
        raise ValueError(f"impl='triton' takes at most {MAX_BATCH} rows per step, got {x.shape[0]}")
    return _head_step_triton(chunks, x, rows, cols, config, num_labels, kahan, fp8_dots, label_offset, excluded)


def _chunk_kahan(kahan: torch.Tensor | None, start: int, rows: int) -> tuple[torch.Tensor | None, int]:
    if kahan is None or start >= kahan.shape[0]:
        return None, 0
    part = kahan[start : start + rows]
    return part, part.shape[0]


def _head_step_torch(
    chunks, x, rows, cols, config, num_labels, kahan, fp8_dots, label_offset, excluded
) -> HeadStepOutput:
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    loss = 0.0
    start = 0
    for w in chunks:
        n = w.shape[0]
        num_valid = max(0, min(n, num_labels - start))
        y = torch.zeros((x.shape[0], n), dtype=torch.float32, device=x.device)
        sel = (cols >= start) & (cols < start + n)
        y[rows[sel], cols[sel] - start] = 1.0
        keep = None
        if excluded is not None:
            keep = torch.ones_like(y, dtype=torch.bool)
            ex_sel = (excluded[1] >= start) & (excluded[1] < start + n)
            keep[excluded[0][ex_sel], excluded[1][ex_sel] - start] = False
        if config.compute_loss and num_valid:
            z = reference.quantize_embeddings(x, fp8_dots).float() @ w[:num_valid].float().T
            bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y[:, :num_valid], reduction="none")
            loss += float(bce[keep[:, :num_valid]].sum() if keep is not None else bce.sum())
        part, _ = _chunk_kahan(kahan, start, n)
        dx += reference.head_step_chunk(
            w,
            x,
            y,
            lr=config.lr,
            weight_decay=config.weight_decay,
            seed=config.seed,
            row_offset=label_offset + start,
            num_valid=num_valid,
            kahan=part,
            fp8_dots=fp8_dots,
            stochastic=config.stochastic_rounding,
            keep=keep,
        )
        start += n
    return HeadStepOutput(dx, loss / x.shape[0] if config.compute_loss else None)


def _head_step_triton(
    chunks, x, rows, cols, config, num_labels, kahan, fp8_dots, label_offset, excluded
) -> HeadStepOutput:
    batch, dim = x.shape
    plan = _launch_plan(batch, dim, fp8_dots)
    interp = _interpreting()
    dot_dtype = tl.float32 if interp else (tl.float8e4nv if fp8_dots else tl.bfloat16)
    hot_dtype = tl.float32 if interp else tl.float16
    xq = reference.quantize_embeddings(x, fp8_dots).contiguous()
    xt = xq.t().contiguous()
    max_rows = max(w.shape[0] for w in chunks)
    g_dtype = torch.float8_e4m3fn if fp8_dots else torch.bfloat16
    g_buf = _empty((batch, max_rows), g_dtype, x.device)
    gt_buf = _empty((max_rows, batch), g_dtype, x.device)
    num_dtiles = triton.cdiv(dim, plan.dx_block_d)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    max_splits = max(
        1, min(triton.cdiv(plan.programs_per_sm * sms, num_dtiles), triton.cdiv(max_rows, plan.dx_block_k))
    )
    dx_parts = _empty((max_splits, batch, dim), torch.float32, x.device)
    dx = torch.zeros((batch, dim), dtype=torch.float32, device=x.device)
    loss = torch.zeros(1, dtype=torch.float32, device=x.device)
    rows32 = rows.to(torch.int32)
    cols64 = (cols + label_offset).contiguous()  # global ids: the kernels place every chunk by its global offset
    if excluded is not None:
        ex_rows32, ex_cols64 = excluded[0].to(torch.int32), (excluded[1] + label_offset).contiguous()
    else:
        ex_rows32, ex_cols64 = rows32, cols64  # not read (HAS_EXCLUDE=False)
    scale_inv = 1.0 / GRAD_FP8_SCALE if fp8_dots else 1.0
    start = 0
    for w in chunks:
        n = w.shape[0]
        num_valid = max(0, min(n, num_labels - start))
        if num_valid == 0:
            start += n
            continue
        fwd_blocks = triton.cdiv(n, plan.fwd_block_l)
        offset = label_offset + start
        bounds = offset + torch.arange(fwd_blocks + 1, device=x.device, dtype=torch.int64) * plan.fwd_block_l
        block_start = torch.searchsorted(cols64, bounds).to(torch.int32)
        ex_start = torch.searchsorted(ex_cols64, bounds).to(torch.int32) if excluded is not None else block_start
        _logits_grad_kernel[(fwd_blocks,)](
            xq,
            w,
            g_buf,
            gt_buf,
            rows32,
            cols64,
            block_start,
            ex_rows32,
            ex_cols64,
            ex_start,
            loss,
            batch,
            dim,
            n,
            num_valid,
            offset,
            config.seed,
            xq.stride(0),
            w.stride(0),
            g_buf.stride(0),
            gt_buf.stride(0),
            BLOCK_B=plan.block_b,
            BLOCK_L=plan.fwd_block_l,
            BLOCK_D=plan.fwd_block_d,
            BLOCK_P=16,
            DOT_DTYPE=dot_dtype,
            HOT_DTYPE=hot_dtype,
            G_FP8=fp8_dots,
            COMPUTE_LOSS=config.compute_loss,
            HAS_EXCLUDE=excluded is not None,
            num_warps=plan.fwd_warps,
            num_stages=plan.fwd_stages,
        )
        k_blocks = triton.cdiv(num_valid, plan.dx_block_k)
        splits = min(max_splits, k_blocks)
        per_split = triton.cdiv(k_blocks, splits) * plan.dx_block_k
        splits = triton.cdiv(num_valid, per_split)
        _dx_kernel[(splits * num_dtiles,)](
            g_buf,
            w,
            dx_parts,
            batch,
            dim,
            num_valid,
            per_split,
            scale_inv,
            g_buf.stride(0),
            w.stride(0),
            dx_parts.stride(0),
            dx_parts.stride(1),
            BLOCK_B=plan.block_b,
            BLOCK_K=plan.dx_block_k,
            BLOCK_D=plan.dx_block_d,
            DOT_DTYPE=dot_dtype,
            num_warps=plan.dx_warps,
            num_stages=plan.dx_stages,
        )
        dx += dx_parts[:splits].sum(dim=0)
        part, num_kahan = _chunk_kahan(kahan, start, n)
        _update_kernel[(triton.cdiv(num_valid, plan.upd_block_l),)](
            xt,
            w,
            gt_buf,
            part if part is not None else w,
            batch,
            dim,
            num_valid,
            num_kahan,
            offset,
            config.seed,
            -config.lr * scale_inv,
            -config.lr * config.weight_decay,
            xt.stride(0),
            w.stride(0),
            gt_buf.stride(0),
            part.stride(0) if part is not None else 0,
            BLOCK_B=plan.block_b,
            BLOCK_L=plan.upd_block_l,
            BLOCK_D=plan.upd_block_d,
            DOT_DTYPE=dot_dtype,
            W_DTYPE=_TL_DTYPES[w.dtype],
            KAHAN_DTYPE=_TL_DTYPES[part.dtype] if part is not None else tl.bfloat16,
            HAS_KAHAN=part is not None,
            STOCHASTIC=config.stochastic_rounding,
            num_warps=plan.upd_warps,
            num_stages=plan.upd_stages,
        )
        start += n
    return HeadStepOutput(dx, float(loss) / batch if config.compute_loss else None)


def head_logits(chunks: list[torch.Tensor], x: torch.Tensor, num_labels: int | None = None) -> torch.Tensor:
    """(B, num_labels) fp32 logits, one chunk at a time (evaluation at small L; serving uses kernels.topk)."""
    total = sum(w.shape[0] for w in chunks)
    num_labels = total if num_labels is None else num_labels
    if x.dim() != 2 or any(w.dim() != 2 or w.shape[1] != x.shape[1] for w in chunks):
        raise ValueError("x must be (B, D) and every chunk (Lc, D)")
    if not 0 < num_labels <= total:
        raise ValueError(f"num_labels={num_labels} must be in [1, {total}]")
    xf = x.float()
    return torch.cat([xf @ w.float().T for w in chunks], dim=1)[:, :num_labels]
