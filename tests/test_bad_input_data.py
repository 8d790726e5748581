"""Bad input on the data, review and training surfaces, through the real commands: layout
options, annotations a tree lacks, review outputs and class names, non-finite configuration
values, labels of unknown origin, and a resume that would mix two runs (issue 27, items 10-17)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from dist_helpers import make_phantom
from test_bad_input import TINY, copy_data, one_line_error, run, tree
from test_datasets import cityscapes  # noqa: F401  (fixture: a tiny Cityscapes tree)

from noisyseg.cli import main
from noisyseg.data.folder import (
    SPLITS,
    DatasetInfo,
    labels_origin,
    write_dataset_info,
    write_image,
    write_mask,
    write_split_ids,
)
from noisyseg.serve.loadgen import CLASS_NAMES, write_conv_model


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_phantom(tmp_path_factory.mktemp("phantom"))


def small_dataset(root: Path, classes: list[str]) -> Path:
    """A folder-layout dataset of three 16 x 16 single-channel images per split, classes named
    `classes` (as many as the conv model of `write_conv_model` predicts)."""
    rng = np.random.default_rng(0)
    ids = [f"P00{i}_000" for i in range(3)]
    for slice_id in ids:
        write_image(root / "images" / f"{slice_id}.npy", rng.normal(0, 100, (16, 16)).astype(np.float32))
        write_mask(root / "masks" / f"{slice_id}.png", rng.integers(0, len(classes), (16, 16)).astype(np.uint8))
    for split in SPLITS:
        write_split_ids(root, split, ids)
    write_dataset_info(root, DatasetInfo(name=root.name, classes=classes))
    return root


# ----------------------------------------------------------------------------- layout options (items 10, 14)


def test_data_inspect_refuses_an_unknown_option_naming_the_known_ones(
    cityscapes: Path, phantom: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:  # noqa: F811
    err = one_line_error(capsys, "data", "inspect", "--data", str(cityscapes), "--option", "foo=1", "--quiet")
    assert f"cityscapes layout of {cityscapes}: unknown option(s) foo; known: annotations, eval_annotations" in err
    data = phantom[0]
    err = one_line_error(capsys, "data", "inspect", "--data", str(data), "--option", "foo=1", "--quiet")
    assert f"folder layout of {data}: unknown option(s) foo; known: labels_root" in err


def test_train_refuses_an_unknown_layout_option(
    cityscapes: Path, phantom: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # noqa: F811
    data = phantom[0]
    args = ["--method", "baseline", "--epochs", "1", *TINY]
    # The folder layout's in-memory path opens no source: the options are checked all the same.
    err = one_line_error(
        capsys, "train", "--data", str(data), "--out", str(tmp_path / "folder"), "--set=layout_options.foo=1", *args
    )
    assert f"folder layout of {data}: unknown option(s) foo; known: labels_root" in err
    err = one_line_error(
        capsys,
        "train",
        "--data",
        str(cityscapes),
        "--out",
        str(tmp_path / "city"),
        "--set=layout_options.annotation=gtCoarse",
        *args,
    )
    assert (
        f"cityscapes layout of {cityscapes}: unknown option(s) annotation; known: annotations, eval_annotations" in err
    )
    # Nothing trained: no run is left that a corrected command would have to resume.
    assert not (tmp_path / "folder" / "config.json").exists() and not (tmp_path / "city" / "config.json").exists()


def test_export_and_review_refuse_an_unknown_layout_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = small_dataset(tmp_path / "data", list(CLASS_NAMES))
    model = write_conv_model(tmp_path / "model.onnx", output="logits")
    expected = f"folder layout of {data}: unknown option(s) foo; known: labels_root"
    err = one_line_error(
        capsys,
        "export",
        "golden",
        "--onnx",
        str(model),
        "--out",
        str(tmp_path / "golden.npz"),
        "--data",
        str(data),
        "--option",
        "foo=1",
    )
    assert expected in err and not (tmp_path / "golden.npz").exists()
    err = one_line_error(
        capsys,
        "export",
        "quantize",
        "--onnx",
        str(model),
        "--calib-data",
        str(data),
        "--out",
        str(tmp_path / "q.onnx"),
        "--option",
        "foo=1",
    )
    assert expected in err and not (tmp_path / "q.onnx").exists()
    err = one_line_error(
        capsys,
        "review",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "review"),
        "--option",
        "foo=1",
        "--quiet",
    )
    assert expected in err and not (tmp_path / "review" / "scores.csv").exists()


# ----------------------------------------------------------------------------- annotations the tree lacks (item 11)


def test_inspect_names_the_annotation_folder_the_tree_lacks(
    cityscapes: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # noqa: F811
    coarse = ["data", "inspect", "--data", str(cityscapes), "--option", "annotations=gtCoarse", "--quiet"]
    # A split another annotation set simply lacks is skipped: gtCoarse holds no test masks.
    code, _ = run(
        capsys, "data", "inspect", "--data", str(cityscapes), "--option", "eval_annotations=gtCoarse", "--quiet"
    )
    assert code == 0
    shutil.rmtree(cityscapes / "gtCoarse" / "train")
    err = one_line_error(capsys, *coarse)
    assert (
        f"{cityscapes / 'gtCoarse' / 'train'}: folder not found (the masks of split 'train' with annotations=gtCoarse"
        in err
    )
    shutil.rmtree(cityscapes / "gtCoarse")
    err = one_line_error(capsys, *coarse)
    assert f"{cityscapes / 'gtCoarse' / 'train'}: folder not found" in err
    err = one_line_error(
        capsys, "data", "inspect", "--data", str(cityscapes), "--option", "eval_annotations=gtCoarse", "--quiet"
    )
    assert f"{cityscapes / 'gtCoarse'}" in err and "eval_annotations=gtCoarse" in err


# -------------------------------------------------------------------------- review outputs and classes (items 12, 13)


def test_review_out_below_a_regular_file_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder\n")
    out = blocker / "review"
    # The model does not even exist: the output folder is checked first.
    err = one_line_error(
        capsys,
        "review",
        "--model",
        str(tmp_path / "missing.onnx"),
        "--data",
        str(tmp_path / "missing"),
        "--out",
        str(out),
        "--quiet",
    )
    assert f"{out}: review output folder is not writable (Not a directory); choose another --out" in err
    assert blocker.read_text() == "a file, not a folder\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: no PermissionError to provoke")
def test_review_out_in_a_read_only_folder_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        err = one_line_error(
            capsys,
            "review",
            "--model",
            str(tmp_path / "missing.onnx"),
            "--data",
            str(tmp_path / "missing"),
            "--out",
            str(locked / "review"),
            "--quiet",
        )
    finally:
        locked.chmod(0o755)
    assert f"{locked / 'review'}: review output folder is not writable (Permission denied); choose another --out" in err
    assert not any(locked.iterdir())


def test_review_refuses_a_model_of_other_class_names_unless_told(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = write_conv_model(tmp_path / "model.onnx", output="logits")
    other = small_dataset(tmp_path / "other", ["background", "heart", "aorta"])
    review = ["review", "--model", str(model), "--format", "png", "--quiet"]
    err = one_line_error(capsys, *review, "--data", str(other), "--out", str(tmp_path / "refused"))
    assert (
        f"{model}: the model's classes {list(CLASS_NAMES)} are not "
        f"the classes of {other} ['background', 'heart', 'aorta']" in err
    )
    assert "--allow-class-mismatch" in err
    assert not (tmp_path / "refused" / "scores.csv").exists()
    code, err = run(capsys, *review, "--data", str(other), "--out", str(tmp_path / "allowed"), "--allow-class-mismatch")
    assert code == 0, err
    header = (tmp_path / "allowed" / "scores.csv").read_text().splitlines()[0]
    assert header.endswith("iou_background,iou_liver,iou_kidney")  # the model's names, as asked
    # The same names need no flag.
    same = small_dataset(tmp_path / "same", list(CLASS_NAMES))
    code, err = run(capsys, *review, "--data", str(same), "--out", str(tmp_path / "same_review"))
    assert code == 0, err


# ----------------------------------------------------------------------------- non-finite configuration (item 15)


def test_non_finite_config_values_are_refused_naming_the_field(
    phantom: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = phantom[0]
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY]
    cases = [
        ("adele.lam=.nan", "adele.lam", "nan"),
        ("optim.lr=.inf", "optim.lr", "inf"),
        ("adele.scales=[1.0, -.inf]", "adele.scales[1]", "-inf"),
        ("arm.lr=.nan", "arm.lr", "nan"),
        ("optim.lr=1e999", "optim.lr", "'1e999'"),
    ]
    for setting, field, shown in cases:
        err = one_line_error(capsys, *args, f"--set={setting}")
        assert f"config key '{field}': expected a finite number, got {shown}" in err, setting
    config_file = tmp_path / "run.yaml"
    config_file.write_text("method: adele\nadele:\n  tau: .nan\n")
    err = one_line_error(capsys, *args, "--config", str(config_file))
    assert "config key 'adele.tau': expected a finite number, got nan" in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- labels of unknown origin (item 16)


def test_labels_without_noise_json_are_trained_with_a_warning_and_recorded_unchecked(
    phantom: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, labels = phantom
    own = copy_data(labels, tmp_path / "own")
    (own / "noise.json").unlink()
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="noisyseg"):
        assert (
            main(
                [
                    "train",
                    "--data",
                    str(data),
                    "--labels",
                    str(own),
                    "--out",
                    str(out),
                    "--method",
                    "baseline",
                    "--epochs",
                    "1",
                    *TINY,
                ]
            )
            == 0
        )
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "origin of these masks cannot be checked" in r.getMessage()
    ]
    assert len(warnings) == 1 and warnings[0].startswith(f"{own}: no noise.json")
    assert json.loads((out / "config.json").read_text())["labels_origin"] == {"noise_file": None, "checked": False}
    # Labels that `data corrupt` made carry the fingerprint that training checks.
    assert labels_origin(labels) == {"noise_file": str(labels / "noise.json"), "checked": True}


# ----------------------------------------------------------------------------- a resume that mixes runs (item 17)


def test_resume_refuses_a_checkpoint_of_another_run_or_epoch(
    phantom: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, labels = phantom
    args = ["train", "--data", str(data), "--labels", str(labels), "--method", "baseline", *TINY]
    short, long = tmp_path / "short", tmp_path / "long"
    assert main([*args, "--out", str(short), "--epochs", "1"]) == 0
    assert main([*args, "--out", str(long), "--epochs", "1"]) == 0
    stale = shutil.copytree(long / "checkpoint", tmp_path / "long_epoch1")
    assert main(["train", "--resume", str(long), "--epochs", "2", "--quiet"]) == 0
    state = long / "checkpoint" / "state.json"

    # The longer run's checkpoint over the shorter one's: the same configuration but for
    # `epochs`, which a resume may change, so only the run id tells them apart.
    shutil.rmtree(short / "checkpoint")
    shutil.copytree(long / "checkpoint", short / "checkpoint")
    before = tree(short)
    err = one_line_error(capsys, "train", "--resume", str(short), "--epochs", "3", "--quiet")
    assert (
        f"{short / 'checkpoint' / 'state.json'}: checkpoint of another run" in err
        and f"{short / 'config.json'} has" in err
    )
    assert tree(short) == before

    # The run's own checkpoint of epoch 1 under its metrics of epochs 1 and 2.
    kept = shutil.move(long / "checkpoint", tmp_path / "long_epoch2")
    shutil.copytree(stale, long / "checkpoint")
    before = tree(long)
    err = one_line_error(capsys, "train", "--resume", str(long), "--epochs", "3", "--quiet")
    assert f"{state}: checkpoint after epoch 1, but the run's {long / 'metrics.jsonl'} records epochs up to 2" in err
    assert tree(long) == before

    # A crash between the checkpoint and the metrics leaves metrics.jsonl one epoch behind: that resumes.
    shutil.rmtree(long / "checkpoint")
    shutil.move(kept, long / "checkpoint")
    metrics = long / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines(keepends=True)[0])
    code, err = run(capsys, "train", "--resume", str(long), "--epochs", "2", "--quiet")
    assert code == 0, err

    # A run made before run ids (none in config.json, none in its checkpoints) resumes as before.
    for path in (long / "config.json", state):
        record = json.loads(path.read_text())
        del record["run_id"]
        path.write_text(json.dumps(record))
    code, err = run(capsys, "train", "--resume", str(long), "--epochs", "2", "--quiet")
    assert code == 0, err
