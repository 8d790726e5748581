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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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


class ServeError(Exception):
    """An error with the HTTP status it maps to; its message is returned as `{"error": ...}`."""

    status_code = 500


class BadRequest(ServeError):
    status_code = 400


class Unauthorized(ServeError):
    status_code = 401


class NotFound(ServeError):
    status_code = 404


class PayloadTooLarge(ServeError):
    status_code = 413


class UnsupportedMediaType(ServeError):
    status_code = 415


class Unavailable(ServeError):
    status_code = 503


class RequestTimeout(ServeError):
    status_code = 504


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
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise BadRequest(f"request parameter 'timeout' must be a positive number of microseconds, got {value!r}")
        return float(value) / 1e6


def decode_request(body: bytes, header_length: str | None) -> InferenceRequest:
    """Decode an infer request body; `header_length` is the binary extension's HTTP header."""
    json_end = _json_header_end(body, header_length)
    header = _parse_json_object(body[:json_end])
    binary = memoryview(body)[json_end:]
    inputs_json = header.get("inputs")
    if not isinstance(inputs_json, list) or not inputs_json:
        raise BadRequest("request field 'inputs' must be a non-empty list of tensors")
    inputs: list[InputTensor] = []
    offset = 0
    for index, tensor_json in enumerate(inputs_json):
        tensor, used = _decode_input(tensor_json, index, binary[offset:])
        inputs.append(tensor)
        offset += used
    if offset != len(binary):
        raise BadRequest(
            f"request body has {len(binary) - offset} bytes after the JSON header that no input's "
            f"'binary_data_size' accounts for ({len(binary)} binary bytes, {offset} announced)"
        )
    parameters = _optional_object(header, "parameters", "request")
    return InferenceRequest(
        inputs=inputs,
        outputs=_decode_requested_outputs(header.get("outputs")),
        binary_outputs_by_default=_flag(parameters, "binary_data_output", "request parameter"),
        id=_optional_id(header.get("id")),
        parameters=parameters,
    )


def decode_input(tensor: Mapping[str, Any], index: int, binary: bytes = b"") -> InputTensor:
    """One input tensor in the JSON header's form, with `binary` its raw bytes if it announces any.

    Other encodings of the protocol (gRPC) describe their tensors this way, so they are checked
    by the very code that checks HTTP requests.
    """
    decoded, used = _decode_input(tensor, index, memoryview(binary))
    if used != len(binary):
        raise BadRequest(f"input '{decoded.name}': {len(binary)} raw bytes given, {used} expected")
    return decoded


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Sequence[tuple[str, np.ndarray, bool]],
) -> tuple[bytes, dict[str, str]]:
    """Encode `(name, array, binary)` outputs; returns the body and its HTTP headers."""
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array, binary in outputs:
        datatype = datatype_of(array.dtype)
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = array.ravel().tolist()
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = tensors
    header = json.dumps(response, separators=(",", ":")).encode()
    if not chunks:
        return header, {"content-type": "application/json"}
    headers = {"content-type": "application/octet-stream", HEADER_LENGTH_HEADER: str(len(header))}
    return b"".join([header, *chunks]), headers


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def _json_header_end(body: bytes, header_length: str | None) -> int:
    if header_length is None:
        return len(body)
    try:
        length = int(header_length)
    except ValueError:
        raise BadRequest(f"header {HEADER_LENGTH_HEADER} must be an integer, got {header_length!r}") from None
    if not 0 < length <= len(body):
        raise BadRequest(f"header {HEADER_LENGTH_HEADER} is {length}, but the body has {len(body)} bytes")
    return length


def _parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(f"request body is not valid JSON ({err})") from None
    except RecursionError:
        raise BadRequest("request body JSON is nested too deeply") from None
    if not isinstance(parsed, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(parsed).__name__}")
    return parsed


def _decode_input(tensor_json: Any, index: int, binary: memoryview) -> tuple[InputTensor, int]:
    """One input tensor; returns it and how many bytes of `binary` it consumed."""
    if not isinstance(tensor_json, dict):
        raise BadRequest(f"inputs[{index}] must be a JSON object with name, shape, datatype and data")
    name = tensor_json.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"inputs[{index}]: 'name' must be a non-empty string")
    where = f"input '{name}'"
    datatype = tensor_json.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise BadRequest(f"{where}: unsupported datatype {datatype!r}; expected one of {', '.join(DATATYPES)}")
    shape = _decode_shape(tensor_json.get("shape"), where)
    count = math.prod(shape)
    dtype = DATATYPES[datatype]
    parameters = _optional_object(tensor_json, "parameters", where)
    binary_size = parameters.get("binary_data_size")
    if binary_size is not None:
        if "data" in tensor_json:
            raise BadRequest(f"{where}: has both 'data' and parameters.binary_data_size; send one")
        return _binary_tensor(binary, binary_size, name, datatype, shape, count, dtype), binary_size
    if "data" not in tensor_json:
        raise BadRequest(f"{where}: missing 'data' (or parameters.binary_data_size for binary data)")
    array = _json_tensor_data(tensor_json["data"], where, datatype, count, dtype)
    return InputTensor(name, datatype, shape, array.reshape(shape)), 0


def _decode_shape(shape: Any, where: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape):
        raise BadRequest(f"{where}: 'shape' must be a list of non-negative integers, got {shape!r}")
    return tuple(shape)


def _binary_tensor(
    binary: memoryview, size: Any, name: str, datatype: str, shape: tuple[int, ...], count: int, dtype: np.dtype
) -> InputTensor:
    where = f"input '{name}'"
    if type(size) is not int or size < 0:
        raise BadRequest(f"{where}: parameters.binary_data_size must be a non-negative integer, got {size!r}")
    expected = count * dtype.itemsize
    if size != expected:
        raise BadRequest(
            f"{where}: binary_data_size is {size} bytes, but shape {list(shape)} of {datatype} "
            f"needs {count} elements = {expected} bytes"
        )
    if size > len(binary):
        raise BadRequest(f"{where}: binary_data_size is {size} bytes, but only {len(binary)} binary bytes remain in the body")
    array = np.frombuffer(binary[:size], dtype=dtype).reshape(shape)
    return InputTensor(name, datatype, shape, array)


def _json_tensor_data(data: Any, where: str, datatype: str, count: int, dtype: np.dtype) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequest(f"{where}: 'data' must be a JSON list of numbers, got {type(data).__name__}")
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
    kinds = {"b": "booleans", "U": "strings", "O": "mixed or non-numeric values", "f": "non-integers"}
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
        where = f"output '{output['name']}'"
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
        raise BadRequest(f"{where} '{key}' must be true or false, got {value!r}")
    return value


def _optional_id(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise BadRequest(f"request field 'id' must be a string, got {type(value).__name__}")
