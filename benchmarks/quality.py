"""The quality table on the real Debian sets: fp32 / bf16 / fp8 / fp8+kahan heads with the same recipe.

    python benchmarks/quality.py --out quality.json                  # all datasets and precisions, 2 threads
    python benchmarks/quality.py --datasets debian-tags --precisions fp8
    python benchmarks/quality.py --datasets debian-tags --precisions fp8+kahan --by-label-count   # where misses are

Reads ../shared/data/<dataset> (LF JSON lines; DebianDeps with its filter files, i.e. "filtered"), trains with
`training.train.train` exactly as `elmo train` runs (the recipe it chooses from the data; `--overrides` only for
explicit experiments, marked as the user's), evaluates on tst.json and prints a
markdown table: P@1/3/5, nDCG@5, PSP@5 (%), train seconds (data featurization + steps; evaluation and checkpoint
writes excluded). Rows are appended to the JSON with the date, machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from training import data as xd  # noqa: E402
from training.build import featurize, load_data  # noqa: E402
from training.checkpoint import model_from_checkpoint  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.evaluation import ranked_batches  # noqa: E402
from training.train import train  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
PRECISIONS = ("fp32", "bf16", "fp8", "fp8+kahan")


def run(dataset: str, precision: str, args) -> dict:
    overrides = json.loads(args.overrides)
    cfg = TrainConfig(
        data=str(Path(args.data) / dataset),
        precision=precision,
        out=str(Path(args.runs) / f"{dataset}-{precision}"),
        threads=args.threads,
        progress=not args.quiet,
        checkpoint_every=0,
        seed=args.seed,
        recipe_keep=",".join(sorted(overrides)),
        **overrides,
    )
    result = train(cfg)
    m = result["metrics"]
    return {
        "dataset": dataset,
        "precision": precision,
        **{k: round(m[k], 2) for k in ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5")},
        "P@1_master_bias": round(result["metrics_master_bias"]["P@1"], 2),
        "P@5_master_bias": round(result["metrics_master_bias"]["P@5"], 2),
        "train_s": round(result["train_seconds"], 1),
        "overrides": overrides,
        "recipe": {k: v["value"] for k, v in result["recipe"].items()},
    }


LABEL_COUNT_GROUPS = ((1, 1), (2, 2), (3, 4), (5, 10**9))


def by_label_count(run_dir: str | Path) -> dict:
    """Where a run's top-1 misses are: P@1 of the test points by their number of true labels, each group's share of
    points and of misses, and the labels most often ranked first wrongly. Filter pairs are removed as in evaluation."""
    model, cfg, _ = model_from_checkpoint(run_dir)
    _, test = load_data(cfg)
    test = xd.permute_labels(test, model.label_order.cpu().numpy())
    top1 = np.concatenate([ids[:, 0].numpy() for _, ids in ranked_batches(model, test, featurize(model, test), 1)])
    y = test.labels.tocsr()
    n_true = np.diff(y.indptr)
    hit = np.asarray(y[np.arange(test.num_rows), top1]).ravel() != 0
    misses = max(1, int((~hit).sum()))
    groups = []
    for lo, hi in LABEL_COUNT_GROUPS:
        m = (n_true >= lo) & (n_true <= hi)
        if m.any():
            groups.append({
                "labels": f"{lo}" if lo == hi else f"{lo}+" if hi >= 10**9 else f"{lo}-{hi}",
                "points_pct": round(100 * m.mean(), 1),
                "P@1": round(100 * hit[m].mean(), 2),
                "misses_pct": round(100 * (m & ~hit).sum() / misses, 1),
            })  # fmt: skip
    names = test.label_uids or [str(i) for i in range(test.num_labels)]
    wrong = np.bincount(top1[~hit], minlength=test.num_labels)
    worst = [{"label": names[i], "times": int(wrong[i])} for i in np.argsort(-wrong)[:10] if wrong[i]]
    return {"P@1": round(100 * hit.mean(), 2), "groups": groups, "most_often_wrong_first": worst}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--datasets", default="debian-deps,debian-tags")
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the bar is for 2 cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overrides", default="{}", help="JSON of TrainConfig keys applied to every run")
    p.add_argument("--runs", default="runs/quality")
    p.add_argument("--out", default="quality.json")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--by-label-count", action="store_true", help="also: P@1 by the test points' number of labels")
    args = p.parse_args(argv)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {args.threads} threads",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "command": " ".join(["python", "benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    rows = []
    for dataset in args.datasets.split(","):
        for precision in args.precisions.split(","):
            rows.append({**run(dataset, precision, args), **meta})
            if args.by_label_count:
                rows[-1]["by_label_count"] = by_label_count(Path(args.runs) / f"{dataset}-{precision}")
            print(json.dumps(rows[-1]))
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(old + rows, indent=2))
    print("| dataset | head | P@1 | P@3 | P@5 | nDCG@5 | PSP@5 | train s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['dataset']} | {r['precision']} | {r['P@1']:.2f} | {r['P@3']:.2f} | {r['P@5']:.2f} | "
            f"{r['nDCG@5']:.2f} | {r['PSP@5']:.2f} | {r['train_s']:.0f} |"
        )
    for r in rows:
        if "by_label_count" in r:
            print(f"\n{r['dataset']} {r['precision']}: P@1 by the test points' number of labels")
            print("| labels | share of points % | P@1 | share of misses % |\n|---|---:|---:|---:|")
            for g in r["by_label_count"]["groups"]:
                print(f"| {g['labels']} | {g['points_pct']} | {g['P@1']} | {g['misses_pct']} |")
            print("most often ranked first wrongly:", r["by_label_count"]["most_often_wrong_first"])


if __name__ == "__main__":
    main()
