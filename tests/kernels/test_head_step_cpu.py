"""The torch-RNG CPU step (elmo_kernels.head_step_cpu) against the kernels' reference, plain SGD and its bias rule."""

import pytest
import torch

from elmo_kernels.head_step import HeadStepConfig, head_step
from elmo_kernels.head_step_cpu import MasterBias, head_step_cpu, stochastic_round_with

B, L, D = 5, 50, 24  # 50 labels in chunks of 32 + 32 rows: the second chunk is partly padding


@pytest.mark.parametrize(
    "dtype, values",
    [
        (torch.bfloat16, [1.0 + 2**-10, -3.3e-3, 7.1e-39]),  # normal, negative, bf16 subnormal
        (torch.float8_e4m3fn, [0.3, -5.3, 3e-3, -1e-3]),  # normal, negative, e4m3 subnormals (< 2^-6)
    ],
)
def test_stochastic_round_is_unbiased(dtype, values):
    x = torch.tensor(values).repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    y = stochastic_round_with(x, dtype, gen).float()
    mean = y.mean(0)
    lo = torch.tensor(values).to(dtype).float()  # one neighbour; the spread bounds the other
    spread = (y.max(0).values - y.min(0).values).clamp_min(1e-45)
    err = ((mean - torch.tensor(values)).abs() / spread).tolist()
    assert all(e < 0.02 for e in err), f"relative bias {err} (means {mean.tolist()}, nearest {lo.tolist()})"


def test_stochastic_round_saturates_and_is_seeded():
    x = torch.tensor([500.0, -1e6, 448.0])
    y = stochastic_round_with(x, torch.float8_e4m3fn, torch.Generator().manual_seed(1)).float()
    assert y.tolist() == [448.0, -448.0, 448.0]
    a = torch.randn(1000)
    r1 = stochastic_round_with(a, torch.float8_e4m3fn, torch.Generator().manual_seed(3))
    r2 = stochastic_round_with(a, torch.float8_e4m3fn, torch.Generator().manual_seed(3))
    assert torch.equal(r1.float(), r2.float())


def _problem(dtype):
    w = torch.zeros(64, D)
    w[:L] = 0.3 * torch.randn(L, D)
    x = torch.randn(B, D)
    positives = torch.tensor([[0, 1], [2, 7], [4, 7], [4, 49], [1, 33]])
    return w.to(dtype), x, positives


@pytest.mark.parametrize(("dtype", "kahan_rows"), [(torch.bfloat16, 0), (torch.float8_e4m3fn, 40)])
def test_matches_the_kernels_reference(dtype, kahan_rows):
    """Same update as elmo_kernels.head_step(impl='torch'): weights on the same or a neighbouring grid point (different
    random bits), dX close, padding untouched; the Kahan rows hold what the rounding lost."""
    w, x, pos = _problem(dtype)
    ref = w.clone()
    chunks = list(w.split(32))
    kahan = torch.zeros(kahan_rows, D, dtype=torch.bfloat16) if kahan_rows else None
    gen = torch.Generator().manual_seed(3)
    out = head_step_cpu(chunks, x, pos, lr=0.05, generator=gen, num_labels=L, kahan=kahan, compute_loss=True)
    want = head_step([ref], x, pos[:, 0], pos[:, 1], HeadStepConfig(lr=0.05, compute_loss=True), num_labels=L)
    new, old = w.float(), ref.float()
    # a quarter of the binade (bf16 GEMM inputs on this path, fp32 in the reference), e4m3 subnormals at 2^-6
    floor = 2.0**-9 if dtype == torch.bfloat16 else 2.0**-6
    grid = 2.0 ** (torch.floor(torch.log2(torch.maximum(new.abs(), old.abs()).clamp_min(floor))) - 2)
    bad = ((new - old).abs() > 2 * grid).nonzero().tolist()
    assert not bad, f"the two paths must land on neighbouring grid points: first misses {bad[:5]}"
    assert not w[L:].float().any(), "padded rows never change"
    torch.testing.assert_close(out.dx, want.dx, atol=0.05, rtol=0.05)
    assert out.loss == pytest.approx(want.loss, rel=0.01)
    if kahan is not None:
        assert kahan.float().abs().sum() > 0 and not kahan.float().isnan().any()


def test_same_generator_same_bits():
    w, x, pos = _problem(torch.float8_e4m3fn)
    a, b = w.clone(), w.clone()
    head_step_cpu([a], x, pos, lr=0.1, generator=torch.Generator().manual_seed(5), num_labels=L)
    head_step_cpu([b], x, pos, lr=0.1, generator=torch.Generator().manual_seed(5), num_labels=L)
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert not torch.equal(a.view(torch.uint8), w.view(torch.uint8))


def test_fp32_is_sgd_with_the_master_bias_and_exclusions():
    """fp32: W <- W - lr (G^T X + wd W) with G from the master-bias logits; the bias column takes no weight update,
    the master takes lr unit^2 times the summed gradient (and the decay), the column is the master / unit."""
    w, x, pos = _problem(torch.float32)
    unit, lr, wd = 0.5, 0.1, 0.01
    x[:, -1] = unit  # the constant bias input
    master = torch.zeros(64)
    master[:L] = torch.linspace(-2, 1, L)
    w0, m0 = w.clone(), master.clone()
    exclude = torch.tensor([[3, 10], [4, 49]])  # (4, 49) is also a positive: no gradient either way
    out = head_step_cpu(
        list(w.split(32)), x, pos, lr=lr, weight_decay=wd, num_labels=L, bias=MasterBias(master, unit), exclude=exclude
    )
    wt = w0[:L].clone()
    wt[:, -1] = m0[:L] / unit
    y = torch.zeros(B, L)
    y[pos[:, 0], pos[:, 1]] = 1.0
    g = torch.sigmoid(x @ wt.T) - y
    g[exclude[:, 0], exclude[:, 1]] = 0.0
    step = lr * (g.T @ x + wd * w0[:L])
    want_m = m0[:L] * (1 - lr * wd) - lr * unit * unit * g.sum(0)
    torch.testing.assert_close(master[:L], want_m, atol=1e-2, rtol=1e-2)  # bf16 GEMM inputs on CPU
    torch.testing.assert_close(w[:L, :-1], (w0[:L] - step)[:, :-1], atol=1e-2, rtol=1e-2)
    assert torch.equal(w[:L, -1], master[:L] / unit), "the column mirrors the master"
    torch.testing.assert_close(out.dx, g @ w0[:L], atol=0.05, rtol=0.05)  # dX with W before its update
    assert out.loss is None


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(positives=torch.tensor([0, 1])), r"\(P, 2\)"),
        (lambda a: a.update(positives=torch.tensor([[B, 1]])), "positives rows"),
        (lambda a: a.update(positives=torch.tensor([[0, L]])), "positives labels"),
        (lambda a: a.update(exclude=torch.tensor([[0.0, 1.0]])), "integer"),
        (lambda a: a.update(generator=None), "Generator"),
        (lambda a: a.update(kahan=torch.zeros(3, D + 1, dtype=torch.bfloat16)), "kahan"),
        (lambda a: a.update(bias=MasterBias(torch.zeros(L), 1.0)), "master bias"),
        (lambda a: a.update(chunks=[]), "at least one"),
        (lambda a: a.update(num_labels=65), "num_labels"),
    ],
)
def test_rejects_bad_arguments(change, message):
    w, x, pos = _problem(torch.bfloat16)
    args = dict(chunks=[w], x=x, positives=pos, lr=0.1, generator=torch.Generator(), num_labels=L)
    change(args)
    with pytest.raises(ValueError, match=message):
        head_step_cpu(**args)
