"""Launch options of the Triton paths (`TopkConfig`), and the host helpers every path shares to launch its kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from elmo_kernels.common import interpreting

try:  # host-side tensor descriptors (TMA); older tritons lack them and keep the pointer loads
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed triton
    TensorDescriptor = None

DEFAULT_MAX_PARTIAL_BYTES = 64 * 2**20
TWO_PASS_BLOCK_L = 256  # labels per first-pass tile of the two-pass path (one tile maximum per row each)


@dataclass
class TopkConfig:
    """Launch options of the Triton path; None picks a default from the shapes (see each path's resolver)."""

    block_b: int | None = None  # queries per program (>= 16 for tl.dot)
    block_l: int | None = None  # labels per tile (power of two)
    block_d: int | None = None  # reduction chunk (power of two >= 16)
    splits: int | None = None  # label ranges scored in parallel; the partial lists are B x splits x k keys
    sort_min: int | None = None  # bitonic merge when a tile has >= this many candidates in a row (0: never)
    num_warps: int | None = None
    num_stages: int | None = None
    max_partial_bytes: int = DEFAULT_MAX_PARTIAL_BYTES  # bound on the partial lists when `splits` is automatic
    screen: bool | None = None  # screened path (see `topk_screened`); None: where the candidate lists fit (k <= cap/8)
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


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def descriptors_fit(xq: torch.Tensor, weights: torch.Tensor) -> bool:
    """Tensor descriptors (TMA) need 16-byte aligned bases and row strides, and a unit stride along D."""
    return TensorDescriptor is not None and all(
        t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 and t.stride(1) == 1
        for t in (xq, weights)
    )


def tile_meta(c: TopkConfig, D: int, fp8_dots: bool, has_excl: bool, has_dead: bool) -> dict:
    """Launch options shared by the scoring kernels (tile sizes, dot flavour, masks, warps and stages)."""
    return {
        "BLOCK_B": c.block_b,
        "BLOCK_L": c.block_l,
        "BLOCK_D": c.block_d,
        "FP8_DOTS": fp8_dots,
        "HAS_SCALE": fp8_dots,
        "HAS_EXCL": has_excl,
        "HAS_DEAD": has_dead,
        "EVEN_D": D % c.block_d == 0,
        "UPCAST": interpreting(),
        "num_warps": c.num_warps,
        "num_stages": c.num_stages,
        **({"maxnreg": c.maxnreg} if c.maxnreg and not interpreting() else {}),
    }
