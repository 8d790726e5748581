"""Open Inference Protocol (KServe v2) codec: inference requests in, responses out.

Pure functions over bytes and numpy arrays, with no web framework and no model: the app decides
what a model accepts, this module only decodes what the client sent and encodes the answer.

Both tensor encodings of the protocol are handled:
- JSON: `{"inputs": [{"name", "shape", "datatype", "data"}], "outputs": [...]}` with `data` a
  flat or nested list in row-major order;
- the binary tensor data extension: the body is the JSON header (its length in the
  `Inference-Header-Content-Length` HTTP header) followed by raw little-endian tensors, each
  announced by `parameters.binary_data_size` in the header, in input order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from noisyseg.serve.errors import BadRequest, ServeError, quoted
from noisyseg.serve.json_body import STEPPED_PARSE_BYTES, parse_in_steps, parse_json_object

HEADER_LENGTH_HEADER = "Inference-Header-Content-Length"
BINARY_EXTENSION = "binary_tensor_data"

# Protocol datatype -> little-endian numpy dtype. BYTES (length-prefixed strings) and BF16 (no
# numpy type) exist in the protocol but no segmentation model takes them.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# numpy dtype kinds a JSON list may hold for each datatype family (JSON has no unsigned or
# sized numbers, so integers are accepted for floats but not the reverse).
_JSON_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}
# numpy holds an array's element count in a signed 64-bit integer.
_MAX_ELEMENTS = 2**63 - 1
# Elements printed per step of a JSON response: each step is one C call that holds the GIL, so
# steps this short (a few milliseconds) keep the event loop answering during a large response.
_JSON_STEP = 8192
# Binary response tensors go out in slices this size, so the transport buffers one slice, not a copy.
_SEND_SLICE_BYTES = 1 << 20
# Significant digits that let each float width round-trip exactly through decimal text.
_FLOAT_FORMATS = {2: "%.5g,", 4: "%.9g,", 8: "%.17g,"}
# The longest text one float prints as with `_FLOAT_FORMATS`, comma included: a sign, the digits,
# a point and an exponent ("-1.17549435e-38," for FP32).
_FLOAT_WIDTHS = {2: 12, 4: 16, 8: 25}


def datatype_of(dtype: np.dtype) -> str:
    """The protocol datatype name for a numpy dtype (byte order ignored)."""
    for name, candidate in DATATYPES.items():
        if candidate.kind == dtype.kind and candidate.itemsize == dtype.itemsize:
            return name
    raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")


@dataclass(frozen=True)
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferenceRequest:
    inputs: list[InputTensor]
    # None: the client named no outputs, so every output the model offers is returned.
    outputs: list[RequestedOutput] | None
    binary_outputs_by_default: bool = False
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    def wants_binary(self, output: str) -> bool:
        """Whether `output` goes back as raw bytes (per-output flag or the request-wide default)."""
        flags = {item.name: item.binary for item in self.outputs or []}
        return flags.get(output, False) or self.binary_outputs_by_default

    def timeout_s(self) -> float | None:
        """The client's own deadline (`parameters.timeout`, microseconds, as Triton reads it)."""
        value = self.parameters.get("timeout")
        if value is None:
            return None
        # At most Triton's uint64; a larger integer would not even convert to a float.
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 2**64:
            raise BadRequest(
                "request parameter 'timeout' must be a positive number of microseconds below 2**64, "
                f"got {quoted(value)}"
            )
        return float(value) / 1e6


@dataclass(frozen=True)
class PlannedOutput:
    """An output a request will get, known before inference from the input's shape and the model.

    `shape` holds -1 where the model does not say (its number of classes); `largest` bounds an
    integer output's values (labels: the last class index), None: the datatype's own range.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    binary: bool
    largest: int | None = None

    @property
    def known(self) -> bool:
        return all(dim >= 0 for dim in self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DATATYPES[self.datatype].itemsize

    def json_bytes_at_most(self) -> int:
        """The longest its numbers can print as JSON (`_json_numbers`): the widest number each."""
        dtype = DATATYPES[self.datatype]
        if dtype.kind == "f":
            width = _FLOAT_WIDTHS[dtype.itemsize]
        elif dtype.kind == "b":
            width = len("false,")
        else:
            info = np.iinfo(dtype)
            extremes = (0, self.largest) if self.largest is not None else (int(info.min), int(info.max))
            width = max(len(str(value)) for value in extremes) + 1
        return max(0, math.prod(self.shape) * width - 1)  # no comma after the last


@dataclass(frozen=True)
class EncodedResponse:
    """A response body as a sequence of byte chunks (JSON text, then binary tensors in slices)."""

    chunks: list[bytes | memoryview]
    headers: dict[str, str]

    @property
    def size(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)

    def body(self) -> bytes:
        return b"".join(self.chunks)


def parse_length(value: str, what: str) -> int:
    """A non-negative integer written in ASCII digits (`str.isdigit` also takes '²' and '٣')."""
    if not (value.isascii() and value.isdigit()):
        raise BadRequest(f"{what} must be a non-negative integer in ASCII digits, got {quoted(value)}")
    return int(value)


def check_shape(shape: Sequence[int], where: str) -> None:
    """A tensor shape numpy can hold: non-negative integer dimensions, element count in range."""
    if not all(type(dim) is int and dim >= 0 for dim in shape):
        raise BadRequest(f"{where}: 'shape' must be a list of non-negative integers, got {quoted(list(shape))}")
    # Zero-sized dimensions included: numpy rejects [0, 10**20] as it rejects [1, 10**20].
    if math.prod(max(dim, 1) for dim in shape) > _MAX_ELEMENTS:
        raise BadRequest(
            f"{where}: shape {quoted(list(shape))} has more elements than a tensor can hold (at most 2**63 - 1)"
        )


def check_finite(tensor: InputTensor) -> None:
    """Floating-point inputs must hold finite numbers: NaN or infinity would come back as NaN scores."""
    if tensor.array.dtype.kind != "f":
        return
    finite = np.isfinite(tensor.array)
    if finite.all():
        return
    index = int(np.argmin(finite.ravel()))
    value = tensor.array.ravel()[index]
    raise BadRequest(
        f"input '{tensor.name}': element {index} (row-major) is {value}; {tensor.datatype} inputs must be "
        f"finite numbers (no NaN or infinity, nothing beyond the {tensor.datatype} range)"
    )


def decode_request(body: bytes | bytearray, header_length: str | None) -> InferenceRequest:
    """Decode an infer request body; `header_length` is the binary extension's HTTP header.

    Every input is checked (`check_shape`, `check_finite`), so a decoded request holds only
    tensors a model can take.
    """
    json_end = _json_header_end(body, header_length)
    header_text = body if json_end == len(body) else body[:json_end]
    return _decode_header(header_text, memoryview(body)[json_end:], len(body) - json_end)


def decode_request_header(header_text: bytes | bytearray, binary_length: int) -> InferenceRequest:
    """What a binary request asks for, from its JSON header alone, while its `binary_length`
    bytes of tensors are still arriving: names, datatypes, shapes, outputs, id and parameters,
    checked as `decode_request` checks them. Binary inputs hold a zero placeholder (a broadcast
    view, no memory), so the server can plan and refuse the answer before reading the body."""
    return _decode_header(header_text, None, binary_length)


def _decode_header(header_text: bytes | bytearray, binary: memoryview | None, binary_length: int) -> InferenceRequest:
    stepped = parse_in_steps(header_text) if len(header_text) > STEPPED_PARSE_BYTES else None
    header = stepped if stepped is not None else parse_json_object(header_text)
    inputs_json = header.get("inputs")
    if not isinstance(inputs_json, list) or not inputs_json:
        raise BadRequest("request field 'inputs' must be a non-empty list of tensors")
    inputs: list[InputTensor] = []
    offset = 0
    for index, tensor_json in enumerate(inputs_json):
        rest = binary[offset:] if binary is not None else None
        tensor, used = _decode_input(tensor_json, index, rest, binary_length - offset)
        if rest is not None or used == 0:  # a placeholder is zeros
            check_finite(tensor)
        inputs.append(tensor)
        offset += used
    if offset != binary_length:
        raise BadRequest(
            f"request body has {binary_length - offset} bytes after the JSON header that no input's "
            f"'binary_data_size' accounts for ({binary_length} binary bytes, {offset} announced)"
        )
    parameters = _optional_object(header, "parameters", "request")
    request = InferenceRequest(
        inputs=inputs,
        outputs=_decode_requested_outputs(header.get("outputs")),
        binary_outputs_by_default=_flag(parameters, "binary_data_output", "request parameter"),
        id=_optional_id(header.get("id")),
        parameters=parameters,
    )
    request.timeout_s()  # a bad deadline is refused before any work
    return request


def decode_input(tensor: Mapping[str, Any], index: int, binary: bytes = b"") -> InputTensor:
    """One input tensor in the JSON header's form, with `binary` its raw bytes if it announces any.

    Other encodings of the protocol (gRPC) describe their tensors this way, so they are checked
    by the very code that checks HTTP requests.
    """
    decoded, used = _decode_input(tensor, index, memoryview(binary), len(binary))
    if used != len(binary):
        raise BadRequest(f"input {quoted(decoded.name)}: {len(binary)} raw bytes given, {used} expected")
    check_finite(decoded)
    return decoded


def response_too_large(model_name: str, limit: int, size: int | None = None, json: bool = True) -> BadRequest:
    """The 400 for an answer over `limit` bytes (`size`: what it would take, when known); `json`:
    the protocol can send outputs as JSON, so binary data is a way out."""
    would = f" (up to {size} bytes)" if size is not None else ""
    binary = "binary data (parameters.binary_data_output = true), or " if json else ""
    return BadRequest(
        f"response of model {quoted(model_name)}{would} exceeds the limit of {limit} bytes; request only the "
        f"'labels' output (the smallest), or {binary}fewer or smaller images (or raise --max-response-mb)"
    )


def response_bytes_at_most(
    model_name: str, model_version: str, request_id: str | None, outputs: Sequence[PlannedOutput]
) -> int | None:
    """The most bytes `encode_response` can write for `outputs`, before any is computed: exact
    for binary tensors and every header, the widest number for JSON data. None when an output's
    shape is not known in advance."""
    if not all(output.known for output in outputs):
        return None
    size = len(_response_head(model_name, model_version, request_id)) + len(b"]}")
    for index, output in enumerate(outputs):
        size += bool(index)  # the comma between tensors
        if output.binary:
            size += len(_tensor_head(output.name, output.datatype, output.shape, output.nbytes)) + output.nbytes
        else:
            size += (
                len(_tensor_head(output.name, output.datatype, output.shape)) + output.json_bytes_at_most() + len(b"]}")
            )
    return size


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Sequence[tuple[str, np.ndarray, bool]],
    max_bytes: int | None = None,
) -> EncodedResponse:
    """Encode `(name, array, binary)` outputs, refusing (BadRequest) a body over `max_bytes`.

    Binary tensors are sent straight from the arrays; JSON tensors are printed from NumPy in
    short steps (`_json_numbers`), without a Python list of the whole tensor. The size is
    checked as the text grows, so an oversized answer stops at the limit: the guard for what
    `response_bytes_at_most` cannot bound before inference (a model that does not say how many
    classes it has, or labels outside its classes).
    """
    limit = math.inf if max_bytes is None else max_bytes
    size = sum(array.nbytes for _, array, binary in outputs if binary)
    chunks: list[bytes | memoryview] = []

    def add(chunk: bytes) -> None:
        nonlocal size
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            chunks.clear()  # now, not when the traceback that holds this frame is collected
            raise response_too_large(model_name, max_bytes or 0)

    add(_response_head(model_name, model_version, request_id))
    for index, (name, array, binary) in enumerate(outputs):
        separator = b"," if index else b""
        if binary:
            add(separator + _tensor_head(name, datatype_of(array.dtype), array.shape, array.nbytes))
            continue
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            # JSON has no NaN or infinity; inputs are finite, so the model produced them (500).
            raise ServeError(
                f"model '{model_name}' produced NaN or infinite values in output '{name}', which JSON cannot carry"
            )
        add(separator + _tensor_head(name, datatype_of(array.dtype), array.shape))
        for numbers in _json_numbers(array):
            add(numbers)
        add(b"]}")
    add(b"]}")
    binaries = [array for _, array, binary in outputs if binary]
    if not binaries:
        return EncodedResponse(chunks, {"content-type": "application/json"})
    headers = {
        "content-type": "application/octet-stream",
        HEADER_LENGTH_HEADER: str(sum(len(chunk) for chunk in chunks)),
    }
    for array in binaries:
        raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(-1).view(np.uint8).data
        chunks.extend(raw[start : start + _SEND_SLICE_BYTES] for start in range(0, len(raw), _SEND_SLICE_BYTES))
    return EncodedResponse(chunks, headers)


def _json_text(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _response_head(model_name: str, model_version: str, request_id: str | None) -> bytes:
    """A response's JSON up to its first output tensor."""
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        response["id"] = request_id
    return _json_text(response)[:-1] + b',"outputs":['


def _tensor_head(name: str, datatype: str, shape: Sequence[int], binary_size: int | None = None) -> bytes:
    """An output tensor's JSON: whole for a binary tensor (`binary_size` bytes follow the JSON),
    else up to its `data` list's first number."""
    tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(shape)}
    if binary_size is not None:
        tensor["parameters"] = {"binary_data_size": binary_size}
        return _json_text(tensor)
    return _json_text(tensor)[:-1] + b',"data":['


def _json_numbers(array: np.ndarray) -> Iterator[bytes]:
    """The elements of `array` in row-major order as comma-separated JSON numbers, in steps."""
    flat = array.reshape(-1)
    for start in range(0, flat.size, _JSON_STEP):
        step = flat[start : start + _JSON_STEP]
        if step.dtype.kind in "iu":
            numbers = _integer_text(step)
        elif step.dtype.kind == "b":
            numbers = b"".join(np.where(step, b"true,", b"false,").tolist())
        else:
            numbers = ((_FLOAT_FORMATS[step.dtype.itemsize] * step.size) % tuple(step.tolist())).encode()
            # "%g" prints -0.0 as "-0", which JSON readers take for the integer 0. Matches do not
            # overlap, so of "-0,-0,-0," the first pass leaves the middle one to the second.
            numbers = (b"," + numbers).replace(b",-0,", b",-0.0,").replace(b",-0,", b",-0.0,")[1:]
        yield numbers if start + _JSON_STEP < flat.size else numbers[:-1]


def _integer_text(values: np.ndarray) -> bytes:
    """Integers printed with array operations alone: one row of ASCII bytes per number."""
    magnitude = (
        values.astype(np.uint64) if values.dtype.kind == "u" else np.abs(values.astype(np.int64)).astype(np.uint64)
    )
    width = len(str(int(magnitude.max()))) if magnitude.size else 1
    powers = np.uint64(10) ** np.arange(width - 1, -1, -1, dtype=np.uint64)
    digits = (magnitude[:, None] // powers) % np.uint64(10)
    # Leading zeros are dropped (all but the last digit of zero itself); 0 marks a dropped byte.
    significant = np.cumsum(digits, axis=1) > 0
    significant[:, -1] = True
    rows = np.zeros((values.size, width + 2), np.uint8)
    rows[:, 0] = np.where(values < 0, ord("-"), 0)
    rows[:, 1:-1] = np.where(significant, digits + ord("0"), 0)
    rows[:, -1] = ord(",")
    return rows[rows != 0].tobytes()


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def _json_header_end(body: bytes | bytearray, header_length: str | None) -> int:
    if header_length is None:
        return len(body)
    length = parse_length(header_length, f"header {HEADER_LENGTH_HEADER}")
    if not 0 < length <= len(body):
        raise BadRequest(f"header {HEADER_LENGTH_HEADER} is {length}, but the body has {len(body)} bytes")
    return length


def _decode_input(tensor_json: Any, index: int, binary: memoryview | None, available: int) -> tuple[InputTensor, int]:
    """One input tensor; returns it and how many of the `available` binary bytes it consumed
    (`binary` None: they have not arrived, and a binary tensor is a zero placeholder)."""
    if not isinstance(tensor_json, dict):
        raise BadRequest(f"inputs[{index}] must be a JSON object with name, shape, datatype and data")
    name = tensor_json.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"inputs[{index}]: 'name' must be a non-empty string")
    where = f"input {quoted(name)}"
    datatype = tensor_json.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise BadRequest(f"{where}: unsupported datatype {quoted(datatype)}; expected one of {', '.join(DATATYPES)}")
    shape = _decode_shape(tensor_json.get("shape"), where)
    count = math.prod(shape)
    dtype = DATATYPES[datatype]
    parameters = _optional_object(tensor_json, "parameters", where)
    binary_size = parameters.get("binary_data_size")
    if binary_size is not None:
        if "data" in tensor_json:
            raise BadRequest(f"{where}: has both 'data' and parameters.binary_data_size; send one")
        return _binary_tensor(binary, available, binary_size, name, datatype, shape, count, dtype), binary_size
    if "data" not in tensor_json:
        raise BadRequest(f"{where}: missing 'data' (or parameters.binary_data_size for binary data)")
    array = _json_tensor_data(tensor_json["data"], where, datatype, count, dtype)
    return InputTensor(name, datatype, shape, array.reshape(shape)), 0


def _decode_shape(shape: Any, where: str) -> tuple[int, ...]:
    if not isinstance(shape, list):
        raise BadRequest(f"{where}: 'shape' must be a list of non-negative integers, got {quoted(shape)}")
    check_shape(shape, where)
    return tuple(shape)


def _binary_tensor(
    binary: memoryview | None,
    available: int,
    size: Any,
    name: str,
    datatype: str,
    shape: tuple[int, ...],
    count: int,
    dtype: np.dtype,
) -> InputTensor:
    where = f"input {quoted(name)}"
    if type(size) is not int or size < 0:
        raise BadRequest(f"{where}: parameters.binary_data_size must be a non-negative integer, got {quoted(size)}")
    expected = count * dtype.itemsize
    if size != expected:
        raise BadRequest(
            f"{where}: binary_data_size is {size} bytes, but shape {list(shape)} of {datatype} "
            f"needs {count} elements = {expected} bytes"
        )
    if size > available:
        raise BadRequest(
            f"{where}: binary_data_size is {size} bytes, but only {available} binary bytes remain in the body"
        )
    if binary is None:
        return InputTensor(name, datatype, shape, np.broadcast_to(np.zeros((), dtype), shape))
    array = np.frombuffer(binary[:size], dtype=dtype).reshape(shape)
    return InputTensor(name, datatype, shape, array)


def _json_tensor_data(data: Any, where: str, datatype: str, count: int, dtype: np.dtype) -> np.ndarray:
    if isinstance(data, np.ndarray):  # a flat list already read by `parse_in_steps`
        parsed = data
    elif not isinstance(data, list):
        raise BadRequest(f"{where}: 'data' must be a JSON list of numbers, got {type(data).__name__}")
    else:
        try:
            parsed = np.array(data)
        except (ValueError, TypeError, RecursionError):
            raise BadRequest(f"{where}: 'data' is a ragged or malformed nested list") from None
    if parsed.size == 0 and count == 0:
        return np.zeros(0, dtype=dtype)
    if parsed.dtype.kind not in _JSON_KINDS[dtype.kind]:
        raise BadRequest(f"{where}: 'data' must hold only {datatype} values, found {_describe_values(parsed)}")
    if parsed.size != count:
        raise BadRequest(f"{where}: 'data' has {parsed.size} elements, but shape implies {count}")
    with np.errstate(over="ignore", invalid="ignore"):
        converted = parsed.astype(dtype).ravel()
    # An integer that does not fit the datatype would silently wrap around.
    if dtype.kind in "iu" and not np.array_equal(converted, parsed.ravel()):
        raise BadRequest(f"{where}: 'data' has values out of range for {datatype}")
    return converted


def _describe_values(parsed: np.ndarray) -> str:
    kinds = {"b": "booleans", "U": "strings", "O": "non-numeric values or integers beyond 64 bits", "f": "non-integers"}
    return kinds.get(parsed.dtype.kind, f"values of type {parsed.dtype}")


def _decode_requested_outputs(outputs_json: Any) -> list[RequestedOutput] | None:
    if outputs_json is None:
        return None
    if not isinstance(outputs_json, list):
        raise BadRequest("request field 'outputs' must be a list of {name, parameters}")
    requested: list[RequestedOutput] = []
    for index, output in enumerate(outputs_json):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise BadRequest(f"outputs[{index}] must be an object with a string 'name'")
        where = f"output {quoted(output['name'])}"
        parameters = _optional_object(output, "parameters", where)
        if parameters.get("classification"):
            raise BadRequest(f"{where}: the classification extension is not supported")
        requested.append(RequestedOutput(output["name"], _flag(parameters, "binary_data", f"{where} parameter")))
    return requested


def _optional_object(container: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = container.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{where}: '{key}' must be a JSON object, got {type(value).__name__}")
    return value


def _flag(parameters: Mapping[str, Any], key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{where} '{key}' must be true or false, got {quoted(value)}")
    return value


def _optional_id(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise BadRequest(f"request field 'id' must be a string, got {type(value).__name__}")
