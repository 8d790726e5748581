"""Golden outputs and `export check`: file contents, comparisons (hand-computed), pass and fail exits."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from noisyseg import cli
from noisyseg.export.golden import (
    TOLERANCES,
    check_golden,
    compare_output,
    load_golden,
    make_golden,
)
from noisyseg.export.onnx_export import ExportConfig, export_model
from noisyseg.io import file_sha256
from noisyseg.models import create_model
from noisyseg.models.model_file import ModelInfo


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    kwargs = {"base_width": 4, "depth": 3}
    path = tmp_path_factory.mktemp("golden") / "model.onnx"
    export_model(
        create_model("unet", **kwargs).eval(),
        ModelInfo("unet", kwargs, list("abcde")),
        path,
        ExportConfig(exporter="torchscript"),
    )
    return path


def perturbed_copy(path, out, scale: float) -> None:
    """The model with its last convolution's weights changed: a model that no longer matches."""
    model = onnx.load(str(path))
    last_conv = [node for node in model.graph.node if node.op_type == "Conv"][-1]
    for init in model.graph.initializer:
        if init.name == last_conv.input[1]:
            weights = onnx.numpy_helper.to_array(init)
            init.CopyFrom(onnx.numpy_helper.from_array((weights * (1 + scale)).astype(np.float32), init.name))
    onnx.save(model, str(out))


def test_golden_file_holds_inputs_and_onnxruntime_outputs(onnx_model, tmp_path) -> None:
    out = tmp_path / "golden.npz"
    make_golden(onnx_model, out, shapes=[(2, 1, 32, 48), (1, 1, 64, 64)], seed=3)
    with np.load(out, allow_pickle=False) as archive:  # readable without pickle
        meta = json.loads(str(archive["meta"]))
        inputs = [archive["case0.input"], archive["case1.input"]]
        logits = [archive["case0.output.logits"], archive["case1.output.logits"]]
    assert meta["onnx_sha256"] == file_sha256(onnx_model) and meta["cases"] == 2
    assert meta["output_names"] == ["logits"] and meta["model_metadata"]["output"] == "logits"
    assert [x.shape for x in inputs] == [(2, 1, 32, 48), (1, 1, 64, 64)]
    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    for images, expected in zip(inputs, logits, strict=True):
        np.testing.assert_array_equal(session.run(None, {"image": images})[0], expected)


def test_compare_output_on_a_hand_computed_case() -> None:
    golden = np.zeros((1, 2, 2, 2), np.float32)
    golden[0, 0] = [[3.0, 3.0], [3.0, 3.0]]  # class 0 wins everywhere, by 3
    actual = golden.copy()
    actual[0, 1, 0, 0] = 4.0  # one pixel of four flips to class 1 (error 4)
    actual[0, 0, 1, 1] = 2.5  # one error of 0.5, argmax unchanged
    comparison = compare_output("logits", [golden], [actual], TOLERANCES["fp32"])
    assert comparison.argmax_agreement == 0.75
    assert comparison.max_abs_error == 4.0
    assert comparison.median_abs_error == 0.0  # 2 non-zero errors of 8 values
    assert comparison.scale == 3.0 and not comparison.passed
    labels = compare_output("labels", [np.array([[0, 1, 2, 2]])], [np.array([[0, 1, 2, 1]])], TOLERANCES["int8"])
    assert labels.argmax_agreement == 0.75 and not labels.passed


def test_same_model_passes_and_perturbed_model_fails(onnx_model, tmp_path) -> None:
    golden = tmp_path / "golden.npz"
    make_golden(onnx_model, golden, shapes=[(2, 1, 32, 32)])
    report = check_golden(onnx_model, golden)
    assert report.passed and report.precision == "fp32"
    assert report.outputs[0].max_abs_error == 0.0 and report.outputs[0].argmax_agreement == 1.0
    perturbed = tmp_path / "perturbed.onnx"
    perturbed_copy(onnx_model, perturbed, scale=0.5)
    report = check_golden(perturbed, golden)
    assert not report.passed and report.outputs[0].max_abs_error > 1e-3
    assert "FAILED" in report.describe() and "max abs error" in report.describe()


def test_check_command_exit_codes(onnx_model, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["noisyseg.commands.export"])
    golden = tmp_path / "golden.npz"
    assert cli.main(["export", "golden", "--onnx", str(onnx_model), "--out", str(golden), "--shape", "1x1x32x32"]) == 0
    meta, inputs, _ = load_golden(golden)
    assert inputs[0].shape == (1, 1, 32, 32) and meta["cases"] == 1
    report = tmp_path / "check.json"
    assert (
        cli.main(["export", "check", "--model", str(onnx_model), "--golden", str(golden), "--report", str(report)]) == 0
    )
    assert "PASSED" in capsys.readouterr().out and json.loads(report.read_text())["passed"] is True
    perturbed = tmp_path / "perturbed.onnx"
    perturbed_copy(onnx_model, perturbed, scale=0.5)
    assert cli.main(["export", "check", "--model", str(perturbed), "--golden", str(golden)]) == 1
    output = capsys.readouterr().out
    assert "FAILED" in output and "argmax agreement" in output and "max abs error" in output
    assert cli.main(["export", "check", "--model", str(onnx_model), "--golden", str(tmp_path / "nope.npz")]) == 2
    assert "no golden file" in capsys.readouterr().err


def test_golden_from_dataset_images(onnx_model, tmp_path) -> None:
    from noisyseg.data.phantom import PhantomConfig, generate_phantom
    from noisyseg.data.run_data import load_split

    generate_phantom(tmp_path / "data", num_patients=3, seed=1, config=PhantomConfig(size=32, slices_per_patient=4))
    golden = tmp_path / "golden.npz"
    make_golden(onnx_model, golden, data_dir=tmp_path / "data", split="test")
    _, inputs, outputs = load_golden(golden)
    # Raw pixels, as a client sends them: the model normalises inside its graph.
    test_images = load_split(tmp_path / "data", "test", normalize=False).images
    np.testing.assert_array_equal(inputs[0], test_images[: len(inputs[0])])
    assert outputs[0]["logits"].shape == (len(inputs[0]), 5, 32, 32)
    assert check_golden(onnx_model, golden).passed


def test_golden_from_a_voc_tree_pads_images_to_the_stride(tmp_path) -> None:
    """`--data` in any layout: VOC images of different sizes become batches of one size, padded to the stride."""
    from test_datasets import VOC_TREE, voc_mask, write_palette, write_rgb

    from noisyseg.data.datasets import open_source
    from noisyseg.export.golden import golden_inputs

    root = tmp_path / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split in ("train", "val"):
        items = VOC_TREE[split]
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i, _, _ in items))
        for n, (image_id, height, width) in enumerate(items):
            write_rgb(root / "JPEGImages" / f"{image_id}.jpg", height, width, seed=n, fmt="JPEG")
            write_palette(root / "SegmentationClass" / f"{image_id}.png", voc_mask(height, width, 12))
    source = open_source(root, "val")
    inputs = golden_inputs([(2, 3, 8, 8)] * 2, 0, root, "val", stride=8, layout="voc")
    images = [source.read_image(index) for index in range(min(len(source), 4))]
    assert sum(len(batch) for batch in inputs) == len(images)
    flat = [image for batch in inputs for image in batch]
    for image, padded in zip(images, flat, strict=True):
        assert padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0
        assert np.array_equal(padded[:, : image.shape[1], : image.shape[2]], image)
