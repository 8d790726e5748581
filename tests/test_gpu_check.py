"""`make gpu-check` (benchmarks/gpu_check.py) on a machine without CUDA: the install step and the
report writer run, the GPU steps are skipped with the reason, and the exit status is non-zero;
and with only the GPU machines' packages importable, it and what its GPU steps import still run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gpu_machine import restricted_python

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: `make gpu-check` runs the GPU steps here")
def test_gpu_check_without_cuda_installs_reports_and_fails(tmp_path):
    out = tmp_path / "report"
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "TRITON_INTERPRET")}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=300
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


# What the GPU steps import beyond the CPU path: the commands they run (data phantom and corrupt,
# train, export onnx) and the modules of gpu_check's own internal checks.
GPU_STEP_MODULES = (
    "noisyseg.data.phantom", "noisyseg.data.noise", "noisyseg.training.trainer",
    "noisyseg.models.model_file", "noisyseg.data.folder", "noisyseg.export.onnx_export",
    "noisyseg.export.onnxruntime_runner", "noisyseg.kernels.triton_arm_cross_entropy",
    "noisyseg.kernels.triton_adele_arm", "noisyseg.kernels.numba_adele_arm",
)  # fmt: skip
TINY_MODEL = """
import sys
from noisyseg.models.model_file import ModelInfo, save_model
from noisyseg.models import create_model
kwargs = {"base_width": 4, "depth": 2, "num_classes": 3}
save_model(sys.argv[1], create_model("unet", **kwargs), ModelInfo("unet", kwargs, ["a", "b", "c"]))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: `make gpu-check` runs the GPU steps here")
def test_gpu_check_needs_only_what_the_gpu_machines_have(tmp_path):
    """With only the GPU machines' packages importable (tests/gpu_machine.py), `make gpu-check`
    reaches its CPU exit, and what its GPU steps import and run imports too: the step modules,
    the kernel tests and benchmark (collected by pytest), and the ONNX export it picks."""
    python = str(restricted_python(tmp_path / "env"))
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "TRITON_INTERPRET")}
    for absent in ("fastapi", "nibabel", "tritonclient", "onnxscript", "cityscapesscripts"):
        probe = subprocess.run([python, "-c", f"import {absent}"], env=env, capture_output=True, text=True)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, absent

    out = tmp_path / "report"
    command = [python, str(SCRIPT), str(out), "--keep-target"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["steps"]["install"]["status"] == "passed", report["steps"]["install"]
    assert report["environment"]["onnxscript"] is None
    installed = {**env, "PYTHONPATH": report["steps"]["install"]["target"]}

    imports = subprocess.run(
        [python, "-c", f"import importlib\nfor name in {GPU_STEP_MODULES!r}: importlib.import_module(name)"],
        env=installed,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert imports.returncode == 0, imports.stderr[-3000:]
    repo = SCRIPT.parents[1]
    collected = subprocess.run(
        [python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
        + ["tests/test_kernels_triton.py", "benchmarks/bench_kernels.py"],
        cwd=repo,
        env=installed,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]

    model = tmp_path / "model.safetensors"
    subprocess.run([python, "-c", TINY_MODEL, str(model)], env=installed, check=True, timeout=300)
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from gpu_check import onnx_export_args
    finally:
        sys.path.remove(str(SCRIPT.parent))
    exporter, note = onnx_export_args(report["environment"])
    assert exporter and "onnxscript" in note
    exported = subprocess.run(
        [python, "-m", "noisyseg", "export", "onnx", "--checkpoint", str(model)]
        + ["--out", str(tmp_path / "model.onnx"), *exporter],
        env=installed,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (tmp_path / "model.onnx").stat().st_size > 0
