"""Head-step benchmark: the Triton paths (two-pass, three-pass, fused) vs a plain PyTorch chunked head, checked first.

    python3 benchmarks/head_step.py --out $OUT/head_step.json                  # GPU (H200): check, sweep, table
    python3 benchmarks/head_step.py --run-steps 3 --sizes 2812281            # a few fp8 steps only (for ncu)
    TRITON_INTERPRET=1 python benchmarks/head_step.py --small                # CPU smoke run of the check

1. Correctness on the GPU, both Triton kernels against the mirrored torch reference (same quantisation, same random
   stream) at odd and real shapes, and against fp64 unquantised math at L = 131,072; a failure stops the run.
2. Sweeps of the two-pass and fused kernels' plans at 2.8M labels (fp8, B = 128); the best are used for fp8 below.
   With --profile, the CUDA time of each kernel of one step at 2.8M fp8 (three-pass and two-pass).
3. The table: labels 131K / 670K / 2.8M / 8.6M, B = 128 and 256, D = 768, heads bf16 / fp8 (fp8 dots) / fp8 +
   Kahan (bf16 compensation on 20% of the rows), kernels two-pass / three-pass / fused, and torch-bf16 (plain
   chunked head, materialised weight gradient). Median ms per step (`triton.testing.do_bench`, CUDA events), peak GiB
   (max_memory_allocated over one step after a reset, weights and batch included), the floor
   max(6 B L D / peak rate, (weights + Kahan) read once and written once / bandwidth) and the ratio to it.
JSON is rewritten after every section, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402

from elmo_kernels import head_step as hs  # noqa: E402
from elmo_kernels import head_step_fused as hsf  # noqa: E402
from elmo_kernels import head_step_three as hs3  # noqa: E402
from elmo_kernels import head_step_two as hst  # noqa: E402

PAPER_SIZES = [131072, 670091, 2812281, 8623847]
BF16_RATE = 690e12  # FLOP/s, measured on the H200 (bf16 matmul)
FP8_RATE = 1260e12  # FLOP/s, measured on the H200 (fp8 _scaled_mm)
BANDWIDTH = 4.25e12  # B/s, measured device copy on the H200
CHUNK = 262144
DIM = 768
TAGS = {"fused": "fused", "three-pass": "three", "two-pass": "two"}  # column prefixes of the correctness rows


def make_head(num_labels: int, dim: int, dtype: torch.dtype, device, chunk: int = CHUNK) -> list[torch.Tensor]:
    padded = math.ceil(num_labels / hs.LABEL_ALIGN) * hs.LABEL_ALIGN
    chunks = []
    for start in range(0, padded, chunk):
        rows = min(chunk, padded - start)
        w = torch.randn(rows, dim, device=device) * (1.0 / math.sqrt(dim))
        chunks.append(w.to(dtype))
    return chunks


def make_batch(batch: int, dim: int, num_labels: int, device, seed: int, pairs_on: str = "cpu"):
    """x on `device`; the pairs on `pairs_on` (default: the CPU, where the trainer keeps them: the head step then
    checks and sorts them without a device synchronisation)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, dim, generator=g).to(device=device, dtype=torch.bfloat16)
    # Zipf-like positives: ~5 per row, frequent labels first (as after frequency re-indexing).
    ranks = torch.distributions.Pareto(torch.tensor(1.0), torch.tensor(1.1)).sample((batch * 5,)).long() - 1
    cols = ranks.clamp(max=num_labels - 1)
    rows = torch.arange(batch).repeat_interleave(5)
    where = device if pairs_on == "device" else "cpu"
    return x, rows.to(where), cols.to(where)


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


def _differ(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    bad = sum(int((p.float() != q.float()).sum()) for p, q in zip(a, b, strict=True))
    return bad / sum(p.numel() for p in a)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_case(device, name, batch, labels, dim, dtype, fp8_dots, kahan_rows, exclude, chunk, fp64=False) -> dict:
    """Every Triton kernel vs the reference (and vs fp64 math when asked) on one problem."""
    torch.manual_seed(hash(name) % 1000)
    w0 = make_head(labels, dim, dtype, device, chunk=chunk)
    x, rows, cols = make_batch(batch, dim, labels, device, seed=1, pairs_on="device")  # the device-pair path
    ex = {}
    if exclude:
        ex = {
            "exclude_rows": rows[:exclude].clone(),
            "exclude_cols": torch.randint(0, labels, (exclude,), device=device),
        }
        ex["exclude_cols"][0] = cols[0]
    k0 = (torch.randn(kahan_rows, dim, device=device) * 1e-4).to(torch.bfloat16) if kahan_rows else None
    out = {}
    for impl, kernel in [("triton", k) for k in hs.KERNELS] + [("torch", "fused")]:
        cfg = hs.HeadStepConfig(
            lr=0.05, weight_decay=1e-4, seed=11, fp8_dots=fp8_dots, compute_loss=True, kernel=kernel
        )
        w = [c.clone() for c in w0]
        k = k0.clone() if k0 is not None else None
        res = hs.head_step(w, x, rows, cols, cfg, num_labels=labels, kahan=k, impl=impl, **ex)
        torch.cuda.synchronize()
        out[kernel if impl == "triton" else "torch"] = (w, res, k)
    wr, rr, kr = out["torch"]
    row = {"case": name, "batch": batch, "labels": labels, "dim": dim, "dtype": str(dtype).split(".")[-1]}
    row["fp8_dots"], row["kahan_rows"], row["exclude"] = fp8_dots, kahan_rows, exclude
    ok = True
    for kernel in hs.KERNELS:
        wt, rt, kt = out[kernel]
        tag = TAGS[kernel]
        row[f"{tag}_w_differ"] = _differ(wt, wr)
        row[f"{tag}_dx_rel"] = _rel(rt.dx, rr.dx)
        row[f"{tag}_loss_rel"] = abs(rt.loss - rr.loss) / abs(rr.loss)
        padding_same = torch.equal(torch.cat(wt)[labels:].view(torch.uint8), torch.cat(w0)[labels:].view(torch.uint8))
        row[f"{tag}_padding_unchanged"] = padding_same
        if kt is not None:
            row[f"{tag}_kahan_differ"] = float((kt.float() != kr.float()).float().mean())
        limit_w, limit_dx = (0.05, 3e-3) if fp8_dots else (2e-3, 1e-4)
        good = (
            row[f"{tag}_w_differ"] < limit_w
            and row[f"{tag}_dx_rel"] < limit_dx
            and row[f"{tag}_loss_rel"] < 1e-3
            and padding_same
            and not torch.isnan(rt.dx).any()
        )
        row[f"{tag}_ok"] = bool(good)
        ok = ok and good
    row["fused_vs_three_w_differ"] = _differ(out["fused"][0], out["three-pass"][0])
    row["two_vs_three_w_differ"] = _differ(out["two-pass"][0], out["three-pass"][0])
    # Determinism: the kernels with dX partials again, same inputs: identical bits.
    for kernel in ("fused", "two-pass"):
        cfg = hs.HeadStepConfig(
            lr=0.05, weight_decay=1e-4, seed=11, fp8_dots=fp8_dots, compute_loss=True, kernel=kernel
        )
        w = [c.clone() for c in w0]
        k = k0.clone() if k0 is not None else None
        again = hs.head_step(w, x, rows, cols, cfg, num_labels=labels, kahan=k, impl="triton", **ex)
        same = bool(
            torch.equal(again.dx, out[kernel][1].dx)
            and all(torch.equal(a, b) for a, b in zip(w, out[kernel][0], strict=True))
        )
        row[f"{TAGS[kernel]}_deterministic"] = same
        ok = ok and same
    if fp64:
        w64 = torch.cat(w0).double()[:labels]
        x64 = x.double()
        y = torch.zeros(batch, labels, dtype=torch.float64, device=device)
        y[rows, cols] = 1.0
        g64 = torch.sigmoid(x64 @ w64.T) - y
        if exclude:
            g64[ex["exclude_rows"], ex["exclude_cols"]] = 0.0
        dx64 = g64 @ w64
        upd64 = -0.05 * (g64.T @ x64 + 1e-4 * w64)
        for tag, key in [(TAGS[k], k) for k in hs.KERNELS] + [("reference", "torch")]:
            wt, rt, _ = out[key]
            upd = torch.cat(wt).double()[:labels] - w64
            row[f"{tag}_dx_rel_vs_fp64"] = _rel(rt.dx, dx64)
            row[f"{tag}_update_rel_vs_fp64"] = _rel(upd, upd64)
            row[f"{tag}_update_bias_vs_fp64"] = float((upd - upd64).mean() / upd64.abs().mean())
    row["ok"] = bool(ok)
    del out, w0
    torch.cuda.empty_cache()
    return row


CHECKS = [
    # name, batch, labels, dim, dtype, fp8_dots, kahan rows, excluded pairs, chunk rows, fp64 comparison
    ("bf16-odd", 3, 1009, 77, torch.bfloat16, False, 0, 0, 1024, False),
    ("fp8-sim-b1", 1, 1009, 77, torch.float8_e4m3fn, False, 0, 0, 1024, False),
    ("fp8-dots-all-options", 33, 40000, 768, torch.float8_e4m3fn, True, 5000, 40, 16384, False),
    ("bf16-kahan-exclude-b256", 256, 20001, 768, torch.bfloat16, False, 3000, 100, 8192, False),
    ("fp8-131k", 128, 131072, 768, torch.float8_e4m3fn, True, 0, 0, CHUNK, True),
    ("bf16-131k", 128, 131072, 768, torch.bfloat16, False, 0, 0, CHUNK, True),
    ("fp8-sim-131k", 128, 131072, 768, torch.float8_e4m3fn, False, 0, 0, CHUNK, True),
    ("fp8-kahan-131k-b256", 256, 131072, 768, torch.float8_e4m3fn, True, 26214, 0, CHUNK, True),
]


def table_order(sizes, batches, variants, kernels) -> list[tuple]:
    """The table's rows, most telling first (the headline 2.8M FP8 row, then what a short run should still hold)."""
    paths = ("two-pass", "three-pass", "fused")
    first = [(2812281, 128, v, k) for v in ("fp8", "bf16", "fp8+kahan") for k in (*paths, "torch")]
    first += [(8623847, 128, "fp8", k) for k in paths]
    first += [(2812281, 256, "fp8", k) for k in paths]
    rest = [(n, b, v, k) for n in sizes for b in batches for v in variants for k in kernels]
    rows = [r for r in first + rest if r[0] in sizes and r[1] in batches and r[2] in variants and r[3] in kernels]
    rows = [r for r in rows if r[3] != "torch" or r[2] == "bf16"]
    return list(dict.fromkeys(rows))


def bench_one(device, num_labels, batch, variant, kernel, pairs_on="cpu") -> dict:
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    dtype = torch.bfloat16 if variant == "bf16" else torch.float8_e4m3fn
    chunks = make_head(num_labels, DIM, dtype, device)
    x, rows, cols = make_batch(batch, DIM, num_labels, device, seed=2, pairs_on=pairs_on)
    if kernel == "torch":
        rows, cols = rows.to(device), cols.to(device)
    kahan = None
    if variant == "fp8+kahan":
        kahan = torch.zeros(int(0.2 * num_labels), DIM, dtype=torch.bfloat16, device=device)
    if kernel == "torch":
        fn = lambda: torch_chunked_step(chunks, x, rows, cols, 0.05, 1e-4)  # noqa: E731
    else:
        cfg = hs.HeadStepConfig(lr=0.05, weight_decay=1e-4, seed=3, fp8_dots=dtype != torch.bfloat16, kernel=kernel)
        fn = lambda: hs.head_step(chunks, x, rows, cols, cfg, num_labels=num_labels, kahan=kahan, impl="triton")  # noqa: E731
    fn()  # compile and warm up, then one measured step for peak memory (do_bench's own 256 MB flush buffer excluded)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    ms = triton.testing.do_bench(fn, warmup=30, rep=200, return_mode="median")
    weight_bytes = sum(c.numel() * c.element_size() for c in chunks)
    flops = 6 * batch * num_labels * DIM
    rate = BF16_RATE if variant == "bf16" or kernel == "torch" else FP8_RATE
    kahan_bytes = 2 * kahan.numel() * kahan.element_size() if kahan is not None else 0
    floor_compute = flops / rate * 1e3
    floor_bytes = (2 * weight_bytes + kahan_bytes) / BANDWIDTH * 1e3
    floor = max(floor_compute, floor_bytes)
    return {
        "variant": variant,
        "kernel": kernel,
        "labels": num_labels,
        "batch": batch,
        "ms": ms,
        "peak_gib": peak,
        "floor_ms": floor,
        "floor_compute_ms": floor_compute,
        "floor_bytes_ms": floor_bytes,
        "x_floor": ms / floor,
        "tflops": flops / ms / 1e9,
    }


def with_plan(fields: dict | None, kernel: str = "fused"):
    """Make `kernel` use its default plan with `fields` replaced (None: restore every default)."""
    for name, (module, attr) in PLAN_HOOKS.items():
        setattr(module, attr, DEFAULT_PLANS[name])
    if fields:
        default = DEFAULT_PLANS[kernel]

        def plan(*args, _fields=fields):
            return dataclasses.replace(default(*args), **_fields)

        module, attr = PLAN_HOOKS[kernel]
        setattr(module, attr, plan)


PLAN_HOOKS = {"fused": (hsf, "fused_plan"), "two-pass": (hst, "two_pass_plan"), "three-pass": (hs3, "launch_plan")}
DEFAULT_PLANS = {name: getattr(module, attr) for name, (module, attr) in PLAN_HOOKS.items()}


def sweep(device, num_labels, batch, variant, candidates, kernel="fused") -> tuple[dict, list[dict]]:
    timings = []
    for cand in candidates:
        with_plan(cand, kernel)
        try:
            t = time.time()
            r = bench_one(device, num_labels, batch, variant, kernel)
            timings.append({"plan": cand, "ms": r["ms"], "peak_gib": r["peak_gib"]})
            print(f"  plan {cand}: {r['ms']:.3f} ms, {r['peak_gib']:.3f} GiB ({time.time() - t:.0f} s)", flush=True)
        except Exception as e:  # a plan that does not compile (e.g. out of shared memory) is skipped
            print(f"  plan {cand}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        finally:
            with_plan(None)
    best = min(timings, key=lambda t: t["ms"]) if timings else {"plan": {}}
    return best["plan"], timings


def compiled_report() -> list[dict]:
    """Registers, spills, shared memory and MMA instructions of every compiled variant of the head-step kernels."""
    out = []
    kernels = (
        hsf._fused_step_kernel,
        hs3.logits_grad_kernel,
        hs3._dx_kernel,
        hs3._update_kernel,
        hst._dx_update_kernel,
    )
    for kernel in kernels:
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


FUSED_SWEEP = [
    {},
    {"sc_bytes": 1 << 30},
    {"sc_bytes": 48 << 20},
    {"sc_bytes": 12 << 20},
    {"num_a": 44, "num_groups": 14},
    {"num_a": 22, "num_groups": 18},
    {"block_db": 64, "num_groups": 8},
    {"num_stages": 2},
    {"num_warps": 4},
    {"block_la": 128},
]
TWO_PASS_SWEEP = [
    {},
    {"block_d": 128},
    {"block_d": 128, "paired_bits": True},
    {"block_d": 128, "paired_bits": True, "num_warps": 8, "programs_per_sm": 1},
    {"num_warps": 8, "programs_per_sm": 1},
    {"num_stages": 3},
    {"block_l": 128, "num_stages": 1},
]
THREE_PASS_SWEEP = [
    {},
    {"upd_warps": 4},
    {"upd_warps": 4, "upd_paired_bits": True},
    {"upd_warps": 4, "upd_stages": 2},
    {"upd_warps": 4, "upd_block_l": 128},
    {"upd_warps": 4, "fwd_warps": 4},
    {"upd_warps": 4, "fwd_stages": 4},
    {"upd_warps": 4, "dx_warps": 8},
    {"upd_warps": 4, "dx_block_k": 64},
    {"upd_warps": 4, "dx_stages": 4},
    {"upd_warps": 4, "programs_per_sm": 2},
]
CHECK_COLUMNS = ["case", "two_w_differ", "two_dx_rel", "three_w_differ", "fused_w_differ", "two_deterministic"]


def profile_step(device, num_labels: int, batch: int, kernel: str) -> dict:
    """CUDA time per kernel name over 5 fp8 steps (torch profiler), in ms per step."""
    chunks = make_head(num_labels, DIM, torch.float8_e4m3fn, device)
    x, rows, cols = make_batch(batch, DIM, num_labels, device, seed=2)
    cfg = hs.HeadStepConfig(lr=0.05, weight_decay=1e-4, seed=3, fp8_dots=True, kernel=kernel)
    hs.head_step(chunks, x, rows, cols, cfg, num_labels=num_labels, impl="triton")
    torch.cuda.synchronize(device)
    steps = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            hs.head_step(chunks, x, rows, cols, cfg, num_labels=num_labels, impl="triton")
        torch.cuda.synchronize(device)
    times: dict[str, float] = {}
    for evt in prof.key_averages():
        cuda_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if cuda_us:
            times[evt.key[:60]] = times.get(evt.key[:60], 0.0) + cuda_us / 1e3 / steps
    del chunks
    torch.cuda.empty_cache()
    return dict(sorted(times.items(), key=lambda kv: -kv[1])[:12])


def print_table(rows: list[dict], cols: list[str]) -> None:
    print(" | ".join(f"{c:>12}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:>12.4g}" if isinstance(v, float) else f"{v!s:>12}")
        print(" | ".join(cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/head_step.json")
    ap.add_argument("--small", action="store_true", help="CPU smoke run of the correctness check (interpreter)")
    ap.add_argument("--sizes", type=int, nargs="*", default=PAPER_SIZES)
    ap.add_argument("--batches", type=int, nargs="*", default=[128, 256])
    ap.add_argument("--variants", nargs="*", default=["fp8", "fp8+kahan", "bf16"])
    ap.add_argument("--kernels", nargs="*", default=["two-pass", "three-pass", "fused", "torch"])
    ap.add_argument(
        "--pairs",
        nargs="*",
        default=["cpu"],
        choices=["cpu", "device"],
        help="where the table's positive pairs live: cpu (as the trainer passes them) and/or device (a bounds check "
        "that synchronises)",
    )
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--checks", type=int, default=len(CHECKS), help="run the first N correctness cases")
    ap.add_argument("--sweep", type=int, default=10, help="try the first N fused plans of the sweep")
    ap.add_argument("--sweep-two", type=int, default=7, help="try the first N two-pass plans of the sweep")
    ap.add_argument("--sweep-three", type=int, default=11, help="try the first N three-pass plans of the sweep")
    ap.add_argument("--profile", action="store_true", help="per-kernel CUDA time of one step at 2.8M fp8")
    ap.add_argument("--plan", default="", help="JSON fields of the fused plan to use instead of sweeping")
    ap.add_argument("--run-steps", type=int, default=0, help="only run this many fp8 steps at the first size (ncu)")
    args = ap.parse_args()
    if args.small:
        for kernel in hs.KERNELS:
            x, rows, cols = make_batch(4, 40, 200, "cpu", seed=0)
            chunks = make_head(200, 40, torch.float8_e4m3fn, "cpu")
            ref = [c.clone() for c in chunks]
            cfg = hs.HeadStepConfig(lr=0.05, seed=1, kernel=kernel)
            a = hs.head_step(chunks, x, rows, cols, cfg, num_labels=200, impl="triton")
            b = hs.head_step(ref, x, rows, cols, cfg, num_labels=200, impl="torch")
            print(kernel, "max |dx diff|", float((a.dx - b.dx).abs().max()), "W differ", _differ(chunks, ref))
        return
    device = torch.device("cuda")
    if args.run_steps:
        chunks = make_head(args.sizes[0], DIM, torch.float8_e4m3fn, device)
        x, rows, cols = make_batch(128, DIM, args.sizes[0], device, seed=2)
        for step in range(args.run_steps):
            cfg = hs.HeadStepConfig(lr=0.05, seed=step, kernel=args.kernels[0])
            hs.head_step(chunks, x, rows, cols, cfg, num_labels=args.sizes[0])
        torch.cuda.synchronize()
        return
    meta = {
        "gpu": torch.cuda.get_device_name(device),
        "sms": torch.cuda.get_device_properties(device).multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dim": DIM,
        "chunk_labels": CHUNK,
        "default_fused_plan_fp8_b128": dataclasses.asdict(hsf.fused_plan(128, DIM, True, 132)),
    }
    print(meta, flush=True)
    result = {"meta": meta}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(result, indent=2, default=str))

    if not args.no_check:
        print("== correctness ==", flush=True)
        result["correctness"] = []
        for case in CHECKS[: args.checks]:
            t = time.time()
            row = check_case(device, *case)
            result["correctness"].append(row)
            print(f"{row} ({time.time() - t:.0f} s)", flush=True)
            save()
            if not row["ok"]:
                print("CORRECTNESS FAILED: stopping", flush=True)
                print_table(result["correctness"], CHECK_COLUMNS)
                sys.exit(1)
    plans = {"fused": json.loads(args.plan) if args.plan else {}, "two-pass": {}, "three-pass": {}}
    if not args.no_sweep and not args.plan:
        for kernel, candidates, count in (
            ("three-pass", THREE_PASS_SWEEP, args.sweep_three),
            ("two-pass", TWO_PASS_SWEEP, args.sweep_two),
            ("fused", FUSED_SWEEP, args.sweep),
        ):
            if kernel not in args.kernels or not count:
                continue
            print(f"== {kernel} plan sweep, fp8, B = 128, L = 2812281 ==", flush=True)
            plans[kernel], timings = sweep(device, 2812281, 128, "fp8", candidates[:count], kernel)
            result[f"sweep_{kernel}_fp8_b128"] = timings
            result[f"best_plan_{kernel}_fp8"] = plans[kernel]
            save()
            print("best plan:", plans[kernel], flush=True)
    if args.profile:
        print("== where the time goes: 2.8M fp8, B = 128 ==", flush=True)
        result["profile"] = {}
        for kernel in [k for k in ("three-pass", "two-pass") if k in args.kernels]:
            with_plan(plans.get(kernel), kernel)
            result["profile"][kernel] = profile_step(device, 2812281, 128, kernel)
            with_plan(None)
            print(kernel, result["profile"][kernel], flush=True)
            save()
    print("== benchmark ==", flush=True)
    rows = []
    for n, batch, variant, kernel in table_order(args.sizes, args.batches, args.variants, args.kernels):
        for pairs_on in args.pairs if kernel != "torch" else ["device"]:
            with_plan(plans.get(kernel) if variant != "bf16" else None, kernel if kernel in plans else "fused")
            try:
                r = bench_one(device, n, batch, variant, kernel, pairs_on)
            except Exception as e:  # OOM or a plan that does not compile: the row says so, the run goes on
                r = {"variant": variant, "kernel": kernel, "labels": n, "batch": batch, "error": str(e)[:200]}
            finally:
                with_plan(None)
            r["pairs"] = pairs_on
            rows.append(r)
            print(r, flush=True)
            result["benchmark"] = rows
            save()
    result["compiled"] = compiled_report()
    for row in result["compiled"]:
        print(row)
    save()
    if "correctness" in result:
        print_table(
            result["correctness"],
            CHECK_COLUMNS,
        )
    print_table(rows, ["labels", "batch", "variant", "kernel", "pairs", "ms", "peak_gib", "floor_ms", "x_floor"])


if __name__ == "__main__":
    main()
