"""Exact top-k labels of x @ W^T without materializing the B x L score matrix: three Triton paths (the screened
path: GEMM tiles that keep only labels beating the row's current k-th best, over label ranges of growing size; the
two-pass path for many queries: tile maxima first, then only the tiles that may hold a top-k label, each read once
for the rows that chose it; and a running top-k kernel, the others' fallback and the choice for small eager
batches), a CUDA-graph wrapper, a chunked torch path, a merge for label-sharded heads, and the plain full-logits
reference.

Score definition (shared by every path): score[b, l] = inv_scale[b] * sum_d xq[b, d] * W[l, d], accumulated in fp32
(except that Hopper's fp8 MMA accumulates with fewer mantissa bits: ~0.2% score error measured at D = 768, so paths
with different D chunks can order near-ties differently; each ranks its own scores exactly), where
xq = `prepare_queries(x, ...)` is exactly what the kernel multiplies:
- fp8 dots (fp8 weights on an sm_89+ GPU, or `fp8_dot=True`): each query row is scaled by a power of two s_b so that
  max|x_b| * s_b <= 448, rounded to float8_e4m3fn (nearest), and inv_scale = 1 / s_b (exact);
- otherwise: xq = x rounded to bf16 for fp8/bf16 weights (fp32 for fp32 weights), inv_scale = 1.

Ranking: scores descending, equal scores by the lower label id (-0.0 counts as +0.0, NaN as -inf). Both are encoded
in one sortable int64 key, (monotone int32 image of the fp32 score bits) << 32 | (2^32 - 1 - id), so that "largest
key" means "best label" and every key is distinct; ids must stay below 2^32 - 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

try:  # host-side tensor descriptors (TMA); older tritons lack them and keep the pointer loads
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed triton
    TensorDescriptor = None

# Sentinels. Real keys are >= (monotone image of -inf) << 32 = -2139095041 * 2^32 > KEY_EMPTY + 2^32, so both
# KEY_EMPTY (padded / excluded / masked entries) and the distinct fillers KEY_EMPTY + 1 + j of the running list sort
# below every real key. KEY_FULL marks running-list slots past `k`, which are never the minimum and never replaced.
KEY_EMPTY = -(2**63) + 2**20
KEY_FULL = 2**63 - 1
_KEY_EMPTY = tl.constexpr(KEY_EMPTY)
_KEY_FULL = tl.constexpr(KEY_FULL)
_KEY_FILLER_MAX = tl.constexpr(KEY_EMPTY + 2**19)
KEY_REAL_MIN = -2139095041 * 2**32  # the key of (-inf, the largest id): every real key is >= this
_KEY_REAL_MIN = tl.constexpr(KEY_REAL_MIN)

FP8_MAX = 448.0
WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.bfloat16, torch.float32)
QUERY_DTYPES = (torch.bfloat16, torch.float32)
MAX_LABELS = 2**32 - 2
DEFAULT_MAX_PARTIAL_BYTES = 64 * 2**20
TWO_PASS_BLOCK_L = 256  # labels per first-pass tile of the two-pass path (one tile maximum per row each)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _insert_candidates(R, key, rounds):
    """Few candidates: extract the tile's keys best first and let each replace the row minimum of R when larger.

    The top-KEEP of (R U tile) holds at most KEEP tile keys, all extracted within `rounds` = min(candidates, KEEP).
    """
    for _ in range(rounds):
        c = tl.max(key, axis=1)
        thr = tl.min(R, axis=1)
        R = tl.where((R == thr[:, None]) & (c > thr)[:, None], c[:, None], R)
        key = tl.where(key == c[:, None], _KEY_EMPTY, key)
    return R


@triton.jit
def _merge_bitonic(R, key, fillers, KEEP: tl.constexpr, KP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr):
    """Many candidates (the first tiles): one bitonic top-KP of the running list joined with the tile's best KP."""
    if BLOCK_L == KP:
        best = key
    else:
        best = tl.topk(key, KP)
    both = tl.reshape(tl.join(tl.where(R == _KEY_FULL, _KEY_EMPTY, R), best), (BLOCK_B, 2 * KP))
    merged = tl.topk(both, KP)  # sorted descending: slots [0, KEEP) are the new top-KEEP
    # Fillers and empty keys that survived become distinct fillers again; slots >= KEEP stay full.
    merged = tl.where(merged > _KEY_FILLER_MAX, merged, fillers[None, :])
    cols = tl.arange(0, KP)
    return tl.where(cols[None, :] < KEEP, merged, _KEY_FULL)


@triton.jit
def _accumulate(acc, xt, wt, FP8_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """acc + xt (BLOCK_B, BLOCK_D) @ wt (BLOCK_D, BLOCK_L): fp8 x fp8 tensor-core dots, or wt in the queries' dtype."""
    if UPCAST:
        # The interpreter's tl.dot on bf16 multiplies raw bit patterns (triton issue 11584): use fp32, which holds
        # every bf16/fp8 value exactly, with IEEE products.
        return tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
    if FP8_DOT:
        return tl.dot(xt, wt, acc)
    return tl.dot(xt, wt.to(xt.dtype), acc)


@triton.jit
def _score_tile(
    x_ptr, w, inv_scale, rows, row_ok, labs, lab_ok, lab0, D, stride_xb, stride_wl,
    BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, FP8_DOT: tl.constexpr,
    HAS_SCALE: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, W_DESC: tl.constexpr,
):  # fmt: skip
    """fp32 scores of a (query block, label tile): the one place scores are computed, so every kernel ranks the same
    numbers. The query rows (any rows: gathered ones too) by pointers; the labels lab0.. by pointers, or through a
    tensor descriptor w with W_DESC (TMA on Hopper; labels and D columns past the head's end read as zeros)."""
    acc = tl.zeros((BLOCK_B, BLOCK_L), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xb + ds[None, :]
        if EVEN_D:
            xt = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
        else:  # a ragged last chunk: the row ends at D (past the last row, the tensor does)
            xt = tl.load(x_ptrs, mask=row_ok[:, None] & (ds[None, :] < D), other=0.0)
        if W_DESC:
            wt = tl.trans(w.load([lab0, d0]))
        else:
            w_ptrs = w + labs[None, :].to(tl.int64) * stride_wl + ds[:, None]
            if EVEN_D:
                wt = tl.load(w_ptrs, mask=lab_ok[None, :], other=0.0)
            else:
                wt = tl.load(w_ptrs, mask=lab_ok[None, :] & (ds[:, None] < D), other=0.0)
        acc = _accumulate(acc, xt, wt, FP8_DOT, UPCAST)
    if HAS_SCALE:
        acc = acc * inv_scale[:, None]
    return acc


@triton.jit
def _score_keys(s, labs):
    """Sortable int64 keys of scores s and label ids labs (broadcast against s). Scores are made canonical first:
    -0.0 -> +0.0 (ties at zero fall to the id rule), NaN -> -inf. High word: the monotone int32 image of the fp32
    bits (negatives get their magnitude bits flipped, so two's complement order matches float order); low word: the
    inverted id (among equal scores the lower id is larger)."""
    s = tl.where(s == 0.0, 0.0, s)
    s = tl.where(s != s, float("-inf"), s)
    bits = s.to(tl.int32, bitcast=True)
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (mono.to(tl.int64) << 32) | (0xFFFFFFFF - labs.to(tl.int64))


@triton.jit
def _key_score(key):
    """The fp32 score of a key (inverse of the high word of `_score_keys`)."""
    mono = (key >> 32).to(tl.int32)
    return (mono ^ ((mono >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _valid_pairs(rows, row_ok, labs, lab_ok, excl_ptr, stride_eb, E, HAS_EXCL: tl.constexpr):
    valid = row_ok[:, None] & lab_ok[None, :]
    if HAS_EXCL:
        for e in range(E):
            ex = tl.load(excl_ptr + rows.to(tl.int64) * stride_eb + e, mask=row_ok, other=-1)
            valid = valid & (labs[None, :] != ex[:, None])
    return valid


@triton.jit
def _running_topk(
    x_ptr, w_ptr, inv_scale, excl_ptr, part_ptr, rows, row_ok, split, lo, hi, D, E,
    stride_xb, stride_wl, stride_eb, stride_pb, stride_ps,
    KEEP: tl.constexpr, KP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    SORT_MIN: tl.constexpr, FP8_DOT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_EXCL: tl.constexpr,
    EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    cols = tl.arange(0, KP)
    fillers = _KEY_EMPTY + 1 + cols.to(tl.int64)
    # Running top-KEEP per query row, kept as an unordered set of keys in slots [0, KEEP); slots >= KEEP hold KEY_FULL.
    # Empty slots hold distinct fillers, so "the slot equal to the row minimum" is always exactly one slot.
    R = tl.zeros((BLOCK_B, KP), dtype=tl.int64) + tl.where(cols < KEEP, fillers, _KEY_FULL)[None, :]

    for start in range(lo, hi, BLOCK_L):
        labs = start + tl.arange(0, BLOCK_L)
        lab_ok = labs < hi
        s = _score_tile(
            x_ptr, w_ptr, inv_scale, rows, row_ok, labs, lab_ok, start, D, stride_xb, stride_wl,
            BLOCK_B, BLOCK_L, BLOCK_D, FP8_DOT, HAS_SCALE, EVEN_D, UPCAST, False,
        )  # fmt: skip
        key = _score_keys(s, labs[None, :])
        valid = _valid_pairs(rows, row_ok, labs, lab_ok, excl_ptr, stride_eb, E, HAS_EXCL)
        key = tl.where(valid, key, _KEY_EMPTY)

        # Only keys above the row's current KEEP-th best can enter the list: after a few tiles there are almost none.
        thr = tl.min(R, axis=1)
        cand = key > thr[:, None]
        nmax = tl.max(tl.sum(cand.to(tl.int32), axis=1))
        if SORT_MIN > 0:
            if nmax >= SORT_MIN:
                R = _merge_bitonic(R, key, fillers, KEEP, KP, BLOCK_B, BLOCK_L)
            else:
                R = _insert_candidates(R, tl.where(cand, key, _KEY_EMPTY), tl.minimum(nmax, KEEP))
        else:
            R = _insert_candidates(R, tl.where(cand, key, _KEY_EMPTY), tl.minimum(nmax, KEEP))

    out_ptrs = part_ptr + rows[:, None].to(tl.int64) * stride_pb + split.to(tl.int64) * stride_ps + cols[None, :]
    tl.store(out_ptrs, R, mask=row_ok[:, None] & (cols[None, :] < KEEP))


@triton.jit
def _topk_kernel(
    x_ptr,
    w_ptr,
    inv_scale_ptr,
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
    FP8_DOT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_EXCL: tl.constexpr,
    EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr,
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
    if HAS_SCALE:
        inv_scale = tl.load(inv_scale_ptr + rows, mask=row_ok, other=1.0)
    else:
        inv_scale = tl.full((BLOCK_B,), 1.0, tl.float32)
    # With a flag vector (the screened path's overflow rows), only query blocks holding a flagged row do any work.
    if HAS_FLAG:
        run = tl.max(tl.load(flag_ptr + rows, mask=row_ok, other=0), axis=0) > 0
    else:
        run = True
    if run:
        _running_topk(
            x_ptr, w_ptr, inv_scale, excl_ptr, part_ptr, rows, row_ok, split, lo, hi, D, E,
            stride_xb, stride_wl, stride_eb, stride_pb, stride_ps,
            KEEP, KP, BLOCK_B, BLOCK_L, BLOCK_D, SORT_MIN, FP8_DOT, HAS_SCALE, HAS_EXCL, EVEN_D, UPCAST,
        )  # fmt: skip


@triton.jit
def _score_tile_desc(
    x_desc, w_desc, inv_scale, row0, lab0, D,
    BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, FP8_DOT: tl.constexpr,
    HAS_SCALE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """`_score_tile` with the tiles fetched through tensor descriptors (TMA on Hopper); rows, labels and D columns
    past the tensors' ends read as zeros."""
    acc = tl.zeros((BLOCK_B, BLOCK_L), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        xt = x_desc.load([row0, d0])
        wt = w_desc.load([lab0, d0])
        acc = _accumulate(acc, xt, tl.trans(wt), FP8_DOT, UPCAST)
    if HAS_SCALE:
        acc = acc * inv_scale[:, None]
    return acc


@triton.jit
def _job_scores(
    x, w, inv_scale_ptr, rows, row_ok, labs, lab_ok, row0, lab0, D, stride_xb, stride_wl,
    BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, FP8_DOT: tl.constexpr,
    HAS_SCALE: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, USE_DESC: tl.constexpr,
    W_DESC: tl.constexpr,
):  # fmt: skip
    """Scores of one (query block, label tile) job: x and w both tensor descriptors with USE_DESC (the query block
    rows row0..), else x by pointers (`rows`, which may be gathered) and w a descriptor with W_DESC or pointers."""
    if HAS_SCALE:
        inv_scale = tl.load(inv_scale_ptr + rows, mask=row_ok, other=1.0)
    else:
        inv_scale = tl.full((BLOCK_B,), 1.0, tl.float32)
    if USE_DESC:
        s = _score_tile_desc(
            x, w, inv_scale, row0, lab0, D, BLOCK_B, BLOCK_L, BLOCK_D, FP8_DOT, HAS_SCALE, UPCAST
        )  # fmt: skip
    else:
        s = _score_tile(
            x, w, inv_scale, rows, row_ok, labs, lab_ok, lab0, D, stride_xb, stride_wl,
            BLOCK_B, BLOCK_L, BLOCK_D, FP8_DOT, HAS_SCALE, EVEN_D, UPCAST, W_DESC,
        )  # fmt: skip
    return s


@triton.jit
def _screen_epilogue(
    s, rows, row_ok, labs, lab_ok, best_ptr, excl_ptr, cand_score_ptr, cand_id_ptr, count_ptr, E, cap, kth,
    stride_eb, stride_bb, stride_cb, HAS_EXCL: tl.constexpr, GATE: tl.constexpr,
):  # fmt: skip
    """Append (score, id) of every label of the scored tile s that beats its row's threshold to that row's candidate
    slots; the row counters count on past `cap` (overflow)."""
    # Threshold: the score of the row's k-th best key so far. Strictly above it: that label has a lower id than every
    # label here, so an equal score ranks below it (and NaN never passes). No k-th key yet: take every valid label.
    kth_key = tl.load(best_ptr + rows.to(tl.int64) * stride_bb + kth, mask=row_ok, other=_KEY_EMPTY)
    take_all = kth_key < _KEY_REAL_MIN
    thr = _key_score(kth_key)
    if GATE:
        # One max per row first: most tiles have no hit, and the full-tile test below is skipped for them. A NaN
        # row maximum (NaN scores) takes the full test too, which ignores NaN. Rows past B never count.
        row_max = tl.max(s, axis=1)
        go = tl.max((((row_max > thr) | (row_max != row_max) | take_all) & row_ok).to(tl.int32), axis=0) > 0
    else:
        go = True
    if go:
        # Two halves (even and odd label columns) one after the other: a slot index per element of the whole tile took
        # ~220-250 registers per thread, a half's ~165-175 (and 128 without spilling under `maxnreg`).
        s_even, s_odd = tl.split(tl.reshape(s, (s.shape[0], s.shape[1] // 2, 2)))
        labs_even, labs_odd = tl.split(tl.reshape(labs, (labs.shape[0] // 2, 2)))
        ok_even, ok_odd = tl.split(tl.reshape(lab_ok, (lab_ok.shape[0] // 2, 2)))
        _append_hits(
            s_even, thr, take_all, rows, row_ok, labs_even, ok_even, excl_ptr, cand_score_ptr, cand_id_ptr, count_ptr,
            E, cap, stride_eb, stride_cb, HAS_EXCL,
        )  # fmt: skip
        _append_hits(
            s_odd, thr, take_all, rows, row_ok, labs_odd, ok_odd, excl_ptr, cand_score_ptr, cand_id_ptr, count_ptr,
            E, cap, stride_eb, stride_cb, HAS_EXCL,
        )  # fmt: skip


@triton.jit
def _append_hits(
    s, thr, take_all, rows, row_ok, labs, lab_ok, excl_ptr, cand_score_ptr, cand_id_ptr, count_ptr, E, cap,
    stride_eb, stride_cb, HAS_EXCL: tl.constexpr,
):  # fmt: skip
    """Append (score, id) of every valid label of s (rows x labs) above its row's threshold to the row's slots."""
    hit = (s > thr[:, None]) | take_all[:, None]
    hit = hit & _valid_pairs(rows, row_ok, labs, lab_ok, excl_ptr, stride_eb, E, HAS_EXCL)
    if tl.max(tl.max(hit.to(tl.int32), axis=1), axis=0) > 0:
        # One atomic per hit hands out its slot; almost every element is masked off. Relaxed: only the count must be
        # atomic (the slots are read by a later launch). Offsets in int32 (B * cap < 2**31, checked by the caller):
        # fewer registers in this branch. (H200: one atomic per row and tile placed by a prefix sum was slower.)
        slot = tl.atomic_add(count_ptr + rows[:, None] + 0 * labs[None, :], 1, mask=hit, sem="relaxed")
        keep = hit & (slot < cap)
        offs = rows[:, None] * stride_cb + slot
        tl.store(cand_score_ptr + offs, s, mask=keep)
        tl.store(cand_id_ptr + offs, labs[None, :] + 0 * slot, mask=keep)


@triton.jit
def _screen_kernel(
    x, w, inv_scale_ptr, best_ptr, excl_ptr, cand_score_ptr, cand_id_ptr, count_ptr,
    B, first_label, end_label, D, num_qblocks, E, cap, kth,
    stride_xb, stride_wl, stride_eb, stride_bb, stride_cb,
    BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, FP8_DOT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_EXCL: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
    USE_DESC: tl.constexpr, GATE: tl.constexpr,
):  # fmt: skip
    """One (query block, label tile) job per program, scored and screened (`_screen_epilogue`). x and w are
    pointers, or tensor descriptors with USE_DESC.
    (H200, B = 1024, k = 5, against 7.3 / 5.9 ms: a persistent grid was slower, with one nested loop per job 9.9 ms,
    with Triton's warp specialisation 8.2-14.9, with one flat loop over (job, D chunk) 6.9-16.8 with the row gate.)"""
    job = tl.program_id(0)
    qb = job % num_qblocks  # consecutive jobs share a label tile: its weights come from HBM once, then from L2
    tile = job // num_qblocks
    rows = qb * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    labs = first_label + tile * BLOCK_L + tl.arange(0, BLOCK_L)
    lab_ok = labs < end_label
    s = _job_scores(
        x, w, inv_scale_ptr, rows, row_ok, labs, lab_ok, qb * BLOCK_B, first_label + tile * BLOCK_L, D,
        stride_xb, stride_wl, BLOCK_B, BLOCK_L, BLOCK_D, FP8_DOT, HAS_SCALE, EVEN_D, UPCAST, USE_DESC, False,
    )  # fmt: skip
    _screen_epilogue(
        s, rows, row_ok, labs, lab_ok, best_ptr, excl_ptr, cand_score_ptr, cand_id_ptr, count_ptr, E, cap, kth,
        stride_eb, stride_bb, stride_cb, HAS_EXCL, GATE,
    )  # fmt: skip


@triton.jit
def _tile_max_kernel(
    x, w, inv_scale_ptr, excl_ptr, max_ptr, B, num_labels, D, num_qblocks, num_jobs, E, stride_xb, stride_wl,
    stride_eb, stride_mb, BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, FP8_DOT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_EXCL: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
    USE_DESC: tl.constexpr,
):  # fmt: skip
    """The two-pass path's first pass: each query row's largest score in each label tile (excluded and padding
    labels count as -inf), scored exactly as `_screen_kernel` scores the same tile. Program p takes the (query block,
    tile) jobs p, p + programs, ...: one job each on a grid of num_jobs, or persistent on a grid of one program per SM
    (the loads of the next job overlap the epilogue of this one)."""
    for job in tl.range(tl.program_id(0), num_jobs, tl.num_programs(0), flatten=True):
        qb = job % num_qblocks  # consecutive jobs share a label tile: its weights come from HBM once, then from L2
        tile = job // num_qblocks
        rows = qb * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        labs = tile * BLOCK_L + tl.arange(0, BLOCK_L)
        lab_ok = labs < num_labels
        s = _job_scores(
            x, w, inv_scale_ptr, rows, row_ok, labs, lab_ok, qb * BLOCK_B, tile * BLOCK_L, D,
            stride_xb, stride_wl, BLOCK_B, BLOCK_L, BLOCK_D, FP8_DOT, HAS_SCALE, EVEN_D, UPCAST, USE_DESC, False,
        )  # fmt: skip
        # Masks only where needed (they cost GEMM time): exclusions, the last tile's padding labels. Rows past B are
        # not stored. A NaN score is skipped by the max unless the whole row of the tile is NaN; then the row's
        # candidates fall short and the caller recomputes it.
        if HAS_EXCL:
            s = tl.where(_valid_pairs(rows, row_ok, labs, lab_ok, excl_ptr, stride_eb, E, HAS_EXCL), s, float("-inf"))
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
    ~95 us), and the screening threshold key that passes exactly the scores >= it: the key of the next float below
    it, or KEY_EMPTY (take every label) where it is not finite from below (-inf, NaN). out_ptr gets the threshold the
    tiles are chosen by: the k-th largest, or +inf (no tile) where more than row_cap of the row's tile maxima reach it
    (ties; such a row gets no candidate and is recomputed)."""
    b = tl.program_id(0).to(tl.int64)
    best = tl.full((KP,), float("-inf"), tl.float32)
    groups = tl.cdiv(tiles, GROUP)
    for start in range(0, groups, BLOCK):
        g = start + tl.arange(0, BLOCK)
        offs = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        m = tl.load(max_ptr + b * stride_mb + offs, mask=g[:, None] < groups, other=float("-inf"))
        best = _fold_block(best, tl.max(m, axis=1), KP, BLOCK)
    kth = tl.sum(tl.where(tl.arange(0, KP) == k - 1, best, 0.0))
    chosen = tl.zeros((), dtype=tl.int32)
    for start in range(0, tiles, BLOCK * GROUP):
        pos = start + tl.arange(0, BLOCK * GROUP)
        m = tl.load(max_ptr + b * stride_mb + pos, mask=pos < tiles, other=float("-inf"))
        chosen += tl.sum(((m >= kth) & (pos < tiles)).to(tl.int32), axis=0)
    tl.store(out_ptr + b, tl.where(chosen > row_cap, float("inf"), kth))
    bits = kth.to(tl.int32, bitcast=True)
    below_bits = tl.where(kth > 0, bits - 1, tl.where(kth < 0, bits + 1, -2147483647))  # 0: -(smallest subnormal)
    key = _score_keys(below_bits.to(tl.float32, bitcast=True), tl.zeros((), dtype=tl.int64))
    tl.store(key_ptr + b, tl.where((kth == float("-inf")) | (kth != kth), _KEY_EMPTY, key))


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
    x, w, inv_scale_ptr, thr_ptr, excl_ptr, cand_score_ptr, cand_id_ptr, count_ptr,
    job_tile_ptr, job_first_ptr, job_rows_ptr, pair_rows_ptr, num_labels, D, E, cap,
    stride_xb, stride_wl, stride_eb, stride_cb, SUB: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, FP8_DOT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_EXCL: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
    W_DESC: tl.constexpr, GATE: tl.constexpr,
):  # fmt: skip
    """The two-pass path's second pass: program p scores part p % SUB (BLOCK_L labels) of the first-pass tile of job
    p // SUB against the job's rows (gathered: the rows that chose the tile), and appends the labels at or above each
    row's threshold as candidates (`_screen_epilogue`). w is a tensor descriptor with W_DESC, else a pointer."""
    job = tl.program_id(0) // SUB
    tile = tl.load(job_tile_ptr + job)
    if tile < 0:
        return
    slot = tl.arange(0, BLOCK_B)
    row_ok = slot < tl.load(job_rows_ptr + job)
    rows = tl.load(pair_rows_ptr + tl.load(job_first_ptr + job) + slot, mask=row_ok, other=0)
    lab0 = (tile * SUB + tl.program_id(0) % SUB) * BLOCK_L
    labs = lab0 + tl.arange(0, BLOCK_L)
    lab_ok = labs < num_labels
    s = _job_scores(
        x, w, inv_scale_ptr, rows, row_ok, labs, lab_ok, 0, lab0, D, stride_xb, stride_wl,
        BLOCK_B, BLOCK_L, BLOCK_D, FP8_DOT, HAS_SCALE, EVEN_D, UPCAST, False, W_DESC,
    )  # fmt: skip
    _screen_epilogue(
        s, rows, row_ok, labs, lab_ok, thr_ptr, excl_ptr, cand_score_ptr, cand_id_ptr, count_ptr, E, cap, 0,
        stride_eb, 1, stride_cb, HAS_EXCL, GATE,
    )  # fmt: skip


@triton.jit
def _fold_block(best, key, KP: tl.constexpr, BLOCK: tl.constexpr):
    """The best KP keys (sorted descending) of a list of KP keys and a block of BLOCK keys."""
    if BLOCK > KP:
        key = tl.topk(key, KP)
    return tl.topk(tl.reshape(tl.join(best, key), (2 * KP,)), KP)


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
    best = tl.load(best_ptr + b * stride_bb + cols, mask=cols < k, other=_KEY_EMPTY)
    filled = tl.minimum(tl.load(count_ptr + b), cap)
    for start in range(0, filled, BLOCK):
        slot = start + tl.arange(0, BLOCK)
        ok = slot < filled
        sc = tl.load(cand_score_ptr + b * stride_cb + slot, mask=ok, other=0.0)
        ids = tl.load(cand_id_ptr + b * stride_cb + slot, mask=ok, other=0)
        best = _fold_block(best, tl.where(ok, _score_keys(sc, ids), _KEY_EMPTY), KP, BLOCK)
    tl.store(best_ptr + b * stride_bb + cols, best, mask=cols < k)


@triton.jit
def _replace_flagged_kernel(
    best_ptr, part_ptr, flag_ptr, k, n, stride_bb, stride_pb, KP: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    """One query row: if flagged, its k best keys become the best k of its n partial-list keys, BLOCK at a time;
    an unflagged row is left as it is."""
    b = tl.program_id(0).to(tl.int64)
    flagged = tl.load(flag_ptr + b) != 0
    cols = tl.arange(0, KP)
    best = tl.full((KP,), _KEY_EMPTY, tl.int64)
    for start in range(0, tl.where(flagged, n, 0), BLOCK):
        pos = start + tl.arange(0, BLOCK)
        best = _fold_block(best, tl.load(part_ptr + b * stride_pb + pos, mask=pos < n, other=_KEY_EMPTY), KP, BLOCK)
    tl.store(best_ptr + b * stride_bb + cols, best, mask=cols < tl.where(flagged, k, 0))


@triton.jit
def _quantize_kernel(x_ptr, xq_ptr, inv_ptr, D, stride_x, stride_q, BLOCK_D: tl.constexpr):
    """One query row of `prepare_queries(x, fp8_dot=True)` in one launch, bit for bit: the power-of-two scale from the
    bits of max|x| and round-to-nearest-even onto the e4m3 grid by integer arithmetic (the interpreter's own fp32 ->
    fp8 conversion is inexact; on-grid values convert exactly everywhere)."""
    b = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + b * stride_x + ds, mask=ds < D, other=0.0).to(tl.float32)))
    top = tl.max(amax, axis=0)
    bits = top.to(tl.int32, bitcast=True)
    biased = (bits >> 23) & 0xFF
    # top = 1.M 2^(biased - 127): e = 135 - biased if 1.M <= 1.75 else 134 - biased (subnormal top: clamped to 126)
    e = tl.where((bits & 0x7FFFFF) <= 0x600000, 135 - biased, 134 - biased)
    e = tl.minimum(tl.maximum(e, -126), 126)
    e = tl.where(top > 0, e, 0)
    scale = ((e + 127) << 23).to(tl.float32, bitcast=True)
    tl.store(inv_ptr + b, ((127 - e) << 23).to(tl.float32, bitcast=True))
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(x_ptr + b * stride_x + ds, mask=ds < D, other=0.0).to(tl.float32) * scale
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        # normals (|v| >= 2^-6): keep 3 mantissa bits, ties to even
        vb = v.to(tl.int32, bitcast=True)
        vb = (vb + 0x7FFFF + ((vb >> 20) & 1)) & -0x100000
        normal = vb.to(tl.float32, bitcast=True)
        # subnormals: multiples of 2^-9, ties to even through the fp32 add of 1.5 * 2^23
        sub = ((v * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
        q = tl.where(tl.abs(v) < 0.015625, sub, normal)
        tl.store(xq_ptr + b * stride_q + ds, q.to(tl.float8e4nv), mask=ds < D)


@triton.jit
def _decode_kernel(key_ptr, score_ptr, id_ptr, n, BLOCK: tl.constexpr):
    """`keys_to_scores` in one launch: fp32 scores and int64 ids of n keys."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    key = tl.load(key_ptr + i, mask=i < n, other=0)
    tl.store(score_ptr + i, _key_score(key), mask=i < n)
    tl.store(id_ptr + i, 0xFFFFFFFF - (key & 0xFFFFFFFF), mask=i < n)


@dataclass
class TopkConfig:
    """Launch options of the Triton path; None picks a default from the shapes (see `_resolve_config`)."""

    block_b: int | None = None  # queries per program (>= 16 for tl.dot)
    block_l: int | None = None  # labels per tile (power of two)
    block_d: int | None = None  # reduction chunk (power of two >= 16)
    splits: int | None = None  # label ranges scored in parallel; the partial lists are B x splits x k keys
    sort_min: int | None = None  # bitonic merge when a tile has >= this many candidates in a row (0: never)
    num_warps: int | None = None
    num_stages: int | None = None
    max_partial_bytes: int = DEFAULT_MAX_PARTIAL_BYTES  # bound on the partial lists when `splits` is automatic
    screen: bool | None = None  # screened path (see `_topk_screened`); None: where the candidate lists fit (k <= cap/8)
    screen_cap: int | None = None  # candidate slots per query row; None: by budget, <= 4096 (<= 2048 for B <= 8)
    screen_growth: float | None = None  # cap on (labels scored so far after a range) / (before it); None: from cap / k
    screen_first: int | None = None  # labels in the first range (all of them candidates), at most cap; None: by B
    tma: bool = True  # screening tiles through tensor descriptors (TMA), where the tensors' strides allow
    merge_warps: int | None = None  # warps of each range's merge program (one per query row); None: 8
    merge_block: int | None = None  # candidates folded at a time by the merge (power of two); None: min(512, cap)
    gate: bool | None = None  # screening: test each row's maximum before the full tile; None: on
    maxnreg: int | None = None  # screening: registers per thread at most (more programs per SM); None: no cap
    persistent: bool | None = None  # two-pass first pass: one program per SM looping over the tiles; None: on
    two_pass: bool | None = None  # tile maxima first, then only the tiles that may hold a top-k label; None: B >= 128,
    # >= 64 k label tiles, where the maxima and candidate slots fit in 7/8 of max_partial_bytes


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _resolve_config(cfg: TopkConfig, B: int, D: int, k: int, num_labels: int, device: torch.device) -> TopkConfig:
    kp = _next_pow2(k)
    # Defaults from the H200 sweeps of benchmarks/topk.py (BENCHMARKS.md): 64-wide D chunks everywhere; narrow label
    # tiles for few queries with long lists; 128-query blocks when the lists are short (k <= 16) and the batch is
    # large; a deeper pipeline for few queries.
    big_b = B >= 256 and kp <= 16
    block_b = cfg.block_b or (128 if big_b else 64 if B >= 64 else 32 if B >= 32 else 16)
    block_l = cfg.block_l or (64 if B <= 32 and kp > 16 else 128)
    block_d = cfg.block_d or max(16, min(64, _next_pow2(D)))
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


def _resolve_screen_config(cfg: TopkConfig, B: int, D: int, weight_bytes: int, k: int) -> TopkConfig:
    """Launch options of the screening kernel: a plain GEMM tile with a light epilogue."""
    # H200 sweeps (benchmarks/topk.py, BENCHMARKS.md), B = 1024, k = 5, through descriptors: 64 x 128 x 128 tiles,
    # 4 warps, 4 stages: 7.3 ms; 128 x 128 (8 warps) 10.8, 64 x 256 (8 warps) 11.0, 128 x 64 8.0, 5 stages 12.0.
    # With the row gate and the append in two halves: many queries run 3 stages under a 128-register cap (3 programs
    # per SM instead of 2), and 64-label tiles for long lists (fewer rows and labels share a tile that takes the append
    # branch): B = 1024, k = 5 / 100: 5.46 / 8.33 ms vs 5.90 / 8.87 (4 stages, no cap); 128 x 128 tiles (8 warps,
    # capped) 5.45 / 9.72; B = 256: 1.58 / 2.31 vs 1.64 / 2.50.
    block_b = cfg.block_b or (16 if B <= 16 else 32 if B <= 32 else 64)
    block_l = cfg.block_l or (64 if B >= 256 and k > 16 else 128)
    block_d = cfg.block_d or max(16, min(128 // weight_bytes, _next_pow2(D)))
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


def _screen_levels(
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


def _screen_cap(cfg: TopkConfig, B: int, k: int) -> int | None:
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


def _check_args(x, weights, k, num_labels) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(weights, torch.Tensor):
        raise ValueError("x and weights must be torch tensors")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (B, D), got shape {tuple(x.shape)}")
    if weights.dim() != 2:
        raise ValueError(f"weights must be 2-D (L_pad, D), got shape {tuple(weights.shape)}")
    if x.dtype not in QUERY_DTYPES:
        raise ValueError(f"x must be bfloat16 or float32, got {x.dtype}")
    if weights.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weights must be float8_e4m3fn, bfloat16 or float32, got {weights.dtype}")
    if x.shape[1] != weights.shape[1]:
        raise ValueError(f"x has D={x.shape[1]} but weights have D={weights.shape[1]}")
    if x.device != weights.device:
        raise ValueError(f"x is on {x.device} but weights are on {weights.device}")
    for name, v in (("k", k), ("num_labels", num_labels)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int, got {type(v).__name__}")
    if not 1 <= num_labels <= weights.shape[0]:
        raise ValueError(f"num_labels must be in [1, {weights.shape[0]}] (rows of weights), got {num_labels}")
    if num_labels > MAX_LABELS:
        raise ValueError(f"num_labels must be <= {MAX_LABELS}, got {num_labels}")
    if not 1 <= k <= num_labels:
        raise ValueError(f"k must be in [1, num_labels={num_labels}], got {k}")


def _check_exclude(exclude, B: int, k: int, num_labels: int, device: torch.device) -> torch.Tensor | None:
    """(B, E) int64 on `device`, -1 = no entry; or None. Raises ValueError when a row would keep fewer than k labels."""
    if exclude is None:
        return None
    if not isinstance(exclude, torch.Tensor):
        if len(exclude) != B:
            raise ValueError(f"exclude must have one list per query ({B}), got {len(exclude)}")
        width = max((len(r) for r in exclude), default=0)
        exclude = torch.tensor([list(r) + [-1] * (width - len(r)) for r in exclude], dtype=torch.int64).view(B, width)
    if exclude.dim() != 2 or exclude.shape[0] != B:
        raise ValueError(f"exclude must be (B={B}, E), got shape {tuple(exclude.shape)}")
    if exclude.dtype.is_floating_point or exclude.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise ValueError(f"exclude must hold integer label ids, got {exclude.dtype}")
    exclude = exclude.to(device=device, dtype=torch.int64).contiguous()
    if exclude.shape[1] == 0:
        return None
    if bool(((exclude < -1) | (exclude >= num_labels)).any()):
        raise ValueError(f"exclude ids must be -1 (padding) or in [0, num_labels={num_labels})")
    srt = exclude.sort(dim=1).values
    distinct = (srt >= 0) & torch.cat([torch.ones_like(srt[:, :1], dtype=torch.bool), srt[:, 1:] != srt[:, :-1]], 1)
    most = int(distinct.sum(dim=1).max())
    if k > num_labels - most:
        raise ValueError(f"k={k} exceeds the {num_labels - most} labels left after exclusions in some query")
    return exclude


def prepare_queries(x: torch.Tensor, weights_dtype: torch.dtype, fp8_dot: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries the dot products use, and the per-row factor applied to the fp32 sums (see the module docstring).

    Returns (xq (B, D) float8_e4m3fn / bf16 / fp32, inv_scale (B,) fp32).
    """
    if fp8_dot:
        # s_b = 2^e, e the largest integer with amax * 2^e <= 448 = 0.875 * 2^9, from amax = m 2^ex, m in [0.5, 1):
        # e = 9 - ex if m <= 0.875 else 8 - ex (exact, unlike a floating-point log2), clamped to [-126, 126].
        amax = x.float().abs().amax(dim=1)
        m, ex = torch.frexp(amax)
        exp = torch.where(m <= 0.875, 9 - ex, 8 - ex).clamp(-126, 126)
        exp = torch.where(amax > 0, exp, torch.zeros_like(exp)).float()
        xq = (x.float() * torch.exp2(exp)[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return xq, torch.exp2(-exp)
    dtype = torch.float32 if weights_dtype == torch.float32 else torch.bfloat16
    return x.to(dtype), torch.ones(x.shape[0], dtype=torch.float32, device=x.device)


def _auto_fp8_dot(weights: torch.Tensor) -> bool:
    return (
        weights.dtype == torch.float8_e4m3fn
        and weights.is_cuda
        and torch.cuda.get_device_capability(weights.device) >= (8, 9)
    )


def _resolve_fp8_dot(weights: torch.Tensor, fp8_dot: bool | None) -> bool:
    """fp8_dot as given (None: where the GPU has fp8 tensor cores); ValueError when the head is not float8_e4m3fn."""
    if fp8_dot is None:
        return _auto_fp8_dot(weights)
    if fp8_dot and weights.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_dot needs float8_e4m3fn weights, got {weights.dtype}")
    return fp8_dot


def scores_to_keys(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sortable int64 keys of (fp32 score, id) pairs: larger key = better label (score desc, then id asc)."""
    s = scores.float()
    s = torch.where(s == 0, torch.zeros_like(s), s)
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)
    bits = s.view(torch.int32)
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return mono.to(torch.int64) * 2**32 + (0xFFFFFFFF - ids.to(torch.int64))


def keys_to_scores(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `scores_to_keys`: (fp32 scores, int64 ids)."""
    ids = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    mono = (keys >> 32).to(torch.int32)
    bits = mono ^ ((mono >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), ids


def _topk_triton(xq, inv_scale, weights, k, num_labels, exclude, fp8_dot, cfg: TopkConfig) -> torch.Tensor:
    """Sorted top-k keys (B, k): the screened path where its candidate lists fit, else the running top-k kernel."""
    tiles = _two_pass_tiles(cfg, xq.shape[0], k, num_labels)
    if tiles is not None:
        return _topk_two_pass(xq, inv_scale, weights, k, num_labels, exclude, fp8_dot, cfg, tiles)
    cap = _screen_cap(cfg, xq.shape[0], k)
    if cap is not None:
        return _topk_screened(xq, inv_scale, weights, k, num_labels, exclude, fp8_dot, cfg, cap)
    return _topk_running(xq, inv_scale, weights, k, num_labels, exclude, fp8_dot, cfg)


def _descriptors_fit(xq: torch.Tensor, weights: torch.Tensor) -> bool:
    """Tensor descriptors (TMA) need 16-byte aligned bases and row strides, and a unit stride along D."""
    return TensorDescriptor is not None and all(
        t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 and t.stride(1) == 1
        for t in (xq, weights)
    )


def _tile_meta(c: TopkConfig, D: int, fp8_dot: bool, has_excl: bool) -> dict:
    """Launch options shared by the scoring kernels (tile sizes, dot flavour, warps and stages)."""
    return {
        "BLOCK_B": c.block_b,
        "BLOCK_L": c.block_l,
        "BLOCK_D": c.block_d,
        "FP8_DOT": fp8_dot,
        "HAS_SCALE": fp8_dot,
        "HAS_EXCL": has_excl,
        "EVEN_D": D % c.block_d == 0,
        "UPCAST": _interpreting(),
        "num_warps": c.num_warps,
        "num_stages": c.num_stages,
        **({"maxnreg": c.maxnreg} if c.maxnreg and not _interpreting() else {}),
    }


def _topk_screened(xq, inv_scale, weights, k, num_labels, exclude, fp8_dot, cfg: TopkConfig, cap: int):
    """Exact top-k as a GEMM with a threshold epilogue, over label ranges of growing size (`_screen_levels`).

    After each range, the row's threshold is the score of its k-th best label so far: a label of a later range can
    only enter the top-k by scoring strictly above it, and only such labels are written (as keys) to the row's
    candidate list. A row whose list overflows `cap` in some range is recomputed whole by the running top-k kernel
    (launched for every call but idle unless a row overflowed: no host synchronisation).
    """
    B, D = xq.shape
    for name, v in (("merge_block", cfg.merge_block), ("merge_warps", cfg.merge_warps)):
        if v is not None and (v < 1 or v & (v - 1)):
            raise ValueError(f"{name} must be a power of two, got {v}")
    c = _resolve_screen_config(cfg, B, D, weights.element_size(), k)
    dev = xq.device
    has_excl = exclude is not None
    if B * cap >= 2**31:
        raise ValueError(f"screen_cap too large: {B} x {cap} candidate slots (the kernel indexes them in int32)")
    levels = _screen_levels(k, num_labels, cap, c.screen_growth, c.screen_first)
    best = torch.full((B, k), KEY_EMPTY, dtype=torch.int64, device=dev)
    cand_score = torch.empty((B, cap), dtype=torch.float32, device=dev)
    cand_id = torch.empty((B, cap), dtype=torch.int32, device=dev)
    counts = torch.zeros((len(levels), B), dtype=torch.int32, device=dev)
    qblocks = triton.cdiv(B, c.block_b)
    excl = exclude if has_excl else counts
    kp = max(16, _next_pow2(k))  # tl.join / tl.topk need a few elements on the GPU (k = 1 failed to compile)
    use_desc = bool(c.tma) and _descriptors_fit(xq, weights)
    x_arg, w_arg = xq, weights
    if use_desc:
        x_arg = TensorDescriptor.from_tensor(xq, [c.block_b, c.block_d])
        w_arg = TensorDescriptor.from_tensor(weights, [c.block_l, c.block_d])
    for i, (lo, hi) in enumerate(levels):
        _screen_kernel[(qblocks * triton.cdiv(hi - lo, c.block_l),)](
            x_arg, w_arg, inv_scale, best, excl, cand_score, cand_id, counts[i],
            B, lo, hi, D, qblocks, excl.shape[1] if has_excl else 0, cap, k - 1,
            xq.stride(0), weights.stride(0), excl.stride(0) if has_excl else 0, best.stride(0), cand_score.stride(0),
            USE_DESC=use_desc, GATE=c.gate, **_tile_meta(c, D, fp8_dot, has_excl),
        )  # fmt: skip
        _merge_kernel[(B,)](
            best, cand_score, cand_id, counts[i], k, cap, best.stride(0), cand_score.stride(0),
            KP=kp,
            BLOCK=max(kp, cfg.merge_block or min(512, _next_pow2(cap))),
            # 8 warps: H200 CUDA graphs, k = 100, B = 1 / 8 / 64: 0.592 / 0.612 / 0.953 ms vs 0.605 / 0.628 / 0.970
            # with 4; 16 warps, blocks of 256 or 1024-2048 candidates: no better.
            num_warps=cfg.merge_warps or 8,
        )  # fmt: skip
    overflow = (counts > cap).any(dim=0).to(torch.int32)
    budget = cfg.max_partial_bytes // 2
    return _recompute_flagged(best, overflow, xq, inv_scale, weights, k, num_labels, exclude, fp8_dot, budget)


def _recompute_flagged(best, flag, xq, inv_scale, weights, k, num_labels, exclude, fp8_dot, partial_bytes: int):
    """best (B, k) keys with the rows flagged (B,) int32 replaced by the running kernel's exact answer. The kernel is
    launched every call but computes only query blocks holding a flagged row (no host synchronisation)."""
    B = best.shape[0]
    kp = max(16, _next_pow2(k))
    fallback = TopkConfig(splits=max(1, min(16, partial_bytes // (8 * B * k))))  # partial lists within the bytes
    part = _running_parts(xq, inv_scale, weights, k, num_labels, exclude, fp8_dot, fallback, flag=flag)
    # The flagged rows' best lists become the top-k of their partial lists; the others are left alone (no torch.topk
    # over every row: at B = 1, k = 100 it took 22 us of GPU time, 44-45 at B = 2-64).
    _replace_flagged_kernel[(B,)](
        best, part, flag, k, part.shape[1] * k, best.stride(0), part.stride(0),
        KP=kp, BLOCK=max(kp, min(512, _next_pow2(part.shape[1] * k))), num_warps=4,
    )  # fmt: skip
    return best


def _two_pass_tiles(cfg: TopkConfig, B: int, k: int, num_labels: int) -> int | None:
    """Label tiles of the two-pass path, or None when it should not be used (see `_topk_two_pass`)."""
    tiles = triton.cdiv(num_labels, cfg.block_l or TWO_PASS_BLOCK_L)
    # Extra memory: the tile maxima (4 bytes per row and tile) and the candidate slots (8 bytes each) within 7/8 of
    # the budget; the rest for the pair lists and the fallback's partial lists.
    need = B * triton.cdiv(tiles, 16) * 16 * 4 + B * _two_pass_cap(k) * 8
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
    return max(64, _next_pow2(4 * k))


def _resolve_two_pass_config(cfg: TopkConfig, D: int, weight_bytes: int) -> TopkConfig:
    """Launch options of the first pass (large tiles: a plain GEMM with a light epilogue)."""
    return TopkConfig(
        block_b=cfg.block_b or 128,
        block_l=cfg.block_l or TWO_PASS_BLOCK_L,
        block_d=cfg.block_d or max(16, min(128 // weight_bytes, _next_pow2(D))),
        num_warps=cfg.num_warps or 8,
        num_stages=cfg.num_stages or 3,
        tma=cfg.tma,
    )


def _topk_two_pass(xq, inv_scale, weights, k, num_labels, exclude, fp8_dot, cfg: TopkConfig, tiles: int):
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
    top-k kernel, as in `_topk_screened`. No host synchronisation: every buffer has a size known in advance.
    """
    B, D = xq.shape
    c1 = _resolve_two_pass_config(cfg, D, weights.element_size())
    half = TopkConfig(block_b=max(16, c1.block_b // 2), block_l=max(16, c1.block_l // 2), block_d=c1.block_d)
    c2 = _resolve_screen_config(
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
    maxes = torch.empty((B, triton.cdiv(tiles, group) * group), dtype=torch.float32, device=dev)
    maxes[:, tiles:] = float("-inf")
    excl = exclude if has_excl else maxes
    descriptors = bool(cfg.tma) and _descriptors_fit(xq, weights)

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
        x_arg, w_arg, inv_scale, excl, maxes, B, num_labels, D, q1, q1 * tiles, excl_args[0],
        xq.stride(0), weights.stride(0), excl_args[1], maxes.stride(0),
        USE_DESC=descriptors, **_tile_meta(c1, D, fp8_dot, has_excl),
    )  # fmt: skip
    # The threshold: the k-th largest maximum of groups of tiles. k groups reach it, so k distinct labels do: the row's
    # k-th best score is at least that (a little below the k-th tile maximum at most; 16x less to select from).
    kp = max(16, _next_pow2(k))
    kth = torch.empty(B, dtype=torch.float32, device=dev)
    thr = torch.empty((B, 1), dtype=torch.int64, device=dev)  # the screening epilogue's threshold, as a key
    row_cap = 2 * k + 16  # chosen tiles per row at most (about k without ties)
    block = max(kp, min(4096 // group, _next_pow2(triton.cdiv(tiles, group))))
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
        xq, w_arg, inv_scale, thr, excl, cand_score, cand_id, counts, job_tile, job_first, job_rows, pair_rows,
        num_labels, D, excl_args[0], cap, xq.stride(0), weights.stride(0), excl_args[1], cand_score.stride(0),
        SUB=sub, W_DESC=descriptors, GATE=c2.gate, **_tile_meta(c2, D, fp8_dot, has_excl),
    )  # fmt: skip
    best = torch.full((B, k), KEY_EMPTY, dtype=torch.int64, device=dev)
    _merge_kernel[(B,)](
        best, cand_score, cand_id, counts, k, cap, best.stride(0), cand_score.stride(0),
        KP=kp, BLOCK=max(kp, min(512, cap)), num_warps=cfg.merge_warps or 8,
    )  # fmt: skip
    # Rows to recompute: candidates past the slots or fewer than k (tiles tied past the row cap, an all-NaN tile row,
    # or fewer than k groups with a finite maximum).
    overflow = ((counts > cap) | (counts < k)).to(torch.int32)
    budget = cfg.max_partial_bytes // 8
    return _recompute_flagged(best, overflow, xq, inv_scale, weights, k, num_labels, exclude, fp8_dot, budget)


def _topk_running(xq, inv_scale, weights, k, num_labels, exclude, fp8_dot, cfg: TopkConfig) -> torch.Tensor:
    """Sorted top-k keys (B, k) from the running top-k kernel."""
    part = _running_parts(xq, inv_scale, weights, k, num_labels, exclude, fp8_dot, cfg)
    keys = part.view(part.shape[0], -1)
    if part.shape[1] > 1:
        return torch.topk(keys, k, dim=1).values
    return keys.sort(dim=1, descending=True).values


def _running_parts(xq, inv_scale, weights, k, num_labels, exclude, fp8_dot, cfg: TopkConfig, flag=None):
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
        KP=_next_pow2(k),
        SORT_MIN=c.sort_min,
        HAS_FLAG=flag is not None,
        **_tile_meta(c, D, fp8_dot, has_excl),
    )
    return part


def _topk_torch(xq, inv_scale, weights, k, num_labels, exclude, chunk_size):
    B = xq.shape[0]
    chunk = chunk_size or max(1024, min(1 << 20, (1 << 24) // max(B, 1)))
    xf = xq.float()
    best = None
    for start in range(0, num_labels, chunk):
        stop = min(start + chunk, num_labels)
        ids = torch.arange(start, stop, device=xq.device)
        logits = (xf @ weights[start:stop].float().T) * inv_scale[:, None]
        keys = scores_to_keys(logits, ids[None, :])
        if exclude is not None:
            local = exclude - start
            hit = (local >= 0) & (local < stop - start)
            rows, cols = hit.nonzero(as_tuple=True)
            keys[rows, local[rows, cols]] = KEY_EMPTY
        keys = torch.topk(keys, min(k, stop - start), dim=1).values
        best = keys if best is None else torch.topk(torch.cat([best, keys], dim=1), k, dim=1).values
    return keys_to_scores(best)


def topk_scores(
    x: torch.Tensor,
    weights: torch.Tensor,
    k: int,
    num_labels: int,
    exclude: torch.Tensor | Sequence[Sequence[int]] | None = None,
    *,
    impl: str = "auto",
    fp8_dot: bool | None = None,
    config: TopkConfig | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k labels of each query: (scores fp32 (B, k) sorted descending, ids int64 (B, k)).

    x: (B, D) bf16/fp32 queries. weights: (L_pad, D) float8_e4m3fn/bf16/fp32 head; rows >= num_labels are padding and
    never returned. k in [1, num_labels]. exclude: per-query ids never returned, a (B, E) integer tensor padded with
    -1 or a list of B lists; each row must keep >= k labels. impl: "triton" (GPU, or CPU under TRITON_INTERPRET=1),
    "torch" (chunked matmul + topk, bounded memory), "auto" (triton on CUDA, torch otherwise). fp8_dot: quantize x
    to e4m3 and use fp8 x fp8 dots (needs fp8 weights); None = where the GPU has fp8 tensor cores (sm_89+).
    Scores and tie rule: see the module docstring.
    """
    _check_args(x, weights, k, num_labels)
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if impl == "auto":
        impl = "triton" if x.is_cuda else "torch"
    if impl == "triton" and not x.is_cuda and not _interpreting():
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    fp8_dot = _resolve_fp8_dot(weights, fp8_dot)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B = x.shape[0]
    exclude = _check_exclude(exclude, B, k, num_labels, x.device)
    if B == 0:
        return torch.empty((0, k), dtype=torch.float32, device=x.device), torch.empty(
            (0, k), dtype=torch.int64, device=x.device
        )
    if weights.stride(1) != 1:
        weights = weights.contiguous()
    if impl == "torch":
        xq, inv_scale = prepare_queries(x, weights.dtype, fp8_dot)
        return _topk_torch(xq.contiguous(), inv_scale, weights, k, num_labels, exclude, chunk_size)
    return _triton_scores(x, weights, k, num_labels, exclude, fp8_dot, config or TopkConfig())


def _triton_scores(x, weights, k, num_labels, exclude, fp8_dot, cfg: TopkConfig):
    """The Triton path on checked arguments: no host synchronisation, so it can be captured in a CUDA graph. The query
    quantisation and the key decoding are one launch each (they were ~20 small torch ops)."""
    if fp8_dot:
        xq, inv_scale = quantize_queries(x)
    else:
        xq, inv_scale = prepare_queries(x, weights.dtype, fp8_dot)
    keys = _topk_triton(xq.contiguous(), inv_scale, weights, k, num_labels, exclude, fp8_dot, cfg).contiguous()
    scores = torch.empty(keys.shape, dtype=torch.float32, device=keys.device)
    ids = torch.empty(keys.shape, dtype=torch.int64, device=keys.device)
    _decode_kernel[(triton.cdiv(keys.numel(), 1024),)](keys, scores, ids, keys.numel(), BLOCK=1024)
    return scores, ids


def quantize_queries(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`prepare_queries(x, fp8_dot=True)` as one Triton launch (CUDA, or CPU under TRITON_INTERPRET=1)."""
    B, D = x.shape
    x = x.contiguous()
    xq = torch.empty((B, D), dtype=torch.float8_e4m3fn, device=x.device)
    inv = torch.empty(B, dtype=torch.float32, device=x.device)
    if B:
        _quantize_kernel[(B,)](x, xq, inv, D, x.stride(0), xq.stride(0), BLOCK_D=min(1024, _next_pow2(D)))
    return xq, inv


def capture_cuda_graph(run: Callable[[], Any], device: torch.device) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, outputs): `run()` once on a side stream (kernels compile, communicators set up: outside the capture),
    then captured; each replay rewrites the outputs of the captured call in place."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


class CapturedTopk:
    """`topk_scores` on a CUDA GPU for one head, k and batch size, replayed from a CUDA graph.

    An eager call launches ~17 kernels (two per label range) and spends more host time than the GPU needs for a few
    queries (H200, 2.8M labels, B = 1, with ~30 launches: ~0.75 ms of host work for ~0.55 ms of GPU work); a replay
    is one launch. Batches smaller than `batch_size` are padded with copies of their first query (the extra rows are
    scored and dropped).
    `exclude_width` > 0 reserves that many exclusion slots per query. The head must stay at the same address
    (weights updated in place are fine).
    """

    def __init__(
        self,
        weights: torch.Tensor,
        k: int,
        num_labels: int,
        batch_size: int,
        *,
        exclude_width: int = 0,
        query_dtype: torch.dtype = torch.bfloat16,
        fp8_dot: bool | None = None,
        config: TopkConfig | None = None,
    ) -> None:
        if not isinstance(weights, torch.Tensor) or not weights.is_cuda:
            raise ValueError("CapturedTopk needs the head as a CUDA tensor (CUDA graphs)")
        for name, v in (("batch_size", batch_size), ("exclude_width", exclude_width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "batch_size" else 0):
                raise ValueError(f"{name} must be an int >= {1 if name == 'batch_size' else 0}, got {v!r}")
        x = torch.zeros((batch_size, weights.shape[1] if weights.dim() == 2 else 0), dtype=query_dtype)
        _check_args(x.to(weights.device), weights, k, num_labels)
        if exclude_width > num_labels - k:
            raise ValueError(f"exclude_width={exclude_width} could leave fewer than k={k} of {num_labels} labels")
        fp8_dot = _resolve_fp8_dot(weights, fp8_dot)
        if weights.stride(1) != 1:
            raise ValueError("weights must be contiguous along D")
        self.weights, self.k, self.num_labels, self.batch_size = weights, k, num_labels, batch_size
        with torch.inference_mode():  # the graph's buffers are inference tensors: every call runs in inference mode
            self._capture(x.to(weights.device), exclude_width, fp8_dot, config)

    def _capture(self, x, exclude_width, fp8_dot, config) -> None:
        weights, k, num_labels, batch_size = self.weights, self.k, self.num_labels, self.batch_size
        self._x = x
        self._exclude = (
            torch.full((batch_size, exclude_width), -1, dtype=torch.int64, device=weights.device)
            if exclude_width
            else None
        )
        cfg = config or TopkConfig(screen=True)
        run = lambda: _triton_scores(self._x, weights, k, num_labels, self._exclude, fp8_dot, cfg)  # noqa: E731
        self._graph, (self._scores, self._ids) = capture_cuda_graph(run, weights.device)

    @torch.inference_mode()
    def __call__(
        self, x: torch.Tensor, exclude: torch.Tensor | Sequence[Sequence[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores fp32 (B, k), ids int64 (B, k)) for x (B, D), B <= batch_size; as `topk_scores`."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self._x.shape[1]:
            raise ValueError(f"x must be (B, {self._x.shape[1]}), got {getattr(x, 'shape', type(x).__name__)}")
        B = x.shape[0]
        if not 1 <= B <= self.batch_size:
            raise ValueError(f"batch of {B} queries; this graph takes 1 to {self.batch_size}")
        if x.dtype != self._x.dtype:
            raise ValueError(f"x must be {self._x.dtype} (the graph's query_dtype), got {x.dtype}")
        ex = None
        if exclude is not None:
            if self._exclude is None:
                raise ValueError("this graph was captured without exclusion slots (exclude_width=0)")
            ex = _check_exclude(exclude, B, self.k, self.num_labels, self._x.device)
            if ex is not None and ex.shape[1] > self._exclude.shape[1]:
                raise ValueError(f"{ex.shape[1]} exclusions per query; this graph has {self._exclude.shape[1]} slots")
        self._x[:B].copy_(x)
        if B < self.batch_size:
            # Pad with copies of a real query: a zero row ties every label at 0, and in the two-pass path a row whose
            # tile maxima tie past its tile cap is recomputed by the running kernel (H200, 2.8M labels, 96 queries in
            # a 128-row graph: 11.7 ms with zero rows).
            self._x[B:].copy_(x[:1].expand(self.batch_size - B, -1))
        if self._exclude is not None:
            self._exclude.fill_(-1)
            if ex is not None:
                self._exclude[:B, : ex.shape[1]].copy_(ex)
        self._graph.replay()
        return self._scores[:B].clone(), self._ids[:B].clone()


def merge_topk(
    scores: Sequence[torch.Tensor],
    ids: Sequence[torch.Tensor],
    k: int,
    id_offsets: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of per-shard top-k lists: scores[i] fp32 (B, k_i), ids[i] int64 (B, k_i) -> (B, k) each.

    ids are global, or local to shard i when id_offsets[i] (the shard's first global id) is given. Same order and
    tie rule as `topk_scores`, so merging the shards' lists equals the top-k of the unsharded head.
    """
    if len(scores) == 0 or len(scores) != len(ids):
        raise ValueError(f"need one ids tensor per scores tensor and at least one shard, got {len(scores)}/{len(ids)}")
    if id_offsets is not None and len(id_offsets) != len(scores):
        raise ValueError(f"id_offsets needs one entry per shard ({len(scores)}), got {len(id_offsets)}")
    B = scores[0].shape[0] if scores[0].dim() == 2 else -1
    keys, bounds, checked = [], [], []
    for i, (s, j) in enumerate(zip(scores, ids, strict=True)):
        if s.dim() != 2 or s.shape != j.shape or s.shape[0] != B:
            raise ValueError(f"shard {i}: scores {tuple(s.shape)} and ids {tuple(j.shape)} must both be (B={B}, k_i)")
        if j.dtype.is_floating_point:
            raise ValueError(f"shard {i}: ids must be integers, got {j.dtype}")
        g = j.to(torch.int64) + (id_offsets[i] if id_offsets is not None else 0)
        if g.numel():
            bounds += [g.min(), g.max()]
            checked.append(i)
        keys.append(scores_to_keys(s, g))
    if bounds:  # one host synchronisation for every shard's bounds
        low_high = torch.stack(bounds).view(-1, 2).tolist()
        for i, (low, high) in zip(checked, low_high, strict=True):
            if low < 0 or high > MAX_LABELS:
                raise ValueError(f"shard {i}: global ids must be in [0, {MAX_LABELS}]")
    total = sum(t.shape[1] for t in keys)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= total:
        raise ValueError(f"k must be an int in [1, {total}] (entries over all shards), got {k}")
    return keys_to_scores(torch.topk(torch.cat(keys, dim=1), k, dim=1).values)


def reference_topk(
    x: torch.Tensor,
    weights: torch.Tensor,
    k: int,
    num_labels: int,
    exclude: torch.Tensor | Sequence[Sequence[int]] | None = None,
    fp8_dot: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain reference: full (B, num_labels) fp32 logits, excluded ids set to -inf, stable descending sort."""
    xq, inv_scale = prepare_queries(x, weights.dtype, fp8_dot)
    logits = (xq.float() @ weights[:num_labels].float().T) * inv_scale[:, None]
    if exclude is not None:
        for b, row in enumerate(exclude.tolist() if isinstance(exclude, torch.Tensor) else exclude):
            for i in row:
                if i >= 0:
                    logits[b, i] = float("-inf")
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k]
    return logits.gather(1, order), order
