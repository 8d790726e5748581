"""The real tritonclient.grpc against `noisyseg serve` (its own process, as a user runs it):
health, metadata, Triton's model-configuration and statistics extensions, inference with raw and
typed tensor contents, one dynamic batcher shared with HTTP, the API key and message limits,
messages that do not parse, names quoted at a bounded length, answers over the size limits and
requests over the inference budget refused before any inference, and health answered quickly
while a 2048 x 2048 request with typed contents and every output is in flight."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format, text_format
from scipy.special import softmax
from serve_helpers import CLASS_NAMES, write_conv_model
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from noisyseg import cli
from noisyseg.commands.serve import settings_from_args
from noisyseg.export.onnxruntime_runner import OnnxRuntimeRunner
from noisyseg.export.triton_repo import TritonRepoConfig, make_triton_repo
from noisyseg.serve.loadgen import ServerProcess
from noisyseg.serve.settings import ServerSettings

API_KEY = "grpc-test-key"
# The repository's batching: two images per batch, and a lone request waits for a
# partner (up to 1 s), so two requests sent together share one batch.
MAX_BATCH = 2
DELAY_US = 1_000_000


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`export triton-repo` of a small real ONNX model; returns the repository directory."""
    directory = tmp_path_factory.mktemp("grpc")
    model = write_conv_model(directory / "conv.onnx")
    make_triton_repo(
        model,
        directory / "repo",
        config=TritonRepoConfig(max_batch_size=MAX_BATCH, max_queue_delay_microseconds=DELAY_US),
    )
    return directory / "repo"


@contextlib.contextmanager
def grpc_server(model: Path, *args: str) -> Iterator[tuple[grpcclient.InferenceServerClient, ServerProcess]]:
    """`noisyseg serve --model MODEL ARGS` in its own process, with a tritonclient.grpc client."""
    server = ServerProcess(model, "--threads", "1", *args).wait_until_ready()
    client = grpcclient.InferenceServerClient(server.grpc_address)
    try:
        yield client, server
    finally:
        client.close()
        server.kill()


@pytest.fixture(scope="module")
def served(repo: Path):
    with grpc_server(repo) as running:
        yield running


@pytest.fixture(scope="module")
def guarded(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    """A server with an API key and a 10 KiB gRPC request limit."""
    key_file = tmp_path_factory.mktemp("key") / "key.txt"
    key_file.write_text(API_KEY)
    model = repo / "conv" / "1" / "model.onnx"
    with grpc_server(
        model, "--name", "conv", "--api-key-file", str(key_file), "--grpc-max-receive-mb", str(10 / 1024)
    ) as running:
        yield running


def grpc_infer(client, images: np.ndarray, outputs: list[str] | None = None, **kwargs):
    tensor = grpcclient.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    requested = [grpcclient.InferRequestedOutput(name) for name in outputs] if outputs else None
    return client.infer("conv", [tensor], outputs=requested, **kwargs)


def batch(seed: int, count: int = MAX_BATCH, size: tuple[int, int] = (8, 10)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, 1, *size)).astype(np.float32)


def test_health_and_metadata_agree_with_http(served) -> None:
    client, server = served
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("conv")
    assert not client.is_model_ready("other") and not client.is_model_ready("conv", model_version="7")
    metadata = client.get_server_metadata()
    assert metadata.name == "noisyseg"
    assert list(metadata.extensions) == ["binary_tensor_data", "model_configuration", "statistics"]
    http = httpclient.InferenceServerClient(server.address)
    expected = http.get_model_metadata("conv")
    model = client.get_model_metadata("conv")
    assert (model.name, list(model.versions), model.platform) == ("conv", ["1"], "onnxruntime_onnx")
    for ours, theirs in ((model.inputs, expected["inputs"]), (model.outputs, expected["outputs"])):
        assert [(t.name, t.datatype, list(t.shape)) for t in ours] == [
            (t["name"], t["datatype"], t["shape"]) for t in theirs
        ]
    http.close()


def test_model_config_is_what_export_triton_repo_wrote(served, repo: Path) -> None:
    client, server = served
    written = text_format.Parse((repo / "conv" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    config = client.get_model_config("conv").config
    for field in (
        "name",
        "platform",
        "max_batch_size",
        "input",
        "dynamic_batching",
        "parameters",
        "model_transaction_policy",
    ):
        assert getattr(config, field) == getattr(written, field), field
    # The graph's own output first, then what the server derives from it.
    assert list(config.output)[: len(written.output)] == list(written.output)
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output[1:]] == [
        ("probs", model_config_pb2.TYPE_FP32, [len(CLASS_NAMES), -1, -1]),
        ("labels", model_config_pb2.TYPE_INT64, [-1, -1]),
    ]
    http = httpclient.InferenceServerClient(server.address)
    assert json_format.ParseDict(http.get_model_config("conv"), model_config_pb2.ModelConfig()) == config
    http.close()


@pytest.mark.parametrize("outputs", [None, ["labels"]])
def test_infer_with_raw_contents_equals_onnx_runtime(served, repo: Path, outputs) -> None:
    client, _ = served
    images = batch(1)
    result = grpc_infer(client, images, outputs)
    logits = OnnxRuntimeRunner(repo / "conv" / "1" / "model.onnx").run(images)["logits"]
    returned = [output.name for output in result.get_response().outputs]
    assert returned == (outputs or ["logits", "probs", "labels"])
    np.testing.assert_array_equal(result.as_numpy("labels"), logits.argmax(axis=1))
    if outputs is None:
        np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(result.as_numpy("probs"), softmax(logits, axis=1), rtol=1e-5, atol=1e-7)


# Runs in its own process: the server's generated messages cannot share one with tritonclient's.
TYPED_ROUND_TRIP = """
import numpy as np
from noisyseg.serve.grpc_server import CONTENTS_FIELDS, decode_infer_request
from noisyseg.serve.proto import inference_pb2 as pb
rng = np.random.default_rng(0)
values = {
    "BOOL": rng.integers(0, 2, 300).astype(bool), "INT8": np.array([-128, 127, 0, -1]),
    "INT16": rng.integers(-2**15, 2**15, 300),
    "INT32": np.array([-2**31, 2**31 - 1, 0, -1, 300, 1 << 20]), "INT64": np.array([-2**63, 2**63 - 1, 0, -1, 1 << 40]),
    "UINT8": np.array([0, 255, 128]), "UINT16": np.array([0, 65535]), "UINT32": np.array([0, 2**32 - 1, 127, 128]),
    "UINT64": np.array([0, 2**64 - 1, 2**63], np.uint64), "FP32": rng.normal(size=300).astype(np.float32),
    "FP64": np.array([np.finfo(np.float64).max, -0.0, 1e-300, np.pi]),
}
assert set(values) == set(CONTENTS_FIELDS)
for datatype, array in values.items():
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[1, len(array)])
    getattr(tensor.contents, CONTENTS_FIELDS[datatype][0]).extend(array.tolist())
    decoded = decode_infer_request(pb.ModelInferRequest.FromString(request.SerializeToString())).inputs[0].array
    assert decoded.shape == (1, len(array)) and np.array_equal(decoded.ravel(), array), (datatype, decoded, array)
    assert np.array_equal(np.signbit(decoded), np.signbit(array.astype(decoded.dtype).reshape(1, -1))), datatype
empty = pb.ModelInferRequest()
empty.inputs.add(name="x", datatype="FP32", shape=[0])
assert decode_infer_request(empty).inputs[0].array.shape == (0,)
print("ok")
"""


def test_typed_contents_of_every_datatype_read_back_exactly() -> None:
    """The server reads typed values from their packed wire form (floats, and protobuf's varints
    with ten-byte negative numbers): each datatype's extremes come back as sent."""
    run = subprocess.run([sys.executable, "-c", TYPED_ROUND_TRIP], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_typed_contents_are_accepted_as_well_as_raw(served, repo: Path) -> None:
    """A request built from Triton's own messages with `contents.fp32_contents` instead of raw bytes."""
    _, server = served
    images = batch(2)
    request = service_pb2.ModelInferRequest(model_name="conv", id="typed-1")
    tensor = request.inputs.add(name="image", datatype="FP32", shape=images.shape)
    tensor.contents.fp32_contents.extend(images.ravel().tolist())
    request.outputs.add(name="logits")
    with grpc.insecure_channel(server.grpc_address) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert response.id == "typed-1" and [o.name for o in response.outputs] == ["logits"]
    logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(response.outputs[0].shape)
    expected = OnnxRuntimeRunner(repo / "conv" / "1" / "model.onnx").run(images)["logits"]
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)


def stats_of(client) -> dict:
    (stats,) = client.get_inference_statistics("conv")["model_stats"]
    return stats


def test_http_and_grpc_requests_share_one_batch_and_both_count(served) -> None:
    client, server = served
    http = httpclient.InferenceServerClient(server.address)
    before = stats_of(http)
    results: dict[str, np.ndarray] = {}

    def over_http() -> None:
        # tritonclient.http's gevent connections stay on the thread that made them.
        own = httpclient.InferenceServerClient(server.address)
        tensor = httpclient.InferInput("image", [1, 1, 8, 10], "FP32")
        tensor.set_data_from_numpy(batch(3, count=1))
        results["http"] = own.infer("conv", [tensor]).as_numpy("labels")
        own.close()

    def over_grpc() -> None:
        results["grpc"] = grpc_infer(client, batch(4, count=1)).as_numpy("labels")

    threads = [threading.Thread(target=over_http), threading.Thread(target=over_grpc)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert set(results) == {"http", "grpc"}
    after = stats_of(http)
    # Both protocols' statistics are the same counts.
    from_grpc = json_format.MessageToDict(
        client.get_inference_statistics("conv").model_stats[0], preserving_proto_field_name=True
    )
    assert int(from_grpc["execution_count"]) == after["execution_count"]
    assert int(from_grpc["inference_stats"]["success"]["count"]) == after["inference_stats"]["success"]["count"]

    def pairs(stats: dict) -> int:
        return next((b["compute_infer"]["count"] for b in stats["batch_stats"] if b["batch_size"] == 2), 0)

    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 2
    assert after["inference_count"] - before["inference_count"] == 2
    # One model call ran both requests, a batch of two images.
    assert after["execution_count"] - before["execution_count"] == 1
    assert pairs(after) - pairs(before) == 1
    assert after["inference_stats"]["queue"]["ns"] > before["inference_stats"]["queue"]["ns"]
    http.close()


def test_errors_carry_the_matching_status_and_name_the_problem(served) -> None:
    client, _ = served
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_config("other")
    assert unknown.value.status() == "StatusCode.NOT_FOUND" and "unknown model 'other'" in unknown.value.message()
    wrong = grpcclient.InferInput("pixels", [1, 1, 8, 8], "FP32")
    wrong.set_data_from_numpy(batch(5, count=1, size=(8, 8)))
    with pytest.raises(InferenceServerException) as bad_name:
        client.infer("conv", [wrong])
    assert bad_name.value.status() == "StatusCode.INVALID_ARGUMENT" and "named 'image'" in bad_name.value.message()
    with pytest.raises(InferenceServerException) as too_many:
        grpc_infer(client, batch(6, count=MAX_BATCH + 1))
    assert (
        too_many.value.status() == "StatusCode.INVALID_ARGUMENT" and "maximum batch size 2" in too_many.value.message()
    )
    # The HTTP checks on decoded tensors hold for gRPC: a NaN pixel is refused, naming the input.
    nan = batch(7, count=1, size=(8, 8))
    nan[0, 0, 3, 4] = np.nan
    with pytest.raises(InferenceServerException) as non_finite:
        grpc_infer(client, nan)
    assert non_finite.value.status() == "StatusCode.INVALID_ARGUMENT" and "'image'" in non_finite.value.message()
    # Refused before the batcher: never queued, so not a failed inference.
    assert client.get_inference_statistics("conv").model_stats[0].inference_stats.fail.count == 0


def test_api_key_is_required_except_for_health(guarded) -> None:
    client, _ = guarded
    assert client.is_server_live() and client.is_server_ready()
    with pytest.raises(InferenceServerException) as refused:
        grpc_infer(client, batch(7, count=1))
    assert refused.value.status() == "StatusCode.UNAUTHENTICATED" and "API key" in refused.value.message()
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("conv", headers={"authorization": "Bearer wrong-key"})
    assert client.get_model_metadata("conv", headers={"authorization": f"Bearer {API_KEY}"}).name == "conv"
    result = grpc_infer(client, batch(7, count=1), headers={"x-api-key": API_KEY})
    assert result.as_numpy("labels").shape == (1, 8, 10)


def test_a_message_over_the_receive_limit_is_refused(guarded) -> None:
    client, _ = guarded
    headers = {"x-api-key": API_KEY}
    assert grpc_infer(client, batch(8, count=1, size=(16, 16)), headers=headers).as_numpy("labels").shape == (1, 16, 16)
    with pytest.raises(InferenceServerException) as too_large:
        grpc_infer(client, batch(8, count=1, size=(64, 64)), headers=headers)  # 16 KiB of pixels
    assert too_large.value.status() == "StatusCode.RESOURCE_EXHAUSTED"


def test_command_line_grpc_options_become_settings() -> None:
    parser = cli.build_parser()
    default = settings_from_args(parser.parse_args(["serve", "--model", "m.onnx"]))
    assert (default.host, default.grpc_port) == ("127.0.0.1", 8001)
    assert (default.grpc_max_receive_bytes, default.grpc_max_send_bytes) == (64 * 2**20, 256 * 2**20)
    off = settings_from_args(
        parser.parse_args(["serve", "--model", "m.onnx", "--no-grpc", "--grpc-max-send-mb", "0.5"])
    )
    assert off.grpc_port is None and off.grpc_max_send_bytes == 2**19
    with pytest.raises(ValueError, match="port and grpc_port must differ"):
        ServerSettings(port=9000, grpc_port=9000)
    with pytest.raises(ValueError, match="below 2 GiB"):
        ServerSettings(grpc_max_receive_bytes=2**31)


def test_a_busy_grpc_port_stops_the_server_with_a_message_naming_it(repo: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "noisyseg",
            "serve",
            "--model",
            str(repo),
            "--port",
            "0",
            "--grpc-port",
            str(port),
        ]
        run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert (
        f"gRPC endpoint: cannot listen on 127.0.0.1:{port} (port in use? choose --grpc-port, or --no-grpc)"
        in run.stderr
    )


def raw_call(address: str, method: str, message: bytes) -> grpc.RpcError:
    """`message` sent as it is to a method of the service; the error it gets."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as refused:
            call(message, timeout=30)
    return refused.value


def test_a_message_that_does_not_parse_is_invalid_argument_with_one_warning_line(served) -> None:
    _, server = served
    valid = service_pb2.ModelInferRequest(
        model_name="conv",
        inputs=[service_pb2.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=[1, 1, 8, 8])],
        raw_input_contents=[bytes(256)],
    ).SerializeToString()
    log_before = server.log()
    cases = {"garbage": b"\xff\xff\xff\xff\xff", "truncated": valid[: len(valid) // 2], "cut length": b"\x0a\x80"}
    for case, message in cases.items():
        error = raw_call(server.grpc_address, "ModelInfer", message)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        assert (
            f"the inference.ModelInferRequest message ({len(message)} bytes) could not be parsed" == error.details()
        ), case
    error = raw_call(server.grpc_address, "ModelMetadata", b"\xff")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "ModelMetadataRequest" in error.details()
    logged = server.log()[len(log_before) :].splitlines()
    assert "Traceback" not in "\n".join(logged) and not [line for line in logged if " ERROR " in line], logged
    assert len([line for line in logged if "could not be parsed" in line]) == 4, logged


def test_a_long_model_name_is_not_found_and_quoted_cut_short(served) -> None:
    client, _ = served
    with pytest.raises(InferenceServerException) as unknown:
        grpc_infer_model(client, "m" * 16_000, batch(9, count=1))
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    message = unknown.value.message()
    assert "unknown model 'mmmm" in message and "(16002 characters)" in message and len(message) < 400, message[:500]


def grpc_infer_model(client, model: str, images: np.ndarray, outputs: list[str] | None = None, **kwargs):
    tensor = grpcclient.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    requested = [grpcclient.InferRequestedOutput(name) for name in outputs] if outputs else None
    return client.infer(model, [tensor], outputs=requested, **kwargs)


# Limits of the `limited` server: 48 x 48 images give logits and probs of 27 KiB each, labels of 18 KiB.
SEND_LIMIT_MB = 0.03  # 31,457 bytes
RESPONSE_LIMIT_MB = 0.05  # 52,428 bytes
PIXEL_BUDGET = 4096


@pytest.fixture(scope="module")
def limited(repo: Path):
    model = repo / "conv" / "1" / "model.onnx"
    args = (
        "--name",
        "conv",
        "--grpc-max-send-mb",
        str(SEND_LIMIT_MB),
        "--max-response-mb",
        str(RESPONSE_LIMIT_MB),
        "--max-batch-pixels",
        str(PIXEL_BUDGET),
    )
    with grpc_server(model, *args) as running:
        yield running


def expected_response_bytes(outputs: list[tuple[str, str, list[int], int]]) -> int:
    """The size of the ModelInferResponse for `outputs` (name, datatype, shape, raw bytes), by
    tritonclient's own protobuf classes."""
    response = service_pb2.ModelInferResponse(model_name="conv", model_version="1")
    for name, datatype, shape, size in outputs:
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(bytes(size))
    return response.ByteSize()


def metric(url: str, series: str) -> float:
    found = re.search(rf"^{re.escape(series)} (\S+)$", httpx.get(url + "/metrics").text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_answers_over_the_limits_and_requests_over_the_budget_are_refused_before_inference(limited) -> None:
    client, server = limited
    images = batch(10, count=1, size=(48, 48))
    scores, labels = 4 * len(CLASS_NAMES) * 48 * 48, 8 * 48 * 48
    url = f"http://{server.address}"
    success = 'noisyseg_inference_requests_total{model="conv",outcome="success"}'
    error = 'noisyseg_inference_requests_total{model="conv",outcome="error"}'
    before, log_before = client.get_inference_statistics("conv").model_stats[0], server.log()
    metrics_before = {series: metric(url, series) for series in (success, error)}
    cases = [
        # Every output: over --max-response-mb, INVALID_ARGUMENT as HTTP's 400.
        (
            None,
            "StatusCode.INVALID_ARGUMENT",
            f"exceeds the limit of {int(RESPONSE_LIMIT_MB * 2**20)} bytes",
            expected_response_bytes(
                [
                    ("logits", "FP32", [1, 3, 48, 48], scores),
                    ("probs", "FP32", [1, 3, 48, 48], scores),
                    ("labels", "INT64", [1, 48, 48], labels),
                ]
            ),
        ),
        # Under it, but over --grpc-max-send-mb: RESOURCE_EXHAUSTED, gRPC's own code for it.
        (
            ["logits", "labels"],
            "StatusCode.RESOURCE_EXHAUSTED",
            f"over the gRPC message limit of {int(SEND_LIMIT_MB * 2**20)} bytes",
            expected_response_bytes(
                [("logits", "FP32", [1, 3, 48, 48], scores), ("labels", "INT64", [1, 48, 48], labels)]
            ),
        ),
    ]
    for outputs, status, message, size in cases:
        with pytest.raises(InferenceServerException) as refused:
            grpc_infer(client, images, outputs)
        assert refused.value.status() == status and message in refused.value.message(), refused.value.message()
        assert f" {size} bytes" in refused.value.message(), (
            size,
            refused.value.message(),
        )  # the exact size, known in advance
    with pytest.raises(InferenceServerException) as over:
        grpc_infer(client, batch(11, count=1, size=(80, 80)), ["labels"])
    assert over.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert (
        "6400 pixels exceeds the server's inference budget of 4096 pixels per model call (--max-batch-pixels)"
        in over.value.message()
    )
    # Nothing ran, nothing counted as answered; /metrics counts the three as failures.
    after = client.get_inference_statistics("conv").model_stats[0]
    assert after.execution_count == before.execution_count
    assert after.inference_stats.success.count == before.inference_stats.success.count
    assert metric(url, success) == metrics_before[success]
    assert metric(url, error) == metrics_before[error] + 3
    logged = server.log()[len(log_before) :]
    assert (
        "Traceback" not in logged and len([line for line in logged.splitlines() if "--grpc-max-send-mb" in line]) == 1
    ), logged
    # Labels alone fit both limits.
    assert grpc_infer(client, images, ["labels"]).as_numpy("labels").shape == (1, 48, 48)


# What a request may add to a health check's time here. The target is 100 ms (the figures this
# test prints are in docs/benchmarks.md: 70-108 ms); on this shared 2-core machine under load,
# grpcio's and protobuf's own copies of the 16 MiB request and of the answer each hold the GIL
# (and so the event loop) for up to 100-250 ms. Decoding the typed values on the loop stalled it
# 0.7 s (the issue, an idle machine) to 0.8 s and more here.
STALL_BOUND_S = 0.5
# Sends one 2048 x 2048 image as typed fp32_contents (16 MiB of packed floats, 4 Mi values) and
# asks for `labels` and `probs` (the 32 MiB and 48 MiB answers), in its own process (a client in
# the test's process would stall the probes with its own work on the answer); prints when it sent
# and when the answer was in, and writes the answer. (Every output would be 128 MiB: grpcio copies
# a response in one step holding the GIL, which alone stalls the loop about 100 ms here for that
# size; docs/serving.md.)
SEND_TYPED = """
import sys, time
import grpc, numpy as np
from tritonclient.grpc import service_pb2
address, answer = sys.argv[1], sys.argv[2]
images = np.random.default_rng(12).normal(size=(1, 1, 2048, 2048)).astype(np.float32)
request = service_pb2.ModelInferRequest(model_name="conv")
request.inputs.add(name="image", datatype="FP32", shape=images.shape).contents.fp32_contents.extend(images.ravel())
request.outputs.add(name="probs")
request.outputs.add(name="labels")
message = request.SerializeToString()
with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 2**31 - 1),
                                             ("grpc.max_send_message_length", 2**31 - 1)]) as channel:
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # the answer stays bytes
    grpc.channel_ready_future(channel).result(timeout=30)
    print("sent", time.time(), flush=True)
    response = call(message, timeout=120)
    print("done", time.time(), flush=True)
open(answer, "wb").write(response)
"""


def test_health_stays_quick_while_a_2048_square_request_with_typed_contents_is_in_flight(tmp_path) -> None:
    model = write_conv_model(tmp_path / "conv.onnx")
    args = ("--max-response-mb", "100", "--grpc-max-receive-mb", "48")
    server = ServerProcess(model, "--threads", "1", *args, log_level="WARNING").wait_until_ready()
    answer = tmp_path / "answer.bin"
    try:
        with httpx.Client(base_url=f"http://{server.address}", timeout=30) as probe:
            probe.get("/v2/health/ready")
            idle = []
            for _ in range(40):  # the machine's own jitter right now, nothing in flight
                started = time.perf_counter()
                probe.get("/v2/health/ready")
                idle.append(time.perf_counter() - started)
                time.sleep(0.02)
            sender = subprocess.Popen(
                [sys.executable, "-c", SEND_TYPED, server.grpc_address, str(answer)], stdout=subprocess.PIPE, text=True
            )
            probes: list[tuple[float, float]] = []
            while sender.poll() is None:
                started = time.time()
                assert probe.get("/v2/health/ready").json() == {"ready": True}
                probes.append((started, time.time()))
                time.sleep(0.02)
        times = dict(line.split() for line in sender.stdout.read().splitlines())
        assert sender.returncode == 0, times
    finally:
        server.kill()
    response = service_pb2.ModelInferResponse.FromString(answer.read_bytes())
    assert [output.name for output in response.outputs] == ["probs", "labels"]
    images = np.random.default_rng(12).normal(size=(1, 1, 2048, 2048)).astype(np.float32)
    logits = OnnxRuntimeRunner(model).run(images)["logits"]
    probs = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(1, 3, 2048, 2048)
    np.testing.assert_allclose(probs, softmax(logits, axis=1), rtol=1e-5, atol=1e-7)
    labels = np.frombuffer(response.raw_output_contents[1], dtype="<i8").reshape(1, 2048, 2048)
    np.testing.assert_array_equal(labels, logits.argmax(axis=1))
    sent, done = float(times["sent"]), float(times["done"])
    during = [end - start for start, end in probes if start >= sent and end <= done]
    assert len(during) >= 5, f"only {len(during)} probes while the request was in flight ({done - sent:.2f} s)"
    print(f"\n{len(during)} probes in {done - sent:.2f} s, worst {max(during) * 1000:.1f} ms")
    bound = STALL_BOUND_S + max(idle)
    assert max(during) < bound, (
        f"health took up to {max(during) * 1000:.0f} ms (idle worst {max(idle) * 1000:.0f} ms): {sorted(during)[-5:]}"
    )
