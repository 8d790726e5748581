"""`noisyseg review`: rank a split's images by label quality and write what a person needs to
fix them (`noisyseg.review`). It lives in `export` because `--model` runs an exported
ONNX model (`review_source.py`); `--run` reviews with a run directory's own model."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from noisyseg.commands.data import add_layout_arguments, layout_options

REVIEW_DIR = "review"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "review",
        help="rank images by label quality; page, corrected masks, Label Studio and CVAT imports",
        description="Score every image of a split against a model's probabilities (cleanlab-style soft-minimum "
        "label quality, fraction of labels the correction changed, per-class IoU of given mask and prediction), "
        "write scores.csv (worst first), issues/<id>.png, corrected/<id>.png, index.html (the --top worst images), "
        "a Label Studio import and a CVAT (COCO RLE) archive. The model is a run directory's (--run; for ADELE "
        "runs the corrected masks are its label store) or an exported ONNX model over a data folder "
        "(--model with --data).",
    )
    parser.add_argument(
        "--run", help="run directory (its model, data and, for methods that correct labels, its label store)"
    )
    parser.add_argument("--model", help="exported ONNX model (output probs or logits), with --data")
    parser.add_argument("--data", help="with --model: dataset folder whose split is reviewed")
    parser.add_argument(
        "--labels", help="with --model: folder whose masks/ replace the data's masks (the labels under review)"
    )
    add_layout_arguments(parser)  # with --model: the data's layout and its options
    parser.add_argument(
        "--allow-class-mismatch",
        action="store_true",
        help="with --model: review even when the model's class names "
        "differ from the data's (same number, matched by index)",
    )
    parser.add_argument(
        "--split", default="train", choices=("train", "val", "test"), help="split to review (default train)"
    )
    parser.add_argument(
        "--top", type=int, default=20, help="worst images shown on the page and exported for relabelling (default 20)"
    )
    parser.add_argument("--out", help=f"output folder (default RUN_DIR/{REVIEW_DIR}, or ./{REVIEW_DIR} with --model)")
    parser.add_argument(
        "--format",
        default="html,png,label-studio,cvat",
        help="comma-separated outputs among html, png, label-studio, cvat (default all)",
    )
    parser.add_argument(
        "--sort",
        default="label_quality",
        choices=("label_quality", "changed_fraction"),
        help="worst first by the lowest label quality (default) or the most relabelled pixels",
    )
    parser.add_argument(
        "--confidence",
        type=float,
        default=0.9,
        help="prediction probability from which a disagreeing pixel is an issue (default 0.9)",
    )
    parser.add_argument(
        "--image-url", default="images", help="prefix of the image paths in the Label Studio tasks (default images)"
    )
    parser.add_argument("--device", help="with --run: auto, cpu, cuda or cuda:N (default: the run's)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of torch and ONNX Runtime (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_review_command)


def run_review_command(args: argparse.Namespace) -> int:
    from noisyseg.io import probe_writable_folder
    from noisyseg.review.runner import ReviewOptions, run_review
    from noisyseg.review.sources import ProbabilitySource

    if bool(args.run) == bool(args.model):
        raise ValueError("review needs --run RUN_DIR or --model MODEL.onnx with --data DIR (one of them)")
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    options = ReviewOptions(
        top=args.top,
        formats=formats,
        confidence=args.confidence,
        image_url=args.image_url,
        quiet=args.quiet,
        threads=args.threads,
        sort=args.sort,
    )
    if args.run:
        from noisyseg.run.run_dir import RunDir

        RunDir(args.run).read_config()  # a mistyped --run fails here, before RUN_DIR/review is made
    out = probe_writable_folder(
        args.out or (Path(args.run) / REVIEW_DIR if args.run else REVIEW_DIR), "review output folder", "--out"
    )
    with tempfile.TemporaryDirectory(dir=out, prefix=".review-") as workdir:
        source: ProbabilitySource
        if args.run:
            from noisyseg.review.sources import RunSource

            for name in ("data", "labels", "option", "allow_class_mismatch"):
                if getattr(args, name):
                    raise ValueError(
                        f"--{name.replace('_', '-')} goes with --model; a run reviews the data it was trained on"
                    )
            source = RunSource(args.run, args.split, args.device, workdir)
        else:
            from noisyseg.review.onnx_source import OnnxSource

            if not args.data:
                raise ValueError("--model needs --data DIR (the dataset whose labels are reviewed)")
            source = OnnxSource(
                args.model,
                args.data,
                args.split,
                args.labels,
                args.layout,
                args.threads,
                layout_options(args.option),
                args.allow_class_mismatch,
            )
        summary = run_review(source, out, options)
    print(json.dumps({"images": summary["images"], "worst": summary["worst"][:5], **summary["files"]}, indent=2))
    if "page" in summary["files"]:
        print(f"review page: {summary['files']['page']}")
    return 0
