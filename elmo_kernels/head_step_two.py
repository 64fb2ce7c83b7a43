"""The two-pass head step: the logits/G kernel, then one kernel that forms dX and updates W from the same tiles.

Two kernels per chunk, so W is read twice and written once per step (the three-pass path reads it three times):
  1. `head_step_three.logits_grad_kernel` (`launch_logits_grad`): G of the chunk, stored (B, Lc) and (Lc, B).
  2. `_dx_update_kernel`: program (group, D-tile) owns block_d columns of D (with paired_bits, 128 as two halves of
     64 that share their random words, `random_u16_pair`) and the label blocks group, group + num_groups, ...;
     for each block it loads G, G^T and the old W tile once, accumulates dX += G W in registers (W before its
     update), forms G^T X for the tile and stores the rounded new W (and Kahan rows) once. Its dX tile goes to
     its own partial dx_parts[group]; the partials are summed on the host in a fixed order, so dX has the same
     bits on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from elmo_kernels import head_step_utils as hsu
from elmo_kernels.common import GRAD_FP8_SCALE, TL_DTYPES, interpreting
from elmo_kernels.head_step_three import gradient_buffers, launch_logits_grad, launch_plan
from elmo_kernels.rounding import PAIR_COLS, random_u16, random_u16_pair


@triton.jit
def _dx_update_tile(
    w_ptr,
    kahan_ptr,
    g,
    gt,
    xt,
    rand16,
    acc,
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
    DOT_DTYPE: tl.constexpr,
    W_DTYPE: tl.constexpr,
    KAHAN_DTYPE: tl.constexpr,
    HAS_KAHAN: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    w = tl.load(
        w_ptr + labels[:, None].to(tl.int64) * stride_wl + d[None, :],
        mask=(labels < num_valid)[:, None] & (d < D)[None, :],
        other=0.0,
    )
    acc = hsu.mma(g, w, acc, DOT_DTYPE)  # dX sees W before its update
    dw = hsu.mma(gt, tl.trans(xt), tl.zeros((labels.shape[0], d.shape[0]), dtype=tl.float32), DOT_DTYPE)
    hsu.update_tile(
        w_ptr,
        kahan_ptr,
        w.to(tl.float32),
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
    return acc


@triton.jit
def _dx_update_kernel(
    xt_ptr,
    w_ptr,
    g_ptr,
    gt_ptr,
    kahan_ptr,
    dx_part_ptr,
    B,
    D,
    num_valid,
    num_rows,
    num_kahan,
    kahan_row0,
    row_offset,
    num_groups,
    seed,
    grad_coef,
    decay_coef,
    grad_scale_inv,
    stride_xtd,
    stride_wl,
    stride_gb,
    stride_gtl,
    stride_kl,
    stride_dxg,
    stride_dxb,
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
    num_dblocks = tl.cdiv(D, BLOCK_D)
    dblock = pid % num_dblocks
    group = pid // num_dblocks
    rows = tl.arange(0, BLOCK_B)
    row_ok = rows < B
    xt_rows = xt_ptr + rows[None, :]
    part = dx_part_ptr + group * stride_dxg + rows[:, None] * stride_dxb
    if PAIRED_BITS:
        # BLOCK_D == 128 as two halves of 64 whose elements share one random word (`random_u16_pair`).
        lo = dblock * BLOCK_D + tl.arange(0, PAIR_COLS)
        hi = lo + PAIR_COLS
        xt_lo = tl.load(xt_rows + lo[:, None] * stride_xtd, mask=(lo < D)[:, None] & row_ok[None, :], other=0.0)
        xt_hi = tl.load(xt_rows + hi[:, None] * stride_xtd, mask=(hi < D)[:, None] & row_ok[None, :], other=0.0)
        acc_lo = tl.zeros((BLOCK_B, PAIR_COLS), dtype=tl.float32)
        acc_hi = tl.zeros((BLOCK_B, PAIR_COLS), dtype=tl.float32)
    else:
        d = dblock * BLOCK_D + tl.arange(0, BLOCK_D)
        xt = tl.load(xt_rows + d[:, None] * stride_xtd, mask=(d < D)[:, None] & row_ok[None, :], other=0.0)
        acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for blk in range(group, tl.cdiv(num_valid, BLOCK_L), num_groups):
        labels = blk * BLOCK_L + tl.arange(0, BLOCK_L)
        label_ok = labels < num_valid
        # G is written (0) up to the chunk's rows, a multiple of 16: bounding its loads there keeps them vectorised.
        g = tl.load(
            g_ptr + rows[:, None] * stride_gb + labels[None, :],
            mask=row_ok[:, None] & (labels < num_rows)[None, :],
            other=0.0,
        )
        gt = tl.load(
            gt_ptr + labels[:, None].to(tl.int64) * stride_gtl + rows[None, :],
            mask=label_ok[:, None] & row_ok[None, :],
            other=0.0,
        )
        if PAIRED_BITS:
            rand_lo, rand_hi = random_u16_pair(seed, row_offset + labels, lo)
            acc_lo = _dx_update_tile(
                w_ptr,
                kahan_ptr,
                g,
                gt,
                xt_lo,
                rand_lo,
                acc_lo,
                labels,
                lo,
                num_valid,
                num_kahan,
                kahan_row0,
                grad_coef,
                decay_coef,
                D,
                stride_wl,
                stride_kl,
                DOT_DTYPE,
                W_DTYPE,
                KAHAN_DTYPE,
                HAS_KAHAN,
                STOCHASTIC,
            )
            acc_hi = _dx_update_tile(
                w_ptr,
                kahan_ptr,
                g,
                gt,
                xt_hi,
                rand_hi,
                acc_hi,
                labels,
                hi,
                num_valid,
                num_kahan,
                kahan_row0,
                grad_coef,
                decay_coef,
                D,
                stride_wl,
                stride_kl,
                DOT_DTYPE,
                W_DTYPE,
                KAHAN_DTYPE,
                HAS_KAHAN,
                STOCHASTIC,
            )
        else:
            acc = _dx_update_tile(
                w_ptr,
                kahan_ptr,
                g,
                gt,
                xt,
                random_u16(seed, row_offset + labels, d),
                acc,
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
                DOT_DTYPE,
                W_DTYPE,
                KAHAN_DTYPE,
                HAS_KAHAN,
                STOCHASTIC,
            )
    # This program alone owns dx_parts[group][:, its columns]: a plain store.
    if PAIRED_BITS:
        tl.store(part + lo[None, :], acc_lo * grad_scale_inv, mask=row_ok[:, None] & (lo < D)[None, :])
        tl.store(part + hi[None, :], acc_hi * grad_scale_inv, mask=row_ok[:, None] & (hi < D)[None, :])
    else:
        tl.store(part + d[None, :], acc * grad_scale_inv, mask=row_ok[:, None] & (d < D)[None, :])


@dataclass(frozen=True)
class TwoPassPlan:
    block_l: int  # labels per block of the dX + update kernel
    block_d: int  # columns of D per program
    paired_bits: bool  # block_d == 128 as two halves sharing their random words
    programs_per_sm: int  # (groups x D-blocks) programs per SM
    num_warps: int
    num_stages: int


def two_pass_plan(batch: int, dim: int, fp8_dots: bool) -> TwoPassPlan:
    """Launch plan of the dX + update kernel, the best of the H200 sweeps (benchmarks/head_step.py, 2026-12-04)."""
    if interpreting():
        return TwoPassPlan(64, 128, False, 1, 4, 1)
    if fp8_dots:  # 9.02 ms at 2.8M, B = 128 (paired halves 9.42, 8 warps one program per SM 13.6)
        return TwoPassPlan(block_l=128, block_d=64, paired_bits=False, programs_per_sm=2, num_warps=4, num_stages=1)
    # bf16: paired halves, 8 warps, one program per SM: 14.96 ms at 2.8M, B = 256, against 20.9-21.7 for three-pass
    return TwoPassPlan(block_l=64, block_d=128, paired_bits=True, programs_per_sm=1, num_warps=8, num_stages=2)


def two_pass_step(
    prep: hsu.StepInputs, chunks: list[torch.Tensor], kahan: torch.Tensor | None, plan: TwoPassPlan | None = None
) -> None:
    """Run the two kernels on every chunk; dX accumulates into prep.dx, the summed loss into prep.loss."""
    batch, dim = prep.xq.shape
    fwd = launch_plan(batch, dim, prep.fp8_dots)
    plan = plan or two_pass_plan(batch, dim, prep.fp8_dots)
    g_buf, gt_buf = gradient_buffers(prep, max(w.shape[0] for w in chunks))
    paired = plan.paired_bits and plan.block_d == 2 * PAIR_COLS and prep.config.stochastic_rounding
    num_dblocks = triton.cdiv(dim, plan.block_d)
    max_groups = max(1, plan.programs_per_sm * prep.num_sms // num_dblocks)
    dx_parts = hsu.empty((max_groups, batch, dim), torch.float32, prep.xq.device)
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
        launch_logits_grad(prep, w, g_buf, gt_buf, start, num_valid, fwd)
        groups = min(max_groups, triton.cdiv(num_valid, plan.block_l))
        _dx_update_kernel[(groups * num_dblocks,)](
            prep.xt,
            w,
            g_buf,
            gt_buf,
            kahan if kahan is not None else w,
            dx_parts,
            batch,
            dim,
            num_valid,
            n,
            kahan.shape[0] if kahan is not None else 0,
            start,
            offset,
            groups,
            cfg.seed,
            -cfg.lr * scale_inv,
            -cfg.lr * cfg.weight_decay,
            scale_inv,
            prep.xt.stride(0),
            w.stride(0),
            g_buf.stride(0),
            gt_buf.stride(0),
            kahan.stride(0) if kahan is not None else 0,
            dx_parts.stride(0),
            dx_parts.stride(1),
            BLOCK_B=fwd.block_b,
            BLOCK_L=plan.block_l,
            BLOCK_D=plan.block_d,
            PAIRED_BITS=paired,
            DOT_DTYPE=prep.dot_dtype,
            W_DTYPE=TL_DTYPES[w.dtype],
            KAHAN_DTYPE=TL_DTYPES[kahan.dtype] if kahan is not None else tl.bfloat16,
            HAS_KAHAN=kahan is not None and start < kahan.shape[0],
            STOCHASTIC=cfg.stochastic_rounding,
            num_warps=plan.num_warps,
            num_stages=plan.num_stages,
        )
        prep.dx += dx_parts[:groups].sum(dim=0)
        start += n
