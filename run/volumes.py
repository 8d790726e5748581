"""NIfTI volumes in and out: CT volumes segmented slice by slice into label volumes, and label
volumes scored against ground-truth volumes (per patient, per class Dice and IoU in 3D).

Names. A volume's name is its file name without `.nii.gz` / `.nii`; in the SegTHOR layout it is
the patient folder's name: `ROOT/Patient_XX/Patient_XX.nii.gz` is the CT of `Patient_XX` and
`ROOT/Patient_XX/GT.nii.gz` its ground truth. Prediction writes `OUT/<CT file name>`, so the
predictions of a SegTHOR folder are `OUT/Patient_XX.nii.gz` (the challenge's submission names),
and evaluation pairs a prediction with the ground truth of the same name.

Slices are prepared as `data segthor` prepares them for training (`nifti.read_volume`,
`nifti.resize_images` to the trained size, `data.normalize_image` per slice); the predicted
label slices are resized back to the volume's in-plane size with nearest neighbour
(`nifti.resize_masks`) and written in the input's voxel order with its affine and header.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import nibabel as nib
import numpy as np

from noisyseg.data.nifti import GT_FILE, read_volume, resize_images, resize_masks
from noisyseg.evaluation.metrics import confusion_matrix, dice_per_class, iou_per_class
from noisyseg.io import atomic_write_bytes, json_float, json_floats

if TYPE_CHECKING:
    import torch

    from noisyseg.run.finished import FinishedRun

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SLICE_BATCH = 16


def is_nifti(path: str | Path) -> bool:
    return Path(path).name.endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(file_name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if file_name.endswith(suffix):
            return file_name[: -len(suffix)]
    return file_name


def volume_name(path: str | Path) -> str:
    """The patient a volume file belongs to: its name without suffix; a SegTHOR `GT.nii.gz`
    belongs to its folder."""
    path = Path(path)
    if path.name in ground_truth_names():
        return path.parent.name
    return strip_nifti_suffix(path.name)


def ground_truth_names() -> tuple[str, ...]:
    return (GT_FILE, strip_nifti_suffix(GT_FILE) + ".nii")


def find_volumes(path: str | Path, role: Literal["image", "labels"]) -> dict[str, Path]:
    """Volume name -> file, for a .nii/.nii.gz file or a folder of them.

    A folder contributes its own `NAME.nii[.gz]` files and, for each subfolder `NAME/`, the
    SegTHOR file of `role`: `NAME/NAME.nii[.gz]` (the CT) for images, `NAME/GT.nii[.gz]` for
    labels. An empty dict when the folder holds none.
    """
    path = Path(path)
    if path.is_file():
        if not is_nifti(path):
            raise ValueError(f"{path}: not a NIfTI file (expected {' or '.join(NIFTI_SUFFIXES)})")
        return {volume_name(path): path}
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    found: dict[str, Path] = {}
    for entry in sorted(path.iterdir()):
        if entry.is_file() and is_nifti(entry):
            name, file = volume_name(entry), entry
        elif entry.is_dir():
            names = [f"{entry.name}{s}" for s in NIFTI_SUFFIXES] if role == "image" else list(ground_truth_names())
            files = [entry / n for n in names if (entry / n).is_file()]
            if not files:
                continue
            name, file = entry.name, files[0]
        else:
            continue
        if name in found:
            raise ValueError(f"{file}: volume '{name}' is also {found[name]}; each name may appear once")
        found[name] = file
    return found


# ----------------------------------------------------------------------------- prediction


def predict_slices(
    model: torch.nn.Module, volume: np.ndarray, size: int, normalization: str, device: torch.device
) -> np.ndarray:
    """Class ids (Z, H, W) uint8 of a (Z, H, W) volume in raw intensities: each slice resized to
    `size` x `size`, normalised, segmented in fp32 and its labels resized back (nearest)."""
    import torch

    from noisyseg.data.folder import normalize_image

    slices = resize_images(volume, size)
    labels = np.empty(slices.shape, dtype=np.uint8)
    for start in range(0, len(slices), SLICE_BATCH):
        batch = np.stack([normalize_image(s[None], normalization) for s in slices[start : start + SLICE_BATCH]])
        with torch.no_grad():
            logits = model(torch.from_numpy(batch).to(device))
        labels[start : start + len(batch)] = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
    return resize_masks(labels, (volume.shape[1], volume.shape[2]))


def label_volume_bytes(labels: np.ndarray, reference: nib.spatialimages.SpatialImage, compress: bool) -> bytes:
    """A (Z, H, W) label array as NIfTI bytes in `reference`'s voxel order, with its affine and a
    copy of its header (data type uint8, no intensity scaling)."""
    if not isinstance(reference, nib.Nifti1Image | nib.Nifti2Image):
        raise ValueError(f"{type(reference).__name__}: label volumes are written for NIfTI-1/2 inputs only")
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(None, None)
    image = type(reference)(
        np.ascontiguousarray(np.transpose(labels, (2, 1, 0)), dtype=np.uint8), reference.affine, header
    )
    data = image.to_bytes()
    return gzip.compress(data, compresslevel=6, mtime=0) if compress else data


def write_label_volume(path: str | Path, labels: np.ndarray, reference: nib.spatialimages.SpatialImage) -> None:
    """Write `labels` (Z, H, W) as `path` (.nii or .nii.gz) atomically: a reader sees no file or
    the whole volume, never part of one."""
    atomic_write_bytes(path, label_volume_bytes(labels, reference, compress=str(path).endswith(".gz")))


def training_size(run: FinishedRun, size: int | None) -> int:
    """The slice size the model was trained at: `size` when given, else that of the first
    training image in the run's data folder."""
    if size is not None:
        if size < 1:
            raise ValueError(f"--size: expected a positive slice size, got {size}")
        return size
    if run.config is None:
        raise ValueError(
            f"{run.path}: a model file does not record the slice size it was "
            "trained at; pass --size (the `data segthor --size` of its data)"
        )
    try:
        image = run.source("train").read_image(0)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(
            f"{run.path}: cannot read the trained slice size from "
            f"its data folder {run.config.data} ({err}); pass --size"
        ) from err
    height, width = image.shape[1:]
    if height != width:
        raise ValueError(
            f"{run.path}: its training slices are {height} x {width}, "
            "volume slices are resized to a square; pass --size"
        )
    return int(height)


def predict_volumes(
    run: str | Path,
    source: str | Path,
    out_dir: str | Path,
    size: int | None = None,
    quiet: bool = False,
    device: str = "auto",
) -> list[Path]:
    """Segment every volume of `source` (a .nii/.nii.gz file or a folder, see `find_volumes`)
    into `out_dir/<input file name>`; returns the written paths."""
    from tqdm import tqdm

    from noisyseg.run.finished import open_run

    volumes = find_volumes(source, "image")
    if not volumes:
        raise FileNotFoundError(f"{source}: no NIfTI volumes (NAME.nii.gz or Patient_XX/Patient_XX.nii.gz) to predict")
    finished = open_run(run, device)
    model, info, target_device = finished.model, finished.info, finished.device
    if info.in_channels != 1:
        raise ValueError(f"{run}: the model expects {info.in_channels} channel(s); CT volumes have one")
    slice_size = training_size(finished, size)
    stride = int(getattr(model, "stride", 1))
    if slice_size % stride:
        raise ValueError(f"--size {slice_size}: the model needs slice sizes divisible by {stride}")
    targets = {name: Path(out_dir) / path.name for name, path in volumes.items()}
    for name, target in targets.items():
        if target.resolve() == volumes[name].resolve():
            raise ValueError(f"{target}: the prediction would overwrite its input volume; choose another --out")
    written = []
    for name, path in tqdm(volumes.items(), desc="predict", unit="volume", disable=quiet):
        image, volume = read_volume(path)
        labels = predict_slices(model, volume, slice_size, info.normalization, target_device)
        write_label_volume(targets[name], labels, image)
        written.append(targets[name])
    log.info("wrote %d label volumes to %s", len(written), out_dir)
    return written


# ----------------------------------------------------------------------------- evaluation


def read_label_volume(path: Path) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    """(image, class ids as int64 in the file's voxel order)."""
    image, data = read_volume(path)
    labels = np.rint(data).astype(np.int64)
    if not np.array_equal(labels, data):
        raise ValueError(f"{path}: label volume holds non-integer values")
    return image, np.transpose(labels, (2, 1, 0))


def match_volumes(pred: str | Path, gt: str | Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """([(name, prediction, ground truth)], ground-truth names without a prediction).

    Two files are paired whatever their names; otherwise volumes pair by name (`find_volumes`)
    and every prediction needs its ground truth.
    """
    preds, gts = find_volumes(pred, "labels"), find_volumes(gt, "labels")
    if not preds:
        raise FileNotFoundError(f"{pred}: no predicted label volumes (NAME.nii.gz)")
    if not gts:
        raise FileNotFoundError(f"{gt}: no ground-truth volumes (NAME.nii.gz or Patient_XX/{GT_FILE})")
    if Path(pred).is_file() and Path(gt).is_file():
        return [(volume_name(pred), Path(pred), Path(gt))], []
    pairs = []
    for name, path in preds.items():
        if name not in gts:
            raise FileNotFoundError(
                f"{path}: no ground truth for '{name}' in {gt} (looked for {name}.nii.gz and {name}/{GT_FILE})"
            )
        pairs.append((name, path, gts[name]))
    return pairs, sorted(set(gts) - set(preds))


def score_volume(pred_path: Path, gt_path: Path, num_classes: int, ignore_index: int) -> np.ndarray:
    """The (C, C) confusion counts of one predicted volume against its ground truth."""
    pred_image, pred = read_label_volume(pred_path)
    gt_image, truth = read_label_volume(gt_path)
    if pred.shape != truth.shape:
        raise ValueError(
            f"{pred_path}: prediction shape {pred_image.shape} does "
            f"not match ground truth {gt_path} shape {gt_image.shape}"
        )
    if not np.allclose(pred_image.affine, gt_image.affine, atol=1e-3):
        log.warning("%s: affine differs from that of %s (voxels are compared as stored)", pred_path, gt_path)
    try:
        return confusion_matrix(pred, truth, num_classes, ignore_index)
    except ValueError as err:
        raise ValueError(f"{pred_path} vs {gt_path}: {err}") from err


def evaluate_volumes(
    pred: str | Path, gt: str | Path, class_names: list[str], ignore_index: int = 255
) -> dict[str, Any]:
    """Per patient and class, Dice and IoU over the whole volume (3D, from its confusion
    counts), and their means over patients (a class absent from both volumes of a patient is
    left out of that class's mean). JSON-ready: NaN as None."""
    pairs, unmatched = match_volumes(pred, gt)
    if unmatched:
        log.warning(
            "%d ground-truth volume(s) without a prediction are not scored: %s", len(unmatched), ", ".join(unmatched)
        )
    patients, dice_rows, iou_rows = [], [], []
    for name, pred_path, gt_path in pairs:
        conf = score_volume(pred_path, gt_path, len(class_names), ignore_index)
        dice, iou = dice_per_class(conf), iou_per_class(conf)
        dice_rows.append(dice)
        iou_rows.append(iou)
        patients.append(
            {
                "patient": name,
                "pred": str(pred_path),
                "gt": str(gt_path),
                "dice": json_floats(dice),
                "iou": json_floats(iou),
            }
        )
    mean_dice, mean_iou = nan_mean_rows(np.array(dice_rows)), nan_mean_rows(np.array(iou_rows))
    return {
        "pred": str(pred),
        "gt": str(gt),
        "classes": list(class_names),
        "patients": patients,
        "mean": {
            "dice": json_floats(mean_dice),
            "iou": json_floats(mean_iou),
            "dice_no_background": json_float(nan_mean(mean_dice[1:])),
            "iou_no_background": json_float(nan_mean(mean_iou[1:])),
        },
        "gt_without_prediction": unmatched,
    }


def nan_mean(values: np.ndarray) -> float:
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else float("nan")


def nan_mean_rows(rows: np.ndarray) -> np.ndarray:
    """Column means over the rows that are not NaN (NaN where a column has none)."""
    return np.array([nan_mean(rows[:, c]) for c in range(rows.shape[1])])


def format_volume_scores(result: dict[str, Any]) -> str:
    def percent(value: float | None) -> str:
        return "   n/a" if value is None else f"{100 * value:6.2f}"

    classes = result["classes"]
    width = max([12, *(len(p["patient"]) for p in result["patients"])])
    header = f"{'':<{width}} " + " ".join(f"{name[:10]:>10}" for name in classes)
    lines = [f"{result['pred']} vs {result['gt']}"]
    for metric, label in (("dice", "Dice (%)"), ("iou", "IoU (%)")):
        lines += ["", f"{label}", header]
        lines += [
            f"{p['patient']:<{width}} " + " ".join(f"{percent(v):>10}" for v in p[metric]) for p in result["patients"]
        ]
        lines.append(f"{'mean':<{width}} " + " ".join(f"{percent(v):>10}" for v in result["mean"][metric]))
    lines += [
        "",
        f"mean Dice (no bg) {percent(result['mean']['dice_no_background'])}",
        f"mean IoU (no bg)  {percent(result['mean']['iou_no_background'])}",
    ]
    if result["gt_without_prediction"]:
        lines.append(f"not scored (no prediction): {', '.join(result['gt_without_prediction'])}")
    return "\n".join(lines)
