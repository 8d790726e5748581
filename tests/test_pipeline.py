"""The streaming pipeline: augmentation and its inversion, variable sizes, exact resume with
workers, whole-image evaluation, the per-image label store, memory that does not grow."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_trainer import train_until_crash
from torch import nn

from noisyseg.cli import main
from noisyseg.config import AugmentConfig, build_config
from noisyseg.data.datasets import open_source
from noisyseg.data.label_store import LabelMaps, LabelStore
from noisyseg.data.pipeline import Augmenter, ImageDataset, default_crop, paste_back
from noisyseg.data.run_data import load_split
from noisyseg.evaluation.inference import evaluate_split, predict_batches, predict_image
from noisyseg.training.trainer import train

CLASSES = ["background", "a", "b"]
TINY = ["model.kwargs.base_width=4", "model.kwargs.depth=2", "loss.backend=torch", "quiet=true"]
# Correction from epoch 3 on, hard enough (tau 0.3) to erase whole classes, which the guard
# would undo: it is off here so corrections stay in the store for the comparisons (the guard
# across a resume: tests/test_trainer.py).
EARLY_CORRECTION = ["adele.r=0.0", "adele.min_rise=0.0", "adele.tau=0.3", "adele.guard=false"]


def write_folder(root: Path, sizes: dict[str, list[tuple[int, int]]], seed: int = 0) -> Path:
    """A folder-layout dataset whose images have the given sizes (two discs on noise)."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for split, shapes in sizes.items():
        ids = []
        for i, (h, w) in enumerate(shapes):
            yy, xx = np.mgrid[:h, :w]
            mask = np.zeros((h, w), np.uint8)
            image = rng.normal(0.0, 10.0, (h, w)).astype(np.float32)
            for c, (cy, cx) in enumerate([(h // 3, w // 3), (2 * h // 3, 2 * w // 3)], start=1):
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= (min(h, w) / 6) ** 2
                mask[disc], image[disc] = c, image[disc] + 50.0 * c
            slice_id = f"{split[:2].upper()}{i:04d}_000"
            np.save(root / "images" / f"{slice_id}.npy", image)
            Image.fromarray(mask, mode="L").save(root / "masks" / f"{slice_id}.png")
            ids.append(slice_id)
        (root / "splits" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (root / "dataset.json").write_text(json.dumps({"name": "sizes", "classes": CLASSES, "ignore_index": 255}))
    return root


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sizes = [(32, 40), (40, 32), (28, 28), (36, 44), (32, 32), (48, 36)]
    return write_folder(tmp_path_factory.mktemp("mixed"), {"train": sizes, "val": sizes[:3], "test": sizes[3:]})


def config(data: Path, out: Path, *overrides: str):
    return build_config(None, [f"data={data}", f"out={out}", "epochs=2", "batch_size=2", *TINY, *overrides])


def test_augmentation_is_seeded_and_the_crop_maps_back_exactly() -> None:
    augment = Augmenter(AugmentConfig(crop_size=[24, 24], flip=True, jitter=True), ignore_index=255)
    image = np.random.default_rng(1).normal(size=(1, 20, 30)).astype(np.float32)
    labels = np.random.default_rng(2).integers(0, 3, size=(1, 20, 30)).astype(np.uint8)
    first = augment(image, labels, np.random.default_rng([0, 1, 5]))
    again = augment(image, labels, np.random.default_rng([0, 1, 5]))
    assert all(np.array_equal(a, b) for a, b in zip(first[:2], again[:2], strict=True)) and first[2] == again[2]
    out_image, out_labels, geometry = first
    assert out_image.shape == (1, 24, 24) and out_labels.shape == (1, 24, 24)
    assert (out_labels[0] == 255).sum() == 24 * 24 - 20 * 24  # 4 padded rows
    # Pasting the crop (with every valid label + 1) back changes exactly the cropped window.
    store = LabelStore.from_original(LabelMaps.from_arrays([labels[0]]), ["x"])
    changed = np.where(out_labels[0] == 255, 255, (out_labels[0] + 1) % 3).astype(np.uint8)
    assert paste_back(store, changed, np.array([0, *geometry]))
    top, left, valid_h, valid_w, flipped, _ = geometry
    window = (slice(top, top + valid_h), slice(left, left + valid_w))
    assert np.array_equal(store.maps[0][window], (labels[0][window] + 1) % 3)
    outside = np.ones((20, 30), bool)
    outside[window] = False
    assert np.array_equal(store.maps[0][outside], labels[0][outside])


def test_label_store_keeps_one_map_per_image_size_and_checks_on_load(tmp_path: Path) -> None:
    maps = LabelMaps.from_stream([np.full((2, 3), 1, np.uint8), np.full((4, 1), 2, np.uint8)], workdir=tmp_path)
    assert not list(tmp_path.iterdir())  # memory-mapped from an unlinked file
    store = LabelStore.from_original(maps, ["a", "b"], workdir=tmp_path)
    store.update(np.array([1]), [np.zeros((4, 1), np.uint8)])
    assert store.changed_fraction(maps) == pytest.approx(4 / 10)
    store.save(tmp_path / "ck")
    loaded = LabelStore.load(tmp_path / "ck", maps, ["a", "b"])
    assert [m.tolist() for m in (loaded.maps[0], loaded.maps[1])] == [store.maps[0].tolist(), store.maps[1].tolist()]
    with pytest.raises(ValueError, match="sizes do not match"):
        LabelStore.load(
            tmp_path / "ck", LabelMaps.from_arrays([np.ones((2, 3), np.uint8), np.ones((2, 2), np.uint8)]), ["a", "b"]
        )
    with pytest.raises(ValueError, match="fingerprint"):
        LabelStore.load(
            tmp_path / "ck", LabelMaps.from_arrays([np.ones((2, 3), np.uint8), np.ones((4, 1), np.uint8)]), ["a", "b"]
        )


class Constant(nn.Module):
    """Predicts class 1 everywhere; records the input sizes it saw."""

    stride = 8

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        logits = torch.zeros(x.shape[0], 3, *x.shape[-2:])
        logits[:, 1] = 1.0 + self.weight
        return logits


def test_evaluation_reads_whole_images_padded_to_the_stride_or_by_window(mixed: Path) -> None:
    dataset = ImageDataset(open_source(mixed, "val"))
    model = Constant()
    whole = evaluate_split(model, dataset, 3, 255, batch_size=4)
    assert all(h % 8 == 0 and w % 8 == 0 for h, w in model.sizes)
    masks = [dataset[i][1].numpy() for i in range(len(dataset))]
    ones = sum(int((m == 1).sum()) for m in masks)
    assert whole["per_class_iou"][1] == pytest.approx(ones / sum(m.size for m in masks))
    model.sizes.clear()
    windowed = evaluate_split(model, dataset, 3, 255, batch_size=4, window=16)
    assert windowed == whole and max(max(s) for s in model.sizes) == 16


def test_cached_and_streamed_evaluation_agree(mixed: Path, tmp_path: Path) -> None:
    same = write_folder(tmp_path / "same", {"train": [(32, 32)] * 3, "val": [(32, 32)] * 3, "test": [(32, 32)] * 2})
    torch.manual_seed(0)
    model = nn.Conv2d(1, 3, 3, padding=1)
    cached = evaluate_split(model, load_split(same, "val"), 3, 255, batch_size=2)
    streamed = evaluate_split(model, ImageDataset(open_source(same, "val")), 3, 255, batch_size=2, num_workers=2)
    assert cached == streamed


def test_default_crop_is_the_largest_stride_multiple_in_the_smallest_image_at_most_512() -> None:
    assert default_crop([(37, 100), (50, 20)], 8) == [32, 16]  # smallest height 37, smallest width 20
    assert default_crop([(1000, 700), (800, 2000)], 16) == [512, 512]
    assert default_crop([(1024, 2048), (1024, 2048)], 32) == [512, 512]
    assert default_crop([(6, 40), (9, 12)], 8) == [8, 8]  # below the stride: one stride, padded


def test_images_of_different_sizes_train_from_a_default_crop_when_none_is_set(
    mixed: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    # The smallest image is 28x28; a UNet of depth 3 has stride 8: 24x24 crops. (The folder
    # layout streams only when asked: its in-memory default stacks images of one size.)
    out = tmp_path / "nocrop"
    with caplog.at_level(logging.INFO, logger="noisyseg.data.pipeline"):
        train(config(mixed, out, "epochs=1", "model.kwargs.depth=3", "loader.num_workers=0", "loader.cache=false"))
    said = [r.getMessage() for r in caplog.records if "loader.augment.crop_size is not set" in r.getMessage()]
    assert len(said) == 1 and "random 24x24 crops" in said[0] and "stride 8" in said[0]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["config"]["loader"]["augment"]["crop_size"] == [24, 24] and state["iteration"] == 3
    # `data inspect` says the same for each stride.
    assert main(["data", "inspect", "--quiet", "--data", str(mixed)]) == 0
    train_split = json.loads(capsys.readouterr().out)["splits"]["train"]
    assert train_split["crop_when_unset"] == {"8": [24, 24], "16": [16, 16], "32": [32, 32]}


def test_images_of_different_sizes_train_from_crops(mixed: Path, tmp_path: Path) -> None:
    summary = train(
        config(
            mixed,
            tmp_path / "crop",
            "method=adele",
            "loader.num_workers=0",
            "loader.augment.crop_size=[24,24]",
            "loader.augment.flip=true",
        )
    )
    assert 0.0 <= summary["test_miou"]["last"] <= 1.0
    with pytest.raises(ValueError, match="loader.cache"):
        config(mixed, tmp_path / "x", "loader.cache=true", "loader.augment.flip=true")
    with pytest.raises(ValueError, match="correction_timing"):
        config(
            mixed,
            tmp_path / "x",
            "adele.correction_timing=iteration",
            "loader.augment.rescale=true",
            "loader.augment.crop_size=[24,24]",
        )
    assert config(mixed, tmp_path / "x", "loader.augment.flip=true").correction_timing() == "epoch"


# `auto` resolves to epoch timing under random augmentation (checked by the corrections below).
@pytest.mark.parametrize("timing", ["auto", "iteration"])
def test_streamed_run_with_workers_and_augmentation_resumes_exactly(
    mixed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, timing: str
) -> None:
    augment = [
        "loader.num_workers=2",
        "loader.augment.crop_size=[24,24]",
        "loader.augment.flip=true",
        "loader.augment.jitter=true",
    ]
    augment += ["loader.augment.rescale=true", "loader.augment.scale_range=[0.75,1.25]"] if timing == "auto" else []
    overrides = ["method=adele", "epochs=5", f"adele.correction_timing={timing}", *EARLY_CORRECTION, *augment]
    straight = tmp_path / "straight"
    train(config(mixed, straight, *overrides))
    out = tmp_path / "resumed"
    train_until_crash(config(mixed, out, *overrides), 3, monkeypatch)
    train(config(mixed, out, *overrides), resume=True)
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["labels_changed_fraction"] > 0.0
    a, b = (
        load_file(str(straight / "checkpoint" / "state.safetensors")),
        load_file(str(out / "checkpoint" / "state.safetensors")),
    )
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert (straight / "checkpoint" / "labels.npy").read_bytes() == (out / "checkpoint" / "labels.npy").read_bytes()
    assert (straight / "metrics.jsonl").read_text() == (out / "metrics.jsonl").read_text()


RSS_SCRIPT = """
import resource, sys
from noisyseg.config import build_config
from noisyseg.training.trainer import train
train(build_config(None, sys.argv[1:]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_kib(data: Path, out: Path) -> int:
    args = [
        f"data={data}",
        f"out={out}",
        "epochs=1",
        "method=baseline",
        "batch_size=16",
        "eval_batch_size=16",
        "loader.cache=false",
        "loader.num_workers=0",
        *TINY,
    ]
    result = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, *args], capture_output=True, text=True, check=True, timeout=300
    )
    return int(result.stdout.split()[-1])


@pytest.mark.timeout(300)
def test_peak_rss_does_not_grow_with_the_number_of_images(tmp_path: Path) -> None:
    """200 and 2,000 96x96 images streamed: cached, their float images alone would add ~70 MB."""
    small = write_folder(tmp_path / "small", {"train": [(96, 96)] * 200, "val": [(96, 96)] * 4, "test": [(96, 96)] * 4})
    large = write_folder(
        tmp_path / "large", {"train": [(96, 96)] * 2000, "val": [(96, 96)] * 4, "test": [(96, 96)] * 4}
    )
    rss_small, rss_large = peak_rss_kib(small, tmp_path / "run_small"), peak_rss_kib(large, tmp_path / "run_large")
    print(f"peak RSS: 200 images {rss_small / 1024:.0f} MiB, 2000 images {rss_large / 1024:.0f} MiB")
    assert rss_large / rss_small < 1.1, (rss_small, rss_large)


def test_flipped_views_average_with_the_unflipped_ones(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = nn.Conv2d(1, 3, (1, 3), padding=(0, 1))  # not symmetric left-right
    images = torch.randn(2, 1, 8, 12)
    plain = torch.softmax(model(images), dim=1)
    mirrored = torch.softmax(model(images.flip(-1)), dim=1).flip(-1)
    expected = (plain + mirrored) / 2
    assert not torch.allclose(plain, mirrored, atol=1e-3)
    torch.testing.assert_close(predict_batches(model, images, batch_size=2, flip=True), expected)
    torch.testing.assert_close(predict_image(model, images[:1], [1.0], flip=True), expected[:1])
    torch.testing.assert_close(predict_batches(model, images, batch_size=2), plain)


def test_a_broken_file_read_by_a_worker_is_named_in_one_line(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "data", {"train": [(32, 32)] * 4, "val": [(32, 32)] * 2, "test": [(32, 32)] * 2})
    last = (data / "splits" / "train.txt").read_text().split()[-1]
    broken = next((data / "images").glob(f"{last}.*"))
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError) as caught:
        train(config(data, tmp_path / "run", "loader.cache=false", "loader.num_workers=1", "epochs=1"))
    message = str(caught.value)
    assert message.startswith(f"{broken}: unreadable image") and "\n" not in message
