"""The HTTP application on a local Ray Serve: answers equal offline prediction, bad input gets a 4xx, concurrent
requests are batched, and artifacts are hot-swapped without failed requests."""

import asyncio
import json

import httpx
import pytest
from conftest import make_artifact, toy_model  # at import time: tests/training has a conftest too

from elmo_kernels.topk import reference_topk
from elmo_serve.model import Query

LIMITS = {"max_texts": 64, "max_text_chars": 2000, "max_k": 50, "max_exclude": 100}


@pytest.fixture(scope="module")
def toy_url(serve_url):
    import sys

    from ray import cloudpickle, serve

    from elmo_serve.app import Ingress, ModelScorer

    cloudpickle.register_pickle_by_value(sys.modules["conftest"])  # the replica builds the model from this module
    batching = {"max_batch_size": 16, "batch_wait_timeout_s": 0.005}
    app = Ingress.bind(ModelScorer.bind(toy_model, "torch", LIMITS, batching, 2))  # 2 torch threads
    serve.run(app, name="toy", route_prefix="/toy")
    yield serve_url + "/toy"
    serve.delete("toy")


@pytest.fixture(scope="module")
def client(toy_url):
    with httpx.Client(base_url=toy_url, timeout=30) as c:
        yield c


def test_http_answers_equal_offline_prediction(client):
    model = toy_model()
    texts = ["python3 numpy arrays", "GNU C++ compiler", "a strategy game", "qt quick module"]
    r = client.post("/v1/predict", json={"texts": texts, "k": 7, "exclude": [0, 5]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "toy-v1" and r.headers["x-model-version"] == "toy-v1"
    offline = model.predict_batch([Query(texts, 7, [0, 5])])[0]
    ref_s, ref_i = reference_topk(model.queries(texts), model.scorer.weights, 7, model.num_labels, [[0, 5]] * 4)
    for got, (ids, scores), r_ids, r_s in zip(body["results"], offline, ref_i.tolist(), ref_s.tolist(), strict=True):
        assert [x["label_id"] for x in got] == ids == r_ids
        assert [x["score"] for x in got] == pytest.approx(scores, rel=1e-6)
        assert scores == pytest.approx(r_s, rel=1e-5, abs=1e-5)
        assert [x["uid"] for x in got] == [model.uids[i] for i in ids]
        assert [x["title"] for x in got] == [model.titles[i] for i in ids]


def test_similar_excludes_the_item(client):
    for body in ({"uid": "python3", "k": 5}, {"id": 0, "k": 5}, {"uid": "python3", "k": 5, "mode": "embedding"}):
        r = client.post("/v1/similar", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["item"]["uid"] == "python3" and out["item"]["label_id"] == 0
        assert len(out["results"]) == 5 and 0 not in [x["label_id"] for x in out["results"]]
    model = toy_model()
    ((ids, _),) = model.predict_batch([Query([model.titles[0]], 5, [0])])[0]
    assert [x["label_id"] for x in client.post("/v1/similar", json={"id": 0, "k": 5}).json()["results"]] == ids


def test_model_health_metrics_and_docs(client):
    info = client.get("/v1/model").json()
    assert info["model_version"] == "toy-v1" and info["num_labels"] == 200 and info["limits"]["max_k"] == 50
    assert info["torch_threads"] == 2  # as bound (Ray alone would set the replica's num_cpus, 1)
    assert client.get("/healthz").json() == {"status": "ok", "model_version": "toy-v1"}
    assert "elmo_requests_total" in client.get("/metrics").text
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/similar", "/v1/model", "/healthz"} <= set(spec["paths"])


J = "application/json"
BAD = [
    # (name, path, body: dict | bytes, expected status, a word of the message)
    ("empty list", "predict", {"texts": []}, 422, "texts"),
    ("empty string", "predict", {"texts": [""]}, 422, "empty"),
    ("blank string", "predict", {"texts": ["   \n"]}, 422, "empty"),
    ("one of several empty", "predict", {"texts": ["gcc", ""]}, 422, "texts[1]"),
    ("huge text", "predict", {"texts": ["x" * 5000]}, 422, "max_text_chars"),
    ("10k texts", "predict", {"texts": ["gcc"] * 10_000}, 422, "too many texts"),
    ("65 texts", "predict", {"texts": ["gcc"] * 65}, 422, "max_texts"),
    ("k = 0", "predict", {"texts": ["gcc"], "k": 0}, 422, "k"),
    ("negative k", "predict", {"texts": ["gcc"], "k": -3}, 422, "k"),
    ("k > max_k", "predict", {"texts": ["gcc"], "k": 51}, 422, "max_k"),
    ("k > labels", "predict", {"texts": ["gcc"], "k": 10**6}, 422, "max_k"),
    ("k as string", "predict", {"texts": ["gcc"], "k": "5"}, 422, "integer"),
    ("k as float", "predict", {"texts": ["gcc"], "k": 5.5}, 422, "integer"),
    ("k as bool", "predict", {"texts": ["gcc"], "k": True}, 422, "integer"),
    ("k null", "predict", {"texts": ["gcc"], "k": None}, 422, "k"),
    ("texts a string", "predict", {"texts": "gcc"}, 422, "list"),
    ("texts of ints", "predict", {"texts": [1, 2]}, 422, "string"),
    ("texts nested", "predict", {"texts": [["gcc"]]}, 422, "string"),
    ("missing texts", "predict", {"k": 5}, 422, "required"),
    ("extra field", "predict", {"texts": ["gcc"], "top": 5}, 422, "Extra"),
    ("exclude out of range", "predict", {"texts": ["gcc"], "exclude": [200]}, 422, "exclude"),
    ("exclude negative", "predict", {"texts": ["gcc"], "exclude": [-1]}, 422, "exclude"),
    ("exclude strings", "predict", {"texts": ["gcc"], "exclude": ["gcc"]}, 422, "integer"),
    ("exclude too many", "predict", {"texts": ["gcc"], "exclude": list(range(101))}, 422, "max_exclude"),
    (
        "exclude leaves < k",
        "predict",
        {"texts": ["gcc"], "k": 50, "exclude": list(range(100)) + [150]},
        422,
        "max_exclude",
    ),
    ("invalid JSON", "predict", b'{"texts": ["gcc"', 400, "JSON"),
    ("non-UTF-8 bytes", "predict", b'{"texts": ["\xff\xfe"]}', 400, "JSON"),
    ("binary garbage", "predict", bytes(range(256)), 400, "JSON"),
    ("empty body", "predict", b"", 422, "empty"),
    ("JSON list", "predict", b'["gcc"]', 422, "object"),
    ("JSON null", "predict", b"null", 422, "object"),
    ("body too large", "predict", b'{"texts": ["' + b"a" * (5 * 2**20) + b'"]}', 413, "max_body_bytes"),
    ("unknown uid", "similar", {"uid": "no-such-package"}, 404, "unknown item"),
    ("unknown id", "similar", {"id": 200}, 404, "unknown item"),
    ("negative id", "similar", {"id": -1}, 422, "id"),
    ("uid and id", "similar", {"uid": "gcc", "id": 5}, 422, "exactly one"),
    ("neither uid nor id", "similar", {"k": 3}, 422, "exactly one"),
    ("empty uid", "similar", {"uid": ""}, 422, "uid"),
    ("uid as int", "similar", {"uid": 5}, 422, "string"),
    ("similar k > labels - 1", "similar", {"id": 3, "k": 50, "mode": "text"}, 200, ""),
    ("similar k > max_k", "similar", {"id": 3, "k": 51}, 422, "max_k"),
    ("unknown mode", "similar", {"id": 3, "mode": "magic"}, 422, "mode"),
    ("similar invalid JSON", "similar", b"{uid: gcc}", 400, "JSON"),
]


def test_bad_input_gets_a_clear_4xx_and_the_replica_keeps_serving(client):
    assert sum(1 for case in BAD if case[3] >= 400) >= 30
    failures, fives = [], 0
    for name, path, body, status, word in BAD:
        if isinstance(body, bytes):
            r = client.post(f"/v1/{path}", content=body, headers={"content-type": J})
        else:
            r = client.post(f"/v1/{path}", json=body)
        fives += r.status_code >= 500
        if r.status_code != status:
            failures.append(f"{name}: {r.status_code} (want {status}) {r.text[:200]}")
        elif status >= 400 and word.lower() not in r.json().get("error", "").lower() + json.dumps(r.json()).lower():
            failures.append(f"{name}: message {r.text[:200]!r} lacks {word!r}")
    assert fives == 0 and not failures, "\n".join(failures)
    r = client.post("/v1/predict", json={"texts": ["gcc"], "k": 3})
    assert r.status_code == 200 and len(r.json()["results"][0]) == 3
    assert "elmo_requests_total" in client.get("/metrics").text
    # a request the scorer refuses names the model that refused it, as an answer names the one that answered
    version = r.json()["model_version"]
    for path, body, status in (("predict", {"texts": ["gcc"], "k": 51}, 422), ("similar", {"id": 200}, 404)):
        r = client.post(f"/v1/{path}", json=body)
        assert r.status_code == status and r.json()["model_version"] == version == r.headers["x-model-version"]
    assert client.post("/v1/predict", json={"texts": "gcc"}).json().get("model_version") is None  # refused unparsed


def test_guard_answers_413_before_reading_and_500_as_json():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from elmo_serve.guard import MAX_BODY_BYTES, Guard

    app = FastAPI()
    app.add_middleware(Guard)
    read = []

    @app.post("/echo")
    async def echo(body: dict):
        read.append(body)
        return body

    @app.get("/boom")
    async def boom():
        raise RuntimeError("bug")

    with TestClient(app) as c:
        assert c.post("/echo", json={"a": 1}).json() == {"a": 1}
        r = c.post("/echo", content=b"x" * (MAX_BODY_BYTES[0] + 1))
        assert r.status_code == 413 and "max_body_bytes" in r.json()["error"] and len(read) == 1
        r = c.get("/boom")
        assert r.status_code == 500 and r.json()["error"] == "internal error: RuntimeError"


def test_wrong_method_and_unknown_path_are_4xx(client):
    assert client.get("/v1/predict").status_code == 405
    assert client.post("/v1/nothing", json={}).status_code == 404


def test_concurrent_requests_are_batched(toy_url):
    async def go():
        async with httpx.AsyncClient(base_url=toy_url, timeout=30) as c:
            rs = await asyncio.gather(
                *(c.post("/v1/predict", json={"texts": [f"gcc compiler {i}"], "k": 3}) for i in range(48))
            )
        return rs

    rs = asyncio.run(go())
    assert all(r.status_code == 200 for r in rs)
    sizes = [int(r.headers["x-batch-size"]) for r in rs]
    assert max(sizes) > 1, sizes
    assert max(sizes) <= 16  # max_batch_size
    # A lone request skips the batch queue (batch of 1) and answers as it did inside a batch (the same labels; fp32
    # sums over a different batch may differ in the last bits).
    batched = next(r for r, n in zip(rs, sizes, strict=True) if n > 1)
    text = batched.request.read().decode()
    alone = httpx.post(toy_url + "/v1/predict", content=text, headers={"content-type": "application/json"})
    assert alone.headers["x-batch-size"] == "1"
    (got,), (want,) = alone.json()["results"], batched.json()["results"]
    assert [r["label_id"] for r in got] == [r["label_id"] for r in want]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], rel=1e-5)


def test_query_command_prints_a_table(toy_url, capsys):
    import argparse

    from elmo_serve.commands import add_serve_commands, query_command

    assert query_command("GNU C++ compiler", k=3, url=toy_url) == 0
    out = capsys.readouterr().out.splitlines()
    assert "toy-v1" in out[0] and out[1].split()[:3] == ["#", "score", "id"] and len(out) == 5
    assert query_command("python3", k=2, url=toy_url, similar=True) == 0
    assert query_command("no-such-item", k=2, url=toy_url, similar=True) == 1
    assert "404" in capsys.readouterr().err
    parser = argparse.ArgumentParser(prog="elmo")
    add_serve_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["query", "python numpy", "-k", "4", "--url", toy_url])
    assert args.func(args) == 0
    assert parser.parse_args(["serve", "some/dir", "--port", "9000"]).port == 9000


@pytest.mark.parametrize("name", ["serve.yaml", "serve-gpu.yaml"])
def test_deployment_files_fit_serve_and_app_schemas(name):
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from elmo_serve.app import AppArgs, ScorerConfig

    config = yaml.safe_load((Path(__file__).parents[2] / "deployments" / name).read_text())
    ServeDeploySchema.parse_obj(config)
    for app in config["applications"]:
        assert app["import_path"] == "elmo_serve.app:app_builder"
        AppArgs(**app["args"])
        deps = {d["name"]: d for d in app["deployments"]}
        assert set(deps) == {"ModelScorer", "Ingress"}
        ScorerConfig(**deps["ModelScorer"]["user_config"])
        assert deps["ModelScorer"]["max_ongoing_requests"] >= 32


@pytest.fixture(scope="module")
def swap_app(serve_url, artifacts):
    """The app on artifact v1, deployed from a config as `serve deploy` does, and a function that deploys the same
    config with another artifact in the scorer's user_config: Serve then calls `reconfigure` on the running replica
    (a lightweight update) instead of replacing it."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    port = int(serve_url.rsplit(":", 1)[1])

    def deploy(artifact, **user_config):
        app = {
            "name": "swap",
            "route_prefix": "/swap",
            "import_path": "elmo_serve.app:app_builder",
            "args": {"artifact": str(artifacts["v1"]), "backend": "torch"},
            "deployments": [
                {"name": "ModelScorer", "user_config": {"artifact": str(artifact), "max_batch_size": 8, **user_config}}
            ],
        }
        config = {"http_options": {"host": "127.0.0.1", "port": port}, "applications": [app]}
        _get_global_client().deploy_apps(ServeDeploySchema.parse_obj(config), _blocking=True)

    deploy(artifacts["v1"])
    yield serve_url + "/swap", deploy
    serve.delete("swap")


@pytest.fixture(scope="module")
def hybrid_artifact(tmp_path_factory):
    """An "hf" artifact carrying the hashed bag: a tiny random BERT concatenated with the bag (TrainConfig.hf_bag)."""
    return make_artifact(tmp_path_factory.mktemp("hybrid") / "art", seed=3, hf_bag="concat")


def _swap_to(url: str, deploy, path) -> None:
    """Deploy `path` through the scorer's user_config and wait until the replica serves it."""
    import time

    deploy(path)
    deadline = time.time() + 30
    while (served := httpx.get(url + "/v1/model", timeout=30).json()["artifact"]) != str(path.resolve()):
        assert time.time() < deadline, f"still serving {served}, not {path}"
        time.sleep(0.2)


@pytest.mark.parametrize("name", ["v1", "transformer with the bag"])
def test_artifact_http_answers_equal_offline_prediction(swap_app, artifacts, hybrid_artifact, name):
    from training.artifact import load_artifact

    url, deploy = swap_app
    path = artifacts["v1"] if name == "v1" else hybrid_artifact
    art = load_artifact(path)
    m = art.model
    texts = [art.labels[5]["title"], "some words that mean nothing", art.labels[0]["title"] + " extra"]
    if name != "v1":
        assert art.manifest["encoder"]["kind"] == "hf" and art.manifest["encoder"]["config"]["bag"]["mode"] == "concat"
    try:
        _swap_to(url, deploy, path)
        r = httpx.post(url + "/v1/predict", json={"texts": texts, "k": 10}, timeout=30)
    finally:
        if name != "v1":  # the tests below start from v1
            _swap_to(url, deploy, artifacts["v1"])
    assert r.status_code == 200, r.text
    x = m.head.head_input(m.embed(*m.encoder_inputs(texts)))
    ref_s, ref_i = reference_topk(x, m.head.weight, 10, art.num_labels)
    for got, ids, scores in zip(r.json()["results"], ref_i.tolist(), ref_s.tolist(), strict=True):
        assert [x["label_id"] for x in got] == ids
        assert [x["score"] for x in got] == pytest.approx(scores, rel=1e-5, abs=1e-5)
        assert [x["uid"] for x in got] == [art.labels[i]["uid"] for i in ids]
    assert r.json()["results"][0][0]["label_id"] == 5  # a label's own title finds it


def test_batch_prediction_equals_http_answers(swap_app, tmp_path):
    from elmo_serve.predict import predict_command

    url, _ = swap_app
    served = httpx.get(url + "/v1/model", timeout=30).json()["artifact"]
    texts = ["python3 numpy arrays", "some words that mean nothing", "GNU C++ compiler", "qt quick module", "gcc"]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"uid": f"t{i}", "title": t}) + "\n" for i, t in enumerate(texts)))
    assert predict_command(served, str(src), k=10, out=str(out), batch_size=2, device="cpu", progress=False) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    r = httpx.post(url + "/v1/predict", json={"texts": texts, "k": 10}, timeout=30)
    assert r.status_code == 200 and len(rows) == len(texts)
    for row, got in zip(rows, r.json()["results"], strict=True):
        assert row["ids"] == [x["label_id"] for x in got]
        assert row["uids"] == [x["uid"] for x in got] and row["titles"] == [x["title"] for x in got]
        assert row["scores"] == pytest.approx([x["score"] for x in got], rel=1e-5, abs=1e-6)


def test_hot_swap_refuses_a_corrupt_artifact_and_serves_the_new_one(swap_app, artifacts):
    import threading
    import time

    from elmo_serve.model import serving_model

    url, deploy = swap_app
    v1, v2 = (serving_model(artifacts[v], "torch").version for v in ("v1", "v2"))
    assert v1 != v2
    seen, stop = [], threading.Event()

    def hammer():
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/v1/predict", json={"texts": ["couli rikoufine"], "k": 5})
                seen.append((r.status_code, r.json().get("model_version")))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        deploy(artifacts["corrupt"])
        info = httpx.get(url + "/v1/model", timeout=30).json()
        assert info["model_version"] == v1
        assert "refused" in info["last_swap_error"] and "head.safetensors" in info["last_swap_error"]
        before = len(seen)
        time.sleep(0.5)
        assert {v for _, v in seen[before:]} == {v1}, "v1 keeps answering after the refused swap"
        deploy(artifacts["v2"])
        deadline = time.time() + 30
        while httpx.get(url + "/v1/model", timeout=30).json()["model_version"] != v2 and time.time() < deadline:
            time.sleep(0.2)
        before = len(seen)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert httpx.get(url + "/v1/model", timeout=30).json()["last_swap_error"] is None
    assert {v for _, v in seen[before:]} == {v2}
    assert len(seen) > 20 and all(code == 200 for code, _ in seen), [s for s in seen if s[0] != 200][:5]
    assert {v for _, v in seen} == {v1, v2}


def test_limits_change_through_user_config(swap_app, artifacts):
    url, deploy = swap_app
    deploy(artifacts["v2"], limits={"max_k": 3, "max_texts": 2})
    try:
        assert httpx.get(url + "/v1/model", timeout=30).json()["limits"]["max_k"] == 3
        r = httpx.post(url + "/v1/predict", json={"texts": ["a b"], "k": 4}, timeout=30)
        assert r.status_code == 422 and "max_k=3" in r.json()["error"]
        r = httpx.post(url + "/v1/predict", json={"texts": ["a", "b", "c"], "k": 3}, timeout=30)
        assert r.status_code == 422 and "max_texts=2" in r.json()["error"]
    finally:
        deploy(artifacts["v2"])
    assert httpx.get(url + "/v1/model", timeout=30).json()["limits"]["max_k"] == 100  # left out: back to the args'
