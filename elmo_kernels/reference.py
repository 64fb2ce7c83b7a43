"""Plain-torch references for the kernels: same rounding rules, same random stream, fp32 math.

They are exact enough that the Triton kernels can be compared element by element, and fast enough on CPU to be the
fallback path (`impl="torch"`) of the functional API. They mirror the kernels; the constants both use live in
`elmo_kernels.common`.

Random stream (shared with the kernels, `elmo_kernels.rounding.random_u16`): element (row, col) of a matrix whose rows
are global row ids (label ids for the head, so that a label shard draws the bits of those rows of the whole head)
draws 16 bits of the word mix32(h(row) ^ key(col) * 0x9E3779B9), with h(row) = mix32(mix32(row ^ seed_lo) +
seed_hi), key(col) = 64 (col // 128) + col % 64 and mix32 the lowbias32 mixer: the word's top half in the low 64
columns of each 128-column block, its bottom half in the high 64 (so columns c and c + 64 share one mixer); all
arithmetic on uint32, wrapping.
"""

from __future__ import annotations

import numpy as np
import torch

from elmo_kernels.common import FP8_FORMATS, GRAD_FP8_SCALE

_M1, _M2, _GOLDEN = np.uint32(0x21F0AAAD), np.uint32(0x735A2D97), np.uint32(0x9E3779B9)


def mix32(x: np.ndarray) -> np.ndarray:
    """lowbias32 on uint32 arrays, as `elmo_kernels.rounding.mix32`."""
    x = x ^ (x >> np.uint32(16))
    x = x * _M1
    x = x ^ (x >> np.uint32(15))
    x = x * _M2
    return x ^ (x >> np.uint32(15))


def random_u16(seed: int, rows: int, cols: int, row_offset: int = 0) -> torch.Tensor:
    """16 random bits per element of a (rows, cols) matrix whose first row is `row_offset` of the stream (int32)."""
    with np.errstate(over="ignore"):
        k0, k1 = np.uint32(seed & 0xFFFFFFFF), np.uint32((seed >> 32) & 0xFFFFFFFF)
        r = np.arange(row_offset, row_offset + rows, dtype=np.uint64).astype(np.uint32)
        h = mix32(mix32(r ^ k0) + k1)
        c = np.arange(cols, dtype=np.uint32)
        key = ((c >> np.uint32(7)) << np.uint32(6)) | (c & np.uint32(63))
        word = mix32(h[:, None] ^ (key * _GOLDEN)[None, :])
        bits = np.where(((c & np.uint32(64)) != 0)[None, :], word & np.uint32(0xFFFF), word >> np.uint32(16))
    return torch.from_numpy(bits.astype(np.int32))


def _round_bf16_bits(x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    # int32 arithmetic wraps like the kernels' uint32: the carry into bit 16 is the same (only NaN patterns overflow,
    # and NaN is restored below).
    bits = (x.float().view(torch.int32) + add.to(torch.int32)) & -65536
    return torch.where(torch.isnan(x), x.float(), bits.view(torch.float32))


def stochastic_round_bf16(x: torch.Tensor, rand16: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 grid: add 16 random bits below the bf16 mantissa, then truncate. Returned as fp32 on the grid."""
    return _round_bf16_bits(x, rand16)


def nearest_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 grid, round to nearest even (the same bit trick as the kernels). fp32 on the grid."""
    bits = x.float().view(torch.int32)
    return _round_bf16_bits(x, 0x7FFF + ((bits >> 16) & 1))


def round_fp8(x: torch.Tensor, rand16: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> fp8 grid of `dtype` by the kernels' bit trick: stochastic with 16 random bits, else nearest-even.

    Normal range: add the random bits at the top of the dropped mantissa field (or half a step for nearest) and
    mask the field off; the sign bit is untouched. Subnormals: shift into the first normal binade by adding 2^min_exp
    with x's sign, round, subtract it back (so values that round to 0 come out +0, as in the kernels). Saturates at
    the largest finite value, keeps NaN. Returns fp32 on the grid.
    """
    man_bits, min_exp, max_val = FP8_FORMATS[dtype]
    drop = 23 - man_bits
    x = x.float()
    # In place on one buffer: this is also the CPU training path, where every pass over the head counts.
    magic = torch.where(x.abs() < 2.0**min_exp, torch.full_like(x, 2.0**min_exp).copysign_(x), 0.0)
    bits = (x + magic).view(torch.int32)  # int32 wraps like uint32; only inf / NaN patterns carry that far
    if rand16 is None:
        bits.add_((1 << (drop - 1)) - 1 + ((bits >> drop) & 1))
    else:
        bits.add_(rand16.to(torch.int32) << (drop - 16))
    y = bits.bitwise_and_(-(1 << drop)).view(torch.float32).sub_(magic).clamp_(-max_val, max_val)
    nan = torch.isnan(x)
    return torch.where(nan, x, y) if nan.any() else y


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, seed: int, row_offset: int = 0) -> torch.Tensor:
    """Reference of `elmo_kernels.rounding.stochastic_round`: x viewed as (rows, last dim), returned in `dtype`."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
    r = random_u16(seed, x2.shape[0], x2.shape[1], row_offset).to(x.device)
    if dtype == torch.bfloat16:
        y = stochastic_round_bf16(x2, r)
    elif dtype in FP8_FORMATS:
        y = round_fp8(x2, r, dtype)
    else:
        raise ValueError(f"stochastic rounding targets bfloat16, float8_e4m3fn or float8_e5m2, not {dtype}")
    return y.to(dtype).reshape(x.shape)


def round_to(x: torch.Tensor, dtype: torch.dtype, rand16: torch.Tensor | None) -> torch.Tensor:
    """Round fp32 x onto the grid of `dtype`: stochastically with `rand16`, to nearest without. fp32 result."""
    if dtype == torch.bfloat16:
        return nearest_bf16(x) if rand16 is None else stochastic_round_bf16(x, rand16)
    if dtype in FP8_FORMATS:
        return round_fp8(x, rand16, dtype)
    return x.float()


def quantize_embeddings(x: torch.Tensor, fp8_dots: bool) -> torch.Tensor:
    """X as the head's dots consume it: e4m3 (nearest, saturating) for fp8 dots, else bf16."""
    return x.float().clamp(-448, 448).to(torch.float8_e4m3fn) if fp8_dots else x.to(torch.bfloat16)


def head_step_chunk(
    w: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    seed: int,
    row_offset: int,
    num_valid: int,
    kahan: torch.Tensor | None = None,
    fp8_dots: bool = False,
    stochastic: bool = True,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """One fused ELMO step for one label chunk, in place on `w` (and `kahan`); returns this chunk's dX (fp32).

    w: (Lc, D) bf16 or float8_e4m3fn; x: (B, D) bf16 or fp32; y: (B, Lc) 0/1 targets; rows >= num_valid are padding
    and never change. stochastic=False rounds the weights to nearest instead. kahan: None or (H, D) bf16/float8_e5m2
    compensation for the first H rows of this chunk. keep: optional (B, Lc) bool, False where a pair is excluded.
    The quantisation of operands mirrors the kernel: G is rounded to bf16 (nearest), or, with fp8 dots, X to e4m3
    (nearest) and G * 256 to e4m3 (stochastic, on the stream seed + 1 over (label, batch row)).
    """
    wf = w.float()
    xf = quantize_embeddings(x, fp8_dots).float()
    logits = xf @ wf.T
    g = torch.sigmoid(logits) - y.float()
    g[:, num_valid:] = 0.0
    if keep is not None:  # excluded (row, label) pairs get no gradient
        g = torch.where(keep, g, 0.0)
    if fp8_dots:
        r = random_u16(seed + 1, w.shape[0], x.shape[0], row_offset).T.to(w.device)
        g = round_fp8(g * GRAD_FP8_SCALE, r, torch.float8_e4m3fn) / GRAD_FP8_SCALE
    else:
        g = nearest_bf16(g)
    dx = g @ wf
    delta = (g.T @ xf) * -lr + wf * (-lr * weight_decay)  # the kernel's association: -lr (G^T X + wd W)
    rand16 = random_u16(seed, w.shape[0], w.shape[1], row_offset).to(w.device) if stochastic else None
    if kahan is not None and kahan.shape[0] > 0:
        h = kahan.shape[0]
        comp = torch.zeros_like(wf)
        comp[:h] = kahan.float()
        corrected = delta - comp
        new_w = round_to(wf + corrected, w.dtype, rand16)
        new_comp = (new_w - wf) - corrected
        kahan.copy_(round_to(new_comp[:h], kahan.dtype, None).to(kahan.dtype))
    else:
        new_w = round_to(wf + delta, w.dtype, rand16)
    w[:num_valid] = new_w[:num_valid].to(w.dtype)
    return dx
