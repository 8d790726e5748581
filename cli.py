"""The `noisyseg` console command: each part registers its own subcommands here."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from noisyseg import __version__

# Each module exposes `register(subparsers)`, adding its subcommands; each subcommand sets
# `func(args) -> int | None` as its handler. Every module is imported to build the parser, so
# they import heavy packages (torch, numpy, scipy, onnx, ...) in their handlers, keeping
# `noisyseg --help` fast; tests/test_cli_imports.py checks it.
COMMAND_MODULES = [
    "noisyseg.commands.data",
    "noisyseg.commands.train",
    "noisyseg.commands.serve",
    "noisyseg.commands.export",
    "noisyseg.commands.review",
    "noisyseg.commands.experiment",
    "noisyseg.demo",
    "noisyseg.recipes",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noisyseg",
        description="Segmentation from noisy annotations: data, training, export, serving.",
    )
    parser.add_argument("--version", action="version", version=f"noisyseg {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        # Bad input is reported as one clear line, not a traceback.
        print(f"noisyseg {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
