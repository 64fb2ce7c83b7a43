"""Probe: does a second stage on top of the trained head lift P@k? (QUALITY-NOTES.md names tag co-occurrence as a
lever for DebianTags.) A measurement, not a product feature.

The training split is cut 80 / 20 (fixed seed). The quality recipe trains on the 80 %; the 20 % held out chooses the
second stage's settings (on one half, then checked on the other); the test split is scored with and without it. The
gain over the first stage is the lever's size (the first stage here sees 80 % of the data, so its P@k sits below the
full recipe's). Levers (--lever):
  - cooccurrence: s' = s + sigmoid(s) @ A + c (A: labels x labels, L2-penalised, BCE, full-batch Adam);
  - knn: s' = s + alpha * v, v = the labels of the query's n nearest training items (cosine of the model's own
    embeddings, weighted by similarity^power), as a fraction of their total weight.

    python benchmarks/cooccurrence_probe.py --dataset debian-tags [--lever knn] [--precision fp8+kahan] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import DATA  # noqa: E402

import training.data as xd  # noqa: E402
from training.build import encoder_inputs, featurize, load_data  # noqa: E402
from training.checkpoint import model_from_checkpoint  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.train import train  # noqa: E402


def split_train(src: Path, dst: Path, seed: int, held_out: float = 0.2) -> None:
    """dst/trn.json = 80 % of src/trn.json, dst/hld.json = the rest; lbl.json and tst.json copied."""
    lines = (src / "trn.json").read_text().splitlines()
    random.Random(seed).shuffle(lines)
    cut = int(len(lines) * (1 - held_out))
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "trn.json").write_text("\n".join(lines[:cut]) + "\n")
    (dst / "hld.json").write_text("\n".join(lines[cut:]) + "\n")
    for name in ("lbl.json", "tst.json"):
        (dst / name).write_bytes((src / name).read_bytes())


@torch.no_grad()
def scores_and_labels(model, ds: xd.XMCDataset, with_embeddings: bool = False):
    """(N, L) fp32 scores of the exported head (labels in the model's order) and the (N, L) 0/1 targets; with
    with_embeddings, also the (N, d) embeddings."""
    order = model.label_order.cpu().numpy()
    ds = xd.permute_labels(ds, order)
    feats = featurize(model, ds)
    out, embs = [], []
    for start in range(0, ds.num_rows, 1024):
        rows = np.arange(start, min(start + 1024, ds.num_rows))
        e = model.embed(*encoder_inputs(model, ds, feats, rows)).float()
        embs.append(e)
        out.append(model.head.scores(e))
    y = torch.from_numpy((ds.labels.toarray() > 0).astype(np.float32))
    s = torch.cat(out)[:, : y.shape[1]]
    return (s, y, torch.cat(embs)) if with_embeddings else (s, y)


def knn_votes(e: torch.Tensor, e_train: torch.Tensor, y_train: torch.Tensor, n: int, power: float) -> torch.Tensor:
    """(N, L): each query's n nearest training items' labels, weighted by cosine similarity^power, normalised."""
    q = torch.nn.functional.normalize(e, dim=1)
    t = torch.nn.functional.normalize(e_train, dim=1)
    out = []
    for start in range(0, q.shape[0], 2048):
        sim, idx = (q[start : start + 2048] @ t.T).topk(n, dim=1)
        wgt = sim.clamp_min(0).pow(power)
        votes = (wgt[:, :, None] * y_train[idx]).sum(1)
        out.append(votes / wgt.sum(1, keepdim=True).clamp_min(1e-12))
    return torch.cat(out)


def precision_at(s: torch.Tensor, y: torch.Tensor, k: int) -> float:
    top = s.topk(k, dim=1).indices
    return 100.0 * float(y.gather(1, top).sum()) / (k * s.shape[0])


def fit_second_stage(s: torch.Tensor, y: torch.Tensor, penalty: float, steps: int = 300) -> tuple:
    z = torch.sigmoid(s)
    a = torch.zeros(s.shape[1], s.shape[1], requires_grad=True)
    c = torch.zeros(s.shape[1], requires_grad=True)
    opt = torch.optim.Adam([a, c], lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        logits = s + z @ a + c
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum") / s.shape[0]
        (loss + penalty * a.pow(2).sum()).backward()
        opt.step()
    return a.detach(), c.detach()


def second_stage(s: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return s + torch.sigmoid(s) @ a + c


def report_knn(args, first: dict, held: tuple, test: tuple, train: tuple, half: int, t0: float) -> int:
    """Choose (n, power, alpha) on the first half of the held-out rows, check on the second, apply to the test split."""
    (s_h, y_h, e_h), (s_t, y_t, e_t), (y_tr, e_tr) = held, test, train
    grid = {}
    for n in args.neighbours:
        for power in args.powers:
            v = knn_votes(e_h, e_tr, y_tr, n, power)
            for alpha in args.alphas:
                blended = s_h + alpha * v
                grid[(n, power, alpha)] = (precision_at(blended[:half], y_h[:half], 1), blended)
    best = max(grid, key=lambda key: grid[key][0])
    n, power, alpha = best
    base_second_half = precision_at(s_h[half:], y_h[half:], 1)
    best_second_half = precision_at(grid[best][1][half:], y_h[half:], 1)
    print(f"best n={n} power={power:g} alpha={alpha:g}: held-out 2nd half P@1 {best_second_half:.2f}", end=" ")
    print(f"(first stage {base_second_half:.2f})")
    v_t = knn_votes(e_t, e_tr, y_tr, n, power)
    s2 = s_t + alpha * v_t
    result = {
        "dataset": args.dataset,
        "lever": "knn",
        "precision": args.precision,
        "seed": args.seed,
        "first_stage_reported": {k: first[k] for k in ("P@1", "P@5")},
        "test_first_stage": {"P@1": precision_at(s_t, y_t, 1), "P@5": precision_at(s_t, y_t, 5)},
        "test_second_stage": {"P@1": precision_at(s2, y_t, 1), "P@5": precision_at(s2, y_t, 5)},
        "test_knn_alone": {"P@1": precision_at(v_t, y_t, 1), "P@5": precision_at(v_t, y_t, 5)},
        "chosen": {"neighbours": n, "power": power, "alpha": alpha},
        "held_out_second_half_P@1": {"first_stage": base_second_half, "second_stage": best_second_half},
        "grid_first_half_P@1": {f"n={k[0]} p={k[1]:g} a={k[2]:g}": v[0] for k, v in grid.items()},
        "seconds": time.time() - t0,
        "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "grid_first_half_P@1"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--dataset", default="debian-tags")
    p.add_argument("--precision", default="fp8+kahan")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lever", choices=["cooccurrence", "knn"], default="cooccurrence")
    p.add_argument("--penalties", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1])
    p.add_argument("--neighbours", type=int, nargs="+", default=[10, 25, 50], help="knn: n to try")
    p.add_argument("--powers", type=float, nargs="+", default=[1.0, 4.0], help="knn: similarity powers to try")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1, 2, 4, 8], help="knn: blend weights to try")
    p.add_argument("--out", default=None, help="JSON of the result (default: print only)")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        split_train(Path(args.data) / args.dataset, data, args.seed)
        cfg = TrainConfig(
            data=str(data),
            precision=args.precision,
            out=str(Path(tmp) / "run"),
            threads=args.threads,
            progress=False,
            checkpoint_every=0,
            seed=args.seed,
        )
        first = train(cfg)["metrics"]
        model, cfg, _ = model_from_checkpoint(cfg.out)
        train_ds, test_ds = load_data(cfg)
        hld_ds = xd.read_lf(data, "hld")
        s_h, y_h, e_h = scores_and_labels(model, hld_ds, with_embeddings=True)
        s_t, y_t, e_t = scores_and_labels(model, test_ds, with_embeddings=True)
        if args.lever == "knn":
            _, y_tr, e_tr = scores_and_labels(model, train_ds, with_embeddings=True)
    half = s_h.shape[0] // 2
    if args.lever == "knn":
        return report_knn(args, first, (s_h, y_h, e_h), (s_t, y_t, e_t), (y_tr, e_tr), half, t0)
    choice = {}
    for pen in args.penalties:
        a, c = fit_second_stage(s_h[:half], y_h[:half], pen)
        choice[pen] = precision_at(second_stage(s_h[half:], a, c), y_h[half:], 1)
        base = precision_at(s_h[half:], y_h[half:], 1)
        print(f"penalty {pen:g}: held-out half P@1 {choice[pen]:.2f} (first stage {base:.2f})", flush=True)
    best = max(choice, key=choice.get)
    a, c = fit_second_stage(s_h, y_h, best)
    s2 = second_stage(s_t, a, c)
    result = {
        "dataset": args.dataset,
        "precision": args.precision,
        "seed": args.seed,
        "first_stage_reported": {k: first[k] for k in ("P@1", "P@5")},
        "test_first_stage": {"P@1": precision_at(s_t, y_t, 1), "P@5": precision_at(s_t, y_t, 5)},
        "test_second_stage": {"P@1": precision_at(s2, y_t, 1), "P@5": precision_at(s2, y_t, 5)},
        "penalty": best,
        "held_out_rows": int(s_h.shape[0]),
        "seconds": time.time() - t0,
        "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
