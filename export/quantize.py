"""Static INT8 quantisation of an exported model, in the QDQ format TensorRT also consumes.

`quantize_onnx` calibrates activation ranges with `onnxruntime.quantization.quantize_static` on
real training images of a dataset folder, evaluates fp32 and int8 on the test split (mIoU and
latency, both through ONNX Runtime), and writes the int8 model only when the mIoU drop is within
`QuantizeConfig.max_miou_drop` points.

Choices, and why:
- Signed int8 for weights and activations, symmetric (zero point 0): TensorRT only accepts
  zero-point-0 Q/DQ, so the same file serves ONNX Runtime and a TensorRT `--int8` build.
- Per-channel weight scales: convolutions with very different channel norms keep accuracy.
- Only the network's compute is quantised (`QUANTIZED_OPS`): the in-graph normalisation sees
  raw intensities (hundreds of HU, or 0-255 pixels), which one int8 scale cannot cover without
  ruining it.
- The final classifier convolution stays fp32 by default (`keep_classifier_fp32`): its output
  is the logits, whose small margins decide the argmax; it is 1x1 and cheap.

Calibration and evaluation images come from a dataset in any supported layout
(`noisyseg.data.datasets.open_source`, read on demand): raw pixels, as a client sends them,
which the graph normalises itself (z-score per image, or ImageNet mean/std for RGB models), so
the network sees exactly the input it sees at deployment. Images may differ in size: consecutive
images of one size are batched together (`export.data_inputs.shape_batches`), zero-padded on the
bottom and right to the model's stride, and predictions are cropped back before they enter the
confusion matrix. Data of one size (a multiple of the stride) is batched exactly as a stacked
split would be.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from tqdm import tqdm

from noisyseg.data.datasets import SegmentationSource, detect_layout
from noisyseg.data.run_data import test_split
from noisyseg.evaluation.metrics import confusion_matrix, mean_iou
from noisyseg.export.data_inputs import (
    ImageBatch,
    metadata_stride,
    open_data,
    shape_batches,
    source_pairs,
)
from noisyseg.export.onnx_export import read_metadata, set_metadata, tensorrt_compatibility_problems
from noisyseg.export.onnx_file import load_onnx
from noisyseg.export.onnxruntime_runner import OnnxRuntimeRunner
from noisyseg.io import atomic_write_bytes

logger = logging.getLogger(__name__)

QUANTIZED_OPS = ["Conv", "MaxPool", "Concat", "Resize"]
CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}


@dataclass
class QuantizeConfig:
    """Options of `noisyseg export quantize`."""

    calibration_split: str = "train"
    # None: `test`, or `val` for a layout without a labelled test split (PASCAL VOC).
    eval_split: str | None = None
    # The data's layout (`auto`: detected) and its options, as `open_source` takes them.
    layout: str = "auto"
    layout_options: dict[str, Any] = field(default_factory=dict)
    max_calibration_images: int = 64
    batch_size: int = 8
    calibration_method: Literal["minmax", "percentile", "entropy"] = "minmax"
    per_channel: bool = True
    keep_classifier_fp32: bool = True
    # Refuse to write a model whose test mIoU is more than this many points below fp32.
    max_miou_drop: float = 1.0
    # Latency measured at this batch size, as the median of this many runs after one warm-up.
    timing_batch: int = 1
    timing_runs: int = 10
    seed: int = 0


@dataclass
class QuantizeReport:
    """What `quantize_onnx` measured (mIoU in points, 0-100; latency in milliseconds per batch)."""

    calibration_images: int
    eval_images: int
    excluded_nodes: list[str]
    fp32_miou: float
    int8_miou: float
    miou_drop: float
    fp32_latency_ms: float
    int8_latency_ms: float
    speedup: float
    timing_batch: int

    def describe(self) -> str:
        return (
            f"test mIoU fp32 {self.fp32_miou:.2f}, int8 {self.int8_miou:.2f} (drop {self.miou_drop:.2f} points "
            f"on {self.eval_images} images); latency at batch {self.timing_batch}: fp32 {self.fp32_latency_ms:.1f} ms, "
            f"int8 {self.int8_latency_ms:.1f} ms (speed-up {self.speedup:.2f}x)"
        )


class ImageBatchReader(CalibrationDataReader):
    """Feeds image batches to the calibrator as {input name: batch}."""

    def __init__(self, input_name: str, batches: list[np.ndarray]) -> None:
        self.input_name = input_name
        self.batches = batches
        self._iterator: Iterator[np.ndarray] = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iterator, None)
        return None if batch is None else {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    def rewind(self) -> None:
        self._iterator = iter(self.batches)


def open_split(data_dir: str | Path, split: str, config: QuantizeConfig) -> SegmentationSource:
    return open_data(data_dir, split, config.layout, config.layout_options)


def calibration_images(data_dir: str | Path, config: QuantizeConfig) -> list[np.ndarray]:
    """Up to `max_calibration_images` raw images (C, H, W) of the calibration split, a fixed
    random subset in split order."""
    # Raw pixels: the model normalises inside its graph (z-score or ImageNet), as in serving.
    source = open_split(data_dir, config.calibration_split, config)
    indices = np.arange(len(source))
    if len(source) > config.max_calibration_images:
        rng = np.random.default_rng(config.seed)
        indices = np.sort(rng.choice(len(source), config.max_calibration_images, replace=False))
    return [source.read_image(int(index)).astype(np.float32, copy=False) for index in indices]


def calibration_batches(images: list[np.ndarray], batch_size: int, stride: int, method: str) -> list[np.ndarray]:
    """The calibrator's input batches: images of one size together, padded to the stride."""
    batches = [batch.images for batch in shape_batches(((image, None) for image in images), batch_size, stride)]
    if method != "minmax" and len({batch.shape for batch in batches}) > 1:
        # ORT's histogram calibrators stack all batches' activations into one array.
        raise ValueError(
            f"calibration method '{method}' needs images of one size (padded to the stride); "
            f"these give {sorted({batch.shape[-2:] for batch in batches})}: use minmax"
        )
    return batches


def classifier_node(model: onnx.ModelProto) -> str:
    """The name of the last convolution (ONNX nodes are in topological order): the classifier."""
    convolutions = [node.name for node in model.graph.node if node.op_type == "Conv"]
    if not convolutions:
        raise ValueError("model has no Conv node to treat as the classifier")
    return convolutions[-1]


def predicted_labels(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """Class ids (N, H, W) from a model's `labels`, `logits` or `probs` output."""
    if "labels" in outputs:
        return outputs["labels"]
    for name in ("logits", "probs"):
        if name in outputs:
            return np.argmax(outputs[name], axis=1)
    raise ValueError(f"model outputs {sorted(outputs)}; expected one of labels, logits, probs")


def split_miou(runner: OnnxRuntimeRunner, source: SegmentationSource, batch_size: int, stride: int) -> float:
    """mIoU in points (0-100) of `runner` on a whole split (one confusion matrix over it): images
    of one size batched, padded to the stride, predictions cropped back to each image's size."""
    info = source.info
    matrix = np.zeros((info.num_classes, info.num_classes), dtype=np.int64)
    batches = shape_batches(source_pairs(source), batch_size, stride)
    for batch in tqdm(batches, desc=f"evaluating {runner.model_path.name}", unit="batch", leave=False):
        labels = batch.crop(predicted_labels(runner.run(batch.images)))
        matrix += confusion_matrix(labels, np.stack(batch.items), info.num_classes, info.ignore_index)
    return 100.0 * mean_iou(matrix)


def median_latency_ms(runner: OnnxRuntimeRunner, batch: np.ndarray, runs: int) -> float:
    runner.run(batch)  # warm-up: first-run allocations and kernel selection
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner.run(batch)
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def quantize_to_bytes(onnx_path: Path, images: list[np.ndarray], config: QuantizeConfig) -> tuple[bytes, list[str]]:
    """Run ORT static quantisation; returns the QDQ model (with the fp32 model's metadata)."""
    model = load_onnx(onnx_path, load_external_data=True)
    excluded = [classifier_node(model)] if config.keep_classifier_fp32 else []
    # ORT's histogram calibrators (percentile, entropy) stack per-batch activations, so every
    # batch must have the same shape: one image per batch; min-max takes any batching.
    batch_size = config.batch_size if config.calibration_method == "minmax" else 1
    batches = calibration_batches(images, batch_size, metadata_stride(read_metadata(model)), config.calibration_method)
    reader = ImageBatchReader(model.graph.input[0].name, batches)
    with tempfile.TemporaryDirectory(prefix="noisyseg-quantize-") as scratch:
        # ORT's recommended preparation: graph optimisation (constants become initializers, so
        # biases can be quantised too) and ONNX shape inference. Its symbolic shape inference
        # (meant for transformers) cannot follow the dynamo export's Resize sizes, so it is off.
        prepared_path, quantized_path = Path(scratch) / "model.prepared.onnx", Path(scratch) / "model.int8.onnx"
        quant_pre_process(str(onnx_path), str(prepared_path), skip_symbolic_shape=True)
        quantize_static(
            str(prepared_path),
            str(quantized_path),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=QUANTIZED_OPS,
            per_channel=config.per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=CALIBRATION_METHODS[config.calibration_method],
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
        quantized = onnx.load(str(quantized_path))
    metadata = read_metadata(model)
    metadata.update(
        quantization="int8 static QDQ (symmetric, per-channel weights)"
        if config.per_channel
        else "int8 static QDQ (symmetric)",
        quantization_excluded_nodes=",".join(excluded),
        calibration_images=str(len(images)),
    )
    set_metadata(quantized, metadata)
    return quantized.SerializeToString(), excluded


def quantize_onnx(
    onnx_path: str | Path, data_dir: str | Path, out: str | Path, config: QuantizeConfig | None = None
) -> QuantizeReport:
    """`noisyseg export quantize`: calibrate, quantise, evaluate, and write only if accurate enough."""
    config = config or QuantizeConfig()
    onnx_path, out = Path(onnx_path), Path(out)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: no ONNX model file")
    images = calibration_images(data_dir, config)
    logger.info("calibrating on %d images of split '%s' of %s", len(images), config.calibration_split, data_dir)
    quantized_bytes, excluded = quantize_to_bytes(onnx_path, images, config)
    problems = tensorrt_compatibility_problems(onnx.load_from_string(quantized_bytes))
    if problems:
        raise RuntimeError(
            f"{out}: quantised graph is not TensorRT-compatible; nothing written: " + "; ".join(problems)
        )
    report = evaluate_quantized(onnx_path, quantized_bytes, data_dir, config, len(images), excluded)
    if report.miou_drop > config.max_miou_drop:
        raise RuntimeError(
            f"{out}: int8 model loses too much accuracy (allowed "
            f"{config.max_miou_drop:.2f} points): {report.describe()}; nothing written"
        )
    atomic_write_bytes(out, quantized_bytes)
    logger.info("wrote %s: %s", out, report.describe())
    return report


def evaluate_quantized(
    onnx_path: Path,
    quantized_bytes: bytes,
    data_dir: str | Path,
    config: QuantizeConfig,
    calibration_count: int,
    excluded: list[str],
) -> QuantizeReport:
    """Test-split mIoU and latency of the fp32 and int8 models, side by side."""
    eval_split = config.eval_split
    if eval_split is None:
        layout = detect_layout(data_dir) if config.layout == "auto" else config.layout
        eval_split = test_split(data_dir, layout, config.layout_options)
    source = open_split(data_dir, eval_split, config)
    fp32 = OnnxRuntimeRunner(onnx_path)
    int8 = OnnxRuntimeRunner(quantized_bytes)
    stride = metadata_stride(fp32.metadata)
    fp32_miou = split_miou(fp32, source, config.batch_size, stride)
    int8_miou = split_miou(int8, source, config.batch_size, stride)
    first: ImageBatch[np.ndarray] = next(shape_batches(source_pairs(source), config.timing_batch, stride))
    batch = first.images
    fp32_ms = median_latency_ms(fp32, batch, config.timing_runs)
    int8_ms = median_latency_ms(int8, batch, config.timing_runs)
    return QuantizeReport(
        calibration_images=calibration_count,
        eval_images=len(source),
        excluded_nodes=excluded,
        fp32_miou=fp32_miou,
        int8_miou=int8_miou,
        miou_drop=fp32_miou - int8_miou,
        fp32_latency_ms=fp32_ms,
        int8_latency_ms=int8_ms,
        speedup=fp32_ms / int8_ms,
        timing_batch=len(batch),
    )


def report_dict(report: QuantizeReport) -> dict[str, object]:
    """The report as JSON-ready data (for `--report FILE`)."""
    return asdict(report)
