"""The HTTP server over real ONNX Runtime models: routes, errors (the right 4xx, never a 5xx),
limits, the API key, metrics, timeouts, readiness, graceful shutdown and a fuzzed infer route."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import CLASS_NAMES, STRIDE, ServerThread, conv_runtime, running_server

from noisyseg.export.onnxruntime_runner import OnnxRuntimeRunner
from noisyseg.serve.app import create_app
from noisyseg.serve.metrics import ServerMetrics
from noisyseg.serve.settings import ServerSettings

BODY_LIMIT = 256 * 1024
API_KEY = "s3cret-key"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def server(model_dir):
    runtimes = [conv_runtime(model_dir, "conv"), conv_runtime(model_dir, "masks", output="labels")]
    with running_server(runtimes, ServerSettings(max_body_bytes=BODY_LIMIT, max_batch_size=4)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def direct(model_dir):
    """The ONNX Runtime runner itself on the same file: the reference for every answer."""
    return OnnxRuntimeRunner(model_dir / "conv.onnx")


def infer_json(
    images: np.ndarray, outputs: list[str] | None = None, name: str = "image", datatype: str = "FP32"
) -> dict:
    body: dict = {
        "inputs": [{"name": name, "shape": list(images.shape), "datatype": datatype, "data": images.ravel().tolist()}]
    }
    if outputs is not None:
        body["outputs"] = [{"name": output} for output in outputs]
    return body


def sample(count: int = 1, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, 1, size, size)).astype(np.float32)


def test_health_and_server_metadata(client) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data", "model_configuration", "statistics"]


def test_config_and_statistics_routes_with_versions_and_unknown_models(client) -> None:
    masks = client.get("/v2/models/masks/versions/1/config").json()
    # The server's batch limit (4) applies; the labels-only model offers only labels.
    assert (masks["name"], masks["max_batch_size"]) == ("masks", 4)
    assert masks["output"] == [{"name": "labels", "data_type": "TYPE_INT64", "dims": [-1, -1]}]
    assert masks["model_transaction_policy"] == {"decoupled": False}
    assert client.get("/v2/models/masks/versions/2/config").status_code == 404
    assert client.get("/v2/models/nothing/stats").status_code == 404
    before = client.get("/v2/models/masks/stats").json()["model_stats"][0]
    assert client.post("/v2/models/masks/infer", json=infer_json(sample(count=3, seed=9))).status_code == 200
    after = client.get("/v2/models/masks/versions/1/stats").json()["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == 3
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 1
    every = client.get("/v2/models/stats").json()["model_stats"]
    assert sorted(entry["name"] for entry in every) == ["conv", "masks"]


def test_model_metadata_lists_every_output_the_model_can_give(client) -> None:
    conv = client.get("/v2/models/conv").json()
    assert conv["platform"] == "onnxruntime_onnx" and conv["versions"] == ["1"]
    assert conv["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, -1, -1]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in conv["outputs"]] == [
        ("logits", "FP32", [-1, 3, -1, -1]),
        ("probs", "FP32", [-1, 3, -1, -1]),
        ("labels", "INT64", [-1, -1, -1]),
    ]
    assert json.loads(conv["parameters"]["class_names"]) == CLASS_NAMES
    masks = client.get("/v2/models/masks/versions/1").json()
    assert [o["name"] for o in masks["outputs"]] == ["labels"]
    assert client.get("/v2/models/conv/ready").json() == {"name": "conv", "ready": True}


def test_json_infer_equals_the_runner_and_derived_outputs_follow_from_logits(client, direct) -> None:
    images = sample(count=2, size=12)
    response = client.post("/v2/models/conv/versions/1/infer", json={**infer_json(images), "id": "q7"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "q7" and body["model_name"] == "conv"
    outputs = {out["name"]: np.array(out["data"]).reshape(out["shape"]) for out in body["outputs"]}
    logits = direct.run(images)["logits"]
    np.testing.assert_allclose(outputs["logits"], logits, rtol=1e-6, atol=1e-6)
    expected_probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(outputs["probs"], expected_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(outputs["labels"], logits.argmax(axis=1))


def test_labels_only_model_serves_labels_and_says_what_is_available(client, model_dir) -> None:
    images = sample(size=10, seed=4)
    response = client.post("/v2/models/masks/infer", json=infer_json(images))
    (labels,) = response.json()["outputs"]
    expected = OnnxRuntimeRunner(model_dir / "masks.onnx").run(images)["labels"]
    np.testing.assert_array_equal(np.array(labels["data"]).reshape(labels["shape"]), expected)
    refused = client.post("/v2/models/masks/infer", json=infer_json(images, outputs=["probs"]))
    assert refused.status_code == 400
    assert "cannot produce outputs ['probs']; available outputs: labels" in refused.json()["error"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (infer_json(sample(), name="pixels"), 400, "exactly one input named 'image'"),
        (infer_json(sample().astype(np.float64), datatype="FP64"), 400, "datatype must be FP32, got FP64"),
        (infer_json(sample()[0]), 400, "shape must have 4 dimensions"),
        (infer_json(np.zeros((1, 2, 8, 8), np.float32)), 400, "dimension 1 must be 1"),
        (infer_json(np.zeros((5, 1, 8, 8), np.float32)), 400, "maximum batch size 4, got 5"),
        (infer_json(np.zeros((0, 1, 8, 8), np.float32)), 400, "batch dimension must be between 1"),
        (infer_json(np.zeros((1, 1, STRIDE - 1, 8), np.float32)), 400, f"at least {STRIDE} pixels"),
        (infer_json(sample(), outputs=["mask"]), 400, "cannot produce outputs ['mask']"),
        (infer_json(sample(), outputs=["labels", "labels"]), 400, "more than once"),
        (
            {**infer_json(sample()), "inputs": [{**infer_json(sample())["inputs"][0], "data": [1.0] * 63}]},
            400,
            "has 63 elements, but shape implies 64",
        ),
        (
            {"inputs": [{"name": "image", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [1, 2, "3", 4]}]},
            400,
            "only FP32 values",
        ),
    ],
)
def test_bad_tensors_get_400_saying_what_was_wrong(client, body: dict, status: int, message: str) -> None:
    response = client.post("/v2/models/conv/infer", json=body)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_malformed_json_unknown_model_and_version(client) -> None:
    response = client.post("/v2/models/conv/infer", content=b'{"inputs": [')
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]
    response = client.post("/v2/models/unet/infer", json=infer_json(sample()))
    assert (
        response.status_code == 404 and "unknown model 'unet' (served models: conv, masks)" in response.json()["error"]
    )
    for path in ("/v2/models/unet", "/v2/models/unet/ready", "/v2/models/conv/versions/2"):
        assert client.get(path).status_code == 404
    assert (
        "no version '2'" in client.post("/v2/models/conv/versions/2/infer", json=infer_json(sample())).json()["error"]
    )
    assert client.get("/v2/nothing/here").json() == {"error": "Not Found"}


def test_bodies_over_the_limit_get_413_declared_streamed_or_compressed(client) -> None:
    oversized = b" " * (BODY_LIMIT + 1)
    response = client.post("/v2/models/conv/infer", content=oversized)
    assert response.status_code == 413 and f"limit of {BODY_LIMIT} bytes" in response.json()["error"]
    streamed = client.post("/v2/models/conv/infer", content=iter([b" " * 65536] * 8))  # chunked, no length
    assert streamed.status_code == 413
    bomb = gzip.compress(b" " * (BODY_LIMIT * 4))
    response = client.post("/v2/models/conv/infer", content=bomb, headers={"content-encoding": "gzip"})
    assert response.status_code == 413 and "decompressed" in response.json()["error"]


def test_compressed_requests_are_accepted(client, direct) -> None:
    images = sample(seed=3)
    raw = json.dumps(infer_json(images, outputs=["labels"])).encode()
    for encoding, data in (("gzip", gzip.compress(raw)), ("deflate", zlib.compress(raw))):
        response = client.post("/v2/models/conv/infer", content=data, headers={"content-encoding": encoding})
        labels = response.json()["outputs"][0]
        np.testing.assert_array_equal(
            np.array(labels["data"]).reshape(labels["shape"]), direct.run(images)["logits"].argmax(1)
        )
    response = client.post("/v2/models/conv/infer", content=raw, headers={"content-encoding": "br"})
    assert response.status_code == 415 and "'br' is not supported" in response.json()["error"]
    response = client.post("/v2/models/conv/infer", content=b"not gzip", headers={"content-encoding": "gzip"})
    assert response.status_code == 400 and "not valid gzip" in response.json()["error"]


def test_client_deadline_turns_into_504(client) -> None:
    body = {**infer_json(sample(size=64)), "parameters": {"timeout": 1}}  # one microsecond
    response = client.post("/v2/models/conv/infer", json=body)
    assert response.status_code == 504 and "did not answer within" in response.json()["error"]
    response = client.post("/v2/models/conv/infer", json={**infer_json(sample()), "parameters": {"timeout": "soon"}})
    assert response.status_code == 400


def test_metrics_count_requests_errors_latency_and_batches(client) -> None:
    before = client.get("/metrics").text
    for seed in range(3):
        assert (
            client.post("/v2/models/conv/infer", json=infer_json(sample(seed=seed), outputs=["labels"])).status_code
            == 200
        )
    assert client.post("/v2/models/conv/infer", json=infer_json(sample(), name="x")).status_code == 400
    after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain; version=0.0.4")

    def value(text: str, series: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(series + " ")]
        return float(lines[0].split()[-1]) if lines else 0.0

    for series, increase in [
        ('noisyseg_inference_requests_total{model="conv",outcome="success"}', 3),
        ('noisyseg_inference_requests_total{model="conv",outcome="error"}', 1),
        ('noisyseg_inference_request_duration_seconds_count{model="conv"}', 3),
        ('noisyseg_http_requests_total{route="infer",code="400"}', 1),
    ]:
        assert value(after.text, series) - value(before, series) == increase, series
    assert value(after.text, 'noisyseg_batch_size_count{model="conv"}') >= 3
    assert "# TYPE noisyseg_batch_size histogram" in after.text
    assert 'noisyseg_batch_size_bucket{model="conv",le="+Inf"}' in after.text


def test_api_key_is_required_except_for_health_probes(model_dir) -> None:
    with running_server([conv_runtime(model_dir, "keyed")], ServerSettings(api_key=API_KEY)) as keyed:
        with httpx.Client(base_url=keyed.url) as http:
            assert http.get("/v2/health/ready").status_code == 200
            body = infer_json(sample(), outputs=["labels"])
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"X-API-Key": API_KEY + "x"},
                {"Authorization": API_KEY},
            ):
                response = http.post("/v2/models/keyed/infer", json=body, headers=headers)
                assert response.status_code == 401 and "API key" in response.json()["error"]
            assert http.get("/v2/models/nope").status_code == 401  # no probing for model names
            assert http.get("/metrics").status_code == 401
            for headers in ({"Authorization": f"Bearer {API_KEY}"}, {"X-API-Key": API_KEY}):
                assert http.post("/v2/models/keyed/infer", json=body, headers=headers).status_code == 200


def test_not_ready_before_startup_gives_503(model_dir) -> None:
    app = create_app([conv_runtime(model_dir, "cold")])

    async def probe() -> None:
        # ASGITransport runs no lifespan: the batchers have not started.
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            assert (await http.get("/v2/health/live")).status_code == 200
            assert (await http.get("/v2/health/ready")).status_code == 503
            assert (await http.get("/v2/models/cold/ready")).status_code == 503
            response = await http.post("/v2/models/cold/infer", json=infer_json(sample()))
            assert response.status_code == 503 and "not ready" in response.json()["error"]

    asyncio.run(probe())


def test_graceful_shutdown_finishes_requests_in_flight(model_dir) -> None:
    settings = ServerSettings(max_queue_delay_ms=600, max_batch_size=8)
    runtime = conv_runtime(model_dir, "draining")
    server = ServerThread([runtime], settings).start()
    results: dict[int, httpx.Response] = {}

    def send(seed: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            results[seed] = http.post(
                "/v2/models/draining/infer", json=infer_json(sample(seed=seed), outputs=["labels"])
            )

    threads = [threading.Thread(target=send, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    batcher = server.app.state.models.models["draining"].batcher
    deadline = time.monotonic() + 10
    while batcher.queued_images < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert batcher.queued_images == 4  # all four wait in the batcher for its 600 ms delay
    server.stop()  # returns once uvicorn has shut down
    for thread in threads:
        thread.join(10)
    assert sorted(results) == [0, 1, 2, 3]
    for seed, response in results.items():
        assert response.status_code == 200
        labels = response.json()["outputs"][0]
        expected = runtime.infer(sample(seed=seed), frozenset({"labels"}))["labels"]
        np.testing.assert_array_equal(np.array(labels["data"]).reshape(labels["shape"]), expected)


_tensor_fields = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["image", "img", ""]),
        "shape": st.lists(st.integers(-1, 9), min_size=0, max_size=5),
        "datatype": st.sampled_from(["FP32", "FP64", "INT64", "UINT8", "BOOL", "BYTES", "fp32"]),
    },
    optional={
        "data": st.lists(
            st.one_of(st.floats(width=32), st.integers(-(2**40), 2**40), st.booleans(), st.none(), st.text(max_size=2)),
            max_size=100,
        ),
        "parameters": st.dictionaries(
            st.sampled_from(["binary_data_size", "other"]), st.integers(-4, 400) | st.text(max_size=3)
        ),
    },
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    inputs=st.lists(_tensor_fields, max_size=2),
    outputs=st.none()
    | st.lists(
        st.fixed_dictionaries(
            {"name": st.sampled_from(["logits", "probs", "labels", "x"])},
            optional={
                "parameters": st.dictionaries(
                    st.sampled_from(["binary_data", "classification"]), st.booleans() | st.integers(0, 3)
                )
            },
        ),
        max_size=3,
    ),
    binary_tail=st.binary(max_size=64),
    header_length=st.none() | st.integers(-1, 2000),
    model=st.sampled_from(["conv", "masks", "other"]),
)
def test_fuzzed_infer_requests_never_get_a_5xx(client, inputs, outputs, binary_tail, header_length, model) -> None:
    body = {"inputs": inputs} if outputs is None else {"inputs": inputs, "outputs": outputs}
    raw = json.dumps(body).encode()
    headers = {} if header_length is None else {"Inference-Header-Content-Length": str(header_length)}
    if binary_tail:
        headers.setdefault("Inference-Header-Content-Length", str(len(raw)))
    response = client.post(f"/v2/models/{model}/infer", content=raw + binary_tail, headers=headers)
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert response.json()["error"]


def test_metrics_text_format_histograms_are_cumulative_and_labels_escaped() -> None:
    metrics = ServerMetrics()
    for seconds in (0.0005, 0.003, 0.003, 20.0):
        metrics.inference_latency.observe(seconds, 'we"ird\nname')
    text = metrics.render()
    prefix = 'noisyseg_inference_request_duration_seconds_bucket{model="we\\"ird\\nname",'
    buckets = {
        line[len(prefix) :].split("}")[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }
    assert (
        buckets['le="0.001"'] == 1
        and buckets['le="0.005"'] == 3
        and buckets['le="10"'] == 3
        and buckets['le="+Inf"'] == 4
    )
    counts = list(buckets.values())
    assert counts == sorted(counts)
    assert 'noisyseg_inference_request_duration_seconds_count{model="we\\"ird\\nname"} 4' in text
    assert 'noisyseg_inference_request_duration_seconds_sum{model="we\\"ird\\nname"} 20.0065' in text
