"""The server's limits and bad-input answers over real HTTP: bodies held at once (503), slow
bodies (408), clients that leave mid-body (no server error), responses over the size limit
(400), inputs that once crashed the route (400, not 500), the schema routes, and a health check
that stays quick while a 2048 x 2048 request is in flight."""

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

from noisyseg.cli import build_parser
from noisyseg.export.onnxruntime_runner import OnnxRuntimeRunner
from noisyseg.serve.commands import settings_from_args
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
        max_body_bytes=BODY_LIMIT, max_held_body_bytes=2 * BODY_LIMIT, body_timeout_s=1.0, max_response_bytes=RESPONSE_LIMIT
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
    return {"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "FP32", "data": images.ravel().tolist()}], **extra}


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (b'{"inputs": [{"name": "image", "shape": [0, 100000000000000000000], "datatype": "FP32", "data": []}]}', {},
         "has more elements than a tensor can hold"),
        (b'{"inputs": [{"name": "image", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [1, 2, 3, 1' + b"0" * 5000 + b"]}]}",
         {}, "number too long to read"),
        (json.dumps(json_body(np.ones((1, 1, 2, 2)), parameters={"timeout": 10**400})).encode(), {}, "'timeout' must be"),
        (json.dumps(json_body(np.ones((1, 1, 2, 2)))).encode(), {"Inference-Header-Content-Length": "\u00b2"}, "in ASCII digits"),
        (b'{"inputs": [{"name": "image", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [1, NaN, 3, 4]}]}', {},
         "input 'image': element 1 (row-major) is nan"),
        (json.dumps(json_body(np.array([[[[1, 2], [3, 1e39]]]]))).encode(), {}, "input 'image': element 3 (row-major) is inf"),
        (binary_infer_body(np.array([[[[0, np.inf], [2, 3]]]], np.float32), ["labels"])[0],
         {"Inference-Header-Content-Length": str(binary_infer_body(np.zeros((1, 1, 2, 2), np.float32), ["labels"])[1])},
         "input 'image': element 1 (row-major) is inf"),
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
        assert "already holds 131072 bytes of request bodies (limit 131072)" in response.json()["error"]
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
    np.testing.assert_array_equal(decoded.as_numpy("logits"), OnnxRuntimeRunner(model_dir / "conv.onnx").run(images)["logits"])


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
    assert (defaults.max_body_bytes, defaults.max_response_bytes, defaults.max_held_body_bytes) == (64 * 2**20, 64 * 2**20, 256 * 2**20)
    assert defaults.body_timeout_s == 30.0 and defaults.openapi is False
    args = build_parser().parse_args(["serve", "--model", "m.onnx", "--max-response-mb", "1.5", "--max-held-body-mb", "128",
                                      "--body-timeout-s", "2", "--openapi"])
    chosen = settings_from_args(args)
    assert (chosen.max_response_bytes, chosen.max_held_body_bytes, chosen.body_timeout_s, chosen.openapi) == (
        3 * 2**19, 128 * 2**20, 2.0, True)
    with pytest.raises(ValueError, match=r"max_held_body_bytes \(1024\) must be at least max_body_bytes"):
        ServerSettings(max_held_body_bytes=1024)
    for field in ("max_response_bytes", "body_timeout_s", "header_timeout_s"):
        for value in (0, math.nan, math.inf):
            with pytest.raises(ValueError, match=f"server setting {field} must be a positive finite number"):
                ServerSettings(**{field: value})


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
        body = {"inputs": [{"name": "image", "shape": list(image.shape), "datatype": "FP32", "data": data}],
                "outputs": [{"name": "labels"}]}
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
    server = ServerProcess(write_conv_model(tmp_path / "conv.onnx"), "--threads", "1", *server_args, log_level="WARNING").wait_until_ready()
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
    assert len(during) >= 5, f"only {len(during)} probes while the request was in flight ({big['done'] - big['sent']:.2f} s)"
    print(f"\n{len(during)} probes in {big['done'] - big['sent']:.2f} s, worst {max(during) * 1000:.1f} ms")
    bound = HEALTH_BOUND_S + max(idle)
    assert max(during) < bound, f"health took up to {max(during) * 1000:.0f} ms during the request (idle worst {max(idle) * 1000:.0f} ms): {sorted(during)[-5:]}"
