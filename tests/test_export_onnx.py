"""ONNX export: graph, metadata, TensorRT compatibility, validation against PyTorch, the command."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from noisyseg import cli
from noisyseg.data.folder import normalize_image
from noisyseg.export.onnx_export import (
    METADATA_KEYS,
    DeployableSegmenter,
    ExportConfig,
    export_checkpoint,
    export_model,
    read_metadata,
    sample_images,
    tensorrt_compatibility_problems,
)
from noisyseg.io import file_sha256
from noisyseg.models import create_model
from noisyseg.models.model_file import ModelInfo, load_model, save_model
from noisyseg.run.run_dir import resolve_model_file

CLASSES = ["background", "esophagus", "heart", "trachea", "aorta"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    model = create_model("unet", base_width=8)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_model(
        path,
        model,
        ModelInfo("unet", {"base_width": 8}, CLASSES, method="adele+arm", extra={"epoch": 7, "selection": "noisy-val"}),
    )
    return path


@pytest.fixture(scope="module")
def dynamo_export(checkpoint, tmp_path_factory: pytest.TempPathFactory):
    """The default export (dynamo exporter, logits, dynamic batch/height/width), done once."""
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    report = export_checkpoint(checkpoint, out)
    return out, report


def reference_logits(checkpoint, images: np.ndarray) -> np.ndarray:
    """PyTorch on images normalised by the training loader's own function."""
    model, _ = load_model(resolve_model_file(checkpoint))
    normalised = np.stack([normalize_image(image) for image in images])
    with torch.inference_mode():
        return model(torch.from_numpy(normalised)).numpy()


def test_wrapper_normalisation_matches_the_training_loader() -> None:
    images = sample_images((3, 2, 40, 56), seed=3)
    wrapper = DeployableSegmenter(torch.nn.Identity(), "zscore", "logits")
    expected = np.stack([normalize_image(image) for image in images])
    np.testing.assert_allclose(wrapper(torch.from_numpy(images)).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_default_export_runs_any_size_and_matches_pytorch(checkpoint, dynamo_export) -> None:
    path, report = dynamo_export
    assert report.passed and report.argmax_agreement == 1.0
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert model.graph.input[0].name == "image" and dims == ["batch", 1, "height", "width"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.opset_import[0].version == 18
    # A batch and size the validation never used: ONNX Runtime itself, raw pixels in.
    images = sample_images((3, 1, 80, 112), seed=11)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": images})
    expected = reference_logits(checkpoint, images)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_metadata_describes_the_checkpoint(checkpoint, dynamo_export) -> None:
    metadata = read_metadata(onnx.load(str(dynamo_export[0])))
    assert set(metadata) == set(METADATA_KEYS)
    assert json.loads(metadata["class_names"]) == CLASSES
    assert metadata["normalization"] == "zscore"
    assert metadata["method"] == "adele+arm"
    assert metadata["noisyseg_version"] == cli.__version__
    assert metadata["checkpoint_sha256"] == file_sha256(checkpoint)
    assert metadata["output"] == "logits"
    assert metadata["stride"] == "16" and metadata["in_channels"] == "1"
    assert metadata["checkpoint"] == "epoch 7 (selected by noisy-val)"


def test_exported_graph_is_tensorrt_compatible(dynamo_export) -> None:
    model = onnx.load(str(dynamo_export[0]))
    assert tensorrt_compatibility_problems(model) == []
    resizes = [node for node in model.graph.node if node.op_type == "Resize"]
    assert resizes, "the UNet upsamples: its graph must contain Resize nodes"
    for node in resizes:  # sizes given (shape tensors TensorRT accepts), no runtime scales
        assert len(node.input) == 4 and node.input[2] == "" and node.input[3] != ""


def resize_model(scales_from_input: bool) -> onnx.ModelProto:
    """A one-node Resize graph, with scales either constant or fed at run time."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, 8, 8])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    node = helper.make_node("Resize", ["image", "", "scales"], ["out"], mode="linear")
    inputs, initializers = [image], []
    if scales_from_input:
        inputs.append(helper.make_tensor_value_info("scales", TensorProto.FLOAT, [4]))
    else:
        initializers.append(helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2]))
    graph = helper.make_graph([node], "g", inputs, [out], initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_compatibility_check_rejects_what_tensorrt_rejects() -> None:
    assert tensorrt_compatibility_problems(resize_model(scales_from_input=False)) == []
    problems = tensorrt_compatibility_problems(resize_model(scales_from_input=True))
    assert len(problems) == 1 and "scales input 'scales' must be a constant" in problems[0]
    # An operator outside TensorRT's parser, and an opset it does not parse.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, None)
    graph = helper.make_graph([helper.make_node("NonZero", ["x"], ["y"])], "g", [x], [y])
    problems = tensorrt_compatibility_problems(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert any("opset 21" in p for p in problems) and any("NonZero" in p for p in problems)


def test_probs_output_is_the_softmax_of_the_logits() -> None:
    torch.manual_seed(1)
    model = create_model("unet", base_width=4).eval()
    images = torch.from_numpy(sample_images((2, 1, 32, 48), seed=2))
    logits = DeployableSegmenter(model, "zscore", "logits")(images)
    probs = DeployableSegmenter(model, "zscore", "probs")(images)
    labels = DeployableSegmenter(model, "zscore", "labels")(images)
    torch.testing.assert_close(probs, torch.softmax(logits, dim=1))
    assert labels.dtype == torch.int64 and torch.equal(labels, logits.argmax(dim=1))


class WidthSpecialised(torch.nn.Module):
    """Negates its logits on wide inputs: a Python branch a tracer silently bakes in."""

    stride = 16

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Conv2d(1, 5, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(images)
        return -logits if images.shape[-1] > 64 else logits


def test_export_that_does_not_reproduce_pytorch_is_refused_with_numbers(tmp_path) -> None:
    out = tmp_path / "bad.onnx"
    info = ModelInfo("unet", {}, CLASSES)
    # Traced at width 64 (the first validation size); validated also at width 80, where it differs.
    with pytest.raises(RuntimeError) as caught:
        export_model(WidthSpecialised(), info, out, ExportConfig(exporter="torchscript"))
    message = str(caught.value)
    assert "does not reproduce PyTorch" in message and "max abs error" in message and "argmax agreement" in message
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_static_size_must_fit_the_stride(checkpoint, tmp_path) -> None:
    with pytest.raises(ValueError, match="multiples of the model stride 16"):
        export_checkpoint(checkpoint, tmp_path / "m.onnx", ExportConfig(static_size=(100, 64)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_tracing_on_a_missing_gpu_is_refused_before_anything_is_written(checkpoint, tmp_path) -> None:
    with pytest.raises(ValueError, match="^--device: 'cuda' asks for a CUDA GPU"):
        export_checkpoint(checkpoint, tmp_path / "m.onnx", ExportConfig(device="cuda", exporter="torchscript"))
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: torch.cuda.is_available() is False here"
)
def test_tracing_on_the_gpu_exports_a_graph_that_matches_pytorch_on_the_cpu(checkpoint, tmp_path) -> None:
    out = tmp_path / "cuda.onnx"
    export_checkpoint(checkpoint, out, ExportConfig(device="cuda", exporter="torchscript"))
    images = sample_images((2, 1, 64, 64), seed=7)
    (logits,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": images})
    np.testing.assert_allclose(logits, reference_logits(checkpoint, images), rtol=1e-3, atol=1e-3)


def run_cli(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> int:
    # Only this part's commands: the other parts' command modules are not needed here.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["noisyseg.commands.export"])
    return cli.main(argv)


def test_export_onnx_command_labels_static(checkpoint, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "cli.onnx"
    code = run_cli(
        monkeypatch,
        [
            "export",
            "onnx",
            "--checkpoint",
            str(checkpoint.parent),
            "--out",
            str(out),
            "--output",
            "labels",
            "--static",
            "64x96",
            "--exporter",
            "torchscript",
            "--opset",
            "17",
        ],
    )
    assert code == 0 and "argmax agreement 100.0000%" in capsys.readouterr().out
    model = onnx.load(str(out))
    assert model.opset_import[0].version == 17 and tensorrt_compatibility_problems(model) == []
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, 64, 96]
    images = sample_images((2, 1, 64, 96), seed=5)
    (labels,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": images})
    assert labels.dtype == np.int64 and labels.shape == (2, 64, 96)
    assert np.mean(labels == reference_logits(checkpoint, images).argmax(axis=1)) >= 0.999
    code = run_cli(monkeypatch, ["export", "onnx", "--checkpoint", str(tmp_path / "missing"), "--out", str(out)])
    assert code == 2 and "no model checkpoint" in capsys.readouterr().err


def test_deeplab_exports_validated_and_tensorrt_compatible(tmp_path) -> None:
    torch.manual_seed(0)
    kwargs = {"base_width": 4}
    model = create_model("deeplabv3plus", **kwargs).eval()
    out = tmp_path / "deeplab.onnx"
    report = export_model(model, ModelInfo("deeplabv3plus", kwargs, CLASSES), out, ExportConfig(exporter="torchscript"))
    assert report.passed and report.shapes[0][2] == 4 * model.stride
    assert tensorrt_compatibility_problems(onnx.load(str(out))) == []
