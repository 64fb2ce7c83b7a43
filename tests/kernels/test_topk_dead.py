"""The dead-row mask of the top-k paths (`dead=`: rows never returned, like padding): every path against
`reference_topk(..., dead=)` with dead rows that carry the highest scores, with exclusions, all but k rows dead, the
slots a row cannot fill, the buffer read in place, and the argument checks. Under TRITON_INTERPRET=1 on CPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from topk_checks import CONFIGS, INTERPRET, TWO_PASS, check, make_head, record_fallback_flags  # noqa: E402

import elmo_kernels.topk.running as running_module  # noqa: E402
from elmo_kernels.topk import ScreenedTopk, prepare_queries, reference_topk, topk_scores  # noqa: E402
from elmo_kernels.topk.inputs import check_dead  # noqa: E402
from elmo_kernels.topk.triton_path import triton_scores  # noqa: E402

TRITON = ["running", "screened", "two-pass"] if INTERPRET else []
PATHS = ["torch", "cpu-screened", *TRITON]
CONFIG = {**CONFIGS, "two-pass": TWO_PASS}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(4321)


def run(path, x, w, k, L, exclude=None, dead=None):
    """topk_scores through one path (the CPU serving path takes the queries as `topk_scores` rounds them)."""
    if path == "torch":
        return topk_scores(x, w, k, L, exclude, impl="torch", chunk_size=96, dead=dead)
    if path == "cpu-screened":
        return ScreenedTopk(w, L)(prepare_queries(x.float(), w.dtype, False)[0], k, exclude, dead=dead)
    return topk_scores(x, w, k, L, exclude, impl="triton", config=CONFIG[path], dead=dead)


def poisoned_empty(monkeypatch):
    """Every fresh buffer filled with the best possible key (or NaN): none of it may leak into an answer."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(2**63 - 1) if t.dtype == torch.int64 else t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


def dead_on_top(B, L, L_pad, D, dtype, n_dead):
    """Queries near a common direction u, and a head whose `n_dead` random rows (dead) lie along 2u: those rows score
    highest for every query (checked), the live rows are random."""
    u = torch.randn(D)
    x = u + 0.3 * torch.randn(B, D)
    w = make_head(L, L_pad, D, torch.float32, pad_value=8.0)
    dead_ids = torch.randperm(L)[:n_dead]
    w[dead_ids] = 2 * u + 0.05 * torch.randn(n_dead, D)
    dead = torch.zeros(L_pad, dtype=torch.bool)  # longer than num_labels: the padding entries are ignored
    dead[dead_ids] = True
    return x, w.to(dtype), dead


def assert_not_returned(ids, rows):
    returned = set(ids.flatten().tolist()) & set(rows.nonzero().flatten().tolist())
    assert not returned, f"dead rows returned: {sorted(returned)[:10]}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "B, L, L_pad, D, k, wdtype",
    [
        pytest.param(1, 709, 720, 40, 5, torch.float8_e4m3fn, id="B1-fp8"),
        pytest.param(6, 1001, 1008, 77, 4, torch.bfloat16, id="B6-bf16-D77"),
    ],
)
def test_dead_rows_with_the_highest_scores_never_return(monkeypatch, path, B, L, L_pad, D, k, wdtype):
    """30 dead rows outscore every live row for every query (the unmasked top-k is all dead), with and without
    exclusions (some of them dead rows too); fresh buffers poisoned. The two-pass path answers every row from its
    chosen tiles: a dead row that raised a tile maximum would send the row to the running kernel's fallback."""
    x, w, dead = dead_on_top(B, L, L_pad, D, wdtype, 30)
    assert dead[reference_topk(x, w, k, L)[1]].all()  # without the mask the answer would be dead rows only
    want = reference_topk(x, w, k, L, dead=dead)
    live_top = reference_topk(x, w, 3, L, dead=dead)[1]
    dead_ids = dead.nonzero().flatten()
    excl = torch.cat([live_top[:, :2], dead_ids[:2].expand(B, 2), torch.full((B, 1), -1)], 1)
    excl[0, 1] = -1
    want_ex = reference_topk(x, w, k, L, excl, dead=dead)
    flags = record_fallback_flags(monkeypatch) if path == "two-pass" else []
    poisoned_empty(monkeypatch)
    for exclude, expected in ((None, want), (excl, want_ex)):
        got = run(path, x, w, k, L, exclude, dead=dead)
        assert_not_returned(got[1], dead[:L])
        check(got, expected, L, exclude=exclude)
    if path == "two-pass":
        assert [f.tolist() for f in flags] == [[0] * B] * 2


@pytest.mark.parametrize("path", PATHS)
def test_all_but_k_dead(path):
    """Dead rows everywhere but k (uint8 mask; B = 1, L not a multiple of any tile): exactly those k come back. All but
    k + 1 dead, with exclusions: a row excluding one of the k + 1 and a dead row gets the other k."""
    B, L, L_pad, D, k = 3, 613, 624, 32, 4
    x = torch.randn(B, D)
    w = make_head(L, L_pad, D, torch.bfloat16)
    keep = torch.randperm(L)[: k + 1]
    dead = torch.ones(L, dtype=torch.uint8)
    dead[keep[:k]] = 0
    got = run(path, x[:1], w, k, L, dead=dead)
    check(got, reference_topk(x[:1], w, k, L, dead=dead), L)
    assert set(got[1][0].tolist()) == set(keep[:k].tolist())
    dead[keep[k]] = 0
    excl = [[int(keep[k]), int(dead.nonzero()[0])], [int(keep[0])], []]
    got = run(path, x, w, k, L, excl, dead=dead)
    check(got, reference_topk(x, w, k, L, excl, dead=dead), L, exclude=excl)
    assert set(got[1][0].tolist()) == set(keep[:k].tolist())
    with pytest.raises(ValueError, match="dead"):  # row 1 would keep k - 1
        run(path, x, w, k, L, [[], [int(keep[0]), int(keep[1])], []], dead=dead)


@pytest.mark.skipif(not INTERPRET, reason="Triton path needs TRITON_INTERPRET=1 on CPU")
@pytest.mark.parametrize("path", TRITON)
def test_unfilled_slots_come_back_empty(path):
    """A CUDA graph replays without checking the buffer (no host synchronisation): a row left with fewer than k
    returnable rows gets its live rows, then (-inf, -1), as the reference has it. The Triton path here is called as
    `CapturedTopk` calls it, past the eager check."""
    B, L, L_pad, D, k = 2, 517, 528, 32, 6
    x = torch.randn(B, D)
    w = make_head(L, L_pad, D, torch.float8_e4m3fn)
    dead = torch.ones(L, dtype=torch.bool)
    dead[torch.randperm(L)[:4]] = False
    exclude = torch.tensor([[-1], [int(dead.logical_not().nonzero()[0])]])  # row 1: 3 returnable rows
    s, i = triton_scores(x, w, k, L, exclude, False, CONFIG[path], check_dead(dead, L, w.device))
    rs, ri = reference_topk(x, w, k, L, exclude, dead=dead)
    assert i.tolist() == ri.tolist() and ri[0, 4:].tolist() == [-1, -1] and ri[1, 3:].tolist() == [-1] * 3
    torch.testing.assert_close(s[:, :3], rs[:, :3], rtol=1e-5, atol=1e-5)
    assert (s[ri < 0] == float("-inf")).all()


@pytest.mark.skipif(not INTERPRET, reason="Triton path needs TRITON_INTERPRET=1 on CPU")
def test_buffer_flipped_in_place_is_read_at_each_call():
    """`CapturedTopk` keeps the view `check_dead` returns and replays the Triton path on it: the caller's bool buffer
    flipped in place between calls (a label retired, a spare row brought live) changes the next answer."""
    B, L, L_pad, D, k = 2, 300, 304, 32, 3
    x = torch.randn(B, D)
    w = make_head(L, L_pad, D, torch.bfloat16)
    buffer = torch.zeros(L_pad, dtype=torch.bool)
    view = check_dead(buffer, L, w.device)
    cfg = CONFIG["screened"]
    first = triton_scores(x, w, k, L, None, False, cfg, view)
    check(first, reference_topk(x, w, k, L), L)
    buffer[first[1][0, 0]] = True  # retire row 0's best label
    buffer[first[1][1]] = True  # and all of row 1's
    check(triton_scores(x, w, k, L, None, False, cfg, view), reference_topk(x, w, k, L, dead=buffer), L)
    buffer.zero_()
    check(triton_scores(x, w, k, L, None, False, cfg, view), reference_topk(x, w, k, L), L)


@pytest.mark.skipif(not INTERPRET, reason="Triton path needs TRITON_INTERPRET=1 on CPU")
def test_the_mask_is_what_keeps_dead_rows_out(monkeypatch):
    """Mutation check: the running kernel launched without its HAS_DEAD flag returns the dead rows (so the tests above
    can fail)."""
    meta = running_module.tile_meta
    monkeypatch.setattr(running_module, "tile_meta", lambda *a: {**meta(*a), "HAS_DEAD": False})
    x, w, dead = dead_on_top(2, 400, 400, 32, torch.bfloat16, 10)
    got = run("running", x, w, 3, 400, dead=dead)
    assert dead[got[1]].all()


def test_reference_puts_dead_and_excluded_rows_last():
    x = torch.randn(2, 16)
    w = make_head(20, 32, 16, torch.float32)
    dead = torch.zeros(20, dtype=torch.bool)
    dead[3:18] = True
    s, i = reference_topk(x, w, 5, 20, [[0], []], dead=dead)
    full_s, full_i = reference_topk(x, w, 20, 20)
    live = [[j for j in r if j not in range(3, 18)] for r in full_i.tolist()]
    assert i[0].tolist() == [j for j in live[0] if j != 0] + [-1] and i[1].tolist() == live[1]
    assert s[0, 4] == float("-inf") and torch.isfinite(s[1]).all()


def _bad_dead():
    L = 30
    return [
        ("float", torch.zeros(L), "bool or uint8"),
        ("int64", torch.zeros(L, dtype=torch.int64), "bool or uint8"),
        ("short", torch.zeros(L - 1, dtype=torch.bool), "at least num_labels"),
        ("2-D", torch.zeros(1, L, dtype=torch.bool), "1-D"),
        ("list", [False] * L, "torch tensor"),
        ("device", torch.zeros(L, dtype=torch.bool, device="meta"), "is on meta"),
        ("strided", torch.zeros(2 * L, dtype=torch.bool)[::2], "contiguous"),
        ("too many dead", torch.arange(L) >= 2, "k=3 exceeds the 2 labels"),
    ]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name, dead, message", _bad_dead(), ids=[n for n, _, _ in _bad_dead()])
def test_bad_dead_mask_raises_value_error(path, name, dead, message):
    x, w = torch.randn(2, 16), make_head(30, 32, 16, torch.bfloat16)
    with pytest.raises(ValueError, match=message):
        run(path, x, w, 3, 30, dead=dead)
