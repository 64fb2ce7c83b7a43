"""A planted extreme-classification problem that trains the low-precision head alone, for the README's main job.

Each of L labels has a random prototype in D dims; an input is a prototype plus noise. The head is trained with the
fused ELMO step in fp32 (plain SGD), BF16 and FP8 with stochastic rounding, and FP8 with round-to-nearest, and the
table shows test P@1 and time per step: SR keeps BF16 at fp32's accuracy and FP8 close to it, nearest stalls.
Measured caveat (2026-11-29): with weights near zero and many small random-sign updates (e.g. --offset 0 --labels
512 --lr 0.01), FP8 with SR trails fp32 badly (47 vs 100 P@1) while FP8 nearest does well (97): SR's variance
accumulates there. The full trainer (`elmo train`, training/train.py) trains this head with an encoder on real data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from elmo_kernels import head_step as hs
from elmo_kernels.common import round_up


@dataclass
class DemoConfig:
    labels: int = 128  # planted labels
    dim: int = 128  # embedding size
    batch: int = 64  # rows per step
    steps: int = 300  # SGD steps per variant
    noise: float = 1.0  # input noise relative to the prototype
    offset: float = 0.25  # every weight starts here: fixes the grid step without changing the argmax
    lr: float = 0.003  # SGD learning rate of every variant
    impl: str = "auto"  # "triton" runs the Triton kernels (GPU, or CPU under TRITON_INTERPRET=1)
    seed: int = 0  # prototypes, initial weights and the rounding stream


def planted_batch(cfg: DemoConfig, seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    protos = torch.randn(cfg.labels, cfg.dim, generator=torch.Generator().manual_seed(cfg.seed))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, cfg.labels, (n,), generator=g)
    x = protos[labels] + cfg.noise * torch.randn(n, cfg.dim, generator=g)
    return (2 * x / x.norm(dim=1, keepdim=True)).to(torch.bfloat16), labels


def train_variant(cfg: DemoConfig, dtype: torch.dtype, stochastic: bool, device: torch.device) -> dict:
    padded = round_up(cfg.labels)
    w = cfg.offset + 0.01 * torch.randn(padded, cfg.dim, generator=torch.Generator().manual_seed(cfg.seed + 1))
    w = (w if dtype == torch.float32 else w.to(dtype)).to(device)
    rows = torch.arange(cfg.batch, device=device)
    name = f"{str(dtype).removeprefix('torch.')} {'SR' if stochastic else 'nearest'}"
    start = time.perf_counter()
    for step in tqdm(range(cfg.steps), desc=f"{name:>22}", unit="step", leave=False):
        x, y = planted_batch(cfg, 1000 + step, cfg.batch)
        x, y = x.to(device), y.to(device)
        if dtype == torch.float32:
            target = torch.zeros(cfg.batch, padded, device=device)
            target[rows, y] = 1.0
            grad = torch.sigmoid(x.float() @ w.T) - target
            grad[:, cfg.labels :] = 0.0
            w -= cfg.lr * (grad.T @ x.float())
        else:
            step_cfg = hs.HeadStepConfig(lr=cfg.lr, seed=cfg.seed * 100003 + step, stochastic_rounding=stochastic)
            hs.head_step([w], x, rows, y, step_cfg, num_labels=cfg.labels, impl=cfg.impl)
    ms = (time.perf_counter() - start) / cfg.steps * 1e3
    x_test, y_test = planted_batch(cfg, 7, 4000)
    logits = hs.head_logits([w], x_test.to(device), num_labels=cfg.labels)
    p1 = logits.argmax(dim=1).cpu().eq(y_test).float().mean().item()
    return {"variant": name, "p_at_1": 100 * p1, "ms_per_step": ms}


def run_demo(cfg: DemoConfig, device: torch.device) -> list[dict]:
    variants = [
        (torch.float32, True),
        (torch.bfloat16, True),
        (torch.float8_e4m3fn, True),
        (torch.float8_e4m3fn, False),
    ]
    return [train_variant(cfg, dtype, sr, device) for dtype, sr in variants]
