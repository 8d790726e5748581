"""A tiny Cityscapes tree and a tiny VOC tree each train (streamed, cropped, flipped), evaluate,
predict and export, through the command line as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from test_datasets import cityscapes, voc  # noqa: F401  (fixtures: the tiny trees)

from noisyseg.cli import main
from noisyseg.data.folder import normalize_image, read_image
from noisyseg.evaluation.inference import whole_image_logits
from noisyseg.models.model_file import load_model
from noisyseg.run.run_dir import resolve_model_file

TINY = [
    "model.kwargs.base_width=4",
    "model.kwargs.depth=2",
    "loader.num_workers=0",
    "loss.backend=torch",
    "loader.augment.crop_size=[16,16]",
    "loader.augment.flip=true",
]


def train_evaluate_predict_export(
    root: Path, out: Path, images: list[Path], capsys: pytest.CaptureFixture[str], *options: str
) -> None:
    run = out / "run"
    args = [
        "train",
        "--data",
        str(root),
        "--method",
        "adele",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--out",
        str(run),
        "--quiet",
    ]
    assert main([*args, *[f"--set={o}" for o in (*TINY, *options)]]) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["val"]["miou"] is not None

    assert main(["eval", "--run", str(run), "--split", "val", "--json", "--device", "cpu"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["miou"] == pytest.approx(records[0]["val"]["miou"])  # the trainer's own evaluation

    inputs = out / "inputs"
    inputs.mkdir()
    for image in images:
        (inputs / image.name).write_bytes(image.read_bytes())
    assert (
        main(
            [
                "predict",
                "--run",
                str(run),
                "--input",
                str(inputs),
                "--out",
                str(out / "masks"),
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    model, info = load_model(resolve_model_file(run))
    assert info.normalization == "imagenet" and info.in_channels == 3
    for image in images:
        with Image.open(out / "masks" / f"{image.stem}.png") as mask:
            written = np.asarray(mask)
        raw = read_image(image)
        with torch.no_grad():
            expected = (
                whole_image_logits(model.eval(), torch.from_numpy(normalize_image(raw, "imagenet"))[None])
                .argmax(1)[0]
                .numpy()
            )
        assert written.shape == raw.shape[1:] and np.array_equal(written, expected)

    onnx_path = out / "model.onnx"
    assert main(["export", "onnx", "--checkpoint", str(run), "--out", str(onnx_path), "--exporter", "torchscript"]) == 0
    raw = read_image(images[0])[None]
    height, width = raw.shape[-2:]
    padded = np.zeros(
        (1, 3, -(-height // model.stride) * model.stride, -(-width // model.stride) * model.stride), dtype=np.float32
    )
    padded[..., :height, :width] = raw
    (logits,) = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"image": padded})
    assert logits.shape[1] == info.num_classes


def test_cityscapes_coarse_trains_evaluates_predicts_and_exports(
    cityscapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # noqa: F811
    images = sorted((cityscapes / "leftImg8bit" / "val").rglob("*.png"))
    train_evaluate_predict_export(cityscapes, tmp_path, images, capsys, "layout_options.annotations=gtCoarse")


def test_voc_trains_evaluates_predicts_and_exports(
    voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # noqa: F811
    images = sorted((voc / "JPEGImages").glob("*.jpg"))[:2]
    train_evaluate_predict_export(voc, tmp_path, images, capsys, "layout_options.aug=true")


def test_voc_trains_with_no_crop_setting(voc: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """`noisyseg train --data VOC2012 --method adele` as a new user runs it: images of several
    sizes, no crop set. A UNet of depth 1 (stride 2) on the train split's 9x12 and 7x11 images
    crops to 6x10 (the largest multiples of 2 that fit the smallest height and width)."""
    run = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith("loader.augment")] + ["model.kwargs.depth=1"]
    args = [
        "train",
        "--data",
        str(voc),
        "--method",
        "adele",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--out",
        str(run),
        "--quiet",
    ]
    with caplog.at_level("INFO", logger="noisyseg.data.pipeline"):
        assert main([*args, *[f"--set={o}" for o in tiny]]) == 0
    assert sum("random 6x10 crops" in r.getMessage() for r in caplog.records) == 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1] and records[0]["val"]["miou"] is not None
