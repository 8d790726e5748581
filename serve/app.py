"""The HTTP server: Open Inference Protocol routes over runtimes, each behind a dynamic batcher.

Routes (KServe v2): `GET /v2/health/live`, `GET /v2/health/ready`, `GET /v2`,
`GET /v2/models/{name}[/versions/{v}]`, `GET .../ready`, `POST .../infer`, Triton's
model-configuration and statistics extensions (`GET .../config`, `GET .../stats`,
`GET /v2/models/stats`), plus `GET /metrics` (Prometheus text). With `settings.grpc_port` the
same models are also served over gRPC (`serve.grpc_server`), through the same batchers. Every
error is `{"error": "..."}` with a 4xx status for anything the client sent (400 bad tensors or a
response over the size limit, 401 key, 404 model, 408 body too slow, 413 body size, 415
encoding), 503 while the server is not ready, its queue is full or it holds too many request
bodies (with Retry-After), 504 when a request outlives its timeout. `/docs` and `/redoc` never
exist (their pages load scripts from a CDN); `/openapi.json` only when asked for.

`create_app(runtimes, settings)` returns the ASGI app; the batchers start with the app's
lifespan and, on shutdown, finish every queued request before the worker threads stop.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from noisyseg import __version__
from noisyseg.serve.core import (
    SERVER_EXTENSIONS,
    SERVER_NAME,
    ModelTable,
    input_bytes_outside,
    off_loop_if_large,
    plan_answer,
    presented_key,
    run_inference,
)
from noisyseg.serve.errors import ServeError, Unauthorized, Unavailable
from noisyseg.serve.http_bodies import EncodedBodyResponse, read_body
from noisyseg.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from noisyseg.serve.metrics import ServerMetrics
from noisyseg.serve.protocol import (
    HEADER_LENGTH_HEADER,
    PlannedOutput,
    decode_request,
    decode_request_header,
    encode_response,
    error_body,
    response_bytes_at_most,
    response_too_large,
)
from noisyseg.serve.runtimes import Runtime
from noisyseg.serve.settings import ServerSettings

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("noisyseg.serve.access")

# Paths a load balancer or orchestrator probes without credentials.
UNAUTHENTICATED_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
_ROUTE_PATTERNS = [
    (re.compile(r"^/v2/health/(live|ready)$"), "health"),
    (re.compile(r"^/v2/?$"), "server_metadata"),
    (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$"), "infer"),
    (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/ready$"), "model_ready"),
    (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/config$"), "model_config"),
    (re.compile(r"^/v2/models/([^/]+(/versions/[^/]+)?/)?stats$"), "model_statistics"),
    (re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?$"), "model_metadata"),
    (re.compile(r"^/metrics$"), "metrics"),
]


def create_app(runtimes: Sequence[Runtime], settings: ServerSettings | None = None) -> FastAPI:
    """The ASGI app serving `runtimes` (already loaded) with `settings`."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics()
    table = ModelTable(runtimes, settings, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        table.start()
        grpc_server = None
        if settings.grpc_port is not None:
            # Imported only here: the generated messages join protobuf's default pool under the
            # protocol's package name, which a process that imported tritonclient.grpc or kserve
            # (a test, a client) already holds.
            from noisyseg.serve.grpc_server import start_grpc_server

            grpc_server = await start_grpc_server(table, settings, metrics)
        logger.info("serving %s", ", ".join(f"{r.name} ({r.backend})" for r in table.runtimes))
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(settings.graceful_shutdown_s)
            # uvicorn has already let requests in flight finish; drain whatever is queued.
            await table.stop()
            logger.info("server stopped")

    app = FastAPI(
        title="noisyseg inference server",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.openapi else None,
    )
    app.state.models = table
    app.state.bodies = table.bodies
    app.state.metrics = metrics
    app.state.settings = settings
    _add_error_handlers(app)
    _add_routes(app, table, settings, metrics)
    app.add_middleware(AccessMiddleware, settings=settings, metrics=metrics)
    return app


def _error_response(status: int, message: str) -> Response:
    return Response(error_body(message), status_code=status, media_type="application/json")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(_: Request, err: ServeError) -> Response:
        response = _error_response(err.status_code, str(err))
        response.headers.update(err.headers)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> Response:
        return _error_response(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> Response:
        return _error_response(400, f"invalid request: {err.errors()}")


def _add_routes(app: FastAPI, table: ModelTable, settings: ServerSettings, metrics: ServerMetrics) -> None:
    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        if not table.ready:
            raise Unavailable("server is not ready (starting or shutting down)")
        return {"ready": True}

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": SERVER_EXTENSIONS}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    async def model_metadata(name: str, version: str | None = None) -> dict[str, Any]:
        return table.runtime(name, version).metadata()

    async def model_ready(name: str, version: str | None = None) -> dict[str, Any]:
        model = table.served(name, version)
        return {"name": model.runtime.name, "ready": True}

    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        return await _infer(request, table, settings, metrics, name, version)

    async def model_config(name: str, version: str | None = None) -> dict[str, Any]:
        return table.model_config(name, version).to_json()

    async def model_statistics(name: str | None = None, version: str | None = None) -> dict[str, Any]:
        return table.statistics(name, version)

    # Before /v2/models/{name}, which would take "stats" for a model name.
    app.add_api_route("/v2/models/stats", model_statistics, methods=["GET"])
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.add_api_route(prefix, model_metadata, methods=["GET"])
        app.add_api_route(prefix + "/ready", model_ready, methods=["GET"])
        app.add_api_route(prefix + "/infer", infer, methods=["POST"])
        app.add_api_route(prefix + "/config", model_config, methods=["GET"])
        app.add_api_route(prefix + "/stats", model_statistics, methods=["GET"])


async def _infer(
    request: Request,
    table: ModelTable,
    settings: ServerSettings,
    metrics: ServerMetrics,
    name: str,
    version: str | None,
) -> Response:
    started = time.perf_counter()
    runtime = table.runtime(name, version)
    # The body, the tensors decoded from it and the answer count against --max-held-body-mb from
    # the body's first byte until the answer is sent (or the request fails).
    held = contextlib.ExitStack()
    take = held.enter_context(table.bodies.share())
    try:
        model = table.served(name, version)

        def check_response(planned: list[PlannedOutput], request_id: str | None) -> int | None:
            size = response_bytes_at_most(runtime.name, runtime.version, request_id, planned)
            if size is not None and size > settings.max_response_bytes:
                raise response_too_large(runtime.name, settings.max_response_bytes, size)
            return size

        def check_header(header: bytes, binary_length: int) -> None:
            # A request the answer's size limit or the model will refuse is refused before its
            # tensors are uploaded (a 16 MiB image took 80-140 ms to arrive).
            preview = decode_request_header(header, binary_length)
            plan_answer(table, runtime, preview, lambda planned: check_response(planned, preview.id))

        body = await read_body(request, settings, take, check_header)
        decoded = await off_loop_if_large(len(body), decode_request, body, request.headers.get(HEADER_LENGTH_HEADER))
        take(input_bytes_outside(decoded, body))
        outputs, results = await run_inference(
            table, model, decoded, lambda planned: check_response(planned, decoded.id), take
        )
        encoded = [(out, results[out], decoded.wants_binary(out)) for out in outputs]
        # About 4 bytes of JSON text per number, at the least.
        json_size = 4 * sum(array.size for _, array, binary in encoded if not binary)
        response = await off_loop_if_large(
            json_size, encode_response, runtime.name, runtime.version, decoded.id, encoded, settings.max_response_bytes
        )
    except ServeError:
        held.close()
        metrics.inference_requests.inc(runtime.name, "error")
        raise
    except BaseException:
        held.close()
        raise
    metrics.inference_requests.inc(runtime.name, "success")
    metrics.inference_latency.observe(time.perf_counter() - started, runtime.name)
    return EncodedBodyResponse(response, on_sent=held.close)


def _route_label(path: str) -> str:
    return next((label for pattern, label in _ROUTE_PATTERNS if pattern.match(path)), "other")


class AccessMiddleware:
    """API-key check (constant-time), access log lines (JSON) and HTTP metrics for every request."""

    def __init__(self, app: ASGIApp, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self.key = settings.api_key.encode() if settings.api_key is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self._authorized(scope):
                await self.app(scope, receive, send_and_record)
            else:
                await self._reject(send_and_record)
        finally:
            self._record(scope, status, time.perf_counter() - started)

    def _authorized(self, scope: Scope) -> bool:
        if self.key is None or scope["path"] in UNAUTHENTICATED_PATHS:
            return True
        presented = presented_key(dict(scope["headers"]))
        # compare_digest takes time independent of where the keys differ.
        return presented is not None and hmac.compare_digest(presented, self.key)

    @staticmethod
    async def _reject(send: Send) -> None:
        message = "missing or wrong API key (send 'Authorization: Bearer <key>' or 'X-API-Key: <key>')"
        body = error_body(message)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]
        await send({"type": "http.response.start", "status": Unauthorized.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = _route_label(scope["path"])
        self.metrics.http_requests.inc(route, str(status))
        if not access_logger.isEnabledFor(logging.INFO):
            return
        client = scope.get("client")
        access_logger.info(
            json.dumps(
                {
                    "event": "http_request",
                    "method": scope["method"],
                    "path": scope["path"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000.0, 3),
                    "client": f"{client[0]}:{client[1]}" if client else None,
                }
            )
        )
