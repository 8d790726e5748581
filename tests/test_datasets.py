"""Dataset layouts: Cityscapes and PASCAL VOC trees written with Pillow, read through the registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import id2label, trainId2label
from PIL import Image

from noisyseg.cli import main
from noisyseg.config import build_config
from noisyseg.data.datasets import (
    LAYOUTS,
    CityscapesSource,
    VocSource,
    detect_layout,
    open_source,
)
from noisyseg.data.run_data import load_run_data

# Raw Cityscapes label ids and the training ids cityscapesscripts gives them.
ROAD, CAR, UNLABELED, SKY, EGO_VEHICLE = 7, 26, 0, 23, 1


def write_rgb(path: Path, height: int, width: int, seed: int, fmt: str = "PNG") -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="RGB").save(path, format=fmt, quality=95)
    return pixels


def write_grey(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8), mode="L").save(path)


def label_ids(height: int, width: int) -> np.ndarray:
    """Road in the lower half, car in the middle, sky on top, unlabeled and ego vehicle corners."""
    ids = np.full((height, width), SKY, dtype=np.uint8)
    ids[height // 2 :] = ROAD
    ids[height // 2 - 1 : height // 2 + 1, width // 4 : width // 2] = CAR
    ids[0, 0] = UNLABELED
    ids[-1, -1] = EGO_VEHICLE
    return ids


# split -> [(city, frame, height, width)]
CITYSCAPES_TREE = {
    "train": [
        ("aachen", "000000_000019", 8, 16),
        ("aachen", "000001_000019", 10, 12),
        ("bremen", "000000_000019", 6, 10),
    ],
    "val": [("frankfurt", "000000_000294", 8, 16), ("lindau", "000000_000019", 12, 8)],
    "test": [("berlin", "000000_000019", 8, 16)],
}


@pytest.fixture()
def cityscapes(tmp_path: Path) -> Path:
    root = tmp_path / "cityscapes"
    for split, items in CITYSCAPES_TREE.items():
        for n, (city, frame, height, width) in enumerate(items):
            stem = f"{city}_{frame}"
            write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", height, width, seed=n)
            write_grey(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label_ids(height, width))
            if split != "test":
                coarse = np.full((height, width), UNLABELED, dtype=np.uint8)
                coarse[height // 2 + 1 :] = ROAD  # coarse: polygons well inside the objects
                write_grey(root / "gtCoarse" / split / city / f"{stem}_gtCoarse_labelIds.png", coarse)
    return root


VOC_TREE = {
    "train": [("2007_000032", 9, 12), ("2007_000039", 7, 11)],
    "trainaug": [("2007_000032", 9, 12), ("2007_000039", 7, 11), ("2008_000002", 10, 6)],
    "val": [("2007_000033", 8, 8), ("2007_000042", 6, 9)],
}


def voc_palette() -> list[int]:
    """VOC's colour map (bit-interleaved), as the dataset's PNGs carry it."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def write_palette(path: Path, indices: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    image.save(path)


def voc_mask(height: int, width: int, class_id: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[1:-1, 1:-1] = 255  # boundary band
    mask[2:-2, 2:-2] = class_id
    return mask


@pytest.fixture()
def voc(tmp_path: Path) -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    written: set[str] = set()
    for split, items in VOC_TREE.items():
        (lists / f"{split}.txt").write_text("".join(f"{image_id}\n" for image_id, _, _ in items))
        for n, (image_id, height, width) in enumerate(items):
            if image_id in written and split != "trainaug":
                continue
            write_rgb(root / "JPEGImages" / f"{image_id}.jpg", height, width, seed=n, fmt="JPEG")
            # SegmentationClassAug holds every image (class 15, person); SegmentationClass the
            # VOC images only (class 12 + n), so a test can tell which folder a mask came from.
            write_palette(root / "SegmentationClassAug" / f"{image_id}.png", voc_mask(height, width, 15))
            if split != "trainaug":
                write_palette(root / "SegmentationClass" / f"{image_id}.png", voc_mask(height, width, 12 + n))
            written.add(image_id)
    return root


# --- Cityscapes ---------------------------------------------------------------------------


def test_cityscapes_is_detected_and_registered_after_the_folder_layout(cityscapes: Path, voc: Path) -> None:
    assert list(LAYOUTS) == ["folder", "cityscapes", "voc"]
    assert detect_layout(cityscapes) == "cityscapes"
    assert isinstance(open_source(cityscapes, "train"), CityscapesSource)


def test_cityscapes_ids_per_split(cityscapes: Path) -> None:
    for split, items in CITYSCAPES_TREE.items():
        source = open_source(cityscapes, split)
        assert source.ids == sorted(f"{city}/{city}_{frame}" for city, frame, _, _ in items)
    assert CityscapesSource.splits(cityscapes) == ["test", "train", "val"]


def test_cityscapes_info_has_the_19_training_classes(cityscapes: Path) -> None:
    info = open_source(cityscapes, "val").info
    assert info.classes == [trainId2label[i].name for i in range(19)]
    assert (info.num_classes, info.ignore_index, info.modality, info.normalization) == (19, 255, "RGB", "imagenet")


def test_cityscapes_read_maps_label_ids_to_training_ids(cityscapes: Path) -> None:
    source = open_source(cityscapes, "train")
    index = source.ids.index("aachen/aachen_000001_000019")
    image, mask = source.read(index)
    assert image.dtype == np.float32 and image.shape == (3, 10, 12)
    assert image.min() >= 0 and image.max() <= 255 and image.max() > 1
    assert mask.dtype == np.uint8 and mask.shape == (10, 12)
    expected = np.vectorize(
        lambda i: 255 if id2label[i].trainId in (-1, 255) or id2label[i].ignoreInEval else id2label[i].trainId
    )(label_ids(10, 12))
    np.testing.assert_array_equal(mask, expected)
    assert mask[-1, 0] == id2label[ROAD].trainId == 0
    assert mask[4, 3] == id2label[CAR].trainId == 13
    assert mask[0, 0] == 255 and mask[-1, -1] == 255  # unlabeled, ego vehicle
    assert mask[0, 5] == id2label[SKY].trainId == 10


def test_cityscapes_images_of_different_sizes(cityscapes: Path) -> None:
    source = open_source(cityscapes, "train")
    assert sorted(source.read(i)[0].shape[1:] for i in range(len(source))) == [(6, 10), (8, 16), (10, 12)]


def test_cityscapes_coarse_for_training_fine_for_evaluation(cityscapes: Path) -> None:
    coarse = open_source(cityscapes, "train", annotations="gtCoarse")
    assert coarse.mask_path(0).name.endswith("_gtCoarse_labelIds.png") and "gtCoarse" in coarse.mask_path(0).parts
    fine = open_source(cityscapes, "train")
    coarse_mask, fine_mask = coarse.read(0)[1], fine.read(0)[1]
    assert (coarse_mask == 255).sum() > (fine_mask == 255).sum()
    val = open_source(cityscapes, "val", annotations="gtCoarse")
    assert "gtFine" in val.mask_path(0).parts
    val_coarse = open_source(cityscapes, "val", annotations="gtCoarse", eval_annotations="gtCoarse")
    assert "gtCoarse" in val_coarse.mask_path(0).parts
    with pytest.raises(
        ValueError, match=r"cityscapes option 'annotations': expected one of gtFine, gtCoarse, got 'gtMedium'"
    ):
        open_source(cityscapes, "train", annotations="gtMedium")


def test_cityscapes_missing_mask_is_named(cityscapes: Path) -> None:
    (cityscapes / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png").unlink()
    source = open_source(cityscapes, "val")
    with pytest.raises(
        FileNotFoundError,
        match=r"gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds\.png: "
        r"gtFine label-id mask of image lindau_000000_000019_leftImg8bit\.png not found",
    ):
        source.read(source.ids.index("lindau/lindau_000000_000019"))


def test_cityscapes_wrong_size_is_named(cityscapes: Path) -> None:
    write_grey(
        cityscapes / "gtFine" / "train" / "bremen" / "bremen_000000_000019_gtFine_labelIds.png", label_ids(6, 11)
    )
    source = open_source(cityscapes, "train")
    with pytest.raises(
        ValueError,
        match=r"bremen_000000_000019_gtFine_labelIds\.png: mask size \(6, 11\) "
        r"does not match image .*bremen_000000_000019_leftImg8bit\.png size \(6, 10\)",
    ):
        source.read(source.ids.index("bremen/bremen_000000_000019"))


def test_cityscapes_unknown_label_id_and_colour_mask_are_named(cityscapes: Path) -> None:
    path = cityscapes / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000294_gtFine_labelIds.png"
    ids = label_ids(8, 16)
    ids[0, 1] = 77
    write_grey(path, ids)
    source = open_source(cityscapes, "val")
    with pytest.raises(
        ValueError,
        match=r"frankfurt_000000_000294_gtFine_labelIds\.png: label id\(s\) "
        r"\[77\] are not Cityscapes label ids \(expected 0\.\.33",
    ):
        source.read(0)
    write_rgb(path, 8, 16, seed=0)
    with pytest.raises(
        ValueError,
        match=r"frankfurt_000000_000294_gtFine_labelIds\.png: .* must be a "
        r"greyscale \(L\) or palette \(P\) PNG of indices, got mode RGB",
    ):
        source.read(0)


def test_cityscapes_missing_split_folder_is_named(cityscapes: Path) -> None:
    with pytest.raises(
        FileNotFoundError,
        match=r"gtCoarse/test: folder not found \(expected gtCoarse/test/<city>/\*_gtCoarse_labelIds\.png\)",
    ):
        open_source(cityscapes, "test", eval_annotations="gtCoarse")


def test_unreadable_image_is_named(cityscapes: Path) -> None:
    (cityscapes / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"aachen_000000_000019_leftImg8bit\.png: unreadable image"):
        open_source(cityscapes, "train").read(0)


# --- PASCAL VOC ---------------------------------------------------------------------------


def test_voc_is_detected_from_voc2012_and_from_vocdevkit(voc: Path) -> None:
    assert detect_layout(voc) == "voc"
    assert detect_layout(voc.parent) == "voc"
    assert open_source(voc.parent, "val").root == voc
    assert isinstance(open_source(voc, "train"), VocSource)


def test_voc_ids_per_split(voc: Path) -> None:
    for split, items in VOC_TREE.items():
        assert open_source(voc, split).ids == [image_id for image_id, _, _ in items]
    assert open_source(voc, "train", aug=True).ids == [image_id for image_id, _, _ in VOC_TREE["trainaug"]]
    assert VocSource.splits(voc) == ["train", "trainaug", "val"]
    assert VocSource.splits(voc, aug=True) == ["train", "val"]


def test_voc_palette_masks_are_read_as_class_indices(voc: Path) -> None:
    source = open_source(voc, "val")
    info = source.info
    assert (info.num_classes, info.classes[0], info.classes[15], info.ignore_index, info.normalization) == (
        21,
        "background",
        "person",
        255,
        "imagenet",
    )
    image, mask = source.read(1)
    assert image.dtype == np.float32 and image.shape == (3, 6, 9)
    assert mask.dtype == np.uint8 and mask.shape == (6, 9)
    np.testing.assert_array_equal(mask, voc_mask(6, 9, 13))
    assert set(np.unique(mask).tolist()) == {0, 13, 255}
    with Image.open(source.mask_path(1)) as png:
        assert png.mode == "P"


def test_voc_aug_reads_segmentation_class_aug_with_trainaug(voc: Path) -> None:
    train = open_source(voc, "train", aug=True)
    assert train.list_file.name == "trainaug.txt" and train.mask_dir.name == "SegmentationClassAug"
    sizes = []
    for index in range(len(train)):
        image, mask = train.read(index)
        assert set(np.unique(mask).tolist()) == {0, 15, 255}
        sizes.append(image.shape[1:])
    assert sorted(sizes) == [(7, 11), (9, 12), (10, 6)]
    val = open_source(voc, "val", aug=True)
    assert val.mask_dir.name == "SegmentationClass"
    assert open_source(voc, "trainaug").mask_dir.name == "SegmentationClassAug"
    plain = open_source(voc, "train")
    assert set(np.unique(plain.read(0)[1]).tolist()) == {0, 12, 255}


def test_voc_pseudo_labels_replace_the_training_masks_only(voc: Path, tmp_path: Path) -> None:
    pseudo = tmp_path / "pseudo"
    for image_id, height, width in VOC_TREE["train"]:
        write_palette(pseudo / f"{image_id}.png", np.full((height, width), 8, dtype=np.uint8))
    train = open_source(voc, "train", pseudo_labels=str(pseudo))
    assert [int(np.unique(train.read(i)[1])[0]) for i in range(len(train))] == [8, 8]
    val = open_source(voc, "val", pseudo_labels=str(pseudo))
    assert val.mask_dir == voc / "SegmentationClass"
    assert 8 not in np.unique(val.read(0)[1])
    with pytest.raises(FileNotFoundError, match=r"2008_000002\.png: mask of image 2008_000002 .*not found"):
        open_source(voc, "train", aug=True, pseudo_labels=pseudo).read(2)


def test_voc_missing_mask_and_wrong_size_are_named(voc: Path) -> None:
    (voc / "SegmentationClass" / "2007_000042.png").unlink()
    source = open_source(voc, "val")
    with pytest.raises(
        FileNotFoundError,
        match=r"SegmentationClass/2007_000042\.png: mask of image 2007_000042 \(listed in .*val\.txt\) not found",
    ):
        source.read(1)
    write_palette(voc / "SegmentationClass" / "2007_000033.png", voc_mask(8, 9, 1))
    with pytest.raises(
        ValueError,
        match=r"2007_000033\.png: mask size \(8, 9\) does not match image .*JPEGImages/2007_000033\.jpg size \(8, 8\)",
    ):
        source.read(0)


def test_voc_missing_image_list_and_class_out_of_range_are_named(voc: Path) -> None:
    (voc / "JPEGImages" / "2007_000039.jpg").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"JPEGImages/2007_000039\.jpg: image not found \(listed in .*train\.txt\)"
    ):
        open_source(voc, "train").read(1)
    with pytest.raises(FileNotFoundError, match=r"Segmentation/test\.txt: split list file not found"):
        open_source(voc, "test")
    write_palette(voc / "SegmentationClass" / "2007_000032.png", voc_mask(9, 12, 21))
    with pytest.raises(ValueError, match=r"2007_000032\.png: class id\(s\) \[21\] out of range \(expected 0\.\.20"):
        open_source(voc, "train").read(0)


def test_a_folder_of_no_layout_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"not a dataset folder of any supported layout \(folder, cityscapes, voc\)"):
        detect_layout(tmp_path)


# --- configuration -------------------------------------------------------------------------


def test_config_layout_and_options() -> None:
    config = build_config(None, ["data=d", "out=o", "layout=cityscapes", "layout_options={annotations: gtCoarse}"])
    assert (config.layout, config.layout_options) == ("cityscapes", {"annotations": "gtCoarse"})
    assert build_config(None, ["data=d", "out=o"]).layout == "auto"
    # The layout names belong to the readers (`data.datasets`), so run set-up checks them.
    with pytest.raises(
        ValueError, match=r"config field 'layout': expected auto or one of folder, cityscapes, voc, got 'coco'"
    ):
        load_run_data(build_config(None, ["data=d", "out=o", "layout=coco"]))
    with pytest.raises(ValueError, match=r"config key 'layout_options': expected dict"):
        build_config(None, ["data=d", "out=o", "layout_options=[1]"])


# --- data inspect ---------------------------------------------------------------------------


def inspect(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict, str]:
    code = main(["data", "inspect", "--quiet", *args])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else {}), captured.err


def test_inspect_cityscapes(cityscapes: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, summary, _ = inspect(["--data", str(cityscapes)], capsys)
    assert code == 0 and summary["layout"] == "cityscapes" and len(summary["classes"]) == 19
    train = summary["splits"]["train"]
    assert train["images"] == 3 and train["channels"] == [3]
    assert (train["size_min"], train["size_max"], train["distinct_sizes"]) == ([6, 10], [10, 16], 3)
    assert train["sizes"] == {"10x12": 1, "6x10": 1, "8x16": 1}
    expected = {name: 0 for name in summary["classes"]}
    unlabelled = total = 0
    for _, _, height, width in CITYSCAPES_TREE["train"]:
        ids = label_ids(height, width)
        for label_id, count in zip(*np.unique(ids, return_counts=True)):
            train_id = id2label[int(label_id)].trainId
            if 0 <= train_id < 19:
                expected[trainId2label[train_id].name] += int(count)
            else:
                unlabelled += int(count)
        total += ids.size
    assert train["pixels_per_class"] == expected
    assert train["unlabelled_fraction"] == pytest.approx(unlabelled / total)
    assert set(summary["splits"]) == {"train", "val", "test"}
    code, coarse, _ = inspect(
        ["--data", str(cityscapes), "--layout", "cityscapes", "--option", "annotations=gtCoarse"], capsys
    )
    assert code == 0 and coarse["options"] == {"annotations": "gtCoarse"}
    assert coarse["splits"]["train"]["unlabelled_fraction"] > train["unlabelled_fraction"]


def test_inspect_voc(voc: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, summary, _ = inspect(["--data", str(voc.parent), "--option", "aug=true"], capsys)
    assert code == 0 and summary["layout"] == "voc" and summary["name"] == "voc2012"
    assert set(summary["splits"]) == {"train", "val"}
    train = summary["splits"]["train"]
    assert train["images"] == 3 and train["distinct_sizes"] == 3
    assert train["pixels_per_class"]["person"] == sum(
        int((voc_mask(h, w, 15) == 15).sum()) for _, h, w in VOC_TREE["trainaug"]
    )
    assert 0 < train["unlabelled_fraction"] < 1


def test_inspect_folder_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from noisyseg.data.phantom import PhantomConfig, generate_phantom

    generate_phantom(tmp_path / "phantom", num_patients=3, seed=0, config=PhantomConfig(size=32, slices_per_patient=2))
    code, summary, _ = inspect(["--data", str(tmp_path / "phantom")], capsys)
    assert code == 0 and summary["layout"] == "folder" and set(summary["splits"]) == {"train", "val", "test"}
    assert summary["splits"]["train"]["sizes"] == {"32x32": summary["splits"]["train"]["images"]}


def test_inspect_names_the_first_wrong_file_and_exits_non_zero(
    voc: Path, cityscapes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_palette(voc / "SegmentationClass" / "2007_000039.png", voc_mask(5, 5, 1))
    code, _, err = inspect(["--data", str(voc)], capsys)
    assert code != 0
    assert len(err.strip().splitlines()) == 1
    assert "2007_000039.png: mask size (5, 5) does not match image" in err
    (cityscapes / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png").write_bytes(b"broken")
    code, _, err = inspect(["--data", str(cityscapes)], capsys)
    assert code != 0 and "lindau_000000_000019_leftImg8bit.png: unreadable image" in err
    code, _, err = inspect(["--data", str(voc), "--layout", "coco"], capsys)
    assert code != 0 and "expected auto or one of folder, cityscapes, voc" in err
