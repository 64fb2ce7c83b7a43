"""Stochastic rounding kernel vs its reference; unbiasedness, saturation, determinism (CPU: Triton interpreter)."""

import math

import numpy as np
import pytest
import torch
from kernel_checks import assert_same_bits

from elmo_kernels import reference
from elmo_kernels.common import FP8_FORMATS
from elmo_kernels.rounding import stochastic_round

DTYPES = [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


def _spread(rows: int, cols: int) -> torch.Tensor:
    # Magnitudes from 1e-6 (e4m3 subnormals and below) to 1e3 (past e4m3's 448), both signs.
    return torch.randn(rows, cols) * torch.logspace(-6, 3, cols)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 77), (9, 300)])
def test_matches_reference_bit_for_bit(dtype, shape):
    x = _spread(*shape)
    out = torch.full(shape, float("nan")).to(dtype)  # poisoned: every element must be written
    stochastic_round(x, dtype, seed=1234, out=out)
    expected = reference.stochastic_round(x, dtype, seed=1234)
    assert_same_bits(out, expected, what=str(dtype))
    bits = torch.int16 if dtype == torch.bfloat16 else torch.uint8
    assert torch.equal(out.view(bits), expected.view(bits)), "the raw bits (signs of zeros too) must match"


def _neighbours(value: float, dtype: torch.dtype) -> tuple[float, float]:
    lo = reference.round_to(torch.tensor([value]), dtype, torch.zeros(1, dtype=torch.int32)).item()
    hi = reference.round_to(torch.tensor([value]), dtype, torch.full((1,), 65535, dtype=torch.int32)).item()
    return lo, hi


@pytest.mark.parametrize(
    ("dtype", "value"),
    [
        (torch.float8_e4m3fn, 0.3),  # normal
        (torch.float8_e4m3fn, -1.37),
        (torch.float8_e4m3fn, 0.01),  # subnormal: below 2^-6
        (torch.float8_e4m3fn, 0.0031),
        (torch.float8_e4m3fn, 0.0007),  # below the smallest subnormal 2^-9
        (torch.float8_e4m3fn, 437.0),  # between 416 and 448
        (torch.float8_e4m3fn, -446.5),
        (torch.float8_e5m2, 3.3e-5),  # e5m2 subnormal
        (torch.float8_e5m2, 0.7),
        (torch.bfloat16, 1.0 + 2**-10),
        # Tiny but normal: the interpreter's own fp32 -> bf16 cast mangles fp32 subnormals (the kernel's bits are
        # right; the reference test above covers the rounding rule there).
        (torch.bfloat16, -3.3e-30),
    ],
)
def test_unbiased(dtype, value):
    n = 1 << 16
    x = torch.full((64, n // 64), value)
    y = stochastic_round(x, dtype, seed=99).float()
    lo, hi = _neighbours(value, dtype)
    assert set(y.unique().tolist()) <= {lo, hi}, "only the two neighbouring grid points may appear"
    p = (value - lo) / (hi - lo)
    std_err = abs(hi - lo) * math.sqrt(p * (1 - p) / n)
    assert abs(y.double().mean().item() - value) <= 4 * std_err + 1e-12 * abs(value)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_saturates_and_keeps_nan(dtype):
    top = FP8_FORMATS[dtype][2]
    x = torch.tensor([[1e9, -1e9, float("inf"), -float("inf"), top * 1.03, float("nan"), 0.0, 1.0]])
    y = stochastic_round(x, dtype, seed=5).float()
    assert y[0, :5].tolist() == [top, -top, top, -top, top]
    assert torch.isnan(y[0, 5])
    assert y[0, 6:].tolist() == [0.0, 1.0]


def test_on_grid_values_are_exact():
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[~torch.isnan(grid)].reshape(1, -1)
    assert_same_bits(stochastic_round(grid, torch.float8_e4m3fn, seed=3), grid, what="fp8 grid")


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_per_seed_and_offset(dtype):
    x = _spread(6, 40)
    a = stochastic_round(x, dtype, seed=7)
    assert_same_bits(stochastic_round(x, dtype, seed=7), a, what="same seed")
    differ = (stochastic_round(x, dtype, seed=8).float() != a.float()).float().mean().item()
    assert differ > 0.05, "a different seed must round differently"
    # Row r of a slice with row_offset=k draws the stream of row k + r of the whole matrix.
    assert_same_bits(stochastic_round(x[2:], dtype, seed=7, row_offset=2), a[2:], what="row offset")


def test_random_bits_are_uniform_and_uncorrelated():
    # The stream's own quality at a small size (elmo_kernels.rounding.random_u16 documents the larger run).
    bits = reference.random_u16(3, 1024, 1024, row_offset=5).numpy().astype(np.int64)
    n = bits.size
    for field in (bits >> 8, bits & 255):  # high and low bytes: chi-square over 256 bins, 255 degrees of freedom
        counts = np.bincount(field.ravel(), minlength=256)
        chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum()
        assert abs(chi2 - 255) < 6 * math.sqrt(2 * 255), chi2
    centred = bits - 32767.5
    other = reference.random_u16(4, 1024, 1024, row_offset=5).numpy() - 32767.5
    pairs = {
        "columns": (centred[:, :-1], centred[:, 1:]),
        "columns 64 apart (one word's halves)": (centred[:, :-64], centred[:, 64:]),
        "rows": (centred[:-1], centred[1:]),
        "seeds": (centred, other),
    }
    for what, (a, b) in pairs.items():
        r = float((a * b).mean() / np.sqrt((a * a).mean() * (b * b).mean()))
        assert abs(r) < 6 / math.sqrt(a.size), f"{what}: correlation {r:.2e}"


def test_bad_arguments():
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="targets"):
        stochastic_round(x, torch.float16, seed=0)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        stochastic_round(x.double(), torch.bfloat16, seed=0)
    with pytest.raises(ValueError, match="seed"):
        stochastic_round(x, torch.bfloat16, seed=-1)
    with pytest.raises(ValueError, match="row_offset"):
        stochastic_round(x, torch.bfloat16, seed=0, row_offset=2**32 - 2)
    with pytest.raises(ValueError, match="out must be"):
        stochastic_round(x, torch.bfloat16, seed=0, out=torch.empty(3, 4, dtype=torch.bfloat16))
