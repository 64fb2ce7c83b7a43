"""Speed-ups of the Triton interpreter for the CPU tests: the same results, less Python per element.

The interpreter reduces with one Python call of the combine function per element unless it knows that function
(max, min, sum, argmax). `tl.sort` and `tl.topk` xor-reduce a hypercube at every compare-and-swap (`xor_sum`), so
the merge of a k = 1030 top-k list (a 4096-key `tl.topk`) took ~70 s per row. XOR is associative and commutative:
numpy's `bitwise_xor.reduce` gives the same bits at once (`tests/kernels/test_interpreter_speedups.py` checks it
against the interpreter's own loop).
"""

import numpy as np


def install() -> None:
    """Give the interpreter's ReduceOps a vectorised xor reduction (idempotent)."""
    import triton.language as tl
    from triton.runtime import interpreter

    ops = interpreter.ReduceOps
    if getattr(ops.apply_impl, "vectorised_xor", False):
        return
    generic = ops.apply_impl

    def apply_impl(self, input):
        if self.combine_fn is tl.standard._xor_combine and len(input) == 1:
            x = input[0]
            return self.to_tensor(
                np.bitwise_xor.reduce(x.handle.data, axis=self.axis, keepdims=self.keep_dims), x.dtype
            )
        return generic(self, input)

    apply_impl.vectorised_xor = True
    apply_impl.generic = generic
    ops.apply_impl = apply_impl
