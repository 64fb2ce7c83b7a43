"""The screened path: a GEMM with a threshold epilogue over label ranges of growing size. Each range's labels that
beat a row's k-th best so far become that row's candidates, merged into its best list after the range; a row whose
candidate slots overflow is recomputed by the running kernel. The choice for up to 127 queries (replayed as a CUDA
graph for few: `CapturedTopk`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from elmo_kernels.topk.config import TensorDescriptor, TopkConfig, descriptors_fit, next_pow2, tile_meta
from elmo_kernels.topk.keys import KEY_EMPTY
from elmo_kernels.topk.running import recompute_flagged
from elmo_kernels.topk.tl_utils import TL_KEY_EMPTY, fold_block, score_keys, score_tile, screen_epilogue


@triton.jit
def _screen_kernel(
    x, w, inv_scale_ptr, dead_ptr, best_ptr, excl_ptr, cand_score_ptr, cand_id_ptr, count_ptr,
    B, first_label, end_label, D, num_qblocks, E, cap, kth,
    stride_xb, stride_wl, stride_eb, stride_bb, stride_cb,
    BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, FP8_DOTS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_EXCL: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
    USE_DESC: tl.constexpr, GATE: tl.constexpr, HAS_DEAD: tl.constexpr,
):  # fmt: skip
    """One (query block, label tile) job per program, scored and screened (`screen_epilogue`). x and w are
    pointers, or tensor descriptors with USE_DESC.
    (H200, B = 1024, k = 5, against 7.3 / 5.9 ms: a persistent grid was slower, with one nested loop per job 9.9 ms,
    with Triton's warp specialisation 8.2-14.9, with one flat loop over (job, D chunk) 6.9-16.8 with the row gate.)"""
    job = tl.program_id(0)
    qb = job % num_qblocks  # consecutive jobs share a label tile: its weights come from HBM once, then from L2
    tile = job // num_qblocks
    rows = qb * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    s, labs, lab_ok = score_tile(
        x, w, inv_scale_ptr, dead_ptr, rows, row_ok, qb * BLOCK_B, first_label + tile * BLOCK_L, end_label, D,
        stride_xb, stride_wl, BLOCK_B, BLOCK_L, BLOCK_D, FP8_DOTS, HAS_SCALE, EVEN_D, UPCAST, USE_DESC, USE_DESC,
        HAS_DEAD,
    )  # fmt: skip
    screen_epilogue(
        s, rows, row_ok, labs, lab_ok, best_ptr, excl_ptr, cand_score_ptr, cand_id_ptr, count_ptr, E, cap, kth,
        stride_eb, stride_bb, stride_cb, HAS_EXCL, GATE,
    )  # fmt: skip


@triton.jit
def _merge_kernel(
    best_ptr,
    cand_score_ptr,
    cand_id_ptr,
    count_ptr,
    k,
    cap,
    stride_bb,
    stride_cb,
    KP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One query row: its k best keys (sorted descending, in place) merged with the keys of its filled candidate
    slots, BLOCK at a time (the best KP of each block, then the best KP of both lists)."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, KP)
    best = tl.load(best_ptr + b * stride_bb + cols, mask=cols < k, other=TL_KEY_EMPTY)
    filled = tl.minimum(tl.load(count_ptr + b), cap)
    for start in range(0, filled, BLOCK):
        slot = start + tl.arange(0, BLOCK)
        ok = slot < filled
        sc = tl.load(cand_score_ptr + b * stride_cb + slot, mask=ok, other=0.0)
        ids = tl.load(cand_id_ptr + b * stride_cb + slot, mask=ok, other=0)
        best = fold_block(best, tl.where(ok, score_keys(sc, ids), TL_KEY_EMPTY), KP, BLOCK)
    tl.store(best_ptr + b * stride_bb + cols, best, mask=cols < k)


def merge_candidates(best, cand_score, cand_id, counts, cap: int, block: int, num_warps: int) -> None:
    """best (B, k) sorted keys, in place: each row's best k of them and of its filled candidate slots (counts (B,)
    int32, at most `cap` read), folded `block` candidates at a time by one program per row."""
    B, k = best.shape
    kp = max(16, next_pow2(k))  # tl.join / tl.topk need a few elements on the GPU (k = 1 failed to compile)
    _merge_kernel[(B,)](
        best, cand_score, cand_id, counts, k, cap, best.stride(0), cand_score.stride(0),
        KP=kp, BLOCK=max(kp, block), num_warps=num_warps,
    )  # fmt: skip


def resolve_screen_config(cfg: TopkConfig, B: int, D: int, weight_bytes: int, k: int) -> TopkConfig:
    """Launch options of the screening kernel: a plain GEMM tile with a light epilogue."""
    # H200 sweeps (benchmarks/topk.py, BENCHMARKS.md), B = 1024, k = 5, through descriptors: 64 x 128 x 128 tiles,
    # 4 warps, 4 stages: 7.3 ms; 128 x 128 (8 warps) 10.8, 64 x 256 (8 warps) 11.0, 128 x 64 8.0, 5 stages 12.0.
    # With the row gate and the append in two halves: many queries run 3 stages under a 128-register cap (3 programs
    # per SM instead of 2), and 64-label tiles for long lists (fewer rows and labels share a tile that takes the append
    # branch): B = 1024, k = 5 / 100: 5.46 / 8.33 ms vs 5.90 / 8.87 (4 stages, no cap); 128 x 128 tiles (8 warps,
    # capped) 5.45 / 9.72; B = 256: 1.58 / 2.31 vs 1.64 / 2.50.
    block_b = cfg.block_b or (16 if B <= 16 else 32 if B <= 32 else 64)
    block_l = cfg.block_l or (64 if B >= 256 and k > 16 else 128)
    block_d = cfg.block_d or max(16, min(128 // weight_bytes, next_pow2(D)))
    num_warps = cfg.num_warps or (4 if block_b * block_l <= 64 * 128 else 8)
    num_stages = cfg.num_stages or (3 if B >= 256 else 4)
    maxnreg = cfg.maxnreg or (128 if B >= 256 and block_b * block_l <= 64 * 128 else None)
    # Many queries: ranges growing at most 2x keep most tiles free of hits (H200, B = 1024, k = 100: 10.6 ms vs 11.0
    # at 4x, 12.5 at 8x); 4x at B = 256, where 2x's extra launches cost the host more (eager k = 5: 2.98 vs 1.98 ms).
    # A short first range makes its merge (all of its labels) cheap: 512 labels for few queries (CUDA graph, B = 1,
    # k = 5: 0.55 vs 0.58 ms with 4096), 1024 for many (B = 1024, k = 5: 7.06 vs 7.27 ms).
    growth = cfg.screen_growth or (2.0 if B >= 512 else 4.0 if B >= 256 else None)
    first = cfg.screen_first or (1024 if B >= 256 else 512)
    # Row gate on by default: B = 1024, k = 5 / 100: 5.9 / 9.8 ms vs 6.9 / 10.3; B = 64: 0.65 vs 0.70 ms (k = 5).
    gate = cfg.gate if cfg.gate is not None else True
    return TopkConfig(
        block_b, block_l, block_d, None, None, num_warps, num_stages, cfg.max_partial_bytes, True, None, growth,
        first, cfg.tma, cfg.merge_warps, cfg.merge_block, gate, maxnreg,
    )  # fmt: skip


def screen_levels(
    k: int, num_labels: int, cap: int, growth: float | None = None, first: int | None = None
) -> list[tuple[int, int]]:
    """Label ranges scored one after another by the screened path.

    The first range holds `first` labels (at most `cap`; default `cap`), all candidates: fewer make its merge cheaper
    at the price of more ranges. Each later range is sized so that, with labels in random order, about cap/4 of its
    labels beat the k-th best of everything before it (k * size / before): the ranges grow geometrically, by at most
    `growth` (fewer hits per range: fewer tiles take the append branch). A short tail is folded into the range before
    it.
    """
    bounds = [0, min(num_labels, cap, first or cap)]
    while bounds[-1] < num_labels:
        before = bounds[-1]
        size = before * cap // (4 * k)
        if growth is not None:
            size = min(size, int(before * (growth - 1)))
        end = before + max(1, size)
        if num_labels - end < (end - before) // 2:
            end = num_labels
        bounds.append(min(end, num_labels))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def screen_cap(cfg: TopkConfig, B: int, k: int) -> int | None:
    """Candidate slots per row for the screened path, or None when it should not be used."""
    if cfg.screen is False:
        return None
    if cfg.screen_cap is not None:
        if cfg.screen_cap < 1:
            raise ValueError(f"screen_cap must be >= 1, got {cfg.screen_cap}")
        return max(cfg.screen_cap, k)
    # Half of the extra-memory budget for the candidate slots (8 bytes: fp32 score + int32 id), the rest for the
    # fallback's partial lists.
    cap = 1 << max(0, (cfg.max_partial_bytes // (2 * 8 * B)).bit_length() - 1)
    # Level 0 fills every slot, and one program per row merges them. Up to 8 queries, 2048 slots: shorter ranges, and
    # merges of fewer candidates (H200 CUDA graphs, B = 1 / 2 / 8: k = 5 0.530 / 0.535 / 0.542 ms vs 0.540 / 0.538 /
    # 0.551 with 4096; k = 100 0.582 / 0.596 / 0.615 vs 0.591 / 0.596 / 0.617).
    cap = min(cap, 2048 if B <= 8 else 4096)
    if cfg.screen is None and (cap < 8 * k or B <= 32 and k <= 16):
        # Few queries with short lists: called eagerly, the screened path's launches (two per label range, ~17 at
        # B = 1) cost the host more than the GPU work (H200, B = 1, k = 5, when it was ~30: 1.5 ms vs 0.87 for the
        # running kernel); `CapturedTopk` replays it instead.
        return None
    return max(cap, k)


def topk_screened(xq, inv_scale, weights, k, num_labels, exclude, fp8_dots, cfg: TopkConfig, cap: int, dead=None):
    """Exact top-k as a GEMM with a threshold epilogue, over label ranges of growing size (`screen_levels`).

    After each range, the row's threshold is the score of its k-th best label so far: a label of a later range can
    only enter the top-k by scoring strictly above it, and only such labels are written (as keys) to the row's
    candidate list. A row whose list overflows `cap` in some range is recomputed whole by the running top-k kernel
    (launched for every call but idle unless a row overflowed: no host synchronisation).
    """
    B, D = xq.shape
    for name, v in (("merge_block", cfg.merge_block), ("merge_warps", cfg.merge_warps)):
        if v is not None and (v < 1 or v & (v - 1)):
            raise ValueError(f"{name} must be a power of two, got {v}")
    c = resolve_screen_config(cfg, B, D, weights.element_size(), k)
    dev = xq.device
    has_excl = exclude is not None
    if B * cap >= 2**31:
        raise ValueError(f"screen_cap too large: {B} x {cap} candidate slots (the kernel indexes them in int32)")
    levels = screen_levels(k, num_labels, cap, c.screen_growth, c.screen_first)
    best = torch.full((B, k), KEY_EMPTY, dtype=torch.int64, device=dev)
    cand_score = torch.empty((B, cap), dtype=torch.float32, device=dev)
    cand_id = torch.empty((B, cap), dtype=torch.int32, device=dev)
    counts = torch.zeros((len(levels), B), dtype=torch.int32, device=dev)
    qblocks = triton.cdiv(B, c.block_b)
    excl = exclude if has_excl else counts
    use_desc = bool(c.tma) and descriptors_fit(xq, weights)
    x_arg, w_arg = xq, weights
    if use_desc:
        x_arg = TensorDescriptor.from_tensor(xq, [c.block_b, c.block_d])
        w_arg = TensorDescriptor.from_tensor(weights, [c.block_l, c.block_d])
    for i, (lo, hi) in enumerate(levels):
        _screen_kernel[(qblocks * triton.cdiv(hi - lo, c.block_l),)](
            x_arg, w_arg, inv_scale, dead if dead is not None else counts, best, excl, cand_score, cand_id, counts[i],
            B, lo, hi, D, qblocks, excl.shape[1] if has_excl else 0, cap, k - 1,
            xq.stride(0), weights.stride(0), excl.stride(0) if has_excl else 0, best.stride(0), cand_score.stride(0),
            USE_DESC=use_desc, GATE=c.gate, **tile_meta(c, D, fp8_dots, has_excl, dead is not None),
        )  # fmt: skip
        # 8 merge warps: H200 CUDA graphs, k = 100, B = 1 / 8 / 64: 0.592 / 0.612 / 0.953 ms vs 0.605 / 0.628 / 0.970
        # with 4; 16 warps, blocks of 256 or 1024-2048 candidates: no better.
        block = cfg.merge_block or min(512, next_pow2(cap))
        merge_candidates(best, cand_score, cand_id, counts[i], cap, block, cfg.merge_warps or 8)
    overflow = (counts > cap).any(dim=0).to(torch.int32)
    budget = cfg.max_partial_bytes // 2
    return recompute_flagged(best, overflow, xq, inv_scale, weights, k, num_labels, exclude, fp8_dots, budget, dead)
