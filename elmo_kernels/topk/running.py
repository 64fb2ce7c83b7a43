"""The running top-k path: each program keeps its query rows' best k keys so far while it streams the label tiles
of one label range (a split), and the partial lists are merged at the end. The choice for small eager batches, and
the others' fallback (`recompute_flagged`: the rows their candidate slots could not answer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from elmo_kernels.topk.config import TopkConfig, next_pow2, tile_meta
from elmo_kernels.topk.tl_utils import (
    TL_KEY_EMPTY,
    TL_KEY_FILLER_MAX,
    TL_KEY_FULL,
    fold_block,
    score_keys,
    score_tile,
    valid_pairs,
)


@triton.jit
def _insert_candidates(R, key, rounds):
    """Few candidates: extract the tile's keys best first and let each replace the row minimum of R when larger.

    The top-KEEP of (R U tile) holds at most KEEP tile keys, all extracted within `rounds` = min(candidates, KEEP).
    """
    for _ in range(rounds):
        c = tl.max(key, axis=1)
        thr = tl.min(R, axis=1)
        R = tl.where((R == thr[:, None]) & (c > thr)[:, None], c[:, None], R)
        key = tl.where(key == c[:, None], TL_KEY_EMPTY, key)
    return R


@triton.jit
def _merge_bitonic(R, key, fillers, KEEP: tl.constexpr, KP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr):
    """Many candidates (the first tiles): one bitonic top-KP of the running list joined with the tile's best KP."""
    if BLOCK_L == KP:
        best = key
    else:
        best = tl.topk(key, KP)
    both = tl.reshape(tl.join(tl.where(R == TL_KEY_FULL, TL_KEY_EMPTY, R), best), (BLOCK_B, 2 * KP))
    merged = tl.topk(both, KP)  # sorted descending: slots [0, KEEP) are the new top-KEEP
    # Fillers and empty keys that survived become distinct fillers again; slots >= KEEP stay full.
    merged = tl.where(merged > TL_KEY_FILLER_MAX, merged, fillers[None, :])
    cols = tl.arange(0, KP)
    return tl.where(cols[None, :] < KEEP, merged, TL_KEY_FULL)


@triton.jit
def _running_topk(
    x_ptr, w_ptr, inv_scale_ptr, dead_ptr, excl_ptr, part_ptr, rows, row_ok, split, lo, hi, D, E,
    stride_xb, stride_wl, stride_eb, stride_pb, stride_ps,
    KEEP: tl.constexpr, KP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    SORT_MIN: tl.constexpr, FP8_DOTS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_EXCL: tl.constexpr,
    EVEN_D: tl.constexpr, UPCAST: tl.constexpr, HAS_DEAD: tl.constexpr,
):  # fmt: skip
    cols = tl.arange(0, KP)
    fillers = TL_KEY_EMPTY + 1 + cols.to(tl.int64)
    # Running top-KEEP per query row, kept as an unordered set of keys in slots [0, KEEP); slots >= KEEP hold KEY_FULL.
    # Empty slots hold distinct fillers, so "the slot equal to the row minimum" is always exactly one slot.
    R = tl.zeros((BLOCK_B, KP), dtype=tl.int64) + tl.where(cols < KEEP, fillers, TL_KEY_FULL)[None, :]

    for start in range(lo, hi, BLOCK_L):
        s, labs, lab_ok = score_tile(
            x_ptr, w_ptr, inv_scale_ptr, dead_ptr, rows, row_ok, 0, start, hi, D, stride_xb, stride_wl,
            BLOCK_B, BLOCK_L, BLOCK_D, FP8_DOTS, HAS_SCALE, EVEN_D, UPCAST, False, False, HAS_DEAD,
        )  # fmt: skip
        key = score_keys(s, labs[None, :])
        valid = valid_pairs(rows, row_ok, labs, lab_ok, excl_ptr, stride_eb, E, HAS_EXCL)
        key = tl.where(valid, key, TL_KEY_EMPTY)

        # Only keys above the row's current KEEP-th best can enter the list: after a few tiles there are almost none.
        thr = tl.min(R, axis=1)
        cand = key > thr[:, None]
        nmax = tl.max(tl.sum(cand.to(tl.int32), axis=1))
        if SORT_MIN > 0:
            if nmax >= SORT_MIN:
                R = _merge_bitonic(R, key, fillers, KEEP, KP, BLOCK_B, BLOCK_L)
            else:
                R = _insert_candidates(R, tl.where(cand, key, TL_KEY_EMPTY), tl.minimum(nmax, KEEP))
        else:
            R = _insert_candidates(R, tl.where(cand, key, TL_KEY_EMPTY), tl.minimum(nmax, KEEP))

    out_ptrs = part_ptr + rows[:, None].to(tl.int64) * stride_pb + split.to(tl.int64) * stride_ps + cols[None, :]
    tl.store(out_ptrs, R, mask=row_ok[:, None] & (cols[None, :] < KEEP))


@triton.jit
def _topk_kernel(
    x_ptr,
    w_ptr,
    inv_scale_ptr,
    dead_ptr,
    excl_ptr,
    part_ptr,
    flag_ptr,
    B,
    num_labels,
    D,
    labels_per_split,
    num_qblocks,
    E,
    stride_xb,
    stride_wl,
    stride_eb,
    stride_pb,
    stride_ps,
    KEEP: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SORT_MIN: tl.constexpr,
    FP8_DOTS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_EXCL: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
    HAS_DEAD: tl.constexpr,
    HAS_FLAG: tl.constexpr,
):
    # Program (query block qb, label split): consecutive programs share a split, so the weight tiles they stream are
    # read from HBM once and served from L2 to the other query blocks.
    pid = tl.program_id(0)
    qb = pid % num_qblocks
    split = pid // num_qblocks
    rows = qb * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    lo = split * labels_per_split
    hi = tl.minimum(lo + labels_per_split, num_labels)
    # With a flag vector (the screened path's overflow rows), only query blocks holding a flagged row do any work.
    if HAS_FLAG:
        run = tl.max(tl.load(flag_ptr + rows, mask=row_ok, other=0), axis=0) > 0
    else:
        run = True
    if run:
        _running_topk(
            x_ptr, w_ptr, inv_scale_ptr, dead_ptr, excl_ptr, part_ptr, rows, row_ok, split, lo, hi, D, E,
            stride_xb, stride_wl, stride_eb, stride_pb, stride_ps,
            KEEP, KP, BLOCK_B, BLOCK_L, BLOCK_D, SORT_MIN, FP8_DOTS, HAS_SCALE, HAS_EXCL, EVEN_D, UPCAST, HAS_DEAD,
        )  # fmt: skip


@triton.jit
def _replace_flagged_kernel(
    best_ptr, part_ptr, flag_ptr, k, n, stride_bb, stride_pb, KP: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    """One query row: if flagged, its k best keys become the best k of its n partial-list keys, BLOCK at a time;
    an unflagged row is left as it is."""
    b = tl.program_id(0).to(tl.int64)
    flagged = tl.load(flag_ptr + b) != 0
    cols = tl.arange(0, KP)
    best = tl.full((KP,), TL_KEY_EMPTY, tl.int64)
    for start in range(0, tl.where(flagged, n, 0), BLOCK):
        pos = start + tl.arange(0, BLOCK)
        best = fold_block(best, tl.load(part_ptr + b * stride_pb + pos, mask=pos < n, other=TL_KEY_EMPTY), KP, BLOCK)
    tl.store(best_ptr + b * stride_bb + cols, best, mask=cols < tl.where(flagged, k, 0))


def _resolve_config(cfg: TopkConfig, B: int, D: int, k: int, num_labels: int, device: torch.device) -> TopkConfig:
    """Launch options of the running top-k kernel."""
    kp = next_pow2(k)
    # Defaults from the H200 sweeps of benchmarks/topk.py (BENCHMARKS.md): 64-wide D chunks everywhere; narrow label
    # tiles for few queries with long lists; 128-query blocks when the lists are short (k <= 16) and the batch is
    # large; a deeper pipeline for few queries.
    big_b = B >= 256 and kp <= 16
    block_b = cfg.block_b or (128 if big_b else 64 if B >= 64 else 32 if B >= 32 else 16)
    block_l = cfg.block_l or (64 if B <= 32 and kp > 16 else 128)
    block_d = cfg.block_d or max(16, min(64, next_pow2(D)))
    sort_min = cfg.sort_min if cfg.sort_min is not None else (max(16, kp // 4) if block_l >= kp >= 16 else 0)
    qblocks = triton.cdiv(B, block_b)
    tiles = triton.cdiv(num_labels, block_l)
    if cfg.splits:
        splits = cfg.splits
    else:
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3
        splits = triton.cdiv(target, qblocks)
        splits = min(splits, max(1, cfg.max_partial_bytes // (8 * B * k)))
    splits = max(1, min(splits, tiles))
    num_warps = cfg.num_warps or (8 if block_b >= 32 or kp >= 512 else 4)
    num_stages = cfg.num_stages or (4 if B <= 32 else 3)
    return TopkConfig(block_b, block_l, block_d, splits, sort_min, num_warps, num_stages, cfg.max_partial_bytes, False)


def topk_running(xq, inv_scale, weights, k, num_labels, exclude, fp8_dots, cfg: TopkConfig, dead=None) -> torch.Tensor:
    """Sorted top-k keys (B, k) from the running top-k kernel; dead: (num_labels,) uint8 or None."""
    part = _running_parts(xq, inv_scale, weights, k, num_labels, exclude, fp8_dots, cfg, dead=dead)
    keys = part.view(part.shape[0], -1)
    if part.shape[1] > 1:
        return torch.topk(keys, k, dim=1).values
    return keys.sort(dim=1, descending=True).values


def _running_parts(xq, inv_scale, weights, k, num_labels, exclude, fp8_dots, cfg: TopkConfig, flag=None, dead=None):
    """Partial top-k key lists (B, splits, k) of the running top-k kernel, one per label range (unsorted); with
    `flag` (B,) int32, only rows in query blocks holding a flagged row are computed."""
    B, D = xq.shape
    c = _resolve_config(cfg, B, D, k, num_labels, xq.device)
    tiles = triton.cdiv(num_labels, c.block_l)
    labels_per_split = triton.cdiv(tiles, c.splits) * c.block_l
    splits = triton.cdiv(num_labels, labels_per_split)
    qblocks = triton.cdiv(B, c.block_b)
    part = torch.empty((B, splits, k), dtype=torch.int64, device=xq.device)
    has_excl = exclude is not None
    excl = exclude if has_excl else part
    _topk_kernel[(qblocks * splits,)](
        xq,
        weights,
        inv_scale,
        dead if dead is not None else part,
        excl,
        part,
        flag if flag is not None else part,
        B,
        num_labels,
        D,
        labels_per_split,
        qblocks,
        excl.shape[1] if has_excl else 0,
        xq.stride(0),
        weights.stride(0),
        excl.stride(0) if has_excl else 0,
        part.stride(0),
        part.stride(1),
        KEEP=k,
        KP=next_pow2(k),
        SORT_MIN=c.sort_min,
        HAS_FLAG=flag is not None,
        **tile_meta(c, D, fp8_dots, has_excl, dead is not None),
    )
    return part


def recompute_flagged(
    best, flag, xq, inv_scale, weights, k, num_labels, exclude, fp8_dots, partial_bytes: int, dead=None
):  # fmt: skip
    """best (B, k) keys with the rows flagged (B,) int32 replaced by the running kernel's exact answer. The kernel is
    launched every call but computes only query blocks holding a flagged row (no host synchronisation)."""
    B = best.shape[0]
    kp = max(16, next_pow2(k))
    fallback = TopkConfig(splits=max(1, min(16, partial_bytes // (8 * B * k))))  # partial lists within the bytes
    part = _running_parts(xq, inv_scale, weights, k, num_labels, exclude, fp8_dots, fallback, flag=flag, dead=dead)
    # The flagged rows' best lists become the top-k of their partial lists; the others are left alone (no torch.topk
    # over every row: at B = 1, k = 100 it took 22 us of GPU time, 44-45 at B = 2-64).
    _replace_flagged_kernel[(B,)](
        best, part, flag, k, part.shape[1] * k, best.stride(0), part.stride(0),
        KP=kp, BLOCK=max(kp, min(512, next_pow2(part.shape[1] * k))), num_warps=4,
    )  # fmt: skip
    return best
