"""Inference speed of the deployment paths, side by side in one run (`make bench`).

UNet at the CPU demo width (`noisyseg.experiments.experiment.Scale().unet`), 256 x 256 images, batch
1 and 8: PyTorch eager fp32, ONNX Runtime fp32, ONNX Runtime int8 (static QDQ), and TensorRT
fp16/int8 where TensorRT and a GPU are present. `extra_info` holds images per second, latency
per batch (median of the rounds) and the speed-up over PyTorch eager at the same batch (measured earlier in the same
run). Accuracy of the int8 model is measured by `noisyseg export quantize` on a trained model
(see docs/benchmarks.md); here the weights are freshly initialised, which does not change speed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from noisyseg.data.phantom import PhantomConfig, generate_phantom
from noisyseg.experiments.experiment import Scale
from noisyseg.export.onnx_export import DeployableSegmenter, export_model, sample_images
from noisyseg.export.onnxruntime_runner import OnnxRuntimeRunner
from noisyseg.export.quantize import QuantizeConfig, quantize_to_bytes
from noisyseg.export.tensorrt_engine import GPU_EXTRA_MESSAGE, EngineBuildConfig, tensorrt_available
from noisyseg.models import create_model
from noisyseg.models.model_file import ModelInfo

SIZE = 256
BATCHES = (1, 8)
BACKENDS = ("pytorch-eager-fp32", "onnxruntime-fp32", "onnxruntime-int8", "tensorrt-fp16", "tensorrt-int8")
HAS_TENSORRT_GPU = tensorrt_available() and torch.cuda.is_available()
# Median seconds per batch of each (backend, batch) measured so far in this run (the median,
# not the mean: on a shared machine a few rounds stall behind other jobs).
MEASURED: dict[tuple[str, int], float] = {}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | torch.nn.Module]:
    """The demo-width UNet, its ONNX export and its int8 model calibrated on phantom slices."""
    root = tmp_path_factory.mktemp("bench")
    kwargs = dict(Scale().unet)
    torch.manual_seed(0)
    model = create_model("unet", **kwargs).eval()
    fp32 = root / "model.onnx"
    export_model(model, ModelInfo("unet", kwargs, ["background", "esophagus", "heart", "trachea", "aorta"]), fp32)
    generate_phantom(root / "phantom", num_patients=3, seed=0, config=PhantomConfig(size=SIZE, slices_per_patient=4))
    from noisyseg.export.quantize import calibration_images

    images = calibration_images(root / "phantom", QuantizeConfig(max_calibration_images=16))
    int8 = root / "model.int8.onnx"
    int8.write_bytes(quantize_to_bytes(fp32, images, QuantizeConfig())[0])
    return {"torch": model, "fp32": fp32, "int8": int8, "root": root}


def tensorrt_runner(models: dict, precision: str) -> Callable[[np.ndarray], object]:
    from noisyseg.export.tensorrt_engine import TensorRTRunner, build_engine

    onnx_path = models["int8" if precision == "int8" else "fp32"]
    plan = models["root"] / f"model.{precision}.plan"
    if not plan.exists():
        build_engine(
            onnx_path,
            plan,
            EngineBuildConfig(
                precision=precision,
                min_shape=(1, 1, SIZE, SIZE),
                opt_shape=(8, 1, SIZE, SIZE),
                max_shape=(8, 1, SIZE, SIZE),
            ),
        )
    return TensorRTRunner(plan).run


def inference_function(backend: str, models: dict) -> Callable[[np.ndarray], object]:
    if backend == "pytorch-eager-fp32":
        wrapper = DeployableSegmenter(models["torch"]).eval()

        def eager(images: np.ndarray) -> object:
            with torch.inference_mode():
                return wrapper(torch.from_numpy(images))

        return eager
    if backend.startswith("onnxruntime"):
        return OnnxRuntimeRunner(models[backend.split("-")[1]], providers=["CPUExecutionProvider"]).run
    if not HAS_TENSORRT_GPU:
        pytest.skip(f"TensorRT benchmark needs a GPU: {GPU_EXTRA_MESSAGE}")
    return tensorrt_runner(models, backend.split("-")[1])


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_speed(benchmark, models, backend: str, batch: int) -> None:
    run = inference_function(backend, models)
    images = sample_images((batch, 1, SIZE, SIZE), seed=batch)
    rounds = 10 if batch == 1 else 4
    benchmark.pedantic(run, args=(images,), rounds=rounds, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    seconds = benchmark.stats.stats.median
    MEASURED[(backend, batch)] = seconds
    benchmark.extra_info.update(
        backend=backend,
        batch=batch,
        image_size=SIZE,
        images_per_second=round(batch / seconds, 2),
        latency_ms_per_batch=round(1000 * seconds, 2),
        mean_latency_ms_per_batch=round(1000 * benchmark.stats.stats.mean, 2),
        threads=torch.get_num_threads() if backend.startswith("pytorch") else os.cpu_count(),
    )
    eager = MEASURED.get(("pytorch-eager-fp32", batch))
    if eager is not None:
        benchmark.extra_info["speedup_vs_eager"] = round(eager / seconds, 2)
