"""`make gpu-check`: prove the GPU path of an installed noisyseg in one command (at most 8 minutes).

Usage: ``python3 benchmarks/gpu_check.py OUT_DIR`` (``make gpu-check OUT=dir``). The system
interpreter runs it, so a GPU machine's own torch is used. Steps, each a subprocess with its own
time budget, its output appended to ``OUT_DIR/gpu-check.log`` and its result (passed, failed or
skipped, reason, seconds, figures) written to ``OUT_DIR/gpu-check.json`` after every step
(atomically, so a killed run still leaves a report):

0. install: ``pip install --no-deps --no-index --no-build-isolation --target TMP`` of a copy of the
   working tree (falling back to copying the package tree into ``TMP/noisyseg``, said in the
   report), then ``import noisyseg`` from TMP. Every later step runs with ``PYTHONPATH=TMP``, so
   it tests the installed package, not the checkout.
1. kernel_tests: ``tests/test_kernels_triton.py -m triton`` compiled on CUDA (TRITON_INTERPRET
   unset), including its CUDA-only larger shapes and bf16 cases.
2. kernel_benchmark: ``benchmarks/bench_kernels.py`` on CUDA, one pytest session per shape: the
   fused Triton kernels against the eager reference, ``torch.compile`` of it and
   ``F.cross_entropy``, with the achieved bytes/s as a fraction of the device-to-device copy
   bandwidth measured in the same session (the roofline).
3. training: phantom at 256 px, noisy labels, ``noisyseg train`` ADELE+ARM with UNet width 64 in
   bf16 on CUDA for 3 epochs; images/s (wall clock of the run, and a steady-state step loop on the
   trained model); the fused loss (backend auto, Triton on CUDA) against the reference on one
   batch of the trained model's logits.
4. onnx: ``noisyseg export onnx`` of the trained model (the TorchScript exporter at opset 17
   where onnxscript, which the default dynamo exporter needs, is not installed), then PyTorch
   against ONNX Runtime (CPU) on test images: argmax agreement and max abs difference.
5. tensorrt: ``tests/test_tensorrt_engine.py`` when ``import tensorrt`` works; skipped with the
   ImportError otherwise.

Without CUDA, steps 1 to 5 are skipped ("no CUDA device"), the install step and the report still
run, and the exit status is 2. Exit 1 when a step failed, 0 when every step passed or skipped
for a stated reason.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
TOTAL_BUDGET_S = 480.0
# Seconds per step; their sum stays under TOTAL_BUDGET_S, and no step runs past the deadline.
BUDGETS = {"install": 45, "kernel_tests": 95, "kernel_benchmark": 125, "training": 130, "onnx": 50, "tensorrt": 25}
GPU_STEPS = ("kernel_tests", "kernel_benchmark", "training", "onnx", "tensorrt")
BENCH_SHAPES = ("cityscapes", "ade20k", "segthor")
RESULT_MARK = "GPU_CHECK_RESULT "
NO_CUDA = "no CUDA device: GPU checks not run"
# Training at the paper's scale (UNet width 64, 256 px), few patients so it fits the budget.
TRAIN_PATIENTS = 6
TRAIN_EPOCHS = 3
TRAIN_OVERRIDES = ["device=cuda", "precision=bf16", "model.kwargs.base_width=64", "threads=0"]
# Every environment the Makefile builds beside the tree (.venv, .venv-timm, .venv-triton36, the
# wheel check's) is GBs that the install never needs.
COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv*",
    ".wheel-check",
    "runs",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".benchmarks",
    ".pytest_cache",
    ".hypothesis",
    ".mypy_cache",
    ".ruff_cache",
    "*.nbi",
    "*.nbc",
    ".lock-venv",
)


# ------------------------------------------------------------------------------ the report


class Report:
    """OUT/gpu-check.json, rewritten atomically after every change."""

    def __init__(self, out: Path) -> None:
        self.path = out / "gpu-check.json"
        self.data: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "finished": None,
            "budget_s": TOTAL_BUDGET_S,
            "host": {"python": sys.version.split()[0], "platform": platform.platform(), "executable": sys.executable},
            "environment": {},
            "steps": {},
            "result": "running",
            "exit_code": None,
        }
        self.write()

    def step(self, name: str, status: str, reason: str = "", seconds: float = 0.0, **figures: Any) -> None:
        entry: dict[str, Any] = {"status": status, "reason": reason, "seconds": round(seconds, 2)}
        entry.update(figures)
        self.data["steps"][name] = entry
        self.write()

    def finish(self, result: str, exit_code: int) -> None:
        self.data.update(
            result=result, exit_code=exit_code, finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        )
        self.write()

    def write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------- subprocesses


class Runner:
    """Runs commands in their own process group with a timeout, output appended to the log."""

    def __init__(self, out: Path, env: dict[str, str], deadline: float) -> None:
        self.log = out / "gpu-check.log"
        self.env = env
        self.deadline = deadline

    def timeout(self, budget: float) -> float:
        return max(1.0, min(budget, self.deadline - time.monotonic()))

    def run(
        self, cmd: list[str], budget: float, cwd: Path, extra_env: dict[str, str] | None = None
    ) -> tuple[int | None, str, float]:
        """(exit status or None on timeout, the command's output, seconds)."""
        timeout = self.timeout(budget)
        env = {**self.env, **(extra_env or {})}
        with self.log.open("a") as log:
            log.write(f"\n$ {' '.join(cmd)}    # timeout {timeout:.0f} s\n")
            log.flush()
            start = log.tell()
            began = time.monotonic()
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: compile workers included
                proc.wait()
                rc = None
            seconds = time.monotonic() - began
        with self.log.open() as log:
            log.seek(start)
            output = log.read()
        with self.log.open("a") as log:
            log.write(f"# exit {rc if rc is not None else f'timeout after {timeout:.0f} s'}, {seconds:.1f} s\n")
        return rc, output, seconds

    def python(
        self, args: list[str], budget: float, cwd: Path, extra_env: dict[str, str] | None = None
    ) -> tuple[int | None, str, float]:
        return self.run([sys.executable, *args], budget, cwd, extra_env)


def result_of(output: str) -> dict[str, Any] | None:
    """The JSON an internal step printed last after RESULT_MARK."""
    lines = [line for line in output.splitlines() if line.startswith(RESULT_MARK)]
    return json.loads(lines[-1][len(RESULT_MARK) :]) if lines else None


def tail(output: str, lines: int = 8) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])


def failure(rc: int | None, output: str, what: str) -> str:
    if rc is None:
        return f"{what}: timed out (budget spent); see gpu-check.log"
    return f"{what}: exit {rc}: {tail(output, 4)}"


# ------------------------------------------------------------------------------ step 0


def install(runner: Runner, report: Report, target: Path, work: Path) -> dict[str, Any] | None:
    """Install the working tree into `target` without dependencies; the import check's figures."""
    began = time.monotonic()
    source = work / "source"
    shutil.copytree(REPO, source, ignore=COPY_IGNORE)
    rc, output, _ = runner.python(
        [
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--no-compile",
            "--quiet",
            "--target",
            str(target),
            str(source),
        ],
        25.0,
        work,
        {"PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    method = "pip install --no-deps --no-index --no-build-isolation --target"
    note = ""
    if rc != 0:
        # No setuptools/wheel for an offline build here: the package tree is all an import needs.
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        shutil.copytree(source, target / "noisyseg", ignore=shutil.ignore_patterns("tests", "benchmarks", "docs"))
        method = "copied package tree into TMP/noisyseg"
        errors = [line.strip() for line in output.splitlines() if "error" in line.lower()][:3]
        note = (
            f"pip install failed (exit {rc}: {' | '.join(errors) or tail(output, 2)}); "
            "fell back to copying the package tree into TMP/noisyseg"
        )
    left = max(15.0, BUDGETS["install"] - (time.monotonic() - began))  # a cold first torch import is slow
    rc, output, _ = runner.python([str(SCRIPT), "--internal", "import-check", str(target)], left, work)
    found = result_of(output)
    seconds = time.monotonic() - began
    if rc != 0 or found is None:
        report.step(
            "install",
            "failed",
            failure(rc, output, "import noisyseg from the target"),
            seconds,
            method=method,
            target=str(target),
        )
        return None
    if not found["file"].startswith(str(target)):
        report.step(
            "install",
            "failed",
            f"noisyseg imported from {found['file']}, not from the target {target}",
            seconds,
            method=method,
            target=str(target),
        )
        return None
    report.step(
        "install",
        "passed",
        note,
        seconds,
        method=method,
        target=str(target),
        imported_from=found["file"],
        version=found["version"],
    )
    return found


def import_check(target: str) -> dict[str, Any]:
    import noisyseg
    from noisyseg import cli  # noqa: F401 (every part's commands register at import)

    found: dict[str, Any] = {
        "file": str(Path(noisyseg.__file__).resolve()),
        "version": getattr(noisyseg, "__version__", None),
    }
    try:
        import torch
    except ImportError as err:
        found.update(torch=None, torch_error=f"{type(err).__name__}: {err}", cuda_available=False)
        return found
    found.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if found["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        found.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
        )
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError as err:
        found["triton"] = None
        found["triton_error"] = f"{type(err).__name__}: {err}"
    # PyTorch's dynamo ONNX exporter (`export onnx`'s default) needs onnxscript; the GPU
    # machines lack it, so the onnx step uses the TorchScript exporter there (`onnx_export_args`).
    try:
        import onnxscript

        found["onnxscript"] = onnxscript.__version__
    except ImportError:
        found["onnxscript"] = None
    return found


# ------------------------------------------------------------------------------ step 1


def kernel_tests(runner: Runner, report: Report, work: Path, out: Path, env_info: dict[str, Any]) -> None:
    if env_info.get("triton") is None:
        report.step(
            "kernel_tests",
            "failed",
            f"triton is not importable ({env_info.get('triton_error')}): "
            "the fused GPU kernels cannot run; losses fall back to backend='torch'",
        )
        return
    junit = out / "kernel_tests.xml"
    rc, output, seconds = runner.python(
        [
            "-m",
            "pytest",
            str(REPO / "tests" / "test_kernels_triton.py"),
            "-m",
            "triton",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
        ],
        BUDGETS["kernel_tests"],
        work,
    )
    counts = junit_counts(junit)
    if rc == 0:
        report.step("kernel_tests", "passed", "compiled on CUDA", seconds, **counts)
    else:
        report.step("kernel_tests", "failed", failure(rc, output, "pytest"), seconds, **counts)


def junit_counts(path: Path) -> dict[str, int]:
    import xml.etree.ElementTree as ElementTree

    if not path.exists():
        return {}
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


# ------------------------------------------------------------------------------ step 2


def kernel_benchmark(runner: Runner, report: Report, work: Path, out: Path) -> None:
    began = time.monotonic()
    figures: dict[str, Any] = {}
    problems = []
    for index, shape in enumerate(BENCH_SHAPES):
        # What is left of the step's budget, shared by the shapes still to run.
        left = BUDGETS["kernel_benchmark"] - (time.monotonic() - began)
        budget = left / (len(BENCH_SHAPES) - index) if index < len(BENCH_SHAPES) - 1 else left
        path = out / f"bench_kernels_{shape}.json"
        rc, output, _ = runner.python(
            [
                "-m",
                "pytest",
                str(REPO / "benchmarks" / "bench_kernels.py"),
                "--benchmark-only",
                f"--benchmark-json={path}",
                "-k",
                f"{shape} and not numba",
                "-q",
                "-p",
                "no:cacheprovider",
            ],
            budget,
            work,
            {"NOISYSEG_BENCH_ROUNDS": "20", "NOISYSEG_BENCH_SUMMARY": str(out / f"kernels_summary_{shape}.md")},
        )
        if rc != 0:
            problems.append(failure(rc, output, shape))
        if path.exists():
            figures.update(benchmark_figures(json.loads(path.read_text())))
        report.step("kernel_benchmark", "running", "; ".join(problems), time.monotonic() - began, cases=figures)
    status = "failed" if problems or not figures else "passed"
    reason = "; ".join(problems) or ("" if figures else "no benchmark figures written")
    report.step("kernel_benchmark", status, reason, time.monotonic() - began, cases=figures)


def benchmark_figures(data: dict[str, Any]) -> dict[str, Any]:
    """Per shape and number of scales: median ms per implementation, the Triton kernels'
    speed-ups and their fraction of the copy-bandwidth roofline."""
    cases: dict[str, Any] = {}
    for bench in data.get("benchmarks", []):
        params = bench.get("params") or {}
        if "shape_name" not in params:
            continue
        key = f"{params['shape_name']} S={params['num_scales']}"
        extra = bench.get("extra_info", {})
        case = cases.setdefault(key, {"median_ms": {}})
        case["median_ms"][params["impl"]] = round(bench["stats"]["median"] * 1e3, 4)
        if "copy_bandwidth_gb_s" in extra:
            case["copy_bandwidth_gb_s"] = extra["copy_bandwidth_gb_s"]
        if params["impl"] == "triton":
            case.update({name: value for name, value in extra.items() if name.startswith("speedup_vs_")})
            for name in ("roofline_fraction", "achieved_gb_s", "min_bytes", "extra_peak_over_logits"):
                if name in extra:
                    case[name] = extra[name]
        elif "roofline_fraction" in extra:
            case.setdefault("roofline_fraction_by_impl", {})[params["impl"]] = extra["roofline_fraction"]
    return cases


# ------------------------------------------------------------------------------ step 3


def training(runner: Runner, report: Report, work: Path, out: Path, env_info: dict[str, Any]) -> Path | None:
    began = time.monotonic()
    budget = BUDGETS["training"]

    def left() -> float:
        return budget - (time.monotonic() - began)

    data, noisy, run_dir = work / "phantom", work / "noisy", out / "train-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    for args, what in (
        (["data", "phantom", "--out", str(data), "--patients", str(TRAIN_PATIENTS), "--size", "256"], "data phantom"),
        (["data", "corrupt", "--data", str(data), "--noise", "erode-dilate", "--out", str(noisy)], "data corrupt"),
    ):
        rc, output, _ = runner.python(["-m", "noisyseg", *args], min(30.0, left()), work)
        if rc != 0:
            report.step("training", "failed", failure(rc, output, what), time.monotonic() - began)
            return None
    train_args = [
        "-m",
        "noisyseg",
        "train",
        "--data",
        str(data),
        "--labels",
        str(noisy),
        "--method",
        "adele+arm",
        "--epochs",
        str(TRAIN_EPOCHS),
        "--out",
        str(run_dir),
        "--quiet",
    ]
    note = ""
    if env_info.get("triton") is None:
        train_args += ["--loss-backend", "torch"]
        note = "triton not importable: trained with loss backend 'torch'; "
    for override in TRAIN_OVERRIDES:
        train_args += ["--set", override]
    train_started = time.monotonic()
    rc, output, train_seconds = runner.python(train_args, max(1.0, left() - 25.0), work)
    figures: dict[str, Any] = {
        "config": {
            "method": "adele+arm",
            "epochs": TRAIN_EPOCHS,
            "patients": TRAIN_PATIENTS,
            "size": 256,
            "overrides": TRAIN_OVERRIDES,
        }
    }
    if rc != 0:
        report.step("training", "failed", failure(rc, output, "noisyseg train"), time.monotonic() - began, **figures)
        return None
    train_images = sum(1 for line in (data / "splits" / "train.txt").read_text().splitlines() if line.strip())
    figures.update(
        train_seconds_wall=round(time.monotonic() - train_started, 2),
        train_images=train_images,
        # Includes start-up, data loading, evaluation and checkpoints: a lower bound.
        images_per_second_wall=round(train_images * TRAIN_EPOCHS / train_seconds, 2),
    )
    summary = run_summary(run_dir)
    if summary:
        figures["summary"] = summary
    rc, output, _ = runner.python(
        [str(SCRIPT), "--internal", "loss-check", str(run_dir), str(data)], max(1.0, left()), work
    )
    found = result_of(output)
    if found is not None:
        figures.update(found)
    seconds = time.monotonic() - began
    if rc != 0 or found is None:
        report.step(
            "training", "failed", note + failure(rc, output, "fused-vs-reference loss check"), seconds, **figures
        )
    elif not found["agreement"]["passed"]:
        report.step(
            "training",
            "failed",
            note + "fused loss disagrees with the reference beyond bf16 tolerance",
            seconds,
            **figures,
        )
    else:
        report.step("training", "passed", note.rstrip("; "), seconds, **figures)
    return run_dir


def run_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        return {}
    last = records[-1]
    return {
        "epochs": len(records),
        "last_loss": (last.get("loss") or {}).get("total"),
        "last_val_miou": (last.get("val") or {}).get("miou"),
        "last_test_miou": (last.get("test") or {}).get("miou"),
    }


def loss_check(run_dir: str, data: str, device_name: str = "cuda") -> dict[str, Any]:
    """On CUDA: the trained model's logits (bf16 autocast, the run's scales) on one training
    batch; the fused loss (backend auto) against the reference, value and logit gradients; and a
    steady-state training-step loop for images/s."""
    import torch

    from noisyseg.data.run_data import load_split
    from noisyseg.evaluation.inference import forward_scales
    from noisyseg.kernels import ARM, functional
    from noisyseg.models.model_file import load_model
    from noisyseg.run.run_dir import resolve_model_file

    device = torch.device(device_name)  # "cpu" only to dry-run this code without a GPU
    model, _ = load_model(resolve_model_file(run_dir))
    model = model.to(device)
    scales = [1.0, 0.7, 1.5]
    split = load_split(data, "train")
    images = torch.as_tensor(split.images[:5]).to(device)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    target = torch.as_tensor(split.masks[:5]).long().to(device)
    torch.manual_seed(0)
    arm = ARM().to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        logits = [z.detach() for z in forward_scales(model, images, scales)]

    def loss_and_grads(backend: str, zs: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        leaves = [z.clone().requires_grad_(True) for z in zs]
        loss = functional.adele_arm_loss(leaves, target, arm, backend=backend)
        loss.backward()
        return float(loss), [z.grad.float() for z in leaves]

    agreement: dict[str, Any] = {
        "resolved_backend": functional.resolve_backend("auto", logits[0]),
        "logits_dtype": str(logits[0].dtype),
    }
    # bf16 logits: gradients are written in bf16 (relative 2^-8); fp32 copies: fp32 accumulation order only.
    for label, zs, bound in (("bf16", logits, 2e-2), ("fp32", [z.float() for z in logits], 1e-4)):
        fused_value, fused_grads = loss_and_grads("auto", zs)
        ref_value, ref_grads = loss_and_grads("torch", zs)
        grad_error = max(
            float((f - r).abs().max() / r.abs().max().clamp_min(1e-30)) for f, r in zip(fused_grads, ref_grads)
        )
        value_error = abs(fused_value - ref_value) / max(abs(ref_value), 1e-30)
        agreement[label] = {
            "fused": fused_value,
            "reference": ref_value,
            "value_rel_error": value_error,
            "grad_max_rel_error": grad_error,
            "bound": bound,
            "passed": value_error <= bound and grad_error <= bound,
        }
    agreement["passed"] = agreement["triton_used"] = agreement["resolved_backend"] == "triton"
    agreement["passed"] = agreement["passed"] and agreement["bf16"]["passed"] and agreement["fp32"]["passed"]

    # Steady-state training steps (this loop, not the trainer): bf16 autocast, fused loss, SGD.
    model.train()
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    arm_optimiser = torch.optim.SGD(arm.parameters(), lr=1e-3, maximize=True)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        arm_optimiser.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            zs = forward_scales(model, images, scales)
        functional.adele_arm_loss(zs, target, arm).backward()
        optimiser.step()
        arm_optimiser.step()

    for _ in range(3):
        step()
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    steps = 20
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    elapsed = time.perf_counter() - started
    return {
        "agreement": agreement,
        "step_loop": {
            "batch": images.shape[0],
            "steps": steps,
            "ms_per_step": round(elapsed / steps * 1e3, 2),
            "images_per_second": round(steps * images.shape[0] / elapsed, 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        },
    }


# ------------------------------------------------------------------------------ step 4


def onnx_export_args(env_info: dict[str, Any]) -> tuple[list[str], str]:
    """`export onnx` options for this machine, and the note saying why: the default (dynamo)
    exporter where onnxscript is installed, else the TorchScript exporter at opset 17."""
    if env_info.get("onnxscript") is not None:
        return [], ""
    return [
        "--exporter",
        "torchscript",
        "--opset",
        "17",
    ], "onnxscript not installed: exported with the TorchScript exporter, opset 17"


def onnx_step(
    runner: Runner, report: Report, work: Path, out: Path, run_dir: Path | None, env_info: dict[str, Any]
) -> None:
    if run_dir is None:
        report.step("onnx", "skipped", "no trained model (the training step failed)")
        return
    began = time.monotonic()
    model_path = out / "model.onnx"
    exporter, note = onnx_export_args(env_info)
    rc, output, _ = runner.python(
        ["-m", "noisyseg", "export", "onnx", "--checkpoint", str(run_dir), "--out", str(model_path), *exporter],
        BUDGETS["onnx"] - 15,
        work,
    )
    if rc != 0:
        report.step("onnx", "failed", failure(rc, output, "noisyseg export onnx"), time.monotonic() - began)
        return
    left = BUDGETS["onnx"] - (time.monotonic() - began)
    rc, output, _ = runner.python(
        [str(SCRIPT), "--internal", "onnx-check", str(run_dir), str(model_path), str(work / "phantom")], left, work
    )
    found = result_of(output)
    seconds = time.monotonic() - began
    if rc != 0 or found is None:
        report.step("onnx", "failed", failure(rc, output, "PyTorch vs ONNX Runtime"), seconds)
    else:
        status = "passed" if found["passed"] else "failed"
        report.step(
            "onnx",
            status,
            note if found["passed"] else "ONNX Runtime disagrees with PyTorch",
            seconds,
            model=str(model_path),
            **found,
        )


def onnx_check(run_dir: str, model_path: str, data: str, devices: str = "cpu,cuda") -> dict[str, Any]:
    """PyTorch (CPU fp32, and CUDA) against ONNX Runtime (CPU) on raw test images."""
    import numpy as np
    import torch

    from noisyseg.data.folder import read_image, read_split_ids
    from noisyseg.export.onnx_export import DeployableSegmenter, ValidationTolerance
    from noisyseg.export.onnxruntime_runner import OnnxRuntimeRunner
    from noisyseg.models.model_file import load_model
    from noisyseg.run.run_dir import resolve_model_file

    model, info = load_model(resolve_model_file(run_dir))
    ids = read_split_ids(data, "test")[:4]
    images = np.stack([read_image(next(Path(data, "images").glob(f"{slice_id}.*"))) for slice_id in ids]).astype(
        np.float32
    )
    if images.ndim == 3:
        images = images[:, None]
    runner = OnnxRuntimeRunner(model_path, providers=["CPUExecutionProvider"])
    onnx_logits = runner.run(images)["logits"]
    tolerance = ValidationTolerance()
    found: dict[str, Any] = {"images": int(images.shape[0]), "shape": list(images.shape)}
    passed = True
    for device in devices.split(","):
        wrapper = DeployableSegmenter(model.to(device), info.normalization, "logits").eval()
        with torch.inference_mode():
            reference = wrapper(torch.from_numpy(images).to(device)).float().cpu().numpy()
        diff = float(np.abs(reference - onnx_logits).max())
        agreement = float((reference.argmax(1) == onnx_logits.argmax(1)).mean())
        # CUDA convolutions may run in TF32 (cuDNN's default), so only the CPU comparison is
        # held to the exporter's tolerance; on CUDA the labels must agree.
        allowed = tolerance.atol + tolerance.rtol * float(np.abs(reference).max())
        ok = agreement >= (tolerance.min_argmax_agreement if device == "cpu" else 0.99) and (
            device == "cuda" or diff <= allowed
        )
        found[f"pytorch_{device}"] = {
            "max_abs_diff": diff,
            "allowed_max_abs_diff": allowed if device == "cpu" else None,
            "argmax_agreement": agreement,
            "passed": ok,
        }
        passed = passed and ok
    found["passed"] = passed
    return found


# ------------------------------------------------------------------------------ step 5


def tensorrt_step(runner: Runner, report: Report, work: Path, out: Path) -> None:
    began = time.monotonic()
    rc, output, _ = runner.python(["-c", "import tensorrt; print(tensorrt.__version__)"], 15, work)
    if rc != 0:
        error = next((line for line in reversed(output.strip().splitlines()) if "Error" in line), tail(output, 1))
        report.step("tensorrt", "skipped", f"tensorrt not importable: {error}")
        return
    version = tail(output, 1)
    junit = out / "tensorrt_tests.xml"
    rc, output, _ = runner.python(
        [
            "-m",
            "pytest",
            str(REPO / "tests" / "test_tensorrt_engine.py"),
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
        ],
        BUDGETS["tensorrt"] - (time.monotonic() - began),
        work,
    )
    counts = junit_counts(junit)
    seconds = time.monotonic() - began
    status = "passed" if rc == 0 else "failed"
    report.step(
        "tensorrt", status, "" if rc == 0 else failure(rc, output, "pytest"), seconds, tensorrt=version, **counts
    )


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="folder for gpu-check.json, gpu-check.log and the step outputs")
    parser.add_argument(
        "--keep-target", action="store_true", help="keep the temporary install (its path is in the report)"
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.log").write_text(
        f"noisyseg gpu-check, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {sys.executable}\n"
    )
    report = Report(out)
    work = Path(tempfile.mkdtemp(prefix="noisyseg-gpu-check-"))
    target = work / "target"
    env = {
        key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "PYTHONPATH", "PYTHONHOME")
    }
    env.update(PYTHONPATH=str(target), PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    runner = Runner(out, env, time.monotonic() + TOTAL_BUDGET_S)
    try:
        env_info = install(runner, report, target, work)
        if env_info is None:
            for name in GPU_STEPS:
                report.step(name, "skipped", "the install step failed")
            report.finish("install failed", 1)
            print("install step failed: see", out / "gpu-check.json")
            return 1
        report.data["environment"] = env_info
        report.write()
        if not env_info["cuda_available"]:
            for name in GPU_STEPS:
                why = (
                    f"torch {env_info['torch']} sees no CUDA device"
                    if env_info["torch"]
                    else f"torch is not importable ({env_info['torch_error']})"
                )
                report.step(name, "skipped", f"no CUDA: {why}")
            report.finish(NO_CUDA, 2)
            print(NO_CUDA, f"(install and report checked; report: {out / 'gpu-check.json'})")
            return 2
        kernel_tests(runner, report, work, out, env_info)
        kernel_benchmark(runner, report, work, out)
        run_dir = training(runner, report, work, out, env_info)
        onnx_step(runner, report, work, out, run_dir, env_info)
        tensorrt_step(runner, report, work, out)
        failed = [name for name, step in report.data["steps"].items() if step["status"] == "failed"]
        code = 1 if failed else 0
        report.finish("failed: " + ", ".join(failed) if failed else "passed", code)
        print(report.data["result"], f"(report: {out / 'gpu-check.json'}, log: {out / 'gpu-check.log'})")
        return code
    finally:
        if not args.keep_target:
            shutil.rmtree(work, ignore_errors=True)


def internal(argv: list[str]) -> int:
    """`--internal NAME ARGS`: a check run in a subprocess against the installed package."""
    name, *rest = argv
    functions = {"import-check": import_check, "loss-check": loss_check, "onnx-check": onnx_check}
    found = functions[name](*rest)
    print(RESULT_MARK + json.dumps(found, default=str), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--internal":
        sys.exit(internal(sys.argv[2:]))
    sys.exit(main())
