"""The screened Triton top-k (elmo_kernels/topk/screened.py): overflow fallback, kernel options, stale buffers,
its label ranges and when it is chosen. Under TRITON_INTERPRET=1 on CPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from topk_checks import INTERPRET, TWO_PASS, check, make_head  # noqa: E402

from elmo_kernels.topk import TopkConfig, reference_topk, topk_scores  # noqa: E402
from elmo_kernels.topk.screened import screen_cap, screen_levels  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.mark.skipif(not INTERPRET, reason="Triton path needs TRITON_INTERPRET=1 on CPU")
@pytest.mark.parametrize("exclude", [None, [[599, 0], [597]]], ids=["plain", "exclusions"])
def test_screened_overflow_falls_back_exactly(exclude):
    """Scores rising with the label id defeat every threshold: each later range overflows its candidate slots, and
    the overflowing rows come from the running kernel. One row ascending, one descending (which never overflows)."""
    B, L, L_pad, D, k = 2, 600, 608, 16, 5
    x = torch.ones(B, D)
    x[1] = -1.0
    w = (torch.linspace(-1, 1, L_pad)[:, None] + 0.01 * torch.randn(L_pad, D)).to(torch.bfloat16)
    got = topk_scores(x, w, k, L, exclude=exclude, impl="triton", config=TopkConfig(screen=True, screen_cap=40))
    check(got, reference_topk(x, w, k, L, exclude=exclude), L, exclude=exclude)


@pytest.mark.skipif(not INTERPRET, reason="Triton path needs TRITON_INTERPRET=1 on CPU")
@pytest.mark.parametrize(
    "variant",
    [
        {"tma": True},
        {"screen_first": 16},
        {"tma": True, "screen_first": 3},
        {"merge_block": 16, "merge_warps": 2},
        {"gate": False, "screen_first": 3},
        {"gate": True, "tma": False, "screen_first": 3},
    ],
    ids=["descriptors", "first-16", "all-first-3", "merge-16-at-a-time", "no-row-gate", "row-gate-pointers"],
)
@pytest.mark.parametrize("D", [64, 77], ids=["D64", "D77-no-descriptors"])
def test_screening_kernel_variants(variant, D):
    """The screened path's options give the reference answer: tiles through tensor descriptors (the last query block
    and label tile run past the tensors' ends; D = 77 bf16 rows are not 16-byte aligned, so the pointer loads stay), a
    short first range (fewer labels than k: no threshold yet in the second range), merges of 16 candidates at a time,
    the row gate off and on through pointer loads (B = 5 in a 16-row block: rows past B must not open the gate)."""
    B, L, L_pad, k = 5, 1009, 1024, 5
    x = torch.randn(B, D).to(torch.bfloat16)
    w = make_head(L, L_pad, D, torch.bfloat16 if D == 77 else torch.float8_e4m3fn, pad_value=8.0)
    excl = torch.randint(0, L, (B, 2))
    got = topk_scores(x, w, k, L, excl, impl="triton", config=TopkConfig(screen=True, screen_cap=64, **variant))
    check(got, reference_topk(x, w, k, L, exclude=excl), L, exclude=excl)


@pytest.mark.skipif(not INTERPRET, reason="Triton path needs TRITON_INTERPRET=1 on CPU")
@pytest.mark.parametrize("config", [TopkConfig(screen=True, screen_cap=64), TWO_PASS], ids=["screened", "two-pass"])
def test_screened_ignores_stale_buffer_contents(monkeypatch, config):
    """Candidate slots past a row's count hold whatever memory held: fill every fresh buffer with the best possible
    key (or NaN) and check that none of it leaks into the answer."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(2**63 - 1) if t.dtype == torch.int64 else t.fill_(float("nan")) if t.is_floating_point() else t

    B, L, L_pad, D, k = 3, 700, 704, 32, 6
    x = torch.randn(B, D)
    w = make_head(L, L_pad, D, torch.float8_e4m3fn)
    want = reference_topk(x, w, k, L)
    monkeypatch.setattr(torch, "empty", poisoned)
    got = topk_scores(x, w, k, L, impl="triton", config=config)
    monkeypatch.undo()
    check(got, want, L)


@pytest.mark.parametrize(
    "k, L, cap, growth, first",
    [
        (5, 2_812_281, 4096, None, None),
        (100, 2_812_281, 4096, 4.0, None),
        (100, 2_812_281, 4096, None, 1024),
        (7, 100, 64, None, None),
        (7, 100, 64, None, 500),  # more than cap: clamped
        (1030, 1100, 1060, 2, None),
    ],
)
def test_screen_levels_cover_the_labels_once(k, L, cap, growth, first):
    levels = screen_levels(k, L, cap, growth, first)
    assert levels[0] == (0, min(L, cap, first or cap))
    assert all(a < b for a, b in levels) and levels[-1][1] == L
    assert all(levels[i][1] == levels[i + 1][0] for i in range(len(levels) - 1))
    if growth is not None:  # every range but a folded tail stays within the growth bound
        assert all(b - a <= (growth - 1) * a for a, b in levels[1:-1])


def test_screen_choice_follows_the_memory_budget():
    """Auto: screened where k <= cap / 8 (cap from half the budget over B rows, a power of two, at most 4096; 2048 up
    to 8 queries), except small batches with short lists."""
    assert screen_cap(TopkConfig(), 1, 100) == 2048
    assert screen_cap(TopkConfig(), 8, 256) == 2048
    assert screen_cap(TopkConfig(), 9, 100) == 4096
    assert screen_cap(TopkConfig(), 4096, 100) == 1024
    assert screen_cap(TopkConfig(), 1024, 100) == 4096  # 64 MiB / 2 / (8 B * 1024)
    assert screen_cap(TopkConfig(), 1, 1000) is None  # the running kernel
    assert screen_cap(TopkConfig(), 32, 16) is None  # eager small batch, short lists: fewer launches
    assert screen_cap(TopkConfig(), 33, 16) == 4096
    assert screen_cap(TopkConfig(screen=False), 1, 5) is None
    assert screen_cap(TopkConfig(screen=True), 1024, 1000) == 4096
    assert screen_cap(TopkConfig(screen=True, screen_cap=10), 4, 50) == 50  # never fewer slots than k
    with pytest.raises(ValueError):
        screen_cap(TopkConfig(screen_cap=0), 4, 5)


@pytest.mark.skipif(not INTERPRET, reason="Triton path needs TRITON_INTERPRET=1 on CPU")
@pytest.mark.parametrize("field, value", [("merge_block", 24), ("merge_warps", 24), ("merge_block", 0)])
def test_screening_options_are_checked(field, value):
    x, w = torch.randn(2, 32), make_head(100, 112, 32, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=field):
        topk_scores(x, w, 3, 100, impl="triton", config=TopkConfig(screen=True, **{field: value}))
