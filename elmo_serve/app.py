"""The Ray Serve application: a FastAPI ingress in front of a batched scorer deployment.

    serve run deployments/serve.yaml                         # or: elmo serve ARTIFACT
    serve run elmo_serve.app:app_builder artifact=runs/deps/artifact

`ModelScorer` holds the model (encoder + head + label table) and groups concurrent requests with `@serve.batch`.
What may change at run time comes through its `user_config` (`reconfigure`): the artifact path (hot swap: the new
artifact is loaded and checked beside the old one, then replaces it; requests already accepted finish on the model
they were validated against; a bad artifact is refused, the old model keeps serving and /v1/model reports why), the
limits, the backend, and the batch size / wait. `Ingress` parses and validates bodies (pydantic) once and hands the
parsed request to the scorer, which checks it against the limits and the model and answers with a `ScorerReply` (the
response, or the 4xx that refuses it); the ingress maps every client error to a 4xx (see `elmo_serve.schemas`),
retries once a request whose scorer replica died (a dead replica is a 503 with Retry-After, never a 500), and exports
Prometheus metrics on /metrics (every response counted, by endpoint and status: `elmo_serve.guard`). The model
itself (loading an artifact, the batched call) is `elmo_serve.model`.
"""

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from elmo_serve.guard import Guard, configure_guard, error_response
from elmo_serve.model import Query, ServingModel, load_model
from elmo_serve.schemas import (
    ErrorBody,
    Health,
    Limits,
    ModelInfo,
    PredictRequest,
    PredictResponse,
    RequestError,
    ScoredLabel,
    ScorerReply,
    SimilarRequest,
    SimilarResponse,
    check_k,
    check_predict,
)

logger = logging.getLogger("ray.serve")
# A scorer replica that died (kill -9, OOM, its node lost: ActorDiedError) or cannot be reached (ActorUnavailableError)
# under a request, or a scorer deployment with no replica at all.
_REPLICA_GONE = (RayActorError, DeploymentUnavailableError)
RETRY_AFTER_S = 3  # the Retry-After of a 503: about what Serve takes to notice a dead replica and start another


# The host each replica's inter-deployment gRPC server binds to, when set (a local `elmo serve` sets 127.0.0.1).
REPLICA_GRPC_HOST_ENV = "ELMO_REPLICA_GRPC_HOST"


def bind_replica_grpc(host: str | None = None) -> bool:
    """In a Serve replica process: make the replica's inter-deployment gRPC server, started after the deployment's
    constructor, bind `host` (default: $ELMO_REPLICA_GRPC_HOST; nothing to do when unset) instead of every interface.
    Ray 2.60 hard-codes "[::]:0" in `ray.serve._private.replica` and has no option for it; a node on loopback
    connects to its replicas at 127.0.0.1, so loopback is enough there. Returns whether the bind is redirected (False
    when this Ray has no such function: the replica then binds as Ray decides)."""
    host = host or os.environ.get(REPLICA_GRPC_HOST_ENV)
    if not host:
        return False
    from ray.serve._private import replica

    add_port = getattr(replica, "add_port_to_grpc_server", None)
    if add_port is None:
        logger.warning(f"{REPLICA_GRPC_HOST_ENV}={host}: this Ray has no add_port_to_grpc_server; gRPC binds [::]")
        return False
    original = getattr(add_port, "original", add_port)

    def add_port_on_host(server, address: str):
        return original(server, f"{host}:0" if address == "[::]:0" else address)

    add_port_on_host.original = original
    replica.add_port_to_grpc_server = add_port_on_host
    return True


class AppArgs(BaseModel):
    """`args:` of the Serve YAML (or `serve run elmo_serve.app:app_builder artifact=...`)."""

    model_config = ConfigDict(extra="forbid")

    artifact: str = Field(description="artifact directory served at start")
    backend: str = Field("auto", description="auto | triton | torch | faiss")
    limits: Limits = Field(default_factory=Limits)
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(
        0.02, ge=0, description="cap of the wait while the scorer is busy (ModelScorer)"
    )
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="larger bodies get 413 before parsing")
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads of each scorer replica's torch; None: the replica's num_cpus"
    )
    retry_wait_s: float = Field(
        3.0,
        gt=0,
        description="how long the one retry of a request whose scorer replica died waits for a replica "
        "to take it before the request is answered 503",
    )


class ScorerConfig(BaseModel):
    """The scorer's `user_config`, the desired state: a field left out falls back to the value the deployment was
    built with (its `args`), except `artifact` and `backend`, which stay as they are when left out."""

    model_config = ConfigDict(extra="forbid")

    artifact: str | None = None
    backend: str | None = None
    limits: Limits | None = None
    max_batch_size: int | None = Field(None, ge=1)
    batch_wait_timeout_s: float | None = Field(None, ge=0)


class Scored(NamedTuple):
    """One request's answers (per text: label ids, scores) and the scorer batch that computed them."""

    answers: list[tuple[list[int], list[float]]]
    batch: int  # requests in the batch
    texts: int  # texts in the batch


# health_check_period_s: a replica killed outright is noticed (and replaced) at its next failed health check: 10 s
# left a lone replica's clients waiting 11 s (benchmarks/replica_kill.py); the check itself is a trivial call.
@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1}, health_check_period_s=2)
class ModelScorer:
    def __init__(
        self,
        artifact: str,
        backend: str = "auto",
        limits: dict | None = None,
        batching: dict | None = None,
        torch_threads: int | None = None,
    ):
        bind_replica_grpc()
        if torch_threads:
            # Ray sets OMP_NUM_THREADS to the replica's num_cpus; a replica alone on a machine scores one request
            # faster on every core (2 cores, DebianDeps, 1 client: p50 6.9 vs 8.2 ms over HTTP).
            torch.set_num_threads(torch_threads)
        self.backend = backend
        self._initial_limits = self.limits = Limits(**(limits or {}))
        self._initial_batching = {"max_batch_size": 32, "batch_wait_timeout_s": 0.02, **(batching or {})}
        self.model = load_model(artifact, backend)
        self.swap_error: str | None = None
        self._swap = asyncio.Lock()
        self._batch_wait, self._batch_s, self._running, self._waiting = 0.0, 0.0, 0, 0
        for key, value in self._initial_batching.items():
            self._set_batching(key, value)

    def _set_batching(self, key: str, value) -> None:
        if key == "max_batch_size":
            self._batched.set_max_batch_size(value)
        elif key == "batch_wait_timeout_s":
            self._batch_wait = value

    async def reconfigure(self, user_config: dict) -> None:
        # Never raises: a failing reconfigure would mark the deployment unhealthy and replace replicas that serve
        # fine. A refused change is logged and reported by /v1/model as last_swap_error.
        async with self._swap:
            try:
                cfg = ScorerConfig(**(user_config or {}))
            except ValidationError as e:
                self.swap_error = f"user_config refused: {e}"
                logger.error(self.swap_error)
                return
            self.limits = cfg.limits if cfg.limits is not None else self._initial_limits
            for key, initial in self._initial_batching.items():
                self._set_batching(key, getattr(cfg, key) if getattr(cfg, key) is not None else initial)
            path = str(Path(cfg.artifact).resolve()) if cfg.artifact else self.model.info.get("artifact")
            backend = cfg.backend or self.backend
            if path == self.model.info.get("artifact") and backend == self.backend:
                return
            try:
                new = await asyncio.to_thread(load_model, path, backend)
            except Exception as e:  # the old model keeps serving
                self.swap_error = f"artifact {path} refused: {type(e).__name__}: {e}"
                logger.error(self.swap_error)
                return
            old, self.model, self.backend, self.swap_error = self.model, new, backend, None
            logger.info(f"model {old.version} -> {new.version} ({path})")

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("no model loaded")

    # Serve gathers the next batch while this one runs. A request that finds the scorer idle is scored at once (see
    # `_score`: a wait would only add to its latency). One that arrives while a batch runs has to wait for it anyway:
    # its batch gathers for as long as a batch has been taking (a running average), at most batch_wait_timeout_s.
    # Under load batches then grow with the load instead of queueing up small behind the running one.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _batched(self, items: list[tuple[ServingModel, Query]]) -> list[Scored]:
        groups: dict[int, list[int]] = {}
        for i, (model, _) in enumerate(items):
            groups.setdefault(id(model), []).append(i)
        out: list = [None] * len(items)
        texts = sum(len(q.texts) for _, q in items)
        self._running += 1
        self._batched.set_batch_wait_timeout_s(min(self._batch_wait, self._batch_s))
        t0 = time.perf_counter()
        try:
            for idx in groups.values():
                model = items[idx[0]][0]
                res = await asyncio.to_thread(model.predict_batch, [items[i][1] for i in idx])
                for i, r in zip(idx, res, strict=True):
                    out[i] = Scored(r, len(items), texts)
        finally:
            self._running -= 1
            self._batch_s += 0.2 * (time.perf_counter() - t0 - self._batch_s)
            if not self._running:
                self._batched.set_batch_wait_timeout_s(0.0)
        return out

    async def _score(self, model: ServingModel, query: Query) -> Scored:
        """A request that finds the scorer idle and nothing else waiting is scored at once, without the batch queue's
        hand-offs; whatever arrives meanwhile waits in the batch queue."""
        if not self._running and not self._waiting:
            self._running += 1
            try:
                # In a worker thread: the event loop must see the requests that arrive meanwhile (they batch).
                return Scored((await asyncio.to_thread(model.predict_batch, [query]))[0], 1, len(query.texts))
            finally:
                self._running -= 1
        self._waiting += 1
        try:
            return await self._batched((model, query))
        finally:
            self._waiting -= 1

    def _labels(self, model: ServingModel, ids: list[int], scores: list[float]) -> list[ScoredLabel]:
        return [
            ScoredLabel(label_id=i, uid=model.uids[i], title=model.titles[i], score=s)
            for i, s in zip(ids, scores, strict=True)
        ]

    async def predict(self, req: PredictRequest) -> ScorerReply:
        """A request the ingress parsed: checked against the limits and the model it will be scored on, scored."""
        model = self.model
        try:
            check_predict(req, self.limits, model.num_labels, model.num_features)
        except RequestError as e:
            return ScorerReply.refused(e, model.version)
        query = Query(req.texts or [], req.k, list(set(req.exclude or ())), features=req.features)
        res = await self._score(model, query)
        body = PredictResponse(model_version=model.version, results=[self._labels(model, *r) for r in res.answers])
        return ScorerReply(body, batch=res.batch, texts=res.texts, model_version=model.version)

    async def similar(self, req: SimilarRequest) -> ScorerReply:
        model = self.model
        try:
            item = model.id_of(req.uid) if req.uid is not None else req.id
            if item is None or not 0 <= item < model.num_labels:
                key = f"uid {req.uid!r}" if req.uid is not None else f"id {req.id}"
                raise RequestError(404, f"unknown item {key} (ids are 0..{model.num_labels - 1})")
            check_k(req.k, self.limits, model.num_labels, reserved=1)
            if req.mode == "text" and model.takes_features:
                raise RequestError(422, "this model takes features, not text: ask with mode=embedding")
        except RequestError as e:
            return ScorerReply.refused(e, model.version)
        if req.mode == "text":
            res = await self._score(model, Query([model.item_text(item)], req.k, [item]))
            (ids, scores), batch, texts = res.answers[0], res.batch, res.texts
        else:
            ids, scores = await asyncio.to_thread(model.similar_by_embedding, item, req.k)
            batch = texts = 0
        body = SimilarResponse(
            model_version=model.version,
            item=self._labels(model, [item], [0.0])[0],
            results=self._labels(model, ids, scores),
        )
        return ScorerReply(body, batch=batch, texts=texts, model_version=model.version)

    def info(self) -> ModelInfo:
        m = self.model
        keys = ("num_labels", "dim", "head_dtype", "encoder", "metrics", "manifest")
        return ModelInfo(
            **{
                "model_version": m.version,
                "artifact": m.info.get("artifact", ""),
                **{k: m.info.get(k, {} if k in ("metrics", "manifest") else "") for k in keys},
                "num_labels": m.num_labels,
                "backend": m.scorer.backend,
                "torch_threads": torch.get_num_threads(),
                "limits": self.limits,
                "inputs": "features" if m.takes_features else "texts",
                "num_features": m.num_features,
                "last_swap_error": self.swap_error,
            }
        )


app = FastAPI(
    title="ELMO Serve",
    description="Top-k tagging and product-to-product recommendation with a low-precision extreme classifier.",
    version="1",
)
_ERRORS = {c: {"model": ErrorBody} for c in (400, 404, 413, 422, 503)}


class ScorerUnavailable(Exception):
    """No scorer replica answered a request (its replica died and the one retry failed or timed out): a 503."""

    def response(self) -> JSONResponse:
        return error_response(503, str(self), headers={"Retry-After": str(RETRY_AFTER_S)})


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    msg = str(exc.detail)
    if exc.status_code == 400 and "parsing the body" in msg:
        msg = "the body is not valid JSON: it could not be decoded (send UTF-8 JSON)"
    return error_response(exc.status_code, msg)


@app.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid" or isinstance(first.get("ctx", {}).get("error"), UnicodeDecodeError):
        return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    msg = str(first.get("msg", "invalid request"))
    if where.startswith("features.") and first.get("type") in ("tuple_type", "too_long", "too_short", "missing"):
        msg = "each feature must be an [index, value] pair (an integer index and a finite number)"
    elif first.get("type") == "missing":
        msg = "the request body is empty: send a JSON object" if where == "body" else "field required"
    elif first.get("type") == "model_attributes_type" and where == "body":
        msg = "the body must be a JSON object (and Content-Type: application/json)"
    detail = [{k: e.get(k) for k in ("type", "loc", "msg")} for e in errors]
    return error_response(422, f"{where}: {msg}", json.loads(json.dumps(detail, default=str)))


app.add_middleware(Guard)


@serve.deployment(max_ongoing_requests=128, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(app)
class Ingress:
    def __init__(self, scorer: DeploymentHandle, max_body_bytes: int = 4 * 2**20, retry_wait_s: float = 3.0):
        bind_replica_grpc()
        self.scorer, self.retry_wait_s = scorer, retry_wait_s
        self.metrics = configure_guard(max_body_bytes)

    async def _ask(self, method: str, *args):
        """The scorer's answer to `method(*args)`. A request whose replica died or could not be reached is sent once
        more: Serve's router leaves out the replica that failed, so the retry goes to another one (a lone replica's
        request waits for the replacement Serve starts). A retry that no replica takes within retry_wait_s, or that
        fails too, raises ScorerUnavailable (a 503 with Retry-After)."""
        call = getattr(self.scorer, method)
        try:
            return await call.remote(*args)
        except _REPLICA_GONE as e:
            logger.warning(f"scorer {method}: {type(e).__name__}; retrying once on another replica")
        response = call.remote(*args)
        try:
            # Awaiting a DeploymentResponse first waits for the router to assign it to a replica (this step), then
            # for that replica's answer. Only the assignment is bounded: a replica that took the request answers in
            # its own time, as any request's does.
            await asyncio.wait_for(response._fetch_future_result_async(), self.retry_wait_s)
            return await response
        except (TimeoutError, *_REPLICA_GONE) as e:
            response.cancel()
            why = f"no replica took it within {self.retry_wait_s} s" if isinstance(e, TimeoutError) else repr(e)[:200]
            raise ScorerUnavailable(
                f"the scorer is unavailable: its replica died and the one retry failed ({why}); retry in "
                f"{RETRY_AFTER_S} s"
            ) from None

    async def _call(self, endpoint: str, body: PredictRequest | SimilarRequest) -> Response:
        try:
            reply: ScorerReply = await self._ask(endpoint, body)  # the parsed request, as it is
        except ScorerUnavailable as e:
            return e.response()
        if reply.body is None:
            return error_response(reply.status, reply.error, model_version=reply.model_version)
        if reply.batch:
            self.metrics.batch.observe(reply.batch)
            self.metrics.batch_texts.observe(reply.texts)
        headers = {"x-model-version": reply.body.model_version, "x-batch-size": str(reply.batch)}
        return Response(reply.body.model_dump_json(), media_type="application/json", headers=headers)

    @app.post("/v1/predict", response_model=PredictResponse, responses=_ERRORS)
    async def predict(self, body: PredictRequest):
        """Top-k labels (id, uid, title, score) of each text; for a model trained on sparse BoW features (/v1/model
        says `inputs: features`), of each item's [index, value] pairs in `features` instead."""
        return await self._call("predict", body)

    @app.post("/v1/similar", response_model=SimilarResponse, responses=_ERRORS)
    async def similar(self, body: SimilarRequest):
        """Items related to an item (by uid or id), the item itself excluded."""
        return await self._call("similar", body)

    @app.get("/v1/model", response_model=ModelInfo, responses={503: {"model": ErrorBody}})
    async def model(self):
        try:
            return await self._ask("info")
        except ScorerUnavailable as e:
            return e.response()

    @app.get("/healthz", response_model=Health, responses={503: {"model": ErrorBody}})
    async def healthz(self):
        try:
            info: ModelInfo = await self._ask("info")
        except ScorerUnavailable as e:
            return e.response()
        return Health(model_version=info.model_version)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(self):
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def app_builder(args: AppArgs) -> serve.Application:
    if not isinstance(args, AppArgs):
        args = AppArgs(**dict(args))
    batching = {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s}
    scorer = ModelScorer.bind(args.artifact, args.backend, args.limits.model_dump(), batching, args.torch_threads)
    return Ingress.bind(scorer, args.max_body_bytes, args.retry_wait_s)
