"""Bad input on the data, review and training surfaces, through the real commands: layout
options, annotations a tree lacks, review outputs and class names, non-finite configuration
values, labels of unknown origin, and a resume that would mix two runs (issue 27, items 10-17)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from dist_helpers import make_phantom
from test_bad_input import TINY, one_line_error, run
from test_datasets import cityscapes  # noqa: F401  (fixture: a tiny Cityscapes tree)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_phantom(tmp_path_factory.mktemp("phantom"))


# ----------------------------------------------------------------------------- layout options (items 10, 14)


def test_data_inspect_refuses_an_unknown_option_naming_the_known_ones(cityscapes: Path, phantom: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    err = one_line_error(capsys, "data", "inspect", "--data", str(cityscapes), "--option", "foo=1", "--quiet")
    assert f"cityscapes layout of {cityscapes}: unknown option(s) foo; known: annotations, eval_annotations" in err
    data = phantom[0]
    err = one_line_error(capsys, "data", "inspect", "--data", str(data), "--option", "foo=1", "--quiet")
    assert f"folder layout of {data}: unknown option(s) foo; known: labels_root" in err


def test_train_refuses_an_unknown_layout_option(cityscapes: Path, phantom: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    data = phantom[0]
    args = ["--method", "baseline", "--epochs", "1", *TINY]
    # The folder layout's in-memory path opens no source: the options are checked all the same.
    err = one_line_error(capsys, "train", "--data", str(data), "--out", str(tmp_path / "folder"), "--set=layout_options.foo=1", *args)
    assert f"folder layout of {data}: unknown option(s) foo; known: labels_root" in err
    err = one_line_error(capsys, "train", "--data", str(cityscapes), "--out", str(tmp_path / "city"), "--set=layout_options.annotation=gtCoarse", *args)
    assert f"cityscapes layout of {cityscapes}: unknown option(s) annotation; known: annotations, eval_annotations" in err
    # Nothing trained: no run is left that a corrected command would have to resume.
    assert not (tmp_path / "folder" / "config.json").exists() and not (tmp_path / "city" / "config.json").exists()


# ----------------------------------------------------------------------------- annotations the tree lacks (item 11)


def test_inspect_names_the_annotation_folder_the_tree_lacks(cityscapes: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    coarse = ["data", "inspect", "--data", str(cityscapes), "--option", "annotations=gtCoarse", "--quiet"]
    # A split another annotation set simply lacks is skipped: gtCoarse holds no test masks.
    code, _ = run(capsys, "data", "inspect", "--data", str(cityscapes), "--option", "eval_annotations=gtCoarse", "--quiet")
    assert code == 0
    shutil.rmtree(cityscapes / "gtCoarse" / "train")
    err = one_line_error(capsys, *coarse)
    assert f"{cityscapes / 'gtCoarse' / 'train'}: folder not found (the masks of split 'train' with annotations=gtCoarse" in err
    shutil.rmtree(cityscapes / "gtCoarse")
    err = one_line_error(capsys, *coarse)
    assert f"{cityscapes / 'gtCoarse' / 'train'}: folder not found" in err
    err = one_line_error(capsys, "data", "inspect", "--data", str(cityscapes), "--option", "eval_annotations=gtCoarse", "--quiet")
    assert f"{cityscapes / 'gtCoarse'}" in err and "eval_annotations=gtCoarse" in err
