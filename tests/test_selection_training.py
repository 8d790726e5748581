"""Checkpoint selection in training runs: noisy validation masks, the dataset's own, none at all."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_trainer import (
    CLASSES,
    REFERENCE_LOSS,
    TINY_MODEL,
    noisy_version,
    read_records,
    synthetic_slice,
    write_png,
)

from noisyseg.cli import main
from noisyseg.config import build_config
from noisyseg.data.folder import has_split_masks, read_mask
from noisyseg.evaluation.inference import whole_image_logits
from noisyseg.models.model_file import ModelInfo, load_model
from noisyseg.run.run_dir import resolve_model_file
from noisyseg.training.selection import RULES
from noisyseg.training.trainer import train


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data folder, labels folder holding noisy train and val masks)."""
    root = tmp_path_factory.mktemp("selection")
    data, labels = root / "data", root / "noisy"
    rng = np.random.default_rng(3)
    (data / "images").mkdir(parents=True)
    (data / "splits").mkdir()
    for split, (patient, count) in {
        "train": ("P000", 6),
        "val": ("P001", 3),
        "test": ("P002", 3),
    }.items():
        ids = [f"{patient}_{z:03d}" for z in range(count)]
        for slice_id in ids:
            image, mask = synthetic_slice(rng)
            np.save(data / "images" / f"{slice_id}.npy", image)
            write_png(data / "masks" / f"{slice_id}.png", mask)
            if split != "test":
                write_png(labels / "masks" / f"{slice_id}.png", noisy_version(mask, rng))
        (data / "splits" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    info = {"name": "tiny", "classes": CLASSES, "ignore_index": 255}
    (data / "dataset.json").write_text(json.dumps(info))
    return data, labels


def run_config(data: Path, labels: Path | None, out: Path, *overrides: str):
    given = [f"labels={labels}"] if labels else []
    return build_config(
        None,
        [
            f"data={data}",
            *given,
            f"out={out}",
            "epochs=4",
            "batch_size=2",
            "quiet=true",
            "optim.lr=0.05",
            f"loss.backend={REFERENCE_LOSS}",
            "method=baseline",
            *TINY_MODEL,
            *overrides,
        ],
    )


def miou_of(model: torch.nn.Module, data: Path, split: str, masks: Path) -> float:
    """Independent mIoU (with background) of `model` on a split against the masks in `masks`."""
    ids = (data / "splits" / f"{split}.txt").read_text().split()
    intersection, union = np.zeros(len(CLASSES)), np.zeros(len(CLASSES))
    for slice_id in ids:
        image = np.load(data / "images" / f"{slice_id}.npy")
        normalised = (image - image.mean()) / (image.std() + 1e-6)
        with torch.no_grad():
            prediction = (
                whole_image_logits(model, torch.from_numpy(normalised[None, None]).float()).argmax(dim=1)[0].numpy()
            )
        mask = read_mask(masks / "masks" / f"{slice_id}.png")
        for c in range(len(CLASSES)):
            intersection[c] += np.sum((prediction == c) & (mask == c))
            union[c] += np.sum((prediction == c) | (mask == c))
    present = union > 0
    return float(np.mean(intersection[present] / union[present]))


@pytest.mark.parametrize("cache", ["true", "false"])
def test_noisy_validation_masks_select_the_checkpoint(
    folders: tuple[Path, Path], tmp_path: Path, cache: str, caplog: pytest.LogCaptureFixture
) -> None:
    data, labels = folders
    out = tmp_path / "run"
    summary = train(run_config(data, labels, out, f"loader.cache={cache}", "loader.num_workers=0"))
    records = read_records(out)
    noisy = [r["val_noisy"]["miou"] for r in records]
    chosen = int(np.argmax(noisy)) + 1
    assert summary["selection"] == {"rule": "noisy-val", "epoch": chosen, "val_miou": max(noisy)}
    assert summary["selected_epoch"]["clean-val"] == int(np.argmax([r["val"]["miou"] for r in records])) + 1
    assert summary["selected_epoch"]["last"] == 4
    for rule, epoch in summary["selected_epoch"].items():
        assert summary["test_miou_at"][rule] == records[epoch - 1]["test"]["miou"], rule
    assert summary["test_miou"]["best_val"] == summary["test_miou_at"]["clean-val"]
    # The model file is the chosen epoch's: scored independently, it gives that epoch's noisy and
    # clean validation mIoU; its metadata names the epoch and the rule.
    with caplog.at_level(logging.INFO):
        assert main(["eval", "--run", str(out), "--json"]) == 0
    assert f"{out / 'model.safetensors'}: baseline model, epoch {chosen} (selected by noisy-val)" in caplog.text
    model, info = load_model(resolve_model_file(out))
    assert info.extra["epoch"] == chosen and info.extra["selection"] == "noisy-val"
    assert miou_of(model, data, "val", labels) == pytest.approx(records[chosen - 1]["val_noisy"]["miou"], abs=1e-9)
    assert miou_of(model, data, "val", data) == pytest.approx(records[chosen - 1]["val"]["miou"], abs=1e-9)
    # Label Wave's measure: none at epoch 1, then a fraction of the training pixels.
    assert records[0]["prediction_change"] is None
    assert all(0.0 <= r["prediction_change"] <= 1.0 for r in records[1:])
    assert any(r["prediction_change"] > 0.0 for r in records[1:])


def test_cached_and_streamed_runs_measure_the_same_prediction_changes(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    """Without augmentation both paths train the same network on the same batches."""
    data, labels = folders
    runs = {cache: tmp_path / cache for cache in ("true", "false")}
    for cache, out in runs.items():
        train(run_config(data, labels, out, f"loader.cache={cache}", "loader.num_workers=0", "epochs=3"))
    cached, streamed = (read_records(out) for out in runs.values())
    assert [r["prediction_change"] for r in cached] == pytest.approx(
        [r["prediction_change"] for r in streamed], abs=1e-3
    )


def test_without_noisy_masks_the_datasets_validation_masks_select(folders: tuple[Path, Path], tmp_path: Path) -> None:
    data, _ = folders
    out = tmp_path / "own"
    summary = train(run_config(data, None, out, "epochs=3"))
    records = read_records(out)
    assert all("val_noisy" not in r for r in records)
    assert summary["selection"]["rule"] == "clean-val" and summary["selected_epoch"]["noisy-val"] is None
    assert summary["selection"]["epoch"] == int(np.argmax([r["val"]["miou"] for r in records])) + 1
    assert load_model(resolve_model_file(out))[1].extra["selection"] == "clean-val"


def test_without_a_validation_split_the_rule_is_label_free(
    folders: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    shutil.copytree(folders[0], data)
    (data / "splits" / "val.txt").unlink()
    out = tmp_path / "noval"
    with caplog.at_level(logging.WARNING):
        summary = train(run_config(data, None, out, "epochs=3"))
    assert "no validation split" in caplog.text
    records = read_records(out)
    assert all(r["val"]["miou"] is None for r in records)
    assert summary["selection"]["rule"] == "label-free-curves"
    assert summary["selection"]["epoch"] == RULES["label-free-curves"](records) == 3  # no class has ended its rise
    assert load_model(resolve_model_file(out))[1].extra["epoch"] == 3


def test_a_labels_folder_with_some_validation_masks_is_refused(folders: tuple[Path, Path], tmp_path: Path) -> None:
    data, labels = folders
    partial = tmp_path / "partial"
    shutil.copytree(labels, partial)
    first_val = (data / "splits" / "val.txt").read_text().split()[0]
    (partial / "masks" / f"{first_val}.png").unlink()
    with pytest.raises(
        ValueError,
        match=r"partial/masks: holds masks of 2 of the 3 slices of split 'val' \(first missing: P001_000\)",
    ):
        has_split_masks(data, partial, "val")
    assert has_split_masks(data, labels, "val") and has_split_masks(data, labels, "train")
    assert not has_split_masks(data, labels, "test")


def test_model_files_from_before_the_rules_say_they_kept_the_best_validation_epoch() -> None:
    old = ModelInfo("unet", {}, CLASSES, extra={"epoch": 12, "val_miou": 0.5})
    assert old.checkpoint_description() == "epoch 12 (selected by clean-val)"
    assert ModelInfo("unet", {}, CLASSES).checkpoint_description().startswith("epoch unknown")
