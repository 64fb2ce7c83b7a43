"""The fused head step: one persistent kernel per slice of the head, W read from DRAM once and written once.

The head is cut into super-chunks of `sc_rows` labels, small enough (`FusedPlan.sc_bytes`) that one stays in L2
while the next is read. Launch k runs two roles side by side, on disjoint rows:
  role A (programs [0, num_a)): logits and gradient of super-chunk k. Each program takes the label blocks
     pid, pid + num_a, ... in turn: Z = X W^T over all of D (W from DRAM, X from L2), G = sigmoid(Z) - Y with the
     exclusions, and stores G (quantised, both layouts) into ring slot k % 2: B x sc_rows, never B x L.
  role B (the other programs, num_groups x D-tiles): dX and the update of super-chunk k - 1, whose W tiles role
     A of the previous launch has just pulled into L2. Program (group, tile) owns one D-tile and the label blocks
     group, group + num_groups, ...: for each it loads G, G^T and the old W tile once, accumulates dX += G W in
     registers (W before its update), forms G^T X for the tile and stores the rounded new W (and Kahan rows) once.
     Its dX tile is added to its own partial dx_parts[group] at the end of the launch; the partials are summed on
     the host in a fixed order, so dX has the same bits on every run whatever the schedule.
Role B of launch k reads only what role A of launch k - 1 wrote (ring slot (k - 1) % 2) and rows no role A of
launch k touches, so no program ever waits for another, and stream order is the only synchronisation. The first
launch has only role A, the last only role B.

Why not all of D in one program: with B = 128 and D = 768 one program's dX partial is B x D fp32 = 384 KiB,
more than an SM holds (256 KiB of registers, 228 KiB of shared memory); splitting D across programs keeps each
partial in registers, and the L2 window between the two roles keeps W's DRAM traffic at one read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from elmo_kernels import head_step_utils as hsu
from elmo_kernels.common import GRAD_FP8_SCALE, TL_DTYPES, interpreting
from elmo_kernels.rounding import random_u16


@triton.jit(
    do_not_specialize=[
        "num_a",
        "a_woff",
        "a_valid",
        "a_offset",
        "a_block0",
        "b_woff",
        "b_valid",
        "b_offset",
        "b_kahan_row0",
    ]
)
def _fused_step_kernel(
    x_ptr,
    xt_ptr,
    wa_ptr,
    ga_ptr,
    gta_ptr,
    pos_row_ptr,
    pos_col_ptr,
    pos_start_ptr,
    ex_row_ptr,
    ex_col_ptr,
    ex_start_ptr,
    loss_ptr,
    wb_ptr,
    gb_ptr,
    gtb_ptr,
    kahan_ptr,
    dx_part_ptr,
    B,
    D,
    num_a,
    a_woff,
    a_valid,
    a_offset,
    a_block0,
    b_woff,
    b_valid,
    b_offset,
    b_kahan_row0,
    num_kahan,
    num_groups,
    seed,
    grad_coef,
    decay_coef,
    grad_scale_inv,
    stride_xb,
    stride_xtd,
    stride_wal,
    stride_wbl,
    stride_gb,
    stride_gtl,
    stride_kl,
    stride_dxg,
    stride_dxb,
    BLOCK_B: tl.constexpr,
    BLOCK_LA: tl.constexpr,
    BLOCK_DA: tl.constexpr,
    BLOCK_LB: tl.constexpr,
    BLOCK_DB: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    HOT_DTYPE: tl.constexpr,
    G_FP8: tl.constexpr,
    W_DTYPE: tl.constexpr,
    KAHAN_DTYPE: tl.constexpr,
    HAS_KAHAN: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    COMPUTE_LOSS: tl.constexpr,
    HAS_EXCLUDE: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < num_a:
        # Role A: G of super-chunk "a" (local labels 0 .. a_valid) into its ring slot.
        wa = wa_ptr + tl.multiple_of(a_woff, 16)  # a super-chunk starts at a multiple of 64 rows
        for blk in range(pid, tl.cdiv(a_valid, BLOCK_LA), num_a):
            labels = blk * BLOCK_LA + tl.arange(0, BLOCK_LA)
            gt = hsu.block_gradient(
                x_ptr,
                wa,
                pos_row_ptr,
                pos_col_ptr,
                pos_start_ptr + a_block0 + blk,
                ex_row_ptr,
                ex_col_ptr,
                ex_start_ptr + a_block0 + blk,
                loss_ptr,
                labels,
                B,
                D,
                a_valid,
                a_offset,
                stride_xb,
                stride_wal,
                BLOCK_B,
                BLOCK_DA,
                BLOCK_P,
                DOT_DTYPE,
                HOT_DTYPE,
                COMPUTE_LOSS,
                HAS_EXCLUDE,
            )
            hsu.store_gradient(
                gt, ga_ptr, gta_ptr, labels, B, a_valid, a_offset, seed, stride_gb, stride_gtl, BLOCK_B, G_FP8
            )
    else:
        # Role B: dX and the update of super-chunk "b", one D-tile, the label blocks of one group.
        b = pid - num_a
        num_dtiles = tl.cdiv(D, BLOCK_DB)
        tile = b % num_dtiles
        group = b // num_dtiles
        rows = tl.arange(0, BLOCK_B)
        row_ok = rows < B
        d = tile * BLOCK_DB + tl.arange(0, BLOCK_DB)
        d_ok = d < D
        xt = tl.load(xt_ptr + d[:, None] * stride_xtd + rows[None, :], mask=d_ok[:, None] & row_ok[None, :], other=0.0)
        wb = wb_ptr + tl.multiple_of(b_woff, 16)
        acc = tl.zeros((BLOCK_B, BLOCK_DB), dtype=tl.float32)
        for blk in range(group, tl.cdiv(b_valid, BLOCK_LB), num_groups):
            labels = blk * BLOCK_LB + tl.arange(0, BLOCK_LB)
            label_ok = labels < b_valid
            g = tl.load(
                gb_ptr + rows[:, None] * stride_gb + labels[None, :],
                mask=row_ok[:, None] & label_ok[None, :],
                other=0.0,
            )
            gt = tl.load(
                gtb_ptr + labels[:, None] * stride_gtl + rows[None, :],
                mask=label_ok[:, None] & row_ok[None, :],
                other=0.0,
            )
            w = tl.load(
                wb + labels[:, None].to(tl.int64) * stride_wbl + d[None, :],
                mask=label_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            acc = hsu.mma(g, w, acc, DOT_DTYPE)  # dX sees W before its update
            dw = hsu.mma(gt, tl.trans(xt), tl.zeros((BLOCK_LB, BLOCK_DB), dtype=tl.float32), DOT_DTYPE)
            hsu.update_tile(
                wb,
                kahan_ptr,
                w.to(tl.float32),
                dw,
                random_u16(seed, b_offset + labels, d),
                labels,
                d,
                b_valid,
                num_kahan,
                b_kahan_row0,
                grad_coef,
                decay_coef,
                D,
                stride_wbl,
                stride_kl,
                W_DTYPE,
                KAHAN_DTYPE,
                HAS_KAHAN,
                STOCHASTIC,
            )
        # This program alone owns dx_parts[group][:, tile]; launches run in stream order: a plain read-add-write.
        dx_ptrs = dx_part_ptr + group * stride_dxg + rows[:, None] * stride_dxb + d[None, :]
        dx_mask = row_ok[:, None] & d_ok[None, :]
        tl.store(dx_ptrs, tl.load(dx_ptrs, mask=dx_mask, other=0.0) + acc * grad_scale_inv, mask=dx_mask)


@dataclass(frozen=True)
class FusedPlan:
    block_b: int
    block_la: int  # role A: labels per block, D per step of the logits loop
    block_da: int
    block_lb: int  # role B: labels per block, D-tile width
    block_db: int
    num_a: int  # role A programs per launch
    num_groups: int  # role B label groups (x D-tiles = role B programs per launch)
    sc_bytes: int  # weight bytes per super-chunk: one should stay in L2 while the next streams in
    num_warps: int = 8
    num_stages: int = 3


def fused_plan(batch: int, dim: int, fp8_dots: bool, num_sms: int) -> FusedPlan:
    """Block shapes and program counts of the fused kernel (first guesses, swept by benchmarks/head_step.py)."""
    block_b = max(32 if fp8_dots else 16, triton.next_power_of_2(batch))
    if interpreting():
        bd = min(256, max(16, triton.next_power_of_2(dim)))
        return FusedPlan(block_b, 64, bd, 64, bd, 1, 1, 128 * dim, num_warps=4, num_stages=1)
    big_b = block_b > 128
    block_db = 128 if fp8_dots and not big_b else 64
    dtiles = triton.cdiv(dim, block_db)
    num_a = max(1, num_sms // 4)
    num_groups = max(1, (num_sms - num_a) // dtiles)
    return FusedPlan(
        block_b=block_b,
        block_la=64,
        block_da=128 if fp8_dots else 64,
        block_lb=64,
        block_db=block_db,
        num_a=num_a,
        num_groups=num_groups,
        sc_bytes=24 << 20,
    )


def super_chunk_rows(plan: FusedPlan, dim: int, elem_bytes: int) -> int:
    unit = math.lcm(plan.block_la, plan.block_lb)
    return max(unit, plan.sc_bytes // (dim * elem_bytes) // unit * unit)


def fused_step(
    prep: hsu.StepInputs, chunks: list[torch.Tensor], kahan: torch.Tensor | None, plan: FusedPlan | None = None
) -> None:
    """Run the fused kernel over every chunk; dX accumulates into prep.dx, the summed loss into prep.loss."""
    batch, dim = prep.xq.shape
    device = prep.xq.device
    cfg = prep.config
    plan = plan or fused_plan(batch, dim, prep.fp8_dots, prep.num_sms)
    sc_rows = super_chunk_rows(plan, dim, chunks[0].element_size())
    # Super-chunks over the valid rows of every chunk: (chunk, its first label, first row, rows, first block).
    supers, bounds, block_base = [], [], 0
    start = 0
    for w in chunks:
        valid = max(0, min(w.shape[0], prep.num_labels - start))
        if valid:
            offset = prep.label_offset + start
            nblk = triton.cdiv(valid, plan.block_la)
            edges = offset + torch.arange(nblk + 1, device=device) * plan.block_la
            bounds.append(edges.clamp_(max=offset + valid))
            for r0 in range(0, valid, sc_rows):
                supers.append((w, start, r0, min(sc_rows, valid - r0), block_base + r0 // plan.block_la))
            block_base += nblk + 1
        start += w.shape[0]
    pos_start, ex_start = prep.starts_at(torch.cat(bounds))
    g_dtype = torch.float8_e4m3fn if prep.fp8_dots else torch.bfloat16
    g_slots = hsu.empty((2, batch, sc_rows), g_dtype, device)
    gt_slots = hsu.empty((2, sc_rows, batch), g_dtype, device)
    slots = [(g_slots[i], gt_slots[i]) for i in range(2)]
    dtiles = triton.cdiv(dim, plan.block_db)
    dx_parts = torch.zeros((plan.num_groups, batch, dim), dtype=torch.float32, device=device)
    scale_inv = 1.0 / GRAD_FP8_SCALE if prep.fp8_dots else 1.0
    num_kahan = kahan.shape[0] if kahan is not None else 0
    w_dtype = TL_DTYPES[chunks[0].dtype]
    k_dtype = TL_DTYPES[kahan.dtype] if kahan is not None else tl.bfloat16
    stride_w = chunks[0].stride(0)
    for k in range(len(supers) + 1):
        a = supers[k] if k < len(supers) else None
        b = supers[k - 1] if k > 0 else None
        num_a = plan.num_a if a is not None else 0
        num_b = plan.num_groups * dtiles if b is not None else 0
        wa, a_start, a_r0, a_valid, a_block0 = a if a is not None else (chunks[0], 0, 0, 0, 0)
        wb, b_start, b_r0, b_valid, _ = b if b is not None else (chunks[0], 0, 0, 0, 0)
        ga, gta = slots[k % 2]
        gb, gtb = slots[(k - 1) % 2]
        _fused_step_kernel[(num_a + num_b,)](
            prep.xq,
            prep.xt,
            wa,
            ga,
            gta,
            prep.pos_rows,
            prep.pos_cols,
            pos_start,
            prep.ex_rows,
            prep.ex_cols,
            ex_start,
            prep.loss,
            wb,
            gb,
            gtb,
            kahan if kahan is not None else wb,
            dx_parts,
            batch,
            dim,
            num_a,
            a_r0 * stride_w,
            a_valid,
            prep.label_offset + a_start + a_r0,
            a_block0,
            b_r0 * stride_w,
            b_valid,
            prep.label_offset + b_start + b_r0,
            b_start + b_r0,
            num_kahan,
            plan.num_groups,
            cfg.seed,
            -cfg.lr * scale_inv,
            -cfg.lr * cfg.weight_decay,
            scale_inv,
            prep.xq.stride(0),
            prep.xt.stride(0),
            stride_w,
            stride_w,
            ga.stride(0),
            gta.stride(0),
            kahan.stride(0) if kahan is not None else 0,
            dx_parts.stride(0),
            dx_parts.stride(1),
            BLOCK_B=plan.block_b,
            BLOCK_LA=plan.block_la,
            BLOCK_DA=plan.block_da,
            BLOCK_LB=plan.block_lb,
            BLOCK_DB=plan.block_db,
            BLOCK_P=16,
            DOT_DTYPE=prep.dot_dtype,
            HOT_DTYPE=prep.hot_dtype,
            G_FP8=prep.fp8_dots,
            W_DTYPE=w_dtype,
            KAHAN_DTYPE=k_dtype,
            HAS_KAHAN=kahan is not None,
            STOCHASTIC=cfg.stochastic_rounding,
            COMPUTE_LOSS=cfg.compute_loss,
            HAS_EXCLUDE=prep.has_exclude,
            num_warps=plan.num_warps,
            num_stages=plan.num_stages,
        )
    prep.dx += dx_parts.sum(dim=0)
