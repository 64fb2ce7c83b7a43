"""Learning with a pure low-precision head: SR reaches the fp32 head's accuracy, round-to-nearest stalls.

Planted problem: 64 labels with random prototypes in D = 128, inputs = prototype + noise. Every weight starts at a
constant offset c (plus 1% noise): the offset adds the same x.1 to every label's score, so it does not change the
argmax, but it fixes the weights' grid step (ulp). With lr chosen so that most per-step updates are below half an
ulp, round-to-nearest throws them away while stochastic rounding keeps them in expectation.
"""

import pytest
import torch

from elmo_kernels import head_step as hs

LABELS, DIM, BATCH, STEPS = 64, 128, 32, 300
TOLERANCE = 0.05  # SR's test accuracy may trail the fp32 head's by at most this (measured gap: 0.00-0.03)


def _planted(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    protos = torch.randn(LABELS, DIM, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, LABELS, (n,), generator=g)
    x = protos[labels] + torch.randn(n, DIM, generator=g)
    return (2 * x / x.norm(dim=1, keepdim=True)).to(torch.bfloat16), labels


def _train(dtype: torch.dtype, offset: float, lr: float, stochastic: bool = True) -> float:
    w = offset + 0.01 * torch.randn(LABELS, DIM, generator=torch.Generator().manual_seed(0))
    w = w if dtype == torch.float32 else w.to(dtype)
    x_train, y_train = _planted(1, STEPS * BATCH)
    rows = torch.arange(BATCH)
    for step in range(STEPS):
        x = x_train[step * BATCH : (step + 1) * BATCH]
        y = y_train[step * BATCH : (step + 1) * BATCH]
        if dtype == torch.float32:  # the fp32 head: plain SGD on the same loss
            target = torch.zeros(BATCH, LABELS)
            target[rows, y] = 1.0
            grad = torch.sigmoid(x.float() @ w.T) - target
            w -= lr * (grad.T @ x.float())
        else:
            cfg = hs.HeadStepConfig(lr=lr, seed=step, stochastic_rounding=stochastic)
            hs.head_step([w], x, rows, y, cfg, impl="torch")
    x_test, y_test = _planted(2, 2000)
    return (x_test.float() @ w.float().T).argmax(dim=1).eq(y_test).float().mean().item()


@pytest.mark.parametrize(
    ("dtype", "offset", "lr"),
    [(torch.bfloat16, 1.0, 1e-3), (torch.float8_e4m3fn, 0.25, 3e-3)],
)
def test_sr_matches_fp32_and_nearest_stalls(dtype, offset, lr):
    fp32 = _train(torch.float32, offset, lr)
    sr = _train(dtype, offset, lr, stochastic=True)
    nearest = _train(dtype, offset, lr, stochastic=False)
    assert fp32 > 0.9, f"the planted problem should be learnable in fp32 (got {fp32:.3f})"
    assert sr >= fp32 - TOLERANCE, f"{dtype} with SR: {sr:.3f} vs fp32 {fp32:.3f}"
    assert nearest < 0.5 * fp32, f"{dtype} round-to-nearest should stall: {nearest:.3f} vs fp32 {fp32:.3f}"
