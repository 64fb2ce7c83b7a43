"""Fused chunked top-k (kernels/topk.py) against full logits + a stable sort, on CPU.

The Triton path runs under TRITON_INTERPRET=1 (set before kernels are imported); the torch path runs as is.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.topk import (  # noqa: E402
    CapturedTopk,
    TopkConfig,
    _screen_cap,
    _screen_levels,
    merge_topk,
    prepare_queries,
    quantize_queries,
    reference_topk,
    topk_scores,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
IMPLS = ["running", "screened", "torch"] if INTERPRET else ["torch"]
# Triton paths: the running top-k kernel (the bitonic merge is slow in the interpreter, so the candidate-insertion
# branch only; test_sort_merge covers the bitonic one), and the screened path with few candidate slots, so that the
# small heads here still take several label ranges and threshold updates.
CONFIGS = {"running": TopkConfig(sort_min=0, screen=False), "screened": TopkConfig(screen=True, screen_cap=64)}


def run(impl, x, w, k, L, **kw):
    """topk_scores through one of IMPLS."""
    if impl == "torch":
        return topk_scores(x, w, k, L, impl="torch", **kw)
    kw.pop("chunk_size", None)
    return topk_scores(x, w, k, L, impl="triton", config=CONFIGS[impl], **kw)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


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


CASES = [
    # (B, L, L_pad, D, k, x dtype, w dtype)
    pytest.param(1, 1009, 1024, 77, 1, torch.float32, torch.bfloat16, id="B1-k1-oddL"),
    pytest.param(3, 1009, 1024, 77, 5, torch.bfloat16, torch.float8_e4m3fn, id="k5-fp8"),
    pytest.param(4, 1000, 1008, 64, 128, torch.float32, torch.float8_e4m3fn, id="k128-L-not-tile-multiple"),
    pytest.param(2, 300, 304, 48, 300, torch.bfloat16, torch.bfloat16, id="k-equals-L"),
    pytest.param(17, 700, 704, 40, 37, torch.float32, torch.float32, id="B17-fp32-weights"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B, L, L_pad, D, k, xdtype, wdtype", CASES)
def test_matches_reference(impl, B, L, L_pad, D, k, xdtype, wdtype):
    x = torch.randn(B, D).to(xdtype)
    w = make_head(L, L_pad, D, wdtype)
    got = run(impl, x, w, k, L, chunk_size=256)
    check(got, reference_topk(x, w, k, L), L)


@pytest.mark.skipif(not INTERPRET, reason="Triton path needs TRITON_INTERPRET=1 on CPU")
@pytest.mark.parametrize(
    "config",
    [TopkConfig(splits=1, screen=False), TopkConfig(screen=True, screen_cap=1060)],
    ids=["running-one-split", "screened-two-ranges"],
)
def test_large_k(config):
    """k >= 1024: the running kernel with k > the tile (insertion path only) and one label range per program; the
    screened path with a first range of 1060 labels and a second of 40."""
    B, L, L_pad, D, k = 2, 1100, 1104, 32, 1030
    x = torch.randn(B, D)
    w = make_head(L, L_pad, D, torch.bfloat16)
    got = topk_scores(x, w, k, L, impl="triton", config=config)
    check(got, reference_topk(x, w, k, L), L)


@pytest.mark.parametrize("impl", IMPLS)
def test_padded_rows_never_returned(impl):
    B, L, L_pad, D = 3, 205, 208, 32
    x = torch.rand(B, D) + 0.5  # positive queries: the padded rows (all 448) would score highest
    w = make_head(L, L_pad, D, torch.float8_e4m3fn, pad_value=448.0)
    for k in (3, L):
        got = run(impl, x, w, k, L)
        check(got, reference_topk(x, w, k, L), L)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("form", ["tensor", "lists"])
def test_exclusions(impl, form):
    B, L, L_pad, D, k = 3, 400, 400, 32, 10
    x = torch.randn(B, D)
    w = make_head(L, L_pad, D, torch.bfloat16)
    _, top = reference_topk(x, w, 4, L)
    # Row 0 excludes its own best 4 labels, row 1 one label twice plus padding, row 2 nothing.
    rows = [top[0].tolist(), [int(top[1, 0]), int(top[1, 0]), -1, -1], [-1, -1, -1, -1]]
    exclude = torch.tensor(rows) if form == "tensor" else [r for r in rows[:2]] + [[]]
    got = run(impl, x, w, k, L, exclude=exclude, chunk_size=128)
    check(got, reference_topk(x, w, k, L, exclude=rows), L, exclude=rows)
    # Every label but k excluded in the fullest row: exactly the k left come back.
    keep = torch.randperm(L)[:k]
    row = [j for j in range(L) if j not in set(keep.tolist())]
    excl = [row, [], [0]]
    got = run(impl, x, w, k, L, exclude=excl)
    assert set(got[1][0].tolist()) == set(keep.tolist())
    check(got, reference_topk(x, w, k, L, exclude=excl), L, exclude=excl)


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_go_to_lower_id(impl):
    """Integer-valued data makes every score exact in fp32, so duplicated rows tie exactly in every path."""
    B, L, L_pad, D, k = 4, 500, 512, 24, 40
    x = torch.randint(-3, 4, (B, D)).float()
    x[x == 0] = 1.0
    w = torch.randint(-4, 5, (L_pad, D)).float()
    w[L:] = 8.0
    dup = torch.randperm(L)[:60]
    w[dup[30:]] = w[dup[:30]]  # 30 pairs of duplicate rows
    w[:, :3] = 0.0  # plenty of further coincidental ties
    w = w.to(torch.float8_e4m3fn)
    got = run(impl, x, w, k, L, chunk_size=100)
    want = reference_topk(x, w, k, L)
    assert torch.equal(got[1], want[1]), f"ids differ at {(got[1] != want[1]).nonzero()[:5].tolist()}"
    assert torch.equal(got[0], want[0])
    # All scores equal: the k lowest ids, in order.
    flat = torch.ones(L_pad, D).to(torch.bfloat16)
    got = run(impl, x, flat, 7, L)
    assert (got[1] == torch.arange(7)).all(), got[1]


@pytest.mark.skipif(not INTERPRET, reason="Triton path needs TRITON_INTERPRET=1 on CPU")
@pytest.mark.parametrize("k, block_l", [(8, 16), (6, 16), (3, 32)])
def test_sort_merge(k, block_l):
    """The bitonic merge branch (forced on every tile with candidates), with KP == BLOCK_L and KP < BLOCK_L."""
    B, L, L_pad, D = 3, 150, 160, 32
    x = torch.randn(B, D)
    w = make_head(L, L_pad, D, torch.bfloat16)
    got = topk_scores(x, w, k, L, impl="triton", config=TopkConfig(block_l=block_l, sort_min=1, splits=2, screen=False))
    check(got, reference_topk(x, w, k, L), L)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp8_dot_quantizes_queries(impl):
    B, L, L_pad, D, k = 3, 333, 336, 64, 9
    x = torch.randn(B, D) * torch.tensor([1e-3, 1.0, 900.0])[:, None]  # scales far from 1 and past 448
    w = make_head(L, L_pad, D, torch.float8_e4m3fn)
    got = run(impl, x, w, k, L, fp8_dot=True)
    want = reference_topk(x, w, k, L, fp8_dot=True)
    check(got, want, L, atol=1e-4 * want[0].abs().max().item())


@pytest.mark.skipif(not INTERPRET, reason="Triton path needs TRITON_INTERPRET=1 on CPU")
def test_quantize_kernel_matches_prepare_queries_bit_for_bit():
    """The one-launch query quantiser of the Triton path against the torch definition: scales far from 1, rows
    that need no scaling, zero rows, bf16 input, fp32 subnormals, and values exactly halfway between e4m3 neighbours
    (normal and subnormal: ties go to the even neighbour)."""
    half = 2.0**-9
    ties = torch.tensor([[448.0, 1.0625, 1.1875, -1.0625, 248.0, 0.5 * half, 1.5 * half, -2.5 * half, 3.0 * 2**-7]])
    rows = [
        torch.randn(7, 77),
        torch.randn(5, 300) * 1e-3,
        torch.randn(3, 64) * 1e4,
        torch.zeros(2, 16),
        torch.randn(4, 33).to(torch.bfloat16),
        torch.randn(6, 50) * torch.logspace(-30, 30, 6)[:, None],
        torch.tensor([[1e-40, -3e-41, 0.0, 2e-39]]),
        ties,
    ]
    for x in rows:
        got, got_inv = quantize_queries(x)
        want, want_inv = prepare_queries(x, torch.float8_e4m3fn, True)
        differ = got.view(torch.uint8) != want.view(torch.uint8)
        assert not differ.any(), f"{int(differ.sum())} codes differ for rows of shape {tuple(x.shape)}"
        assert torch.equal(got_inv, want_inv)
    assert quantize_queries(ties)[0].float().tolist()[0][1:7] == [1.0, 1.25, -1.0, 256.0, 0.0, 2 * half]


def test_merge_equals_single_shard():
    B, L, D, k = 5, 900, 32, 20
    x = torch.randint(-2, 3, (B, D)).float()
    w = torch.randint(-3, 4, (L, D)).float()
    w[600:630] = w[100:130]  # ties across shards resolve to the lower global id
    w = w.to(torch.bfloat16)
    bounds = [0, 256, 600, 900]
    parts = [
        topk_scores(x, w[a:b], min(k, b - a), b - a, impl="torch") for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    got = merge_topk([p[0] for p in parts], [p[1] for p in parts], k, id_offsets=bounds[:-1])
    want = topk_scores(x, w, k, L, impl="torch")
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert torch.equal(got[1], reference_topk(x, w, k, L)[1])
    glob = [p[1] + a for p, a in zip(parts, bounds[:-1], strict=True)]
    assert torch.equal(merge_topk([p[0] for p in parts], glob, k)[1], want[1])


def test_chunked_torch_matches_triton_defaults():
    """Default launch options of both paths (sort merge on, automatic splits) at a small size."""
    B, L, L_pad, D, k = 2, 260, 272, 16, 16
    x = torch.randn(B, D)
    w = make_head(L, L_pad, D, torch.float8_e4m3fn)
    want = reference_topk(x, w, k, L)
    check(topk_scores(x, w, k, L, impl="torch"), want, L)
    if INTERPRET:
        check(topk_scores(x, w, k, L, impl="triton"), want, L)


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


TWO_PASS = TopkConfig(two_pass=True, block_b=32, block_l=32)  # second pass: 16 x 16 tiles


@pytest.mark.skipif(not INTERPRET, reason="Triton path needs TRITON_INTERPRET=1 on CPU")
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("D", [64, 80, 77], ids=["D64-descriptors", "D80-descriptors-ragged-chunk", "D77-pointers"])
def test_two_pass_matches_reference(monkeypatch, k, D):
    """Tile maxima, then only the chosen tiles: 66 first-pass tiles of 32 labels (L odd, the last tile partly
    padding; k = 1: the threshold over groups of 16 tiles, k = 4: over the tiles), each two second-pass parts; B = 21,
    exclusions. Most rows answer from their chosen tiles (a row of duplicated best labels: ties across tiles, broken
    by the lower id). A zero row (every score 0: every tile ties) and a row whose best label recurs in 60 tiles choose
    more than 2k + 16 tiles: the running kernel answers them, and only them."""
    import kernels.topk as topk_module

    B, L, L_pad = 21, 2101, 2112
    w = make_head(L, L_pad, D, torch.bfloat16 if D == 77 else torch.float8_e4m3fn, pad_value=8.0)
    w[[40, 900, 1999]] = w[7].clone()
    w[[32 * t + 3 for t in range(60)]] = (torch.eye(D)[0] * 1.5).to(
        w.dtype
    )  # ties for row 18 only (low for random queries)
    x = torch.randn(B, D).to(torch.bfloat16)
    x[1] = w[7].float() * 4
    x[17] = 0
    x[18] = torch.eye(D)[0]
    excl = torch.randint(0, L, (B, 3))
    excl[1, 0] = 900
    flags = []
    running = topk_module._running_parts
    monkeypatch.setattr(
        topk_module, "_running_parts", lambda *a, flag, **kw: flags.append(flag) or running(*a, flag=flag, **kw)
    )
    got = topk_scores(x, w, k, L, excl, impl="triton", config=TWO_PASS)
    check(got, reference_topk(x, w, k, L, exclude=excl), L, exclude=excl)
    assert got[1][17].tolist() == [i for i in range(k + 3) if i not in excl[17].tolist()][:k]  # score 0: lowest ids
    assert flags[0].tolist() == [0] * 17 + [1, 1] + [0, 0]


@pytest.mark.skipif(not INTERPRET, reason="Triton path needs TRITON_INTERPRET=1 on CPU")
@pytest.mark.parametrize("persistent", [None, False], ids=["persistent-first-pass", "one-program-per-job"])
def test_two_pass_tiles_shared_by_many_rows(monkeypatch, persistent):
    """40 similar queries choose the same few tiles: each such tile is scored in three jobs of at most 16 rows (the
    second pass's rows per job under TWO_PASS), and every row still answers from its chosen tiles. The first pass
    runs persistent (3 programs under the interpreter, each looping over jobs) or as one program per job."""
    import kernels.topk as topk_module

    B, L, L_pad, D, k = 40, 1500, 1504, 64, 3
    w = make_head(L, L_pad, D, torch.float8_e4m3fn)
    x = (torch.randn(1, D) + 0.05 * torch.randn(B, D)).to(torch.bfloat16)
    flags = []
    running = topk_module._running_parts
    monkeypatch.setattr(
        topk_module, "_running_parts", lambda *a, flag, **kw: flags.append(flag) or running(*a, flag=flag, **kw)
    )
    got = topk_scores(x, w, k, L, impl="triton", config=TopkConfig(**{**vars(TWO_PASS), "persistent": persistent}))
    want = reference_topk(x, w, k, L)
    check(got, want, L)
    assert flags[0].tolist() == [0] * B
    assert len(set(want[1][:, 0].tolist())) < 5  # the queries do share their best labels


@pytest.mark.skipif(not INTERPRET, reason="Triton path needs TRITON_INTERPRET=1 on CPU")
def test_two_pass_with_fp8_dots(monkeypatch):
    """Quantized queries (per-row scales far from 1 and past 448) through both passes: the scale enters the tile
    maxima and the second pass's scores alike, so every row answers from its chosen tiles (none falls back)."""
    import kernels.topk as topk_module

    B, L, L_pad, D, k = 3, 333, 336, 64, 4
    x = torch.randn(B, D) * torch.tensor([1e-3, 1.0, 900.0])[:, None]
    w = make_head(L, L_pad, D, torch.float8_e4m3fn)
    flags = []
    running = topk_module._running_parts
    monkeypatch.setattr(
        topk_module, "_running_parts", lambda *a, flag, **kw: flags.append(flag) or running(*a, flag=flag, **kw)
    )
    got = topk_scores(x, w, k, L, impl="triton", fp8_dot=True, config=TWO_PASS)
    want = reference_topk(x, w, k, L, fp8_dot=True)
    check(got, want, L, atol=1e-4 * want[0].abs().max().item())
    assert flags[0].tolist() == [0] * B


def test_two_pass_choice_follows_batch_head_and_memory():
    """Auto: the two-pass path from B = 128, on heads of at least 64 k tiles, where the tile maxima and candidate slots
    fit in 7/8 of the budget."""
    from kernels.topk import _two_pass_tiles

    L = 2_812_281
    tiles = -(-L // 256)
    assert _two_pass_tiles(TopkConfig(), 1024, 5, L) == tiles
    assert _two_pass_tiles(TopkConfig(), 1024, 100, L) == tiles  # 45.0 MB of maxima + 4.2 MB of slots
    assert _two_pass_tiles(TopkConfig(), 128, 5, L) == tiles
    assert _two_pass_tiles(TopkConfig(), 127, 5, L) is None  # fewer queries: the screened path
    assert _two_pass_tiles(TopkConfig(), 1024, 200, L) is None  # fewer than 64 k tiles
    assert _two_pass_tiles(TopkConfig(), 2048, 5, L) is None  # 90 MB of maxima
    assert _two_pass_tiles(TopkConfig(max_partial_bytes=2**27), 2048, 5, L) == tiles
    assert _two_pass_tiles(TopkConfig(two_pass=False), 1024, 5, L) is None
    with pytest.raises(ValueError, match="two_pass"):
        _two_pass_tiles(TopkConfig(two_pass=True), 2048, 5, L)


@pytest.mark.skipif(not INTERPRET, reason="Triton path needs TRITON_INTERPRET=1 on CPU")
def test_two_pass_needs_room_for_its_tile_maxima():
    x, w = torch.randn(4, 32), torch.randn(4096, 32).to(torch.bfloat16)
    with pytest.raises(ValueError, match="two_pass"):
        topk_scores(x, w, 5, 4096, impl="triton", config=TopkConfig(two_pass=True, block_l=16, max_partial_bytes=1024))


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
    levels = _screen_levels(k, L, cap, growth, first)
    assert levels[0] == (0, min(L, cap, first or cap))
    assert all(a < b for a, b in levels) and levels[-1][1] == L
    assert all(levels[i][1] == levels[i + 1][0] for i in range(len(levels) - 1))
    if growth is not None:  # every range but a folded tail stays within the growth bound
        assert all(b - a <= (growth - 1) * a for a, b in levels[1:-1])


def test_screen_choice_follows_the_memory_budget():
    """Auto: screened where k <= cap / 8 (cap from half the budget over B rows, a power of two, at most 4096; 2048 up
    to 8 queries), except small batches with short lists."""
    assert _screen_cap(TopkConfig(), 1, 100) == 2048
    assert _screen_cap(TopkConfig(), 8, 256) == 2048
    assert _screen_cap(TopkConfig(), 9, 100) == 4096
    assert _screen_cap(TopkConfig(), 4096, 100) == 1024
    assert _screen_cap(TopkConfig(), 1024, 100) == 4096  # 64 MiB / 2 / (8 B * 1024)
    assert _screen_cap(TopkConfig(), 1, 1000) is None  # the running kernel
    assert _screen_cap(TopkConfig(), 32, 16) is None  # eager small batch, short lists: fewer launches
    assert _screen_cap(TopkConfig(), 33, 16) == 4096
    assert _screen_cap(TopkConfig(screen=False), 1, 5) is None
    assert _screen_cap(TopkConfig(screen=True), 1024, 1000) == 4096
    assert _screen_cap(TopkConfig(screen=True, screen_cap=10), 4, 50) == 50  # never fewer slots than k
    with pytest.raises(ValueError):
        _screen_cap(TopkConfig(screen_cap=0), 4, 5)


@pytest.mark.skipif(not INTERPRET, reason="Triton path needs TRITON_INTERPRET=1 on CPU")
@pytest.mark.parametrize("field, value", [("merge_block", 24), ("merge_warps", 24), ("merge_block", 0)])
def test_screening_options_are_checked(field, value):
    x, w = torch.randn(2, 32), make_head(100, 112, 32, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=field):
        topk_scores(x, w, 3, 100, impl="triton", config=TopkConfig(screen=True, **{field: value}))


def test_captured_topk_needs_a_cuda_head():
    """CUDA graphs exist only on CUDA: a CPU head is refused with a message (the GPU replay is checked against the
    reference by benchmarks/topk.py)."""
    w = torch.randn(32, 16).to(torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA"):
        CapturedTopk(w, 5, 30, 4)


def _bad_calls():
    x = torch.randn(2, 16)
    w = torch.randn(32, 16).to(torch.bfloat16)
    return [
        ("k <= 0", lambda: topk_scores(x, w, 0, 30)),
        ("k > num_labels", lambda: topk_scores(x, w, 31, 30)),
        ("k not int", lambda: topk_scores(x, w, 2.0, 30)),
        ("num_labels > rows", lambda: topk_scores(x, w, 2, 33)),
        ("num_labels <= 0", lambda: topk_scores(x, w, 1, 0)),
        ("D mismatch", lambda: topk_scores(torch.randn(2, 15), w, 2, 30)),
        ("x 1-D", lambda: topk_scores(torch.randn(16), w, 2, 30)),
        ("x 3-D", lambda: topk_scores(torch.randn(1, 2, 16), w, 2, 30)),
        ("weights 1-D", lambda: topk_scores(x, w[0], 2, 30)),
        ("x int", lambda: topk_scores(x.long(), w, 2, 30)),
        ("x fp16", lambda: topk_scores(x.half(), w, 2, 30)),
        ("weights fp16", lambda: topk_scores(x, w.half(), 2, 30)),
        ("weights e5m2", lambda: topk_scores(x, w.to(torch.float8_e5m2), 2, 30)),
        ("fp8_dot on bf16", lambda: topk_scores(x, w, 2, 30, fp8_dot=True)),
        ("impl", lambda: topk_scores(x, w, 2, 30, impl="cuda")),
        ("exclude rows", lambda: topk_scores(x, w, 2, 30, exclude=torch.zeros(3, 1, dtype=torch.long))),
        ("exclude id", lambda: topk_scores(x, w, 2, 30, exclude=[[30], []])),
        ("exclude neg", lambda: topk_scores(x, w, 2, 30, exclude=[[-2], []])),
        ("exclude float", lambda: topk_scores(x, w, 2, 30, exclude=torch.zeros(2, 1))),
        ("exclude too many", lambda: topk_scores(x, w, 2, 30, exclude=[list(range(29)), []])),
        ("merge k", lambda: merge_topk([torch.zeros(2, 3)], [torch.zeros(2, 3, dtype=torch.long)], 4)),
        ("merge shapes", lambda: merge_topk([torch.zeros(2, 3)], [torch.zeros(2, 2, dtype=torch.long)], 1)),
        ("merge offsets", lambda: merge_topk([torch.zeros(2, 3)], [torch.zeros(2, 3, dtype=torch.long)], 1, [0, 1])),
    ]


@pytest.mark.parametrize("name, call", _bad_calls(), ids=[n for n, _ in _bad_calls()])
def test_bad_arguments_raise_value_error(name, call):
    with pytest.raises(ValueError):
        call()
