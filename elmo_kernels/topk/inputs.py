"""Input checks of the public entry points, and the queries the dot products use (`prepare_queries`, and
`quantize_queries`, its fp8 branch as one Triton launch)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from elmo_kernels.common import FP8_E4M3_MAX, has_fp8_tensor_cores
from elmo_kernels.topk.config import next_pow2
from elmo_kernels.topk.keys import MAX_LABELS

WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.bfloat16, torch.float32)
QUERY_DTYPES = (torch.bfloat16, torch.float32)


def check_args(x, weights, k, num_labels) -> None:
    """ValueError unless x (B, D) and weights (L_pad, D) are tensors of supported dtypes on one device, and
    1 <= k <= num_labels <= rows of weights."""
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


def check_dead(dead, num_labels: int, device: torch.device) -> torch.Tensor | None:
    """The rows that may never be returned, as a uint8 view (0 = live) of dead's first num_labels entries, or None.

    dead: a 1-D bool or uint8 tensor (nonzero = dead) of length >= num_labels, contiguous, on `device`. The view
    shares dead's storage, so a caller that flips entries in place is seen by every later read (`CapturedTopk`)."""
    if dead is None:
        return None
    if not isinstance(dead, torch.Tensor):
        raise ValueError(f"dead must be a torch tensor of bool or uint8, got {type(dead).__name__}")
    if dead.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"dead must be bool or uint8 (nonzero = never returned), got {dead.dtype}")
    if dead.dim() != 1 or dead.shape[0] < num_labels:
        raise ValueError(f"dead must be 1-D with at least num_labels={num_labels} entries, got {tuple(dead.shape)}")
    if dead.device != device:
        raise ValueError(f"dead is on {dead.device} but weights are on {device}")
    if dead.stride(0) != 1:
        raise ValueError("dead must be contiguous (the kernels read it in place)")
    return dead[:num_labels].view(torch.uint8)


def check_exclude(
    exclude, B: int, k: int, num_labels: int, device: torch.device, dead: torch.Tensor | None = None
) -> torch.Tensor | None:
    """(B, E) int64 on `device`, -1 = no entry; or None. Raises ValueError when a row would keep fewer than k labels
    that are neither excluded nor dead (dead: as `check_dead` returns it). Host synchronisations: none without
    exclusions and dead rows; one for the dead count alone; with exclusions, the dead count joins their count."""
    n_dead = None if dead is None else dead.count_nonzero()
    if exclude is None:
        if n_dead is not None and k > num_labels - int(n_dead):
            raise ValueError(f"k={k} exceeds the {num_labels - int(n_dead)} labels left after dead rows")
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
        return check_exclude(None, B, k, num_labels, device, dead)
    if bool(((exclude < -1) | (exclude >= num_labels)).any()):
        raise ValueError(f"exclude ids must be -1 (padding) or in [0, num_labels={num_labels})")
    srt = exclude.sort(dim=1).values
    distinct = (srt >= 0) & torch.cat([torch.ones_like(srt[:, :1], dtype=torch.bool), srt[:, 1:] != srt[:, :-1]], 1)
    if dead is not None:  # an excluded dead row is counted once, with the dead rows
        distinct &= dead[srt.clamp(min=0)] == 0
    most = distinct.sum(dim=1).max()
    most = int(most if n_dead is None else most + n_dead)
    if k > num_labels - most:
        what = "exclusions and dead rows" if dead is not None else "exclusions"
        raise ValueError(f"k={k} exceeds the {num_labels - most} labels left after {what} in some query")
    return exclude


def resolve_fp8_dots(weights: torch.Tensor, fp8_dots: bool | None) -> bool:
    """fp8_dots as given (None: where the GPU has fp8 tensor cores); ValueError when the head is not float8_e4m3fn."""
    if fp8_dots is None:
        return weights.dtype == torch.float8_e4m3fn and has_fp8_tensor_cores(weights.device)
    if fp8_dots and weights.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_dots needs float8_e4m3fn weights, got {weights.dtype}")
    return fp8_dots


def prepare_queries(x: torch.Tensor, weights_dtype: torch.dtype, fp8_dots: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries the dot products use, and the per-row factor applied to the fp32 sums (see `elmo_kernels.topk`).

    Returns (xq (B, D) float8_e4m3fn / bf16 / fp32, inv_scale (B,) fp32).
    """
    if fp8_dots:
        # s_b = 2^e, e the largest integer with amax * 2^e <= 448 = 0.875 * 2^9, from amax = m 2^ex, m in [0.5, 1):
        # e = 9 - ex if m <= 0.875 else 8 - ex (exact, unlike a floating-point log2), clamped to [-126, 126].
        amax = x.float().abs().amax(dim=1)
        m, ex = torch.frexp(amax)
        exp = torch.where(m <= 0.875, 9 - ex, 8 - ex).clamp(-126, 126)
        exp = torch.where(amax > 0, exp, torch.zeros_like(exp)).float()
        xq = (x.float() * torch.exp2(exp)[:, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
        return xq, torch.exp2(-exp)
    dtype = torch.float32 if weights_dtype == torch.float32 else torch.bfloat16
    return x.to(dtype), torch.ones(x.shape[0], dtype=torch.float32, device=x.device)


@triton.jit
def _quantize_kernel(x_ptr, xq_ptr, inv_ptr, D, stride_x, stride_q, BLOCK_D: tl.constexpr):
    """One query row of `prepare_queries(x, fp8_dots=True)` in one launch, bit for bit: the power-of-two scale from
    the bits of max|x| and round-to-nearest-even onto the e4m3 grid by integer arithmetic (the interpreter's own fp32
    -> fp8 conversion is inexact; on-grid values convert exactly everywhere)."""
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


def quantize_queries(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`prepare_queries(x, fp8_dots=True)` as one Triton launch (CUDA, or CPU under TRITON_INTERPRET=1)."""
    B, D = x.shape
    x = x.contiguous()
    xq = torch.empty((B, D), dtype=torch.float8_e4m3fn, device=x.device)
    inv = torch.empty(B, dtype=torch.float32, device=x.device)
    if B:
        _quantize_kernel[(B,)](x, xq, inv, D, x.stride(0), xq.stride(0), BLOCK_D=min(1024, next_pow2(D)))
    return xq, inv
