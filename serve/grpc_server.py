"""The gRPC endpoint: `inference.GRPCInferenceService` (KServe v2 / Triton) over the HTTP app's models.

It runs on the HTTP server's event loop and serves the same `ModelTable`: the same runtimes and
dynamic batchers (one batch may hold requests from both protocols, and both count in the
statistics), the same request checks (tensors are decoded by `protocol.decode_input`), the same
API key (metadata `authorization: Bearer KEY` or `x-api-key: KEY`; ServerLive and ServerReady
need none, as the HTTP health routes) and the same metrics.

Inputs come as `raw_input_contents` (what tritonclient.grpc sends) or as typed `contents`;
outputs always go back as `raw_output_contents`. Errors carry the status code of the HTTP
status the same failure gets (`GRPC_CODES`).
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from noisyseg import __version__
from noisyseg.serve.core import (
    SERVER_EXTENSIONS,
    SERVER_NAME,
    ModelTable,
    presented_key,
    run_inference,
)
from noisyseg.serve.metrics import ServerMetrics
from noisyseg.serve.proto import inference_pb2 as pb
from noisyseg.serve.proto import inference_pb2_grpc as pb_grpc
from noisyseg.serve.protocol import (
    DATATYPES,
    BadRequest,
    InferenceRequest,
    RequestedOutput,
    ServeError,
    datatype_of,
    decode_input,
)
from noisyseg.serve.settings import ServerSettings

logger = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
UNAUTHENTICATED_METHODS = frozenset({f"/{SERVICE}/ServerLive", f"/{SERVICE}/ServerReady"})
# HTTP status of a ServeError -> gRPC status code.
GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# Datatype -> the InferTensorContents field that carries it (FP16 has none: raw bytes only).
CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
UNAUTHORIZED_MESSAGE = "missing or wrong API key (send metadata 'authorization: Bearer <key>' or 'x-api-key: <key>')"
ResponseT = TypeVar("ResponseT", bound=Message)


def decode_infer_request(request: pb.ModelInferRequest) -> InferenceRequest:
    """The protocol's request object for a ModelInferRequest, checked as HTTP requests are."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} inputs; give one per input")
    inputs = []
    for index, tensor in enumerate(request.inputs):
        header: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if raw:
            header["parameters"] = {"binary_data_size": len(raw[index])}
            inputs.append(decode_input(header, index, raw[index]))
        else:
            header["data"] = _contents_values(tensor)
            inputs.append(decode_input(header, index))
    return InferenceRequest(
        inputs=inputs,
        outputs=[RequestedOutput(output.name, binary=True) for output in request.outputs] or None,
        id=request.id or None,
        parameters={key: _parameter_value(value) for key, value in request.parameters.items()},
    )


def _contents_values(tensor: pb.ModelInferRequest.InferInputTensor) -> list[Any]:
    field = CONTENTS_FIELDS.get(tensor.datatype)
    if field is None:
        raise BadRequest(f"input '{tensor.name}': datatype {tensor.datatype!r} must be sent in raw_input_contents")
    return list(getattr(tensor.contents, field))


def _parameter_value(parameter: pb.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice is not None else None


def encode_infer_response(
    request: pb.ModelInferRequest, name: str, version: str, results: list[tuple[str, np.ndarray]]
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=name, model_version=version, id=request.id)
    for output, array in results:
        datatype = datatype_of(array.dtype)
        response.outputs.add(name=output, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes())
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The service's methods over a started `ModelTable`."""

    def __init__(self, table: ModelTable, metrics: ServerMetrics) -> None:
        self.table = table
        self.metrics = metrics

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return await self._answer("ServerLive", context, lambda: pb.ServerLiveResponse(live=True))

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return await self._answer("ServerReady", context, lambda: pb.ServerReadyResponse(ready=self.table.ready))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        def ready() -> pb.ModelReadyResponse:
            try:
                self.table.served(request.name, request.version or None)
            except ServeError:  # unknown, other version, or not started: not ready
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)

        return await self._answer("ModelReady", context, ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return await self._answer("ServerMetadata", context, lambda: pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=SERVER_EXTENSIONS))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        def metadata() -> pb.ModelMetadataResponse:
            described = self.table.runtime(request.name, request.version or None).metadata()
            # The HTTP form has `parameters`, which the gRPC message has not.
            return json_format.ParseDict(described, pb.ModelMetadataResponse(), ignore_unknown_fields=True)

        return await self._answer("ModelMetadata", context, metadata)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        def config() -> pb.ModelConfigResponse:
            served = self.table.model_config(request.name, request.version or None).to_json()
            return pb.ModelConfigResponse(config=json_format.ParseDict(served, pb.ModelConfig()))

        return await self._answer("ModelConfig", context, config)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext) -> pb.ModelStatisticsResponse:
        def statistics() -> pb.ModelStatisticsResponse:
            counted = self.table.statistics(request.name or None, request.version or None)
            return json_format.ParseDict(counted, pb.ModelStatisticsResponse())

        return await self._answer("ModelStatistics", context, statistics)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        started = time.perf_counter()
        name = request.model_name
        try:
            model = self.table.served(name, request.model_version or None)
            remaining = context.time_remaining()
            deadline = remaining if remaining is not None else math.inf
            outputs, results = await run_inference(self.table, model, decode_infer_request(request), deadline)
            response = encode_infer_response(
                request, model.runtime.name, model.runtime.version, [(output, results[output]) for output in outputs]
            )
        except ServeError as err:
            if name in self.table.models:
                self.metrics.inference_requests.inc(name, "error")
            await self._abort("ModelInfer", context, err)
        self.metrics.inference_requests.inc(name, "success")
        self.metrics.inference_latency.observe(time.perf_counter() - started, name)
        self.metrics.grpc_requests.inc("ModelInfer", grpc.StatusCode.OK.name)
        return response

    async def _answer(self, method: str, context: grpc.aio.ServicerContext, build: Callable[[], ResponseT]) -> ResponseT:
        try:
            response = build()
        except ServeError as err:
            await self._abort(method, context, err)
        self.metrics.grpc_requests.inc(method, grpc.StatusCode.OK.name)
        return response

    async def _abort(self, method: str, context: grpc.aio.ServicerContext, err: ServeError) -> None:
        code = GRPC_CODES.get(err.status_code, grpc.StatusCode.INTERNAL)
        self.metrics.grpc_requests.inc(method, code.name)
        await context.abort(code, str(err))  # raises: the call ends here


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without the server's API key (compared in constant time), except health checks."""

    def __init__(self, key: str, metrics: ServerMetrics) -> None:
        self.key = key.encode()
        self.metrics = metrics

        async def reject(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHORIZED_MESSAGE)

        self._reject = grpc.unary_unary_rpc_method_handler(reject)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method in UNAUTHENTICATED_METHODS or self._authorized(handler_call_details.invocation_metadata or ()):
            return await continuation(handler_call_details)
        self.metrics.grpc_requests.inc(method.rsplit("/", 1)[-1], grpc.StatusCode.UNAUTHENTICATED.name)
        return self._reject

    def _authorized(self, metadata: Any) -> bool:
        headers = {
            str(key).lower().encode(): value if isinstance(value, bytes) else str(value).encode() for key, value in metadata
        }
        presented = presented_key(headers)
        return presented is not None and hmac.compare_digest(presented, self.key)


async def start_grpc_server(table: ModelTable, settings: ServerSettings, metrics: ServerMetrics) -> grpc.aio.Server:
    """Listen on `settings.host:settings.grpc_port` on the running event loop; returns the started server."""
    interceptors = [ApiKeyInterceptor(settings.api_key, metrics)] if settings.api_key is not None else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.grpc_max_receive_bytes),
            ("grpc.max_send_message_length", settings.grpc_max_send_bytes),
        ],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(table, metrics), server)
    address = f"{settings.host}:{settings.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpc's own message names no cause and no way out
        raise OSError(f"gRPC endpoint: cannot listen on {address} (port in use? choose --grpc-port, or --no-grpc)") from None
    await server.start()
    logger.info("gRPC listening on %s:%d", settings.host, port)
    return server
