"""Shared helpers of the top-k tests (tests/kernels/test_topk*.py): the paths under test, a head, and the check of an
answer against the full-logits reference."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import elmo_kernels.topk.running as running_module  # noqa: E402
from elmo_kernels.topk import TopkConfig, topk_scores  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
IMPLS = ["running", "screened", "torch"] if INTERPRET else ["torch"]
# Triton paths: the running top-k kernel (the bitonic merge is slow in the interpreter, so the candidate-insertion
# branch only; test_sort_merge covers the bitonic one), and the screened path with few candidate slots, so that the
# small heads here still take several label ranges and threshold updates.
CONFIGS = {"running": TopkConfig(sort_min=0, screen=False), "screened": TopkConfig(screen=True, screen_cap=64)}
TWO_PASS = TopkConfig(two_pass=True, block_b=32, block_l=32)  # second pass: 16 x 16 tiles


def run(impl, x, w, k, L, **kw):
    """topk_scores through one of IMPLS."""
    if impl == "torch":
        return topk_scores(x, w, k, L, impl="torch", **kw)
    kw.pop("chunk_size", None)
    return topk_scores(x, w, k, L, impl="triton", config=CONFIGS[impl], **kw)


def make_head(L, L_pad, D, dtype, pad_value=None):
    w = torch.randn(L_pad, D) * 0.3 + 0.05
    if pad_value is not None:
        w[L:] = pad_value
    return w.to(dtype)


def check(got, want, num_labels, exclude=None, margin=1e-4, atol=1e-4):
    """Scores close and sorted; ids valid, unique, not excluded; ids equal wherever the reference scores are distinct
    by `margin` (from both neighbours, and at the boundary from the (k+1)-th label); print the first mismatches."""
    (s, i), (rs, ri) = got, want
    assert s.shape == rs.shape and i.shape == ri.shape, (s.shape, rs.shape)
    assert s.dtype == torch.float32 and i.dtype == torch.int64
    assert ((i >= 0) & (i < num_labels)).all(), f"ids out of range: {i[(i < 0) | (i >= num_labels)][:10].tolist()}"
    assert (s[:, 1:] <= s[:, :-1]).all(), "scores not sorted descending"
    assert all(len(set(r)) == len(r) for r in i.tolist()), "duplicate ids in a row"
    if exclude is not None:
        rows = exclude.tolist() if isinstance(exclude, torch.Tensor) else exclude
        for b, row in enumerate(rows):
            bad = set(i[b].tolist()) & {e for e in row if e >= 0}
            assert not bad, f"row {b} returned excluded ids {sorted(bad)[:10]}"
    diff = (s - rs).abs()
    if not (diff <= atol + 1e-5 * rs.abs()).all():
        b, j = (diff == diff.max()).nonzero()[0].tolist()
        pytest.fail(f"scores differ: max |diff| {diff.max():.3g} at ({b}, {j}): got {s[b, j]}, want {rs[b, j]}")
    gap = torch.full_like(rs, float("inf"))
    gap[:, 1:] = rs[:, :-1] - rs[:, 1:]
    gap[:, :-1] = torch.minimum(gap[:, :-1], rs[:, :-1] - rs[:, 1:])
    distinct = gap > margin
    bad = distinct & (i != ri)
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        detail = [(b, j, int(i[b, j]), int(ri[b, j]), float(rs[b, j])) for b, j in where]
        pytest.fail(f"{int(bad.sum())} ids differ at distinct scores; first (row, rank, got, want, score): {detail}")


def record_fallback_flags(monkeypatch) -> list:
    """The rows flagged for the running kernel's fallback, one (B,) tensor per call, recorded as the paths run."""
    flags = []
    running = running_module._running_parts
    monkeypatch.setattr(
        running_module, "_running_parts", lambda *a, flag, **kw: flags.append(flag) or running(*a, flag=flag, **kw)
    )
    return flags
