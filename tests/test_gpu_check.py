"""`make gpu-check` (benchmarks/gpu_check.py) on a machine without CUDA: the install step and the
report writer run, the GPU steps are skipped with the reason, and the exit status is non-zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: `make gpu-check` runs the GPU steps here")
def test_gpu_check_without_cuda_installs_reports_and_fails(tmp_path):
    out = tmp_path / "report"
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "TRITON_INTERPRET")}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no CUDA device: GPU checks not run" in result.stdout

    report = json.loads((out / "gpu-check.json").read_text())
    assert not (out / "gpu-check.json.tmp").exists()
    assert report["exit_code"] == 2 and report["finished"]
    install = report["steps"]["install"]
    assert install["status"] == "passed", install
    # Imported from the temporary target, not from this checkout.
    assert Path(install["imported_from"]).is_relative_to(install["target"])
    assert not Path(install["imported_from"]).is_relative_to(SCRIPT.parents[1])
    assert report["environment"]["cuda_available"] is False
    for name in ("kernel_tests", "kernel_benchmark", "training", "onnx", "tensorrt"):
        assert report["steps"][name]["status"] == "skipped"
        assert "no CUDA" in report["steps"][name]["reason"]
    log = (out / "gpu-check.log").read_text()
    assert "pip install --no-deps --no-index" in log or "copied package tree" in install["method"]
    assert not Path(install["target"]).exists()  # the temporary install is removed
