"""Step time of the label-sharded trainer under torchrun against the single-process trainer, side by side.

    python3 benchmarks/sharded_train.py --labels 2812281 --dim 768 --batch 128 --workers 1 \\
        --out $OUT/sharded_train.json                                           # the H200: NCCL, W = 1
    python benchmarks/sharded_train.py --data ../shared/data/debian-deps --workers 1 2 --threads 2 \\
        --out benchmarks/results/sharded_train_cpu.json                         # this CPU machine: gloo

Each row runs in fresh processes: first the single-process trainer (`training.train.train`), then, for each W,
`torchrun --standalone --nproc-per-node W` of `training.worker.run_distributed` (what Ray Train runs in each of
its workers). Without --data, a synthetic BoW dataset with Zipf-distributed labels is written to a temporary
directory (hashed-bag encoder over its features, random head init). Reported: median step time (first 3 steps
left out), its ratio to the single-process trainer, the communication volume one rank receives per step, peak GPU
memory, and the test P@1 (as a check that the runs train the same model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def synthetic_bow(directory: Path, labels: int, rows: int, test_rows: int, features: int, seed: int = 0) -> Path:
    """train.txt / test.txt: ~24 features a row, 1 + Poisson(2) Zipf(1.1) labels a row, a label's rows sharing
    features (so the problem is learnable)."""
    import numpy as np
    import scipy.sparse as sp

    from training.data import write_bow

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    ranks = np.arange(1, labels + 1, dtype=np.float64) ** -1.1
    cdf = np.cumsum(ranks) / ranks.sum()
    for name, n in (("train.txt", rows), ("test.txt", test_rows)):
        per_row = 1 + rng.poisson(2.0, n)
        cols = np.minimum(np.searchsorted(cdf, rng.random(per_row.sum())), labels - 1)
        row_ids = np.repeat(np.arange(n), per_row)
        y = sp.csr_matrix((np.ones(len(cols), np.float32), (row_ids, cols)), shape=(n, labels))
        y.sum_duplicates()
        y.data[:] = 1.0
        f_cols = (cols[:, None] * 7919 + np.arange(6)[None, :]) % features  # label-owned features
        f_rows = np.repeat(row_ids, 6)
        noise_rows = np.repeat(np.arange(n), 8)
        noise_cols = rng.integers(0, features, len(noise_rows))
        x = sp.csr_matrix(
            (
                np.ones(len(f_rows) + len(noise_rows), np.float32),
                (np.r_[f_rows, noise_rows], np.r_[f_cols.ravel(), noise_cols]),
            ),
            shape=(n, features),
        )
        x.sum_duplicates()
        write_bow(directory / name, x, y)
    return directory


def _single(cfg_json: str, result_path: str) -> None:
    from training.config import TrainConfig
    from training.train import train

    result = train(TrainConfig(**json.loads(cfg_json)))
    Path(result_path).write_text(json.dumps(result))


def _worker(cfg_json: str, result_path: str) -> None:
    from training.config import TrainConfig
    from training.worker import run_distributed

    result = run_distributed(TrainConfig(**json.loads(cfg_json)))
    if int(os.environ.get("RANK", 0)) == 0:
        Path(result_path).write_text(json.dumps(result))


def _run(cmd: list[str], result_path: Path, timeout: int) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    result = json.loads(result_path.read_text())
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="an LF dataset directory (default: synthetic BoW)")
    p.add_argument("--labels", type=int, default=2_812_281)
    p.add_argument("--features", type=int, default=1 << 18)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=60, help="training steps (synthetic data: rows = steps x batch)")
    p.add_argument("--test-rows", type=int, default=64)
    p.add_argument("--precision", default="fp8")
    p.add_argument("--chunk-budget-mb", type=float, default=64.0, help="the head's chunking (2048 suits the GPU)")
    p.add_argument("--workers", type=int, nargs="+", default=[1])
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch's default)")
    p.add_argument("--timeout", type=int, default=540)
    p.add_argument("--out", default="sharded_train.json")
    p.add_argument("--role", choices=["single", "worker"], help=argparse.SUPPRESS)
    p.add_argument("--cfg", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "single":
        return _single(args.cfg, args.result)
    if args.role == "worker":
        return _worker(args.cfg, args.result)

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="elmo-sharded-bench-"))
    base = dict(
        epochs=1,
        batch_size=args.batch,
        precision=args.precision,
        dim=args.dim,
        checkpoint_every=-1,
        loss_every=0,
        progress=False,
        threads=args.threads,
        test_rows=args.test_rows,
        chunk_budget_mb=args.chunk_budget_mb,
    )
    if args.data:
        base |= dict(data=str(Path(args.data).resolve()), format="lf", train_rows=args.steps * args.batch)
        what = f"{args.data}, first {args.steps * args.batch} training rows"
    else:
        t0 = time.perf_counter()
        synthetic_bow(tmp / "data", args.labels, args.steps * args.batch, args.test_rows, args.features)
        base |= dict(data=str(tmp / "data"), format="bow", label_init=False)
        what = f"synthetic BoW, {args.labels:,} labels ({time.perf_counter() - t0:.0f} s to write)"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{what}; batch {args.batch}, dim {args.dim}, {args.precision} head, {device}", flush=True)
    rows = []
    runs = [("single process", None)] + [(f"torchrun W={w}", w) for w in args.workers]
    for name, world in runs:
        cfg = dict(base, out=str(tmp / name.replace(" ", "_").replace("=", "")))
        result_path = tmp / f"{name.replace(' ', '_')}.json"
        me = [sys.executable, str(Path(__file__).resolve())]
        tail = ["--cfg", json.dumps(cfg), "--result", str(result_path)]
        if world is None:
            cmd = [*me, "--role", "single", *tail]
        else:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
            cmd = [*launcher, str(Path(__file__).resolve()), "--role", "worker", *tail]
        r = _run(cmd, result_path, args.timeout)
        row = {
            "run": name,
            "workers": world or 1,
            "step_ms": r["step_ms"],
            "comm_mb_per_step": r.get("comm_mb_per_step", 0.0),
            "peak_gib": r.get("peak_gib"),
            "p_at_1": r["metrics"]["P@1"],
            "wall_seconds": r["wall_seconds"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    single = rows[0]["step_ms"]
    print("\n| run | step ms | vs single process | comm MB/step (one rank) | peak GiB | P@1 | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(
            f"| {r['run']} | {r['step_ms']:.2f} | {r['step_ms'] / single:.2f}x | {r['comm_mb_per_step']:.2f} | "
            f"{peak} | {r['p_at_1']:.2f} | {r['wall_seconds']:.0f} |"
        )
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "data": what,
        "args": {k: v for k, v in vars(args).items() if k not in ("role", "cfg", "result")},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
