"""The CPU screened top-k (elmo_kernels/topk/cpu.py: a bf16 screen, then exact fp32 rescoring) against the reference, on
ties, near ties and a screen as wrong as its error bound allows."""

import pytest
import torch

from elmo_kernels.topk import ScreenedTopk, prepare_queries, reference_topk


def _mismatch(a, b):
    bad = (a != b).nonzero()[:5].tolist()
    return f"first mismatches at {bad}"


def _queries(x, w):
    """The queries rounded as `topk_scores` rounds them for an fp8/bf16 head (as the serving scorer passes them)."""
    return prepare_queries(x.float(), w.dtype, False)[0]


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16])
def test_cpu_screen_is_exact_on_ties_and_near_ties(dtype):
    # The bf16 screen cannot tell these labels apart: every one of them must reach the exact fp32 rescoring.
    L, D = 2000, 96
    g = torch.Generator().manual_seed(6)
    w = torch.randn(L + 16, D, generator=g)
    w[100:400] = w[7]  # exact ties: broken by the lower id
    w[400:700] = w[7] * (1 + 2.0**-9 * torch.randint(-2, 3, (300, 1), generator=g))  # within bf16 rounding
    w[700:800] = 0
    w[L:] = 100.0  # padding
    w = w.to(dtype)
    x = torch.randn(6, D, generator=g)
    x[1] = 0  # every score 0: the k lowest ids
    x[2] = w[7].float() * 3  # the tied block on top
    excl = [[], [0, 1, 2], list(range(100, 150)), [7], [], list(range(1990, 2000))]
    screened = ScreenedTopk(w, L)
    for k in (1, 10, 350):
        s, i = screened(_queries(x, w), k, excl)
        rs, ri = reference_topk(x, w, k, L, excl)
        assert torch.equal(i, ri), _mismatch(i, ri)
        torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="exclude ids"):
        screened(_queries(x[:1], w), 3, [[L]])


def test_cpu_screen_is_exact_for_any_screen_within_its_error_bound():
    # A bf16 screen as wrong as the bound allows (scores off by 2^-8 relative, then rounded to bf16, up or down by
    # label) must still give the exact answer: its margin sends every label that may be in the top-k to rescoring.
    L, D = 3000, 64
    g = torch.Generator().manual_seed(8)
    w = torch.randn(L + 16, D, generator=g)
    w[500:1500] = w[3]
    w[500:1500, 0] += torch.linspace(-0.05, 0.05, 1000)  # 1000 labels within a fraction of a percent of each other
    w = w.to(torch.bfloat16)
    x = torch.randn(4, D, generator=g)
    x[:2] = w[3].float() + 0.1 * x[:2]  # the near-tied block on top
    screened = ScreenedTopk(w, L)
    screen = screened._screen
    sign = torch.where(torch.arange(L) % 2 == 0, 1.0, -1.0)
    screened._screen = lambda xq: (screen(xq).float() * (1 + 2.0**-8 * sign)).to(torch.bfloat16)
    for k in (1, 10, 200):
        s, i = screened(_queries(x, w), k)
        rs, ri = reference_topk(x, w, k, L)
        assert torch.equal(i, ri), _mismatch(i, ri)
        torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-4)
