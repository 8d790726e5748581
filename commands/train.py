"""The `train`, `eval` and `predict` subcommands."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from noisyseg.config import TrainConfig, apply_overrides, config_from_dict, load_config_file
from noisyseg.method_table import METHODS

# torch, tqdm and the training code are imported by the handlers, so `noisyseg --help` stays fast.

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    register_train(subparsers)
    register_eval(subparsers)
    register_predict(subparsers)


# ----------------------------------------------------------------------------- train


def register_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a segmenter on (noisy) labels: baseline, ADELE, ARM, GCE, OHEM",
        description="Train a segmentation network. Options override the --config file; "
        "--set KEY=VALUE sets any configuration field (for example --set adele.r=0.8).",
    )
    parser.add_argument("--data", help="data folder (images, masks, splits, dataset.json)")
    parser.add_argument(
        "--labels",
        help="folder whose masks/ replace the training masks of --data (those then serve as clean references)",
    )
    parser.add_argument("--method", choices=METHODS, help="training method (default adele)")
    parser.add_argument("--epochs", type=int, help="number of epochs (default 100)")
    parser.add_argument("--batch-size", type=int, help="batch size (default 5)")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument(
        "--loss-backend", help="loss backend of noisyseg.kernels (default auto: Triton on CUDA, numba on the CPU)"
    )
    parser.add_argument("--device", help="auto (default: CUDA when available, else the CPU), cpu, cuda or cuda:N")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="autocast precision of the network (default auto: bf16 on CUDA, fp32 on the CPU)",
    )
    parser.add_argument("--config", help="YAML configuration file")
    parser.add_argument(
        "--recipe",
        help="a ready configuration of the papers' settings instead of --config (noisyseg recipes lists them)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a configuration field (repeatable)",
    )
    parser.add_argument("--out", help="run directory to create")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_train)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Stored run config (with --resume) or defaults <- --config or --recipe <- --set <- explicit options."""
    from noisyseg.recipes import check_needs, read_recipe

    recipe = read_recipe(args.recipe) if args.recipe else None
    if args.resume:
        from noisyseg.run.run_dir import RunDir

        if args.config or recipe:
            raise ValueError(
                f"{'--config' if args.config else '--recipe'} cannot be combined "
                "with --resume: a resumed run keeps its stored configuration"
            )
        base = RunDir(args.resume).read_config().to_dict()
        base["out"] = args.resume
    else:
        if args.config and recipe:
            raise ValueError(
                "--config and --recipe are alternatives: give one (and --set KEY=VALUE for changes on top of it)"
            )
        source = recipe.path if recipe else args.config
        base = config_from_dict(load_config_file(source) if source else {}).to_dict()
    values = apply_overrides(base, args.overrides)
    explicit: dict[str, Any] = {
        "data": args.data,
        "labels": args.labels,
        "method": args.method,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "out": args.out,
        "device": args.device,
        "precision": args.precision,
    }
    values.update({key: value for key, value in explicit.items() if value is not None})
    if args.loss_backend:
        values["loss"]["backend"] = args.loss_backend
    if args.quiet:
        values["quiet"] = True
    if args.resume and args.out and Path(args.out) != Path(args.resume):
        raise ValueError(f"--out {args.out} differs from --resume {args.resume}; a resumed run stays in its directory")
    if recipe:
        check_needs(recipe, values)
    return config_from_dict(values).validate()


def train_and_draw(config: TrainConfig, resume: bool = False) -> dict:
    """`train`, then the run's curves.png (rank 0 under torchrun: every rank trains)."""
    from noisyseg.experiments.plots import plot_run_curves
    from noisyseg.training.trainer import train

    summary = train(config, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        plot_run_curves(Path(config.out))
    return summary


def run_train(args: argparse.Namespace) -> int:
    config = train_config_from_args(args)
    summary = train_and_draw(config, resume=bool(args.resume))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns the summary
        print(json.dumps({"out": config.out, **summary}, indent=2))
    return 0


# ----------------------------------------------------------------------------- eval


def register_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a run's selected model on a split of its data, or score label volumes against ground truth",
        description="With --run: IoU of the run's model on a split of its data folder. With --pred and --gt: "
        "per-patient, per-class 3D Dice and IoU of NIfTI label volumes against ground-truth volumes, paired by "
        "name (NAME.nii.gz, or Patient_XX/GT.nii.gz in the SegTHOR layout; two files pair whatever their names); "
        "class names from --classes, --run's model, --data's dataset.json, or SegTHOR's by default.",
    )
    parser.add_argument(
        "--run", help="run directory (holds model.safetensors and config.json); with --pred, only names the classes"
    )
    parser.add_argument(
        "--split",
        default="test",
        choices=("train", "val", "test"),
        help="split to evaluate (default test; train uses the data folder's own masks)",
    )
    parser.add_argument(
        "--data",
        help="data folder (default: the one recorded in the run); with --pred, its dataset.json names the classes",
    )
    parser.add_argument(
        "--pred", help="predicted label volume (.nii/.nii.gz) or a folder of them (as `predict` writes)"
    )
    parser.add_argument(
        "--gt", help="ground-truth label volume or folder (NAME.nii.gz or SegTHOR Patient_XX/GT.nii.gz)"
    )
    parser.add_argument("--classes", help="comma-separated class names, index = class id (volume scoring)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--device", default="auto", help="auto (default: CUDA when available, else the CPU), cpu, cuda or cuda:N"
    )
    parser.set_defaults(func=run_eval)


def evaluate_run(
    run_dir: str | Path, split: str = "test", data: str | None = None, device: str = "auto"
) -> dict[str, Any]:
    """Single-scale IoU of `RUN_DIR/model.safetensors` on `split` of the run's data folder,
    computed in fp32 on `device`."""
    from noisyseg.data.pipeline import ImageDataset
    from noisyseg.evaluation.inference import evaluate_split
    from noisyseg.run.finished import open_run

    run = open_run(run_dir, device, run_directory=True)
    config = run.require_config("its data")
    data_root = data or config.data
    # The run's layout and options, clean masks (never the noisy `--labels`).
    source = run.source(split, data_root)
    items = ImageDataset(source)
    info = run.info
    check_channels(int(items[0][0].shape[0]), info.in_channels, data_root)
    scores = evaluate_split(
        run.model,
        items,
        info.num_classes,
        source.info.ignore_index,
        config.eval_batch_size,
        window=config.loader.eval_window,
        overlap=config.loader.eval_overlap,
    )
    return {"run": str(run_dir), "data": str(data_root), "split": split, "classes": info.class_names, **scores}


def check_channels(found: int, expected: int, source: str | Path) -> None:
    if found != expected:
        raise ValueError(f"{source}: images have {found} channel(s), the model expects {expected}")


def format_scores(result: dict[str, Any]) -> str:
    def percent(value: float | None) -> str:
        return "   n/a" if value is None else f"{100 * value:6.2f}"

    lines = [f"{result['split']} split of {result['data']}", f"{'class':<16} IoU (%)"]
    lines += [
        f"{name:<16} {percent(iou)}" for name, iou in zip(result["classes"], result["per_class_iou"], strict=True)
    ]
    lines += [f"{'mIoU':<16} {percent(result['miou'])}", f"{'mIoU (no bg)':<16} {percent(result['miou_fg'])}"]
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> int:
    if args.pred or args.gt:
        return run_eval_volumes(args)
    if not args.run:
        raise ValueError("eval needs --run RUN_DIR (a split of the run's data) or --pred and --gt (label volumes)")
    result = evaluate_run(args.run, args.split, args.data, args.device)
    print(json.dumps(result, indent=2) if args.json else format_scores(result))
    return 0


def volume_classes(args: argparse.Namespace) -> tuple[list[str], int]:
    """(class names, ignore index) for volume scoring: --classes, --run's model, --data's
    dataset.json, else SegTHOR's classes (those `data segthor` writes)."""
    from noisyseg.data.folder import IGNORE_INDEX, read_dataset_info

    given = [name for name, value in (("--classes", args.classes), ("--run", args.run), ("--data", args.data)) if value]
    if len(given) > 1:
        raise ValueError(
            f"eval --pred: class names come from one of --classes, --run or --data, got {' and '.join(given)}"
        )
    if args.classes:
        names = [name.strip() for name in args.classes.split(",")]
        if len(names) < 2 or not all(names):
            raise ValueError(f"--classes: expected at least two comma-separated names, got {args.classes!r}")
        return names, IGNORE_INDEX
    if args.run:
        from noisyseg.models.model_file import read_model_info
        from noisyseg.run.run_dir import resolve_model_file

        return read_model_info(resolve_model_file(args.run)).class_names, IGNORE_INDEX
    if args.data:
        info = read_dataset_info(args.data)
        return info.classes, info.ignore_index
    from noisyseg.data.phantom import CLASS_NAMES

    return list(CLASS_NAMES), IGNORE_INDEX


def run_eval_volumes(args: argparse.Namespace) -> int:
    from noisyseg.run.volumes import evaluate_volumes, format_volume_scores

    if not (args.pred and args.gt):
        raise ValueError("eval: --pred and --gt go together (predicted and ground-truth label volumes)")
    classes, ignore_index = volume_classes(args)
    result = evaluate_volumes(args.pred, args.gt, classes, ignore_index)
    print(json.dumps(result, indent=2) if args.json else format_volume_scores(result))
    return 0


# ----------------------------------------------------------------------------- predict


def register_predict(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment every image (.npy/.png) of a folder into PNG masks, or CT volumes (.nii.gz) into label volumes",
        description="A folder of images gives OUT/<image name>.png masks. A .nii/.nii.gz volume, or a folder of them "
        "(NAME.nii.gz, or the SegTHOR layout Patient_XX/Patient_XX.nii.gz), gives OUT/<input file name>: a uint8 label "
        "volume with the input's shape, affine and header; slices are resized to the trained size as `data segthor` "
        "does and the labels back with nearest neighbour.",
    )
    parser.add_argument("--run", required=True, help="run directory (or a model .safetensors file)")
    parser.add_argument(
        "--input",
        required=True,
        help="folder of images (.npy raw values or .png), or a NIfTI volume or folder of volumes",
    )
    parser.add_argument(
        "--out", required=True, help="folder for the masks (<image name>.png) or label volumes (<input file name>)"
    )
    parser.add_argument(
        "--size",
        type=int,
        help="volumes only: slice size the model was trained at (default: read from the run's data folder)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--device", default="auto", help="auto (default: CUDA when available, else the CPU), cpu, cuda or cuda:N"
    )
    parser.set_defaults(func=run_predict)


def image_files(folder: str | Path) -> list[Path]:
    from noisyseg.data.folder import PREDICT_SUFFIXES as IMAGE_SUFFIXES

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: input folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({' or '.join(IMAGE_SUFFIXES)}) to predict")
    return files


def mask_targets(files: list[Path], out_dir: str | Path) -> dict[Path, Path]:
    """Input image -> `out_dir/<stem>.png`; refused before anything is written when two inputs
    would share a mask (`x.npy` and `x.png`) or a mask would replace its own input."""
    targets: dict[Path, Path] = {}
    by_target: dict[Path, Path] = {}
    for path in files:
        target = Path(out_dir) / f"{path.stem}.png"
        if target in by_target:
            raise ValueError(
                f"{path} and {by_target[target]} would both be written "
                f"as {target}; rename one or predict them separately"
            )
        if target.resolve() == path.resolve():
            raise ValueError(f"{target}: the mask would overwrite its input image; choose another --out")
        targets[path], by_target[target] = target, path
    return targets


def predict_folder(
    run: str | Path, input_dir: str | Path, out_dir: str | Path, quiet: bool = False, device: str = "auto"
) -> list[Path]:
    """Write `out_dir/<name>.png` (class ids) for every image in `input_dir`; returns the paths.

    Images are z-scored per slice exactly as the training loader does; the network runs in fp32
    on `device`.
    """
    import torch
    from tqdm import tqdm

    from noisyseg.data.folder import normalize_image, read_image, write_mask
    from noisyseg.evaluation.inference import whole_image_logits
    from noisyseg.run.finished import open_run

    targets = mask_targets(image_files(input_dir), out_dir)
    finished = open_run(run, device)
    model, info, target_device = finished.model, finished.info, finished.device
    written = []
    for path, target in tqdm(targets.items(), desc="predict", unit="image", disable=quiet):
        image = read_image(path)
        check_channels(image.shape[0], info.in_channels, path)
        with torch.no_grad():
            logits = whole_image_logits(
                model, torch.from_numpy(normalize_image(image, info.normalization))[None].to(target_device)
            )
        write_mask(target, logits.argmax(dim=1)[0].to(torch.uint8).cpu().numpy())
        written.append(target)
    log.info("wrote %d masks to %s", len(written), out_dir)
    return written


def run_predict(args: argparse.Namespace) -> int:
    from noisyseg.run.volumes import find_volumes, predict_volumes

    if find_volumes(args.input, "image"):
        written = predict_volumes(args.run, args.input, args.out, args.size, args.quiet, args.device)
        print(f"wrote {len(written)} label volumes to {args.out}")
        return 0
    if args.size is not None:
        raise ValueError(
            f"--size applies to NIfTI volumes; {args.input} holds none (images are segmented at their own size)"
        )
    written = predict_folder(args.run, args.input, args.out, args.quiet, args.device)
    print(f"wrote {len(written)} masks to {args.out}")
    return 0
