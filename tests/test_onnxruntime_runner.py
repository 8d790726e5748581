"""OnnxRuntimeRunner: interface, session options, outputs against ONNX Runtime and PyTorch, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch

from noisyseg.export import onnxruntime_runner
from noisyseg.export.onnx_export import (
    DeployableSegmenter,
    ExportConfig,
    export_model,
    sample_images,
)
from noisyseg.export.onnxruntime_runner import OnnxRuntimeRunner, default_providers
from noisyseg.models import create_model
from noisyseg.models.model_file import ModelInfo

CLASSES = ["background", "heart", "aorta"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """A small UNet exported with the fast (torchscript) exporter, and the model itself."""
    torch.manual_seed(0)
    model = create_model("unet", num_classes=3, base_width=4, depth=3).eval()
    path = tmp_path_factory.mktemp("runner") / "model.onnx"
    export_model(
        model,
        ModelInfo("unet", {"num_classes": 3, "base_width": 4, "depth": 3}, CLASSES),
        path,
        ExportConfig(exporter="torchscript"),
    )
    return path, model


def test_interface_describes_the_model(exported) -> None:
    runner = OnnxRuntimeRunner(exported[0])
    assert runner.input_name == "image"
    assert runner.input_shape == ["batch", 1, "height", "width"]
    assert runner.output_names == ["logits"]
    assert json.loads(runner.metadata["class_names"]) == CLASSES
    assert runner.metadata["output"] == "logits"
    assert runner.providers == ["CPUExecutionProvider"]  # this onnxruntime build has no GPU providers


def test_session_options_are_chosen_for_speed(exported) -> None:
    options = OnnxRuntimeRunner(exported[0]).session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.intra_op_num_threads == os.cpu_count()
    assert OnnxRuntimeRunner(exported[0], intra_op_threads=1).session.get_session_options().intra_op_num_threads == 1
    quiet = OnnxRuntimeRunner(exported[0], allow_spinning=False).session.get_session_options()
    assert quiet.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_run_matches_plain_onnxruntime_and_pytorch(exported) -> None:
    path, model = exported
    images = sample_images((3, 1, 48, 80), seed=4)
    outputs = OnnxRuntimeRunner(path).run(images)
    assert list(outputs) == ["logits"]
    (plain,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": images})
    np.testing.assert_array_equal(outputs["logits"], plain)
    with torch.inference_mode():
        expected = DeployableSegmenter(model)(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(outputs["logits"], expected, rtol=1e-4, atol=1e-4)


def test_accepts_serialised_bytes(exported) -> None:
    runner = OnnxRuntimeRunner(exported[0].read_bytes())
    images = sample_images((1, 1, 32, 32), seed=1)
    np.testing.assert_array_equal(runner.run(images)["logits"], OnnxRuntimeRunner(exported[0]).run(images)["logits"])


def test_accelerated_providers_come_first_when_installed(monkeypatch) -> None:
    available = ["CPUExecutionProvider", "CUDAExecutionProvider", "AzureExecutionProvider", "TensorrtExecutionProvider"]
    monkeypatch.setattr(onnxruntime_runner.ort, "get_available_providers", lambda: available)
    assert default_providers() == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_bad_input_is_reported_clearly(exported, tmp_path) -> None:
    runner = OnnxRuntimeRunner(exported[0])
    with pytest.raises(ValueError, match=r"input 'image': expected 4 dimensions"):
        runner.run(np.zeros((1, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"input 'image': dimension 1 must be 1"):
        runner.run(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(FileNotFoundError, match="no ONNX model file"):
        OnnxRuntimeRunner(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="CUDAExecutionProvider.*not available"):
        OnnxRuntimeRunner(exported[0], providers=["CUDAExecutionProvider"])
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="broken.onnx: ONNX Runtime cannot load the model"):
        OnnxRuntimeRunner(broken)
