"""The real tritonclient.grpc against `noisyseg serve` (its own process, as a user runs it):
health, metadata, Triton's model-configuration and statistics extensions, inference with raw and
typed tensor contents, one dynamic batcher shared with HTTP, the API key and message limits."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
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
    make_triton_repo(model, directory / "repo", config=TritonRepoConfig(max_batch_size=MAX_BATCH, max_queue_delay_microseconds=DELAY_US))
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
    with grpc_server(model, "--name", "conv", "--api-key-file", str(key_file), "--grpc-max-receive-mb", str(10 / 1024)) as running:
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
        assert [(t.name, t.datatype, list(t.shape)) for t in ours] == [(t["name"], t["datatype"], t["shape"]) for t in theirs]
    http.close()


def test_model_config_is_what_export_triton_repo_wrote(served, repo: Path) -> None:
    client, server = served
    written = text_format.Parse((repo / "conv" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    config = client.get_model_config("conv").config
    for field in ("name", "platform", "max_batch_size", "input", "dynamic_batching", "parameters", "model_transaction_policy"):
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
    from_grpc = json_format.MessageToDict(client.get_inference_statistics("conv").model_stats[0], preserving_proto_field_name=True)
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
    assert too_many.value.status() == "StatusCode.INVALID_ARGUMENT" and "maximum batch size 2" in too_many.value.message()
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
    off = settings_from_args(parser.parse_args(["serve", "--model", "m.onnx", "--no-grpc", "--grpc-max-send-mb", "0.5"]))
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
        command = [sys.executable, "-m", "noisyseg", "serve", "--model", str(repo), "--port", "0", "--grpc-port", str(port)]
        run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert f"gRPC endpoint: cannot listen on 127.0.0.1:{port} (port in use? choose --grpc-port, or --no-grpc)" in run.stderr
