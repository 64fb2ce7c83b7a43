"""The three-pass head step, the default Triton path (`head_step_fused` reads W once but is slower today).

Three kernels per chunk, each streaming W (so W is read three times and written once per step):
  1. `logits_grad_kernel`: one program per block of labels computes the B x BLOCK_L logits over all of D in
     registers and writes G twice, (B, Lc) and (Lc, B) (`head_step_utils.store_gradient`): the per-chunk buffers.
  2. `_dx_kernel`: split-K GEMM dX = G W over the labels of one split, for one D-tile; partials are summed on the
     host in a fixed order, so the result does not depend on scheduling. It runs before the update: dX sees the
     old W.
  3. `_update_kernel`: one block of labels, all of D: G^T stays in registers while the program walks the D-tiles,
     forming G^T X for one tile at a time and writing the rounded new weights (and Kahan compensation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from elmo_kernels import head_step_utils as hsu
from elmo_kernels.common import GRAD_FP8_SCALE, TL_DTYPES, interpreting
from elmo_kernels.rounding import PAIR_COLS, random_u16, random_u16_pair


@triton.jit
def logits_grad_kernel(
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
    labels = pid * BLOCK_L + tl.arange(0, BLOCK_L)
    gt = hsu.block_gradient(
        x_ptr,
        w_ptr,
        pos_row_ptr,
        pos_col_ptr,
        block_start_ptr + pid,
        ex_row_ptr,
        ex_col_ptr,
        ex_start_ptr + pid,
        loss_ptr,
        labels,
        B,
        D,
        num_valid,
        row_offset,
        stride_xb,
        stride_wl,
        BLOCK_B,
        BLOCK_D,
        BLOCK_P,
        DOT_DTYPE,
        HOT_DTYPE,
        COMPUTE_LOSS,
        HAS_EXCLUDE,
    )
    hsu.store_gradient(gt, g_ptr, gt_ptr, labels, B, num_rows, row_offset, seed, stride_gb, stride_gtl, BLOCK_B, G_FP8)


@triton.jit
def _dx_kernel(
    g_ptr,
    w_ptr,
    dx_ptr,
    B,
    D,
    num_valid,
    num_rows,
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
    # G is written (0) up to the chunk's rows, a multiple of 16: bounding its loads there keeps them vectorised.
    g_last = tl.minimum(first + labels_per_split, num_rows)
    for k0 in range(first, last, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < last
        g = tl.load(
            g_ptr + rows[:, None] * stride_gb + k[None, :], mask=row_ok[:, None] & (k < g_last)[None, :], other=0.0
        )
        w = tl.load(
            w_ptr + k[:, None].to(tl.int64) * stride_wl + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0
        )
        acc = hsu.mma(g, w, acc, DOT_DTYPE)
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
    kahan_row0,
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
    PAIRED_BITS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    W_DTYPE: tl.constexpr,
    KAHAN_DTYPE: tl.constexpr,
    HAS_KAHAN: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
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
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        xt = tl.load(xt_ptr + d[:, None] * stride_xtd + rows[None, :], mask=d_ok[:, None] & row_ok[None, :], other=0.0)
        dw = hsu.mma(gt, tl.trans(xt), tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32), DOT_DTYPE)
        w_offs = labels[:, None].to(tl.int64) * stride_wl + d[None, :]
        wf = tl.load(w_ptr + w_offs, mask=label_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if PAIRED_BITS:  # BLOCK_D == 128: one word per column pair (c, c + 64), the halves joined back in order
            lo, hi = random_u16_pair(seed, row_offset + labels, d0 + tl.arange(0, PAIR_COLS))
            rand16 = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BLOCK_L, BLOCK_D))
        else:
            rand16 = random_u16(seed, row_offset + labels, d)
        hsu.update_tile(
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
            W_DTYPE,
            KAHAN_DTYPE,
            HAS_KAHAN,
            STOCHASTIC,
        )


@dataclass(frozen=True)
class LaunchPlan:
    block_b: int
    fwd_block_l: int
    fwd_block_d: int
    dx_block_k: int
    dx_block_d: int
    upd_block_l: int
    upd_block_d: int
    upd_paired_bits: bool = False  # draw one random word per column pair (needs upd_block_d == 128)
    fwd_warps: int = 8
    dx_warps: int = 4
    upd_warps: int = 4
    fwd_stages: int = 3
    dx_stages: int = 3
    upd_stages: int = 2
    programs_per_sm: int = 4  # dX splits: enough programs to fill the GPU a few times over


def launch_plan(batch: int, dim: int, fp8_dots: bool) -> LaunchPlan:
    """Block shapes of the three kernels for a batch of `batch` rows of `dim` (swept on the H200, 2026-11-29, 12-04)."""
    block_b = max(32 if fp8_dots else 16, triton.next_power_of_2(batch))
    if interpreting():
        # The interpreter pays per program: few, large blocks.
        bd = min(256, max(16, triton.next_power_of_2(dim)))
        return LaunchPlan(block_b, 64, bd, 64, bd, 64, bd, False, 4, 4, 4, 1, 1, 1, 1)
    big_b = block_b > 128
    return LaunchPlan(
        block_b=block_b,
        fwd_block_l=64 if big_b or fp8_dots else 128,
        fwd_block_d=128 if fp8_dots else 64,
        dx_block_k=64 if big_b or not fp8_dots else 128,
        dx_block_d=64 if fp8_dots else 128,
        upd_block_l=64,
        upd_block_d=128 if fp8_dots and not big_b else 64,
        upd_stages=3 if fp8_dots else 2,
    )


def gradient_buffers(prep: hsu.StepInputs, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """G of one chunk of up to `rows` labels in both layouts, (B, rows) and (rows, B), as the dots consume it."""
    g_dtype = torch.float8_e4m3fn if prep.fp8_dots else torch.bfloat16
    batch = prep.xq.shape[0]
    return hsu.empty((batch, rows), g_dtype, prep.xq.device), hsu.empty((rows, batch), g_dtype, prep.xq.device)


def launch_logits_grad(
    prep: hsu.StepInputs,
    w: torch.Tensor,
    g_buf: torch.Tensor,
    gt_buf: torch.Tensor,
    start: int,
    num_valid: int,
    plan: LaunchPlan,
) -> None:
    """`logits_grad_kernel` over chunk `w` (head rows from `start`, `num_valid` of them real): G into the buffers."""
    batch, dim = prep.xq.shape
    n = w.shape[0]
    cfg = prep.config
    offset = prep.label_offset + start
    block_start, ex_start = prep.pair_starts(offset, n, plan.fwd_block_l)
    logits_grad_kernel[(triton.cdiv(n, plan.fwd_block_l),)](
        prep.xq,
        w,
        g_buf,
        gt_buf,
        prep.pos_rows,
        prep.pos_cols,
        block_start,
        prep.ex_rows,
        prep.ex_cols,
        ex_start,
        prep.loss,
        batch,
        dim,
        n,
        num_valid,
        offset,
        cfg.seed,
        prep.xq.stride(0),
        w.stride(0),
        g_buf.stride(0),
        gt_buf.stride(0),
        BLOCK_B=plan.block_b,
        BLOCK_L=plan.fwd_block_l,
        BLOCK_D=plan.fwd_block_d,
        BLOCK_P=16,
        DOT_DTYPE=prep.dot_dtype,
        HOT_DTYPE=prep.hot_dtype,
        G_FP8=prep.fp8_dots,
        COMPUTE_LOSS=cfg.compute_loss,
        HAS_EXCLUDE=prep.has_exclude,
        num_warps=plan.fwd_warps,
        num_stages=plan.fwd_stages,
    )


def three_pass_step(prep: hsu.StepInputs, chunks: list[torch.Tensor], kahan: torch.Tensor | None) -> None:
    """Run the three kernels on every chunk; dX accumulates into prep.dx, the summed loss into prep.loss."""
    batch, dim = prep.xq.shape
    plan = launch_plan(batch, dim, prep.fp8_dots)
    max_rows = max(w.shape[0] for w in chunks)
    g_buf, gt_buf = gradient_buffers(prep, max_rows)
    num_dtiles = triton.cdiv(dim, plan.dx_block_d)
    sms = prep.num_sms
    max_splits = max(
        1, min(triton.cdiv(plan.programs_per_sm * sms, num_dtiles), triton.cdiv(max_rows, plan.dx_block_k))
    )
    dx_parts = hsu.empty((max_splits, batch, dim), torch.float32, prep.xq.device)
    scale_inv = 1.0 / GRAD_FP8_SCALE if prep.fp8_dots else 1.0
    cfg = prep.config
    start = 0
    for w in chunks:
        n = w.shape[0]
        num_valid = max(0, min(n, prep.num_labels - start))
        if num_valid == 0:
            start += n
            continue
        offset = prep.label_offset + start
        launch_logits_grad(prep, w, g_buf, gt_buf, start, num_valid, plan)
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
            n,
            per_split,
            scale_inv,
            g_buf.stride(0),
            w.stride(0),
            dx_parts.stride(0),
            dx_parts.stride(1),
            BLOCK_B=plan.block_b,
            BLOCK_K=plan.dx_block_k,
            BLOCK_D=plan.dx_block_d,
            DOT_DTYPE=prep.dot_dtype,
            num_warps=plan.dx_warps,
            num_stages=plan.dx_stages,
        )
        prep.dx += dx_parts[:splits].sum(dim=0)
        _update_kernel[(triton.cdiv(num_valid, plan.upd_block_l),)](
            prep.xt,
            w,
            gt_buf,
            kahan if kahan is not None else w,
            batch,
            dim,
            num_valid,
            kahan.shape[0] if kahan is not None else 0,
            start,
            offset,
            cfg.seed,
            -cfg.lr * scale_inv,
            -cfg.lr * cfg.weight_decay,
            prep.xt.stride(0),
            w.stride(0),
            gt_buf.stride(0),
            kahan.stride(0) if kahan is not None else 0,
            BLOCK_B=plan.block_b,
            BLOCK_L=plan.upd_block_l,
            BLOCK_D=plan.upd_block_d,
            PAIRED_BITS=plan.upd_paired_bits and plan.upd_block_d == 2 * PAIR_COLS and cfg.stochastic_rounding,
            DOT_DTYPE=prep.dot_dtype,
            W_DTYPE=TL_DTYPES[w.dtype],
            KAHAN_DTYPE=TL_DTYPES[kahan.dtype] if kahan is not None else tl.bfloat16,
            HAS_KAHAN=kahan is not None and start < kahan.shape[0],
            STOCHASTIC=cfg.stochastic_rounding,
            num_warps=plan.upd_warps,
            num_stages=plan.upd_stages,
        )
        start += n
