"""Comparison helpers for the kernel tests."""

import torch


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, max_fraction: float = 0.0, what: str = "") -> None:
    """Equal values (NaN equals NaN) in all but `max_fraction` of the elements; prints the first mismatches."""
    a, e = actual.float().flatten(), expected.float().flatten()
    bad = ~((a == e) | (torch.isnan(a) & torch.isnan(e)))
    frac = bad.float().mean().item() if bad.numel() else 0.0
    if frac > max_fraction:
        idx = bad.nonzero().flatten()[:8]
        pairs = ", ".join(f"[{i}] {a[i].item():.6g} != {e[i].item():.6g}" for i in idx.tolist())
        raise AssertionError(f"{what}: {frac:.3%} of {a.numel()} elements differ (allowed {max_fraction:.3%}): {pairs}")
