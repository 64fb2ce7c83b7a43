"""`elmo serve ARTIFACT` and `elmo query "text"`: registered on the `elmo` parser by `add_serve_commands`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from elmo_serve.client import DEFAULT_URL, ElmoClient, ServeError, format_table

# Ray Serve's throughput mode (Ray >= 2.55), read by each Ray process when it starts: HAProxy answers on the HTTP port
# instead of the Python proxy actor, the ingress replicas serve HTTP themselves (on http_options.host, ports
# 30000-31000), deployments call each other over gRPC, and user code runs on each replica's event loop. On 2 CPU cores
# a trivial model's request drops from ~16 to ~3 ms (p50, benchmarks/serve_load.py). HAProxy's stats (8404) and
# Prometheus (9101) ports listen on all interfaces. A process that sets it before importing Ray can call deployment
# handles only from inside an event loop (HTTP clients are unaffected). Set a variable to 0 to keep the proxy actor.
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


def use_throughput_mode() -> None:
    """Ray Serve's throughput mode for a Ray started by this process, unless the environment already decides."""
    for key, value in THROUGHPUT_ENV.items():
        os.environ.setdefault(key, value)


def local_torch_threads(torch_threads: int | None = None, num_cpus: int | None = None) -> int:
    """The scorer's torch threads when Ray runs on this one machine: as asked, else the CPUs given to Ray, else every
    core (a lone replica answers one request faster on all of them)."""
    return torch_threads or num_cpus or os.cpu_count() or 1


def serve_command(
    artifact: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: str = "auto",
    max_batch_size: int = 32,
    batch_wait_timeout_s: float = 0.02,
    num_cpus: int | None = None,
    stop: threading.Event | None = None,
    torch_threads: int | None = None,
) -> int:
    """Start a local Ray and the app on host:port, block until SIGINT/SIGTERM (or `stop` is set), shut down."""
    path = Path(artifact).resolve()
    if not path.exists():
        print(f"elmo serve: no artifact at {path}", file=sys.stderr)
        return 2
    use_throughput_mode()
    import ray
    from ray import serve

    from elmo_serve.app import AppArgs, app_builder

    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    t0 = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        batching = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s}
        threads = local_torch_threads(torch_threads, num_cpus)
        args = AppArgs(artifact=str(path), backend=backend, torch_threads=threads, **batching)
        serve.run(app_builder(args), name="elmo", route_prefix="/")
        with ElmoClient(f"http://{host}:{port}") as c:
            info = c.model()
        print(
            f"serving {info['model_version']} ({info['num_labels']} labels, {info['backend']}) at "
            f"http://{host}:{port} in {time.perf_counter() - t0:.1f} s; docs at /docs; Ctrl-C or SIGTERM stops",
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        print("stopping", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def query_command(text: str, k: int = 10, url: str = DEFAULT_URL, similar: bool = False, mode: str = "text") -> int:
    """Print the top-k labels of `text` (or, with similar=True, the items related to the item whose uid is `text`)."""
    try:
        with ElmoClient(url) as c:
            out = c.similar(uid=text, k=k, mode=mode) if similar else c.predict([text], k=k)
    except ServeError as e:
        print(f"elmo query: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # connection refused, timeouts
        print(
            f"elmo query: cannot reach {url}: {type(e).__name__}: {e} (is `elmo serve` running? give its port with "
            "--port, or --url)",
            file=sys.stderr,
        )
        return 1
    labels = out["results"] if similar else out["results"][0]
    head = f"items related to {text!r}" if similar else f"top {k} labels of {text!r}"
    print(f"{head} (model {out['model_version']})")
    print(format_table(labels))
    return 0


def _serve(args: argparse.Namespace) -> int:
    return serve_command(
        args.artifact,
        args.host,
        args.port,
        args.backend,
        args.max_batch_size,
        args.batch_wait_timeout_s,
        args.num_cpus,
        torch_threads=args.torch_threads,
    )


def query_url(url: str | None = None, port: int | None = None) -> str:
    """The URL `elmo query` asks: url, else port on 127.0.0.1, else $ELMO_URL, else $ELMO_PORT (as `elmo serve`
    reads it) on 127.0.0.1, else the default."""
    if url:
        return url
    if port is None and os.environ.get("ELMO_URL"):
        return os.environ["ELMO_URL"]
    port = port if port is not None else os.environ.get("ELMO_PORT")
    return f"http://127.0.0.1:{port}" if port is not None else DEFAULT_URL


def _query(args: argparse.Namespace) -> int:
    return query_command(args.text, args.k, query_url(args.url, args.port), args.similar, args.mode)


def add_serve_commands(subparsers) -> None:
    """Register `serve` and `query` on the `elmo` parser's subparsers (each sets `func`, returning an exit code)."""
    p = subparsers.add_parser("serve", help="serve an artifact over HTTP with Ray Serve on this machine")
    p.add_argument("artifact", help="artifact directory (from `elmo export`)")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP port binds to (0.0.0.0: every interface)")
    p.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("ELMO_PORT", 8000)),
        help="HTTP port (default: $ELMO_PORT, else 8000)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "triton", "torch", "faiss"],
        help="scoring backend; auto: the Triton top-k kernels on a GPU, the chunked torch path on CPU",
    )
    p.add_argument("--max-batch-size", type=int, default=32, help="requests the scorer answers in one batch")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.02, help="cap of the wait while the scorer is busy")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs given to the local Ray (default: all)")
    p.add_argument(
        "--torch-threads", type=int, default=None, help="scorer's torch threads (default: --num-cpus, else all)"
    )
    p.set_defaults(func=_serve)

    q = subparsers.add_parser("query", help="ask a running `elmo serve` for the top-k labels of a text")
    q.add_argument("text", help="the text to tag (with --similar: an item uid)")
    q.add_argument("-k", type=int, default=10, help="labels (or items) to return")
    where = q.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help="the service's URL (default: $ELMO_URL, else 127.0.0.1 at --port)")
    where.add_argument(
        "--port",
        type=int,
        default=None,
        help="the port `elmo serve` was given, on 127.0.0.1 (default: $ELMO_PORT, else 8000)",
    )
    q.add_argument("--similar", action="store_true", help="TEXT is an item uid: print related items")
    q.add_argument("--mode", default="text", choices=["text", "embedding"], help="with --similar")
    q.set_defaults(func=_query)
