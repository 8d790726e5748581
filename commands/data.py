"""`noisyseg data ...`: build the phantom, convert SegTHOR, corrupt training labels, inspect a dataset.

Each subcommand prints a JSON summary to stdout (logs and progress bars go to stderr).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from noisyseg.data.noise_options import LEVEL_ITERATIONS, NOISE_FAMILIES

# The dataset code (numpy, scipy, torch) is imported by the handlers, so `noisyseg --help` stays fast.


def register(subparsers: Any) -> None:
    """Add `data phantom`, `data segthor`, `data corrupt` and `data inspect`."""
    data = subparsers.add_parser("data", help="build, convert and corrupt datasets")
    commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    phantom = commands.add_parser("phantom", help="write the synthetic SegTHOR-like CT phantom")
    phantom.add_argument("--out", required=True, help="new dataset folder (must not exist or be empty)")
    phantom.add_argument("--patients", type=int, default=20, help="number of patients (default 20)")
    # Unset phantom options keep PhantomConfig's defaults (run_phantom fills in only those given).
    phantom.add_argument("--size", type=int, help="slice size in pixels (default: the phantom's)")
    phantom.add_argument(
        "--slices-per-patient", type=int, help="axial slices rendered per patient (default: the phantom's)"
    )
    phantom.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    phantom.add_argument("--noise-hu", type=float, help="acquisition noise std in HU (default: the phantom's)")
    phantom.add_argument(
        "--contrast", type=float, help="soft-tissue contrast of heart/esophagus (default: the phantom's)"
    )
    phantom.add_argument(
        "--field-of-view",
        type=float,
        help="fraction of the body's field of view rendered, "
        "centred on the mediastinum (default: the phantom's, the whole body)",
    )
    phantom.add_argument("--all-slices", action="store_true", help="also keep slices without foreground")
    phantom.set_defaults(func=run_phantom)

    segthor = commands.add_parser("segthor", help="convert SegTHOR NIfTI volumes into the dataset folder format")
    segthor.add_argument(
        "--root", required=True, help="folder of Patient_XX/Patient_XX.nii.gz and Patient_XX/GT.nii.gz"
    )
    segthor.add_argument("--out", required=True, help="new dataset folder (must not exist or be empty)")
    segthor.add_argument("--size", type=int, default=256, help="slice size in pixels (default 256, as in the paper)")
    segthor.add_argument("--seed", type=int, default=0, help="seed of the patient split (default 0)")
    segthor.add_argument("--all-slices", action="store_true", help="also keep slices without foreground")
    segthor.set_defaults(func=run_segthor)

    corrupt = commands.add_parser("corrupt", help="write noisy training labels into a new folder")
    corrupt.add_argument("--data", required=True, help="dataset folder holding the clean labels")
    corrupt.add_argument("--noise", required=True, choices=NOISE_FAMILIES, help="noise family")
    corrupt.add_argument(
        "--level",
        type=int,
        choices=range(len(LEVEL_ITERATIONS)),
        help="erode-dilate only: ADELE Table 6 level (0..6 = 0,1,2,3,4,6,8 iterations); "
        "default: the reference setting (2-4 iterations per slice)",
    )
    corrupt.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    corrupt.add_argument(
        "--splits",
        default="train",
        help="comma-separated splits to corrupt: train (the default) or train,val (validation masks as noisy "
        "as the training masks, independent draws; `train --labels` then selects the checkpoint on them)",
    )
    corrupt.add_argument("--out", required=True, help="new noisy-label folder (must not exist or be empty)")
    corrupt.set_defaults(func=run_corrupt)

    inspect = commands.add_parser(
        "inspect", help="summarise a dataset folder in any supported layout and check every file"
    )
    inspect.add_argument(
        "--data",
        required=True,
        help="dataset root: a noisyseg folder, a Cityscapes root or a VOC2012 (or VOCdevkit) folder",
    )
    add_layout_arguments(inspect)
    inspect.add_argument("--quiet", action="store_true", help="no progress bar")
    inspect.set_defaults(func=run_inspect)


def add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    """`--layout` and repeatable `--option KEY=VALUE` (read with `layout_options`)."""
    parser.add_argument("--layout", default="auto", help="auto (detected, the default), folder, cityscapes or voc")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a layout option as in the config's layout_options (value read as YAML), "
        "for example annotations=gtCoarse or aug=true; repeatable",
    )


def layout_options(texts: list[str]) -> dict[str, Any]:
    """`--option KEY=VALUE` arguments as the layout's keyword options (values read as YAML)."""
    from noisyseg.config import parse_override

    options = {}
    for text in texts:
        path, value = parse_override(text)
        options[".".join(path)] = value
    return options


def print_json(summary: dict[str, Any]) -> None:
    print(json.dumps(summary, indent=2, sort_keys=True))


def run_phantom(args: argparse.Namespace) -> int:
    from noisyseg.data.phantom import PhantomConfig, generate_phantom

    given = {
        "size": args.size,
        "slices_per_patient": args.slices_per_patient,
        "noise_hu": args.noise_hu,
        "soft_tissue_contrast": args.contrast,
        "field_of_view": args.field_of_view,
    }
    config = PhantomConfig(
        foreground_only=not args.all_slices, **{name: value for name, value in given.items() if value is not None}
    )
    print_json(generate_phantom(args.out, num_patients=args.patients, seed=args.seed, config=config))
    return 0


def run_segthor(args: argparse.Namespace) -> int:
    from noisyseg.data.nifti import SegthorConfig, convert_segthor

    config = SegthorConfig(size=args.size, foreground_only=not args.all_slices, seed=args.seed)
    print_json(convert_segthor(args.root, args.out, config))
    return 0


def run_corrupt(args: argparse.Namespace) -> int:
    from noisyseg.data.noise import corrupt_dataset

    splits = [split.strip() for split in args.splits.split(",") if split.strip()]
    print_json(corrupt_dataset(args.data, args.out, args.noise, level=args.level, seed=args.seed, splits=splits))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from noisyseg.data.datasets.inspection import inspect_dataset

    print_json(inspect_dataset(args.data, args.layout, layout_options(args.option), quiet=args.quiet))
    return 0
