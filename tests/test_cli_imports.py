"""Start-up cost: building the CLI parser and serving an ONNX model must not import torch.

Each check runs in a fresh interpreter, since this test session has long imported torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from serve_helpers import write_conv_model

# Packages too slow to import just to print `noisyseg --help`.
HEAVY = ("torch", "scipy", "numba", "onnx", "onnxruntime", "fastapi", "uvicorn")


def imported_in_fresh_interpreter(code: str, *args: str) -> list[str]:
    """The HEAVY packages in `sys.modules` after running `code` in a new Python."""
    report = f"import json, sys; print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))"
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\n{report}", *args], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.splitlines()[-1])


def test_building_the_parser_imports_no_heavy_package() -> None:
    assert imported_in_fresh_interpreter("from noisyseg.cli import build_parser; build_parser()") == []


def test_serving_an_onnx_model_does_not_import_torch(tmp_path: Path) -> None:
    model = write_conv_model(tmp_path / "model.onnx")
    # `noisyseg serve --model model.onnx` up to the point where uvicorn would start serving.
    code = (
        "import sys, uvicorn\n"
        "uvicorn.Server.run = lambda self: None\n"
        "from noisyseg.cli import main\n"
        "assert main(['serve', '--model', sys.argv[1]]) == 0"
    )
    assert "torch" not in imported_in_fresh_interpreter(code, str(model))
