"""Serving load benchmark: a bounded closed-loop HTTP load generator, and a direct (Ray-less) batched-scorer mode.

HTTP (loopback; N clients, each sends its next request when the last one is answered, for a fixed duration):
    python benchmarks/serve_load.py --artifact runs/deps/artifact              # starts Ray + the app here
    python benchmarks/serve_load.py --synthetic-labels 42000                   # synthetic model, no artifact
    python benchmarks/serve_load.py --url http://127.0.0.1:8000                # an `elmo serve` already running
  -> requests/s, latency p50/p95/p99, errors, observed scorer batch sizes (x-batch-size header), the load generator's
     CPU per request. A started app runs in Serve's throughput mode, as `elmo serve` does (--proxy-actor: without it).

Direct (the GPU machine, where Ray cannot be installed: torch + triton only, repo not installed):
    python benchmarks/serve_load.py --direct --labels 2800000 --dim 768
  -> `ServingModel.predict_batch` (the call path of the Serve batch handler) on a synthetic FP8 head: queries/s and
     latency by batch size, per backend (triton kernel; torch chunked path on the same device as the baseline).

Rows are appended to benchmarks/results/serve_load.json and printed as a table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from elmo_kernels.topk import topk_scores  # noqa: E402
from elmo_serve.model import Query, ServingModel  # noqa: E402
from elmo_serve.scoring import Scorer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "serve_load.json"
DEBIAN = ROOT.parent / "shared" / "data" / "debian-deps"
WORDS = (
    "python library lib dev data tools module qt gnu perl java rust go node plugin server client daemon utils "
    "documentation headers shared static runtime font theme game audio video image network kernel driver"
).split()


def _quantiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    q = statistics.quantiles(xs, n=100, method="inclusive") if len(xs) > 1 else [xs[0]] * 99
    return {"p50": q[49], "p95": q[94], "p99": q[98]}


def query_texts(n: int, seed: int = 0) -> list[str]:
    """DebianDeps test titles when the data is there, else synthetic package-like texts."""
    path = DEBIAN / "tst.json"
    if path.is_file():
        with path.open() as f:
            return [json.loads(line)["title"] for _, line in zip(range(n), f, strict=False)]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(WORDS), (n, 6), generator=g).tolist()
    return [" ".join(WORDS[i] for i in row) for row in idx]


def synthetic_model(
    labels: int, dim: int, device: str = "cpu", backend: str = "auto", seed: int = 0, cuda_graphs: bool = True
) -> ServingModel:
    """A random FP8 head (labels x dim, padded to 16) behind a hashed-token EmbeddingBag encoder (torch only)."""
    g = torch.Generator(device=device).manual_seed(seed)
    pad = -(-labels // 16) * 16
    w = torch.empty(pad, dim, dtype=torch.float8_e4m3fn, device=device)
    for s in range(0, pad, 1 << 18):  # chunked: no fp32 copy of the whole head
        n = min(1 << 18, pad - s)
        w[s : s + n] = torch.randn(n, dim, generator=g, device=device).to(torch.float8_e4m3fn)
    vocab = 1 << 18
    bag = torch.nn.EmbeddingBag(vocab, dim, mode="mean").to(device)
    torch.nn.init.normal_(bag.weight, std=1.0)

    @torch.inference_mode()
    def encode(texts):
        ids = [[zlib.crc32(t.encode()) % vocab for t in text.lower().split()] or [0] for text in texts]
        offsets = torch.tensor([0] + [len(x) for x in ids[:-1]], device=device).cumsum(0)
        flat = torch.tensor([i for x in ids for i in x], device=device)
        return bag(flat, offsets).float()

    uids = [f"label{i}" for i in range(labels)]
    titles = [f"synthetic label {i}" for i in range(labels)]
    scorer = Scorer(w, labels, backend, device=device, cuda_graphs=cuda_graphs)
    info = {"head_dtype": "float8_e4m3fn", "dim": dim, "encoder": "synthetic hashed bag", "artifact": "synthetic"}
    return ServingModel(f"synthetic-{labels}x{dim}", encode, scorer, uids, titles, info=info)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_direct(args) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    texts = query_texts(max(args.batch_sizes) * 4)
    rows = []
    backends = args.backends or (["triton", "triton-eager", "torch"] if device == "cuda" else ["torch"])
    for backend in backends:
        t0 = time.perf_counter()
        # "triton-eager": the triton backend without CUDA-graph replay of small batches
        model = synthetic_model(
            args.labels, args.dim, device, backend.removesuffix("-eager"), cuda_graphs=not backend.endswith("-eager")
        )
        _sync()
        print(f"[{backend}] built {model.version} on {device} in {time.perf_counter() - t0:.1f} s", flush=True)
        for b in args.batch_sizes:
            batch = [Query([texts[(i * 7 + j) % len(texts)]], args.k) for j in range(b) for i in range(1)]
            for _ in range(args.warmup):
                model.predict_batch(batch)
            _sync()
            times, t_end = [], time.perf_counter() + args.seconds
            while time.perf_counter() < t_end or len(times) < 3:
                t = time.perf_counter()
                model.predict_batch(batch)
                _sync()
                times.append(time.perf_counter() - t)
            q = _quantiles(times)
            agree = {}
            if backend == "triton":  # the replayed graph against an eager call of the kernel, same queries
                x = model.queries([t for qq in batch for t in qq.texts])
                gs, gi = model.scorer.topk(x, args.k)
                es, ei = topk_scores(x, model.scorer.weights, args.k, model.num_labels)
                agree = {"ids_equal_eager": float((gi == ei.cpu()).float().mean()),
                         "max_score_diff_eager": float((gs - es.cpu()).abs().max())}  # fmt: skip
            rows.append(
                {
                    "mode": "direct",
                    "backend": backend,
                    "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                    "labels": args.labels,
                    "dim": args.dim,
                    "k": args.k,
                    "batch": b,
                    "calls": len(times),
                    "queries_per_s": b / statistics.median(times),
                    "p50_ms": 1e3 * q["p50"],
                    "p95_ms": 1e3 * q["p95"],
                    "p99_ms": 1e3 * q["p99"],
                }
                | agree
            )
            r = rows[-1]
            print(
                f"[{backend}] B={b:5d}  {r['queries_per_s']:10.1f} q/s  p50 {r['p50_ms']:8.2f} ms  "
                f"p95 {r['p95_ms']:8.2f} ms  {agree or ''}",
                flush=True,
            )
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


async def _load(url: str, clients: int, seconds: float, warmup: float, texts: list[str], k: int, per_req: int):
    import aiohttp  # a lighter client than httpx: on 2 cores the load generator shares the CPUs with the server

    lat, errors, codes, batches, sent = [], 0, {}, [], 0
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        start = time.perf_counter()
        measure_from, stop = start + warmup, start + warmup + seconds

        async def client(i: int):
            nonlocal errors, sent
            n = i
            while (now := time.perf_counter()) < stop:
                body = {"texts": [texts[(n + j) % len(texts)] for j in range(per_req)], "k": k}
                n += clients
                batch = None
                try:
                    async with session.post("/v1/predict", json=body) as r:
                        await r.read()
                        ok, code, batch = r.status == 200, r.status, r.headers.get("x-batch-size")
                except Exception as e:  # counted, never fatal
                    ok, code = False, type(e).__name__
                t, sent = time.perf_counter(), sent + 1
                if now >= measure_from:
                    lat.append(t - now)
                    codes[code] = codes.get(code, 0) + 1
                    errors += not ok
                    if ok:
                        batches.append(int(batch or 0))

        cpu = time.process_time()
        await asyncio.gather(*(client(i) for i in range(clients)))
        cpu = time.process_time() - cpu
    return lat, errors, codes, batches, seconds, cpu / max(1, sent)


def _start_app(args):
    from elmo_serve.commands import local_torch_threads, use_throughput_mode

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private, loopback-only benchmark cluster
    if not args.proxy_actor:
        use_throughput_mode()  # as `elmo serve` runs it
    import ray
    from ray import serve

    from elmo_serve.app import AppArgs, Ingress, ModelScorer, app_builder

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    batching = {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s}
    threads = local_torch_threads(args.torch_threads, args.num_cpus)  # as `elmo serve`
    if args.artifact:
        path = str(Path(args.artifact).resolve())
        app = app_builder(AppArgs(artifact=path, backend=args.backend, torch_threads=threads, **batching))
    else:
        labels, dim, backend = args.synthetic_labels, args.dim, args.backend
        build = lambda: synthetic_model(labels, dim, "cpu", backend)  # runs in the replica
        app = Ingress.bind(ModelScorer.bind(build, backend, None, batching, threads))
    serve.run(app, name="elmo", route_prefix="/")
    return f"http://127.0.0.1:{args.port}"


def serve_mode(started: bool, args) -> str:
    if not started:
        return "as running"
    if args.proxy_actor or os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "0":
        return "proxy actor"
    return "throughput (HAProxy, direct ingress, gRPC)"


def run_http(args) -> list[dict]:
    started = args.url is None
    url = _start_app(args) if started else args.url
    import httpx

    try:
        info = httpx.get(url + "/v1/model", timeout=30).json()
        texts = query_texts(4096)
        rows = []
        for clients in args.clients:
            load_before = os.getloadavg()[0]
            lat, errors, codes, batches, secs, cpu = asyncio.run(
                _load(url, clients, args.seconds, args.warmup_s, texts, args.k, args.texts_per_request)
            )
            q = _quantiles(lat)
            row = {
                "mode": "http",
                "serve_mode": serve_mode(started, args),
                "model": info["model_version"],
                "labels": info["num_labels"],
                "backend": info["backend"],
                "cpus": os.cpu_count(),
                "torch_threads": info.get("torch_threads"),  # as the scorer replica reports it
                "clients": clients,
                "texts_per_request": args.texts_per_request,
                "k": args.k,
                "seconds": secs,
                "requests": len(lat),
                "requests_per_s": len(lat) / secs,
                "p50_ms": 1e3 * q["p50"],
                "p95_ms": 1e3 * q["p95"],
                "p99_ms": 1e3 * q["p99"],
                "errors": errors,
                "status_codes": {str(k): v for k, v in codes.items()},
                "batch_mean": statistics.fmean(batches) if batches else 0.0,
                "batch_max": max(batches, default=0),
                "client_cpu_ms_per_request": 1e3 * cpu,  # the load generator's share of the 2 cores
                "load_avg_1m_before": round(load_before, 2),
            }
            rows.append(row)
            print(
                f"clients {clients:3d}: {row['requests_per_s']:7.1f} req/s  p50 {row['p50_ms']:7.2f}  "
                f"p95 {row['p95_ms']:7.2f}  p99 {row['p99_ms']:7.2f} ms  errors {errors}  "
                f"batch mean {row['batch_mean']:.1f} max {row['batch_max']}",
                flush=True,
            )
        return rows
    finally:
        if started:
            from ray import serve

            serve.shutdown()
            import ray

            ray.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--direct", action="store_true", help="call the batched scorer path without Ray")
    p.add_argument("--labels", type=int, default=2_800_000, help="direct: synthetic head labels")
    p.add_argument("--dim", type=int, default=768, help="synthetic head dimension")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    p.add_argument(
        "--backends", nargs="+", default=None, help="direct: triton triton-eager torch (default: all three on GPU)"
    )
    p.add_argument("--warmup", type=int, default=3, help="direct: untimed calls per batch size")
    p.add_argument("--url", default=None, help="http: a running server (else one is started here)")
    p.add_argument("--artifact", default=None, help="http: artifact to serve")
    p.add_argument("--synthetic-labels", type=int, default=42_000, help="http without artifact: synthetic labels")
    p.add_argument("--backend", default="auto")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=10.0, help="measured duration (per client count / batch size)")
    p.add_argument("--warmup-s", type=float, default=2.0, help="http: unmeasured seconds before each run")
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--proxy-actor", action="store_true", help="http: Serve's Python proxy actor, not throughput mode")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.02)
    p.add_argument("--torch-threads", type=int, default=None, help="http: scorer's torch threads (as `elmo serve`)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.direct:
        args.dim = args.dim or 768
    else:
        args.dim = 256 if args.dim == 768 and args.artifact is None else args.dim
    rows = run_direct(args) if args.direct else run_http(args)
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.is_file() else []
    out.write_text(json.dumps(old + [{**stamp, **r} for r in rows], indent=1) + "\n")
    print(f"{len(rows)} rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
