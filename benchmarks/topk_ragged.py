"""First and second call of the eager Triton top-k for full and ragged batch sizes: does a new size recompile?

    python3 benchmarks/topk_ragged.py                       # the GPU machine; DebianDeps' size (42,242 fp8 labels)
    python3 benchmarks/topk_ragged.py --pad-to 4096         # every call padded to 4096 rows, as `elmo predict` pads

A first call that takes seconds is Triton compiling kernels for that batch size (a size not a multiple of 16 is a new
specialisation; the screened path's candidate slots, a compile-time constant, follow the batch size). Measured on the
H200 on 2026-12-04 before `Scorer` padded eager calls: B = 254 first call 6,091 ms, then 1.6 ms
(benchmarks/results/topk_ragged_before_padding.json, from an earlier form of this script).
Prints a table; writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from elmo_serve.scoring import Scorer  # noqa: E402

SIZES = (256, 254, 250, 256, 1024, 1022, 1000, 4096, 2046, 2000, 160, 150, 144)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--labels", type=int, default=42242)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--pad-to", type=int, default=0, help="Scorer.topk's pad_to (0: only to a multiple of 16)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "topk_ragged.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    rows_pad = -(-args.labels // 1024) * 1024
    w = torch.zeros(rows_pad, args.dim, dtype=torch.float8_e4m3fn, device="cuda")
    w[: args.labels] = (torch.randn(args.labels, args.dim, device="cuda") * 0.2).to(torch.float8_e4m3fn)
    scorer = Scorer(w, args.labels, "triton")
    rows = []
    print("| B | first call ms | second call ms |\n|---:|---:|---:|")
    for B in SIZES:
        x = torch.randn(B, args.dim, device="cuda")
        ms = []
        for _ in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            scorer.topk(x, args.k, pad_to=args.pad_to)
            torch.cuda.synchronize()
            ms.append(round((time.perf_counter() - t) * 1e3, 2))
        rows.append({"B": B, "pad_to": args.pad_to, "first_ms": ms[0], "second_ms": ms[1]})
        print(f"| {B} | {ms[0]:.2f} | {ms[1]:.2f} |", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "labels": args.labels, "dim": args.dim, "k": args.k}
    Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
