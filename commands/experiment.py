"""`noisyseg experiment`: the paper-reproduction runs and `docs/results.md`.

Resumable and parallel-safe: start it again (or start a second copy beside it) and it skips
finished runs, resumes interrupted ones and leaves runs another live process trains to that one.
Two processes with `--threads 1` use two cores best.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Noise seeds per experiment: ADELE's Table 1 averages 5 noise realisations; 3 for the rest.
DEFAULT_SEEDS = {"table1": (0, 1, 2, 3, 4), "ladder": (0, 1, 2), "coarse": (0, 1, 2), "armstudy": (0, 1, 2)}
DEFAULT_LEVELS = (0, 1, 2, 3, 4, 5, 6)


def register(subparsers: Any) -> None:
    """Add the `experiment` subcommand."""
    parser = subparsers.add_parser(
        "experiment",
        help="reproduce the papers' comparisons on the phantom (resumable) and write docs/results.md",
        description="Runs ADELE Table 1 (table1), the Table 6 noise ladder (ladder) and the ARM "
        "paper's coarse-label comparison (coarse) at a CPU scale, then writes the results document.",
    )
    parser.add_argument(
        "--out", default="runs/experiment", help="experiment folder: data and runs (default runs/experiment)"
    )
    parser.add_argument(
        "--experiments",
        nargs="+",
        default=list(DEFAULT_SEEDS),
        choices=list(DEFAULT_SEEDS),
        help="which experiments (default all)",
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        help="noise seeds of every chosen experiment (default: 0-4 for table1, 0-2 for ladder and coarse)",
    )
    parser.add_argument(
        "--levels",
        nargs="+",
        type=int,
        default=list(DEFAULT_LEVELS),
        help="erode-dilate levels of the ladder, 0..6 (default all: 0, 1, 2, 3, 4, 6, 8 iterations)",
    )
    parser.add_argument(
        "--val-masks",
        choices=("noisy", "clean"),
        default="noisy",
        help="validation masks the runs select their checkpoint on: noisy (the default: "
        "corrupted like the training masks, as a user's are; the clean-validation "
        "choice is reported as an oracle) or clean (the runs from before issue 23)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        help="train only these runs of the chosen experiments: a method name picks its plain run, "
        "a variant name (arm@arm.lr=0.01) that variant (default all; the document lists all)",
    )
    parser.add_argument("--epochs", type=int, help="epochs per run (default: the Scale default)")
    parser.add_argument("--patients", type=int, help="phantom patients (default: the Scale default)")
    parser.add_argument("--size", type=int, help="phantom slice size in pixels (default: the Scale default)")
    parser.add_argument("--threads", type=int, help="torch CPU threads of this process (default: torch's choice)")
    parser.add_argument(
        "--results", default="docs/results.md", help="results document to write (default docs/results.md)"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="only rewrite the results document from the finished runs"
    )
    parser.add_argument("--progress", action="store_true", help="show progress bars of the runs")
    parser.set_defaults(func=run_experiment_command)


def _scale(args: argparse.Namespace) -> Any:
    from noisyseg.experiments.experiment import Scale

    overrides = {
        name: getattr(args, name) for name in ("epochs", "patients", "size") if getattr(args, name) is not None
    }
    bad = [f"--{name} {value}" for name, value in overrides.items() if value < 1]
    if bad:
        raise ValueError(f"{', '.join(bad)}: expected a positive number")
    return Scale(**overrides)


def reproduce_command(args: argparse.Namespace) -> str:
    """The command line that gives these results (what docs/results.md prints)."""
    parts = ["noisyseg", "experiment", "--out", args.out, "--experiments", *args.experiments]
    if args.seeds is not None:
        parts += ["--seeds", *map(str, args.seeds)]
    parts += ["--levels", *map(str, args.levels)]
    if args.val_masks != "noisy":
        parts += ["--val-masks", args.val_masks]
    for name in ("epochs", "patients", "size", "threads"):
        if getattr(args, name) is not None:
            parts += [f"--{name}", str(getattr(args, name))]
    parts += ["--results", args.results]
    return shlex.join(parts)


def run_experiment_command(args: argparse.Namespace) -> int:
    import torch

    from noisyseg.commands.train import train_and_draw
    from noisyseg.experiments.experiment import check_levels, experiment_runs, run_experiments
    from noisyseg.experiments.report import write_results

    check_levels(args.levels)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    scale = _scale(args)
    root = Path(args.out)
    specs = [
        spec
        for name in args.experiments
        for spec in experiment_runs(name, args.seeds or DEFAULT_SEEDS[name], args.levels, args.val_masks == "noisy")
    ]
    if not args.report_only:
        chosen = [spec for spec in specs if args.methods is None or spec.name in args.methods]
        if not chosen:
            raise ValueError(
                f"--methods {' '.join(args.methods)}: none of them is part of {', '.join(args.experiments)}"
            )
        counts = run_experiments(root, chosen, scale, train_and_draw, quiet=not args.progress)
        log.info(
            "runs: %d already done, %d trained, %d left to other processes",
            counts["done"],
            counts["trained"],
            counts["busy"],
        )
    results = write_results(root, Path(args.results), scale, specs, args.levels, reproduce_command(args))
    print(f"results written to {results}")
    return 0
