"""The Open Inference Protocol codec against tritonclient's own request and response code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from noisyseg.serve.protocol import (
    DATATYPES,
    BadRequest,
    decode_request,
    encode_response,
)

# Datatypes tritonclient encodes identically in JSON and binary (FP16 has no JSON form there).
ROUND_TRIP_DATATYPES = ["BOOL", "UINT8", "INT16", "INT32", "INT64", "UINT32", "FP32", "FP64"]


def client_request(array: np.ndarray, datatype: str, binary: bool, outputs: list[tuple[str, bool]] | None = None):
    """A request body exactly as tritonclient builds it, and its header-length value."""
    tensor = httpclient.InferInput("image", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    requested = [httpclient.InferRequestedOutput(name, binary_data=flag) for name, flag in outputs] if outputs else None
    body, json_size = httpclient.InferenceServerClient.generate_request_body([tensor], outputs=requested, request_id="r1")
    return body, None if json_size is None else str(json_size)


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("datatype", ROUND_TRIP_DATATYPES)
def test_tritonclient_request_decodes_to_the_same_tensor(datatype: str, binary: bool) -> None:
    rng = np.random.default_rng(1)
    array = (rng.normal(size=(2, 1, 3, 5)) * 50).astype(DATATYPES[datatype])
    body, header_length = client_request(array, datatype, binary, outputs=[("labels", True), ("probs", False)])
    request = decode_request(body, header_length)
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("image", datatype, (2, 1, 3, 5))
    np.testing.assert_array_equal(tensor.array, array)
    assert request.id == "r1"
    assert [(out.name, out.binary) for out in request.outputs or []] == [("labels", True), ("probs", False)]


def test_no_requested_outputs_means_all_outputs_in_binary_as_tritonclient_asks() -> None:
    body, header_length = client_request(np.zeros((1, 1, 2, 2), np.float32), "FP32", binary=True)
    request = decode_request(body, header_length)
    assert request.outputs is None and request.binary_outputs_by_default


def test_nested_json_data_is_read_in_row_major_order() -> None:
    array = np.arange(12, dtype=np.float32).reshape(1, 1, 3, 4)
    body = json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 3, 4], "datatype": "FP32", "data": array.tolist()}]})
    np.testing.assert_array_equal(decode_request(body.encode(), None).inputs[0].array, array)


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_reads_the_encoded_response(binary: bool) -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    labels = logits.argmax(axis=1)
    body, headers = encode_response("seg", "1", "abc", [("logits", logits, binary), ("labels", labels, False)])
    header_length = headers.get("Inference-Header-Content-Length")
    result = httpclient.InferenceServerClient.parse_response_body(
        body, header_length=None if header_length is None else int(header_length)
    )
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)
    np.testing.assert_array_equal(result.as_numpy("labels"), labels)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("seg", "1", "abc")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    datatype=st.sampled_from(ROUND_TRIP_DATATYPES),
    shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=4),
    binary=st.booleans(),
    data=st.data(),
)
def test_any_tensor_round_trips_through_client_and_server_codecs(datatype, shape, binary, data) -> None:
    array = data.draw(hnp.arrays(DATATYPES[datatype], shape, elements=_finite_elements(datatype)))
    body, header_length = client_request(array, datatype, binary)
    decoded = decode_request(body, header_length).inputs[0].array
    np.testing.assert_array_equal(decoded, array)
    response, headers = encode_response("m", "1", None, [("out", decoded, binary)])
    length = headers.get("Inference-Header-Content-Length")
    result = httpclient.InferenceServerClient.parse_response_body(
        response, header_length=None if length is None else int(length)
    )
    np.testing.assert_array_equal(result.as_numpy("out").reshape(array.shape), array)


def _finite_elements(datatype: str):
    if datatype.startswith("FP"):
        # JSON has no NaN or infinity; bounded so float32 survives the trip through Python floats.
        return st.floats(-1e6, 1e6, allow_nan=False, width=32 if datatype == "FP32" else 64)
    return None


def _request(tensor: dict, **extra) -> bytes:
    return json.dumps({"inputs": [tensor], **extra}).encode()


GOOD = {"name": "image", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "must be a JSON object"),
        (b"\xff\xfe", None, "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, None, "nested too deeply"),
        (json.dumps({"inputs": []}).encode(), None, "non-empty list"),
        (_request({**GOOD, "datatype": "FP8"}), None, "unsupported datatype"),
        (_request({**GOOD, "shape": [1, -1, 2, 2]}), None, "non-negative integers"),
        (_request({**GOOD, "shape": [1, 1.5, 2, 2]}), None, "non-negative integers"),
        (_request({**GOOD, "data": [1, 2, 3]}), None, "has 3 elements, but shape implies 4"),
        (_request({**GOOD, "data": [1, 2, "x", 4]}), None, "only FP32 values"),
        (_request({**GOOD, "data": [[1, 2], [3]]}), None, "ragged"),
        (_request({**GOOD, "data": "1234"}), None, "must be a JSON list"),
        (_request({**GOOD, "datatype": "UINT8", "data": [1, 2, 3, 300]}), None, "out of range for UINT8"),
        (_request({**GOOD, "datatype": "INT32", "data": [1, 2, 3, 4.5]}), None, "non-integers"),
        (_request({key: value for key, value in GOOD.items() if key != "data"}), None, "missing 'data'"),
        (_request({**GOOD, "parameters": {"binary_data_size": 16}}), "0", "Inference-Header-Content-Length is 0"),
        (_request(GOOD), "12abc", "must be an integer"),
        (_request(GOOD, outputs=[{"name": "labels", "parameters": {"binary_data": "yes"}}]), None, "true or false"),
        (_request(GOOD, outputs=[{"name": "labels", "parameters": {"classification": 3}}]), None, "classification"),
        (_request(GOOD, id=7), None, "'id' must be a string"),
    ],
)
def test_malformed_requests_are_rejected_with_what_is_wrong(body: bytes, header_length: str | None, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        decode_request(body, header_length)


def test_binary_sizes_must_match_shape_and_body() -> None:
    header = {"name": "image", "shape": [1, 1, 2, 2], "datatype": "FP32", "parameters": {"binary_data_size": 16}}
    raw = np.arange(4, dtype="<f4").tobytes()
    good = _request(header)
    np.testing.assert_array_equal(decode_request(good + raw, str(len(good))).inputs[0].array.ravel(), [0, 1, 2, 3])
    with pytest.raises(BadRequest, match="only 8 binary bytes remain"):
        decode_request(good + raw[:8], str(len(good)))
    with pytest.raises(BadRequest, match="4 bytes after the JSON header"):
        decode_request(good + raw + b"abcd", str(len(good)))
    wrong = _request({**header, "parameters": {"binary_data_size": 12}})
    with pytest.raises(BadRequest, match="needs 4 elements = 16 bytes"):
        decode_request(wrong + raw[:12], str(len(wrong)))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512), st.one_of(st.none(), st.integers(-5, 600).map(str)))
def test_arbitrary_bytes_only_ever_raise_bad_request(body: bytes, header_length: str | None) -> None:
    try:
        decode_request(body, header_length)
    except BadRequest:
        pass


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "inputs": st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "name": st.text(max_size=6) | _json_values,
                        "shape": st.lists(st.integers(-2, 4), max_size=4) | _json_values,
                        "datatype": st.sampled_from(list(DATATYPES) + ["BYTES", "fp32"]) | _json_values,
                        "data": st.lists(st.integers(-300, 300) | st.floats(), max_size=20) | _json_values,
                        "parameters": st.dictionaries(st.sampled_from(["binary_data_size", "x"]), _json_values),
                    },
                ),
                max_size=3,
            ),
            "outputs": _json_values,
            "parameters": _json_values,
            "id": _json_values,
        },
    )
)
def test_arbitrary_request_json_only_ever_raises_bad_request(request_json: dict) -> None:
    try:
        decode_request(json.dumps(request_json).encode(), None)
    except BadRequest:
        pass
