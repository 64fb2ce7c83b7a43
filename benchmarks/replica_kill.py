"""Replica crash under load: SIGKILL one scorer replica while closed-loop clients send /v1/predict, and report what
the clients saw (the Reliability figures).

    python benchmarks/replica_kill.py --replicas 1 --clients 2 --seconds 20 --kill-at 4   # `elmo serve`'s layout
    python benchmarks/replica_kill.py --replicas 2 --clients 2 --seconds 20 --kill-at 4
    python benchmarks/replica_kill.py --artifact artifacts/deps                           # a real artifact

Starts a local Ray as `elmo serve` does (its own node on 127.0.0.1, Serve's throughput mode with the proxy actor;
--haproxy: HAProxy in front, a cluster's layout), serves the artifact (a tiny synthetic one when none is given) with
N scorer replicas, and `kill -9`s the process of one of them at --kill-at seconds. Reports: answers by status, the
stall (the longest time without a 200 answer, over the kill), the slowest request, 503s with and without Retry-After,
and whether /metrics counted every request sent.
A row is appended to benchmarks/results/replica_kill.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "replica_kill.json"


def tiny_artifact(path: Path) -> Path:
    """A small untrained text artifact (hashed n-gram bag, fp8 head over 64 synthetic labels)."""
    import torch

    from training.artifact import save_artifact
    from training.data import make_synthetic
    from training.encoders import HashedBagEncoder, HashedNgramFeaturizer
    from training.model import HeadConfig, XMCHead, XMCModel

    torch.manual_seed(0)
    train, _ = make_synthetic(num_labels=64, num_train=400, num_test=10, seed=0)
    feat = HashedNgramFeaturizer(num_buckets=2**14, min_df=1).fit(train.texts + train.label_titles)
    model = XMCModel(HashedBagEncoder(num_features=feat.num_features, dim=32).eval(), XMCHead(HeadConfig(64, 32)), feat)
    with torch.no_grad():
        model.head.init_weights(4.0 * model.embed(*model.encoder_inputs(train.label_titles)), None)
    return save_artifact(path, model, train)


def scorer_pids() -> list[int]:
    """Pids of the live ModelScorer replica actors (Serve names them SERVE_REPLICA::app#ModelScorer#id)."""
    import ray

    pids = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if "#ModelScorer#" in a["name"]:
            try:
                h = ray.get_actor(a["name"], namespace=a["namespace"])
                pids.append(ray.get(h.__ray_call__.remote(lambda self: os.getpid()), timeout=10))
            except Exception:  # a replica that is going away
                pass
    return pids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics_total(text: str) -> int:
    """The /v1/predict responses /metrics counted (its own scrapes, counted under endpoint "metrics", left out)."""
    found = re.findall(r"^elmo_requests_total\{([^}]*)\} ([0-9.e+]+)$", text, re.M)
    return int(sum(float(v) for labels, v in found if 'endpoint="predict"' in labels))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default=None, help="artifact to serve (default: a tiny synthetic one)")
    p.add_argument("--replicas", type=int, default=1, help="scorer replicas (elmo serve runs 1)")
    p.add_argument("--clients", type=int, default=2, help="closed-loop client threads")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the load")
    p.add_argument("--kill-at", type=float, default=4.0, help="seconds into the load to SIGKILL one scorer replica")
    p.add_argument("--bad-every", type=int, default=10, help="every n-th request of a client is a bad body (422)")
    p.add_argument("--num-cpus", type=int, default=4, help="CPUs given to the local Ray")
    p.add_argument(
        "--haproxy",
        action="store_true",
        help="HAProxy in front (a cluster's layout); default: the local `elmo serve` node (proxy actor, loopback)",
    )
    p.add_argument("--label", default="", help="a note stored with the row (e.g. before / after)")
    args = p.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private, loopback-only cluster
    from elmo_serve.commands import LOCAL_RAY_ENV, use_throughput_mode

    if not args.haproxy:  # the node a local `elmo serve` starts
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
    use_throughput_mode(haproxy=args.haproxy)
    # HAProxy's stats and metrics ports are fixed unless moved: another Serve may run on this machine.
    os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(free_port()))
    os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(free_port()))
    import httpx
    import ray
    from ray import serve

    from elmo_serve.app import Ingress, ModelScorer

    tmp = tempfile.TemporaryDirectory()
    artifact = str(Path(args.artifact).resolve()) if args.artifact else str(tiny_artifact(Path(tmp.name) / "art"))
    ray.init(
        address="local",
        num_cpus=args.num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _node_ip_address=None if args.haproxy else "127.0.0.1",
    )
    port = free_port()  # after ray.init: Ray's own processes take ports as they start
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        scorer = ModelScorer.options(num_replicas=args.replicas).bind(artifact, "torch", None, None, 1)
        serve.run(Ingress.bind(scorer), name="elmo", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        httpx.post(url + "/v1/predict", json={"texts": ["warm up"], "k": 3}, timeout=60)
        base = metrics_total(httpx.get(url + "/metrics", timeout=30).text)
        log: list[tuple[float, float, int, str | None, str]] = []  # (sent, done, status, Retry-After, error)
        t0 = time.perf_counter()
        stop = threading.Event()

        def client(i: int) -> None:
            n = 0
            with httpx.Client(base_url=url, timeout=60) as c:
                while not stop.is_set():
                    n += 1
                    bad = args.bad_every and n % args.bad_every == 0
                    body = {"texts": [""]} if bad else {"texts": [f"client {i} request {n} words"], "k": 5}
                    sent = time.perf_counter() - t0
                    try:
                        r = c.post("/v1/predict", json=body)
                        status, ra = r.status_code, r.headers.get("retry-after")
                        err = "" if status == 200 else r.text[:160]
                    except httpx.HTTPError as e:  # the connection itself failed
                        status, ra, err = 0, None, f"{type(e).__name__}: {e}"[:160]
                    log.append((sent, time.perf_counter() - t0, status, ra, err))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(args.kill_at)
        pids = scorer_pids()
        kill_t = time.perf_counter() - t0
        os.kill(pids[0], signal.SIGKILL)
        time.sleep(max(0.0, args.seconds - args.kill_at))
        stop.set()
        for t in threads:
            t.join()
        counted = metrics_total(httpx.get(url + "/metrics", timeout=30).text) - base
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    done_ok = sorted(d for _, d, s, _, _ in log if s == 200)
    # The stall: the longest stretch without a 200 answer, from the kill on.
    end = max(d for _, d, *_ in log)
    marks = [kill_t, *(d for d in done_ok if d >= kill_t), end]
    stall = max(b - a for a, b in zip(marks, marks[1:], strict=False))
    codes: dict[str, int] = {}
    for _, _, s, _, _ in log:
        codes[str(s)] = codes.get(str(s), 0) + 1
    bad_sent = sum(1 for *_, s, _, e in log if s == 422)
    five = [(round(t, 2), round(d, 2), s, ra, e) for t, d, s, ra, e in log if s >= 500 or s == 0]
    slow = [(round(t, 2), round(d, 2), s) for t, d, s, *_ in log if d - t > 1.0]
    row = {
        "label": args.label,
        "layout": "haproxy" if args.haproxy else "elmo serve (proxy actor, loopback)",
        "date": datetime.date.today().isoformat(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "replicas": args.replicas,
        "clients": args.clients,
        "seconds": args.seconds,
        "kill_at_s": round(kill_t, 2),
        "requests": len(log),
        "status_codes": codes,
        "non_200_excluding_sent_422": sum(1 for *_, s, _, _ in log if s != 200) - bad_sent,
        "stall_s": round(stall, 2),
        "slowest_request_s": round(max(d - s for s, d, *_ in log), 2),
        "503_without_retry_after": sum(1 for *_, s, ra, _ in log if s == 503 and not ra),
        "metrics_counted": counted,
        "metrics_equal_sent": counted == len(log),
        "first_failures": five[:5],  # (sent, answered, status, Retry-After, body)
        "slow_requests": slow[:10],  # (sent, answered, status) of requests over 1 s
    }
    print(json.dumps(row, indent=1))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    tmp_out = RESULTS.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps([*rows, row], indent=1) + "\n")
    os.replace(tmp_out, RESULTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
