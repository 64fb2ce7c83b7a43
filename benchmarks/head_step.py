"""Head-step benchmark: the fused ELMO step vs a plain PyTorch chunked head, with a GPU correctness check first.

    python benchmarks/head_step.py --out benchmarks/results/head_step.json          # GPU (H200)
    TRITON_INTERPRET=1 python benchmarks/head_step.py --small                      # CPU smoke run

Rows: labels L, B = 128, D = 768; bf16, fp8 (fp8 dots) and fp8 + Kahan on 20% of the rows. For each: median ms per
step (CUDA events via triton.testing.do_bench), peak GiB (max_memory_allocated after reset, weights and batch
included), the floor max(6 B L D / peak rate, weight bytes read + written / bandwidth) and the ratio to it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402

from kernels import head_step as hs  # noqa: E402

PAPER_SIZES = [131072, 670091, 2812281, 8623847]
BF16_RATE = 690e12  # FLOP/s, measured on the H200 (bf16 matmul)
FP8_RATE = 1260e12  # FLOP/s, measured on the H200 (fp8 _scaled_mm)
BANDWIDTH = 4.25e12  # B/s, measured device copy on the H200
CHUNK = 262144


def make_head(num_labels: int, dim: int, dtype: torch.dtype, device, chunk: int = CHUNK) -> list[torch.Tensor]:
    padded = math.ceil(num_labels / hs.LABEL_ALIGN) * hs.LABEL_ALIGN
    chunks = []
    for start in range(0, padded, chunk):
        rows = min(chunk, padded - start)
        w = torch.randn(rows, dim, device=device) * (1.0 / math.sqrt(dim))
        chunks.append(w.to(dtype))
    return chunks


def make_batch(batch: int, dim: int, num_labels: int, device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, dim, generator=g).to(device=device, dtype=torch.bfloat16)
    # Zipf-like positives: ~5 per row, frequent labels first (as after frequency re-indexing).
    ranks = torch.distributions.Pareto(torch.tensor(1.0), torch.tensor(1.1)).sample((batch * 5,)).long() - 1
    cols = ranks.clamp(max=num_labels - 1)
    rows = torch.arange(batch).repeat_interleave(5)
    return x, rows.to(device), cols.to(device)


def torch_chunked_step(chunks, x, rows, cols, lr, wd):
    """The plain PyTorch chunked head: bf16 matmuls, a materialised weight gradient per chunk."""
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    start = 0
    for w in chunks:
        n = w.shape[0]
        wb = w if w.dtype == torch.bfloat16 else w.to(torch.bfloat16)
        logits = x @ wb.T
        y = torch.zeros_like(logits)
        sel = (cols >= start) & (cols < start + n)
        y[rows[sel], cols[sel] - start] = 1.0
        grad = torch.sigmoid(logits.float()).sub_(y).to(torch.bfloat16)
        dx += (grad @ wb).float()
        dw = grad.T @ x
        wb.mul_(1 - lr * wd).sub_(dw, alpha=lr)
        if wb is not w:
            w.copy_(wb)
        start += n
    return dx


def check_correctness(device, num_labels: int, batch: int, dim: int) -> list[dict]:
    """Kernel vs the mirrored reference (same quantisation, same Philox stream) and vs fp64 unquantised math."""
    rows_out = []
    for name, dtype, fp8_dots, kahan_frac in [
        ("bf16", torch.bfloat16, False, 0.0),
        ("fp8", torch.float8_e4m3fn, True, 0.0),
        ("fp8-sim", torch.float8_e4m3fn, False, 0.0),
        ("fp8+kahan", torch.float8_e4m3fn, True, 0.2),
    ]:
        w0 = make_head(num_labels, dim, dtype, device, chunk=1 << 30)
        x, rows, cols = make_batch(batch, dim, num_labels, device, seed=1)
        cfg = hs.HeadStepConfig(lr=0.05, weight_decay=1e-4, seed=11, fp8_dots=fp8_dots)
        kh = int(kahan_frac * num_labels)
        k0 = (torch.randn(kh, dim, device=device) * 1e-4).to(torch.bfloat16) if kh else None
        results = {}
        for impl in ("triton", "torch"):
            w = [c.clone() for c in w0]
            k = k0.clone() if k0 is not None else None
            out = hs.head_step(w, x, rows, cols, cfg, num_labels=num_labels, kahan=k, impl=impl)
            torch.cuda.synchronize()
            results[impl] = (w, out.dx, k)
        (wt, dxt, kt), (wr, dxr, kr) = results["triton"], results["torch"]
        mismatch = sum(int((a.float() != b.float()).sum()) for a, b in zip(wt, wr, strict=True)) / (w0[0].numel())
        # fp64 ground truth of dX and of the (pre-rounding) update, without any operand quantisation.
        w64 = w0[0].double()[:num_labels]
        x64 = x.double()
        y = torch.zeros(batch, num_labels, dtype=torch.float64, device=device)
        y[rows, cols] = 1.0
        g64 = torch.sigmoid(x64 @ w64.T) - y
        dx64 = g64 @ w64
        upd64 = -cfg.lr * (g64.T @ x64 + cfg.weight_decay * w64)
        upd_t = wt[0].double()[:num_labels] - w64
        upd_r = wr[0].double()[:num_labels] - w64
        row = {
            "variant": name,
            "labels": num_labels,
            "w_bits_differing_vs_reference": mismatch,
            "dx_rel_err_vs_reference": float((dxt - dxr).norm() / dxr.norm()),
            "dx_rel_err_vs_fp64": float((dxt.double() - dx64).norm() / dx64.norm()),
            "dx_rel_err_reference_vs_fp64": float((dxr.double() - dx64).norm() / dx64.norm()),
            "update_rel_err_vs_fp64": float((upd_t - upd64).norm() / upd64.norm()),
            "update_rel_err_reference_vs_fp64": float((upd_r - upd64).norm() / upd64.norm()),
            "mean_update_bias_vs_fp64": float((upd_t - upd64).mean() / upd64.abs().mean()),
        }
        if kt is not None:
            row["kahan_bits_differing_vs_reference"] = float((kt.float() != kr.float()).float().mean())
        rows_out.append(row)
        del w0, results
        torch.cuda.empty_cache()
    return rows_out


def bench_one(device, num_labels, batch, dim, variant, plan=None) -> dict:
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    dtype = torch.bfloat16 if variant in ("bf16", "torch-bf16") else torch.float8_e4m3fn
    chunks = make_head(num_labels, dim, dtype, device)
    x, rows, cols = make_batch(batch, dim, num_labels, device, seed=2)
    kahan = None
    if variant == "fp8+kahan":
        kahan = torch.zeros(int(0.2 * num_labels), dim, dtype=torch.bfloat16, device=device)
    cfg = hs.HeadStepConfig(
        lr=0.05,
        weight_decay=1e-4,
        seed=3,
        fp8_dots=variant.startswith("fp8"),
        stochastic_rounding=variant != "fp8-nearest",
    )
    if variant == "torch-bf16":
        fn = lambda: torch_chunked_step(chunks, x, rows, cols, 0.05, 1e-4)  # noqa: E731
    else:
        fn = lambda: hs.head_step(chunks, x, rows, cols, cfg, num_labels=num_labels, kahan=kahan, impl="triton")  # noqa: E731
    fn()  # compile and warm up, then one measured step for peak memory (do_bench's own 256 MB flush buffer excluded)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    weight_bytes = sum(c.numel() * c.element_size() for c in chunks)
    flops = 6 * batch * num_labels * dim
    rate = FP8_RATE if variant.startswith("fp8") else BF16_RATE
    kahan_bytes = 2 * kahan.numel() * kahan.element_size() if kahan is not None else 0
    floor_compute = flops / rate * 1e3
    floor_bytes = (2 * weight_bytes + kahan_bytes) / BANDWIDTH * 1e3
    floor = max(floor_compute, floor_bytes)
    return {
        "variant": variant,
        "labels": num_labels,
        "batch": batch,
        "dim": dim,
        "ms": ms,
        "peak_gib": peak,
        "floor_compute_ms": floor_compute,
        "floor_bytes_ms": floor_bytes,
        "floor_ms": floor,
        "ratio_to_floor": ms / floor,
        "tflops": flops / ms / 1e9,
    }


def sweep_plans(device, num_labels, batch, dim, variant) -> tuple[dict, list[dict]]:
    """Try a few launch plans at one size; return the best plan's fields and all timings."""
    default = hs._launch_plan
    base = default(batch, dim, variant.startswith("fp8"))
    # Variations around the default plan, one or two fields at a time.
    candidates = [
        {},
        {"fwd_block_l": 64, "fwd_warps": 4},
        {"fwd_block_l": 64, "fwd_warps": 8},
        {"fwd_stages": 4},
        {"dx_block_d": 128, "dx_warps": 8},
        {"dx_block_d": 128, "dx_warps": 4},
        {"dx_block_d": 128, "dx_block_k": 64, "dx_warps": 4},
        {"dx_block_k": 64},
        {"dx_block_d": 256, "dx_block_k": 64, "dx_warps": 8},
        {"fwd_block_l": 64, "fwd_warps": 4, "fwd_stages": 4},
        {"upd_block_l": 128, "upd_warps": 8},
        {"upd_block_d": 64, "upd_warps": 4, "upd_stages": 2},
        {"upd_block_d": 128, "upd_warps": 8, "upd_stages": 3},
    ]
    timings = []
    for cand in candidates:
        fields = {**base.__dict__, **cand}
        hs._launch_plan = lambda b, d, f, _fields=fields: hs._LaunchPlan(**_fields)  # noqa: E731
        try:
            r = bench_one(device, num_labels, batch, dim, variant)
            timings.append({**cand, "ms": r["ms"]})
            print(f"  plan {cand}: {r['ms']:.3f} ms", flush=True)
        except Exception as e:  # a plan that does not compile (e.g. out of shared memory) is skipped
            print(f"  plan {cand}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        finally:
            hs._launch_plan = default
    best = min(timings, key=lambda t: t["ms"])
    return {k: v for k, v in best.items() if k != "ms"}, timings


def kernel_breakdown(device, num_labels, batch, dim, variant) -> list[dict]:
    chunks = make_head(num_labels, dim, torch.float8_e4m3fn if variant.startswith("fp8") else torch.bfloat16, device)
    x, rows, cols = make_batch(batch, dim, num_labels, device, seed=2)
    cfg = hs.HeadStepConfig(lr=0.05, weight_decay=1e-4, seed=3, fp8_dots=variant.startswith("fp8"))
    for _ in range(3):
        hs.head_step(chunks, x, rows, cols, cfg, num_labels=num_labels)
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            hs.head_step(chunks, x, rows, cols, cfg, num_labels=num_labels)
        torch.cuda.synchronize()
    out = []
    for evt in prof.key_averages():
        total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if total > 0:
            out.append({"kernel": evt.key[:60], "ms_per_step": total / 5 / 1e3, "calls_per_step": evt.count / 5})
    out.sort(key=lambda r: -r["ms_per_step"])
    return out[:8]


def compiled_kernel_report() -> list[dict]:
    """Registers, spills and MMA instructions of every compiled variant of the head-step kernels."""
    out = []
    for kernel in (hs._logits_grad_kernel, hs._dx_kernel, hs._update_kernel):
        for cache in getattr(kernel, "device_caches", {}).values():
            entries = cache[0] if isinstance(cache, tuple) else cache
            for compiled in entries.values():
                try:
                    compiled._init_handles()
                    ptx = compiled.asm.get("ptx", "")
                    out.append(
                        {
                            "kernel": kernel.fn.__name__,
                            "regs": getattr(compiled, "n_regs", None),
                            "spills": getattr(compiled, "n_spills", None),
                            "wgmma": ptx.count("wgmma.mma_async"),
                            "mma_sync": ptx.count("mma.sync"),
                            "shared": getattr(compiled.metadata, "shared", None),
                            "warps": getattr(compiled.metadata, "num_warps", None),
                        }
                    )
                except Exception as e:  # introspection differs across Triton versions
                    out.append({"kernel": kernel.fn.__name__, "error": str(e)[:120]})
    return out


def print_table(rows: list[dict], cols: list[str]) -> None:
    print(" | ".join(f"{c:>14}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:>14.4g}" if isinstance(v, float) else f"{v!s:>14}")
        print(" | ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/head_step.json")
    ap.add_argument("--small", action="store_true", help="CPU smoke run of the correctness check (interpreter)")
    ap.add_argument("--sizes", type=int, nargs="*", default=PAPER_SIZES)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--run-steps", type=int, default=0, help="only run this many fp8 steps at the first size (ncu)")
    args = ap.parse_args()
    if args.small:
        x, rows, cols = make_batch(4, 40, 200, "cpu", seed=0)
        chunks = make_head(200, 40, torch.float8_e4m3fn, "cpu")
        ref = [c.clone() for c in chunks]
        cfg = hs.HeadStepConfig(lr=0.05, seed=1)
        a = hs.head_step(chunks, x, rows, cols, cfg, num_labels=200, impl="triton")
        b = hs.head_step(ref, x, rows, cols, cfg, num_labels=200, impl="torch")
        print("max |dx diff|", float((a.dx - b.dx).abs().max()))
        return
    device = torch.device("cuda")
    if args.run_steps:
        chunks = make_head(args.sizes[0], 768, torch.float8_e4m3fn, device)
        x, rows, cols = make_batch(128, 768, args.sizes[0], device, seed=2)
        for step in range(args.run_steps):
            hs.head_step(chunks, x, rows, cols, hs.HeadStepConfig(lr=0.05, seed=step), num_labels=args.sizes[0])
        torch.cuda.synchronize()
        return
    meta = {
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "batch": 128,
        "dim": 768,
        "chunk_labels": CHUNK,
    }
    print(meta, flush=True)
    result = {"meta": meta}
    print("== correctness at L = 131072 ==", flush=True)
    result["correctness"] = check_correctness(device, 131072, 128, 768)
    print_table(
        result["correctness"],
        [
            "variant",
            "w_bits_differing_vs_reference",
            "dx_rel_err_vs_reference",
            "dx_rel_err_vs_fp64",
            "dx_rel_err_reference_vs_fp64",
            "update_rel_err_vs_fp64",
            "update_rel_err_reference_vs_fp64",
        ],
    )
    plans = {}
    if not args.no_sweep:
        for variant in ("fp8", "bf16"):
            print(f"== launch-plan sweep, {variant}, L = 2812281 ==", flush=True)
            best, timings = sweep_plans(device, 2812281, 128, 768, variant)
            plans[variant] = best
            result[f"sweep_{variant}"] = timings
    print("== benchmark ==", flush=True)
    rows = []
    default = hs._launch_plan
    for n in args.sizes:
        for variant in ("fp8", "fp8+kahan", "fp8-nearest", "bf16", "torch-bf16"):
            key = "bf16" if variant in ("bf16", "torch-bf16") else "fp8"
            if key in plans:
                fields = {**default(128, 768, key == "fp8").__dict__, **plans[key]}
                hs._launch_plan = lambda b, d, f, _fields=fields: hs._LaunchPlan(**_fields)  # noqa: E731
            try:
                r = bench_one(device, n, 128, 768, variant)
            except torch.OutOfMemoryError as e:
                r = {"variant": variant, "labels": n, "error": f"OOM: {str(e)[:100]}"}
            finally:
                hs._launch_plan = default
            rows.append(r)
            print(r, flush=True)
    result["benchmark"] = rows
    result["plans"] = plans
    try:
        result["breakdown_fp8_2.8M"] = kernel_breakdown(device, 2812281, 128, 768, "fp8")
        print(result["breakdown_fp8_2.8M"])
    except Exception as e:
        print("breakdown failed:", e)
    result["compiled"] = compiled_kernel_report()
    for row in result["compiled"]:
        print(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_table(rows, ["variant", "labels", "ms", "peak_gib", "floor_ms", "ratio_to_floor", "tflops"])


if __name__ == "__main__":
    main()
