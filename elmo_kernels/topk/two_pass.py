"""The two-pass path, for many queries: tile maxima first (a plain GEMM), then only the label tiles that may hold
a row's top-k label, each read once for the rows that chose it; one merge per row, and the running kernel for the
rows the tiles could not answer. The default from B = 128 on heads of >= 64 k tiles (`two_pass_tiles`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from elmo_kernels.common import round_up
from elmo_kernels.topk.config import (
    TWO_PASS_BLOCK_L,
    TensorDescriptor,
    TopkConfig,
    descriptors_fit,
    next_pow2,
    tile_meta,
)
from elmo_kernels.topk.keys import KEY_EMPTY
from elmo_kernels.topk.running import recompute_flagged
from elmo_kernels.topk.screened import merge_candidates, resolve_screen_config
from elmo_kernels.topk.tl_utils import TL_KEY_EMPTY, fold_block, score_keys, score_tile, screen_epilogue, valid_pairs


@triton.jit
def _tile_max_kernel(
    x, w, inv_scale_ptr, dead_ptr, excl_ptr, max_ptr, B, num_labels, D, num_qblocks, num_jobs, E, stride_xb, stride_wl,
    stride_eb, stride_mb, BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, FP8_DOTS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_EXCL: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
    USE_DESC: tl.constexpr, HAS_DEAD: tl.constexpr,
):  # fmt: skip
    """The two-pass path's first pass: each query row's largest score in each label tile (excluded, dead and padding
    labels count as -inf), scored exactly as `_screen_kernel` scores the same tile. Program p takes the (query block,
    tile) jobs p, p + programs, ...: one job each on a grid of num_jobs, or persistent on a grid of one program per SM
    (the loads of the next job overlap the epilogue of this one)."""
    for job in tl.range(tl.program_id(0), num_jobs, tl.num_programs(0), flatten=True):
        qb = job % num_qblocks  # consecutive jobs share a label tile: its weights come from HBM once, then from L2
        tile = job // num_qblocks
        rows = qb * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        s, labs, lab_ok = score_tile(
            x, w, inv_scale_ptr, dead_ptr, rows, row_ok, qb * BLOCK_B, tile * BLOCK_L, num_labels, D,
            stride_xb, stride_wl, BLOCK_B, BLOCK_L, BLOCK_D, FP8_DOTS, HAS_SCALE, EVEN_D, UPCAST, USE_DESC, USE_DESC,
            HAS_DEAD,
        )  # fmt: skip
        # Masks only where needed (they cost GEMM time): exclusions, dead rows (in any tile: a dead row's score must
        # not raise the tile maximum that chooses tiles and sets thresholds), the last tile's padding labels. Rows past
        # B are not stored. A NaN score is skipped by the max unless the whole row of the tile is NaN; then the row's
        # candidates fall short and the caller recomputes it.
        if HAS_EXCL:
            s = tl.where(valid_pairs(rows, row_ok, labs, lab_ok, excl_ptr, stride_eb, E, HAS_EXCL), s, float("-inf"))
        elif HAS_DEAD:
            s = tl.where(lab_ok[None, :], s, float("-inf"))
        elif (tile + 1) * BLOCK_L > num_labels:
            s = tl.where(lab_ok[None, :], s, float("-inf"))
        tl.store(max_ptr + rows.to(tl.int64) * stride_mb + tile, tl.max(s, axis=1), mask=row_ok)


@triton.jit
def _kth_largest_kernel(
    max_ptr, out_ptr, key_ptr, tiles, k, row_cap, stride_mb,
    GROUP: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row: the k-th largest maximum of its groups of GROUP tile maxima (-inf if fewer; the row holds a multiple of
    GROUP values, -inf past `tiles`; torch.topk took ~170 us over 1024 x 11K values, a torch max over the groups
    ~95 us), and the screening threshold key that passes the scores >= it less a relative 2^-14 (the key of the next
    float below that), or KEY_EMPTY (take every label) where it is not finite from below (-inf, NaN). out_ptr gets
    the threshold the tiles are chosen by: the k-th largest, or +inf (no tile) where more than row_cap of the row's
    tile maxima reach it (ties; such a row gets no candidate and is recomputed)."""
    b = tl.program_id(0).to(tl.int64)
    best = tl.full((KP,), float("-inf"), tl.float32)
    groups = tl.cdiv(tiles, GROUP)
    for start in range(0, groups, BLOCK):
        g = start + tl.arange(0, BLOCK)
        offs = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        m = tl.load(max_ptr + b * stride_mb + offs, mask=g[:, None] < groups, other=float("-inf"))
        best = fold_block(best, tl.max(m, axis=1), KP, BLOCK)
    kth = tl.sum(tl.where(tl.arange(0, KP) == k - 1, best, 0.0))
    chosen = tl.zeros((), dtype=tl.int32)
    for start in range(0, tiles, BLOCK * GROUP):
        pos = start + tl.arange(0, BLOCK * GROUP)
        m = tl.load(max_ptr + b * stride_mb + pos, mask=pos < tiles, other=float("-inf"))
        chosen += tl.sum(((m >= kth) & (pos < tiles)).to(tl.int32), axis=0)
    tl.store(out_ptr + b, tl.where(chosen > row_cap, float("inf"), kth))
    # The second pass keeps the scores >= kth less a relative 2^-14: it may sum a label's score in another order
    # than this pass did (other dot shapes, a ragged last D chunk), and a row whose k-th score sits on its tile
    # maximum must not miss the threshold by an ulp and fall short. The merge still takes the exact top k.
    low = kth - tl.abs(kth) * 0.00006103515625
    bits = low.to(tl.int32, bitcast=True)
    below_bits = tl.where(low > 0, bits - 1, tl.where(low < 0, bits + 1, -2147483647))  # 0: -(smallest subnormal)
    key = score_keys(below_bits.to(tl.float32, bitcast=True), tl.zeros((), dtype=tl.int64))
    tl.store(key_ptr + b, tl.where((kth == float("-inf")) | (kth != kth), TL_KEY_EMPTY, key))


@triton.jit
def _tile_rows_kernel(
    max_ptr, kth_ptr, count_ptr, start_ptr, rows_out_ptr, B, tiles, stride_mb,
    BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr,
):  # fmt: skip
    """The (row, tile) pairs where a row's tile maximum reaches its threshold, by tile. Without FILL: count_ptr[t] +=
    the rows of this block that chose tile t. With FILL (count_ptr zeroed): their ids are written to rows_out_ptr from
    start_ptr[t] on, after those that other blocks placed first (one atomic per tile hands out the range)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    t = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    kth = tl.load(kth_ptr + rows, mask=row_ok, other=float("inf"))
    m = tl.load(
        max_ptr + rows[:, None].to(tl.int64) * stride_mb + t[None, :],
        mask=row_ok[:, None] & (t[None, :] < tiles), other=float("-inf"),
    )  # fmt: skip
    hit = ((m >= kth[:, None]) & row_ok[:, None]).to(tl.int32)
    n = tl.sum(hit, axis=0)
    base = tl.atomic_add(count_ptr + t, n, mask=(t < tiles) & (n > 0), sem="relaxed")
    if FILL:
        start = tl.load(start_ptr + t, mask=t < tiles, other=0)
        pos = (start + base)[None, :] + tl.cumsum(hit, axis=0) - 1
        tl.store(rows_out_ptr + pos, rows[:, None] + 0 * pos, mask=hit > 0)


@triton.jit
def _tile_jobs_kernel(
    count_ptr, start_ptr, job_tile_ptr, job_first_ptr, job_rows_ptr, tiles, rows_per_job, CHUNK: tl.constexpr
):  # fmt: skip
    """One program: where each tile's rows start in the pair list (an exclusive prefix sum of the counts), and the
    second pass's jobs, rows_per_job rows of one tile each, in tile order: job_tile (-1 past the last job, set by the
    caller), the job's first pair and its number of rows."""
    pairs = tl.zeros((), dtype=tl.int32)
    jobs = tl.zeros((), dtype=tl.int32)
    for t0 in range(0, tiles, CHUNK):
        t = t0 + tl.arange(0, CHUNK)
        c = tl.load(count_ptr + t, mask=t < tiles, other=0)
        nj = (c + rows_per_job - 1) // rows_per_job
        first = pairs + tl.cumsum(c, axis=0) - c
        job0 = jobs + tl.cumsum(nj, axis=0) - nj
        tl.store(start_ptr + t, first, mask=t < tiles)
        for r in range(0, tl.max(nj, axis=0)):
            ok = r < nj
            tl.store(job_tile_ptr + job0 + r, t, mask=ok)
            tl.store(job_first_ptr + job0 + r, first + r * rows_per_job, mask=ok)
            tl.store(job_rows_ptr + job0 + r, tl.minimum(c - r * rows_per_job, rows_per_job), mask=ok)
        pairs += tl.sum(c, axis=0)
        jobs += tl.sum(nj, axis=0)


@triton.jit
def _tile_rows_screen_kernel(
    x, w, inv_scale_ptr, dead_ptr, thr_ptr, excl_ptr, cand_score_ptr, cand_id_ptr, count_ptr,
    job_tile_ptr, job_first_ptr, job_rows_ptr, pair_rows_ptr, num_labels, D, E, cap,
    stride_xb, stride_wl, stride_eb, stride_cb, SUB: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, FP8_DOTS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_EXCL: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
    W_DESC: tl.constexpr, GATE: tl.constexpr, HAS_DEAD: tl.constexpr,
):  # fmt: skip
    """The two-pass path's second pass: program p scores part p % SUB (BLOCK_L labels) of the first-pass tile of job
    p // SUB against the job's rows (gathered: the rows that chose the tile), and appends the labels at or above each
    row's threshold as candidates (`screen_epilogue`). w is a tensor descriptor with W_DESC, else a pointer."""
    job = tl.program_id(0) // SUB
    tile = tl.load(job_tile_ptr + job)
    if tile < 0:
        return
    slot = tl.arange(0, BLOCK_B)
    row_ok = slot < tl.load(job_rows_ptr + job)
    rows = tl.load(pair_rows_ptr + tl.load(job_first_ptr + job) + slot, mask=row_ok, other=0)
    lab0 = (tile * SUB + tl.program_id(0) % SUB) * BLOCK_L
    s, labs, lab_ok = score_tile(
        x, w, inv_scale_ptr, dead_ptr, rows, row_ok, 0, lab0, num_labels, D, stride_xb, stride_wl,
        BLOCK_B, BLOCK_L, BLOCK_D, FP8_DOTS, HAS_SCALE, EVEN_D, UPCAST, False, W_DESC, HAS_DEAD,
    )  # fmt: skip
    screen_epilogue(
        s, rows, row_ok, labs, lab_ok, thr_ptr, excl_ptr, cand_score_ptr, cand_id_ptr, count_ptr, E, cap, 0,
        stride_eb, 1, stride_cb, HAS_EXCL, GATE,
    )  # fmt: skip


def two_pass_tiles(cfg: TopkConfig, B: int, k: int, num_labels: int) -> int | None:
    """Label tiles of the two-pass path, or None when it should not be used (see `topk_two_pass`)."""
    tiles = triton.cdiv(num_labels, cfg.block_l or TWO_PASS_BLOCK_L)
    # Extra memory: the tile maxima (4 bytes per row and tile) and the candidate slots (8 bytes each) within 7/8 of
    # the budget; the rest for the pair lists and the fallback's partial lists.
    need = B * round_up(tiles, 16) * 4 + B * _two_pass_cap(k) * 8
    fits = need <= cfg.max_partial_bytes * 7 // 8 and k <= tiles
    if cfg.two_pass is not None:
        if cfg.two_pass and not fits:
            raise ValueError(
                f"two_pass: {B} x {tiles} tile maxima and the candidate slots exceed 7/8 of max_partial_bytes, "
                "or k > tiles"
            )
        return tiles if cfg.two_pass else None
    # Default where measured faster (H200, 2.8M labels; BENCHMARKS.md): from B = 128. CUDA graphs, k = 5 / 100:
    # B = 1024 3.64 / 4.19 ms vs 5.45 / 8.15 for the screened path, B = 256 1.00 / 1.46 vs 1.55 / 2.33, B = 128 0.71 /
    # 1.09 vs 1.02 / 1.52 (eager 1.27 / 1.43 vs 1.25 / 1.53); B = 96 is faster as a graph but slower eager at k = 5
    # (1.30 vs 1.07 ms: host-bound launches), B = 64 slower (graphs 0.77 / 1.02 vs 0.63 / 0.91). Heads of 64 k tiles
    # or more: measured on 2.8M labels only, and the first pass's GEMM must dwarf the selection.
    return tiles if fits and B >= 128 and tiles >= 64 * k else None


def _two_pass_cap(k: int) -> int:
    """Candidate slots per row of the two-pass path: its threshold passes about k labels (ties aside)."""
    return max(64, next_pow2(4 * k))


def _resolve_two_pass_config(cfg: TopkConfig, D: int, weight_bytes: int) -> TopkConfig:
    """Launch options of the first pass (large tiles: a plain GEMM with a light epilogue)."""
    return TopkConfig(
        block_b=cfg.block_b or 128,
        block_l=cfg.block_l or TWO_PASS_BLOCK_L,
        block_d=cfg.block_d or max(16, min(128 // weight_bytes, next_pow2(D))),
        num_warps=cfg.num_warps or 8,
        num_stages=cfg.num_stages or 3,
        tma=cfg.tma,
    )


def topk_two_pass(xq, inv_scale, weights, k, num_labels, exclude, fp8_dots, cfg: TopkConfig, tiles: int, dead=None):
    """Exact top-k in two passes over the head, for many queries.

    First pass: a plain GEMM whose epilogue keeps each row's largest score per label tile (B x tiles floats; no
    branch, no atomics, so large tiles run near GEMM speed). The k-th largest of a row's tile maxima is a score that k
    distinct labels reach, so the row's k-th best score is at least that threshold, and each of its top-k labels lies
    in a tile whose maximum reaches it: the row chooses those tiles (about k). Second pass, by tile: each chosen tile
    is read once and scored against the rows that chose it, gathered in jobs of up to 64 rows (the weights of a tile
    chosen by 9 rows are read once, not once per 64-row query block), and the labels at or above a row's threshold
    are its candidates; one merge per row. Both passes chunk D alike, which is what fixes a score (module docstring):
    the tile shapes do not change it (H200, 2.8M labels: the same ids as the screened path on every row). A row whose
    tile maxima tie past 2k + 16 tiles, or whose candidates overflow or fall short of k, is recomputed by the running
    top-k kernel, as in `topk_screened`. No host synchronisation: every buffer has a size known in advance.
    """
    B, D = xq.shape
    c1 = _resolve_two_pass_config(cfg, D, weights.element_size())
    half = TopkConfig(block_b=max(16, c1.block_b // 2), block_l=max(16, c1.block_l // 2), block_d=c1.block_d)
    c2 = resolve_screen_config(
        TopkConfig(**{**vars(half), "tma": cfg.tma, "gate": cfg.gate, "maxnreg": cfg.maxnreg}),
        B, D, weights.element_size(), k,
    )  # fmt: skip
    sub = c1.block_l // c2.block_l  # second-pass programs per first-pass tile
    dev = xq.device
    has_excl = exclude is not None
    excl_args = (exclude.shape[1], exclude.stride(0)) if has_excl else (0, 0)
    # Tiles per group: the threshold is taken over group maxima (16x fewer values to select from), where there are
    # groups enough for k (else over the tiles themselves).
    group = 16 if tiles >= 64 * k else 1
    maxes = torch.empty((B, round_up(tiles, group)), dtype=torch.float32, device=dev)
    maxes[:, tiles:] = float("-inf")
    excl = exclude if has_excl else maxes
    has_dead = dead is not None
    dead_arg = dead if has_dead else maxes
    descriptors = bool(cfg.tma) and descriptors_fit(xq, weights)

    q1 = triton.cdiv(B, c1.block_b)
    x_arg, w_arg = xq, weights
    if descriptors:
        x_arg = TensorDescriptor.from_tensor(xq, [c1.block_b, c1.block_d])
        w_arg = TensorDescriptor.from_tensor(weights, [c1.block_l, c1.block_d])
    # Persistent by default: H200, B = 1024, k = 5 / 100, CUDA graphs: 3.64 / 4.19 ms vs 4.85 / 5.20 with one program
    # per job (first pass 3.53 / 3.36 ms vs 4.54 / 4.41); B = 256: 1.00 / 1.46 vs 1.26 / 1.74.
    persistent = cfg.persistent is not False
    if not persistent:
        programs = q1 * tiles
    else:  # one program per SM (3 under the interpreter: each loops over several jobs)
        programs = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 3
    _tile_max_kernel[(min(programs, q1 * tiles),)](
        x_arg, w_arg, inv_scale, dead_arg, excl, maxes, B, num_labels, D, q1, q1 * tiles, excl_args[0],
        xq.stride(0), weights.stride(0), excl_args[1], maxes.stride(0),
        USE_DESC=descriptors, **tile_meta(c1, D, fp8_dots, has_excl, has_dead),
    )  # fmt: skip
    # The threshold: the k-th largest maximum of groups of tiles. k groups reach it, so k distinct labels do: the row's
    # k-th best score is at least that (a little below the k-th tile maximum at most; 16x less to select from).
    kp = max(16, next_pow2(k))
    kth = torch.empty(B, dtype=torch.float32, device=dev)
    thr = torch.empty((B, 1), dtype=torch.int64, device=dev)  # the screening epilogue's threshold, as a key
    row_cap = 2 * k + 16  # chosen tiles per row at most (about k without ties)
    block = max(kp, min(4096 // group, next_pow2(triton.cdiv(tiles, group))))
    _kth_largest_kernel[(B,)](
        maxes, kth, thr, tiles, k, row_cap, maxes.stride(0), GROUP=group, KP=kp, BLOCK=block, num_warps=4
    )
    # The chosen (row, tile) pairs by tile, and the jobs over them: counts, offsets, then the rows themselves.
    counters = torch.zeros(2 * tiles + B, dtype=torch.int32, device=dev)
    tile_count, fill, counts = counters[:tiles], counters[tiles : 2 * tiles], counters[2 * tiles :]
    start = torch.empty(tiles, dtype=torch.int32, device=dev)
    pair_rows = torch.empty(B * row_cap, dtype=torch.int32, device=dev)
    rows_per_job = c2.block_b
    max_jobs = triton.cdiv(B * row_cap, rows_per_job) + tiles  # sum over tiles of ceil(rows / rows_per_job)
    job_tile = torch.full((max_jobs,), -1, dtype=torch.int32, device=dev)
    job_first = torch.empty(max_jobs, dtype=torch.int32, device=dev)
    job_rows = torch.empty(max_jobs, dtype=torch.int32, device=dev)
    grid = (triton.cdiv(B, 64), triton.cdiv(tiles, 256))
    _tile_rows_kernel[grid](
        maxes, kth, tile_count, start, pair_rows, B, tiles, maxes.stride(0), BLOCK_B=64, CHUNK=256, FILL=False
    )
    _tile_jobs_kernel[(1,)](
        tile_count, start, job_tile, job_first, job_rows, tiles, rows_per_job, CHUNK=4096, num_warps=8
    )
    _tile_rows_kernel[grid](
        maxes, kth, fill, start, pair_rows, B, tiles, maxes.stride(0), BLOCK_B=64, CHUNK=256, FILL=True
    )
    cap = _two_pass_cap(k)
    cand_score = torch.empty((B, cap), dtype=torch.float32, device=dev)
    cand_id = torch.empty((B, cap), dtype=torch.int32, device=dev)
    w_arg = TensorDescriptor.from_tensor(weights, [c2.block_l, c2.block_d]) if descriptors else weights
    _tile_rows_screen_kernel[(max_jobs * sub,)](
        xq, w_arg, inv_scale, dead_arg, thr, excl, cand_score, cand_id, counts, job_tile, job_first, job_rows,
        pair_rows, num_labels, D, excl_args[0], cap, xq.stride(0), weights.stride(0), excl_args[1],
        cand_score.stride(0),
        SUB=sub, W_DESC=descriptors, GATE=c2.gate, **tile_meta(c2, D, fp8_dots, has_excl, has_dead),
    )  # fmt: skip
    best = torch.full((B, k), KEY_EMPTY, dtype=torch.int64, device=dev)
    merge_candidates(best, cand_score, cand_id, counts, cap, min(512, cap), cfg.merge_warps or 8)
    # Rows to recompute: candidates past the slots or fewer than k (tiles tied past the row cap, an all-NaN tile row,
    # or fewer than k groups with a finite maximum).
    overflow = ((counts > cap) | (counts < k)).to(torch.int32)
    budget = cfg.max_partial_bytes // 8
    return recompute_flagged(best, overflow, xq, inv_scale, weights, k, num_labels, exclude, fp8_dots, budget, dead)
