"""Bad input through the real commands: one line naming the file or option, exit status 2, and
nothing written or lost (data, predictions, resumed runs, model files, exports)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from dist_helpers import make_phantom
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from noisyseg.cli import main
from noisyseg.data.folder import read_split_ids
from noisyseg.data.noise import corrupt_dataset
from noisyseg.models.model_file import METADATA_KEY, load_model
from noisyseg.run.run_dir import resolve_model_file

TINY = [
    "--batch-size",
    "4",
    "--quiet",
    "--loss-backend",
    "torch",
    "--set=model.kwargs.base_width=4",
    "--set=model.kwargs.depth=2",
]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """(exit status, stderr) of `noisyseg ARGV` in this process (logs quiet, so stderr is the error)."""
    capsys.readouterr()
    code = main(["--log-level", "ERROR", *argv])
    return code, capsys.readouterr().err


def one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The error of a command that must fail with exit status 2 and one line on stderr."""
    code, err = run(capsys, *argv)
    assert code == 2, err
    lines = err.rstrip("\n").split("\n")  # progress bars may come first
    assert (
        ": error: " in lines[-1] and "Traceback" not in err and not any(": error: " in line for line in lines[:-1])
    ), err
    return lines[-1]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_phantom(tmp_path_factory.mktemp("phantom"))


@pytest.fixture(scope="module")
def trained(phantom: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch baseline run on the phantom (its model.safetensors and checkpoint)."""
    data, labels = phantom
    out = tmp_path_factory.mktemp("trained") / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--labels",
                str(labels),
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
    return out


def copy_data(data: Path, out: Path) -> Path:
    shutil.copytree(data, out)
    return out


# ----------------------------------------------------------------------------- non-finite data


def test_predict_refuses_a_non_finite_image_naming_it(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = np.random.default_rng(0).normal(size=(32, 32)).astype(np.float32)
    np.save(inputs / "a.npy", image)
    image[3, 4] = np.nan
    np.save(inputs / "b.npy", image)
    err = one_line_error(
        capsys, "predict", "--run", str(trained), "--input", str(inputs), "--out", str(tmp_path / "out"), "--quiet"
    )
    assert f"{inputs / 'b.npy'}: image holds 1 non-finite value" in err
    assert not (tmp_path / "out" / "b.png").exists()


def write_nifti(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def test_data_segthor_and_predict_refuse_a_nan_voxel_naming_the_file(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "segthor"
    for index in range(3):
        name = f"Patient_{index + 1:02d}"
        ct = np.full((16, 16, 4), -500.0 + index, dtype=np.float32)
        labels = np.zeros((16, 16, 4), dtype=np.uint8)
        labels[4:10, 4:10, 1:3] = 2
        if index == 1:
            ct[5, 6, 2] = np.nan
        write_nifti(root / name / f"{name}.nii.gz", ct)
        write_nifti(root / name / "GT.nii.gz", labels)
    bad = root / "Patient_02" / "Patient_02.nii.gz"
    err = one_line_error(capsys, "data", "segthor", "--root", str(root), "--out", str(tmp_path / "out"), "--size", "16")
    assert f"{bad}: volume holds 1 non-finite voxel" in err
    assert not (tmp_path / "out").exists()
    err = one_line_error(
        capsys, "predict", "--run", str(trained), "--input", str(bad), "--out", str(tmp_path / "pred"), "--quiet"
    )
    assert f"{bad}: volume holds 1 non-finite voxel" in err
    assert not (tmp_path / "pred").exists()


@pytest.mark.parametrize("cache", ["true", "false"])
def test_training_on_a_non_finite_image_names_the_file(
    phantom: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], cache: str
) -> None:
    data = copy_data(phantom[0], tmp_path / "data")
    slice_id = read_split_ids(data, "train")[2]
    image = np.load(data / "images" / f"{slice_id}.npy")
    image[0, :3] = np.inf
    np.save(data / "images" / f"{slice_id}.npy", image)
    err = one_line_error(
        capsys,
        "train",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--method",
        "baseline",
        "--epochs",
        "1",
        f"--set=loader.cache={cache}",
        *TINY,
    )
    assert f"{data / 'images' / slice_id}.npy: image holds 3 non-finite values" in err
    if cache == "true":
        # Refused while setting up: no run is left behind that a corrected rerun would have to
        # resume. (Streamed, the file is read in the first step; that run resumes from epoch 0.)
        assert not (tmp_path / "run" / "config.json").exists()


# ----------------------------------------------------------------------------- predict outputs and sizes


def test_predict_refuses_inputs_that_would_write_the_same_mask(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(1)
    np.save(inputs / "x.npy", rng.normal(size=(32, 32)).astype(np.float32))
    Image.fromarray(rng.integers(0, 255, size=(32, 32), dtype=np.uint8)).save(inputs / "x.png")
    err = one_line_error(
        capsys, "predict", "--run", str(trained), "--input", str(inputs), "--out", str(tmp_path / "out"), "--quiet"
    )
    assert f"{inputs / 'x.png'} and {inputs / 'x.npy'} would both be written as {tmp_path / 'out' / 'x.png'}" in err
    assert not (tmp_path / "out").exists()


def test_training_images_smaller_than_the_network_takes_name_the_minimum_size(
    phantom: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The default UNet (depth 4) halves its input four times: 16 pixels at least, at every scale.
    data = phantom[0]
    args = ["train", "--data", str(data), "--epochs", "1", "--batch-size", "4", "--quiet", "--loss-backend", "torch"]
    err = one_line_error(capsys, *args, "--out", str(tmp_path / "a"), "--method", "adele", "--set=model.kwargs.depth=5")
    assert "the unet network (stride 32) needs at least 32 pixels per side" in err
    assert "training images of 32x32 pixels reach it at 22x22 (scale 0.7)" in err
    assert "at least 46 pixels per side" in err
    err = one_line_error(
        capsys, *args, "--out", str(tmp_path / "b"), "--method", "baseline", "--set=loader.augment.crop_size=[8,8]"
    )
    assert "the unet network (stride 16) needs at least 16 pixels per side" in err
    assert "loader.augment.crop_size [8, 8]" in err


# ----------------------------------------------------------------------------- resume


def test_resume_refuses_a_checkpoint_of_another_configuration(
    phantom: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, labels = phantom
    runs = {}
    for seed in (0, 1):
        runs[seed] = tmp_path / f"seed{seed}"
        assert (
            main(
                [
                    "train",
                    "--data",
                    str(data),
                    "--labels",
                    str(labels),
                    "--out",
                    str(runs[seed]),
                    "--method",
                    "baseline",
                    "--epochs",
                    "1",
                    "--seed",
                    str(seed),
                    *TINY,
                ]
            )
            == 0
        )
    # A checkpoint copied over from the seed-1 run into the seed-0 run's directory.
    shutil.rmtree(runs[0] / "checkpoint")
    shutil.copytree(runs[1] / "checkpoint", runs[0] / "checkpoint")
    before = tree(runs[0])
    err = one_line_error(capsys, "train", "--resume", str(runs[0]), "--epochs", "2", "--quiet")
    assert f"{runs[0] / 'checkpoint' / 'state.json'}: checkpoint of another configuration (differs in seed)" in err
    assert tree(runs[0]) == before


def test_resume_after_editing_the_architecture_is_one_line(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    config_file = run_dir / "config.json"
    stored = json.loads(config_file.read_text())
    stored["config"]["model"]["kwargs"]["base_width"] = 6
    config_file.write_text(json.dumps(stored))
    err = one_line_error(capsys, "train", "--resume", str(run_dir), "--epochs", "2", "--quiet")
    assert "checkpoint of another configuration (differs in model.kwargs)" in err
    # The checkpoint's own configuration edited the same way: the weights no longer fit the network.
    state_file = run_dir / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    state["config"]["model"]["kwargs"]["base_width"] = 6
    state_file.write_text(json.dumps(state))
    err = one_line_error(capsys, "train", "--resume", str(run_dir), "--epochs", "2", "--quiet")
    assert f"{run_dir / 'checkpoint'}: weights do not fit the unet network" in err
    assert "size mismatch for" in err


def test_train_refuses_labels_made_from_another_data_folder(
    phantom: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    data, labels = phantom
    # Another data folder: the same slice ids, one clean training mask relabelled.
    other = copy_data(data, tmp_path / "other")
    mask_file = other / "masks" / f"{read_split_ids(other, 'train')[0]}.png"
    mask = np.asarray(Image.open(mask_file)).copy()
    mask[0, 0] = 1 + mask[0, 0] % 4
    Image.fromarray(mask).save(mask_file)
    other_labels = tmp_path / "other_noisy"
    corrupt_dataset(other, other_labels, "erode-dilate", seed=0)
    err = one_line_error(
        capsys,
        "train",
        "--data",
        str(data),
        "--labels",
        str(other_labels),
        "--out",
        str(tmp_path / "run"),
        "--method",
        "baseline",
        "--epochs",
        "1",
        *TINY,
    )
    assert f"{other_labels / 'noise.json'}: the labels were made from {other}" in err
    assert f"whose clean training masks differ from those of {data}" in err
    # A noise.json of an older version (no fingerprint) is accepted with a warning.
    old_labels = copy_data(labels, tmp_path / "old_noisy")
    noise = json.loads((old_labels / "noise.json").read_text())
    del noise["clean_masks_sha256"]
    (old_labels / "noise.json").write_text(json.dumps(noise))
    with caplog.at_level(logging.WARNING, logger="noisyseg"):
        assert (
            main(
                [
                    "train",
                    "--data",
                    str(data),
                    "--labels",
                    str(old_labels),
                    "--out",
                    str(tmp_path / "old"),
                    "--method",
                    "baseline",
                    "--epochs",
                    "1",
                    *TINY,
                ]
            )
            == 0
        )
    assert any("no fingerprint of its source's clean masks" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- damaged files


def overwrite(path: Path, offset_from_end: int, count: int = 64) -> None:
    raw = bytearray(path.read_bytes())
    start = len(raw) - offset_from_end
    raw[start : start + count] = b"\x7f" * count
    path.write_bytes(bytes(raw))


def test_a_damaged_model_file_is_caught_on_load(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    model_file = run_dir / "model.safetensors"
    overwrite(model_file, 4096)
    with pytest.raises(ValueError, match="content hash"):
        load_model(model_file)
    err = one_line_error(capsys, "export", "onnx", "--checkpoint", str(run_dir), "--out", str(tmp_path / "m.onnx"))
    assert f"{model_file}: damaged model file (its weights do not match the content hash written with them)" in err
    assert not (tmp_path / "m.onnx").exists()


def test_a_model_file_without_a_content_hash_still_loads(trained: Path, tmp_path: Path) -> None:
    """Older model files carry no hash: they load as before."""
    with safe_open(str(trained / "model.safetensors"), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = {METADATA_KEY: handle.metadata()[METADATA_KEY]}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=metadata)
    model, _ = load_model(tmp_path / "old.safetensors")
    expected, _ = load_model(resolve_model_file(trained))
    for (name, value), other in zip(model.state_dict().items(), expected.state_dict().values(), strict=True):
        assert torch.equal(value, other), name


def test_a_damaged_training_checkpoint_is_caught_on_resume(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    overwrite(run_dir / "checkpoint" / "state.safetensors", 2048)
    before = tree(run_dir)
    err = one_line_error(capsys, "train", "--resume", str(run_dir), "--epochs", "2", "--quiet")
    assert f"{run_dir / 'checkpoint' / 'state.safetensors'}: damaged checkpoint tensors" in err
    assert tree(run_dir) == before


# ----------------------------------------------------------------------------- export


def save_scaled_model(path: Path, factor: float) -> None:
    """A tiny UNet whose classifier weights are multiplied by `factor` (a valid model file)."""
    from noisyseg.models import create_model
    from noisyseg.models.model_file import ModelInfo, save_model

    torch.manual_seed(0)
    model = create_model("unet", base_width=4, depth=2)
    last = [p for name, p in model.named_parameters() if name.endswith("weight")][-1]
    with torch.no_grad():
        last.mul_(factor)
    save_model(path, model, ModelInfo("unet", {"base_width": 4, "depth": 2}, ["background", "a", "b"]))


@pytest.mark.parametrize(
    ("factor", "message"), [(float("nan"), "non-finite values"), (1e12, "beyond the plausible logit bound 1e+04")]
)
@pytest.mark.parametrize("output", ["logits", "labels"])
def test_export_refuses_non_finite_or_absurd_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], factor: float, message: str, output: str
) -> None:
    save_scaled_model(tmp_path / "model.safetensors", factor)
    err = one_line_error(
        capsys,
        "export",
        "onnx",
        "--checkpoint",
        str(tmp_path / "model.safetensors"),
        "--out",
        str(tmp_path / "m.onnx"),
        "--output",
        output,
        "--exporter",
        "torchscript",
    )
    assert f"{tmp_path / 'm.onnx'}: PyTorch logits of the sample inputs hold" in err and message in err
    assert not (tmp_path / "m.onnx").exists()


# ----------------------------------------------------------------------------- one-line errors


def test_data_folder_errors_name_the_file(
    phantom: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = copy_data(phantom[0], tmp_path / "data")
    description = data / "dataset.json"
    info = json.loads(description.read_text())
    for patients in (["P000"], {"train": "P000"}, 3):
        description.write_text(json.dumps({**info, "patients": patients}))
        err = one_line_error(capsys, "data", "inspect", "--data", str(data), "--quiet")
        assert f"{description}: field 'patients' must map each split to a list of patient ids" in err
    description.write_bytes(json.dumps(info).encode("utf-8").replace(b'"name"', b'"n\xe4me"'))
    err = one_line_error(capsys, "train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY)
    assert f"{description}: not UTF-8 text" in err
    config_file = tmp_path / "run.yaml"
    config_file.write_bytes(b"method: baseline\nseed: \xff\n")
    err = one_line_error(
        capsys, "train", "--data", str(data), "--out", str(tmp_path / "run"), "--config", str(config_file)
    )
    assert f"{config_file}: not UTF-8 text" in err and "configuration file" in err


def test_segthor_size_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "segthor"
    root.mkdir()
    for size in ("0", "-3"):
        err = one_line_error(
            capsys, "data", "segthor", "--root", str(root), "--out", str(tmp_path / "out"), "--size", size
        )
        assert f"--size: slice size must be at least 1 pixel, got {size}" in err


def test_api_key_file_that_is_not_text_is_named(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(b"\xff\xfe\x00secret")
    err = one_line_error(capsys, "serve", "--model", str(trained), "--api-key-file", str(key_file))
    assert f"{key_file}: not UTF-8 text" in err and "API key file" in err


def test_export_commands_name_files_of_the_wrong_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_npz = tmp_path / "golden.npz"
    not_npz.write_bytes(b"PK\x03\x04 this is no zip archive")
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_bytes(b"\x00\x01 not a protobuf \xff" * 8)
    err = one_line_error(capsys, "export", "check", "--model", str(not_onnx), "--golden", str(not_npz))
    assert f"{not_npz}: not a noisyseg golden file" in err
    err = one_line_error(capsys, "export", "triton-repo", "--onnx", str(not_onnx), "--out", str(tmp_path / "repo"))
    assert f"{not_onnx}: not an ONNX model" in err
    assert not (tmp_path / "repo").exists()
    # An empty file parses as an empty protobuf message; an .npy array is no golden archive.
    not_onnx.write_bytes(b"")
    err = one_line_error(capsys, "export", "triton-repo", "--onnx", str(not_onnx), "--out", str(tmp_path / "repo"))
    assert f"{not_onnx}: not an ONNX model (it holds no graph)" in err
    np.save(tmp_path / "array.npy", np.zeros(3))
    err = one_line_error(capsys, "export", "check", "--model", str(not_onnx), "--golden", str(tmp_path / "array.npy"))
    assert f"{tmp_path / 'array.npy'}: not a noisyseg golden file (a single .npy array" in err
