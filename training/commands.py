"""The `train`, `eval` and `predict` subcommands."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from noisyseg.training.config import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_config_file,
)
from noisyseg.training.methods import METHODS

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
    parser.add_argument("--labels", help="folder whose masks/ replace the training masks of --data (those then serve as clean references)")
    parser.add_argument("--method", choices=METHODS, help="training method (default adele)")
    parser.add_argument("--epochs", type=int, help="number of epochs (default 100)")
    parser.add_argument("--batch-size", type=int, help="batch size (default 5)")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--loss-backend", help="loss backend of noisyseg.kernels (default auto: Triton on CUDA, numba on the CPU)")
    parser.add_argument("--device", help="auto (default: CUDA when available, else the CPU), cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), help="autocast precision of the network (default auto: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--config", help="YAML configuration file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="set a configuration field (repeatable)")
    parser.add_argument("--out", help="run directory to create")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_train)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Stored run config (with --resume) or defaults <- --config <- --set <- explicit options."""
    if args.resume:
        from noisyseg.training.run_dir import RunDir

        if args.config:
            raise ValueError("--config cannot be combined with --resume: a resumed run keeps its stored configuration")
        base = RunDir(args.resume).read_config().to_dict()
        base["out"] = args.resume
    else:
        base = config_from_dict(load_config_file(args.config) if args.config else {}).to_dict()
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
    return config_from_dict(values).validate()


def run_train(args: argparse.Namespace) -> int:
    from noisyseg.training.trainer import train

    config = train_config_from_args(args)
    summary = train(config, resume=bool(args.resume))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns the summary
        print(json.dumps({"out": config.out, **summary}, indent=2))
    return 0


# ----------------------------------------------------------------------------- eval


def register_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a run's selected model on a split of its data")
    parser.add_argument("--run", required=True, help="run directory (holds model.safetensors and config.json)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to evaluate (default test; train uses the data folder's own masks)")
    parser.add_argument("--data", help="data folder (default: the one recorded in the run)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", default="auto", help="auto (default: CUDA when available, else the CPU), cpu, cuda or cuda:N")
    parser.set_defaults(func=run_eval)


def evaluate_run(run_dir: str | Path, split: str = "test", data: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Single-scale IoU of `RUN_DIR/model.safetensors` on `split` of the run's data folder,
    computed in fp32 on `device`."""
    from noisyseg.training.checkpoint import load_model
    from noisyseg.training.data import load_split
    from noisyseg.training.device import resolve_device
    from noisyseg.training.evaluation import evaluate_split
    from noisyseg.training.run_dir import RunDir

    config = RunDir(run_dir).read_config()
    model, info = load_model(run_dir)
    model.to(resolve_device(device, field="--device"))
    data_root = data or config.data
    split_arrays = load_split(data_root, split)
    check_channels(split_arrays.images.shape[1], info.in_channels, data_root)
    scores = evaluate_split(model, split_arrays, info.num_classes, ignore_index_of(data_root), config.eval_batch_size)
    return {"run": str(run_dir), "data": str(data_root), "split": split, "classes": info.class_names, **scores}


def ignore_index_of(data_root: str | Path) -> int:
    from noisyseg.training.data import read_dataset_info

    return read_dataset_info(data_root).ignore_index


def check_channels(found: int, expected: int, source: str | Path) -> None:
    if found != expected:
        raise ValueError(f"{source}: images have {found} channel(s), the model expects {expected}")


def format_scores(result: dict[str, Any]) -> str:
    def percent(value: float | None) -> str:
        return "   n/a" if value is None else f"{100 * value:6.2f}"

    lines = [f"{result['split']} split of {result['data']}", f"{'class':<16} IoU (%)"]
    lines += [f"{name:<16} {percent(iou)}" for name, iou in zip(result["classes"], result["per_class_iou"], strict=True)]
    lines += [f"{'mIoU':<16} {percent(result['miou'])}", f"{'mIoU (no bg)':<16} {percent(result['miou_fg'])}"]
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> int:
    result = evaluate_run(args.run, args.split, args.data, args.device)
    print(json.dumps(result, indent=2) if args.json else format_scores(result))
    return 0


# ----------------------------------------------------------------------------- predict


def register_predict(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="segment every image (.npy/.png) of a folder into PNG masks")
    parser.add_argument("--run", required=True, help="run directory (or a model .safetensors file)")
    parser.add_argument("--input", required=True, help="folder of images (.npy raw values or .png)")
    parser.add_argument("--out", required=True, help="folder for the masks (<image name>.png)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--device", default="auto", help="auto (default: CUDA when available, else the CPU), cpu, cuda or cuda:N")
    parser.set_defaults(func=run_predict)


def image_files(folder: str | Path) -> list[Path]:
    from noisyseg.training.data import IMAGE_SUFFIXES

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: input folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({' or '.join(IMAGE_SUFFIXES)}) to predict")
    return files


def predict_folder(run: str | Path, input_dir: str | Path, out_dir: str | Path, quiet: bool = False, device: str = "auto") -> list[Path]:
    """Write `out_dir/<name>.png` (class ids) for every image in `input_dir`; returns the paths.

    Images are z-scored per slice exactly as the training loader does; the network runs in fp32
    on `device`.
    """
    import torch
    from tqdm import tqdm

    from noisyseg.training.checkpoint import load_model
    from noisyseg.training.data import normalize_image, read_image, write_mask
    from noisyseg.training.device import resolve_device

    model, info = load_model(run)
    target_device = resolve_device(device, field="--device")
    model.to(target_device)
    written = []
    for path in tqdm(image_files(input_dir), desc="predict", unit="image", disable=quiet):
        image = read_image(path)
        check_channels(image.shape[0], info.in_channels, path)
        with torch.no_grad():
            logits = model(torch.from_numpy(normalize_image(image, info.normalization))[None].to(target_device))
        target = Path(out_dir) / f"{path.stem}.png"
        write_mask(target, logits.argmax(dim=1)[0].to(torch.uint8).cpu().numpy())
        written.append(target)
    log.info("wrote %d masks to %s", len(written), out_dir)
    return written


def run_predict(args: argparse.Namespace) -> int:
    written = predict_folder(args.run, args.input, args.out, args.quiet, args.device)
    print(f"wrote {len(written)} masks to {args.out}")
    return 0
