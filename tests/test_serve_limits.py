"""The server's limits and bad-input answers over real HTTP: bodies held at once (503), slow
bodies (408) and slow headers (closed), clients that leave mid-body (no server error), responses
over the size limit (400 before any inference), the inference budget (batches kept under it, a
full queue 503 with Retry-After, a request over it 400), names quoted at a bounded length, inputs
that once crashed the route (400, not 500), the serve options' ranges, the schema routes, and a
health check that stays quick while a 2048 x 2048 request is in flight."""

from __future__ import annotations

import http.client
import json
import logging
import math
import re
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from serve_helpers import conv_runtime, running_server, write_conv_model

from noisyseg.cli import build_parser, main
from noisyseg.commands.serve import settings_from_args
from noisyseg.export.onnxruntime_runner import OnnxRuntimeRunner
from noisyseg.serve.loadgen import ServerProcess, binary_infer_body
from noisyseg.serve.settings import ServerSettings

BODY_LIMIT = 64 * 1024
RESPONSE_LIMIT = 16 * 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("limits")


@pytest.fixture(scope="module")
def server(model_dir):
    settings = ServerSettings(
        max_body_bytes=BODY_LIMIT,
        max_held_body_bytes=2 * BODY_LIMIT,
        body_timeout_s=1.0,
        max_response_bytes=RESPONSE_LIMIT,
    )
    with running_server([conv_runtime(model_dir, "conv")], settings) as running:
        yield running


def raw_request(port: int, head: str, body: bytes = b"") -> socket.socket:
    """A connection that has sent `head` (request line and headers, latin-1) and `body`."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(head.encode("latin-1") + b"\r\n" + body)
    return conn


def read_reply(conn: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        body += conn.recv(65536)
    return int(lines[0].split()[1]), headers, body


def infer_head(port: int, length: int, extra: str = "") -> str:
    return f"POST /v2/models/conv/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {length}\r\n{extra}"


def metric(url: str, series: str) -> float:
    text = httpx.get(url + "/metrics").text
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def json_body(images: np.ndarray, **extra) -> dict:
    return {
        "inputs": [{"name": "image", "shape": list(images.shape), "datatype": "FP32", "data": images.ravel().tolist()}],
        **extra,
    }


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (
            b'{"inputs": [{"name": "image", "shape": [0, 100000000000000000000], "datatype": "FP32", "data": []}]}',
            {},
            "has more elements than a tensor can hold",
        ),
        (
            b'{"inputs": [{"name": "image", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [1, 2, 3, 1'
            + b"0" * 5000
            + b"]}]}",
            {},
            "number too long to read",
        ),
        (
            json.dumps(json_body(np.ones((1, 1, 2, 2)), parameters={"timeout": 10**400})).encode(),
            {},
            "'timeout' must be",
        ),
        (
            json.dumps(json_body(np.ones((1, 1, 2, 2)))).encode(),
            {"Inference-Header-Content-Length": "\u00b2"},
            "in ASCII digits",
        ),
        (
            b'{"inputs": [{"name": "image", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [1, NaN, 3, 4]}]}',
            {},
            "input 'image': element 1 (row-major) is nan",
        ),
        (
            json.dumps(json_body(np.array([[[[1, 2], [3, 1e39]]]]))).encode(),
            {},
            "input 'image': element 3 (row-major) is inf",
        ),
        (
            binary_infer_body(np.array([[[[0, np.inf], [2, 3]]]], np.float32), ["labels"])[0],
            {
                "Inference-Header-Content-Length": str(
                    binary_infer_body(np.zeros((1, 1, 2, 2), np.float32), ["labels"])[1]
                )
            },
            "input 'image': element 1 (row-major) is inf",
        ),
    ],
)
def test_inputs_that_once_crashed_the_route_get_400_naming_the_problem(server, body, headers, message) -> None:
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    with raw_request(server.port, infer_head(server.port, len(body), extra), body) as conn:
        status, _, reply = read_reply(conn)
    assert status == 400, reply
    assert message in json.loads(reply)["error"]


def test_a_client_leaving_mid_body_is_no_server_error(server, caplog) -> None:
    errors_before = metric(server.url, 'noisyseg_http_requests_total{route="infer",code="500"}')
    gone_before = metric(server.url, 'noisyseg_http_requests_total{route="infer",code="499"}')
    with caplog.at_level(logging.WARNING):
        conn = raw_request(server.port, infer_head(server.port, 5000), b'{"inputs": [')
        time.sleep(0.2)
        conn.close()
        deadline = time.monotonic() + 10
        while metric(server.url, 'noisyseg_http_requests_total{route="infer",code="499"}') == gone_before:
            assert time.monotonic() < deadline, "the abandoned request was never recorded"
            time.sleep(0.05)
    assert metric(server.url, 'noisyseg_http_requests_total{route="infer",code="500"}') == errors_before
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
    assert server.app.state.bodies.held == 0


def test_bodies_held_at_once_are_bounded_with_503_and_retry_after(server) -> None:
    # Two slow uploads that declared the largest body hold the whole budget (2 x BODY_LIMIT).
    slow = [raw_request(server.port, infer_head(server.port, BODY_LIMIT), b"{") for _ in range(2)]
    try:
        deadline = time.monotonic() + 10
        while server.app.state.bodies.held < 2 * BODY_LIMIT:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        response = httpx.post(server.url + "/v2/models/conv/infer", json=json_body(np.ones((1, 1, 4, 4))))
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert (
            "already holds 131072 bytes of request bodies, decoded tensors and answers (limit 131072)"
            in response.json()["error"]
        )
    finally:
        for conn in slow:
            conn.close()
    deadline = time.monotonic() + 10
    while server.app.state.bodies.held:
        assert time.monotonic() < deadline, "bodies of closed connections were never given back"
        time.sleep(0.01)
    assert httpx.post(server.url + "/v2/models/conv/infer", json=json_body(np.ones((1, 1, 4, 4)))).status_code == 200


def test_a_body_that_does_not_arrive_in_time_gets_408(server) -> None:
    started = time.monotonic()
    with raw_request(server.port, infer_head(server.port, 1000), b'{"inputs": [') as conn:
        status, _, reply = read_reply(conn)
    assert status == 408 and "request body not received within 1 s (12 bytes arrived)" in json.loads(reply)["error"]
    assert 1.0 <= time.monotonic() - started < 5.0


def test_responses_over_the_limit_get_400_pointing_at_labels_or_binary(server, model_dir) -> None:
    images = np.random.default_rng(0).normal(size=(1, 1, 32, 32)).astype(np.float32)
    url = server.url + "/v2/models/conv/infer"
    refused = httpx.post(url, json=json_body(images))  # logits, probs and labels as JSON: ~40 KB
    assert refused.status_code == 400
    assert f"exceeds the limit of {RESPONSE_LIMIT} bytes; request only the 'labels' output" in refused.json()["error"]
    labels = httpx.post(url, json=json_body(images, outputs=[{"name": "labels"}]))
    assert labels.status_code == 200 and len(labels.content) <= RESPONSE_LIMIT
    body, json_length = binary_infer_body(images, ["logits"])
    logits = httpx.post(url, content=body, headers={"Inference-Header-Content-Length": str(json_length)})
    assert logits.status_code == 200 and len(logits.content) <= RESPONSE_LIMIT
    decoded = httpclient.InferenceServerClient.parse_response_body(
        logits.content, header_length=int(logits.headers["Inference-Header-Content-Length"])
    )
    np.testing.assert_array_equal(
        decoded.as_numpy("logits"), OnnxRuntimeRunner(model_dir / "conv.onnx").run(images)["logits"]
    )


def test_schema_routes_are_off_unless_asked_for_and_docs_pages_never_served(model_dir) -> None:
    for openapi in (False, True):
        with running_server([conv_runtime(model_dir, "schema")], ServerSettings(openapi=openapi)) as running:
            schema = httpx.get(running.url + "/openapi.json")
            assert schema.status_code == (200 if openapi else 404)
            if openapi:
                assert "/v2/models/{name}/infer" in schema.json()["paths"]
            # Swagger UI and ReDoc pages load their scripts from a CDN.
            for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
                assert httpx.get(running.url + page).status_code == 404


def test_limits_come_from_the_serve_flags_with_triton_like_defaults() -> None:
    defaults = settings_from_args(build_parser().parse_args(["serve", "--model", "m.onnx"]))
    assert (defaults.max_body_bytes, defaults.max_response_bytes, defaults.max_held_body_bytes) == (
        64 * 2**20,
        64 * 2**20,
        256 * 2**20,
    )
    assert defaults.body_timeout_s == 30.0 and defaults.openapi is False
    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            "m.onnx",
            "--max-response-mb",
            "1.5",
            "--max-held-body-mb",
            "128",
            "--body-timeout-s",
            "2",
            "--openapi",
        ]
    )
    chosen = settings_from_args(args)
    assert (chosen.max_response_bytes, chosen.max_held_body_bytes, chosen.body_timeout_s, chosen.openapi) == (
        3 * 2**19,
        128 * 2**20,
        2.0,
        True,
    )
    with pytest.raises(ValueError, match=r"max_held_body_bytes \(1024\) must be at least max_body_bytes"):
        ServerSettings(max_held_body_bytes=1024)
    for field in ("max_response_bytes", "body_timeout_s", "header_timeout_s"):
        for value in (0, math.nan, math.inf):
            with pytest.raises(ValueError, match=f"server setting {field} must be a positive finite number"):
                ServerSettings(**{field: value})


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-response-mb", "0"),
        ("--max-response-mb", "-1"),
        ("--max-body-mb", "-5"),
        ("--max-body-mb", "inf"),
        ("--max-body-mb", "nan"),
        ("--body-timeout-s", "nan"),
        ("--header-timeout-s", "0"),
        ("--request-timeout-s", "inf"),
        ("--max-held-body-mb", "1e9"),
        ("--grpc-max-receive-mb", "2048"),
        ("--grpc-max-send-mb", "-1"),
        ("--grpc-max-send-mb", "nan"),
        ("--max-batch-pixels", "1.5"),
        ("--max-batch-size", "0"),
        ("--threads", "two"),
        ("--max-queue-delay-ms", "-1"),
        ("--port", "70000"),
    ],
)
def test_a_bad_size_or_time_option_stops_serve_before_it_starts_naming_the_flag(tmp_path, capsys, flag, value) -> None:
    # The model does not exist: an error about the option proves it was refused first.
    code = main(["--log-level", "ERROR", "serve", "--model", str(tmp_path / "missing.onnx"), flag, value])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"noisyseg serve: error: {flag} must be a " in err and f"got {value!r}" in err, err


def test_option_ranges_admit_their_bounds() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            "m.onnx",
            "--grpc-max-send-mb",
            "2047",
            "--max-queue-delay-ms",
            "0",
            "--max-batch-pixels",
            "65536",
            "--header-timeout-s",
            "0.5",
            "--port",
            "0",
        ]
    )
    chosen = settings_from_args(args)
    assert (chosen.grpc_max_send_bytes, chosen.max_queue_delay_ms, chosen.max_batch_pixels) == (
        2047 * 2**20,
        0.0,
        65536,
    )
    assert (chosen.header_timeout_s, chosen.port, chosen.queued_pixels) == (0.5, 0, 65536)


def test_connections_that_send_their_headers_too_slowly_are_closed(model_dir) -> None:
    with running_server([conv_runtime(model_dir, "slow")], ServerSettings(header_timeout_s=0.5)) as running:
        fresh = [
            raw_request(running.port, "GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n".rstrip("\r\n")) for _ in range(3)
        ]
        # A keep-alive connection after one answered request: its next request's headers are timed too.
        kept = socket.create_connection(("127.0.0.1", running.port), timeout=10)
        kept.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_reply(kept)[0] == 200
        kept.sendall(b"GET /v2/health/ready HTTP/1.1\r\n")
        slow = [*fresh, kept]
        started = time.monotonic()
        answers: dict[int, bytes] = {}
        while len(answers) < len(slow) and time.monotonic() - started < 5:
            for index, conn in enumerate(slow):
                if index in answers:
                    continue
                try:
                    conn.sendall(b"X")  # one more byte of a header line, every 0.1 s
                    conn.settimeout(0.001)
                    answers[index] = conn.recv(4096)
                except (TimeoutError, BlockingIOError):
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    answers[index] = b""
            # Other clients are served meanwhile.
            assert httpx.get(running.url + "/v2/health/ready").status_code == 200
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        for conn in slow:
            conn.close()
    assert len(answers) == len(slow), f"{len(slow) - len(answers)} slow connections still open after {elapsed:.1f} s"
    assert elapsed < 3.0
    assert all(answer == b"" or answer.startswith(b"HTTP/1.1 408 ") for answer in answers.values()), answers


def test_names_are_quoted_in_errors_cut_to_a_bounded_length(server) -> None:
    long_name = "m" * 12_000
    reply = httpx.get(f"{server.url}/v2/models/{long_name}/ready")
    message = reply.json()["error"]
    assert reply.status_code == 404 and message.startswith("unknown model 'mmmm") and "(12002 characters)" in message
    assert len(message) < 300
    body = json_body(np.ones((1, 1, 4, 4)))
    body["inputs"][0]["name"] = "i" * 20_000
    body["outputs"] = [{"name": "o" * 20_000}]
    reply = httpx.post(server.url + "/v2/models/conv/infer", json=body)
    assert reply.status_code == 400 and len(reply.json()["error"]) < 400, reply.text[:300]
    assert "takes exactly one input named 'image', got ['iiii" in reply.json()["error"]


def model_stats(url: str, model: str = "conv") -> dict:
    return httpx.get(f"{url}/v2/models/{model}/stats").json()["model_stats"][0]


def test_an_answer_over_the_response_limit_is_refused_before_any_inference(server, model_dir) -> None:
    url = server.url + "/v2/models/conv/infer"
    before = model_stats(server.url)
    images = np.random.default_rng(1).normal(size=(1, 1, 64, 64)).astype(np.float32)
    body, json_length = binary_infer_body(images, ["logits"])  # 3 x 64 x 64 float32: 48 KiB of binary logits
    refused = [
        httpx.post(url, content=body, headers={"Inference-Header-Content-Length": str(json_length)}),
        httpx.post(url, json=json_body(images[:, :, :16, :16])),  # every output as JSON: at most 16 bytes a number
    ]
    for reply in refused:
        assert reply.status_code == 400
        assert re.search(
            rf"\(up to \d+ bytes\) exceeds the limit of {RESPONSE_LIMIT} bytes; .*--max-response-mb",
            reply.json()["error"],
        ), reply.json()
    # Exactly the binary answer's size: its JSON header and 49,152 bytes of logits.
    header = json.dumps(
        {
            "model_name": "conv",
            "model_version": "1",
            "outputs": [
                {
                    "name": "logits",
                    "datatype": "FP32",
                    "shape": [1, 3, 64, 64],
                    "parameters": {"binary_data_size": 49152},
                }
            ],
        },
        separators=(",", ":"),
    )
    assert f"(up to {len(header) + 49152} bytes)" in refused[0].json()["error"]
    after = model_stats(server.url)
    assert after["execution_count"] == before["execution_count"], "the model ran for a refused answer"
    assert after["inference_stats"]["success"]["count"] == before["inference_stats"]["success"]["count"]


def test_a_binary_request_is_refused_from_its_json_header_before_its_tensors_arrive(server) -> None:
    images = np.random.default_rng(2).normal(size=(1, 1, 64, 64)).astype(np.float32)
    body, json_length = binary_infer_body(images, ["logits"])
    extra = f"Inference-Header-Content-Length: {json_length}\r\n"
    # Only the JSON header is sent; the body timeout (1 s) would answer 408 if the server waited.
    with raw_request(server.port, infer_head(server.port, len(body), extra), body[:json_length]) as conn:
        status, _, reply = read_reply(conn)
    assert status == 400 and f"exceeds the limit of {RESPONSE_LIMIT} bytes" in json.loads(reply)["error"]
    # A header the model refuses (a wrong input name) is answered as early, naming the input.
    body, json_length = binary_infer_body(images, ["labels"], input_name="picture")
    extra = f"Inference-Header-Content-Length: {json_length}\r\n"
    with raw_request(server.port, infer_head(server.port, len(body), extra), body[:json_length]) as conn:
        status, _, reply = read_reply(conn)
    assert status == 400 and "takes exactly one input named 'image', got ['picture']" in json.loads(reply)["error"]
    # A request within the limits is still answered once its tensors arrive.
    body, json_length = binary_infer_body(images[:, :, :32, :32], ["labels"])
    extra = f"Inference-Header-Content-Length: {json_length}\r\n"
    with raw_request(server.port, infer_head(server.port, len(body), extra), body) as conn:
        status, _, _ = read_reply(conn)
    assert status == 200


def test_answers_count_in_what_the_server_holds_and_a_request_that_cannot_fit_alone_gets_413(model_dir) -> None:
    settings = ServerSettings(max_body_bytes=BODY_LIMIT, max_held_body_bytes=BODY_LIMIT, max_response_bytes=BODY_LIMIT)
    with running_server([conv_runtime(model_dir, "conv")], settings) as running:
        images = np.zeros((1, 1, 64, 64), np.float32)  # 16 KiB of pixels; binary logits 48 KiB
        fits = post_images(running.url, images)  # labels: 32 KiB
        body, json_length = binary_infer_body(images, ["logits"])  # a 48 KiB answer and a 16 KiB body
        alone = httpx.post(
            running.url + "/v2/models/conv/infer",
            content=body,
            headers={"Inference-Header-Content-Length": str(json_length)},
        )
        held_after = running.app.state.bodies.held
    assert fits.status_code == 200
    assert (
        alone.status_code == 413
        and "over the 65536 bytes the server holds for all requests at once (--max-held-body-mb)"
        in alone.json()["error"]
    )
    assert held_after == 0


BUDGET = 256  # pixels per model call: two 8 x 16 images


@pytest.fixture(scope="module")
def budgeted(model_dir):
    """A server whose inference budget is two 8 x 16 images, whose lone requests wait up to 1 s for a partner."""
    settings = ServerSettings(max_batch_pixels=BUDGET, max_batch_size=8, max_queue_delay_ms=1000)
    with running_server([conv_runtime(model_dir, "conv")], settings) as running:
        yield running


def post_images(url: str, images: np.ndarray) -> httpx.Response:
    body, json_length = binary_infer_body(images, ["labels"])
    return httpx.post(
        url + "/v2/models/conv/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(json_length)},
        timeout=30,
    )


def test_batches_stay_within_the_pixel_budget(model_dir) -> None:
    # Room in the queue for all six requests, so each is answered.
    settings = ServerSettings(
        max_batch_pixels=BUDGET, max_queued_pixels=6 * 128, max_batch_size=8, max_queue_delay_ms=1000
    )
    requests = [np.random.default_rng(seed).normal(size=(1, 1, 8, 16)).astype(np.float32) for seed in range(6)]
    replies: dict[int, httpx.Response] = {}
    with running_server([conv_runtime(model_dir, "conv")], settings) as budgeted:
        threads = [
            threading.Thread(target=lambda i=i: replies.__setitem__(i, post_images(budgeted.url, requests[i])))
            for i in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        stats = model_stats(budgeted.url)
    runner = OnnxRuntimeRunner(model_dir / "conv.onnx")
    for index, images in enumerate(requests):
        reply = replies[index]
        assert reply.status_code == 200, reply.text
        decoded = httpclient.InferenceServerClient.parse_response_body(
            reply.content, header_length=int(reply.headers["Inference-Header-Content-Length"])
        )
        np.testing.assert_array_equal(decoded.as_numpy("labels"), runner.run(images)["logits"].argmax(axis=1))
    sizes = {entry["batch_size"]: entry["compute_infer"]["count"] for entry in stats["batch_stats"]}
    # Six images that max_batch_size alone would run together ran two at a time, the budget's worth.
    assert set(sizes) == {2} and sizes[2] == 3, sizes


def test_a_full_queue_gets_503_with_retry_after_and_a_request_over_the_budget_400(budgeted) -> None:
    table = budgeted.app.state.models
    waiting: dict[str, httpx.Response] = {}
    # Two lone requests of different shapes wait for partners (1 s), holding the queue's 256 pixels.
    shapes = {"wide": (8, 16), "tall": (16, 8)}
    threads = [
        threading.Thread(
            target=lambda k=k: waiting.__setitem__(
                k, post_images(budgeted.url, np.zeros((1, 1, *shapes[k]), np.float32))
            )
        )
        for k in shapes
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while table.models["conv"].batcher.queued_images < 2:
        assert time.monotonic() < deadline, "the two requests never queued"
        time.sleep(0.01)
    full = post_images(budgeted.url, np.zeros((1, 1, 8, 8), np.float32))
    assert full.status_code == 503 and full.headers["retry-after"] == "1", full.text
    assert "128 pixels queued" not in full.json()["error"] and "pixels queued" in full.json()["error"]
    for thread in threads:
        thread.join(30)
    assert [waiting[k].status_code for k in shapes] == [200, 200]
    over = post_images(budgeted.url, np.zeros((1, 1, 16, 17), np.float32))
    assert over.status_code == 400
    assert (
        "1 x 16 x 17 = 272 pixels exceeds the server's inference budget of 256 pixels per model call "
        "(--max-batch-pixels)" in over.json()["error"]
    )


HEALTH_BOUND_S = 0.1
BIG = 2048
# What the server may keep after a 2048 x 2048 request: ONNX Runtime's shrunk arena still holds
# the chunk of the last output (48 MiB of logits). Before: the whole arena (~300 MiB) for good
# and the batcher's last batch (~150 MiB) until the next request.
MAX_RSS_KEPT_BYTES = 128 * 2**20


def big_request(image: np.ndarray, kind: str) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one `kind` of request for `image`."""
    if kind == "json-input-labels":  # pixels with three decimals, as a JSON client may send them: ~30 MB
        data = np.round(image.astype(np.float64), 3).ravel().tolist()
        body = {
            "inputs": [{"name": "image", "shape": list(image.shape), "datatype": "FP32", "data": data}],
            "outputs": [{"name": "labels"}],
        }
        return json.dumps(body).encode(), {}
    body, json_length = binary_infer_body(image, ["logits", "probs", "labels"])  # binary-all-outputs
    return body, {"Inference-Header-Content-Length": str(json_length)}


@pytest.mark.parametrize(
    ("kind", "server_args", "status"),
    [
        # (No outputs named, JSON answer: over the 64 MiB default limit, now refused before inference.)
        # Every output as binary data (128 MiB), under a raised limit.
        ("binary-all-outputs", ("--max-response-mb", "160"), 200),
        # The image itself as JSON numbers.
        ("json-input-labels", (), 200),
    ],
    ids=["binary-all-outputs", "json-input-labels"],
)
def test_health_answers_quickly_while_a_2048_square_request_is_in_flight_and_memory_comes_back(
    tmp_path, kind, server_args, status
) -> None:
    server = ServerProcess(
        write_conv_model(tmp_path / "conv.onnx"), "--threads", "1", *server_args, log_level="WARNING"
    ).wait_until_ready()
    try:
        body, headers = big_request(np.random.default_rng(0).normal(size=(1, 1, BIG, BIG)).astype(np.float32), kind)
        big: dict[str, float | int] = {}

        def send_big() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            conn.request("POST", "/v2/models/conv/infer", body=body, headers=headers)
            big["sent"] = time.perf_counter()
            response = conn.getresponse()
            response.read()
            big["done"], big["status"] = time.perf_counter(), response.status
            conn.close()

        probe = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        probe.request("GET", "/v2/health/ready")
        probe.getresponse().read()  # connected and warm
        # The machine's own jitter right now (other processes share its cores): the same probes
        # with nothing in flight. The bound is on what the large request adds to it.
        idle = []
        for _ in range(40):
            started = time.perf_counter()
            probe.request("GET", "/v2/health/ready")
            probe.getresponse().read()
            idle.append(time.perf_counter() - started)
            time.sleep(0.02)
        rss_before = server.rss_bytes()
        sender = threading.Thread(target=send_big)
        sender.start()
        probes: list[tuple[float, float]] = []
        while sender.is_alive():
            started = time.perf_counter()
            probe.request("GET", "/v2/health/ready")
            reply = probe.getresponse()
            assert reply.status == 200 and reply.read() == b'{"ready":true}'
            probes.append((started, time.perf_counter()))
            time.sleep(0.02)
        sender.join()
        probe.close()
        deadline = time.monotonic() + 5  # a refused request's arrays go at the next garbage collection
        while (kept := server.rss_bytes() - rss_before) > MAX_RSS_KEPT_BYTES and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        server.kill()
    print(f"kept {kept / 2**20:.0f} MiB after the request")
    assert kept <= MAX_RSS_KEPT_BYTES, f"the server kept {kept / 2**20:.0f} MiB after the request"
    assert big["status"] == status
    during = [end - start for start, end in probes if start >= big["sent"] and end <= big["done"]]
    assert len(during) >= 5, (
        f"only {len(during)} probes while the request was in flight ({big['done'] - big['sent']:.2f} s)"
    )
    print(f"\n{len(during)} probes in {big['done'] - big['sent']:.2f} s, worst {max(during) * 1000:.1f} ms")
    bound = HEALTH_BOUND_S + max(idle)
    assert max(during) < bound, (
        f"health took up to {max(during) * 1000:.0f} ms during the request "
        f"(idle worst {max(idle) * 1000:.0f} ms): {sorted(during)[-5:]}"
    )
