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

import asyncio
import hmac
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from noisyseg import __version__
from noisyseg.export.triton_repo import TritonModelConfig, TritonTensor, triton_data_type
from noisyseg.serve.batcher import BatcherStopped, BatchRecord, DynamicBatcher, QueueFull
from noisyseg.serve.http_bodies import BodyBudget, EncodedBodyResponse, read_body
from noisyseg.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from noisyseg.serve.metrics import ServerMetrics
from noisyseg.serve.protocol import (
    BINARY_EXTENSION,
    HEADER_LENGTH_HEADER,
    BadRequest,
    InferenceRequest,
    NotFound,
    RequestTimeout,
    ServeError,
    Unauthorized,
    Unavailable,
    decode_request,
    encode_response,
    error_body,
)
from noisyseg.serve.runtimes import Runtime, TensorSpec
from noisyseg.serve.settings import ServerSettings

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("noisyseg.serve.access")

SERVER_NAME = "noisyseg"
# Protocol extensions (Triton's names) both endpoints implement.
SERVER_EXTENSIONS = [BINARY_EXTENSION, "model_configuration", "statistics"]
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

# Bodies (and JSON text) above this size are decoded or printed off the event loop.
_INLINE_CODEC_BYTES = 64 * 1024
T = TypeVar("T")


class BackendFailure(ServeError):
    """The model failed on a request the server had accepted: the server's fault (500)."""

    status_code = 500


@dataclass
class ServedModel:
    runtime: Runtime
    batcher: DynamicBatcher


class ModelTable:
    """The served models by name, with the server's readiness."""

    def __init__(self, runtimes: Sequence[Runtime], settings: ServerSettings, metrics: ServerMetrics) -> None:
        names = [runtime.name for runtime in runtimes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        if not runtimes:
            raise ValueError("no models to serve")
        self.settings = settings
        self.metrics = metrics
        self.runtimes = list(runtimes)
        self.models: dict[str, ServedModel] = {}
        self.ready = False

    def start(self) -> None:
        """Create and start one batcher per model (inside the running event loop)."""
        for runtime in self.runtimes:
            self.models[runtime.name] = ServedModel(runtime, self._batcher_for(runtime))
            self.models[runtime.name].batcher.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await asyncio.gather(*(model.batcher.stop() for model in self.models.values()))

    def _batcher_for(self, runtime: Runtime) -> DynamicBatcher:
        name = runtime.name

        def record_batch(record: BatchRecord) -> None:
            self.metrics.batch_size.observe(record.images, name)

        def record_queue(images: int) -> None:
            self.metrics.queued_images.set(name, value=images)

        return DynamicBatcher(
            runtime.infer,
            max_batch_size=self.max_batch_size(runtime),
            max_delay_s=self.max_queue_delay_s(runtime),
            max_queued_images=self.settings.max_queued_images,
            name=name,
            on_batch=record_batch,
            on_queue_change=record_queue,
        )

    def max_batch_size(self, runtime: Runtime) -> int:
        """The server's maximum, lowered to the model's own where it has one."""
        return min(self.settings.max_batch_size, runtime.max_batch_size or self.settings.max_batch_size)

    def max_queue_delay_s(self, runtime: Runtime) -> float:
        """The model's own batching delay (from its repository config) or the server's."""
        if runtime.max_queue_delay_ms is not None:
            return runtime.max_queue_delay_ms / 1000.0
        return self.settings.max_queue_delay_s

    def runtime(self, name: str, version: str | None = None) -> Runtime:
        """The runtime for `name` (and `version`, when given) or NotFound."""
        runtime = next((item for item in self.runtimes if item.name == name), None)
        if runtime is None:
            known = ", ".join(sorted(item.name for item in self.runtimes))
            raise NotFound(f"unknown model '{name}' (served models: {known})")
        if version is not None and version != runtime.version:
            raise NotFound(f"model '{name}' has no version '{version}' (served version: {runtime.version})")
        return runtime

    def served(self, name: str, version: str | None = None) -> ServedModel:
        """The running model, or NotFound / Unavailable (not started or shutting down)."""
        runtime = self.runtime(name, version)
        if not self.ready or name not in self.models:
            raise Unavailable(f"model '{runtime.name}' is not ready (server starting or shutting down)")
        return self.models[name]

    def model_config(self, name: str, version: str | None = None) -> TritonModelConfig:
        """The model's Triton configuration as served: the fields `export triton-repo` writes, with
        the batching this server applies and every output it offers."""
        runtime = self.runtime(name, version)
        return TritonModelConfig(
            runtime.name, runtime.platform, self.max_batch_size(runtime),
            [_triton_tensor(runtime.input_spec())], [_triton_tensor(spec) for spec in runtime.output_specs()],
            runtime.model_metadata, round(self.max_queue_delay_s(runtime) * 1e6),
        )

    def statistics(self, name: str | None = None, version: str | None = None) -> dict[str, Any]:
        """Triton's statistics response for one model, or for every model when `name` is None."""
        names = [self.runtime(name, version).name] if name else [runtime.name for runtime in self.runtimes]
        return {"model_stats": [
            self.served(item).batcher.statistics.to_json(item, self.models[item].runtime.version) for item in names
        ]}


def _triton_tensor(spec: TensorSpec) -> TritonTensor:
    """A served tensor as the model configuration describes it (without the batch dimension)."""
    return TritonTensor(spec.name, triton_data_type(spec.datatype), list(spec.shape[1:]))


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
        title="noisyseg inference server", version=__version__, lifespan=lifespan,
        docs_url=None, redoc_url=None, openapi_url="/openapi.json" if settings.openapi else None,
    )
    app.state.models = table
    app.state.bodies = BodyBudget(settings.max_held_body_bytes)
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
    request: Request, table: ModelTable, settings: ServerSettings, metrics: ServerMetrics, name: str, version: str | None
) -> Response:
    started = time.perf_counter()
    runtime = table.runtime(name, version)
    try:
        model = table.served(name, version)
        with request.app.state.bodies.share() as take:
            body = await read_body(request, settings, take)
            decoded = await _off_loop_if_large(len(body), decode_request, body, request.headers.get(HEADER_LENGTH_HEADER))
            outputs, results = await run_inference(table, model, decoded)
        encoded = [(out, results[out], decoded.wants_binary(out)) for out in outputs]
        # About 4 bytes of JSON text per number, at the least.
        json_size = 4 * sum(array.size for _, array, binary in encoded if not binary)
        response = await _off_loop_if_large(
            json_size, encode_response, runtime.name, runtime.version, decoded.id, encoded, settings.max_response_bytes
        )
    except ServeError:
        metrics.inference_requests.inc(runtime.name, "error")
        raise
    metrics.inference_requests.inc(runtime.name, "success")
    metrics.inference_latency.observe(time.perf_counter() - started, runtime.name)
    return EncodedBodyResponse(response)


async def run_inference(
    table: ModelTable, model: ServedModel, request: InferenceRequest, deadline_s: float = math.inf
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Check a decoded request against its model, batch it and wait for the output names and arrays
    (HTTP and gRPC alike); `deadline_s` is the transport's own limit, if any."""
    images, outputs = _validate_for_model(request, model.runtime, table.max_batch_size(model.runtime))
    timeout = min(table.settings.request_timeout_s, request.timeout_s() or math.inf, deadline_s)
    return outputs, await _submit(model.batcher, images, outputs, timeout)


async def _off_loop_if_large(size: int, function: Callable[..., T], *args: Any) -> T:
    """Run `function` in a worker thread when `size` (bytes of body or JSON text) is large.

    Parsing, checking or printing a big tensor takes milliseconds and would stall every other
    request on the event loop; small payloads are cheaper than the thread hop.
    """
    if size > _INLINE_CODEC_BYTES:
        return await anyio.to_thread.run_sync(function, *args)
    return function(*args)


async def _submit(batcher: DynamicBatcher, images: np.ndarray, outputs: list[str], timeout: float) -> dict[str, np.ndarray]:
    try:
        return await asyncio.wait_for(batcher.submit(images, outputs), timeout=timeout)
    except TimeoutError:
        raise RequestTimeout(f"model '{batcher.name}' did not answer within {timeout:g} s") from None
    except (QueueFull, BatcherStopped) as err:
        raise Unavailable(str(err)) from None
    except ServeError:
        raise
    except Exception as err:  # the backend failed on input the server accepted: a server fault
        logger.exception("model %s: inference failed", batcher.name)
        raise BackendFailure(f"model '{batcher.name}' failed to run the batch ({type(err).__name__}: {err})") from None


def _validate_for_model(request: InferenceRequest, runtime: Runtime, max_batch: int) -> tuple[np.ndarray, list[str]]:
    """The image batch and the output names to return, or BadRequest saying what is wrong."""
    names = [tensor.name for tensor in request.inputs]
    if names != [runtime.input_name]:
        raise BadRequest(
            f"model '{runtime.name}' takes exactly one input named '{runtime.input_name}', got {names}"
        )
    tensor = request.inputs[0]
    spec = runtime.input_spec()
    where = f"input '{tensor.name}'"
    if tensor.datatype != spec.datatype:
        raise BadRequest(f"{where}: datatype must be {spec.datatype}, got {tensor.datatype}")
    _check_shape(where, tensor.shape, spec.shape, runtime.min_spatial_size, max_batch)
    try:
        runtime.check_input_shape(tensor.shape)
    except ValueError as err:
        raise BadRequest(str(err)) from None
    offered = runtime.output_names
    wanted = [item.name for item in request.outputs] if request.outputs is not None else list(offered)
    unknown = [out for out in wanted if out not in offered]
    if unknown:
        raise BadRequest(
            f"model '{runtime.name}' cannot produce outputs {unknown}; available outputs: {', '.join(offered)}"
        )
    if len(set(wanted)) != len(wanted):
        raise BadRequest(f"outputs requested more than once: {wanted}")
    images = tensor.array if tensor.array.flags.writeable else tensor.array.copy()
    return images, wanted


def _check_shape(where: str, shape: tuple[int, ...], expected: tuple[int, ...], min_size: int, max_batch: int) -> None:
    described = f"expected [N, C, H, W] matching {list(expected)}, got {list(shape)}"
    if len(shape) != len(expected):
        raise BadRequest(f"{where}: shape must have {len(expected)} dimensions; {described}")
    for axis, (want, got) in enumerate(zip(expected, shape, strict=True)):
        if want != -1 and want != got:
            raise BadRequest(f"{where}: dimension {axis} must be {want}; {described}")
    batch, _, height, width = shape
    if not 1 <= batch <= max_batch:
        raise BadRequest(f"{where}: batch dimension must be between 1 and the maximum batch size {max_batch}, got {batch}")
    if height < min_size or width < min_size:
        raise BadRequest(f"{where}: height and width must be at least {min_size} pixels (the model's stride), got {height}x{width}")


def _route_label(path: str) -> str:
    return next((label for pattern, label in _ROUTE_PATTERNS if pattern.match(path)), "other")


def presented_key(headers: dict[bytes, bytes]) -> bytes | None:
    """The API key a request carries ('Authorization: Bearer KEY' or 'X-API-Key: KEY'), if any."""
    authorization = headers.get(b"authorization")
    if authorization is not None and authorization[:7].lower() == b"bearer ":
        return authorization[7:].strip()
    return headers.get(b"x-api-key")


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
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"www-authenticate", b"Bearer")]
        await send({"type": "http.response.start", "status": Unauthorized.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = _route_label(scope["path"])
        self.metrics.http_requests.inc(route, str(status))
        if not access_logger.isEnabledFor(logging.INFO):
            return
        client = scope.get("client")
        access_logger.info(json.dumps({
            "event": "http_request",
            "method": scope["method"],
            "path": scope["path"],
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000.0, 3),
            "client": f"{client[0]}:{client[1]}" if client else None,
        }))
