"""The real, unmodified tritonclient against `noisyseg serve` on a UNet exported by
`noisyseg export onnx`; also the PyTorch and model-repository backends and the TensorRT error."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from serve_helpers import running_server
from tritonclient.utils import InferenceServerException

from noisyseg import cli
from noisyseg.export.onnx_export import sample_images
from noisyseg.export.onnxruntime_runner import OnnxRuntimeRunner
from noisyseg.export.triton_repo import TritonRepoConfig, make_triton_repo
from noisyseg.models import create_model
from noisyseg.models.model_file import ModelInfo, save_model
from noisyseg.run.run_dir import RunDir
from noisyseg.serve.loadgen import ServerProcess
from noisyseg.serve.runtimes import open_runtimes
from noisyseg.serve.settings import ServerSettings

CLASSES = ["background", "esophagus", "heart", "trachea", "aorta"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small trained-shape UNet: its run directory and its exported `model.onnx`."""
    torch.manual_seed(0)
    run_dir = tmp_path_factory.mktemp("run")
    model = create_model("unet", base_width=4)
    save_model(RunDir(run_dir).model_file, model, ModelInfo("unet", {"base_width": 4}, CLASSES, method="adele+arm"))
    onnx_path = run_dir / "model.onnx"
    # Exported by the command a user runs (the faster tracer keeps the test short).
    assert (
        cli.main(["export", "onnx", "--checkpoint", str(run_dir), "--out", str(onnx_path), "--exporter", "torchscript"])
        == 0
    )
    return run_dir, onnx_path


@pytest.fixture(scope="module")
def served(exported):
    """`noisyseg serve --model model.onnx` as a user runs it, in its own process."""
    server = ServerProcess(exported[1], "--name", "unet", "--threads", "1", "--max-queue-delay-ms", "2")
    client = httpclient.InferenceServerClient(server.address, connection_timeout=5, network_timeout=30)
    try:
        server.wait_until_ready()
        yield client, server
    finally:
        server.kill()
        client.close()


def infer(client, model: str, images: np.ndarray, outputs: list[str] | None, binary: bool):
    tensor = httpclient.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=binary)
    requested = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in outputs] if outputs else None
    return client.infer(model, [tensor], outputs=requested)


def test_readiness_and_metadata(served) -> None:
    client, _ = served
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("unet")
    assert not client.is_model_ready("other")
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data", "model_configuration", "statistics"]
    metadata = client.get_model_metadata("unet")
    assert metadata["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, -1, -1]}]
    assert [(o["name"], o["shape"]) for o in metadata["outputs"]] == [
        ("logits", [-1, 5, -1, -1]),
        ("probs", [-1, 5, -1, -1]),
        ("labels", [-1, -1, -1]),
    ]


@pytest.mark.parametrize("binary", [True, False])
def test_infer_equals_the_onnx_runtime_runner(served, exported, binary: bool) -> None:
    client, _ = served
    images = sample_images((2, 1, 48, 64), seed=5)
    result = infer(client, "unet", images, ["logits", "probs", "labels"], binary)
    expected = OnnxRuntimeRunner(exported[1], intra_op_threads=1).run(images)["logits"]
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        result.as_numpy("probs"), torch.softmax(torch.from_numpy(expected), 1).numpy(), atol=1e-6
    )
    np.testing.assert_array_equal(result.as_numpy("labels"), expected.argmax(axis=1))
    assert result.as_numpy("labels").dtype == np.int64


def test_default_outputs_come_back_in_binary_and_errors_reach_the_client(served, exported) -> None:
    client, _ = served
    images = sample_images((1, 1, 32, 32), seed=6)
    result = infer(client, "unet", images, None, binary=True)
    assert [out["name"] for out in result.get_response()["outputs"]] == ["logits", "probs", "labels"]
    np.testing.assert_array_equal(
        result.as_numpy("labels"), OnnxRuntimeRunner(exported[1]).run(images)["logits"].argmax(1)
    )
    wrong = httpclient.InferInput("image", [1, 1, 32, 32], "FP64")
    wrong.set_data_from_numpy(images.astype(np.float64))
    with pytest.raises(InferenceServerException, match="datatype must be FP32, got FP64") as caught:
        client.infer("unet", [wrong])
    assert caught.value.status() == "400"


def test_sigterm_shuts_the_cli_server_down_cleanly(served) -> None:
    # Runs last in this module: it stops the shared server.
    client, server = served
    assert infer(client, "unet", sample_images((1, 1, 32, 32)), ["labels"], True).as_numpy("labels").shape == (
        1,
        32,
        32,
    )
    server.process.send_signal(signal.SIGTERM)
    # uvicorn finishes its shutdown, then re-raises the signal so the parent sees why it ended.
    assert server.process.wait(20) == -signal.SIGTERM
    log = server.log()
    assert "server stopped" in log and "Traceback" not in log
    # One structured (JSON) access line per request.
    access = [
        json.loads(line.split("noisyseg.serve.access: ", 1)[1])
        for line in log.splitlines()
        if "noisyseg.serve.access: " in line
    ]
    assert {
        "event": "http_request",
        "method": "POST",
        "path": "/v2/models/unet/infer",
        "route": "infer",
        "status": 200,
    }.items() <= access[-1].items()


def test_pytorch_checkpoint_gives_the_onnx_answers(exported) -> None:
    run_dir, onnx_path = exported
    (runtime,) = open_runtimes(run_dir)
    assert runtime.backend == "pytorch" and runtime.class_names == CLASSES
    images = sample_images((2, 1, 64, 48), seed=8)
    with running_server([runtime]) as server:
        client = httpclient.InferenceServerClient(server.address)
        result = infer(client, runtime.name, images, ["logits", "labels"], binary=True)
        config = client.get_model_config(runtime.name)
    runner = OnnxRuntimeRunner(onnx_path)
    # The configuration served for a checkpoint carries what `export onnx` records for it.
    assert {key: value["string_value"] for key, value in config["parameters"].items()} == runner.metadata
    assert config["input"] == [{"name": "image", "data_type": "TYPE_FP32", "dims": [1, -1, -1]}]
    expected = runner.run(images)["logits"]
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-4, atol=1e-4)
    assert (result.as_numpy("labels") == expected.argmax(1)).mean() >= 0.999


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(), reason="needs a CUDA device: torch.cuda.is_available() is False here"
            ),
        ),
    ],
)
def test_pytorch_checkpoint_runs_on_the_requested_device(exported, device: str) -> None:
    run_dir, onnx_path = exported
    (runtime,) = open_runtimes(run_dir, device=device)
    assert runtime.device.type == device
    images = sample_images((1, 1, 64, 48), seed=9)
    expected = OnnxRuntimeRunner(onnx_path).run(images)["logits"]
    np.testing.assert_allclose(runtime._run(images)["logits"], expected, rtol=1e-3, atol=1e-3)


def test_model_repository_serves_every_model_with_its_batching_config(exported, tmp_path: Path) -> None:
    _, onnx_path = exported
    make_triton_repo(onnx_path, tmp_path, config=TritonRepoConfig(model_name="seg_a", max_batch_size=4))
    make_triton_repo(onnx_path, tmp_path, config=TritonRepoConfig(model_name="seg_b", max_batch_size=16))
    runtimes = open_runtimes(tmp_path)
    assert [(r.name, r.version, r.max_batch_size, r.max_queue_delay_ms) for r in runtimes] == [
        ("seg_a", "1", 4, 0.1),
        ("seg_b", "1", 16, 0.1),
    ]
    images = sample_images((1, 1, 32, 32), seed=9)
    expected = OnnxRuntimeRunner(onnx_path).run(images)["logits"].argmax(1)
    with running_server(runtimes, ServerSettings(max_batch_size=8)) as server:
        client = httpclient.InferenceServerClient(server.address)
        for name in ("seg_a", "seg_b"):
            assert client.get_model_metadata(name, model_version="1")["versions"] == ["1"]
            np.testing.assert_array_equal(infer(client, name, images, ["labels"], True).as_numpy("labels"), expected)
        too_many = sample_images((5, 1, 32, 32))
        with pytest.raises(InferenceServerException, match="maximum batch size 4"):
            infer(client, "seg_a", too_many, ["labels"], True)
        assert infer(client, "seg_b", too_many, ["labels"], True).as_numpy("labels").shape == (5, 32, 32)


def test_a_tensorrt_plan_without_tensorrt_names_the_gpu_extra(tmp_path: Path, capsys) -> None:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not a real engine")
    with pytest.raises(RuntimeError, match=r"noisyseg\[gpu\]"):
        open_runtimes(plan)
    assert cli.main(["serve", "--model", str(plan)]) == 2
    assert "noisyseg[gpu]" in capsys.readouterr().err


def test_bad_model_paths_are_clear_errors(tmp_path: Path, capsys) -> None:
    assert cli.main(["serve", "--model", str(tmp_path / "missing.onnx")]) == 2
    assert "no such model file or directory" in capsys.readouterr().err
    (tmp_path / "weights.bin").write_bytes(b"")
    assert cli.main(["serve", "--model", str(tmp_path / "weights.bin")]) == 2
    assert "unknown model type '.bin'" in capsys.readouterr().err
    assert cli.main(["serve", "--model", str(tmp_path)]) == 2
    assert "not a model repository" in capsys.readouterr().err
    key_file = tmp_path / "key.txt"
    key_file.write_text("  \n")
    assert cli.main(["serve", "--model", str(tmp_path), "--api-key-file", str(key_file)]) == 2
    assert "API key file is empty" in capsys.readouterr().err
