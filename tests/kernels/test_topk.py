"""Exact top-k (elmo_kernels/topk/) against full logits + a stable sort, on CPU: the entry point through every path, the
running kernel, the torch path, query quantisation, the shard merge and the argument checks.

The Triton path runs under TRITON_INTERPRET=1 (set before kernels are imported); the torch path runs as is.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from topk_checks import IMPLS, INTERPRET, check, make_head, run  # noqa: E402

from elmo_kernels.topk import (  # noqa: E402
    CapturedTopk,
    TopkConfig,
    merge_topk,
    prepare_queries,
    quantize_queries,
    reference_topk,
    topk_scores,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


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
def test_fp8_dots_quantize_queries(impl):
    B, L, L_pad, D, k = 3, 333, 336, 64, 9
    x = torch.randn(B, D) * torch.tensor([1e-3, 1.0, 900.0])[:, None]  # scales far from 1 and past 448
    w = make_head(L, L_pad, D, torch.float8_e4m3fn)
    got = run(impl, x, w, k, L, fp8_dots=True)
    want = reference_topk(x, w, k, L, fp8_dots=True)
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
        ("fp8_dots on bf16", lambda: topk_scores(x, w, 2, 30, fp8_dots=True)),
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
