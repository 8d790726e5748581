"""Static INT8 QDQ quantisation: graph form, TensorRT constraints, measured mIoU, refusal, command."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_datasets import voc  # noqa: F401  (fixture: a tiny VOC tree, images of different sizes)

from noisyseg import cli
from noisyseg.data.folder import read_dataset_info
from noisyseg.data.phantom import PhantomConfig, generate_phantom
from noisyseg.data.run_data import load_split
from noisyseg.evaluation.metrics import confusion_matrix, mean_iou
from noisyseg.export.onnx_export import (
    DeployableSegmenter,
    ExportConfig,
    export_model,
    tensorrt_compatibility_problems,
)
from noisyseg.export.quantize import QuantizeConfig, classifier_node, quantize_onnx
from noisyseg.models import create_model
from noisyseg.models.model_file import ModelInfo


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("phantom")
    generate_phantom(root, num_patients=5, seed=0, config=PhantomConfig(size=48, slices_per_patient=6))
    return root


@pytest.fixture(scope="module")
def fp32_model(dataset, tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    kwargs = {"base_width": 8, "depth": 3}
    model = create_model("unet", **kwargs).eval()
    path = tmp_path_factory.mktemp("fp32") / "model.onnx"
    info = ModelInfo("unet", kwargs, read_dataset_info(dataset).classes)
    export_model(model, info, path, ExportConfig(exporter="torchscript"))
    return path, model


def pytorch_test_miou(model: torch.nn.Module, dataset) -> float:
    """Independent reference: PyTorch on the test split, one confusion matrix."""
    split = load_split(dataset, "test")
    with torch.inference_mode():
        labels = DeployableSegmenter(model, "zscore", "labels")(torch.from_numpy(split.images)).numpy()
    return 100 * mean_iou(confusion_matrix(labels, split.masks, read_dataset_info(dataset).num_classes))


def test_quantised_model_is_qdq_int8_that_tensorrt_accepts(dataset, fp32_model, tmp_path) -> None:
    fp32_path, model = fp32_model
    out = tmp_path / "model.int8.onnx"
    report = quantize_onnx(fp32_path, dataset, out, QuantizeConfig(timing_runs=2))
    quantized = onnx.load(str(out))
    ops = [node.op_type for node in quantized.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    assert tensorrt_compatibility_problems(quantized) == []  # symmetric: every zero point is 0
    initializers = {init.name: onnx.numpy_helper.to_array(init) for init in quantized.graph.initializer}
    producers = {output: node for node in quantized.graph.node for output in node.output}
    convolutions = [node for node in quantized.graph.node if node.op_type == "Conv"]
    classifier_name = classifier_node(onnx.load(str(fp32_path)))
    for conv in convolutions:
        if conv.name == classifier_name:  # kept fp32: float weights straight from an initializer
            assert initializers[conv.input[1]].dtype == np.float32
        else:  # int8 weights, dequantised in the graph; biases int32
            weight_source = producers[conv.input[1]]
            assert weight_source.op_type == "DequantizeLinear" and initializers[weight_source.input[0]].dtype == np.int8
            assert initializers[producers[conv.input[2]].input[0]].dtype == np.int32
    assert classifier_name in {conv.name for conv in convolutions}
    assert report.excluded_nodes == [classifier_name]
    # Metadata carried over, plus how it was quantised.
    metadata = {p.key: p.value for p in quantized.metadata_props}
    assert metadata["output"] == "logits" and "int8 static QDQ" in metadata["quantization"]
    assert (
        metadata["calibration_images"] == str(report.calibration_images) == str(len(load_split(dataset, "train").ids))
    )

    # The reported numbers, recomputed independently: PyTorch for fp32, plain ORT for int8.
    assert report.fp32_miou == pytest.approx(pytorch_test_miou(model, dataset), abs=0.05)
    split = load_split(dataset, "test")
    (logits,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": split.images})
    int8_miou = 100 * mean_iou(
        confusion_matrix(logits.argmax(axis=1), split.masks, read_dataset_info(dataset).num_classes)
    )
    assert report.int8_miou == pytest.approx(int8_miou, abs=1e-6)
    assert report.miou_drop == pytest.approx(report.fp32_miou - report.int8_miou)
    assert report.miou_drop <= 1.0
    assert report.speedup == pytest.approx(report.fp32_latency_ms / report.int8_latency_ms)


def test_model_losing_too_much_accuracy_is_not_written(dataset, fp32_model, tmp_path) -> None:
    out = tmp_path / "model.int8.onnx"
    # Demanding that int8 beat fp32 by a point: refused, with the measured numbers.
    with pytest.raises(RuntimeError, match=r"loses too much accuracy.*test mIoU fp32 [0-9.]+, int8 [0-9.]+ \(drop"):
        quantize_onnx(fp32_model[0], dataset, out, QuantizeConfig(max_miou_drop=-1.0, timing_runs=1))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_quantize_command(dataset, fp32_model, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["noisyseg.commands.export"])
    out, report = tmp_path / "q.onnx", tmp_path / "q.json"
    argv = [
        "export",
        "quantize",
        "--onnx",
        str(fp32_model[0]),
        "--calib-data",
        str(dataset),
        "--out",
        str(out),
        "--calib-images",
        "4",
        "--quantize-classifier",
        "--report",
        str(report),
    ]
    assert cli.main(argv) == 0
    assert "speed-up" in capsys.readouterr().out and out.is_file()
    assert '"calibration_images": 4' in report.read_text() and '"excluded_nodes": []' in report.read_text()
    assert (
        cli.main(
            [
                "export",
                "quantize",
                "--onnx",
                str(fp32_model[0]),
                "--calib-data",
                str(tmp_path / "none"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "none" in capsys.readouterr().err


def test_histogram_calibration_handles_a_ragged_last_batch(dataset, fp32_model) -> None:
    # 5 images in batches of 4 would leave a batch of 1: the histogram calibrators need equal shapes.
    from noisyseg.export.quantize import calibration_images, quantize_to_bytes

    config = QuantizeConfig(calibration_method="percentile", max_calibration_images=5, batch_size=4)
    images = calibration_images(dataset, config)
    quantized_bytes, _ = quantize_to_bytes(fp32_model[0], images, config)
    quantized = onnx.load_from_string(quantized_bytes)
    assert len(images) == 5 and any(node.op_type == "QuantizeLinear" for node in quantized.graph.node)
    assert tensorrt_compatibility_problems(quantized) == []


@pytest.fixture(scope="module")
def rgb_dataset(dataset, tmp_path_factory: pytest.TempPathFactory):
    """The phantom as 0-255 RGB PNG photographs with ImageNet normalisation (a channel per window)."""
    import dataclasses
    import shutil

    from PIL import Image

    from noisyseg.data.folder import write_dataset_info

    root = tmp_path_factory.mktemp("rgb") / "data"
    shutil.copytree(dataset, root)
    for path in sorted((root / "images").glob("*.npy")):
        hu = np.load(path)
        rgb = np.stack(
            [np.clip((hu - low) / width * 255, 0, 255) for low, width in ((-200, 400), (-400, 800), (-100, 300))],
            axis=-1,
        )
        Image.fromarray(rgb.astype(np.uint8), "RGB").save(path.with_suffix(".png"))
        path.unlink()
    write_dataset_info(root, dataclasses.replace(read_dataset_info(root), image_format="png", normalization="imagenet"))
    return root


def test_rgb_imagenet_model_calibrates_and_evaluates_on_raw_pixels(rgb_dataset, tmp_path) -> None:
    """The graph normalises (ImageNet mean/std), so calibration and evaluation feed it raw 0-255
    pixels: the fp32 mIoU through ONNX Runtime equals PyTorch on the loader's normalised images."""
    from noisyseg.export.quantize import calibration_images

    torch.manual_seed(0)
    kwargs = {"base_width": 8, "depth": 3, "in_channels": 3}
    model = create_model("unet", **kwargs).eval()
    info = ModelInfo("unet", kwargs, read_dataset_info(rgb_dataset).classes, normalization="imagenet")
    fp32_path = tmp_path / "model.onnx"
    export_model(model, info, fp32_path, ExportConfig(exporter="torchscript"))

    images = np.stack(calibration_images(rgb_dataset, QuantizeConfig()))
    raw = load_split(rgb_dataset, "train", normalize=False).images
    assert images.shape[1] == 3 and images.max() > 200 and np.array_equal(images, raw[: len(images)])

    report = quantize_onnx(
        fp32_path, rgb_dataset, tmp_path / "model.int8.onnx", QuantizeConfig(timing_runs=1, max_miou_drop=100.0)
    )
    split = load_split(rgb_dataset, "test")  # ImageNet-normalised by the training loader
    assert split.images.max() < 3.0
    with torch.inference_mode():
        labels = model(torch.from_numpy(split.images)).argmax(dim=1).numpy()
    expected = 100 * mean_iou(confusion_matrix(labels, split.masks, read_dataset_info(rgb_dataset).num_classes))
    assert report.fp32_miou == pytest.approx(expected, abs=0.05)
    assert report.calibration_images == len(images)


def test_voc_tree_of_different_sizes_calibrates_and_evaluates_per_image(voc, tmp_path, monkeypatch, capsys) -> None:  # noqa: F811
    """Any layout through `open_source`: a VOC tree (images of different sizes, no test split, so
    val evaluates) calibrates an RGB model in batches of one size padded to the stride; the
    reported fp32 mIoU equals ONNX Runtime run image by image (padded, cropped back)."""
    import json

    from noisyseg.data.datasets import open_source

    torch.manual_seed(0)
    source = open_source(voc, "val")
    kwargs = {"base_width": 4, "depth": 2, "in_channels": 3}
    model = create_model("unet", num_classes=source.info.num_classes, **kwargs).eval()
    info = ModelInfo(
        "unet", {**kwargs, "num_classes": source.info.num_classes}, source.info.classes, normalization="imagenet"
    )
    fp32_path = tmp_path / "model.onnx"
    export_model(model, info, fp32_path, ExportConfig(exporter="torchscript"))
    stride = model.stride
    sizes = {source.read_image(index).shape for index in range(len(source))}
    assert len(sizes) > 1 and any(h % stride or w % stride for _, h, w in sizes)

    monkeypatch.setattr(cli, "COMMAND_MODULES", ["noisyseg.commands.export"])
    out, report_path = tmp_path / "q.onnx", tmp_path / "q.json"
    argv = [
        "export",
        "quantize",
        "--onnx",
        str(fp32_path),
        "--calib-data",
        str(voc),
        "--out",
        str(out),
        "--layout",
        "voc",
        "--option",
        "aug=false",
        "--max-miou-drop",
        "100",
        "--report",
        str(report_path),
    ]
    assert cli.main(argv) == 0 and out.is_file()
    report = json.loads(report_path.read_text())
    assert report["calibration_images"] == len(open_source(voc, "train")) and report["eval_images"] == len(source)

    session = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    matrix = np.zeros((source.info.num_classes,) * 2, dtype=np.int64)
    for index in range(len(source)):
        image, mask = source.read(index)
        height, width = mask.shape
        padded = np.zeros((1, 3, -(-height // stride) * stride, -(-width // stride) * stride), dtype=np.float32)
        padded[0, :, :height, :width] = image
        (logits,) = session.run(None, {"image": padded})
        matrix += confusion_matrix(
            logits.argmax(axis=1)[:, :height, :width],
            mask[None].copy(),
            source.info.num_classes,
            source.info.ignore_index,
        )
    assert report["fp32_miou"] == pytest.approx(100 * mean_iou(matrix), abs=1e-9)

    # The histogram calibrators stack all activations: images of several sizes are refused by name.
    with pytest.raises(ValueError, match="needs images of one size"):
        quantize_onnx(
            fp32_path, voc, tmp_path / "p.onnx", QuantizeConfig(calibration_method="percentile", layout="voc")
        )
