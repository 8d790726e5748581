"""TensorRT engine builder and runner.

Everywhere: mypy checks the module against the real TensorRT 10 API (`tensorrt-stubs`), and the
parts that need no GPU (shapes, profiles, metadata checks, the missing-TensorRT message) run.
With TensorRT and a CUDA device: engines are built in fp32/fp16/int8 and checked against
ONNX Runtime; elsewhere those tests skip, saying why.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import noisyseg
from noisyseg import cli
from noisyseg.export.onnx_export import ExportConfig, export_model, sample_images
from noisyseg.export.tensorrt_engine import (
    GPU_EXTRA_MESSAGE,
    EngineBuildConfig,
    EngineMetadata,
    ShapeProfile,
    TensorRTUnavailableError,
    build_engine,
    engine_mismatches,
    parse_shape,
    plan_metadata_path,
    resolve_profile,
    tensorrt_available,
)
from noisyseg.io import file_sha256
from noisyseg.models import create_model
from noisyseg.models.model_file import ModelInfo

HAS_TENSORRT_GPU = tensorrt_available() and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_TENSORRT_GPU, reason=f"needs TensorRT and a CUDA device: {GPU_EXTRA_MESSAGE}")
without_tensorrt = pytest.mark.skipif(
    tensorrt_available(), reason="TensorRT is installed here: the missing-TensorRT path cannot be exercised"
)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    kwargs = {"base_width": 4, "depth": 3}
    path = tmp_path_factory.mktemp("trt") / "model.onnx"
    export_model(
        create_model("unet", **kwargs).eval(),
        ModelInfo("unet", kwargs, list("abcde")),
        path,
        ExportConfig(exporter="torchscript"),
    )
    return path


# ---------------------------------------------------------------- static check against the API

# The stubs' own defects that stop mypy parsing them: a parameter named `in` (a keyword), and
# one signature with a required parameter after defaulted ones.
STUB_FIXES = [
    (re.compile(r"([(,]\s*)in: "), r"\1in_: "),
    (re.compile(r"power: Weights = None, channel_axis: int\)"), "power: Weights = None, channel_axis: int = ...)"),
]
MYPY_CONFIG = """[mypy]
follow_imports = silent
[mypy-tensorrt_libs]
ignore_missing_imports = True
[mypy-tensorrt,tensorrt_bindings,tensorrt_bindings.*]
ignore_errors = True
[mypy-torch,torch.*,onnx,onnx.*,numpy,numpy.*]
follow_imports = skip
"""
# Wrong uses of the API that the stubs must catch: proves the check is not vacuous.
MISUSE = """import tensorrt as trt
builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
config = builder.create_builder_config()
config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, "4 GiB")
network = builder.create_network(flags="explicit batch")
"""


def patched_stubs(destination: Path) -> Path:
    spec = importlib.util.find_spec("tensorrt_stubs")
    if spec is None or spec.origin is None:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs==10.13.0.35.1)")
    site_packages = Path(spec.origin).parent.parent
    for package in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(site_packages / package, destination / package, ignore=shutil.ignore_patterns("__pycache__"))
    for stub in destination.rglob("*.pyi"):
        text = stub.read_text()
        for pattern, replacement in STUB_FIXES:
            text = pattern.sub(replacement, text)
        stub.write_text(text)
    return destination


def test_module_type_checks_against_tensorrt_stubs(tmp_path) -> None:
    stubs = patched_stubs(tmp_path / "stubs")
    package_root = tmp_path / "packages"
    package_root.mkdir()
    # The repository root is the package `noisyseg`; mypy finds it through this link.
    (package_root / "noisyseg").symlink_to(Path(noisyseg.__file__).parent, target_is_directory=True)
    (tmp_path / "mypy.ini").write_text(MYPY_CONFIG)
    (package_root / "misuse.py").write_text(MISUSE)
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--strict",
        "--config-file",
        str(tmp_path / "mypy.ini"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "-m",
        "noisyseg.export.tensorrt_engine",
        "-m",
        "misuse",
    ]
    env = {**os.environ, "MYPYPATH": f"{stubs}{os.pathsep}{package_root}"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert result.returncode in (0, 1) and "Found" in result.stdout, result.stdout + result.stderr
    assert [e for e in errors if "misuse.py" not in e] == [], result.stdout
    assert any("misuse.py:4" in e and "set_memory_pool_limit" in e for e in errors), result.stdout
    assert any("misuse.py:5" in e and "create_network" in e for e in errors), result.stdout


# ---------------------------------------------------------------- no GPU needed


def test_shapes_and_profiles() -> None:
    assert parse_shape("2x1x256x320", "--max-shape") == (2, 1, 256, 320)
    with pytest.raises(ValueError, match="--min-shape '1x1x256': expected NxCxHxW"):
        parse_shape("1x1x256", "--min-shape")
    dynamic = ["batch", 1, "height", "width"]
    profile = resolve_profile(dynamic, EngineBuildConfig())
    assert profile == ShapeProfile(min=(1, 1, 128, 128), opt=(1, 1, 256, 256), max=(8, 1, 512, 512))
    static = resolve_profile(["batch", 1, 64, 96], EngineBuildConfig(max_shape=(4, 1, 64, 96)))
    assert static.min == (1, 1, 64, 96) and static.max == (4, 1, 64, 96)
    with pytest.raises(ValueError, match="dimension 2 must be 64"):
        resolve_profile(["batch", 1, 64, 96], EngineBuildConfig(max_shape=(4, 1, 128, 96)))
    with pytest.raises(ValueError, match="need min <= opt <= max"):
        resolve_profile(dynamic, EngineBuildConfig(opt_shape=(16, 1, 256, 256)))
    with pytest.raises(ValueError, match="outside the engine's optimisation profile"):
        profile.check_within((9, 1, 256, 256), "input 'image'")


def test_engine_metadata_mismatch_says_rebuild(tmp_path) -> None:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"plan bytes")
    metadata = EngineMetadata(
        tensorrt_version="10.13.0.35",
        gpu_name="NVIDIA H100",
        compute_capability="9.0",
        precision="fp16",
        input_name="image",
        input_shape=["batch", 1, "height", "width"],
        output_names=["logits"],
        profiles=[{"min": [1, 1, 64, 64], "opt": [1, 1, 256, 256], "max": [8, 1, 512, 512]}],
        onnx_file="model.onnx",
        onnx_sha256="0" * 64,
        plan_sha256=file_sha256(plan),
    )
    assert engine_mismatches(metadata, plan, "10.13.0.35", "9.0") == []
    problems = engine_mismatches(metadata, plan, "10.8.0.43", "8.6")
    assert problems[0] == "built with TensorRT 10.13.0.35, this machine has 10.8.0.43"
    assert problems[1] == "built for compute capability 9.0 (NVIDIA H100), this GPU is 8.6"
    plan.write_bytes(b"other bytes")
    assert "does not match the metadata" in engine_mismatches(metadata, plan, "10.13.0.35", "9.0")[0]


def test_int8_needs_a_quantised_model(onnx_model, tmp_path) -> None:
    with pytest.raises(ValueError, match="--int8 needs an explicitly quantised"):
        build_engine(onnx_model, tmp_path / "m.plan", EngineBuildConfig(precision="int8"))


@without_tensorrt
def test_engine_command_names_the_gpu_extra(onnx_model, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["noisyseg.commands.export"])
    plan = tmp_path / "model.plan"
    code = cli.main(["export", "engine", "--onnx", str(onnx_model), "--out", str(plan), "--fp16"])
    assert code == 2
    assert "pip install 'noisyseg[gpu]'" in capsys.readouterr().err
    assert not plan.exists()
    # Checking a plan needs TensorRT too: same message, once the plan's metadata is found.
    plan.write_bytes(b"plan")
    metadata = EngineMetadata(
        "10.13.0.35",
        "gpu",
        "9.0",
        "fp16",
        "image",
        ["batch", 1, "height", "width"],
        ["logits"],
        [{"min": [1, 1, 32, 32], "opt": [1, 1, 32, 32], "max": [1, 1, 32, 32]}],
        "model.onnx",
        "0",
        "0",
    )
    plan_metadata_path(plan).write_text(json.dumps(asdict(metadata)))
    np.savez(tmp_path / "golden.npz", meta=np.array(json.dumps({"cases": 0, "output_names": []})))
    assert cli.main(["export", "check", "--model", str(plan), "--golden", str(tmp_path / "golden.npz")]) == 2
    assert "pip install 'noisyseg[gpu]'" in capsys.readouterr().err
    with pytest.raises(TensorRTUnavailableError):
        from noisyseg.export.tensorrt_engine import TensorRTRunner

        TensorRTRunner(plan)


# ---------------------------------------------------------------- TensorRT and a GPU


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_reproduces_onnxruntime(onnx_model, tmp_path, precision) -> None:
    from noisyseg.export.golden import check_golden, make_golden
    from noisyseg.export.tensorrt_engine import TensorRTRunner

    plan = tmp_path / f"model.{precision}.plan"
    cache = tmp_path / "timing.cache"
    config = EngineBuildConfig(
        precision=precision,
        min_shape=(1, 1, 32, 32),
        opt_shape=(2, 1, 64, 64),
        max_shape=(4, 1, 128, 128),
        timing_cache=cache,
        workspace_gib=1,
    )
    metadata = build_engine(onnx_model, plan, config)
    assert cache.is_file() and metadata.plan_sha256 == file_sha256(plan)
    assert metadata.onnx_sha256 == file_sha256(onnx_model) and metadata.precision == precision
    runner = TensorRTRunner(plan)
    assert runner.input_name == "image" and runner.output_names == ["logits"]
    golden = tmp_path / "golden.npz"
    make_golden(onnx_model, golden, shapes=[(2, 1, 64, 64), (1, 1, 32, 96)])
    report = check_golden(plan, golden)
    assert report.passed, report.describe()
    with pytest.raises(ValueError, match="outside the engine's optimisation profile"):
        runner.run(sample_images((8, 1, 64, 64)))


@needs_gpu
@pytest.mark.gpu
def test_engine_from_another_machine_is_refused(onnx_model, tmp_path) -> None:
    from noisyseg.export.tensorrt_engine import TensorRTRunner

    plan = tmp_path / "model.plan"
    build_engine(onnx_model, plan, EngineBuildConfig(workspace_gib=1))
    sidecar = plan_metadata_path(plan)
    metadata = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**metadata, "compute_capability": "1.0"}))
    with pytest.raises(RuntimeError, match="rebuild the engine here"):
        TensorRTRunner(plan)
