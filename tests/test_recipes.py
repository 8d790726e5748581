"""The papers' ready configurations: listed, validated by the config loader with the papers'
values, refused without the fields they need, and each trained for one iteration on a tiny tree.

The one-iteration runs keep every setting of the recipe (crops, augmentation, schedule, method)
but the network: the DeepLabv3+ ResNet-101 recipes get a CPU-sized model (timm's ResNet-18 with a
narrow head where timm imports, else a tiny UNet, which the test names), the SegTHOR one a UNet
of width 4; ResNet-101 itself is covered by tests/test_models_timm.py in the timm environment.
"""

# ruff: noqa: F811  (the tiny trees are fixtures imported from test_datasets and test_trainer)
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from test_datasets import cityscapes, voc  # noqa: F401  (fixtures: the tiny trees)
from test_trainer import folders  # noqa: F401  (fixture: a tiny folder with noisy labels)

from noisyseg.cli import main
from noisyseg.config import build_config
from noisyseg.recipes import read_recipe, recipe_names

RECIPES = ["cityscapes-coarse-arm", "segthor-adele", "voc-weak-adele"]
TINY_UNET = "model.kwargs={base_width: 4, depth: 2}"
try:
    import timm  # noqa: F401

    CPU_SIZED = ["model.kwargs={backbone: resnet18, output_stride: 16, pretrained: false, aspp_channels: 32}"]
except Exception:  # timm, or the torchvision it needs, does not import next to this torch
    CPU_SIZED = ["model.architecture=unet", TINY_UNET]
RUN = ["--epochs", "1", "--quiet", "--set=loss.backend=torch", "--set=loader.num_workers=0"]


def recipe_config(name: str):
    """The recipe through the config loader, with what it needs given as its upper-case last part."""
    recipe = read_recipe(name)
    return build_config(
        recipe.path,
        ["out=OUT", *(f"{need}={need.split('.')[-1].upper()}" for need in recipe.needs)],
    )


def test_recipes_are_listed_one_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    assert recipe_names() == RECIPES
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == RECIPES
    assert all(len(line) > 40 for line in lines)
    assert "needs data, layout_options.pseudo_labels" in lines[2]


def test_segthor_recipe_is_the_papers_setting() -> None:
    config = recipe_config("segthor-adele")
    assert (config.method, config.epochs, config.batch_size) == ("adele", 100, 5)
    assert config.model.architecture == "unet" and config.model.kwargs == {
        "base_width": 64,
        "depth": 4,
    }
    assert (config.optim.lr, config.optim.schedule) == (0.01, "constant")
    assert (config.adele.scales, config.adele.r, config.adele.tau, config.adele.rho) == (
        [1.0, 0.7, 1.5],
        0.9,
        0.7,
        0.8,
    )
    assert config.correction_timing() == "iteration" and not config.loader.augment.random


def test_cityscapes_recipe_is_the_arm_papers_setting() -> None:
    config = recipe_config("cityscapes-coarse-arm")
    assert (config.method, config.batch_size, config.layout_options) == (
        "arm",
        16,
        {"annotations": "gtCoarse"},
    )
    assert config.model.architecture == "deeplabv3plus_timm" and config.model.kwargs["backbone"] == "resnet101"
    assert (
        config.loader.augment.crop_size == [512, 1024] and config.loader.augment.flip and config.loader.augment.jitter
    )
    assert (config.optim.lr, config.optim.weight_decay, config.optim.schedule) == (
        0.02,
        0.0001,
        "multistep",
    )
    iterations = config.epochs * math.ceil(2975 / config.batch_size)  # Cityscapes' 2,975 training images
    assert 40_000 <= iterations < 40_000 + math.ceil(2975 / config.batch_size)


def test_voc_recipe_is_the_weakly_supervised_setting() -> None:
    config = recipe_config("voc-weak-adele")
    assert (config.method, config.layout, config.layout_options) == (
        "adele",
        "voc",
        {"aug": True, "pseudo_labels": "PSEUDO_LABELS"},
    )
    assert config.model.kwargs["backbone"] == "resnet101" and config.loader.augment.crop_size == [
        512,
        512,
    ]
    assert config.adele.tau == 0.8 and config.correction_timing() == "epoch" and config.adele.correction_flip


def test_a_recipe_refuses_to_start_without_what_it_needs(
    voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def error(*args: str) -> str:
        assert main(["train", *args, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err
        return err

    assert "recipe voc-weak-adele needs layout_options.pseudo_labels" in error(
        "--recipe", "voc-weak-adele", "--data", str(voc)
    )
    assert "recipe segthor-adele needs labels" in error("--recipe", "segthor-adele", "--data", str(voc))
    assert "unknown recipe 'voc'; known recipes: cityscapes-coarse-arm, segthor-adele, voc-weak-adele" in error(
        "--recipe", "voc"
    )
    assert "--config and --recipe are alternatives" in error(
        "--recipe", "segthor-adele", "--config", str(tmp_path / "c.yaml")
    )
    assert not (tmp_path / "run").exists()


def trained_iterations(run: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_segthor_recipe_trains_one_iteration(folders: tuple[Path, Path], tmp_path: Path) -> None:
    data, labels = folders  # 8 training slices: one batch of 8
    args = [
        "train",
        "--recipe",
        "segthor-adele",
        "--data",
        str(data),
        "--labels",
        str(labels),
        "--out",
        str(tmp_path / "run"),
        "--batch-size",
        "8",
    ]
    assert main([*args, *RUN, f"--set={TINY_UNET}"]) == 0
    assert trained_iterations(tmp_path / "run") == [1]


def test_cityscapes_recipe_trains_one_iteration(cityscapes: Path, tmp_path: Path) -> None:
    args = [
        "train",
        "--recipe",
        "cityscapes-coarse-arm",
        "--data",
        str(cityscapes),
        "--out",
        str(tmp_path / "run"),
        "--batch-size",
        "3",
    ]
    assert main([*args, *RUN, *[f"--set={o}" for o in CPU_SIZED]]) == 0
    assert trained_iterations(tmp_path / "run") == [1]


def test_voc_recipe_trains_one_iteration(voc: Path, tmp_path: Path) -> None:
    pseudo = tmp_path / "pseudo"  # pseudo-labels: here SBD's masks, copied
    shutil.copytree(voc / "SegmentationClassAug", pseudo)
    args = [
        "train",
        "--recipe",
        "voc-weak-adele",
        "--data",
        str(voc),
        "--out",
        str(tmp_path / "run"),
        f"--set=layout_options.pseudo_labels={pseudo}",
    ]
    assert main([*args, *RUN, *[f"--set={o}" for o in CPU_SIZED]]) == 0  # trainaug's 3 images: one batch of 10
    assert trained_iterations(tmp_path / "run") == [1]
