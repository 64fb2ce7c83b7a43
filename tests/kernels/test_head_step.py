"""Fused head step (Triton, interpreted on CPU) vs the plain-torch reference, plus validation and learning tests."""

from dataclasses import dataclass, replace

import pytest
import torch
from kernel_checks import assert_same_bits

from elmo_kernels import head_step as hs
from elmo_kernels import head_step_fused as hsf
from elmo_kernels import head_step_three as hs3
from elmo_kernels import head_step_two as hst
from elmo_kernels import head_step_utils as hsu


@dataclass
class Case:
    batch: int
    chunk_rows: tuple[int, ...]
    num_labels: int
    dim: int
    dtype: torch.dtype
    kahan_rows: int = 0
    kahan_dtype: torch.dtype = torch.bfloat16
    fp8_dots: bool = False
    stochastic: bool = True
    exclude: int = 0  # excluded (row, label) pairs, the first one also a positive


CASES = {
    "bf16-odd": Case(3, (1024,), 1009, 77, torch.bfloat16),
    "fp8-b1": Case(1, (1024,), 1009, 77, torch.float8_e4m3fn),
    "fp8-d768-kahan": Case(5, (320,), 300, 768, torch.float8_e4m3fn, kahan_rows=40),
    "bf16-chunks-kahan-e5m2": Case(
        6, (128, 256, 64), 400, 48, torch.bfloat16, kahan_rows=200, kahan_dtype=torch.float8_e5m2
    ),
    "fp8-dots": Case(33, (208,), 200, 96, torch.float8_e4m3fn, fp8_dots=True),
    "fp8-nearest": Case(4, (96,), 90, 40, torch.float8_e4m3fn, stochastic=False),
    "bf16-exclude": Case(7, (256, 64), 300, 40, torch.bfloat16, exclude=9),
    "fp8-dots-exclude-kahan": Case(33, (208,), 200, 96, torch.float8_e4m3fn, kahan_rows=20, fp8_dots=True, exclude=40),
}


def _poison(monkeypatch):
    def empty(shape, dtype, device):
        return torch.full(shape, float("nan"), device=device).to(dtype)

    monkeypatch.setattr(hsu, "empty", empty)


def _problem(case: Case):
    chunks = [(torch.randn(n, case.dim) * 0.2).to(case.dtype) for n in case.chunk_rows]
    x = torch.randn(case.batch, case.dim).to(torch.bfloat16)
    npos = 3 * case.batch
    rows = torch.randint(0, case.batch, (npos,))
    cols = torch.cat([torch.randint(0, case.num_labels, (npos - 2,)), torch.tensor([0, case.num_labels - 1])])
    rows, cols = torch.cat([rows, rows[-1:]]), torch.cat([cols, cols[-1:]])  # a listed pair twice is one target
    kahan = (torch.randn(case.kahan_rows, case.dim) * 1e-3).to(case.kahan_dtype) if case.kahan_rows else None
    ex = None
    if case.exclude:
        ex_rows = torch.cat([rows[:1], torch.randint(0, case.batch, (case.exclude - 1,))])
        ex_cols = torch.cat([cols[:1], torch.randint(0, case.num_labels, (case.exclude - 1,))])
        ex = {"exclude_rows": ex_rows, "exclude_cols": ex_cols}
    return chunks, x, rows, cols, kahan, ex


def _config(case: Case, kernel: str = "fused") -> hs.HeadStepConfig:
    return hs.HeadStepConfig(
        lr=0.3,
        weight_decay=0.01,
        seed=17,
        compute_loss=True,
        fp8_dots=case.fp8_dots,
        stochastic_rounding=case.stochastic,
        kernel=kernel,
    )


@pytest.mark.parametrize("kernel", hs.KERNELS)
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name, kernel, monkeypatch):
    _poison(monkeypatch)
    case = CASES[name]
    chunks, x, rows, cols, kahan, ex = _problem(case)
    cfg = _config(case, kernel)
    (wt, rt, kt), (wr, rr, kr) = (
        _run(case, chunks, x, rows, cols, kahan, ex, cfg, impl) for impl in ("triton", "torch")
    )
    # Same rounding rule and random stream: bit-identical weights, save for a pre-rounding value that lands on a
    # rounding threshold differently because of fp32 summation order.
    for i, (a, b) in enumerate(zip(wt, wr, strict=True)):
        assert_same_bits(a, b, max_fraction=1e-4, what=f"{name} chunk {i}")
    torch.testing.assert_close(rt.dx, rr.dx, rtol=1e-5, atol=1e-5)
    assert not torch.isnan(rt.dx).any()
    assert rt.loss == pytest.approx(rr.loss, rel=1e-5)
    if kahan is not None:
        assert_same_bits(kt, kr, max_fraction=1e-4, what=f"{name} kahan")
        assert (kt.float() != kahan.float()).any(), "the compensation buffer must be updated"
    # Padding rows never change; real rows do (weight decay alone moves every one of them).
    flat_new = torch.cat([w.float() for w in wt])
    flat_old = torch.cat([w.float() for w in chunks])
    assert torch.equal(flat_new[case.num_labels :], flat_old[case.num_labels :])
    assert (flat_new[: case.num_labels] != flat_old[: case.num_labels]).float().mean() > 0.5


def _run(case, chunks, x, rows, cols, kahan, ex, cfg, impl):
    w = [c.clone() for c in chunks]
    k = kahan.clone() if kahan is not None else None
    res = hs.head_step(w, x, rows, cols, cfg, num_labels=case.num_labels, kahan=k, impl=impl, **(ex or {}))
    return w, res, k


# The persistent schedule's edge cases: (case, role A programs, role B label groups, super-chunk rows, D-tile).
SCHEDULES = {
    # 40 labels: one block in one super-chunk, fewer blocks than programs of either role; 3 D-tiles, the last ragged
    "one-block": (Case(3, (48,), 40, 77, torch.bfloat16, kahan_rows=8), 3, 4, 64, 32),
    # 1009 labels: a ragged last block and a ragged last super-chunk; more blocks than programs
    "ragged": (Case(5, (1024,), 1009, 40, torch.float8_e4m3fn, exclude=6), 2, 3, 192, 64),
    # super-chunks across three chunks, two of them smaller than a super-chunk, some groups idle in each launch
    "chunks": (Case(4, (80, 16, 208), 290, 48, torch.float8_e4m3fn, fp8_dots=True, kahan_rows=100), 5, 7, 128, 16),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_fused_schedule_edge_cases(name, monkeypatch):
    _poison(monkeypatch)
    case, num_a, groups, sc_rows, block_d = SCHEDULES[name]
    elem = torch.empty(0, dtype=case.dtype).element_size()

    def plan(batch, dim, fp8_dots, num_sms):
        base = hsf.FusedPlan(
            max(16, 1 << (batch - 1).bit_length()), 64, 64, 64, block_d, num_a, groups, sc_rows * dim * elem, 4, 1
        )
        assert hsf.super_chunk_rows(base, dim, elem) == sc_rows
        return base

    monkeypatch.setattr(hsf, "fused_plan", plan)
    chunks, x, rows, cols, kahan, ex = _problem(case)
    cfg = _config(case)
    (wt, rt, kt), (wr, rr, kr) = (
        _run(case, chunks, x, rows, cols, kahan, ex, cfg, impl) for impl in ("triton", "torch")
    )
    for i, (a, b) in enumerate(zip(wt, wr, strict=True)):
        assert_same_bits(a, b, max_fraction=1e-4, what=f"{name} chunk {i}")
    torch.testing.assert_close(rt.dx, rr.dx, rtol=1e-5, atol=1e-5)
    assert rt.loss == pytest.approx(rr.loss, rel=1e-5)
    if kahan is not None:
        assert_same_bits(kt, kr, max_fraction=1e-4, what=f"{name} kahan")
    flat_new, flat_old = torch.cat([w.float() for w in wt]), torch.cat([w.float() for w in chunks])
    assert torch.equal(flat_new[case.num_labels :], flat_old[case.num_labels :]), "padding rows must never change"


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_two_pass_groups_share_blocks_unevenly(name, monkeypatch):
    # The dX + update kernel's label groups: more groups than blocks ("one-block"), a ragged last block, groups
    # that get one block more than others, chunks smaller than the groups' stride.
    _poison(monkeypatch)
    case, _, groups, _, _ = SCHEDULES[name]
    paired = name != "one-block"  # both ways of drawing the bits: per element, and one word per column pair
    plan = hst.TwoPassPlan(16, 128 if paired else 32, paired, groups, 4, 1)
    monkeypatch.setattr(hst, "two_pass_plan", lambda batch, dim, fp8_dots: plan)
    chunks, x, rows, cols, kahan, ex = _problem(case)
    cfg = _config(case, "two-pass")
    (wt, rt, kt), (wr, rr, kr) = (
        _run(case, chunks, x, rows, cols, kahan, ex, cfg, impl) for impl in ("triton", "torch")
    )
    for i, (a, b) in enumerate(zip(wt, wr, strict=True)):
        assert_same_bits(a, b, max_fraction=1e-4, what=f"{name} chunk {i}")
    torch.testing.assert_close(rt.dx, rr.dx, rtol=1e-5, atol=1e-5)
    if kahan is not None:
        assert_same_bits(kt, kr, max_fraction=1e-4, what=f"{name} kahan")
    flat_new, flat_old = torch.cat([w.float() for w in wt]), torch.cat([w.float() for w in chunks])
    assert torch.equal(flat_new[case.num_labels :], flat_old[case.num_labels :]), "padding rows must never change"


@pytest.mark.parametrize("name", ["bf16-odd", "fp8-dots-exclude-kahan"])
def test_three_pass_paired_bits(name, monkeypatch):
    # The update kernel's other way of drawing the bits (one word per column pair, joined back): the same stream.
    _poison(monkeypatch)
    default = hs3.launch_plan
    monkeypatch.setattr(hs3, "launch_plan", lambda *a: replace(default(*a), upd_block_d=128, upd_paired_bits=True))
    case = CASES[name]
    chunks, x, rows, cols, kahan, ex = _problem(case)
    cfg = _config(case, "three-pass")
    (wt, _, kt), (wr, _, kr) = (_run(case, chunks, x, rows, cols, kahan, ex, cfg, impl) for impl in ("triton", "torch"))
    for i, (a, b) in enumerate(zip(wt, wr, strict=True)):
        assert_same_bits(a, b, max_fraction=1e-4, what=f"{name} chunk {i}")
    if kahan is not None:
        assert_same_bits(kt, kr, max_fraction=1e-4, what=f"{name} kahan")


@pytest.mark.parametrize("kernel", hs.KERNELS)
def test_dx_is_deterministic(kernel):
    # dX partials are summed in a fixed order: two runs give the same bits (weights too).
    case = Case(9, (256, 192), 420, 96, torch.float8_e4m3fn, fp8_dots=True, kahan_rows=30)
    chunks, x, rows, cols, kahan, ex = _problem(case)
    cfg = _config(case, kernel)
    (w1, r1, k1), (w2, r2, k2) = (_run(case, chunks, x, rows, cols, kahan, ex, cfg, "triton") for _ in range(2))
    assert torch.equal(r1.dx, r2.dx)
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(w1, w2, strict=True))
    assert torch.equal(k1, k2)


def test_reference_step_is_sgd_on_bce():
    # On a bf16 head with a step far above one ulp, the SR update follows w - lr (G^T X + wd W) closely.
    w = (torch.randn(64, 16) * 0.5).to(torch.bfloat16)
    x = torch.randn(4, 16).to(torch.bfloat16)
    rows, cols = torch.tensor([0, 1, 2, 3]), torch.tensor([5, 9, 9, 63])
    y = torch.zeros(4, 64)
    y[rows, cols] = 1
    wf, xf = w.float(), x.float()
    g = torch.sigmoid(xf @ wf.T) - y
    expected = wf - 0.5 * (g.T @ xf + 0.1 * wf)
    out = hs.head_step([w], x, rows, cols, hs.HeadStepConfig(lr=0.5, weight_decay=0.1), impl="torch")
    torch.testing.assert_close(out.dx, g @ wf, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w.float(), expected, rtol=2e-2, atol=2e-2)


def test_excluded_pairs_get_no_gradient():
    w = (torch.randn(64, 16) * 0.5).to(torch.bfloat16)
    x = torch.randn(4, 16).to(torch.bfloat16)
    rows, cols = torch.tensor([0, 1, 2, 3]), torch.tensor([5, 9, 9, 63])
    ex_rows, ex_cols = torch.tensor([1, 0, 3]), torch.tensor([9, 7, 0])  # (1, 9) is a positive
    y = torch.zeros(4, 64)
    y[rows, cols] = 1
    wf, xf = w.float(), x.float()
    g = torch.sigmoid(xf @ wf.T) - y
    g[ex_rows, ex_cols] = 0.0
    expected = wf - 0.5 * (g.T @ xf)
    cfg = hs.HeadStepConfig(lr=0.5, compute_loss=True)
    out = hs.head_step([w], x, rows, cols, cfg, impl="torch", exclude_rows=ex_rows, exclude_cols=ex_cols)
    torch.testing.assert_close(out.dx, g @ wf, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w.float(), expected, rtol=2e-2, atol=2e-2)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(xf @ wf.T, y, reduction="none")
    bce[ex_rows, ex_cols] = 0.0
    assert out.loss == pytest.approx(float(bce.sum()) / 4, rel=1e-3)


def test_head_logits():
    chunks = [torch.randn(32, 8).to(torch.bfloat16), torch.randn(16, 8).to(torch.bfloat16)]
    x = torch.randn(3, 8)
    logits = hs.head_logits(chunks, x, num_labels=40)
    torch.testing.assert_close(logits, x @ torch.cat(chunks).float()[:40].T)


def _valid():
    return [torch.randn(32, 8).to(torch.bfloat16)], torch.randn(2, 8), torch.tensor([0, 1]), torch.tensor([3, 4])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: a.update(chunks=[]), "chunks is empty"),
        (lambda a: a.update(chunks=[torch.randn(32, 8)]), "bfloat16 or float8_e4m3fn"),
        (lambda a: a.update(chunks=[torch.randn(30, 8).to(torch.bfloat16)]), "multiple of 16"),
        (lambda a: a.update(chunks=[torch.randn(32, 9).to(torch.bfloat16)]), "expected"),
        (lambda a: a.update(x=torch.randn(8)), r"must be \(B, D\)"),
        (lambda a: a.update(x=torch.randn(2, 8).double()), "bfloat16 or float32"),
        (lambda a: a.update(pos_rows=torch.tensor([0, 2])), "pos_rows must lie"),
        (lambda a: a.update(pos_cols=torch.tensor([0, 32])), "pos_cols must lie"),
        (lambda a: a.update(pos_cols=torch.tensor([0.0, 1.0])), "integer"),
        (lambda a: a.update(pos_cols=torch.tensor([0])), "same length"),
        (lambda a: a.update(num_labels=33), "num_labels"),
        (lambda a: a.update(kahan=torch.zeros(40, 8, dtype=torch.bfloat16)), "kahan must be"),
        (lambda a: a.update(kahan=torch.zeros(4, 8)), "kahan must be bfloat16"),
        (lambda a: a.update(impl="cuda"), "impl must be"),
        (lambda a: a.update(config=hs.HeadStepConfig(lr=0.1, seed=-3)), "seed"),
        (lambda a: a.update(x=torch.randn(300, 8), impl="triton"), "at most 256"),
        (lambda a: a.update(config=hs.HeadStepConfig(lr=0.1, fp8_dots=True)), "fp8_dots"),
        (lambda a: a.update(config=hs.HeadStepConfig(lr=0.1, kernel="two")), "config.kernel"),
        (lambda a: a.update(exclude_rows=torch.tensor([0])), "go together"),
        (lambda a: a.update(exclude_rows=torch.tensor([0]), exclude_cols=torch.tensor([40])), "exclude_cols must lie"),
    ],
)
def test_bad_arguments(mutate, message):
    chunks, x, rows, cols = _valid()
    args = dict(
        chunks=chunks,
        x=x,
        pos_rows=rows,
        pos_cols=cols,
        config=hs.HeadStepConfig(lr=0.1),
        num_labels=None,
        kahan=None,
        impl="auto",
    )
    mutate(args)
    with pytest.raises(ValueError, match=message):
        hs.head_step(
            args.pop("chunks"), args.pop("x"), args.pop("pos_rows"), args.pop("pos_cols"), args.pop("config"), **args
        )


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_shards_round_like_the_whole_head(impl):
    # Two shards stepped separately (label_offset = their global start) give the unsharded head's bits.
    whole = [(torch.randn(96, 40) * 0.2).to(torch.float8_e4m3fn)]
    x = torch.randn(5, 40).to(torch.bfloat16)
    rows, cols = torch.randint(0, 5, (12,)), torch.randint(0, 90, (12,))
    cfg = hs.HeadStepConfig(lr=0.3, weight_decay=0.01, seed=4)
    shards = [whole[0][:48].clone(), whole[0][48:].clone()]
    ref_w = [whole[0].clone()]
    ref = hs.head_step(ref_w, x, rows, cols, cfg, num_labels=90, impl=impl)
    dx = torch.zeros(5, 40)
    for i, shard in enumerate(shards):
        sel = (cols >= 48 * i) & (cols < 48 * (i + 1))
        out = hs.head_step(
            [shard],
            x,
            rows[sel],
            cols[sel] - 48 * i,
            cfg,
            num_labels=min(48, 90 - 48 * i),
            impl=impl,
            label_offset=48 * i,
        )
        dx += out.dx
    assert_same_bits(torch.cat(shards), ref_w[0], max_fraction=1e-3, what="sharded vs whole")
    torch.testing.assert_close(dx, ref.dx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("dtype", "batch", "expected"),
    [(torch.bfloat16, 256, "two-pass"), (torch.bfloat16, 128, "three-pass"), (torch.float8_e4m3fn, 256, "three-pass")],
)
def test_auto_kernel_takes_the_measured_fastest(dtype, batch, expected, monkeypatch):
    # kernel="auto" (the default): two-pass for bf16 weights at B > 128, three-pass otherwise (BENCHMARKS.md).
    taken = []
    monkeypatch.setattr(hs, "two_pass_step", lambda *a: taken.append("two-pass"))
    monkeypatch.setattr(hs, "three_pass_step", lambda *a: taken.append("three-pass"))
    chunks = [torch.randn(32, 8).to(dtype)]
    rows, cols = torch.tensor([0, batch - 1]), torch.tensor([1, 31])
    hs.head_step(chunks, torch.randn(batch, 8), rows, cols, hs.HeadStepConfig(lr=0.1), impl="triton")
    assert taken == [expected]
