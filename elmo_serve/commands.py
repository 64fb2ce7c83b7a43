"""`elmo serve ARTIFACT`, `elmo swap ARTIFACT` and `elmo query "text"`: registered on the `elmo` parser by
`add_serve_commands`.

`elmo serve` owns what it starts: without --address a Ray node of its own on 127.0.0.1 (never a `ray start` cluster
it happens to find), the app deployed from a config as `serve deploy` does (so the scorer's artifact is declared in its
user_config, and a swap changes only that), and a control directory through which `elmo swap` reaches it
(`elmo_serve.control`). SIGINT or SIGTERM stops all of it within seconds.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from elmo_serve.client import DEFAULT_URL, ElmoClient, ServeError, format_table
from elmo_serve.control import (
    ControlError,
    ensure_private_dir,
    read_service,
    request_swap,
    run_dir,
    take_requests,
    write_json,
    write_result,
)

# Ray Serve's throughput mode (Ray >= 2.55), read by each Ray process when it starts: HAProxy answers on the HTTP port
# instead of the Python proxy actor, the ingress replicas serve HTTP themselves (on http_options.host, ports
# 30000-31000), deployments call each other over gRPC, and user code runs on each replica's event loop. On 2 CPU cores
# a trivial model's request drops from ~16 to ~3 ms (p50, benchmarks/serve_load.py). HAProxy's stats (8404) and
# Prometheus (9101) ports listen on every interface (Ray's template has no host for them), so `elmo serve` on a
# loopback host keeps the proxy actor (see `serve_command`). A process that sets the mode before importing Ray can call
# deployment handles only from inside an event loop (HTTP clients are unaffected). Set a variable to 0 to keep the
# proxy actor.
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}

# The Ray node a local `elmo serve` starts (read by Ray when it is imported and by every process it starts):
LOCAL_RAY_ENV = {
    # Ray replaces a node address of 127.0.0.1 by the machine's own unless this is 0 (Ray's switch for single-node
    # Windows/macOS clusters): with it the node's address stays 127.0.0.1 and gcs, raylet, workers, the agents and the
    # metrics servers listen on it alone.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Direct-ingress replicas hold their shutdown 30 s so that an external load balancer can deregister them (serve
    # shutdown took 33 s); a local service has none in front of it.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    # Each replica's inter-deployment gRPC server: Ray binds it to every interface (`elmo_serve.app.bind_replica_grpc`).
    "ELMO_REPLICA_GRPC_HOST": "127.0.0.1",
}
APP, SCORER = "elmo", "ModelScorer"
# A stopping replica checks for requests still running every graceful_shutdown_wait_loop_s (Serve's default: 2 s).
_QUICK_STOP = {"graceful_shutdown_wait_loop_s": 0.1}


def use_throughput_mode(haproxy: bool = True) -> None:
    """Ray Serve's throughput mode for a Ray started by this process, unless the environment already decides;
    haproxy=False keeps the Python proxy actor on the HTTP port (it binds only http_options.host)."""
    for key, value in THROUGHPUT_ENV.items():
        os.environ.setdefault(key, value if haproxy or key != "RAY_SERVE_ENABLE_HA_PROXY" else "0")


def local_torch_threads(torch_threads: int | None = None, num_cpus: int | None = None) -> int:
    """The scorer's torch threads when Ray runs on this one machine: as asked, else the CPUs given to Ray, else every
    core (a lone replica answers one request faster on all of them)."""
    return torch_threads or num_cpus or os.cpu_count() or 1


def is_loopback(host: str) -> bool:
    return host == "localhost" or host == "::1" or host.startswith("127.")


def failure_line(message: str) -> str:
    """The line of a Serve status message that names the error (`ValueError: ...`), else its last line."""
    lines = [x.strip() for x in message.strip().splitlines() if x.strip()]
    errors = [x for x in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b:?", x)]
    return (errors or lines or ["(no message)"])[-1]


def app_config(args, replicas: int = 1) -> dict:
    """The application as `serve deploy` takes it: built by `app_builder` from `args` (an AppArgs), the scorer's
    artifact declared in its user_config (what a swap changes)."""
    return {
        "name": APP,
        "route_prefix": "/",
        "import_path": "elmo_serve.app:app_builder",
        "args": args.model_dump(),
        "deployments": [
            {"name": SCORER, "num_replicas": replicas, "user_config": {"artifact": args.artifact}, **_QUICK_STOP},
            {"name": "Ingress", **_QUICK_STOP},
        ],
    }


class _StopOnSignals:
    """SIGINT and SIGTERM set `stop` (main thread only). Installed after ray.init(), which puts in its own SIGTERM
    handler (it aborts the process); the previous handlers come back at the end."""

    def __init__(self, stop: threading.Event):
        self.stop, self.previous = stop, {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous = signal.signal(sig, lambda *_: self.stop.set())
                self.previous.setdefault(sig, previous)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _wait_until_running(serve, stop: threading.Event) -> str | None:
    """Wait for the app; None once it runs (or `stop` is set), else the one line that says why it cannot start (a
    replica's constructor raised: Serve says so at its first failure, and would retry for a minute)."""
    while not stop.wait(0.2):
        app = serve.status().applications.get(APP)
        if app is None:
            continue
        if app.status == "RUNNING":
            return None
        if app.status == "DEPLOY_FAILED":
            return f"the application failed to deploy: {failure_line(app.message)}"
        for name, dep in app.deployments.items():
            if "failed to start" in (dep.message or ""):
                return f"a {name} replica failed to start: {failure_line(dep.message)}"
    return None


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
    address: str | None = None,
    replicas: int = 1,
    run_root: str | None = None,
    catalogue: str | None = None,
) -> int:
    """Serve `artifact` on host:port until SIGINT/SIGTERM (or `stop` is set), then stop everything it started.

    Without `address` it starts its own Ray node (never an existing `ray start` cluster), bound to 127.0.0.1; with
    one it joins that cluster and, when it stops, deletes only its application. While it serves, `elmo swap` reaches
    it through its control directory (elmo_serve.control). `catalogue`: the live label log (AppArgs.catalogue).
    Returns 0 once stopped, 1 if the app cannot start, 2 for bad arguments."""
    path = Path(artifact).resolve()
    if not path.exists():
        print(f"elmo serve: no artifact at {path}", file=sys.stderr)
        return 2
    if address is not None and num_cpus is not None:
        print("elmo serve: --num-cpus sizes the local node; a cluster given by --address has its own", file=sys.stderr)
        return 2
    try:
        control = ensure_private_dir(run_dir(port, run_root))
    except (ControlError, OSError) as e:
        print(f"elmo serve: {e}", file=sys.stderr)
        return 2
    if (other := read_service(control)) is not None:
        print(f"elmo serve: port {port} is served by pid {other['pid']} ({control})", file=sys.stderr)
        return 2
    local = address is None
    if local:
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
    use_throughput_mode(haproxy=not (local and is_loopback(host)))
    haproxy = os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client  # the controller client `serve deploy` reaches over REST
    from ray.serve.schema import ServeDeploySchema

    from elmo_serve.app import AppArgs
    from elmo_serve.model import load_model
    from elmo_serve.retrain import RollError, config_with_app, swap_artifact

    stop = stop or threading.Event()
    signals = _StopOnSignals(stop)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    service_file, rc, t0 = control / "service.json", 0, time.perf_counter()
    try:
        if local:
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                configure_logging=False,
                _node_ip_address="127.0.0.1",
            )
        else:
            ray.init(address=address, include_dashboard=False, configure_logging=False)
        signals.install()
        node = ray.util.get_node_ip_address()
        if local:
            print(f"Ray: started a local node on {node} (give --address to use a running cluster)", flush=True)
        else:
            print(f"Ray: joined the cluster at {address} (this node: {node})", flush=True)
        serve.start(http_options={"host": host, "port": port})
        signals.install()
        client = _get_global_client()
        batching = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s}
        threads = local_torch_threads(torch_threads, num_cpus)
        args = AppArgs(artifact=str(path), backend=backend, torch_threads=threads, catalogue=catalogue, **batching)

        def deploy(body: dict) -> None:
            client.deploy_apps(ServeDeploySchema.parse_obj(body))

        deploy(config_with_app(client.get_serve_details(), app_config(args, replicas)))
        failure = _wait_until_running(serve, stop)
        if failure is not None:
            print(f"elmo serve: {failure}", file=sys.stderr, flush=True)
            rc = 1
            return rc
        if stop.is_set():
            return rc
        with ElmoClient(url) as c:
            info = c.model()
        write_json(service_file, {"pid": os.getpid(), "url": url, "port": port, "artifact": str(path)})
        print(
            f"serving {info['model_version']} ({info['num_labels']} labels, {info['backend']}, {replicas} "
            f"replica{'s' if replicas > 1 else ''}) at {url} in {time.perf_counter() - t0:.1f} s; docs at /docs; "
            f"`elmo swap ARTIFACT --port {port}` swaps the model; Ctrl-C or SIGTERM stops",
            flush=True,
        )
        while not stop.wait(0.25):
            for request_id, request in take_requests(control):
                if "artifact" not in request:
                    result = {"ok": False, "error": f"bad swap request: {request.get('invalid', request)}"}
                else:
                    try:
                        result = swap_artifact(
                            request["artifact"],
                            get_details=client.get_serve_details,
                            deploy=deploy,
                            serve_url=url,
                            check=lambda p: load_model(p, "torch"),  # in this process: refuse before declaring
                            app=APP,
                            deployment=SCORER,
                        )
                    except Exception as e:  # a failed swap is reported, and never stops the service
                        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                write_result(control, request_id, result)
                if result.get("ok"):
                    print(f"swapped to {result['model_version']} ({result['artifact']}) in {result['seconds']} s")
                else:
                    print(f"swap refused: {result['error']}; serving {result.get('model_version')}", flush=True)
    except KeyboardInterrupt:  # SIGINT before the handler was in place
        pass
    except (ConnectionError, ValueError, RollError) as e:  # no cluster at --address, or Serve refused the config
        print(f"elmo serve: {type(e).__name__}: {str(e).strip().splitlines()[0]}", file=sys.stderr, flush=True)
        rc = 1
    finally:
        print("stopping", flush=True)
        service_file.unlink(missing_ok=True)
        if ray.is_initialized():
            if local and not haproxy:
                # Bounded: ray.shutdown() below ends every process of the node anyway (with HAProxy, its binary is a
                # child of a Serve actor, so Serve itself must stop it).
                controller = _get_global_client(raise_if_no_controller_running=False)
                if controller is not None:
                    controller.shutdown(timeout_s=3)
            elif local:
                serve.shutdown()
            else:
                serve.delete(APP)
            ray.shutdown()
        signals.restore()
        print("service stopped", flush=True)
    return rc


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
        address=args.address,
        replicas=args.replicas,
        catalogue=args.catalogue,
    )


def swap_command(artifact: str, port: int, timeout_s: float = 600.0) -> int:
    """Ask the local `elmo serve` on `port` to serve `artifact` (hot swap); 0 once it serves it, 1 if it refused it
    (the old model keeps serving, and stays the declared one) or no service answers, 2 if there is no artifact."""
    path = Path(artifact).resolve()
    if not path.is_dir():
        print(f"elmo swap: no artifact directory at {path}", file=sys.stderr)
        return 2
    try:
        result = request_swap(port, str(path), timeout_s=timeout_s, log=lambda m: print(m, flush=True))
    except (ControlError, OSError, ValueError) as e:
        print(f"elmo swap: {e}", file=sys.stderr)
        return 1
    if result.get("ok"):
        print(f"serving {result['model_version']} ({result['artifact']}); swapped in {result['seconds']} s")
        return 0
    print(f"elmo swap: {result.get('error')}; still serving {result.get('model_version')}", file=sys.stderr)
    return 1


def _swap(args: argparse.Namespace) -> int:
    return swap_command(args.artifact, args.port, args.timeout_s)


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
    """Register `serve`, `swap` and `query` on the `elmo` parser's subparsers (each sets `func`, returning an exit
    code)."""
    default_port = int(os.environ.get("ELMO_PORT", 8000))
    p = subparsers.add_parser(
        "serve",
        help="serve an artifact over HTTP with Ray Serve on this machine",
        description="Serve ARTIFACT over HTTP (POST /v1/predict, /v1/similar; docs at /docs). Live labels: POST / PUT "
        "/v1/labels and DELETE /v1/labels/{uid} change the label set without a retrain; they need the admin token, "
        "read from $ELMO_ADMIN_TOKEN in the environment elmo serve starts in (ELMO_ADMIN_TOKEN=... elmo serve ...), "
        "sent as 'Authorization: Bearer TOKEN'; without it the change endpoints are off (403). Changes go to the "
        "catalogue log (--catalogue), which a restart replays.",
    )
    p.add_argument("artifact", help="artifact directory (from `elmo export`)")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP port binds to (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=default_port, help="HTTP port (default: $ELMO_PORT, else 8000)")
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
    p.add_argument("--replicas", type=int, default=1, help="scorer replicas")
    p.add_argument(
        "--catalogue",
        default=None,
        help="the live label catalogue log (default: catalogue.log in the directory holding ARTIFACT; off: no live "
        "labels)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="a running Ray cluster to join, e.g. auto or HOST:6379 (default: start a new node on 127.0.0.1)",
    )
    p.set_defaults(func=_serve)

    w = subparsers.add_parser(
        "swap",
        help="hot-swap the artifact of the `elmo serve` running on this machine",
        description="Ask the local `elmo serve` on --port to load ARTIFACT beside its model and switch to it. A bad "
        "artifact is refused: the old model keeps serving and stays the one every new replica loads.",
    )
    w.add_argument("artifact", help="artifact directory (from `elmo export`)")
    w.add_argument(
        "--port",
        type=int,
        default=default_port,
        help="the port `elmo serve` was given (default: $ELMO_PORT, else 8000)",
    )
    w.add_argument("--timeout-s", type=float, default=600.0, help="give up waiting for the service after this long")
    w.set_defaults(func=_swap)

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
