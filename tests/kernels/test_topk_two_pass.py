"""The two-pass Triton top-k (elmo_kernels/topk/two_pass.py): tile maxima, chosen tiles, the fallback rows, fp8
dots, and when it is chosen. Under TRITON_INTERPRET=1 on CPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from topk_checks import INTERPRET, TWO_PASS, check, make_head, record_fallback_flags  # noqa: E402

from elmo_kernels.topk import TopkConfig, reference_topk, topk_scores  # noqa: E402
from elmo_kernels.topk.two_pass import two_pass_tiles  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.mark.skipif(not INTERPRET, reason="Triton path needs TRITON_INTERPRET=1 on CPU")
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("D", [64, 80, 77], ids=["D64-descriptors", "D80-descriptors-ragged-chunk", "D77-pointers"])
def test_two_pass_matches_reference(monkeypatch, k, D):
    """Tile maxima, then only the chosen tiles: 66 first-pass tiles of 32 labels (L odd, the last tile partly
    padding; k = 1: the threshold over groups of 16 tiles, k = 4: over the tiles), each two second-pass parts; B = 21,
    exclusions. Most rows answer from their chosen tiles (a row of duplicated best labels: ties across tiles, broken
    by the lower id). A zero row (every score 0: every tile ties) and a row whose best label recurs in 60 tiles choose
    more than 2k + 16 tiles: the running kernel answers them, and only them."""
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
    # exclusions far down each row's ranking (an excluded label inside a row's chosen tiles may send it to the
    # running kernel, which is right but would blur which rows must fall back), except row 1's tied best label 900
    ranked = reference_topk(x, w, 300, L)[1]
    excl = torch.gather(ranked, 1, 200 + torch.randint(0, 100, (B, 3)))
    excl[1, 0] = 900
    flags = record_fallback_flags(monkeypatch)
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
    B, L, L_pad, D, k = 40, 1500, 1504, 64, 3
    w = make_head(L, L_pad, D, torch.float8_e4m3fn)
    x = (torch.randn(1, D) + 0.05 * torch.randn(B, D)).to(torch.bfloat16)
    flags = record_fallback_flags(monkeypatch)
    got = topk_scores(x, w, k, L, impl="triton", config=TopkConfig(**{**vars(TWO_PASS), "persistent": persistent}))
    want = reference_topk(x, w, k, L)
    check(got, want, L)
    assert flags[0].tolist() == [0] * B
    assert len(set(want[1][:, 0].tolist())) < 5  # the queries do share their best labels


@pytest.mark.skipif(not INTERPRET, reason="Triton path needs TRITON_INTERPRET=1 on CPU")
def test_two_pass_with_fp8_dots(monkeypatch):
    """Quantized queries (per-row scales far from 1 and past 448) through both passes: the scale enters the tile
    maxima and the second pass's scores alike, so every row answers from its chosen tiles (none falls back)."""
    B, L, L_pad, D, k = 3, 333, 336, 64, 4
    x = torch.randn(B, D) * torch.tensor([1e-3, 1.0, 900.0])[:, None]
    w = make_head(L, L_pad, D, torch.float8_e4m3fn)
    flags = record_fallback_flags(monkeypatch)
    got = topk_scores(x, w, k, L, impl="triton", fp8_dots=True, config=TWO_PASS)
    want = reference_topk(x, w, k, L, fp8_dots=True)
    check(got, want, L, atol=1e-4 * want[0].abs().max().item())
    assert flags[0].tolist() == [0] * B


def test_two_pass_choice_follows_batch_head_and_memory():
    """Auto: the two-pass path from B = 128, on heads of at least 64 k tiles, where the tile maxima and candidate slots
    fit in 7/8 of the budget."""
    L = 2_812_281
    tiles = -(-L // 256)
    assert two_pass_tiles(TopkConfig(), 1024, 5, L) == tiles
    assert two_pass_tiles(TopkConfig(), 1024, 100, L) == tiles  # 45.0 MB of maxima + 4.2 MB of slots
    assert two_pass_tiles(TopkConfig(), 128, 5, L) == tiles
    assert two_pass_tiles(TopkConfig(), 127, 5, L) is None  # fewer queries: the screened path
    assert two_pass_tiles(TopkConfig(), 1024, 200, L) is None  # fewer than 64 k tiles
    assert two_pass_tiles(TopkConfig(), 2048, 5, L) is None  # 90 MB of maxima
    assert two_pass_tiles(TopkConfig(max_partial_bytes=2**27), 2048, 5, L) == tiles
    assert two_pass_tiles(TopkConfig(two_pass=False), 1024, 5, L) is None
    with pytest.raises(ValueError, match="two_pass"):
        two_pass_tiles(TopkConfig(two_pass=True), 2048, 5, L)


@pytest.mark.skipif(not INTERPRET, reason="Triton path needs TRITON_INTERPRET=1 on CPU")
def test_two_pass_needs_room_for_its_tile_maxima():
    x, w = torch.randn(4, 32), torch.randn(4096, 32).to(torch.bfloat16)
    with pytest.raises(ValueError, match="two_pass"):
        topk_scores(x, w, 5, 4096, impl="triton", config=TopkConfig(two_pass=True, block_l=16, max_partial_bytes=1024))
