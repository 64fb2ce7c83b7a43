"""Stochastic rounding fp32 -> bf16 / float8 (E4M3, E5M2): Triton device functions, a standalone kernel, a launcher.

Rounding x down or up to its two neighbouring grid points a <= x < b with P(up) = (x - a) / (b - a) makes
E[round(x)] = x: tiny updates to low-precision weights survive in expectation instead of vanishing (the reason
ELMO can drop fp32 master weights). The random bits come from a counter-based hash of (seed, row, column), so a
(seed, element) pair always rounds the same way; `elmo_kernels.reference` documents the stream and reproduces it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from elmo_kernels.common import FP8_FORMATS, TL_DTYPES, interpreting

# The interpreter's fp32 -> fp8 cast turns NaN into a number; the GPU's keeps it. Patch NaN bits only there.
INTERPRETED = tl.constexpr(interpreting())
BLOCK_ROWS = 8
BLOCK_COLS = 256
MAX_ROWS = 2**32  # row ids (global label ids) enter the hash as 32-bit words


@triton.jit
def mix32(x):
    """lowbias32 (C. Wellons' hash-prospector): a bijective 32-bit mixer, two multiplies and three xor-shifts."""
    x ^= x >> 16
    x *= 0x21F0AAAD
    x ^= x >> 15
    x *= 0x735A2D97
    x ^= x >> 15
    return x


PAIR_COLS = tl.constexpr(64)  # columns c and c + 64 of each 128-column block share one hash word (its two halves)


@triton.jit
def row_hash(seed, rows):
    """h(r) = mix32(mix32(r ^ seed_lo) + seed_hi) for (R,) global row ids: one hash per row."""
    s = tl.cast(seed, tl.int64)  # seed may arrive as a constexpr (an argument equal to 1)
    k0 = (s & 0xFFFFFFFF).to(tl.uint32)
    k1 = (s >> 32).to(tl.uint32)
    return mix32(mix32(rows.to(tl.uint32) ^ k0) + k1)


@triton.jit
def pair_word(h, cols):
    """The 32-bit word of (R,) row hashes and (C,) columns: mix32(h(r) ^ key(c) * 0x9E3779B9), with
    key(c) = 64 (c // 128) + c % 64, the same for c and c + 64 in a 128-column block."""
    key = ((cols >> 7) << 6) | (cols & (PAIR_COLS - 1))
    return mix32(h[:, None] ^ (key.to(tl.uint32) * 0x9E3779B9)[None, :])


@triton.jit
def random_u16(seed, rows, cols):
    """16 random bits per element: (R,) global row ids and (C,) column ids -> (R, C) int32 values in [0, 65536).

    bits(r, c) = the top half of pair_word(h(r), c) in the low 64 columns of each 128-column block, its bottom half
    in the high 64: one mixer per two elements (see `random_u16_pair`, which draws both halves at once), computed
    from the element's own indices in whatever register layout the consumer has (no shuffles).
    Statistical quality (what was tested, see `elmo_kernels.reference.random_u16`): 16-bit values uniform (chi-square
    over 2^16 bins, 2^24 draws), no correlation between neighbouring columns, columns 64 apart (the two halves of
    one word), rows or seeds (|r| < 1e-3 over 2^24 pairs), and the stochastic-rounding tests (unbiased in the e4m3
    normal and subnormal ranges, in bf16 and e5m2; only the two neighbouring grid points appear). It is not a
    cryptographic or BigCrush-tested generator.
    """
    word = pair_word(row_hash(seed, rows), cols)
    high = (cols & PAIR_COLS) != 0
    return tl.where(high[None, :], word & 0xFFFF, word >> 16).to(tl.int32)


@triton.jit
def random_u16_pair(seed, rows, cols):
    """`random_u16` of columns `cols` and `cols + 64` at once, for (C,) columns in the low half of their 128-column
    block: (bits of cols, bits of cols + 64), each (R, C) int32, from one mixer per pair."""
    word = pair_word(row_hash(seed, rows), cols)
    return (word >> 16).to(tl.int32), (word & 0xFFFF).to(tl.int32)


@triton.jit
def round_bf16(x, add):
    """fp32 -> bf16 grid by adding `add` to the 16 bits that bf16 drops, then truncating.

    add = 16 random bits is stochastic rounding (the carry into the kept bits happens with probability equal to the
    dropped fraction); add = 0x7FFF + lsb is round-to-nearest-even. Exact for subnormals too, because bf16 shares
    fp32's exponent range. The result is fp32 on the bf16 grid, so the final cast is exact (also in the interpreter,
    whose own fp32 -> bf16 cast truncates).
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + add.to(tl.uint32)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded)


@triton.jit
def nearest_bf16(x):
    bits = x.to(tl.uint32, bitcast=True)
    return round_bf16(x, 0x7FFF + ((bits >> 16) & 1))


@triton.jit
def round_fp8_bits(x, rand16, MAN_BITS: tl.constexpr, MIN_EXP: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Round fp32 x onto an fp8 grid (MAN_BITS mantissa bits, smallest normal 2^MIN_EXP).

    Normal range: the fp8 grid is the fp32 grid with the low 23 - MAN_BITS mantissa bits dropped, so adding
    random bits there (stochastic: 16 random bits at the top of the dropped field; nearest: half a step minus one,
    plus the kept lsb for ties-to-even) and masking them off rounds the magnitude in one integer add; the sign bit
    is left alone, so both signs round alike. Subnormal range (|x| < 2^MIN_EXP, uniform step 2^(MIN_EXP -
    MAN_BITS)): adding 2^MIN_EXP with x's sign moves x into the first normal binade, whose step is that same step,
    so the same bit trick applies, and subtracting it back is exact (`magic` is 0 elsewhere: no select after).
    Values past the largest finite fp8 value stay past it: `cast_on_grid` saturates them, as the GPU's cast does
    for free; `saturate` gives the fp32 value that is stored. NaN stays NaN (-0
    and values that round to 0 from below come out +0). Returns fp32 on the grid, so the cast afterwards is exact.
    """
    DROP: tl.constexpr = 23 - MAN_BITS
    MIN_NORMAL: tl.constexpr = 2.0**MIN_EXP
    KEEP: tl.constexpr = (0xFFFFFFFF << DROP) & 0xFFFFFFFF
    MIN_NORMAL_BITS: tl.constexpr = (127 + MIN_EXP) << 23
    x_bits = x.to(tl.uint32, bitcast=True)
    small = tl.abs(x) < MIN_NORMAL
    magic = tl.where(small, ((x_bits & 0x80000000) | MIN_NORMAL_BITS).to(tl.float32, bitcast=True), 0.0)
    bits = (x + magic).to(tl.uint32, bitcast=True)
    if STOCHASTIC:
        add = rand16.to(tl.uint32) << (DROP - 16)
    else:
        add = (1 << (DROP - 1)) - 1 + ((bits >> DROP) & 1)
    y = ((bits + add) & KEEP).to(tl.float32, bitcast=True) - magic
    return tl.where(x != x, x, y)


@triton.jit
def round_to(x, rand16, DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Round fp32 x onto the grid of DTYPE (bf16, fp8e4nv, fp8e5), stochastically with `rand16` or to nearest."""
    if DTYPE == tl.bfloat16:
        if STOCHASTIC:
            y = round_bf16(x, rand16)
        else:
            y = nearest_bf16(x)
    elif DTYPE == tl.float8e4nv:
        y = round_fp8_bits(x, rand16, 3, -6, STOCHASTIC)
    else:
        y = round_fp8_bits(x, rand16, 2, -14, STOCHASTIC)
    return y


@triton.jit
def saturate(y, DTYPE: tl.constexpr):
    """The fp32 value `cast_on_grid` stores for a `round_to` result: fp8 clamped to its largest finite value."""
    if DTYPE == tl.float8e4nv:
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    elif DTYPE == tl.float8e5:
        y = tl.minimum(tl.maximum(y, -57344.0), 57344.0)
    return y


@triton.jit
def cast_on_grid(y, DTYPE: tl.constexpr):
    """Cast fp32 values on DTYPE's grid (exact; fp8 saturating). Under the interpreter, whose casts neither
    saturate nor keep NaN, both are done by hand."""
    if INTERPRETED and (DTYPE == tl.float8e4nv or DTYPE == tl.float8e5):
        bits = saturate(y, DTYPE).to(DTYPE).to(tl.uint8, bitcast=True)
        return tl.where(y != y, 0x7F, bits).to(tl.uint8).to(DTYPE, bitcast=True)
    else:
        return y.to(DTYPE)


@triton.jit
def _stochastic_round_kernel(
    x_ptr,
    out_ptr,
    rows,
    cols,
    row_offset,
    seed,
    stride_xr,
    stride_or,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    c0 = tl.program_id(1) * BLOCK_COLS
    c = c0 + tl.arange(0, BLOCK_COLS)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    x = tl.load(x_ptr + r[:, None].to(tl.int64) * stride_xr + c[None, :], mask=mask, other=0.0).to(tl.float32)
    y = round_to(x, random_u16(seed, row_offset + r, c), OUT_DTYPE, True)
    tl.store(out_ptr + r[:, None].to(tl.int64) * stride_or + c[None, :], cast_on_grid(y, OUT_DTYPE), mask=mask)


def stochastic_round(
    x: torch.Tensor, dtype: torch.dtype, seed: int, row_offset: int = 0, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Stochastically round fp32/bf16 `x` to `dtype` (bfloat16, float8_e4m3fn, float8_e5m2).

    x is viewed as rows of its last dimension; element (r, c) uses the random stream of row `row_offset + r`
    (see `elmo_kernels.reference`). E4M3/E5M2 saturate at their largest finite value; NaN stays NaN.
    out: optional contiguous tensor of x's shape and `dtype` to write into.
    """
    if dtype != torch.bfloat16 and dtype not in FP8_FORMATS:
        raise ValueError(f"stochastic rounding targets bfloat16, float8_e4m3fn or float8_e5m2, not {dtype}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"x must be float32 or bfloat16, got {x.dtype}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    x2 = (x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)).contiguous()
    if not 0 <= row_offset <= MAX_ROWS - x2.shape[0]:
        raise ValueError(f"row_offset + rows must lie in [0, 2**32], got row_offset={row_offset}")
    if out is None:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != dtype or not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(x.shape)} on {x.device}")
    result = out
    out = out.view(x2.shape)
    if x2.numel() == 0:
        return result
    rows, cols = x2.shape
    grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(cols, BLOCK_COLS))
    _stochastic_round_kernel[grid](
        x2,
        out,
        rows,
        cols,
        row_offset,
        seed,
        x2.stride(0),
        out.stride(0),
        BLOCK_ROWS=BLOCK_ROWS,
        BLOCK_COLS=BLOCK_COLS,
        OUT_DTYPE=TL_DTYPES[dtype],
    )
    return result
