"""The gRPC endpoint: `inference.GRPCInferenceService` (KServe v2 / Triton) over the HTTP app's models.

It runs on the HTTP server's event loop and serves the same `ModelTable`: the same runtimes and
dynamic batchers (one batch may hold requests from both protocols, and both count in the
statistics), the same request checks (tensors are decoded by `protocol.decode_input`), the same
limits (inference budget, response size, messages held at once), the same API key (metadata
`authorization: Bearer KEY` or `x-api-key: KEY`; ServerLive and ServerReady need none, as the
HTTP health routes) and the same metrics.

Inputs come as `raw_input_contents` (what tritonclient.grpc sends) or as typed `contents`;
outputs always go back as `raw_output_contents`. Errors carry the status code of the HTTP
status the same failure gets (`GRPC_CODES`).

Messages reach the methods as bytes: the server parses and serialises them itself, in a worker
thread when they are large (as HTTP bodies are), so a 2048 x 2048 request keeps the event loop
free, and a message that does not parse is INVALID_ARGUMENT rather than gRPC's UNKNOWN.
"""

from __future__ import annotations

import ctypes
import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from noisyseg import __version__
from noisyseg.serve.core import (
    SERVER_EXTENSIONS,
    SERVER_NAME,
    ModelTable,
    input_bytes_outside,
    off_loop_if_large,
    presented_key,
    run_inference,
)
from noisyseg.serve.errors import BadRequest, PayloadTooLarge, ServeError, quoted
from noisyseg.serve.metrics import ServerMetrics
from noisyseg.serve.proto import inference_pb2 as pb
from noisyseg.serve.protocol import (
    DATATYPES,
    InferenceRequest,
    PlannedOutput,
    RequestedOutput,
    datatype_of,
    decode_input,
    response_too_large,
)
from noisyseg.serve.settings import ServerSettings

logger = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
# Method name -> its request message class, from the service's descriptor.
REQUEST_TYPES: dict[str, type[Message]] = {
    method.name: getattr(pb, method.input_type.name)
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
}
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
# Datatype -> the InferTensorContents field that carries it and how its packed wire values read:
# a little-endian float type, or the type protobuf's varints turn into (FP16 has no field: raw
# bytes only).
CONTENTS_FIELDS = {
    "BOOL": ("bool_contents", "varint", np.dtype(np.bool_)),
    "INT8": ("int_contents", "varint", np.dtype(np.int64)),
    "INT16": ("int_contents", "varint", np.dtype(np.int64)),
    "INT32": ("int_contents", "varint", np.dtype(np.int64)),
    "INT64": ("int64_contents", "varint", np.dtype(np.int64)),
    "UINT8": ("uint_contents", "varint", np.dtype(np.int64)),
    "UINT16": ("uint_contents", "varint", np.dtype(np.int64)),
    "UINT32": ("uint_contents", "varint", np.dtype(np.int64)),
    "UINT64": ("uint64_contents", "varint", np.dtype(np.uint64)),
    "FP32": ("fp32_contents", "fixed", np.dtype("<f4")),
    "FP64": ("fp64_contents", "fixed", np.dtype("<f8")),
}
# ModelInferResponse.raw_output_contents: its wire tag (field number, length-delimited).
_RAW_OUTPUT_FIELD = pb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number
UNAUTHORIZED_MESSAGE = "missing or wrong API key (send metadata 'authorization: Bearer <key>' or 'x-api-key: <key>')"


class UnparsableMessage(BadRequest):
    """A request message that is not the protobuf message its method takes."""


def decode_infer_request(request: pb.ModelInferRequest) -> InferenceRequest:
    """The protocol's request object for a ModelInferRequest, checked as HTTP requests are."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} inputs; give one per input"
        )
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


def _contents_values(tensor: pb.ModelInferRequest.InferInputTensor) -> np.ndarray:
    """A tensor's typed `contents` as an array, read from their wire form: protobuf writes a
    repeated number field packed (one length-delimited run of little-endian floats or varints),
    which numpy reads whole. Going through Python numbers instead takes seconds for a 2048 x 2048
    image and holds the GIL, and so the event loop, meanwhile."""
    entry = CONTENTS_FIELDS.get(tensor.datatype)
    if entry is None:
        raise BadRequest(
            f"input {quoted(tensor.name)}: datatype {quoted(tensor.datatype)} must be sent in raw_input_contents"
        )
    field, encoding, dtype = entry
    others = [described.name for described, _ in tensor.contents.ListFields() if described.name != field]
    if others:
        raise BadRequest(
            f"input {quoted(tensor.name)}: a {tensor.datatype} tensor's contents go in {field}, not {', '.join(others)}"
        )
    wire = np.frombuffer(tensor.contents.SerializeToString(), np.uint8)
    if not wire.size:
        return np.zeros(0, dtype)
    # The field's tag, then its byte length: both varints.
    length_end = int(np.flatnonzero(wire[1:11] < 0x80)[0]) + 1  # tags of fields 1-15 take one byte
    payload = wire[length_end + 1 :]
    if encoding == "fixed":
        return payload.view(dtype)
    values = _varints(payload)
    # int32 and int64 values are their 64-bit two's complement (negative ones take ten bytes).
    return values if dtype == np.uint64 else values.view(np.int64).astype(dtype, copy=False)


def _varints(data: np.ndarray) -> np.ndarray:
    """Packed protobuf varints (bytes as uint8) as uint64 values: 7 bits a byte, low bits first,
    the high bit set on every byte but a value's last."""
    ends = np.flatnonzero(data < 0x80)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    values = np.zeros(ends.size, np.uint64)
    for byte in range(int(lengths.max(initial=0))):
        has = lengths > byte
        values[has] |= (data[starts[has] + byte] & 0x7F).astype(np.uint64) << np.uint64(7 * byte)
    return values


def _parameter_value(parameter: pb.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice is not None else None


def _varint(value: int) -> bytes:
    """`value` as a protobuf base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_RAW_OUTPUT_TAG = _varint(_RAW_OUTPUT_FIELD << 3 | 2)


def _response_skeleton(
    request_id: str, name: str, version: str, outputs: list[tuple[str, str, tuple[int, ...]]]
) -> pb.ModelInferResponse:
    """The response without its raw output bytes, which `encode_infer_response` appends."""
    response = pb.ModelInferResponse(model_name=name, model_version=version, id=request_id)
    for output, datatype, shape in outputs:
        response.outputs.add(name=output, datatype=datatype, shape=shape)
    return response


def _raw_entry_bytes(size: int) -> int:
    return len(_RAW_OUTPUT_TAG) + len(_varint(size)) + size


def infer_response_bytes(request_id: str, name: str, version: str, planned: list[PlannedOutput]) -> int | None:
    """The exact size of the ModelInferResponse for `planned` outputs (None: a shape not known)."""
    if not all(output.known for output in planned):
        return None
    skeleton = _response_skeleton(
        request_id, name, version, [(output.name, output.datatype, output.shape) for output in planned]
    )
    return skeleton.ByteSize() + sum(_raw_entry_bytes(output.nbytes) for output in planned)


def encode_infer_response(request_id: str, name: str, version: str, results: list[tuple[str, np.ndarray]]) -> bytes:
    """The serialised ModelInferResponse: the skeleton's bytes, then one raw_output_contents entry
    per output straight from its array (protobuf readers take fields in any order), so the
    tensors are copied once, not into a message and again out of it."""
    arrays = [np.ascontiguousarray(array, dtype=DATATYPES[datatype_of(array.dtype)]) for _, array in results]
    skeleton = _response_skeleton(
        request_id,
        name,
        version,
        [(output, datatype_of(array.dtype), array.shape) for (output, _), array in zip(results, arrays, strict=True)],
    )
    pieces: list[bytes | np.ndarray] = [skeleton.SerializeToString()]
    for array in arrays:
        pieces += [_RAW_OUTPUT_TAG + _varint(array.nbytes), array]
    return _joined_without_the_gil(pieces)


def _joined_without_the_gil(pieces: list[bytes | np.ndarray]) -> bytes:
    """`pieces` one after another in one new bytes object, copied while other threads run.

    gRPC sends only bytes. `b"".join` holds the GIL for the whole copy (about 100 ms for the
    128 MiB of a 2048 x 2048 image's outputs here), stalling the event loop as long;
    `ctypes.memmove` releases it. The object is filled as C code fills a new bytes object,
    before anything else holds it; `bytes(n)` zeroes it with calloc, whose pages come lazily.
    """
    total = sum(len(piece) if isinstance(piece, bytes) else piece.nbytes for piece in pieces)
    joined = bytes(total)
    address = ctypes.cast(ctypes.c_char_p(joined), ctypes.c_void_p).value or 0
    offset = 0
    for piece in pieces:
        source = np.frombuffer(piece, np.uint8) if isinstance(piece, bytes) else piece
        ctypes.memmove(address + offset, source.ctypes.data, source.nbytes)
        offset += source.nbytes
    return joined


class InferenceServicer:
    """The service's methods over a started `ModelTable`; `handlers()` registers them with gRPC."""

    def __init__(self, table: ModelTable, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.table = table
        self.settings = settings
        self.metrics = metrics

    def handlers(self) -> grpc.GenericRpcHandler:
        """Every method as a unary handler on raw bytes (parsed and serialised by `_call`)."""

        def handler(method: str) -> grpc.RpcMethodHandler:
            async def behaviour(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
                return await self._call(method, raw, context)

            return grpc.unary_unary_rpc_method_handler(behaviour)

        return grpc.method_handlers_generic_handler(SERVICE, {method: handler(method) for method in REQUEST_TYPES})

    async def _call(self, method: str, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if method == "ModelInfer":
            return await self.ModelInfer(raw, context)
        try:
            request = await self._parse(method, raw)
            response = getattr(self, method)(request)
        except ServeError as err:
            return self._refuse(method, context, err)
        self.metrics.grpc_requests.inc(method, grpc.StatusCode.OK.name)
        return response.SerializeToString()

    async def _parse(self, method: str, raw: bytes) -> Any:
        """`raw` as the method's request message, or UnparsableMessage."""
        message_type = REQUEST_TYPES[method]
        try:
            return await off_loop_if_large(len(raw), message_type.FromString, raw)
        except DecodeError:
            raise UnparsableMessage(
                f"the {message_type.DESCRIPTOR.full_name} message ({len(raw)} bytes) could not be parsed"
            ) from None

    def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.table.ready)

    def ModelReady(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        try:
            self.table.served(request.name, request.version or None)
        except ServeError:  # unknown, other version, or not started: not ready
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    def ServerMetadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=SERVER_EXTENSIONS)

    def ModelMetadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        described = self.table.runtime(request.name, request.version or None).metadata()
        # The HTTP form has `parameters`, which the gRPC message has not.
        return json_format.ParseDict(described, pb.ModelMetadataResponse(), ignore_unknown_fields=True)

    def ModelConfig(self, request: pb.ModelConfigRequest) -> pb.ModelConfigResponse:
        served = self.table.model_config(request.name, request.version or None).to_json()
        return pb.ModelConfigResponse(config=json_format.ParseDict(served, pb.ModelConfig()))

    def ModelStatistics(self, request: pb.ModelStatisticsRequest) -> pb.ModelStatisticsResponse:
        counted = self.table.statistics(request.name or None, request.version or None)
        return json_format.ParseDict(counted, pb.ModelStatisticsResponse())

    async def ModelInfer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started = time.perf_counter()
        name = None
        try:
            # The message, the tensors decoded from it and the answer are held until the answer is
            # made, as an HTTP body is: they count against --max-held-body-mb.
            with self.table.bodies.share() as take:
                take(len(raw))
                request = await self._parse("ModelInfer", raw)
                name, request_id = request.model_name, request.id
                model = self.table.served(name, request.model_version or None)
                runtime = model.runtime
                remaining = context.time_remaining()
                deadline = remaining if remaining is not None else math.inf
                decoded = await off_loop_if_large(len(raw), decode_infer_request, request)
                del request  # its parsed copy of the tensors: the decoded ones are copies of their own
                take(input_bytes_outside(decoded, raw))

                def check_response(planned: list[PlannedOutput]) -> int | None:
                    size = infer_response_bytes(request_id, runtime.name, runtime.version, planned)
                    self._check_response_size(runtime.name, size)
                    return size

                outputs, results = await run_inference(self.table, model, decoded, check_response, take, deadline)
                answer = [(output, results[output]) for output in outputs]
                response = await off_loop_if_large(
                    sum(array.nbytes for _, array in answer),
                    encode_infer_response,
                    request_id,
                    runtime.name,
                    runtime.version,
                    answer,
                )
                # Known in advance unless the model does not say how many classes it has.
                self._check_response_size(runtime.name, len(response))
        except ServeError as err:
            if name in self.table.models:
                self.metrics.inference_requests.inc(name, "error")
            return self._refuse("ModelInfer", context, err)
        self.metrics.inference_requests.inc(name, "success")
        self.metrics.inference_latency.observe(time.perf_counter() - started, name)
        self.metrics.grpc_requests.inc("ModelInfer", grpc.StatusCode.OK.name)
        return response

    def _check_response_size(self, model_name: str, size: int | None) -> None:
        """Refuse an answer over `--max-response-mb` (INVALID_ARGUMENT, as HTTP's 400) or over the
        gRPC message limit `--grpc-max-send-mb` (RESOURCE_EXHAUSTED, what gRPC itself would say)."""
        if size is None:
            return
        if size > self.settings.max_response_bytes:
            raise response_too_large(model_name, self.settings.max_response_bytes, size, json=False)
        if size > self.settings.grpc_max_send_bytes:
            raise PayloadTooLarge(
                f"response of model {quoted(model_name)} would take {size} bytes, over the gRPC message limit of "
                f"{self.settings.grpc_max_send_bytes} bytes (--grpc-max-send-mb); request only the 'labels' output "
                "(the smallest), or fewer or smaller images"
            )

    def _refuse(self, method: str, context: grpc.aio.ServicerContext, err: ServeError) -> bytes:
        """End the call with `err`'s status code and message, in one log line (a warning for a
        message that does not parse). The status is set rather than raised with `context.abort`:
        the raised error and the handler's frames held each other in a reference cycle, keeping
        each refused request's tensors until the next garbage collection."""
        code = GRPC_CODES.get(err.status_code, grpc.StatusCode.INTERNAL)
        self.metrics.grpc_requests.inc(method, code.name)
        level = logging.WARNING if isinstance(err, UnparsableMessage) else logging.INFO
        logger.log(level, "gRPC %s: %s: %s", method, code.name, err)
        # Retry-After (a full queue, too many messages held) as trailing metadata: gRPC has no header for it.
        context.set_trailing_metadata(tuple((name.lower(), value) for name, value in err.headers.items()))
        context.set_code(code)
        context.set_details(str(err))
        return b""


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
            str(key).lower().encode(): value if isinstance(value, bytes) else str(value).encode()
            for key, value in metadata
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
    server.add_generic_rpc_handlers((InferenceServicer(table, settings, metrics).handlers(),))
    address = f"{settings.host}:{settings.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpc's own message names no cause and no way out
        raise OSError(
            f"gRPC endpoint: cannot listen on {address} (port in use? choose --grpc-port, or --no-grpc)"
        ) from None
    await server.start()
    logger.info("gRPC listening on %s:%d", settings.host, port)
    return server
