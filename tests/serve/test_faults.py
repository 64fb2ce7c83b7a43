"""Faults the service must answer well: a scorer replica killed under load (the request is retried on another
replica, else answered 503 with Retry-After, never 500), /metrics counting every response (4xx before the scorer and
5xx included), and an artifact trained on sparse BoW features served through `features` (HTTP answers equal the
evaluation's ranking; texts to it, or features to a text model, are a clear 422)."""

import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import toy_model

SLOW = "slow request"  # a text the slow toy model sleeps on: a request that is in flight when its replica is killed
SLOW_S = 2.0


def slow_toy(pid_dir: str):
    """A builder of the toy model (run in the replica) whose queries sleep SLOW_S on a SLOW text, after writing the
    replica's pid to pid_dir: the test kills the replica that holds the slow request."""

    def build():
        model = toy_model()
        plain = model.queries

        def queries(texts):
            if any(t.startswith(SLOW) for t in texts):
                # written then renamed: the test lists pid_dir and must never read a half-written file
                name = f"{os.getpid()}-{time.monotonic_ns()}"
                tmp = Path(pid_dir, f".{name}.tmp")
                tmp.write_text(str(os.getpid()))
                tmp.rename(Path(pid_dir, name))
                time.sleep(SLOW_S)
            return plain(texts)

        model.queries = queries
        return model

    return build


def _slow_app(replicas: int, pid_dir: Path, retry_wait_s: float):
    from elmo_serve.app import Ingress, ModelScorer

    opts = {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 0.25}, "health_check_period_s": 1}
    scorer = ModelScorer.options(**opts).bind(slow_toy(str(pid_dir)), "torch", None, None, 1)
    return Ingress.options(ray_actor_options={"num_cpus": 0.25}).bind(scorer, 4 * 2**20, retry_wait_s)


@pytest.fixture(scope="module")
def service(serve_url, tmp_path_factory):
    """Three apps deployed together (replicas start in parallel): `two` and `one`, the slow toy model with 2 scorer
    replicas and with 1 (its retry waits 0.5 s, far less than a replacement replica takes to start), and `bow`, a
    tiny model the trainer trained on BoW data (`--format bow`), exported and served from its artifact."""
    from ray import cloudpickle, serve

    from elmo_serve.app import AppArgs, app_builder

    cloudpickle.register_pickle_by_value(sys.modules["conftest"])
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replicas build the model from this module
    dirs = {name: tmp_path_factory.mktemp(f"pids-{name}") for name in ("two", "one")}
    bow_root = train_bow(tmp_path_factory.mktemp("bow"))
    bow_args = AppArgs(artifact=str(bow_root / "artifact"), backend="torch", torch_threads=1)
    apps = {"two": _slow_app(2, dirs["two"], 3.0), "one": _slow_app(1, dirs["one"], 0.5), "bow": app_builder(bow_args)}
    try:
        serve.run_many([serve.RunTarget(app, name=name, route_prefix=f"/{name}") for name, app in apps.items()])
        yield {**{name: (f"{serve_url}/{name}", dirs[name]) for name in dirs}, "bow": (f"{serve_url}/bow", bow_root)}
    finally:
        # All three deleted at once, then waited for: a direct-ingress replica holds its shutdown 30 s (the drain
        # period for an external load balancer), and the next module must not share the cluster with them.
        for name in apps:
            serve.delete(name, _blocking=False)
        deadline = time.monotonic() + 90
        while set(apps) & set(serve.status().applications) and time.monotonic() < deadline:
            time.sleep(0.5)


@pytest.fixture(scope="module")
def apps(service):
    return service


@pytest.fixture(scope="module")
def bow(service):
    return service["bow"]


def _predict_count(url: str) -> dict[str, int]:
    """elmo_requests_total of /v1/predict by status, as the ingress's /metrics reports it."""
    text = httpx.get(url + "/metrics", timeout=30).text
    found = re.findall(r'^elmo_requests_total\{endpoint="predict",status="(\d+)"\} ([0-9.e+]+)$', text, re.M)
    return {status: int(float(v)) for status, v in found}


# Bodies refused before the scorer (invalid JSON, schema) and by it (an empty text): all must be counted.
BAD = [(b'{"texts": [', 400), (b'{"texts": "gcc"}', 422), (b'{"texts": [""]}', 422)]


def _load(url: str, stop: threading.Event, log: list) -> None:
    """A closed-loop client: good requests, and every fourth a bad body; logs (status, Retry-After, body)."""
    n = 0
    with httpx.Client(base_url=url, timeout=60, headers={"content-type": "application/json"}) as c:
        while not stop.is_set():
            n += 1
            body = BAD[n // 4 % len(BAD)][0] if n % 4 == 0 else json.dumps({"texts": [f"gcc compiler {n}"], "k": 3})
            r = c.post("/v1/predict", content=body)
            log.append((r.status_code, r.headers.get("retry-after"), r.text[:200]))


def _send_slow(url: str, out: list) -> threading.Thread:
    def go():
        r = httpx.post(url + "/v1/predict", json={"texts": [SLOW], "k": 3}, timeout=60)
        out.append((r.status_code, r.headers.get("retry-after"), r.json()))

    t = threading.Thread(target=go)
    t.start()
    return t


def _wait_pid(pid_dir: Path, known: set[str]) -> tuple[str, int]:
    """The first pid file in pid_dir not in `known`: the replica now holding a slow request."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = sorted({n for n in os.listdir(pid_dir) if not n.startswith(".")} - known)
        if new:
            return new[0], int((pid_dir / new[0]).read_text())
        time.sleep(0.02)
    raise AssertionError("no replica started the slow request within 30 s")


def test_a_killed_replica_is_retried_on_the_other_and_never_a_500(apps):
    url, pid_dir = apps["two"]
    before = sum(_predict_count(url).values())
    log, slow, stop = [], [], threading.Event()
    clients = [threading.Thread(target=_load, args=(url, stop, log)) for _ in range(2)]
    for t in clients:
        t.start()
    try:
        slow_thread = _send_slow(url, slow)
        first, victim = _wait_pid(pid_dir, set())
        os.kill(victim, signal.SIGKILL)
        slow_thread.join(60)
        # The retry ran the slow request on the other replica.
        _, retried_on = _wait_pid(pid_dir, {first})
        time.sleep(0.5)
    finally:
        stop.set()
        for t in clients:
            t.join(60)
    assert retried_on != victim
    assert slow and slow[0][0] == 200, slow
    codes = [s for s, _, _ in log]
    assert len(codes) > 20 and 500 not in codes, [x for x in log if x[0] >= 500][:3]
    assert set(codes) <= {200, 400, 422, 503}, sorted(set(codes))
    assert all(ra for s, ra, _ in log if s == 503), "a 503 without Retry-After"
    assert codes.count(400) > 0 and codes.count(422) > 0
    counted = sum(_predict_count(url).values()) - before
    assert counted == len(log) + 1, (counted, len(log))  # every response, the bad bodies and the slow one included


def test_the_only_replica_killed_is_a_503_with_retry_after_then_its_replacement_answers(apps):
    url, pid_dir = apps["one"]
    before = _predict_count(url)
    slow = []
    t = _send_slow(url, slow)
    _, victim = _wait_pid(pid_dir, set())
    os.kill(victim, signal.SIGKILL)
    t.join(60)
    status, retry_after, body = slow[0]
    assert status == 503, slow
    assert retry_after is not None and int(retry_after) > 0
    assert "unavailable" in body["error"] and "replica died" in body["error"]
    deadline, r = time.monotonic() + 60, None
    while time.monotonic() < deadline:  # the replacement replica Serve starts answers
        r = httpx.post(url + "/v1/predict", json={"texts": ["gcc"], "k": 3}, timeout=60)
        if r.status_code == 200:
            break
        time.sleep(0.2)
    assert r is not None and r.status_code == 200, r.text
    after = _predict_count(url)
    assert after.get("503", 0) - before.get("503", 0) == 1  # the 503 is counted like any other answer


# --- a model trained on sparse BoW features ------------------------------------------------------------------------

F, L = 300, 20


def _bow_split(rng: np.random.Generator, n: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """n rows of 1-3 labels; label l's features are l*10..l*10+9 (4 of them per row), plus 3 noise features."""
    x, y = sp.lil_matrix((n, F), dtype=np.float32), sp.lil_matrix((n, L), dtype=np.float32)
    for i in range(n):
        for label in rng.choice(L, size=rng.integers(1, 4), replace=False):
            y[i, label] = 1
            for f in rng.choice(np.arange(label * 10, label * 10 + 10), 4, replace=False):
                x[i, f] = rng.uniform(0.5, 2.0)
        for f in rng.integers(200, F, 3):
            x[i, f] = rng.uniform(0.1, 1.0)
    return x.tocsr(), y.tocsr()


def train_bow(root: Path) -> Path:
    """BoW train/test splits in root, and the artifact (root/artifact) of a tiny model the trainer trains on them."""
    from training.config import TrainConfig
    from training.data import write_bow
    from training.train import train

    rng = np.random.default_rng(0)
    write_bow(root / "train.txt", *_bow_split(rng, 400))
    write_bow(root / "test.txt", *_bow_split(rng, 30))
    cfg = TrainConfig(
        data=str(root), format="bow", dim=32, epochs=3, batch_size=64, precision="fp8", kahan_labels=0,
        device="cpu", out=str(root / "run"), export=str(root / "artifact"), progress=False, checkpoint_every=-1,
    ).validate()  # fmt: skip
    train(cfg)
    return root


def test_bow_http_answers_equal_the_evaluation_ranking(bow):
    from training.artifact import load_artifact
    from training.data import read_bow
    from training.evaluation import ranked_batches

    url, root = bow
    info = httpx.get(url + "/v1/model", timeout=30).json()
    assert info["inputs"] == "features" and info["num_features"] == F and info["num_labels"] == L
    ds = read_bow(root / "test.txt")
    art = load_artifact(root / "artifact")
    ((rows, want),) = ranked_batches(art.model, ds, ds.features, 5)  # what `elmo eval` ranks
    items = [[[int(i), float(v)] for i, v in zip(x.indices, x.data, strict=True)] for x in ds.features]
    r = httpx.post(url + "/v1/predict", json={"features": items, "k": 5}, timeout=30)
    assert r.status_code == 200, r.text
    got = [[x["label_id"] for x in res] for res in r.json()["results"]]
    assert got == want.tolist()
    m = art.model
    scores, _ = m.head.topk(m.embed(*m.encoder_inputs(features=ds.features)), 5)
    for res, want_scores in zip(r.json()["results"], scores.tolist(), strict=True):
        assert [x["score"] for x in res] == pytest.approx(want_scores, rel=1e-5, abs=1e-6)
    # One item alone (the lone-request path) and the same features in another order answer the same.
    one = [list(reversed(items[3]))]
    r = httpx.post(url + "/v1/predict", json={"features": one, "k": 5}, timeout=30)
    assert [x["label_id"] for x in r.json()["results"][0]] == want[3].tolist()
    r = httpx.post(url + "/v1/similar", json={"id": 2, "k": 3, "mode": "embedding"}, timeout=30)
    assert r.status_code == 200 and 2 not in [x["label_id"] for x in r.json()["results"]]


BOW_BAD = [
    # (body, a word of the message)
    ({"texts": ["gcc"]}, "takes features, not text"),
    ({"features": [[[0, 1.0]]], "texts": ["gcc"]}, "exactly one"),
    ({"features": []}, "features"),
    ({"features": [[]]}, "features[0] is empty"),
    ({"features": [[[0, 1.0]], [[F, 1.0]]]}, "features[1][0] index 300 is out of range"),
    ({"features": [[[-1, 1.0]]]}, "out of range"),
    ({"features": [[[i, 1.0] for i in range(10_001)]]}, "max_features"),
    ({"features": [[[0, 1.0]]] * 257}, "max_texts"),
    ({"features": [[[0, 1.0, 2.0]]]}, "[index, value] pair"),
    ({"features": [[[0]]]}, "[index, value] pair"),
    ({"features": [[["0", 1.0]]]}, "integer"),
    ({"features": [[[0.5, 1.0]]]}, "integer"),
    ({"features": [[[0, "1"]]]}, "number"),
    ({"features": [[[0, True]]]}, "number"),
    ({"features": [[0, 1.0]]}, "[index, value] pair"),
    (b'{"features": [[[0, NaN]]]}', "finite"),
    (b'{"features": [[[0, 1e400]]]}', "finite"),
]


def test_bow_bad_features_get_a_clear_422(bow):
    url, _ = bow
    failures = []
    with httpx.Client(base_url=url, timeout=30, headers={"content-type": "application/json"}) as c:
        for body, word in BOW_BAD:
            r = c.post("/v1/predict", content=body if isinstance(body, bytes) else json.dumps(body))
            if r.status_code != 422 or word.lower() not in (r.json()["error"] + json.dumps(r.json())).lower():
                failures.append(f"{str(body)[:60]}: {r.status_code} {r.text[:200]}")
        r = c.post("/v1/similar", json={"id": 2, "k": 3})  # mode text: the model cannot read the item's title
        if r.status_code != 422 or "takes features, not text" not in r.json()["error"]:
            failures.append(f"similar text mode: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    assert httpx.post(url + "/v1/predict", json={"features": [[[0, 1.0]]], "k": 2}, timeout=30).status_code == 200


def test_features_to_a_text_model_are_a_422_and_documented(apps, bow):
    url, _ = apps["two"]
    r = httpx.post(url + "/v1/predict", json={"features": [[[0, 1.0]]]}, timeout=30)
    assert r.status_code == 422 and "takes texts, not features" in r.json()["error"]
    assert httpx.get(url + "/v1/model", timeout=30).json()["inputs"] == "texts"
    spec = httpx.get(bow[0] + "/openapi.json", timeout=30).json()
    props = spec["components"]["schemas"]["PredictRequest"]["properties"]
    assert {"texts", "features", "k", "exclude"} <= set(props) and "index, value" in props["features"]["description"]
    assert "503" in spec["paths"]["/v1/predict"]["post"]["responses"]
