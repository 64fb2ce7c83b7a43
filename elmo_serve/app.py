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
import re
import threading
import time
from pathlib import Path
from typing import NamedTuple

import torch
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from elmo_serve.auth import DEFAULT_ENV, admin_token, refusal
from elmo_serve.catalogue import CatalogueConflict, CatalogueStale, CatalogueUnknown, Label
from elmo_serve.catalogue_log import CatalogueError, Change
from elmo_serve.catalogue_log import Limits as CatalogueLimits
from elmo_serve.guard import Guard, configure_guard, error_response
from elmo_serve.live import LiveLabels, default_log_path
from elmo_serve.model import Query, ServingModel, load_model
from elmo_serve.schemas import (
    ErrorBody,
    Health,
    LabelOut,
    LabelsRequest,
    LabelsResponse,
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


def replica_tag() -> str:
    """This scorer replica's id (Serve's replica id; the pid outside Serve): the x-replica header of its answers."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not in a Serve replica (a test, a script)
        return f"pid-{os.getpid()}"


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
    catalogue: str | None = Field(
        None,
        description="the live label catalogue's log, which every scorer replica follows (a path on a disk they all "
        "see); None: catalogue.log in the directory holding the artifact directory; 'off': no live labels",
    )
    catalogue_poll_s: float = Field(0.1, gt=0, le=5, description="how often each scorer replica reads the log")
    admin_token_env: str | None = Field(
        DEFAULT_ENV,
        description="the environment variable of the ingress replicas that holds the admin token of the label "
        "change endpoints (unset or empty there: the endpoints are off)",
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
        catalogue: str | None = None,
        catalogue_poll_s: float = 0.1,
    ):
        bind_replica_grpc()
        if torch_threads:
            # Ray sets OMP_NUM_THREADS to the replica's num_cpus; a replica alone on a machine scores one request
            # faster on every core (2 cores, DebianDeps, 1 client: p50 6.9 vs 8.2 ms over HTTP).
            torch.set_num_threads(torch_threads)
        self.backend = backend
        self._initial_limits = self.limits = Limits(**(limits or {}))
        self._initial_batching = {"max_batch_size": 32, "batch_wait_timeout_s": 0.02, **(batching or {})}
        self.replica = replica_tag()
        self.catalogue = catalogue
        self.model = load_model(artifact, backend, live_labels=catalogue is not None)
        self.swap_error: str | None = None
        self._swap = asyncio.Lock()
        self._batch_wait, self._batch_s, self._running, self._waiting = 0.0, 0.0, 0, 0
        for key, value in self._initial_batching.items():
            self._set_batching(key, value)
        # Live labels: the log replayed before the constructor returns (a new replica answers only once it caught
        # up), then followed by a thread. `_live_lock` orders the follower, label changes and swaps.
        self.live: LiveLabels | None = None
        self.live_error: str | None = None
        self._live_lock = threading.Lock()
        self._stop = threading.Event()
        if catalogue is not None:
            try:
                self.live = self._live_for(self.model, swap=False)
            except CatalogueError as e:
                # A log reconciled for the artifact a swap declared: this replica starts on the app's first artifact,
                # then Serve hands it the declared one (reconfigure, before it takes requests), which fits the log.
                self.live_error = f"the catalogue log does not fit the artifact loaded first: {e}"
                logger.warning(self.live_error)
            threading.Thread(target=self._follow, args=(catalogue_poll_s,), name="catalogue", daemon=True).start()

    def _live_for(self, model: ServingModel, swap: bool) -> LiveLabels | None:
        """The live labels of `model` (the log reconciled with it first on a swap); None, and why in live_error,
        for a model that cannot take new labels (one trained on sparse features, or one without zero-shot rows)."""
        if model.takes_features or model.zero_shot_rows is None:
            self.live_error = "this model cannot take new labels (it takes sparse features, or has no zero-shot rows)"
            return None
        make = LiveLabels.for_swap if swap else LiveLabels
        return make(self.catalogue, model, self._catalogue_limits())

    def _catalogue_limits(self) -> CatalogueLimits:
        lim = self.limits
        return CatalogueLimits(lim.max_label_batch, lim.max_title_chars, lim.max_uid_chars)

    def _follow(self, poll_s: float) -> None:
        reported = None
        while not self._stop.wait(poll_s):
            try:
                with self._live_lock:
                    if self.live is not None:
                        self.live.sync()
                reported = None
            except Exception as e:  # keep serving what was applied; say why once, retry at the next poll
                if repr(e) != reported:
                    reported = repr(e)
                    logger.error(f"catalogue {self.catalogue}: {type(e).__name__}: {e}")

    def __del__(self):
        self._stop.set()

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
            if self.live is not None:
                self.live.limits = self._catalogue_limits()
            for key, initial in self._initial_batching.items():
                self._set_batching(key, getattr(cfg, key) if getattr(cfg, key) is not None else initial)
            path = str(Path(cfg.artifact).resolve()) if cfg.artifact else self.model.info.get("artifact")
            backend = cfg.backend or self.backend
            if path == self.model.info.get("artifact") and backend == self.backend:
                return
            try:
                new = await asyncio.to_thread(load_model, path, backend, live_labels=self.catalogue is not None)
                old = await asyncio.to_thread(self._swap_to, new)
            except Exception as e:  # the old model keeps serving
                self.swap_error = f"artifact {path} refused: {type(e).__name__}: {e}"
                logger.error(self.swap_error)
                return
            self.backend, self.swap_error = backend, None
            logger.info(f"model {old.version} -> {new.version} ({path})")

    def _swap_to(self, new: ServingModel) -> ServingModel:
        """Serve `new`, its catalogue first reconciled and replayed (requests in flight finish on the old model)."""
        with self._live_lock:
            live = self._live_for(new, swap=True) if self.catalogue is not None else None
            old, self.model, self.live = self.model, new, live
        return old

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
        # A label served without a title (None) answers with its uid, as /v1/similar scores it.
        return [
            ScoredLabel(label_id=i, uid=model.uids[i], title=model.titles[i] or model.uids[i], score=s)
            for i, s in zip(ids, scores, strict=True)
        ]

    async def predict(self, req: PredictRequest) -> ScorerReply:
        """A request the ingress parsed: checked against the limits and the model it will be scored on, scored."""
        model = self.model
        try:
            check_predict(req, self.limits, model.num_labels, model.num_features, model.retired)
        except RequestError as e:
            return ScorerReply.refused(e, model.version)
        query = Query(req.texts or [], req.k, list(set(req.exclude or ())), features=req.features)
        res = await self._score(model, query)
        body = PredictResponse(model_version=model.version, results=[self._labels(model, *r) for r in res.answers])
        return ScorerReply(body, batch=res.batch, texts=res.texts, model_version=model.version, replica=self.replica)

    async def similar(self, req: SimilarRequest) -> ScorerReply:
        model = self.model
        try:
            item = model.id_of(req.uid) if req.uid is not None else req.id
            if item is None or not 0 <= item < model.num_labels:
                key = f"uid {req.uid!r}" if req.uid is not None else f"id {req.id}"
                raise RequestError(404, f"unknown item {key} (ids are 0..{model.num_labels - 1})")
            if item in model.retired:
                raise RequestError(404, f"item {model.uids[item]!r} (id {item}) is a retired label")
            check_k(req.k, self.limits, model.num_live, reserved=1)
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
        return ScorerReply(body, batch=batch, texts=texts, model_version=model.version, replica=self.replica)

    async def change_labels(self, op: str, labels: list[tuple[str, str | None]]) -> ScorerReply:
        """Add, retitle or retire labels (one batch, all or nothing); answered once this replica serves the change."""
        model = self.model
        try:
            if self.live is None:
                raise RequestError(403 if self.catalogue is None else 422, self._live_off())
            changed = await asyncio.to_thread(self._change, [Change(op, uid, title) for uid, title in labels])
        except RequestError as e:
            return ScorerReply.refused(e, model.version)
        body = LabelsResponse(
            catalogue_version=changed.version,
            model_version=self.model.version,
            labels=[self._label_out(x) for x in changed.labels],
        )
        return ScorerReply(body, model_version=body.model_version, replica=self.replica)

    def _change(self, changes: list[Change]):
        status = {CatalogueUnknown: 404, CatalogueConflict: 409, CatalogueStale: 503}
        with self._live_lock:
            try:
                return self.live.change(changes)
            except CatalogueError as e:
                # "change 3: ..." names the request's labels[3]
                raise RequestError(
                    status.get(type(e), 422), re.sub(r"^change (\d+):", r"labels[\1]:", str(e))
                ) from None
            except OSError as e:  # the log's disk (full, read-only, gone)
                raise RequestError(503, f"the catalogue log cannot be written: {e}") from None

    async def get_label(self, uid: str) -> ScorerReply:
        model, live = self.model, self.live
        label = live.label(uid) if live is not None else None
        if label is None and live is None and model.id_of(uid) is not None:
            i = model.id_of(uid)
            label = Label(i, uid, model.titles[i], i in model.retired)
        if label is None:
            return ScorerReply.refused(RequestError(404, f"unknown label uid {uid!r}"), model.version)
        version = live.version if live is not None else 0
        body = LabelsResponse(catalogue_version=version, model_version=model.version, labels=[self._label_out(label)])
        return ScorerReply(body, model_version=model.version, replica=self.replica)

    def _label_out(self, label: Label) -> LabelOut:
        artifact_labels = self.live.catalogue.state.num_artifact_labels if self.live is not None else label.id + 1
        source = "artifact" if label.id < artifact_labels else "catalogue"
        return LabelOut(label_id=label.id, uid=label.uid, title=label.title, retired=label.retired, source=source)

    def _live_off(self) -> str:
        if self.catalogue is None:
            return "live labels are off: the app was started with catalogue: off"
        return f"live labels are off for this model: {self.live_error}"

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
                "num_live_labels": m.num_live,
                "replica": self.replica,
                "head_rows": m.scorer.capacity,
                "head_bytes": m.scorer.weights.nbytes,
                "catalogue": self.catalogue if self.live is not None else None,
                "catalogue_version": self.live.version if self.live is not None else None,
                "last_swap_error": self.swap_error,
            }
        )


app = FastAPI(
    title="ELMO Serve",
    description="Top-k tagging and product-to-product recommendation with a low-precision extreme classifier.",
    version="1",
)
_ERRORS = {c: {"model": ErrorBody} for c in (400, 404, 413, 422, 503)}
_LABEL_ERRORS = {c: {"model": ErrorBody} for c in (400, 401, 403, 404, 409, 413, 422, 503)}
_TOKEN = Header(
    None, description="`Bearer TOKEN`: the admin token (the ingress replicas' environment variable admin_token_env)"
)


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
    def __init__(
        self,
        scorer: DeploymentHandle,
        max_body_bytes: int = 4 * 2**20,
        retry_wait_s: float = 3.0,
        admin_token_env: str | None = DEFAULT_ENV,
    ):
        bind_replica_grpc()
        self.scorer, self.retry_wait_s = scorer, retry_wait_s
        self.metrics = configure_guard(max_body_bytes)
        self.admin_token_env = admin_token_env
        self._admin_token = admin_token(admin_token_env)  # read here, in the replica: never part of the config

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

    async def _call(self, endpoint: str, *args) -> Response:
        try:
            reply: ScorerReply = await self._ask(endpoint, *args)  # the parsed request, as it is
        except ScorerUnavailable as e:
            return e.response()
        if reply.body is None:
            return error_response(reply.status, reply.error, model_version=reply.model_version)
        if reply.batch:
            self.metrics.batch.observe(reply.batch)
            self.metrics.batch_texts.observe(reply.texts)
        headers = {
            "x-model-version": reply.body.model_version,
            "x-batch-size": str(reply.batch),
            "x-replica": reply.replica,
        }
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

    async def _change(self, authorization: str | None, op: str, labels: list[tuple[str, str | None]]) -> Response:
        refused = refusal(self._admin_token, authorization, self.admin_token_env)
        if refused is not None:
            headers = {"WWW-Authenticate": "Bearer"} if refused[0] == 401 else None
            return error_response(*refused, headers=headers)
        return await self._call("change_labels", op, labels)

    @app.post("/v1/labels", response_model=LabelsResponse, responses=_LABEL_ERRORS)
    async def add_labels(self, body: LabelsRequest, authorization: str | None = _TOKEN):
        """Add labels (admin token): each new uid gets the next label id and, as its head row, the model's zero-shot
        vector of its title. Answered once the change is in the catalogue log and served by the replica that wrote
        it; every replica serves it within a second. A batch applies whole or not at all."""
        return await self._change(authorization, "add", [(x.uid, x.title) for x in body.labels])

    @app.put("/v1/labels", response_model=LabelsResponse, responses=_LABEL_ERRORS)
    async def retitle_labels(self, body: LabelsRequest, authorization: str | None = _TOKEN):
        """Change the titles of existing labels (admin token); their head rows are computed again from the new
        titles (zero-shot rows, an artifact label's trained row included)."""
        return await self._change(authorization, "update", [(x.uid, x.title) for x in body.labels])

    @app.delete("/v1/labels/{uid}", response_model=LabelsResponse, responses=_LABEL_ERRORS)
    async def retire_label(self, uid: str, authorization: str | None = _TOKEN):
        """Retire a label (admin token): it keeps its id and is never returned again by /v1/predict or /v1/similar;
        its uid cannot be added again."""
        return await self._change(authorization, "retire", [(uid, None)])

    @app.get("/v1/labels/{uid}", response_model=LabelsResponse, responses=_LABEL_ERRORS)
    async def get_label(self, uid: str):
        """A label of the catalogue (artifact or added, retired ones included), as the answering replica serves it."""
        return await self._call("get_label", uid)

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
    log = None if args.catalogue == "off" else os.path.abspath(args.catalogue or default_log_path(args.artifact))
    scorer = ModelScorer.bind(
        args.artifact, args.backend, args.limits.model_dump(), batching, args.torch_threads, log, args.catalogue_poll_s
    )
    return Ingress.bind(scorer, args.max_body_bytes, args.retry_wait_s, args.admin_token_env)
