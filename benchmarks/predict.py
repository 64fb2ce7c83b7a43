"""Batch prediction throughput: `elmo predict`'s path (`elmo_serve.predict.predict_stream`) over a dataset split.

    python benchmarks/predict.py --artifact /tmp/deps-art                    # DebianDeps test split, this machine
    python3 benchmarks/predict.py --artifact ART --device cuda --batch-sizes 256 1024 4096   # the GPU machine

Needs no Ray (and no faiss): torch, triton, scipy, safetensors. Each batch size runs on a freshly loaded model (the
featurizer's token cache starts cold, as in a new `elmo predict` process) after one warm-up batch of made-up words
(compiles the kernels for that shape). It reads the split's JSON lines as the command does and writes the answers
to a null sink; the time is split into queries (featurize + encoder, `ServingModel.queries`), top-k
(`Scorer.topk`) and the rest (parsing the input, label lookups, JSON). Rows are appended to
benchmarks/results/predict.json and printed as a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from elmo_serve.model import load_model  # noqa: E402
from elmo_serve.predict import DEVICES, predict_stream  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "predict.json"
DEBIAN = ROOT.parent / "shared" / "data" / "debian-deps"


class _NullSink:
    def write(self, s: str) -> int:
        return len(s)


class _Timed:
    """A callable that adds its wall time (after a CUDA sync) to `seconds`."""

    def __init__(self, fn, cuda: bool):
        self.fn, self.cuda, self.seconds = fn, cuda, 0.0

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        out = self.fn(*args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t
        return out


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def run(args) -> list[dict]:
    src = Path(args.input) if args.input else Path(args.data) / f"{args.split}.json"
    rows = []
    for batch_size in args.batch_sizes:
        t0 = time.perf_counter()
        model = load_model(args.artifact, DEVICES[args.device])
        cuda = model.scorer.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        load_s = time.perf_counter() - t0
        warm = [json.dumps({"uid": i, "text": f"qqwarm{i} zzup{i}"}) for i in range(batch_size)]
        predict_stream(model, warm, _NullSink(), k=args.k, batch_size=batch_size)
        model.queries = queries = _Timed(model.queries, cuda)
        model.scorer.topk = topk = _Timed(model.scorer.topk, cuda)
        t0 = time.perf_counter()
        with open(src, encoding="utf-8") as f:
            n = predict_stream(model, f, _NullSink(), k=args.k, batch_size=batch_size, name=str(src))
        seconds = time.perf_counter() - t0
        device = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
        row = {
            "device": device,
            "backend": model.scorer.backend,
            "torch_threads": torch.get_num_threads(),
            "artifact": str(Path(args.artifact).resolve()),
            "model": model.version,
            "labels": model.num_labels,
            "head_dtype": model.info.get("head_dtype"),
            "input": str(src),
            "texts": n,
            "k": args.k,
            "batch": batch_size,
            "load_s": load_s,
            "seconds": seconds,
            "texts_per_s": n / seconds,
            "queries_s": queries.seconds,  # featurize + encoder
            "topk_s": topk.seconds,
            "other_s": seconds - queries.seconds - topk.seconds,  # input parsing, label lookups, JSON
        }
        rows.append(row)
        print(
            f"B={batch_size:5d}  {row['texts_per_s']:9.1f} texts/s  ({n} texts in {seconds:6.2f} s: queries "
            f"{queries.seconds:6.2f}, top-k {topk.seconds:6.2f}, other {row['other_s']:5.2f}; load {load_s:.1f} s)",
            flush=True,
        )
        del model
        if cuda:
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| device | batch | texts | texts/s | queries s | top-k s | other s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} ({r['backend']}) | {r['batch']} | {r['texts']} | {r['texts_per_s']:.1f} | "
            f"{r['queries_s']:.2f} | {r['topk_s']:.2f} | {r['other_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True, help="artifact directory (e.g. a DebianDeps `elmo train --export`)")
    p.add_argument("--data", default=str(DEBIAN), help="dataset directory holding <split>.json")
    p.add_argument("--split", default="tst", help="split file name without .json (default: tst)")
    p.add_argument("--input", default=None, help="a JSON-lines file instead of --data/--split")
    p.add_argument("--device", default="auto", choices=sorted(DEVICES))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("-k", "--k", type=int, default=10)
    p.add_argument("--torch-threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    rows = run(args)
    stamp = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),  # other work on the machine skews CPU figures
        "git_commit": _git_commit(),
    }
    try:
        import triton

        stamp["triton"] = triton.__version__
    except ImportError:
        pass
    print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.is_file() else []
    out.write_text(json.dumps(old + [{**stamp, **r} for r in rows], indent=1) + "\n")
    print(f"{len(rows)} rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
