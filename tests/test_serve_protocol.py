"""The Open Inference Protocol codec against tritonclient's own request and response code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from noisyseg.serve.errors import BadRequest, ServeError
from noisyseg.serve.protocol import (
    DATATYPES,
    InputTensor,
    PlannedOutput,
    check_finite,
    check_shape,
    datatype_of,
    decode_request,
    decode_request_header,
    encode_response,
    response_bytes_at_most,
)

# Datatypes tritonclient encodes identically in JSON and binary (FP16 has no JSON form there).
ROUND_TRIP_DATATYPES = ["BOOL", "UINT8", "INT16", "INT32", "INT64", "UINT32", "FP32", "FP64"]


def client_request(array: np.ndarray, datatype: str, binary: bool, outputs: list[tuple[str, bool]] | None = None):
    """A request body exactly as tritonclient builds it, and its header-length value."""
    tensor = httpclient.InferInput("image", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    requested = [httpclient.InferRequestedOutput(name, binary_data=flag) for name, flag in outputs] if outputs else None
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [tensor], outputs=requested, request_id="r1"
    )
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
    body = json.dumps(
        {"inputs": [{"name": "image", "shape": [1, 1, 3, 4], "datatype": "FP32", "data": array.tolist()}]}
    )
    np.testing.assert_array_equal(decode_request(body.encode(), None).inputs[0].array, array)


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_reads_the_encoded_response(binary: bool) -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    labels = logits.argmax(axis=1)
    encoded = encode_response("seg", "1", "abc", [("logits", logits, binary), ("labels", labels, False)])
    body, header_length = encoded.body(), encoded.headers.get("Inference-Header-Content-Length")
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
    encoded = encode_response("m", "1", None, [("out", decoded, binary)])
    response, length = encoded.body(), encoded.headers.get("Inference-Header-Content-Length")
    result = httpclient.InferenceServerClient.parse_response_body(
        response, header_length=None if length is None else int(length)
    )
    np.testing.assert_array_equal(result.as_numpy("out").reshape(array.shape), array)


def _finite_elements(datatype: str):
    if datatype.startswith("FP"):
        # JSON has no NaN or infinity; any finite value must survive the trip.
        return st.floats(allow_nan=False, allow_infinity=False, width=32 if datatype == "FP32" else 64)
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
        (_request(GOOD), "12abc", "must be a non-negative integer"),
        (_request(GOOD, outputs=[{"name": "labels", "parameters": {"binary_data": "yes"}}]), None, "true or false"),
        (_request(GOOD, outputs=[{"name": "labels", "parameters": {"classification": 3}}]), None, "classification"),
        (_request(GOOD, id=7), None, "'id' must be a string"),
        # Element counts numpy cannot hold, zero-sized or not.
        (
            b'{"inputs": [{"name": "image", "shape": [0, 100000000000000000000], "datatype": "FP32", "data": []}]}',
            None,
            r"input 'image': shape \[0, 100000000000000000000\] has more elements than a tensor can hold",
        ),
        (_request({**GOOD, "shape": [2**32, 2**32], "parameters": {"binary_data_size": 0}}), None, "more elements"),
        # Integer literals too large for a float, or past Python's 4,300-digit conversion limit.
        (
            b'{"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1' + b"0" * 400 + b"]}]}",
            None,
            "input 'image': 'data' must hold only FP32 values, found non-numeric values or integers beyond 64 bits",
        ),
        (
            _request(GOOD, parameters={"timeout": 10**400}),
            None,
            "'timeout' must be a positive number of microseconds below 2",
        ),
        (
            b'{"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1' + b"0" * 5000 + b"]}]}",
            None,
            "number too long to read",
        ),
        # Digits other than ASCII ones pass str.isdigit but are no length.
        (_request(GOOD), "\u00b2", "Inference-Header-Content-Length must be a non-negative integer in ASCII digits"),
        (_request(GOOD), "\u0661\u0662", "in ASCII digits"),
        # Non-finite pixels, and numbers beyond the float32 range, name the input and the element.
        (
            b'{"inputs": [{"name": "image", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [1, 2, NaN, 4]}]}',
            None,
            "input 'image': element 2 \\(row-major\\) is nan; FP32 inputs must be finite",
        ),
        (
            b'{"inputs": [{"name": "image", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [1, -Infinity, 3, 4]}]}',
            None,
            "element 1 .* is -inf",
        ),
        (_request({**GOOD, "data": [1, 2, 3, 1e39]}), None, "element 3 .* is inf; .* nothing beyond the FP32 range"),
    ],
)
def test_malformed_requests_are_rejected_with_what_is_wrong(
    body: bytes, header_length: str | None, message: str
) -> None:
    with pytest.raises(BadRequest, match=message):
        decode_request(body, header_length)


def test_binary_inputs_must_be_finite_too() -> None:
    header = {"name": "image", "shape": [1, 1, 2, 2], "datatype": "FP16", "parameters": {"binary_data_size": 8}}
    raw = np.array([0, 1, np.inf, 2], dtype="<f2").tobytes()
    body = _request(header)
    with pytest.raises(BadRequest, match="input 'image': element 2 .* is inf; FP16 inputs must be finite"):
        decode_request(body + raw, str(len(body)))


def test_shape_and_value_checks_serve_any_front_end() -> None:
    check_shape((0, 2**62, 1), "input 'x'")
    with pytest.raises(BadRequest, match="input 'x': shape .* more elements"):
        check_shape((2**32, 2**31, 0), "input 'x'")
    with pytest.raises(BadRequest, match="non-negative integers"):
        check_shape((1, -3), "input 'x'")
    integers = np.array([2**31 - 1], dtype=np.int32)
    check_finite(InputTensor("x", "INT32", (1,), integers))
    with pytest.raises(BadRequest, match="input 'x': element 0"):
        check_finite(InputTensor("x", "FP64", (1,), np.array([np.nan])))


def test_extreme_values_round_trip_through_the_json_response() -> None:
    f32, f64 = np.finfo(np.float32), np.finfo(np.float64)
    tensors = {
        "f32": np.array(
            [f32.max, -f32.max, f32.smallest_subnormal, f32.tiny, -0.0, -0.0, -0.0, 0.1, 1 / 3, 16777217.0, -0.0],
            np.float32,
        ),
        "f64": np.array([f64.max, f64.smallest_subnormal, -0.1, 1 / 3, 2.0**60], np.float64),
        "i64": np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max, 0, -1, 10], np.int64),
        "u64": np.array([np.iinfo(np.uint64).max, 0, 10**19], np.uint64),
        "u8": np.array([0, 9, 10, 255], np.uint8).reshape(2, 2),
        "bool": np.array([True, False, True]),
    }
    encoded = encode_response("m", "1", None, [(name, array, False) for name, array in tensors.items()])
    result = httpclient.InferenceServerClient.parse_response_body(encoded.body())
    for name, array in tensors.items():
        decoded = result.as_numpy(name)
        assert decoded.dtype == array.dtype, name
        np.testing.assert_array_equal(decoded, array, err_msg=name)
        assert np.array_equal(np.signbit(decoded), np.signbit(array)) if array.dtype.kind == "f" else True


def test_long_json_tensors_span_many_steps() -> None:
    array = np.random.default_rng(5).normal(size=(3, 50_000)).astype(np.float32)
    labels = (np.arange(70_000) % 7 - 3).astype(np.int64)
    encoded = encode_response("m", "1", "id", [("a", array, False), ("b", labels, False), ("c", array, True)])
    result = httpclient.InferenceServerClient.parse_response_body(
        encoded.body(), header_length=int(encoded.headers["Inference-Header-Content-Length"])
    )
    np.testing.assert_array_equal(result.as_numpy("a"), array)
    np.testing.assert_array_equal(result.as_numpy("b"), labels)
    np.testing.assert_array_equal(result.as_numpy("c"), array)
    assert encoded.size == len(encoded.body())


def test_response_size_limit_is_exact_and_says_what_to_ask_for() -> None:
    labels = np.zeros((1, 64, 64), np.int64)
    outputs = [("labels", labels, False)]
    size = len(encode_response("m", "1", None, outputs).body())
    assert len(encode_response("m", "1", None, outputs, max_bytes=size).body()) == size
    with pytest.raises(
        BadRequest, match=f"exceeds the limit of {size - 1} bytes; request only the 'labels' output .* binary data"
    ):
        encode_response("m", "1", None, outputs, max_bytes=size - 1)
    binary = [("labels", labels, True)]
    with pytest.raises(BadRequest, match="exceeds the limit"):
        encode_response("m", "1", None, binary, max_bytes=labels.nbytes)


def planned(outputs: list[tuple[str, np.ndarray, bool]], largest: dict[str, int] | None = None) -> list[PlannedOutput]:
    return [
        PlannedOutput(name, datatype_of(array.dtype), array.shape, binary, (largest or {}).get(name))
        for name, array, binary in outputs
    ]


def test_the_answer_size_known_before_inference_is_exact_for_binary_and_the_widest_json() -> None:
    """`response_bytes_at_most` against what `encode_response` then writes: equal for binary
    tensors, and for JSON tensors equal when every number prints at its widest, larger otherwise."""
    rng = np.random.default_rng(3)
    f16, f32, f64 = np.finfo(np.float16), np.finfo(np.float32), np.finfo(np.float64)
    # The widest text each kind prints as: a sign, every significant digit and a two- or
    # three-digit negative exponent; for labels, the last class index.
    widest = [
        ("h", np.full((2, 3), -f16.tiny, np.float16), False),
        ("f", np.full((1, 3, 4, 5), -f32.tiny, np.float32), False),
        ("d", np.full((7,), -f64.tiny, np.float64), False),
        ("labels", np.full((1, 4, 5), 4, np.int64), False),
        ("b", np.zeros((3,), np.bool_), False),
        ("i", np.full((2,), np.iinfo(np.int64).min, np.int64), False),
    ]
    typical = [
        ("f", rng.normal(size=(1, 3, 4, 5)).astype(np.float32), False),
        ("labels", rng.integers(0, 5, (1, 4, 5)), False),
        ("raw", rng.normal(size=(1, 3, 4, 5)).astype(np.float32), True),
        ("u", rng.integers(0, 9, (2, 3)).astype(np.uint8), True),
    ]
    for outputs, exact in ((widest, True), (typical, False), (typical[2:], True)):
        bound = response_bytes_at_most("model", "1", "an id", planned(outputs, {"labels": 4}))
        size = encode_response("model", "1", "an id", outputs).size
        assert bound == size if exact else bound > size, (bound, size)
    # Unknown dimensions (a model that does not say how many classes it has): no bound.
    unknown = PlannedOutput("logits", "FP32", (1, -1, 4, 5), binary=True)
    assert response_bytes_at_most("model", "1", None, [unknown]) is None


def test_non_finite_outputs_are_a_server_fault_not_bare_nan_in_json() -> None:
    scores = np.array([[0.5, np.nan]], np.float32)
    with pytest.raises(ServeError, match="model 'm' produced NaN or infinite values in output 'probs'") as caught:
        encode_response("m", "1", None, [("probs", scores, False)])
    assert caught.value.status_code == 500
    body = encode_response("m", "1", None, [("probs", scores, True)]).body()  # binary carries NaN as it is
    assert body.endswith(scores.tobytes())


# Past 1 MiB of JSON header, flat 'data' lists are read in steps; these bodies are that large.
LARGE = 200_000


def _large_body(data_text: str, shape: list[int], datatype: str = "FP32", **extra) -> bytes:
    tensor = f'{{"name": "image", "shape": {json.dumps(shape)}, "datatype": "{datatype}", "data": [{data_text}]}}'
    extras = "".join(f", {k!r}: {v}".replace(chr(39), chr(34)) for k, v in extra.items())
    return f'{{"id": "r", "inputs": [{tensor}], "outputs": [{{"name": "labels"}}]{extras}}}'.encode()


def test_large_json_lists_read_in_steps_decode_as_tritonclient_sends_them() -> None:
    rng = np.random.default_rng(3)
    for datatype, array in (
        ("FP32", rng.normal(size=(1, 1, 400, 500)).astype(np.float32)),
        ("INT64", rng.integers(-(2**62), 2**62, size=(2, 50_000))),
        ("FP64", rng.normal(size=(LARGE,))),
    ):
        body, header_length = client_request(array, datatype, binary=False)
        assert header_length is None and len(body) > 2**20
        decoded = decode_request(body, None)
        np.testing.assert_array_equal(decoded.inputs[0].array, array)
        assert decoded.id == "r1" and [output.name for output in decoded.outputs or []] == []


def test_large_json_lists_mixing_integers_and_decimals_or_nested_decode_whole() -> None:
    values = np.arange(LARGE) / 4  # 0, 0.25, 0.5, 0.75, 1, ... : whole numbers written as integers
    text = ",".join(str(int(v)) if v.is_integer() else repr(float(v)) for v in values)
    decoded = decode_request(_large_body(text, [LARGE]), None)
    np.testing.assert_array_equal(decoded.inputs[0].array, values.astype(np.float32))
    nested = json.dumps(values.reshape(1, 1, 400, 500).tolist())[1:-1]  # not flat: parsed whole
    np.testing.assert_array_equal(
        decode_request(_large_body(nested, [1, 1, 400, 500]), None).inputs[0].array,
        values.reshape(1, 1, 400, 500).astype(np.float32),
    )
    # A "data" list that belongs to no input: the body is parsed whole, that list kept.
    decoded = decode_request(_large_body(text, [LARGE], parameters='{"data": [1, 2]}'), None)
    assert decoded.parameters == {"data": [1, 2]}


@pytest.mark.parametrize(
    ("data_text", "message"),
    [
        ("1," * LARGE + "2,", "not valid JSON"),
        ("1," * LARGE + ",2", "not valid JSON"),
        ("1," * LARGE + "x", "not valid JSON"),
        ("1," * LARGE + "1" + "0" * 5000, "number too long to read"),
        ("1," * (LARGE - 1) + "NaN", f"element {LARGE - 1} .* is nan"),
        ("1," * (LARGE - 1) + '"2"', "only FP32 values"),
        ("1," * LARGE + "1", f"has {LARGE + 1} elements, but shape implies {LARGE}"),
    ],
)
def test_large_json_lists_read_in_steps_reject_what_json_loads_rejects(data_text: str, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        decode_request(_large_body(data_text, [LARGE]), None)


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


def test_a_binary_requests_json_header_alone_decodes_to_what_the_whole_body_does() -> None:
    # tritonclient builds the body: two binary tensors and one in JSON, outputs and an id.
    first = httpclient.InferInput("a", [2, 3], "FP32")
    first.set_data_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3), binary_data=True)
    second = httpclient.InferInput("b", [4], "INT64")
    second.set_data_from_numpy(np.arange(4, dtype=np.int64), binary_data=True)
    third = httpclient.InferInput("c", [2], "INT32")
    third.set_data_from_numpy(np.array([7, 8], dtype=np.int32), binary_data=False)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [first, second, third], outputs=[httpclient.InferRequestedOutput("labels", binary_data=True)], request_id="r1"
    )
    whole = decode_request(body, str(json_size))
    header = decode_request_header(body[:json_size], len(body) - json_size)
    assert (header.id, header.outputs, header.parameters) == (whole.id, whole.outputs, whole.parameters)
    for got, want in zip(header.inputs, whole.inputs, strict=True):
        assert (got.name, got.datatype, got.shape, got.array.shape) == (
            want.name,
            want.datatype,
            want.shape,
            want.shape,
        )
    assert not header.inputs[0].array.any() and header.inputs[0].array.nbytes == 24  # a zero placeholder view
    assert header.inputs[0].array.base is not None and header.inputs[0].array.strides == (0, 0)
    np.testing.assert_array_equal(header.inputs[2].array, [7, 8])  # JSON data is in the header
    # The header's own errors are found without the tensors: a length that does not add up.
    with pytest.raises(BadRequest, match="4 bytes after the JSON header that no input's 'binary_data_size'"):
        decode_request_header(body[:json_size], len(body) - json_size + 4)
    with pytest.raises(BadRequest, match="input 'b': binary_data_size is 32 bytes, but only 8 binary bytes remain"):
        decode_request_header(body[:json_size], 32)
