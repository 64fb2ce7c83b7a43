"""Device helpers shared by the top-k kernels: the one tile scorer, the sortable keys, the exclusion mask, the
screening epilogue (candidates above a row's threshold) and the fold of a block of keys into a sorted list. The
kernels of each path live beside its launcher (running.py, screened.py, two_pass.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from elmo_kernels.topk.keys import KEY_EMPTY, KEY_FILLER_MAX, KEY_FULL, KEY_REAL_MIN

# The key sentinels (elmo_kernels.topk.keys) as constexprs: Triton kernels read only constexpr globals.
TL_KEY_EMPTY = tl.constexpr(KEY_EMPTY)
TL_KEY_FULL = tl.constexpr(KEY_FULL)
TL_KEY_FILLER_MAX = tl.constexpr(KEY_FILLER_MAX)
TL_KEY_REAL_MIN = tl.constexpr(KEY_REAL_MIN)


@triton.jit
def accumulate(acc, xt, wt, FP8_DOTS: tl.constexpr, UPCAST: tl.constexpr):
    """acc + xt (BLOCK_B, BLOCK_D) @ wt (BLOCK_D, BLOCK_L): fp8 x fp8 tensor-core dots, or wt in the queries' dtype."""
    if UPCAST:
        # The interpreter's tl.dot on bf16 multiplies raw bit patterns (triton issue 11584): use fp32, which holds
        # every bf16/fp8 value exactly, with IEEE products.
        return tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
    if FP8_DOTS:
        return tl.dot(xt, wt, acc)
    return tl.dot(xt, wt.to(xt.dtype), acc)


@triton.jit
def score_tile(
    x, w, inv_scale_ptr, dead_ptr, rows, row_ok, row0, lab0, lab_end, D, stride_xb, stride_wl,
    BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, FP8_DOTS: tl.constexpr,
    HAS_SCALE: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, X_DESC: tl.constexpr, W_DESC: tl.constexpr,
    HAS_DEAD: tl.constexpr,
):  # fmt: skip
    """fp32 scores of a (query block, label tile): the one place scores are computed, so every kernel ranks the same
    numbers. Returns (scores (BLOCK_B, BLOCK_L), the tile's label ids lab0 + j, which of them are below lab_end).
    The query rows through a tensor descriptor x with X_DESC (the block's rows row0..), else by pointers (`rows`: any
    rows, gathered ones too); the labels through a tensor descriptor w with W_DESC, else by pointers. Descriptors are
    TMA on Hopper; rows, labels and D columns past a tensor's end read as zeros. With HAS_SCALE, the sums are
    multiplied by the rows' inv_scale (the fp8 query scales). With HAS_DEAD, labels whose dead_ptr byte is nonzero
    are not valid either: the one place the dead-row mask enters, so every use of the validity (running lists, tile
    maxima, screening thresholds and candidates) ignores dead rows. Their weights are still loaded: the tile's loads
    stay those of the kernel without the mask."""
    labs = lab0 + tl.arange(0, BLOCK_L)
    in_range = labs < lab_end
    if HAS_DEAD:
        lab_ok = in_range & (tl.load(dead_ptr + labs, mask=in_range, other=1) == 0)
    else:
        lab_ok = in_range
    if HAS_SCALE:
        inv_scale = tl.load(inv_scale_ptr + rows, mask=row_ok, other=1.0)
    acc = tl.zeros((BLOCK_B, BLOCK_L), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        if X_DESC:
            xt = x.load([row0, d0])
        else:
            x_ptrs = x + rows[:, None].to(tl.int64) * stride_xb + ds[None, :]
            if EVEN_D:
                xt = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            else:  # a ragged last chunk: the row ends at D (past the last row, the tensor does)
                xt = tl.load(x_ptrs, mask=row_ok[:, None] & (ds[None, :] < D), other=0.0)
        if W_DESC:
            wt = tl.trans(w.load([lab0, d0]))
        else:
            w_ptrs = w + labs[None, :].to(tl.int64) * stride_wl + ds[:, None]
            if EVEN_D:
                wt = tl.load(w_ptrs, mask=in_range[None, :], other=0.0)
            else:
                wt = tl.load(w_ptrs, mask=in_range[None, :] & (ds[:, None] < D), other=0.0)
        acc = accumulate(acc, xt, wt, FP8_DOTS, UPCAST)
    if HAS_SCALE:
        acc = acc * inv_scale[:, None]
    return acc, labs, lab_ok


@triton.jit
def score_keys(s, labs):
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
def key_score(key):
    """The fp32 score of a key (inverse of the high word of `score_keys`)."""
    mono = (key >> 32).to(tl.int32)
    return (mono ^ ((mono >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def valid_pairs(rows, row_ok, labs, lab_ok, excl_ptr, stride_eb, E, HAS_EXCL: tl.constexpr):
    """The (row, label) pairs of a tile that may be returned: both in range and, with HAS_EXCL, not excluded for
    the row (its E entries; -1 pads)."""
    valid = row_ok[:, None] & lab_ok[None, :]
    if HAS_EXCL:
        for e in range(E):
            ex = tl.load(excl_ptr + rows.to(tl.int64) * stride_eb + e, mask=row_ok, other=-1)
            valid = valid & (labs[None, :] != ex[:, None])
    return valid


@triton.jit
def screen_epilogue(
    s, rows, row_ok, labs, lab_ok, best_ptr, excl_ptr, cand_score_ptr, cand_id_ptr, count_ptr, E, cap, kth,
    stride_eb, stride_bb, stride_cb, HAS_EXCL: tl.constexpr, GATE: tl.constexpr,
):  # fmt: skip
    """Append (score, id) of every label of the scored tile s that beats its row's threshold to that row's candidate
    slots; the row counters count on past `cap` (overflow)."""
    # Threshold: the score of the row's k-th best key so far. Strictly above it: that label has a lower id than every
    # label here, so an equal score ranks below it (and NaN never passes). No k-th key yet: take every valid label.
    kth_key = tl.load(best_ptr + rows.to(tl.int64) * stride_bb + kth, mask=row_ok, other=TL_KEY_EMPTY)
    take_all = kth_key < TL_KEY_REAL_MIN
    thr = key_score(kth_key)
    if GATE:
        # One max per row first: most tiles have no hit, and the full-tile test below is skipped for them. A NaN
        # row maximum (NaN scores) takes the full test too, which ignores NaN. Rows past B never count. Invalid
        # labels (padding, dead rows) may open the gate: that costs the full test, never a candidate.
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
    hit = hit & valid_pairs(rows, row_ok, labs, lab_ok, excl_ptr, stride_eb, E, HAS_EXCL)
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
def fold_block(best, key, KP: tl.constexpr, BLOCK: tl.constexpr):
    """The best KP keys (sorted descending) of a list of KP keys and a block of BLOCK keys."""
    if BLOCK > KP:
        key = tl.topk(key, KP)
    return tl.topk(tl.reshape(tl.join(best, key), (2 * KP,)), KP)
