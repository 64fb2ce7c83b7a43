"""The ingress's ASGI guard: bodies over the size limit refused before they are read, a last-resort JSON 500, and
the Prometheus metrics of every response (`elmo_serve.app` installs it on its FastAPI app)."""

import logging
import time

from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram

logger = logging.getLogger("ray.serve")
MAX_BODY_BYTES = [4 * 2**20]  # set by the Ingress replica of this process; read by the body-size guard


def error_response(
    status: int, message: str, detail=None, headers: dict | None = None, model_version: str | None = None
) -> JSONResponse:
    """A JSON error body (`ErrorBody`); one the scorer refused names its model, in the body and x-model-version."""
    content = {"error": message, "detail": detail}
    if model_version is not None:
        content["model_version"] = model_version
        headers = {**(headers or {}), "x-model-version": model_version}
    return JSONResponse(status_code=status, content=content, headers=headers)


class Metrics:
    """The ingress replica's Prometheus metrics. Requests and latency are recorded by `Guard` for every response,
    the ones answered before the scorer (4xx of bad bodies, 413, unknown paths) and any 5xx included."""

    def __init__(self):
        reg = self.registry = CollectorRegistry()
        self.requests = Counter("elmo_requests", "HTTP responses", ["endpoint", "status"], registry=reg)
        self.latency = Histogram(
            "elmo_request_latency_seconds",
            "request latency",
            ["endpoint"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=reg,
        )
        self.batch = Histogram(
            "elmo_batch_requests", "requests per scorer batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=reg
        )
        self.batch_texts = Histogram(
            "elmo_batch_texts", "texts per scorer batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=reg
        )

    def record(self, scope: dict, status: int, seconds: float) -> None:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        path = path.rstrip("/") or "/"
        # unknown paths share one label; /v1/labels/{uid} is one endpoint whatever the uid
        endpoint = ENDPOINTS.get(path) or ("labels" if path.startswith("/v1/labels/") else "other")
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)


ENDPOINTS = {
    "/v1/predict": "predict",
    "/v1/similar": "similar",
    "/v1/labels": "labels",
    "/v1/model": "model",
    "/healthz": "healthz",
    "/metrics": "metrics",
}
METRICS: list[Metrics | None] = [None]  # set by the Ingress replica of this process; written to by the guard


class Guard:
    """Bodies over max_body_bytes get 413 before they are read; anything unexpected is a logged 500, never a crash;
    every response is counted in the metrics (`Metrics.record`).

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware (`@app.middleware`) costs ~0.5 ms of CPU per request.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), None

        async def send_tracked(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            limit = MAX_BODY_BYTES[0]
            size = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"content-length"), None)
            if size is not None and size.isdigit() and int(size) > limit:
                msg = f"request body of {size} bytes exceeds max_body_bytes={limit}"
                return await error_response(413, msg)(scope, receive, send_tracked)
            try:
                await self.app(scope, receive, send_tracked)
            except Exception as e:
                logger.exception("unhandled error")
                if status is not None:  # too late for another response
                    raise
                await error_response(500, f"internal error: {type(e).__name__}")(scope, receive, send_tracked)
        finally:
            # No response started: the client went away (the request was cancelled): nginx's 499.
            if METRICS[0] is not None:
                METRICS[0].record(scope, status if status is not None else 499, time.perf_counter() - t0)


def configure_guard(max_body_bytes: int) -> Metrics:
    """Set this process's body limit and metrics, which the guard reads; called by the Ingress replica.

    A module-level function on purpose: the Ingress class reaches its replica pickled by value (the module's name
    `Ingress` is the Deployment), with copies of the globals its methods name, so assigning `METRICS` there would
    set a copy that the guard (imported in the replica) never reads. This function travels by reference."""
    MAX_BODY_BYTES[0] = max_body_bytes
    METRICS[0] = Metrics()
    return METRICS[0]
