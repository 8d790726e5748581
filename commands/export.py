"""`noisyseg export ...`: onnx, quantize, engine, golden, check, triton-repo."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from noisyseg.commands.data import add_layout_arguments, layout_options


def parse_size(text: str) -> tuple[int, int]:
    """'256x320' -> (256, 320)."""
    parts = text.lower().split("x")
    try:
        height, width = (int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': expected HxW, e.g. 256x256") from None
    return height, width


def parse_nchw(text: str) -> tuple[int, int, int, int]:
    """'2x1x256x256' -> (2, 1, 256, 256)."""
    from noisyseg.export.tensorrt_engine import parse_shape

    try:
        n, c, h, w = parse_shape(text, "shape")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return n, c, h, w


def run_onnx(args: argparse.Namespace) -> int:
    from noisyseg.export.onnx_export import ExportConfig, export_checkpoint

    config = ExportConfig(
        opset=args.opset, output=args.output, static_size=args.static, exporter=args.exporter, device=args.device
    )
    report = export_checkpoint(args.checkpoint, args.out, config)
    print(f"wrote {args.out}: {report.describe()}")
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    from noisyseg.export.quantize import QuantizeConfig, quantize_onnx, report_dict
    from noisyseg.io import atomic_write_json

    config = QuantizeConfig(
        max_calibration_images=args.calib_images,
        calibration_method=args.method,
        keep_classifier_fp32=not args.quantize_classifier,
        max_miou_drop=args.max_miou_drop,
        layout=args.layout,
        layout_options=layout_options(args.option),
    )
    report = quantize_onnx(args.onnx, args.calib_data, args.out, config)
    if args.report:
        atomic_write_json(args.report, report_dict(report))
    print(f"wrote {args.out}: {report.describe()}")
    return 0


def run_engine(args: argparse.Namespace) -> int:
    from noisyseg.export.tensorrt_engine import (
        EngineBuildConfig,
        build_engine,
        parse_shape,
        plan_metadata_path,
    )

    shapes = {
        name: parse_shape(getattr(args, name), f"--{name.replace('_', '-')}") if getattr(args, name) else None
        for name in ("min_shape", "opt_shape", "max_shape")
    }
    config = EngineBuildConfig(
        precision=args.precision,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
        workspace_gib=args.workspace_gib,
        **shapes,
    )
    metadata = build_engine(args.onnx, args.out, config)
    print(
        f"wrote {args.out} and {plan_metadata_path(args.out)}: "
        f"TensorRT {metadata.tensorrt_version}, {metadata.gpu_name}, {metadata.precision}"
    )
    return 0


def run_golden(args: argparse.Namespace) -> int:
    from noisyseg.export.golden import make_golden

    meta = make_golden(
        args.onnx,
        args.out,
        shapes=args.shape or None,
        seed=args.seed,
        data_dir=args.data,
        split=args.split,
        layout=args.layout,
        layout_options=layout_options(args.option),
    )
    print(f"wrote {args.out}: {meta['cases']} case(s) of {meta['onnx_file']} (sha256 {meta['onnx_sha256'][:12]}...)")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from noisyseg.export.golden import check_golden

    report = check_golden(args.model, args.golden, precision=args.precision)
    print(report.describe())
    if args.report:
        from noisyseg.io import atomic_write_json

        atomic_write_json(args.report, {**asdict(report), "passed": report.passed})
    return 0 if report.passed else 1


def run_triton_repo(args: argparse.Namespace) -> int:
    from noisyseg.export.triton_repo import TritonRepoConfig, make_triton_repo

    config = TritonRepoConfig(model_name=args.name, max_batch_size=args.max_batch_size)
    path = make_triton_repo(args.onnx, args.out, engine=args.engine, config=config)
    print(f"wrote {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `export` and its subcommands to the `noisyseg` command."""
    export = subparsers.add_parser(
        "export", help="export a model: ONNX, int8, TensorRT, golden outputs, Triton repository"
    )
    commands = export.add_subparsers(dest="export_command", metavar="FORMAT", required=True)

    onnx_cmd = commands.add_parser("onnx", help="checkpoint -> validated ONNX model with metadata")
    onnx_cmd.add_argument("--checkpoint", required=True, help="model .safetensors file or run directory")
    onnx_cmd.add_argument("--out", required=True, help="output .onnx file")
    # 18 = onnx_export.DEFAULT_OPSET, not imported here so `--help` does not load torch.
    onnx_cmd.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18; TensorRT 10 parses 9-20)")
    onnx_cmd.add_argument(
        "--output",
        choices=["logits", "probs", "labels"],
        default="logits",
        help="what the graph returns (default logits)",
    )
    onnx_cmd.add_argument(
        "--static", type=parse_size, metavar="HxW", help="fixed input size (default: dynamic height and width)"
    )
    onnx_cmd.add_argument(
        "--exporter", choices=["dynamo", "torchscript"], default="dynamo", help="PyTorch exporter (default dynamo)"
    )
    onnx_cmd.add_argument(
        "--device",
        default="cpu",
        help="where to trace and compute the reference outputs: cpu (default), auto, cuda or cuda:N",
    )
    onnx_cmd.set_defaults(func=run_onnx)

    quantize = commands.add_parser("quantize", help="ONNX -> static INT8 QDQ model, calibrated on training images")
    quantize.add_argument("--onnx", required=True, help="fp32 .onnx model from `export onnx`")
    quantize.add_argument(
        "--calib-data",
        required=True,
        help="dataset root in any supported layout: its train split calibrates, "
        "its test split (val where there is none) evaluates",
    )
    quantize.add_argument("--out", required=True, help="output .onnx file")
    quantize.add_argument("--calib-images", type=int, default=64, help="calibration images (default 64)")
    quantize.add_argument(
        "--method",
        choices=["minmax", "percentile", "entropy"],
        default="minmax",
        help="calibration method (default minmax)",
    )
    quantize.add_argument(
        "--quantize-classifier", action="store_true", help="also quantise the final classifier (kept fp32 by default)"
    )
    quantize.add_argument(
        "--max-miou-drop", type=float, default=1.0, help="refuse to write if test mIoU drops more (points, default 1)"
    )
    quantize.add_argument("--report", help="write the measurements to this JSON file")
    add_layout_arguments(quantize)
    quantize.set_defaults(func=run_quantize)

    engine = commands.add_parser("engine", help="ONNX -> TensorRT plan + metadata (needs a GPU and the gpu extra)")
    engine.add_argument("--onnx", required=True, help="input .onnx model")
    engine.add_argument("--out", required=True, help="output plan (metadata goes to OUT.json)")
    precision = engine.add_mutually_exclusive_group()
    for name in ("fp16", "bf16", "int8"):
        precision.add_argument(
            f"--{name}", dest="precision", action="store_const", const=name, help=f"{name} precision"
        )
    engine.set_defaults(precision="fp32")
    for name in ("min", "opt", "max"):
        engine.add_argument(
            f"--{name}-shape", metavar="NxCxHxW", help=f"{name} input shape of the optimisation profile"
        )
    engine.add_argument("--timing-cache", help="timing cache file (read if present, updated after the build)")
    engine.add_argument(
        "--workspace-gib", type=float, default=4.0, help="workspace memory-pool limit in GiB (default 4)"
    )
    engine.set_defaults(func=run_engine)

    golden = commands.add_parser("golden", help="save sample inputs and ONNX Runtime outputs for `export check`")
    golden.add_argument("--onnx", required=True, help="reference .onnx model")
    golden.add_argument("--out", required=True, help="output .npz")
    golden.add_argument(
        "--shape",
        type=parse_nchw,
        action="append",
        metavar="NxCxHxW",
        help="input shape (repeatable; default batch 2 at 256x256)",
    )
    golden.add_argument(
        "--data", help="use images of this dataset root (any supported layout) instead of synthetic ones"
    )
    golden.add_argument("--split", default="test", help="split of --data (default test)")
    add_layout_arguments(golden)
    golden.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
    golden.set_defaults(func=run_golden)

    check = commands.add_parser("check", help="compare a model (.onnx or .plan) with golden outputs; exit 1 on failure")
    check.add_argument("--model", required=True, help=".onnx model or TensorRT .plan")
    check.add_argument("--golden", required=True, help=".npz from `export golden`")
    check.add_argument(
        "--precision", choices=["fp32", "fp16", "bf16", "int8"], help="tolerances to apply (default: the model's own)"
    )
    check.add_argument("--report", help="write the comparison to this JSON file")
    check.set_defaults(func=run_check)

    triton = commands.add_parser("triton-repo", help="write a Triton Inference Server model repository")
    triton.add_argument("--onnx", required=True, help=".onnx model (served as is, or describing the engine's I/O)")
    triton.add_argument("--engine", help="serve this TensorRT plan instead of the ONNX model")
    triton.add_argument("--out", required=True, help="repository folder")
    triton.add_argument("--name", help="model name (default: the ONNX file's stem)")
    triton.add_argument("--max-batch-size", type=int, default=8, help="Triton max_batch_size (default 8)")
    triton.set_defaults(func=run_triton_repo)
