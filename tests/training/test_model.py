"""The head module: the CPU step against the kernels' reference, chunks, scale, Kahan, the master bias, top-k."""

import math

import numpy as np
import pytest
import torch

from elmo_kernels.head_step import HeadStepConfig, head_step
from elmo_kernels.topk import reference_topk
from training.model import HeadConfig, XMCHead, chunk_rows, chunked_topk, padded, power_of_two_scale


def pairs(rows, cols) -> torch.Tensor:
    """(P, 2) int64 (row, label) pairs, the form XMCHead.step takes."""
    return torch.stack([torch.as_tensor(rows), torch.as_tensor(cols)], 1).to(torch.int64)


def test_chunk_rows_fit_the_budget():
    rows = chunk_rows(100_000, 257, 256, budget_mb=16)
    assert rows % 16 == 0 and 16 * (256 + 257) * rows <= 16 * 2**20
    assert chunk_rows(40, 8, 4, budget_mb=1000) == 48  # never more than the padded label count
    assert power_of_two_scale(0.01) == 128.0 and power_of_two_scale(0.0) == 1.0
    assert padded(37) == 48 and padded(48) == 48


def _head(precision, num_labels=37, dim=12, **kw):
    head = XMCHead(HeadConfig(num_labels=num_labels, dim=dim, precision=precision, chunk_budget_mb=0.01, **kw))
    g = torch.Generator().manual_seed(0)
    head.init_weights(0.2 * torch.randn(num_labels, dim, generator=g), np.full(num_labels, 0.1))
    return head


def test_scores_match_true_weights_and_padding_stays_zero():
    head = _head("fp8")
    assert len(head.chunks()) > 1, "a tiny budget must give several chunks"
    assert math.log2(float(head.scale)).is_integer() and float(head.scale) > 1
    x = torch.randn(5, 12)
    xin = torch.cat([x, torch.full((5, 1), head.config.bias_input)], 1)
    expect = xin @ head.true_weight().T
    torch.testing.assert_close(head.scores(x), expect, atol=0.05 * expect.abs().max().item(), rtol=0.02)
    rows = torch.tensor([0, 1, 4])
    cols = torch.tensor([3, 36, 0])
    for i in range(3):
        head.step(x, pairs(rows, cols), lr=0.1, seed=i)
    assert not head.weight[37:].float().any(), "padded rows must never change"


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_cpu_step_matches_the_kernel_reference(precision):
    """Same update as elmo_kernels.head_step (impl='torch'): weights within a grid step, dX close (no bias: the CPU path
    keeps an fp32 master bias that the kernels do not have, see test_fp32_master_bias)."""
    ours = _head(precision, bias=False)
    ref_w = ours.weight.clone()
    x = torch.randn(6, 12)
    rows, cols = torch.tensor([0, 2, 5, 5]), torch.tensor([1, 7, 7, 30])
    dx, _ = ours.step(x, pairs(rows, cols), lr=0.05, seed=3)
    s = float(ours.scale)
    xin = ours.head_input(x)
    out = head_step([ref_w], xin, rows, cols, HeadStepConfig(lr=0.05 * s * s, seed=3), num_labels=37, impl="torch")
    assert ours.in_dim == 12
    new, ref = ours.weight.float(), ref_w.float()
    grid = 2.0 ** (torch.floor(torch.log2(torch.maximum(new.abs(), ref.abs()).clamp_min(2**-9))) - 2)
    assert ((new - ref).abs() <= 2 * grid + 1e-6).all(), "the two paths must land on neighbouring grid points"
    torch.testing.assert_close(dx, out.dx[:, :12] / s, atol=0.05, rtol=0.05)


def test_fp32_step_is_sgd_on_bce():
    head = _head("fp32", bias=False)
    w0 = head.true_weight().clone()
    x = torch.randn(4, 12)
    rows, cols = torch.tensor([0, 3]), torch.tensor([5, 9])
    dx, loss = head.step(x, pairs(rows, cols), lr=0.1, compute_loss=True)
    y = torch.zeros(4, 37)
    y[rows, cols] = 1
    w = w0.clone().requires_grad_()
    ref = torch.nn.functional.binary_cross_entropy_with_logits(x @ w.T, y, reduction="sum")
    ref.backward()
    assert loss == pytest.approx(ref.item() / 4, rel=0.02)
    torch.testing.assert_close(head.true_weight(), w0 - 0.1 * w.grad, atol=0.03, rtol=0.03)  # bf16 GEMMs on CPU
    torch.testing.assert_close(dx, (torch.sigmoid(x @ w0.T) - y) @ w0, atol=0.05, rtol=0.05)


def test_exclude_removes_a_pair_from_the_loss():
    a, b = _head("fp32", bias=False), _head("fp32", bias=False)
    x = torch.randn(1, 12)
    rows, cols = torch.tensor([0]), torch.tensor([2])
    a.step(x, pairs(rows, cols), lr=0.5)
    b.step(x, pairs(rows, cols), lr=0.5, exclude=torch.tensor([[0, 11]]))
    moved = (a.true_weight() - b.true_weight()).abs().sum(1)
    assert moved[11] > 0 and moved[torch.arange(37) != 11].max() == 0


def test_kahan_keeps_tiny_updates():
    """Many updates far below the fp8 grid step: Kahan-compensated weights track the fp32 sum much better."""
    results = {}
    x = torch.randn(1, 8)
    for precision in ("fp8", "fp8+kahan"):
        head = _head(precision, num_labels=16, dim=8, bias=False, kahan_labels=16)
        w0 = head.true_weight().clone()
        for i in range(200):
            head.step(x, pairs([0], [3]), lr=1e-4, seed=i)
        # with Kahan, the weight minus its compensation is the value the updates have reached
        reached = head.true_weight() - (head.kahan.float() / head.scale if len(head.kahan) else 0.0)
        results[precision] = reached - w0
    exact = _head("fp32", num_labels=16, dim=8, bias=False)
    e0 = exact.true_weight().clone()
    for i in range(200):
        exact.step(x, pairs([0], [3]), lr=1e-4, seed=i)
    err = {p: (d - (exact.true_weight() - e0)).norm().item() for p, d in results.items()}
    assert err["fp8+kahan"] < 0.1 * err["fp8"], err
    assert results["fp8"].abs().sum() > 0


def test_rejects_unknown_precision_and_step_impl():
    with pytest.raises(ValueError, match="precision"):
        XMCHead(HeadConfig(num_labels=4, dim=2, precision="fp16"))
    x = torch.randn(2, 12)
    with pytest.raises(ValueError, match="impl"):
        _head("bf16").step(x, pairs([0], [1]), lr=0.1, impl="triton")
    with pytest.raises(ValueError, match="fp32 head"):
        _head("fp32").step(x, pairs([0], [1]), lr=0.1, impl="kernels")


def test_kernel_path_splits_large_batches_and_matches_the_torch_path():
    """The CUDA path (elmo_kernels.head_step, here its CPU reference) agrees with the CPU path, also past 256 rows."""
    a, b = _head("bf16", dim=8, bias=False), _head("bf16", dim=8, bias=False)  # bias: the next test
    x = torch.randn(300, 8)
    rows, cols = torch.tensor([0, 7, 299, 260]), torch.tensor([1, 2, 3, 36])
    exclude = torch.tensor([[0, 5], [270, 9], [299, 3]])  # (299, 3) is also a positive: it gets no gradient
    pos = pairs(rows, cols)
    dx_k, loss_k = a.step(x, pos, lr=1e-4, seed=5, compute_loss=True, exclude=exclude, impl="kernels")
    dx_t, loss_t = b.step(x, pos, lr=1e-4, seed=5, compute_loss=True, exclude=exclude)  # 2 sub-steps ~ 1
    assert loss_k == pytest.approx(loss_t, rel=0.01)
    torch.testing.assert_close(dx_k, dx_t, atol=0.05, rtol=0.05)
    grid = 2.0 ** (torch.floor(torch.log2(a.weight.float().abs().clamp_min(2**-9))) - 6)
    assert ((a.weight.float() - b.weight.float()).abs() <= 4 * grid + 1e-6).all()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp8", "fp8+kahan"])
def test_fp32_master_bias(precision):
    """The bias is trained in fp32 (the column's SGD step: lr c^2 x the summed gradient) for every precision; the
    stored column mirrors it rounded to nearest; scores use the column, master_bias=True the fp32 master."""
    head = _head(precision, dim=8)
    x = torch.randn(5, 8)
    rows, cols = torch.tensor([0, 3, 4]), torch.tensor([2, 2, 30])
    b0 = head.true_bias().clone()
    z = head.scores(x, master_bias=True)
    y = torch.zeros(5, 37)
    y[rows, cols] = 1
    expect = b0 - 0.01 * head.config.bias_input**2 * (torch.sigmoid(z) - y).sum(0)
    head.step(x, pairs(rows, cols), lr=0.01, seed=1)
    torch.testing.assert_close(head.true_bias(), expect, atol=2e-3, rtol=1e-3)
    unit = head.config.bias_input / float(head.scale)
    col = head.weight[:37, -1].float() * unit
    assert torch.equal(head.weight[:37, -1], (head.true_bias() / unit).to(head.weight.dtype)), "round to nearest"
    xin = torch.cat([x, torch.ones(5, 1)], 1)
    w = torch.cat([head.true_weight()[:, :8], head.true_bias()[:, None]], 1)
    torch.testing.assert_close(head.scores(x, master_bias=True), xin @ w.T, atol=0.05, rtol=0.02)
    torch.testing.assert_close(
        head.scores(x) - head.scores(x, master_bias=True), (col - head.true_bias()).expand(5, -1), atol=0.05, rtol=0.02
    )


def test_master_bias_keeps_tiny_bias_updates_in_fp8():
    """Updates far below the e4m3 step of a bias near -10 accumulate in the fp32 master as they do in an fp32 head."""
    heads = {p: _head(p, num_labels=16, dim=8) for p in ("fp32", "fp8")}
    for h in heads.values():
        h.bias[:16] = -10.0
    x = torch.randn(1, 8)
    for h in heads.values():
        for i in range(100):
            h.step(x, pairs([0], [3]), lr=1e-5, seed=i)
    moved = {p: h.true_bias() + 10.0 for p, h in heads.items()}
    assert moved["fp32"][3] > 1e-3
    torch.testing.assert_close(moved["fp8"], moved["fp32"], atol=1e-4, rtol=0.02)


def test_old_checkpoints_without_the_master_bias_load_it_from_the_column():
    a = _head("fp8")
    sd = {k: v for k, v in a.state_dict().items() if k != "bias"}
    b = XMCHead(a.config)
    b.load_state_dict(sd)
    unit = a.config.bias_input / float(a.scale)
    torch.testing.assert_close(b.true_bias(), a.weight[:37, -1].float() * unit)


def test_kernel_path_trains_the_bias_column_and_the_master_follows():
    head = _head("fp8", dim=8)
    col0 = head.weight[:37, -1].float().clone()
    x = torch.randn(4, 8)
    s = float(head.scale)
    head.step(x, pairs([0, 1], [3, 4]), lr=0.5, seed=1, impl="kernels")
    unit = head.config.bias_input / s
    assert not torch.equal(head.weight[:37, -1].float(), col0)
    torch.testing.assert_close(head.true_bias(), head.weight[:37, -1].float() * unit)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_topk_ranks_as_the_kernels_score_the_stored_head(precision):
    """topk: chunk by chunk through elmo_kernels.topk.topk_scores, equal to ranking the whole stored head at once, with
    (row, label) exclusions; master_bias ranks with the fp32 master in the column."""
    head = _head(precision)
    assert len(head.chunks()) > 1
    x = torch.randn(6, 12)
    xin = head.head_input(x)
    want_s, want_i = reference_topk(xin, head.weight, 7, 37)
    got_s, got_i = head.topk(x, 7)
    assert torch.equal(got_i, want_i), (got_i, want_i)
    torch.testing.assert_close(got_s, want_s)
    # exclusions: row 0 loses its best two labels, row 3 its best one (twice: duplicates are harmless)
    exclude = torch.tensor([[0, int(want_i[0, 0])], [0, int(want_i[0, 1])], [3, int(want_i[3, 0])]] * 2)
    lists = [[int(c) for r, c in exclude.tolist() if r == b] for b in range(6)]
    got_s, got_i = head.topk(x, 7, exclude=exclude)
    want_s, want_i = reference_topk(xin, head.weight, 7, 37, exclude=lists)
    assert torch.equal(got_i, want_i)
    # the master bias: the same ranking as a head whose column holds the master exactly (fp32, bf16 queries)
    with torch.no_grad():
        head.bias[:37] += torch.linspace(-0.3, 0.3, 37)
    w = head.weight.float()
    w[:, -1] = head.bias / (head.config.bias_input / float(head.scale))
    want_s, want_i = reference_topk(xin.to(torch.bfloat16).float(), w, 5, 37)
    got_s, got_i = head.topk(x, 5, master_bias=True)
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_s, want_s)


def test_chunked_topk_fills_rows_left_with_too_few_labels():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 8, generator=g).to(torch.bfloat16)
    x = torch.randn(3, 8, generator=g)
    exclude = pairs([1] * 18, list(range(18)))  # row 1 keeps 2 of the 20 labels
    s, i = chunked_topk(x, w.split(16), 4, 20, exclude)
    assert s.shape == i.shape == (3, 4)
    assert i[1, 2:].tolist() == [-1, -1] and torch.isinf(s[1, 2:]).all() and sorted(i[1, :2].tolist()) == [18, 19]
    want_s, want_i = reference_topk(x, w, 4, 20)
    assert torch.equal(i[[0, 2]], want_i[[0, 2]])
    assert chunked_topk(x, w.split(16), 30, 20)[1].shape == (3, 30)  # k above the labels: padded with empty slots
