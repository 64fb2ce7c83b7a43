"""Top-k scoring over a 2.8M-label fp8 head: the fused kernel against full logits + torch.topk.

GPU (default): a correctness check against the full-logits reference at L = 200K, then for L = 2,812,281 (D = 768,
fp8 weights padded to a multiple of 16) and B in {1, 32, 256, 1024}, k in {5, 100}: median ms per batch, queries/s,
extra memory beyond weights and inputs, the floor max(weight bytes / 4.25e12 B/s, 2 B L D / 1.26e15 FLOP/s) and the
ratio to it; baselines: fp8 torch._scaled_mm + topk, bf16 matmul + topk. A few launch configs of ours are tried per
shape (the best is reported, all are kept in the JSON).
--cpu: our chunked torch path (fp32 / bf16 / fp8 heads) and the serving CPU path (`elmo_kernels.topk.ScreenedTopk`, fp8)
against faiss-cpu IndexFlatIP (exact inner product) at L = 100K, D = 256, all over the same head values.
--small: the GPU script's logic at toy sizes (runs on CPU under TRITON_INTERPRET=1).
--dead: the dead-row mask (`dead=`, rows never returned): a check at L = 200K where the dead rows score highest (eager
paths and a CUDA-graph replay whose buffer is flipped in place between replays, against eager calls and exact fp32),
then at L = 2,812,281 with --dead-frac of the rows dead, B in {1, 1024}, k in {5, 100}: the masked call against the
plain one, eager (its one host synchronisation included) and replayed, median ms and their ratio.

Needs only torch and triton: the repository root is put on sys.path here.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402

from elmo_kernels.common import has_fp8_tensor_cores, round_up  # noqa: E402
from elmo_kernels.topk import CapturedTopk, ScreenedTopk, TopkConfig, prepare_queries, topk_scores  # noqa: E402

HBM_BYTES_PER_S = 4.25e12  # measured H200 copy bandwidth
FP8_FLOPS = 1.26e15  # measured H200 fp8 dense rate
BIG_L, MID_L, DIM = 2_812_281, 200_000, 768
BATCHES, KS = (1, 32, 256, 1024), (5, 100)


def make_head(L: int, D: int, device, dtype=torch.float8_e4m3fn, chunk: int = 1 << 18) -> torch.Tensor:
    w = torch.empty((round_up(L), D), dtype=dtype, device=device)
    for a in range(0, w.shape[0], chunk):
        w[a : a + chunk] = (torch.randn(min(chunk, w.shape[0] - a), D, device=device) * 0.05).to(dtype)
    w[L:] = 0.25  # padding rows would win on positive queries if they leaked
    return w


def bench_ms(fn, small: bool) -> tuple[float, float, float]:
    if small:
        t = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t) * 1e3
        return ms, ms, ms
    q = triton.testing.do_bench(fn, warmup=10, rep=60, quantiles=[0.5, 0.2, 0.8])
    return tuple(float(v) for v in q)


def extra_bytes(fn, device) -> int:
    if device.type != "cuda":
        return -1
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return int(peak - base)


def check_ids(got, want, margin: float) -> tuple[int, list]:
    """Mismatched ids where the reference scores are distinct by `margin` from both neighbours."""
    i, (rs, ri) = got[1], want
    gap = torch.full_like(rs, float("inf"))
    gap[:, 1:] = rs[:, :-1] - rs[:, 1:]
    gap[:, :-1] = torch.minimum(gap[:, :-1], rs[:, :-1] - rs[:, 1:])
    bad = (gap > margin) & (i != ri)
    first = [(b, j, int(i[b, j]), int(ri[b, j]), float(rs[b, j])) for b, j in bad.nonzero()[:5].tolist()]
    return int(bad.sum()), first


def _fp8_dots(w, device) -> bool:
    """Whether topk_scores uses fp8 dots for this head (fp8 weights on an sm_89+ GPU)."""
    return w.dtype == torch.float8_e4m3fn and has_fp8_tensor_cores(device)


def verdict(got, x, w, k: int, L: int, exclude, fp8: bool, dead=None) -> dict:
    """Judge a top-k answer against exact fp32 scores of the same quantized queries.

    Hopper's fp8 MMA accumulates with fewer mantissa bits than fp32 (measured: score errors up to 0.01 on scores of
    ~4.5, D = 768), so a fused fp8 kernel ranks slightly perturbed scores. It passes when every returned score is
    within `tol` of the label's exact score, the worst returned label's exact score is within 2 tol of the exact
    k-th best ("regret"), and the ids are valid, distinct per row, sorted by score and never excluded for their row.
    tol = 8e-3 x the largest score with fp8 dots, 1e-4 x otherwise (fp32 summation order only).
    """
    s, i = got
    xq, inv = prepare_queries(x, w.dtype, fp8)
    exact = (xq.float() @ w[:L].float().T) * inv[:, None]
    if exclude is not None:
        exact.scatter_(1, exclude.clamp_min(0), float("-inf"))  # -1 padding would hit label 0: none used here
    if dead is not None:  # dead rows (never returned) like exclusions of every row
        exact.masked_fill_(dead[None, :L].bool(), float("-inf"))
    tol = float(exact[exact.isfinite()].abs().max()) * (8e-3 if fp8 else 1e-4)
    valid = bool(((i >= 0) & (i < L)).all())
    mine = exact.gather(1, i.clamp(0, L - 1))
    kth = exact.topk(k, dim=1).values[:, -1]
    rec = {
        "score_err": float((s - mine).abs().max()),
        "regret": float((kth - mine.min(dim=1).values).clamp_min(0).max()),
        "tol": tol,
        "valid_ids": valid,
        "distinct": all(len(set(r)) == len(r) for r in i.tolist()),
        "sorted": bool((s[:, 1:] <= s[:, :-1]).all()),
        "excluded_returned": exclude is not None and bool((i[:, :, None] == exclude[:, None, :]).any()),
        "dead_returned": dead is not None and bool(dead[i.clamp(0, L - 1)].any()),
    }
    want = torch.sort(exact, dim=1, descending=True, stable=True)
    rec["mismatches_beyond_2tol"] = check_ids(got, (want.values[:, :k], want.indices[:, :k]), 2 * tol)[0]
    rec["ok"] = (
        valid and rec["distinct"] and rec["sorted"] and not rec["excluded_returned"] and not rec["dead_returned"]
        and rec["score_err"] <= tol and rec["regret"] <= 2 * tol
    )  # fmt: skip
    return rec


def correctness(device, small: bool) -> list[dict]:
    L = 601 if small else MID_L - 3
    D = 32 if small else DIM
    w8 = make_head(L, D, device)
    w16 = make_head(L, D, device, torch.bfloat16)
    rows = []
    cases = [(1, 5), (19, 8)] if small else [(1, 5), (37, 100), (256, 100), (200, 1024), (5, 1)]
    for B, k in cases:
        x = torch.randn(B, D, device=device).abs().to(torch.bfloat16)  # positive: padding rows would score high
        excl = torch.randint(0, L, (B, 3), device=device)
        for name, w, kw in (
            ("fp8", w8, {}),
            ("bf16", w16, {}),
            ("fp8-excl", w8, {"exclude": excl}),
            ("fp8-running", w8, {"config": TopkConfig(screen=False)}),
            ("fp8-excl-screen-cap256", w8, {"exclude": excl, "config": TopkConfig(screen=True, screen_cap=256)}),
            (
                "fp8-excl-tma-first",
                w8,
                {"exclude": excl, "config": TopkConfig(screen=True, tma=True, screen_first=512)},
            ),
        ):
            if k > 256 and "cap256" in name:
                continue
            rec = {"B": B, "k": k, "L": L, "weights": name}
            try:
                fp8 = _fp8_dots(w, device)
                impl = "torch" if device.type == "cpu" and not small else "auto" if device.type == "cuda" else "triton"
                got = topk_scores(x, w, k, L, impl=impl, **kw)
                rec.update(verdict(got, x, w, k, L, kw.get("exclude"), fp8), fp8_dots=fp8)
            except Exception as e:  # keep going: the timing part is still worth having
                rec.update(ok=False, error=repr(e)[:500])
            print("check", rec, flush=True)
            rows.append(rec)
        if device.type == "cuda" and k <= 128:  # the CUDA-graph replay, a smaller batch than captured, exclusions
            rec = {"B": B, "k": k, "L": L, "weights": "fp8-graph-excl"}
            try:
                graph = CapturedTopk(w8, k, L, B + 3, exclude_width=4)
                rec.update(verdict(graph(x, exclude=excl), x, w8, k, L, excl, _fp8_dots(w8, device)))
            except Exception as e:
                rec.update(ok=False, error=repr(e)[:500])
            print("check", rec, flush=True)
            rows.append(rec)
    return rows


# The screened path's settings at the start of this sweep series (pointer loads, first range = all slots, growth 4x
# for B >= 256): the same-run baseline for the defaults chosen from the sweeps (benchmarks/results/topk_sweep_*.json).
PREVIOUS = {"tma": False, "screen_first": 4096}


def variants(B: int, k: int) -> list[TopkConfig]:
    """The default first, then the running top-k kernel alone, then the screened path as it was before the sweeps."""
    growth = 4.0 if B >= 256 else None
    return [
        TopkConfig(),
        TopkConfig(screen=False, two_pass=False),
        TopkConfig(screen=True, two_pass=False, screen_growth=growth, **PREVIOUS),
    ]


# Replayed per shape: the default; the screened path alone (the default before the two-pass path); the screened path
# before the sweeps.
GRAPH_VARIANTS = {
    "graph": None,
    "graph screened": TopkConfig(screen=True, two_pass=False),
    "graph previous": TopkConfig(screen=True, two_pass=False, **PREVIOUS),
}


def _device_us(event) -> float:
    """GPU time of a profiler event (the attribute's name changed across torch versions)."""
    return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)


def profile(x, w8, k, L, device) -> list[dict]:
    """Where the default call spends its time over 20 calls: GPU kernels by CUDA time, host ops by CPU self time, and
    the host's wall time per call when it never waits for the GPU (launch-bound if close to the measured ms)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    topk_scores(x, w8, k, L)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        topk_scores(x, w8, k, L)
    host_us = (time.perf_counter() - t) / 20 * 1e6
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            topk_scores(x, w8, k, L)
        torch.cuda.synchronize()
    rows = [{"name": "host wall per call (no waiting)", "us_per_call": host_us, "launches_per_call": 1}]
    gpu, cpu = [], []
    for e in prof.key_averages():
        t = _device_us(e)
        if t > 0 and e.self_cpu_time_total == 0:  # a kernel (host ops carry their own CPU time)
            gpu.append({"name": "gpu " + e.key[:76], "us_per_call": t / 20, "launches_per_call": e.count / 20})
        if e.self_cpu_time_total > 0:
            cpu.append(
                {
                    "name": "cpu " + e.key[:76],
                    "us_per_call": e.self_cpu_time_total / 20,
                    "launches_per_call": e.count / 20,
                }
            )
    gpu.sort(key=lambda r: -r["us_per_call"])
    cpu.sort(key=lambda r: -r["us_per_call"])
    return rows + gpu[:10] + cpu[:10]


def run_gpu(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is plain fp32
    small = args.small
    t0 = time.time()
    result = {"env": env(device), "checks": correctness(device, small), "rows": []}
    L = 1201 if small else BIG_L
    D = 32 if small else DIM
    batches = (1, 32) if small else BATCHES
    ks = (5,) if small else KS
    w8 = make_head(L, D, device)
    w16 = make_head(L, D, device, torch.bfloat16) if not small else w8.to(torch.bfloat16)
    print(f"setup + checks {time.time() - t0:.1f}s, weights {w8.numel() / 2**30:.2f} GiB fp8", flush=True)
    for B in batches:
        x = torch.randn(B, D, device=device).to(torch.bfloat16)
        for k in ks:
            floor_ms = 1e3 * max(w8.numel() / HBM_BYTES_PER_S, 2 * B * L * D / FP8_FLOPS)
            row = {"B": B, "k": k, "L": L, "D": D, "floor_ms": floor_ms, "ours": [], "baselines": {}}
            for i, cfg in enumerate(variants(B, k)):
                if i and (time.time() - t0 > args.budget or small and i > 1):
                    break
                rec = {"config": {k_: v for k_, v in vars(cfg).items() if v is not None}}
                try:
                    impl = "auto" if device.type == "cuda" else "triton"
                    fn = lambda cfg=cfg, impl=impl, x=x, k=k: topk_scores(x, w8, k, L, impl=impl, config=cfg)
                    tc = time.time()
                    fn()
                    rec["first_call_s"] = time.time() - tc
                    rec["ms"], rec["ms_p20"], rec["ms_p80"] = bench_ms(fn, small)
                    rec["extra_mib"] = extra_bytes(fn, device) / 2**20
                except Exception as e:
                    rec["error"] = repr(e)[:300]
                row["ours"].append(rec)
            for name, gcfg in GRAPH_VARIANTS.items() if device.type == "cuda" else ():
                try:
                    graph = CapturedTopk(w8, k, L, B, config=gcfg)
                    fn = lambda graph=graph, x=x: graph(x)  # noqa: E731
                    row[name] = {"ms": bench_ms(fn, small)[0], "extra_mib": extra_bytes(fn, device) / 2**20}
                    del graph
                except Exception as e:
                    row[name] = {"error": repr(e)[:300]}
            for name, fn in baselines(x, w8, w16, k, L, device).items():
                try:
                    fn()
                    ms = bench_ms(fn, small)[0]
                    row["baselines"][name] = {"ms": ms, "extra_mib": extra_bytes(fn, device) / 2**20}
                except Exception as e:
                    row["baselines"][name] = {"error": repr(e)[:300]}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if device.type == "cuda" and (B, k) in ((1, 5), (1024, 5), (1024, 100)):
                try:
                    row["profile"] = profile(x, w8, k, L, device)
                    for r in row["profile"]:
                        us, n = r["us_per_call"], r["launches_per_call"]
                        print(f"  profile B={B} k={k}: {us:9.1f} us x{n:.0f} {r['name']}")
                except Exception as e:
                    row["profile_error"] = repr(e)[:300]
            timed = [r for r in row["ours"] if "ms" in r]
            if timed:
                best = min(timed, key=lambda r: r["ms"])
                row.update(best=best, ms=best["ms"], qps=B / best["ms"] * 1e3, ratio=best["ms"] / floor_ms)
            print("row", json.dumps(row), flush=True)
            result["rows"].append(row)
            save(result, args.out)  # a run cut short still leaves its rows
    result["wall_s"] = time.time() - t0
    return result


def baselines(x, w8, w16, k, L, device) -> dict:
    out = {}
    if device.type == "cuda":
        xq, _ = prepare_queries(x, torch.float8_e4m3fn, True)
        one = torch.ones((), device=device)

        def fp8_scaled_mm():
            logits = torch._scaled_mm(xq, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            return torch.topk(logits[:, :L], k, dim=1)

        out["fp8_scaled_mm+topk"] = fp8_scaled_mm
        out["fp8_scaled_mm_only"] = lambda: torch._scaled_mm(
            xq, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16
        )  # the GEMM alone, for scale: no top-k
    out["bf16_matmul+topk"] = lambda: torch.topk((x @ w16.t())[:, :L], k, dim=1)
    return out


def env(device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)))
    return info


def agree(device, small: bool) -> list[dict]:
    """The Triton paths against each other and against fp32 rescoring, at L = 200K (fp8 dots on the GPU).

    Per shape: screened (eager) vs running kernel: share of equal ids and max score difference (the two use different
    D chunks, so fp8 accumulation may round differently); graph replay vs eager screened with the same config: must be
    identical; each path's "regret": how far below the reference k-th best score the worst returned label's exact fp32
    score lies (0 for an exact top-k of exact scores; fp8 MMA accumulation error otherwise).
    """
    L = 601 if small else MID_L - 3
    D = 32 if small else DIM
    w8 = make_head(L, D, device)
    fp8 = _fp8_dots(w8, device)
    rows = []
    shapes = [(1, 5, 0), (3, 100, 2), (37, 100, 0), (256, 100, 3), (512, 8, 3), (1024, 5, 0)]
    for B, k, E in shapes if not small else [(2, 5, 1)]:
        x = torch.randn(B, D, device=device).to(torch.bfloat16)
        excl = torch.randint(0, L, (B, E), device=device) if E else None
        impl = "auto" if device.type == "cuda" else "triton"
        run = topk_scores(x, w8, k, L, excl, impl=impl, config=TopkConfig(screen=False, two_pass=False))
        scr = topk_scores(x, w8, k, L, excl, impl=impl, config=TopkConfig(screen=True, two_pass=False))
        paths = {"running": run, "screened": scr}
        if B >= 128:  # where the two-pass path is the default
            paths["two_pass"] = topk_scores(x, w8, k, L, excl, impl=impl, config=TopkConfig(two_pass=True))
        xq, inv = prepare_queries(x, w8.dtype, fp8)
        exact = (xq.float() @ w8[:L].float().T) * inv[:, None]
        if excl is not None:
            exact.scatter_(1, excl, float("-inf"))
        kth = exact.topk(k, dim=1).values[:, -1]
        rec = {"B": B, "k": k, "exclusions": E}
        for name, (_, i_) in paths.items():
            rec[f"{name}_regret"] = float((kth - exact.gather(1, i_).min(dim=1).values).clamp_min(0).max())
            hit = excl is not None and bool((i_[:, :, None] == excl[:, None, :]).any())  # per row: its own list
            rec[f"{name}_excluded_returned"] = int(hit)
        rec["ids_equal_running_screened"] = float((run[1] == scr[1]).float().mean())
        rec["max_score_diff_running_screened"] = float((run[0] - scr[0]).abs().max())
        if "two_pass" in paths:
            rec["ids_equal_two_pass_screened"] = float((paths["two_pass"][1] == scr[1]).float().mean())
            rec["max_score_diff_two_pass_screened"] = float((paths["two_pass"][0] - scr[0]).abs().max())
        if device.type == "cuda":  # the graph against the eager call of its own (default) configuration
            g = CapturedTopk(w8, k, L, B, exclude_width=E)(x, excl)
            eager = topk_scores(x, w8, k, L, excl, config=TopkConfig(screen=True))
            rec["graph_identical_to_eager"] = bool(torch.equal(g[0], eager[0]) and torch.equal(g[1], eager[1]))
        print("agree", rec, flush=True)
        rows.append(rec)
    return rows


def graphs(args) -> dict:
    """The serving buckets: CUDA-graph replay of the default screened path for B = 1..64 (powers of two), k in {5, 100},
    with the GPU kernels of each replay (a fallback `_topk_kernel` taking time means candidate slots overflowed)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = torch.device("cuda")
    w8 = make_head(BIG_L, DIM, device)
    extra = {name: TopkConfig(**fields) for name, fields in json.loads(args.graph_configs).items()}
    rows = []
    for B in args.batches:
        x = torch.randn(B, DIM, device=device).to(torch.bfloat16)
        for k in args.ks:
            rec = {"B": B, "k": k}
            want = None
            for name, cfg in {**GRAPH_VARIANTS, **extra}.items():
                try:
                    if args.eager:  # the plain call instead of a replay (large batches: launches do not dominate)
                        graph = lambda x, cfg=cfg, k=k: topk_scores(x, w8, k, BIG_L, config=cfg or TopkConfig())  # noqa: E731
                    else:
                        graph = CapturedTopk(w8, k, BIG_L, B, config=cfg)
                    got = graph(x)
                except Exception as e:  # an experimental config that does not compile: reported, the rest still run
                    rec[name] = {"error": repr(e)[:300]}
                    continue
                want = want or (got[0].clone(), got[1].clone())
                rec[f"{name} same ids"] = bool(torch.equal(got[1], want[1]))
                rec[name] = bench_ms(lambda graph=graph, x=x: graph(x), False)[0]
                if name == "graph" or args.eager:  # replays of other configs: one profile is enough
                    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                        graph(x)
                        torch.cuda.synchronize()
                    events = prof.key_averages()
                    key = "kernels_us" if name == "graph" else f"{name} kernels_us"
                    rec[key] = {e.key[:40]: round(_device_us(e), 1) for e in events if _device_us(e) > 0}
                del graph
            print("graphs", json.dumps(rec), flush=True)
            rows.append(rec)
    return {"env": env(device), "graphs": rows}


def dead_rows(L: int, frac: float, device, pad_to: int) -> torch.Tensor:
    """A (pad_to,) bool mask with round(frac * L) random rows of the first L dead (at least one)."""
    dead = torch.zeros(pad_to, dtype=torch.bool, device=device)
    dead[torch.randperm(L, device=device)[: max(1, round(frac * L))]] = True
    return dead


def dead_checks(device, small: bool, frac: float) -> list[dict]:
    """The mask at L = 200K where it matters: positive queries and dead rows of 0.25s (they would outscore every live
    row, as padding would), every Triton path eager, and a CUDA-graph replay whose buffer is flipped in place between
    replays (a retired row and a row brought back), each against exact fp32 scores and the graph against the eager call
    of its own configuration."""
    L = 601 if small else MID_L - 3
    D = 32 if small else DIM
    w8 = make_head(L, D, device)
    dead = dead_rows(L, frac, device, w8.shape[0])
    w8.view(torch.uint8)[dead] = torch.full((1,), 0.25).to(w8.dtype).view(torch.uint8).to(device)
    fp8 = _fp8_dots(w8, device)
    impl = "auto" if device.type == "cuda" else "triton"
    rows = []
    for B, k in [(1, 5), (19, 8)] if small else [(1, 5), (1, 100), (37, 100), (256, 100), (1024, 5), (1024, 100)]:
        x = torch.randn(B, D, device=device).abs().to(torch.bfloat16)
        excl = torch.randint(0, L, (B, 3), device=device)
        configs = {
            "default": TopkConfig(),
            "running": TopkConfig(screen=False, two_pass=False),
            "screened": TopkConfig(screen=True, two_pass=False),
        }
        if B >= 128 and not small:
            configs["two_pass"] = TopkConfig(two_pass=True)
        unmasked = topk_scores(x, w8, k, L, impl=impl)[1]
        print(f"dead check B={B} k={k}: every unmasked answer holds dead rows: {bool(dead[unmasked].any(1).all())}")
        for name, cfg in configs.items():
            for ex in (None, excl):
                rec = {"B": B, "k": k, "L": L, "path": name, "exclusions": ex is not None, "dead": int(dead.sum())}
                try:
                    got = topk_scores(x, w8, k, L, ex, impl=impl, config=cfg, dead=dead)
                    rec.update(verdict(got, x, w8, k, L, ex, fp8, dead))
                except Exception as e:
                    rec.update(ok=False, error=repr(e)[:500])
                print("dead check", rec, flush=True)
                rows.append(rec)
        if device.type != "cuda" or k > 128:
            continue
        rec = {"B": B, "k": k, "L": L, "path": "graph, buffer flipped in place", "exclusions": True}
        try:
            buffer = dead.clone()
            graph = CapturedTopk(w8, k, L, B, exclude_width=4, dead=buffer)
            back = int(next(j for j in dead.nonzero().flatten().tolist() if j not in set(excl.flatten().tolist())))
            steps = []
            for step in range(3):
                got = graph(x, exclude=excl)
                eager = topk_scores(x, w8, k, L, excl, config=TopkConfig(screen=True), dead=buffer)
                ok = verdict(got, x, w8, k, L, excl, fp8, buffer)["ok"]
                ok = ok and torch.equal(got[1], eager[1]) and torch.equal(got[0], eager[0])
                if step == 2:  # the dead 0.25 row brought back outscores every live row
                    ok = ok and bool((got[1][:, 0] == back).all())
                steps.append(ok)
                if step == 0:
                    buffer[got[1][:, 0]] = True  # retire every query's best label
                if step == 1:
                    buffer[back] = False
            rec.update(ok=all(steps), steps_ok=steps)
        except Exception as e:
            rec.update(ok=False, error=repr(e)[:500])
        print("dead check", rec, flush=True)
        rows.append(rec)
    return rows


def dead_timing(args) -> dict:
    """The cost of the mask: topk_scores with --dead-frac of the rows dead against the plain call on the same head,
    eager (the mask's count check is one host synchronisation) and as CUDA-graph replays, B in {1, 1024}, k in
    {5, 100}; ratio = masked / plain median ms."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small
    t0 = time.time()
    result = {"env": env(device), "dead_frac": args.dead_frac, "checks": dead_checks(device, small, args.dead_frac)}
    L = 1201 if small else BIG_L
    D = 32 if small else DIM
    w8 = make_head(L, D, device)
    dead = dead_rows(L, args.dead_frac, device, w8.shape[0])
    impl = "auto" if device.type == "cuda" else "triton"
    rows = []
    for B in (1, 4) if small else (1, 1024):
        x = torch.randn(B, D, device=device).to(torch.bfloat16)
        for k in (5,) if small else KS:
            row = {"B": B, "k": k, "L": L, "dead": int(dead.sum())}
            calls = {
                "eager": lambda x=x, k=k: topk_scores(x, w8, k, L, impl=impl),
                "eager dead": lambda x=x, k=k: topk_scores(x, w8, k, L, impl=impl, dead=dead),
            }
            if device.type == "cuda":
                try:  # the partials hold the only references: `del calls` frees the graphs
                    calls["graph"] = functools.partial(CapturedTopk(w8, k, L, B), x)
                    calls["graph dead"] = functools.partial(CapturedTopk(w8, k, L, B, dead=dead), x)
                except Exception as e:
                    row["graph error"] = repr(e)[:300]
            for name, fn in calls.items():
                try:
                    fn()
                    row[name] = bench_ms(fn, small)[0]
                except Exception as e:
                    row[name] = {"error": repr(e)[:300]}
            for name in ("eager", "graph"):
                if isinstance(row.get(name), float) and isinstance(row.get(f"{name} dead"), float):
                    row[f"{name} ratio"] = row[f"{name} dead"] / row[name]
            print("dead row", json.dumps(row), flush=True)
            rows.append(row)
            if device.type == "cuda":
                del calls
                torch.cuda.empty_cache()
    result["rows"] = rows
    result["wall_s"] = time.time() - t0
    return result


def dead_table(result: dict) -> str:
    bad = [c for c in result["checks"] if not c.get("ok")]
    lines = [f"dead-row mask ({result['dead_frac']:.1%} of rows): {len(result['checks']) - len(bad)}/"
             f"{len(result['checks'])} checks ok"]  # fmt: skip
    names = ("eager", "eager dead", "eager ratio", "graph", "graph dead", "graph ratio")
    lines.append(f"{'B':>5} {'k':>4} " + " ".join(f"{n:>12}" for n in names))
    for r in result["rows"]:
        cells = [r.get(n) for n in names]
        lines.append(
            f"{r['B']:>5} {r['k']:>4} "
            + " ".join(f"{c:>12.3f}" if isinstance(c, float) else f"{'-':>12}" for c in cells)
        )
    return "\n".join(lines)


def run_cpu(args) -> dict:
    import faiss
    import numpy as np

    L, D = (5000, 64) if args.small else (100_000, 256)
    torch.set_num_threads(os.cpu_count() or 1)
    # One head in three formats holding the same values (fp8 values are exact in bf16 and fp32): every path and faiss
    # rank the same scores. Queries are bf16 values, which every path multiplies unchanged.
    w8 = (torch.randn(L, D) * 0.05).to(torch.float8_e4m3fn)
    wf, w16 = w8.float(), w8.to(torch.bfloat16)
    index = faiss.IndexFlatIP(D)
    index.add(wf.numpy())
    t0 = time.perf_counter()
    screened = ScreenedTopk(w8, L)  # the serving CPU path: prepacks a bf16 copy once
    prepack_ms = (time.perf_counter() - t0) * 1e3
    result = {"env": env(torch.device("cpu")) | {"faiss": faiss.__version__, "threads": torch.get_num_threads()}}
    result["screened_prepack_ms"] = prepack_ms
    result["rows"] = []
    for B in (1, 32, 256):
        x = torch.randn(B, D).to(torch.bfloat16).float()
        xn, xb = x.numpy().astype(np.float32), x.to(torch.bfloat16)
        for k in KS:
            row = {"B": B, "k": k, "L": L, "D": D}
            for name, fn in (
                ("ours_torch_fp32", lambda x=x, k=k: topk_scores(x, wf, k, L, impl="torch")),
                ("ours_torch_bf16", lambda x=x, k=k: topk_scores(x, w16, k, L, impl="torch")),
                ("ours_torch_fp8", lambda x=x, k=k: topk_scores(x, w8, k, L, impl="torch")),
                ("ours_screened_fp8", lambda xb=xb, k=k: screened(xb, k)),
                ("faiss_IndexFlatIP", lambda xn=xn, k=k: index.search(xn, k)),
            ):
                fn()
                ts = []
                for _ in range(5 if B < 256 else 3):
                    t = time.perf_counter()
                    fn()
                    ts.append((time.perf_counter() - t) * 1e3)
                row[name] = {"ms": sorted(ts)[len(ts) // 2], "qps": B / sorted(ts)[len(ts) // 2] * 1e3}
            got = topk_scores(x, wf, k, L, impl="torch")[1]
            row["agree_with_faiss"] = float((got.numpy() == index.search(xn, k)[1]).mean())
            row["screened_equals_torch_fp8"] = bool(torch.equal(screened(xb, k)[1], topk_scores(x, w8, k, L)[1]))
            print("row", json.dumps(row), flush=True)
            result["rows"].append(row)
    return result


def save(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def table(result: dict, cpu: bool) -> str:
    lines = []
    if cpu:
        names = ("ours_torch_fp32", "ours_torch_bf16", "ours_torch_fp8", "ours_screened_fp8", "faiss_IndexFlatIP")
        lines.append(f"{'B':>5} {'k':>4} " + " ".join(f"{n + ' ms':>22}" for n in names) + "  agree  screened=fp8")
        for r in result["rows"]:
            times = " ".join(f"{r[n]['ms']:>22.2f}" for n in names)
            lines.append(
                f"{r['B']:>5} {r['k']:>4} {times} {r['agree_with_faiss']:>6.3f}  {r['screened_equals_torch_fp8']}"
            )
        lines.append(f"screened path: one-time prepack {result['screened_prepack_ms']:.0f} ms")
        return "\n".join(lines)
    bad = [c for c in result["checks"] if not c.get("ok")]
    lines.append(f"correctness: {len(result['checks']) - len(bad)}/{len(result['checks'])} checks ok")
    head = f"{'B':>5} {'k':>4} {'ours ms':>9} {'q/s':>10} {'extra MiB':>9} {'floor ms':>9} {'ratio':>6}"
    lines.append(head + f" {'graph ms':>9} {'fp8 mm+topk':>12} {'bf16 mm+topk':>12} {'speedup':>8}")
    for r in result["rows"]:
        base = r["baselines"]
        fp8 = base.get("fp8_scaled_mm+topk", {}).get("ms", float("nan"))
        bf16 = base.get("bf16_matmul+topk", {}).get("ms", float("nan"))
        if "ms" not in r:
            lines.append(f"{r['B']:>5} {r['k']:>4} {'failed':>9}")
            continue
        lines.append(
            f"{r['B']:>5} {r['k']:>4} {r['ms']:>9.3f} {r['qps']:>10.0f} {r['best']['extra_mib']:>9.1f} "
            f"{r['floor_ms']:>9.3f} {r['ratio']:>6.2f} {r.get('graph', {}).get('ms', float('nan')):>9.3f} "
            f"{fp8:>12.3f} {bf16:>12.3f} {min(fp8, bf16) / r['ms']:>8.2f}"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "topk.json"))
    p.add_argument("--cpu", action="store_true", help="faiss-cpu IndexFlatIP vs our CPU path")
    p.add_argument("--small", action="store_true", help="toy sizes (CPU + TRITON_INTERPRET=1 for the GPU logic)")
    p.add_argument("--agree", action="store_true", help="only: the Triton paths against each other and fp32")
    p.add_argument("--graphs", action="store_true", help="only: CUDA-graph replay at the serving batch buckets")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="--graphs: batch sizes")
    p.add_argument("--eager", action="store_true", help="--graphs: time plain calls instead of graph replays")
    p.add_argument("--ks", type=int, nargs="+", default=[5, 100], help="--graphs: k values")
    p.add_argument(
        "--graph-configs",
        default="{}",
        help='--graphs: extra named TopkConfig fields to replay, JSON, e.g. \'{"growth 8": {"screen_growth": 8}}\'',
    )
    p.add_argument("--budget", type=float, default=420.0, help="seconds after which only default configs are timed")
    p.add_argument("--dead", action="store_true", help="only: the dead-row mask's checks and its cost")
    p.add_argument("--dead-frac", type=float, default=0.01, help="--dead: share of the rows that are dead")
    args = p.parse_args()
    if args.dead:
        if not 0 < args.dead_frac < 1:
            p.error(f"--dead-frac must be in (0, 1), got {args.dead_frac}")
        result = dead_timing(args)
        save(result, args.out)
        print(f"wrote {args.out}")
        print(dead_table(result))
        failed = [c for c in result["checks"] if not c.get("ok")]
        if failed:
            print(f"DEAD-MASK CHECKS FAILED in {len(failed)} checks: {failed[:3]}")
            return 1
        return 0
    if args.agree:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        result = {"env": env(device), "agree": agree(device, args.small)}
        save(result, args.out)
        bad = [r for r in result["agree"] if r.get("graph_identical_to_eager") is False]
        leaked = [r for r in result["agree"] if any(v for key, v in r.items() if key.endswith("_excluded_returned"))]
        return 1 if bad or leaked else 0
    if args.graphs:
        save(graphs(args), args.out)
        return 0
    result = run_cpu(args) if args.cpu else run_gpu(args)
    save(result, args.out)
    print(f"wrote {args.out}")
    print(table(result, args.cpu))
    failed = [c for c in result.get("checks", []) if not c.get("ok")]
    if failed:
        print(f"CORRECTNESS FAILED in {len(failed)} checks: {failed[:3]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
