"""NIfTI volumes in and out: `predict` on CT volumes writes label volumes with the input's
geometry, `eval --pred --gt` scores label volumes per patient."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage
import torch

from noisyseg import io as io_module
from noisyseg.cli import main
from noisyseg.config import TrainConfig
from noisyseg.data.nifti import SegthorConfig, convert_segthor
from noisyseg.data.phantom import CLASS_NAMES
from noisyseg.models import create_model
from noisyseg.models.model_file import ModelInfo, save_model
from noisyseg.run.run_dir import RunDir, resolve_model_file

TRAINED_SIZE = 32
SHAPE = (40, 24, 5)  # voxel axes x, y, z: in-plane 40 x 24, neither the trained size nor square
PATIENTS = ("Patient_01", "Patient_02", "Patient_03")


def affine() -> np.ndarray:
    matrix = np.diag([-0.8, 0.8, 2.5, 1.0])  # a flipped axis too
    matrix[:3, 3] = [120.0, -35.5, 310.0]
    return matrix


def write_ct(path: Path, seed: int) -> nib.Nifti1Image:
    """An int16 CT with a HU offset in its scaling, a qform and sform."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    hu = np.zeros(SHAPE)
    for z in range(SHAPE[2]):
        blob = (x - 12 - 3 * z) ** 2 / 40 + (y - 10 - z) ** 2 / 20 < 1
        hu[..., z] = np.where(blob, 400.0, -800.0) + (x * 7 + y * 3) + rng.normal(0, 30, SHAPE[:2])
    image = nib.Nifti1Image(np.rint(hu + 1024).astype(np.int16), affine())
    image.header.set_slope_inter(1.0, -1024.0)
    image.header.set_qform(affine(), code=1)
    image.header.set_sform(affine(), code=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return image


def write_labels(path: Path, labels: np.ndarray, matrix: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine() if matrix is None else matrix), path)


@pytest.fixture(scope="module")
def segthor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("segthor")
    for index, patient in enumerate(PATIENTS):
        write_ct(root / patient / f"{patient}.nii.gz", seed=index)
        labels = np.zeros(SHAPE, dtype=np.uint8)
        labels[5 + index : 20, 4:15, 1:4] = 2
        write_labels(root / patient / "GT.nii.gz", labels)
    return root


@pytest.fixture(scope="module")
def run(segthor: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory (no training): a tiny random UNet and a config naming the converted data."""
    base = tmp_path_factory.mktemp("run")
    data = base / "data"
    convert_segthor(segthor, data, SegthorConfig(size=TRAINED_SIZE, foreground_only=False))
    torch.manual_seed(5)
    kwargs = {"in_channels": 1, "num_classes": len(CLASS_NAMES), "base_width": 4, "depth": 2}
    model = create_model("unet", **kwargs).eval()
    with torch.no_grad():  # a zero-mean classifier without bias, so several classes win somewhere
        model.classifier.weight.normal_(0, 5)
        model.classifier.bias.zero_()
    run_dir = RunDir(base / "run")
    run_dir.path.mkdir()
    run_dir.write_config(TrainConfig(data=str(data), out=str(run_dir.path)))
    save_model(run_dir.model_file, model, ModelInfo("unet", kwargs, list(CLASS_NAMES)))
    return run_dir.path


def expected_labels(run: Path, patient: str) -> np.ndarray:
    """Independently: the slices `data segthor` wrote, z-scored, through the model, the labels
    resized back with scipy's nearest neighbour, in the volume's (x, y, z) voxel order."""
    from noisyseg.models.model_file import load_model

    model, _ = load_model(resolve_model_file(run))
    data = Path(RunDir(run).read_config().data)
    out = np.zeros(SHAPE, dtype=np.uint8)
    for z in range(SHAPE[2]):
        image = np.load(data / "images" / f"{patient}_{z:03d}.npy")
        assert image.shape == (TRAINED_SIZE, TRAINED_SIZE)
        normalised = (image - image.mean()) / (image.std() + 1e-6)
        with torch.no_grad():
            label = model(torch.from_numpy(normalised.astype(np.float32))[None, None]).argmax(1)[0].numpy()
        back = scipy.ndimage.zoom(
            label, (SHAPE[1] / TRAINED_SIZE, SHAPE[0] / TRAINED_SIZE), order=0, grid_mode=True, mode="grid-constant"
        )
        out[:, :, z] = back.T  # slices are (rows = y, columns = x)
    return out


def check_written(path: Path, source: Path, expected: np.ndarray) -> None:
    written, original = nib.load(path), nib.load(source)
    assert written.shape == original.shape
    assert np.array_equal(written.affine, original.affine)
    assert written.get_data_dtype() == np.uint8
    voxels = np.asanyarray(written.dataobj)
    assert voxels.dtype == np.uint8
    assert np.array_equal(voxels, expected)
    for field in ("pixdim", "qform_code", "sform_code", "xyzt_units", "dim"):
        assert np.array_equal(written.header[field], original.header[field]), field
    assert written.header.get_slope_inter() == (None, None)


def test_predict_one_volume_matches_an_independent_computation(run: Path, segthor: Path, tmp_path: Path) -> None:
    source = segthor / "Patient_01" / "Patient_01.nii.gz"
    out = tmp_path / "pred"
    assert (
        main(["predict", "--run", str(run), "--input", str(source), "--out", str(out), "--quiet", "--device", "cpu"])
        == 0
    )
    expected = expected_labels(run, "Patient_01")
    assert len(np.unique(expected)) >= 3, "the test model should predict several classes"
    assert sorted(p.name for p in out.iterdir()) == ["Patient_01.nii.gz"]
    check_written(out / "Patient_01.nii.gz", source, expected)


def test_predict_segthor_layout_and_flat_folder(run: Path, segthor: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    # SegTHOR layout: the CTs are predicted, the GT volumes beside them are not inputs.
    assert main(["predict", "--run", str(run), "--input", str(segthor), "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{p}.nii.gz" for p in PATIENTS]
    for patient in PATIENTS:
        check_written(out / f"{patient}.nii.gz", segthor / patient / f"{patient}.nii.gz", expected_labels(run, patient))
    # A flat folder of volumes, an uncompressed .nii among them, with an explicit --size and a model file.
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.nii.gz").write_bytes((segthor / "Patient_02" / "Patient_02.nii.gz").read_bytes())
    nib.save(nib.load(segthor / "Patient_03" / "Patient_03.nii.gz"), flat / "b.nii")
    out_flat = tmp_path / "pred_flat"
    model_file = RunDir(run).model_file
    assert (
        main(
            [
                "predict",
                "--run",
                str(model_file),
                "--input",
                str(flat),
                "--out",
                str(out_flat),
                "--size",
                str(TRAINED_SIZE),
                "--quiet",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out_flat.iterdir()) == ["a.nii.gz", "b.nii"]
    check_written(out_flat / "a.nii.gz", flat / "a.nii.gz", expected_labels(run, "Patient_02"))
    check_written(out_flat / "b.nii", flat / "b.nii", expected_labels(run, "Patient_03"))


def test_predict_volume_errors(run: Path, segthor: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = segthor / "Patient_01" / "Patient_01.nii.gz"
    # A model file alone does not say its trained size.
    assert (
        main(["predict", "--run", str(RunDir(run).model_file), "--input", str(source), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "pass --size" in capsys.readouterr().err
    assert (
        main(["predict", "--run", str(run), "--input", str(source), "--out", str(tmp_path / "o"), "--size", "30"]) == 2
    )
    assert "divisible by 4" in capsys.readouterr().err
    # --size with an image folder, and an output that would overwrite the input.
    images = tmp_path / "images"
    images.mkdir()
    np.save(images / "s.npy", np.zeros((32, 32), dtype=np.float32))
    assert (
        main(["predict", "--run", str(run), "--input", str(images), "--out", str(tmp_path / "o"), "--size", "32"]) == 2
    )
    assert "--size applies to NIfTI volumes" in capsys.readouterr().err
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.nii.gz").write_bytes(source.read_bytes())
    assert main(["predict", "--run", str(run), "--input", str(flat), "--out", str(flat)]) == 2
    assert "would overwrite its input" in capsys.readouterr().err
    assert (flat / "a.nii.gz").read_bytes() == source.read_bytes()


def test_predict_writes_atomically(run: Path, segthor: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = segthor / "Patient_01" / "Patient_01.nii.gz"
    out = tmp_path / "pred"
    out.mkdir()
    (out / "Patient_01.nii.gz").write_bytes(b"previous result")

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(io_module.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        main(["predict", "--run", str(run), "--input", str(source), "--out", str(out), "--quiet"])
    assert sorted(p.name for p in out.iterdir()) == ["Patient_01.nii.gz"]  # no temporary file left
    assert (out / "Patient_01.nii.gz").read_bytes() == b"previous result"


def test_image_folders_still_predict_pngs(run: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    np.save(images / "s.npy", np.random.default_rng(0).normal(size=(32, 32)).astype(np.float32))
    assert (
        main(["predict", "--run", str(run), "--input", str(images), "--out", str(tmp_path / "masks"), "--quiet"]) == 0
    )
    assert [p.name for p in (tmp_path / "masks").iterdir()] == ["s.png"]


# ----------------------------------------------------------------------------- eval --pred --gt


def eval_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_volumes_hand_computed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Patient A (2 x 2 x 2): truth has 3 voxels of class 1, prediction 2 of them plus 1 more.
    truth_a = np.zeros((2, 2, 2), dtype=np.uint8)
    truth_a[0, 0, :] = 1
    truth_a[1, 0, 0] = 1
    pred_a = np.zeros((2, 2, 2), dtype=np.uint8)
    pred_a[0, 0, :] = 1
    pred_a[1, 1, 1] = 1
    # Patient B: class 1 perfect (one voxel), class 2 only in the prediction.
    truth_b = np.zeros((2, 2, 2), dtype=np.uint8)
    truth_b[0, 0, 0] = 1
    pred_b = truth_b.copy()
    pred_b[1, 1, 1] = 2
    write_labels(tmp_path / "pred" / "Patient_A.nii.gz", pred_a)
    write_labels(tmp_path / "pred" / "Patient_B.nii.gz", pred_b)
    write_labels(tmp_path / "gt" / "Patient_A" / "GT.nii.gz", truth_a)  # SegTHOR layout
    write_labels(tmp_path / "gt" / "Patient_B.nii.gz", truth_b)  # a flat file
    write_labels(tmp_path / "gt" / "Patient_C" / "GT.nii.gz", truth_b)  # not predicted: reported, not scored
    result = eval_json(
        capsys, "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--classes", "bg,one,two"
    )
    assert result["classes"] == ["bg", "one", "two"]
    assert [p["patient"] for p in result["patients"]] == ["Patient_A", "Patient_B"]
    a, b = result["patients"]
    # A, class 1: |P n T| = 2, |P| = 3, |T| = 3 -> Dice 4/6, IoU 2/4; background: 4 of 5 and 5.
    assert a["dice"][:2] == pytest.approx([8 / 10, 4 / 6]) and a["dice"][2] is None
    assert a["iou"][:2] == pytest.approx([4 / 6, 2 / 4]) and a["iou"][2] is None
    # B: background 6 of 6 predicted and 7 true -> Dice 12/13, IoU 6/7; class 1 perfect; class 2 zero.
    assert b["dice"] == pytest.approx([12 / 13, 1.0, 0.0])
    assert b["iou"] == pytest.approx([6 / 7, 1.0, 0.0])
    mean = result["mean"]
    assert mean["dice"] == pytest.approx([(8 / 10 + 12 / 13) / 2, (4 / 6 + 1) / 2, 0.0])
    assert mean["iou"] == pytest.approx([(4 / 6 + 6 / 7) / 2, (2 / 4 + 1) / 2, 0.0])
    assert mean["dice_no_background"] == pytest.approx(((4 / 6 + 1) / 2 + 0.0) / 2)
    assert result["gt_without_prediction"] == ["Patient_C"]
    # Two files pair whatever their names; the table names patients and classes.
    assert (
        main(
            [
                "eval",
                "--pred",
                str(tmp_path / "pred" / "Patient_A.nii.gz"),
                "--gt",
                str(tmp_path / "gt" / "Patient_A" / "GT.nii.gz"),
                "--classes",
                "bg,one,two",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "Patient_A" in table and "Dice (%)" in table and " 66.67" in table


def test_eval_scores_predict_output_with_run_classes(
    run: Path, segthor: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pred"
    assert main(["predict", "--run", str(run), "--input", str(segthor), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    result = eval_json(capsys, "--pred", str(out), "--gt", str(segthor), "--run", str(run))
    assert result["classes"] == list(CLASS_NAMES)
    for row, patient in zip(result["patients"], PATIENTS, strict=True):
        pred = np.asanyarray(nib.load(out / f"{patient}.nii.gz").dataobj)
        truth = np.asanyarray(nib.load(segthor / patient / "GT.nii.gz").dataobj)
        for c in range(len(CLASS_NAMES)):
            both, total = np.sum((pred == c) & (truth == c)), np.sum(pred == c) + np.sum(truth == c)
            assert row["dice"][c] == (None if total == 0 else pytest.approx(2 * both / total))
    # From the data folder's dataset.json, and without --classes/--run/--data: SegTHOR's class names.
    data = RunDir(run).read_config().data
    assert eval_json(capsys, "--pred", str(out), "--gt", str(segthor), "--data", data)["classes"] == list(CLASS_NAMES)
    assert eval_json(capsys, "--pred", str(out), "--gt", str(segthor))["classes"] == list(CLASS_NAMES)


def test_eval_volume_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_labels(tmp_path / "pred" / "Patient_A.nii.gz", np.zeros((2, 2, 2)))
    write_labels(tmp_path / "gt" / "Patient_A" / "GT.nii.gz", np.zeros((2, 2, 3)))
    write_labels(tmp_path / "pred2" / "Patient_Z.nii.gz", np.zeros((2, 2, 2)))
    write_labels(tmp_path / "bad" / "Patient_A.nii.gz", np.full((2, 2, 2), 7))
    write_labels(tmp_path / "gt2" / "Patient_A.nii.gz", np.zeros((2, 2, 2)))
    cases = [
        (
            ["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")],
            ["Patient_A.nii.gz: prediction shape (2, 2, 2) does not match ground truth", "GT.nii.gz shape (2, 2, 3)"],
        ),
        (
            ["--pred", str(tmp_path / "pred2"), "--gt", str(tmp_path / "gt")],
            ["Patient_Z.nii.gz: no ground truth for 'Patient_Z'"],
        ),
        (
            ["--pred", str(tmp_path / "bad"), "--gt", str(tmp_path / "gt2")],
            ["bad/Patient_A.nii.gz vs", "class ids must lie in [0, 4]"],
        ),
        (["--pred", str(tmp_path / "pred")], ["--pred and --gt go together"]),
        (
            [
                "--pred",
                str(tmp_path / "pred"),
                "--gt",
                str(tmp_path / "gt"),
                "--classes",
                "a,b",
                "--data",
                str(tmp_path),
            ],
            ["one of --classes, --run or --data"],
        ),
        (["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "nowhere")], ["nowhere: no such file or folder"]),
        ([], ["eval needs --run"]),
    ]
    for args, messages in cases:
        assert main(["eval", *args]) == 2, args
        err = capsys.readouterr().err
        for message in messages:
            assert message in err, (args, err)
