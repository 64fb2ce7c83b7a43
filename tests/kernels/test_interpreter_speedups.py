"""The interpreter's vectorised xor reduction (tests/interpreter_speedups.py) against its own per-element loop."""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from elmo_kernels.common import interpreting

pytestmark = pytest.mark.skipif(not interpreting(), reason="a shim of the Triton interpreter (TRITON_INTERPRET=1)")


@triton.jit
def _xor_kernel(x_ptr, rows_ptr, cols_ptr, all_ptr, R: tl.constexpr, C: tl.constexpr):
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    x = tl.load(x_ptr + offs)
    tl.store(rows_ptr + tl.arange(0, R), tl.xor_sum(x, 1))
    tl.store(cols_ptr + tl.arange(0, C), tl.xor_sum(x, 0))
    tl.store(all_ptr, tl.xor_sum(tl.reshape(x, (R * C,)), 0))


@triton.jit
def _sort_kernel(x_ptr, out_ptr, top_ptr, N: tl.constexpr, K: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, N))
    tl.store(out_ptr + tl.arange(0, N), tl.sort(x, descending=True))
    tl.store(top_ptr + tl.arange(0, K), tl.topk(x, K))


def _run_both(fn):
    """fn() with the vectorised reduction, then with the interpreter's generic loop."""
    fast = fn()
    ops = interpreter.ReduceOps
    shim = ops.apply_impl
    assert shim.vectorised_xor, "conftest installs the shim"
    ops.apply_impl = shim.generic
    try:
        slow = fn()
    finally:
        ops.apply_impl = shim
    return fast, slow


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_xor_sum_matches_the_generic_reduction(dtype):
    x = torch.randint(-(2**31), 2**31 - 1, (8, 16), dtype=torch.int64).to(dtype)

    def call():
        outs = [
            torch.full((8,), -7, dtype=dtype),
            torch.full((16,), -7, dtype=dtype),
            torch.full((1,), -7, dtype=dtype),
        ]
        _xor_kernel[(1,)](x, *outs, R=8, C=16)
        return outs

    fast, slow = _run_both(call)
    for f, s in zip(fast, slow, strict=True):
        assert torch.equal(f, s)
    assert torch.equal(fast[0], torch.from_numpy(np.bitwise_xor.reduce(x.numpy(), axis=1)))


def test_sort_and_topk_agree_with_the_generic_reduction_and_torch():
    x = torch.randn(256)
    x[17] = x[200]  # a tie

    def call():
        out, top = torch.full((256,), float("nan")), torch.full((32,), float("nan"))
        _sort_kernel[(1,)](x, out, top, N=256, K=32)
        return out, top

    (out, top), (out_slow, top_slow) = _run_both(call)
    assert torch.equal(out, out_slow) and torch.equal(top, top_slow)
    assert torch.equal(out, torch.sort(x, descending=True).values) and torch.equal(top, out[:32])
