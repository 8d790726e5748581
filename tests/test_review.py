"""`noisyseg.review` end to end on a hand-made source: the files, the exports read back
by the libraries that define them, and the page in a real browser."""

from __future__ import annotations

import csv
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from noisyseg.cli import main
from noisyseg.data.datasets import open_source
from noisyseg.data.folder import (
    DatasetInfo,
    read_mask,
    write_dataset_info,
    write_image,
    write_mask,
    write_split_ids,
)
from noisyseg.review.runner import ReviewOptions, run_review
from noisyseg.review.sources import ProbabilitySource

CLASSES = ["background", "heart", "aorta"]
SIZE = 16


def clean_mask(index: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[3:9, 3 + index % 3 : 9 + index % 3] = 1
    mask[10:14, 10:14] = 2
    return mask


def noisy_mask(index: int) -> np.ndarray:
    """Image i has i * 4 wrong pixels: the bigger the index, the worse the label."""
    mask = clean_mask(index)
    wrong = np.zeros(SIZE * SIZE, dtype=bool)
    wrong[: index * 4] = True
    mask[wrong.reshape(SIZE, SIZE)] = 2
    return mask


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    ids = [f"P00{i}_000" for i in range(5)]
    rng = np.random.default_rng(0)
    for i, slice_id in enumerate(ids):
        write_image(
            root / "images" / f"{slice_id}.npy",
            (clean_mask(i) * 100 + rng.normal(0, 10, (SIZE, SIZE))).astype(np.float32),
        )
        write_mask(root / "masks" / f"{slice_id}.png", noisy_mask(i))
    write_split_ids(root, "train", ids)
    write_dataset_info(root, DatasetInfo(name="tiny", classes=CLASSES))
    return root


class ThresholdModel(ProbabilitySource):
    """A "model" that reads the class off the intensity (class * 100 plus noise of std 10), sure
    of it at 0.95: it predicts the clean masks."""

    def probabilities(self, image: np.ndarray) -> torch.Tensor:
        prediction = np.clip(np.rint(image[0] / 100), 0, len(CLASSES) - 1).astype(np.int64)
        probs = np.full((len(CLASSES), *prediction.shape), 0.025, dtype=np.float32)
        np.put_along_axis(probs, prediction[None], 0.95, axis=0)
        return torch.from_numpy(probs)


def source(root: Path) -> ThresholdModel:
    return ThresholdModel(open_source(root, "train"), CLASSES, torch.device("cpu"))


@pytest.fixture()
def review(dataset: Path, tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "review"
    return out, run_review(source(dataset), out, ReviewOptions(top=3))


def read_scores(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((out / "scores.csv").read_text())))


def test_scores_rank_the_worst_label_first_and_the_masks_are_written(review: tuple[Path, dict]) -> None:
    out, summary = review
    rows = read_scores(out)
    assert [r["slice_id"] for r in rows] == [f"P00{i}_000" for i in (4, 3, 2, 1, 0)]
    assert [float(r["label_quality"]) for r in rows] == sorted(float(r["label_quality"]) for r in rows)
    assert float(rows[0]["changed_fraction"]) == pytest.approx(16 / SIZE**2)
    assert rows[0]["classes_changed"] == "aorta>background:16"  # the first row painted aorta
    assert set(rows[0]) >= {f"iou_{name}" for name in CLASSES}
    for i in range(5):
        slice_id = f"P00{i}_000"
        assert np.array_equal(read_mask(out / "corrected" / f"{slice_id}.png"), clean_mask(i))
        assert np.array_equal(read_mask(out / "issues" / f"{slice_id}.png") == 255, noisy_mask(i) != clean_mask(i))
    assert summary["worst"] == [f"P00{i}_000" for i in (4, 3, 2)]
    moved = np.array(summary["transitions"])
    expected = sum(
        np.bincount(noisy_mask(i).ravel().astype(np.int64) * 3 + clean_mask(i).ravel(), minlength=9) for i in range(5)
    ).reshape(3, 3)
    assert np.array_equal(moved, expected)


def test_sorting_by_the_relabelled_share(dataset: Path, tmp_path: Path) -> None:
    from noisyseg.review.runner import ReviewRow, worst_first

    rows = [
        ReviewRow(0, "a", 0.1, 0.0, 0.0, []),
        ReviewRow(1, "b", 0.5, 0.3, 0.0, []),
        ReviewRow(2, "c", float("nan"), float("nan"), 0.0, []),
        ReviewRow(3, "d", 0.2, 0.1, 0.0, []),
    ]
    assert [r.slice_id for r in sorted(rows, key=worst_first("label_quality"))] == ["a", "d", "b", "c"]
    assert [r.slice_id for r in sorted(rows, key=worst_first("changed_fraction"))] == ["b", "d", "a", "c"]
    summary = run_review(
        source(dataset), tmp_path / "out", ReviewOptions(top=2, formats=["html"], sort="changed_fraction")
    )
    assert (
        summary["worst"] == ["P004_000", "P003_000"]
        and "worst images (by changed fraction)" in (tmp_path / "out" / "index.html").read_text()
    )
    with pytest.raises(ValueError, match="--sort"):
        ReviewOptions(sort="area")


def test_corrected_masks_keep_the_datasets_mask_format(dataset: Path, tmp_path: Path) -> None:
    for png in (dataset / "masks").glob("*.png"):
        np.save(png.with_suffix(".npy"), read_mask(png))
        png.unlink()
    run_review(source(dataset), tmp_path / "out", ReviewOptions(top=1, formats=["png"]))
    assert sorted(p.name for p in (tmp_path / "out" / "corrected").iterdir()) == [f"P00{i}_000.npy" for i in range(5)]
    assert not (tmp_path / "out" / "index.html").exists()


def test_label_studio_tasks_decode_with_label_studios_converter(review: tuple[Path, dict]) -> None:
    brush = pytest.importorskip(
        "label_studio_converter.brush", reason="label-studio-converter (dev extra) decodes Label Studio's brush RLE"
    )
    out, summary = review
    tasks = json.loads((out / "label-studio" / "tasks.json").read_text())
    assert [t["data"]["slice_id"] for t in tasks] == summary["worst"]
    config = (out / "label-studio" / "config.xml").read_text()
    for task in tasks:
        slice_id = task["data"]["slice_id"]
        assert (out / "label-studio" / task["data"]["image"]).is_file()
        decoded = np.zeros((SIZE, SIZE), dtype=np.uint8)
        for result in task["predictions"][0]["result"]:
            assert (result["from_name"], result["to_name"], result["type"]) == ("label", "image", "brushlabels")
            (name,) = result["value"]["brushlabels"]
            assert f'value="{name}"' in config
            layer = brush.decode_rle(result["value"]["rle"]).reshape(
                result["original_height"], result["original_width"], 4
            )[:, :, 3]
            decoded[layer == 255] = CLASSES.index(name)
        assert np.array_equal(decoded, clean_mask(int(slice_id[3])))


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under NumPy 2
def test_cvat_archive_decodes_with_pycocotools(review: tuple[Path, dict]) -> None:
    mask_api = pytest.importorskip("pycocotools.mask", reason="pycocotools (dev extra) decodes COCO RLE")
    out, summary = review
    with zipfile.ZipFile(out / "cvat" / "coco.zip") as archive:
        coco = json.loads(archive.read("annotations/instances_default.json"))
        names = set(archive.namelist())
    assert [c["name"] for c in coco["categories"]] == CLASSES[1:]
    assert [image["file_name"] for image in coco["images"]] == [f"{i}.png" for i in summary["worst"]]
    for image in coco["images"]:
        assert f"images/{image['file_name']}" in names
        decoded = np.zeros((image["height"], image["width"]), dtype=np.uint8)
        for annotation in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
            rle = mask_api.frPyObjects(annotation["segmentation"], image["height"], image["width"])
            region = mask_api.decode(rle).astype(bool)
            assert annotation["area"] == int(mask_api.area(rle)) and annotation["iscrowd"] == 1
            assert annotation["bbox"] == pytest.approx(mask_api.toBbox(rle).tolist())
            decoded[region] = annotation["category_id"]
        assert np.array_equal(decoded, clean_mask(int(image["file_name"][3])))


def browser_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_page_shows_its_images_and_tables_in_a_browser(review: tuple[Path, dict], tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) drives the browser")
    executable = browser_path()
    if executable is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; `make browser`)")
    out, summary = review
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        try:
            page = browser.new_page()
            page.goto((out / "index.html").resolve().as_uri())
            loaded = page.eval_on_selector_all(
                "img.view", "images => images.map(i => i.complete && i.naturalWidth > 0)"
            )
            assert loaded == [True] * (4 * 3)
            assert page.locator("table.worst tr").count() == 1 + 3
            assert page.locator("table.transitions tr").count() == 1 + len(CLASSES)
            assert page.locator("svg rect").count() == 20
            first = page.locator("table.worst tr").nth(1).inner_text()
            assert summary["worst"][0] in first
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "page.png").stat().st_size > 0


def test_review_needs_one_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["review", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--run RUN_DIR or --model" in err


def test_a_missing_run_is_a_one_line_error_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["review", "--run", str(tmp_path / "typo")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a noisyseg run directory" in err
    assert not (tmp_path / "typo").exists()


def test_bad_options_are_one_line_errors(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--format: unknown format"):
        ReviewOptions(formats=["pdf"])
    with pytest.raises(ValueError, match="--top"):
        ReviewOptions(top=0)
    with pytest.raises(ValueError, match="the model 2"):
        ThresholdModel(open_source(dataset, "train"), CLASSES[:2], torch.device("cpu"))
