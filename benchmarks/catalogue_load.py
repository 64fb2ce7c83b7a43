"""Live label catalogue under load: how soon an added label is answered by every replica, what adds cost the
predictions running beside them, and bulk adds.

    python benchmarks/catalogue_load.py --artifact /tmp/h2/deps/artifact            # 1 and 2 scorer replicas

Starts a local Ray node (127.0.0.1) and the app (`elmo_serve.app:app_builder`, torch backend, catalogue log in a
temporary directory, the admin token through the replicas' environment), then for each replica count:
- add-to-answerable: one label a POST (a title made of two labels' descriptions, a uid nobody has); from the moment
  the POST returns, /v1/predict of the title (k = --answer-k) is asked until every replica (x-replica header) has
  answered with the new label among its labels: p50 / p99 of that delay over --adds labels (a label not answered
  within --deadline-s by some replica counts as missed; with k = 1 a zero-shot row that does not rank first for its
  own title, against trained labels whose descriptions make up that title, counts as missed too);
- prediction p50 (one client, one text, k = 10) without adds, and while another client adds labels in batches of 10;
- with 1 replica: --bulk labels added in batches of 100: total seconds, and the head's rows and bytes before and after.
Prints a table and appends the rows to benchmarks/results/catalogue_load.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV, TOKEN = "ELMO_BENCH_ADMIN_TOKEN", "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


class Titles:
    """New label titles: '<name> : <description of label a> <description of label b>', never twice the same."""

    def __init__(self, artifact: Path, seed: int = 0):
        import random

        lines = [json.loads(x) for x in (artifact / "labels.jsonl").read_text().splitlines()]
        self.desc = [x["title"].split(" : ", 1)[-1] for x in lines if x["title"]]
        self.rng, self.n = random.Random(seed), 0

    def next(self, prefix: str) -> tuple[str, str]:
        self.n += 1
        a, b = self.rng.sample(self.desc, 2)
        return f"{prefix}-{self.n}", f"{prefix}{self.n} : {a} {b}"


def deploy(args, port: int, replicas: int, log: Path) -> None:
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = {
        "name": "bench",
        "route_prefix": "/",
        "import_path": "elmo_serve.app:app_builder",
        "runtime_env": {"env_vars": {ENV: TOKEN}},
        "args": {
            "artifact": str(args.artifact),
            "backend": "torch",
            "catalogue": str(log),
            "admin_token_env": ENV,
            "torch_threads": args.torch_threads,
        },
        "deployments": [
            {"name": "ModelScorer", "num_replicas": replicas, "user_config": {"artifact": str(args.artifact)}}
        ],
    }
    body = {"http_options": {"host": "127.0.0.1", "port": port}, "applications": [config]}
    _get_global_client().deploy_apps(ServeDeploySchema.parse_obj(body), _blocking=True)


def replicas_of(c: httpx.Client, replicas: int) -> set[str]:
    seen, end = set(), time.monotonic() + 60
    while len(seen) < replicas and time.monotonic() < end:
        seen.add(c.get("/v1/model").json()["replica"])
    return seen


def add_to_answerable(c: httpx.Client, titles: Titles, n: int, replicas: int, deadline_s: float, k: int):
    delays, missed, post_s = [], 0, []
    for _ in range(n):
        uid, title = titles.next("zz")
        t = time.perf_counter()
        r = c.post("/v1/labels", json={"labels": [{"uid": uid, "title": title}]}, headers=AUTH)
        r.raise_for_status()
        t0 = time.perf_counter()
        post_s.append(t0 - t)
        label = r.json()["labels"][0]["label_id"]
        seen: dict[str, float] = {}
        while len(seen) < replicas and time.perf_counter() - t0 < deadline_s:
            p = c.post("/v1/predict", json={"texts": [title], "k": k})
            p.raise_for_status()
            if any(hit["label_id"] == label for hit in p.json()["results"][0]):
                seen.setdefault(p.headers["x-replica"], time.perf_counter() - t0)
        if len(seen) < replicas:
            missed += 1
        else:
            delays.append(max(seen.values()))
    return delays, missed, post_s


def predict_p50(c: httpx.Client, seconds: float, adding: Titles | None) -> tuple[float, int, int]:
    """p50 of one-text predictions for `seconds`; with `adding`, another client adds labels (batches of 10)."""
    stop, added, errors = threading.Event(), [0], [0]

    def adder():
        with httpx.Client(base_url=str(c.base_url), timeout=60) as a:
            while not stop.is_set():
                batch = [dict(zip(("uid", "title"), adding.next("ld"), strict=True)) for _ in range(10)]
                r = a.post("/v1/labels", json={"labels": batch}, headers=AUTH)
                errors[0] += r.status_code != 200
                added[0] += 10 * (r.status_code == 200)

    th = threading.Thread(target=adder) if adding else None
    if th:
        th.start()
    lat, end = [], time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            t = time.perf_counter()
            r = c.post("/v1/predict", json={"texts": ["lightweight web server with fastcgi support"], "k": 10})
            lat.append(time.perf_counter() - t)
            errors[0] += r.status_code != 200
    finally:
        stop.set()
        if th:
            th.join()
    return statistics.median(lat) * 1e3, added[0], errors[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--adds", type=int, default=40, help="labels timed for add-to-answerable, per replica count")
    ap.add_argument("--bulk", type=int, default=10_000, help="labels added in batches of 100 (1 replica)")
    ap.add_argument("--predict-s", type=float, default=10.0)
    ap.add_argument("--deadline-s", type=float, default=5.0)
    ap.add_argument("--answer-k", type=int, default=20, help="an added label is answerable once in this top-k")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "catalogue_load.json")
    args = ap.parse_args()
    args.artifact = args.artifact.resolve()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    port = free_port()
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = []
    try:
        for replicas in args.replicas:
            state = Path(tempfile.mkdtemp(prefix="catalogue-bench-"))
            t = time.perf_counter()
            deploy(args, port, replicas, state / "catalogue.log")
            start_s = time.perf_counter() - t
            titles = Titles(args.artifact, seed=replicas)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
                assert len(replicas_of(c, replicas)) == replicas
                info0 = c.get("/v1/model").json()
                delays, missed, post_s = add_to_answerable(
                    c, titles, args.adds, replicas, args.deadline_s, args.answer_k
                )
                base_p50, _, base_err = predict_p50(c, args.predict_s, None)
                load_p50, added, load_err = predict_p50(c, args.predict_s, titles)
                row = {
                    "replicas": replicas,
                    "labels": info0["num_labels"],
                    "start_s": round(start_s, 1),
                    "post_p50_ms": round(quantile(post_s, 0.5) * 1e3, 1),
                    "answerable_p50_ms": round(quantile(delays, 0.5) * 1e3, 1),
                    "answerable_p99_ms": round(quantile(delays, 0.99) * 1e3, 1),
                    "answerable_max_ms": round(max(delays, default=float("nan")) * 1e3, 1),
                    "answer_k": args.answer_k,
                    "adds_timed": len(delays),
                    "missed": missed,
                    "predict_p50_ms": round(base_p50, 2),
                    "predict_p50_while_adding_ms": round(load_p50, 2),
                    "added_while_predicting": added,
                    "errors": base_err + load_err,
                }
                if replicas == 1 and args.bulk:
                    before = c.get("/v1/model").json()
                    t = time.perf_counter()
                    for _ in range(args.bulk // 100):
                        batch = [dict(zip(("uid", "title"), titles.next("bulk"), strict=True)) for _ in range(100)]
                        c.post("/v1/labels", json={"labels": batch}, headers=AUTH).raise_for_status()
                    after = c.get("/v1/model").json()
                    row |= {
                        "bulk_labels": args.bulk,
                        "bulk_s": round(time.perf_counter() - t, 1),
                        "head_rows_before": before["head_rows"],
                        "head_mb_before": round(before["head_bytes"] / 2**20, 1),
                        "head_rows_after": after["head_rows"],
                        "head_mb_after": round(after["head_bytes"] / 2**20, 1),
                        "labels_after": after["num_labels"],
                    }
            rows.append(row)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "artifact": str(args.artifact),
        "torch_threads": args.torch_threads,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(args.out.read_text()) if args.out.exists() else []
    args.out.write_text(json.dumps(old + [meta | r for r in rows], indent=1) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---:|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
