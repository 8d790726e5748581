"""ONNX export of noisyseg checkpoints, validated against PyTorch before anything is written.

The exported graph is `DeployableSegmenter`: it takes raw pixels as input `image` (float32,
N x C x H x W), applies the training-time input normalisation itself (so clients never need to
know it), runs the network, and returns one output named after its kind:

- `logits`: float32 (N, K, H, W), the network's raw class scores;
- `probs`:  float32 (N, K, H, W), softmax over classes;
- `labels`: int64 (N, H, W), the argmax class per pixel (TensorRT 10 handles INT64 I/O natively,
  so the type matches what PyTorch and ONNX Runtime give).

Batch, height and width are dynamic unless `static_size` is given. The model's description goes
into the ONNX `metadata_props` (see `METADATA_KEYS`). A model is written only when its PyTorch
logits on sample inputs are finite and plausible (|logit| <= `MAX_PLAUSIBLE_LOGIT`), when ONNX
Runtime reproduces PyTorch on them (max abs error and per-pixel argmax agreement), and only
when every operator is one TensorRT's ONNX parser accepts.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from noisyseg.data.folder import IMAGENET_MEAN, IMAGENET_STD, NORMALIZATION_EPS
from noisyseg.io import atomic_write_bytes, file_sha256
from noisyseg.models.model_file import ModelInfo, load_model
from noisyseg.run.run_dir import resolve_model_file
from noisyseg.runtime.device import resolve_device

logger = logging.getLogger(__name__)

OutputKind = Literal["logits", "probs", "labels"]
OUTPUT_KINDS: tuple[str, ...] = ("logits", "probs", "labels")
NORMALIZATIONS = ("zscore", "imagenet", "none")
INPUT_NAME = "image"
# 18: the lowest opset the dynamo exporter emits natively (it cannot down-convert this graph's
# ReduceMean to 17); TensorRT 10 parses opsets 9 to 20.
DEFAULT_OPSET = 18
# Loggers of the dynamo exporter's graph passes, which log every rewrite at INFO.
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")
# The metadata_props keys every exported model carries (values are strings; lists are JSON).
METADATA_KEYS = (
    "class_names",
    "normalization",
    "method",
    "noisyseg_version",
    "checkpoint_sha256",
    "output",
    "architecture",
    "in_channels",
    "stride",
    "checkpoint",
)


class DeployableSegmenter(nn.Module):
    """A segmentation network packaged for deployment: raw pixels in, one output kind out.

    `normalization` is the checkpoint's `ModelInfo.normalization`, applied exactly as
    `noisyseg.data.folder.normalize_image` does at training time: "zscore" standardises each
    image and channel over its pixels; "imagenet" takes 0-255 RGB (3 channels), scales it to
    [0, 1] and subtracts the ImageNet mean and divides by its std per channel (constants in the
    graph); "none" passes pixels through. `output` picks what `forward` returns (see the module
    docstring). Used by the ONNX export and by the server's PyTorch backend.
    """

    def __init__(self, model: nn.Module, normalization: str = "zscore", output: OutputKind = "logits") -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization '{normalization}' is not supported (expected one of {NORMALIZATIONS})")
        if output not in OUTPUT_KINDS:
            raise ValueError(f"output '{output}' is not supported (expected one of {OUTPUT_KINDS})")
        self.model = model
        self.normalization = normalization
        self.output = output
        # (1, 3, 1, 1) constants; not persistent, so the wrapper's state dict is the model's.
        self.register_buffer(
            "mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if self.normalization == "none":
            return images
        if self.normalization == "imagenet":
            if images.shape[1] != self.mean.shape[1]:
                raise ValueError(
                    f"'imagenet' normalisation needs 3 (RGB) channels, got images of shape {list(images.shape)}"
                )
            return (images / 255.0 - self.mean) / self.std
        mean = images.mean(dim=(2, 3), keepdim=True)
        centered = images - mean
        # Population standard deviation (numpy's default), written out so it exports as plain
        # ReduceMean/Mul/Sqrt, which every runtime supports.
        std = torch.sqrt((centered * centered).mean(dim=(2, 3), keepdim=True))
        return centered / (std + NORMALIZATION_EPS)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.from_logits(self.model(self.normalize(images)))

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The output of kind `self.output` for the network's logits."""
        if self.output == "probs":
            return F.softmax(logits, dim=1)
        if self.output == "labels":
            return torch.argmax(logits, dim=1)
        return logits


# Trained segmentation networks give logits of order 10 (softmax saturates long before 100);
# beyond this bound the weights are damaged or diverged, and a tolerance relative to the output's
# magnitude would let any error pass.
MAX_PLAUSIBLE_LOGIT = 1e4


@dataclass
class ValidationTolerance:
    """How closely ONNX Runtime must reproduce PyTorch for the export to be written."""

    # Max abs error allowed: atol + rtol * max |PyTorch output| (float outputs only); bounded,
    # since logits beyond MAX_PLAUSIBLE_LOGIT are refused before the comparison.
    atol: float = 1e-4
    rtol: float = 1e-3
    min_argmax_agreement: float = 0.999


@dataclass
class ExportConfig:
    """Options of `noisyseg export onnx`."""

    opset: int = DEFAULT_OPSET
    output: OutputKind = "logits"
    # (H, W) for a fixed spatial size; None keeps height and width dynamic (batch always is).
    static_size: tuple[int, int] | None = None
    # "dynamo" (torch.export, PyTorch's supported exporter) or "torchscript" (the legacy tracer:
    # about ten times faster to export, used where export speed matters more, as in tests).
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    tolerance: ValidationTolerance = field(default_factory=ValidationTolerance)
    validation_seed: int = 0
    # Where the model is traced and its reference outputs computed (`auto`, `cpu`, `cuda[:N]`);
    # the exported graph is the same, ONNX Runtime validates it on the CPU either way.
    device: str = "cpu"


@dataclass
class ValidationReport:
    """PyTorch vs ONNX Runtime on the sample inputs, over all of them."""

    shapes: list[tuple[int, ...]]
    max_abs_error: float
    allowed_max_abs_error: float
    argmax_agreement: float
    min_argmax_agreement: float

    @property
    def passed(self) -> bool:
        return self.max_abs_error <= self.allowed_max_abs_error and self.argmax_agreement >= self.min_argmax_agreement

    def describe(self) -> str:
        return (
            f"max abs error {self.max_abs_error:.3g} (allowed {self.allowed_max_abs_error:.3g}), "
            f"argmax agreement {100 * self.argmax_agreement:.4f}% of pixels "
            f"(required {100 * self.min_argmax_agreement:.2f}%) on inputs {self.shapes}"
        )


def model_stride(model: nn.Module) -> int:
    """The size multiple the network needs (`model.stride`, 1 when it declares none)."""
    return int(getattr(model, "stride", 1))


def sample_images(shape: tuple[int, ...], seed: int = 0, normalization: str = "zscore") -> np.ndarray:
    """Deterministic raw test images: smooth blobs plus noise, on a CT-like intensity range, or
    on 0-255 pixel values for "imagenet" (RGB photographs' range).

    Smooth structure (rather than white noise) gives the network confident, realistic
    decisions, so argmax agreement measures export fidelity rather than coin flips.
    """
    rng = np.random.default_rng(seed)
    n, c, h, w = shape
    coarse = torch.from_numpy(rng.normal(size=(n, c, max(2, h // 16), max(2, w // 16))).astype(np.float32))
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).numpy()
    noise = rng.normal(scale=0.05, size=shape).astype(np.float32)
    if normalization == "imagenet":
        return np.clip(127.5 + 80.0 * (smooth + noise), 0.0, 255.0).astype(np.float32)
    return (400.0 * (smooth + noise) - 200.0).astype(np.float32)


def validation_shapes(
    in_channels: int, stride: int, static_size: tuple[int, int] | None
) -> list[tuple[int, int, int, int]]:
    """A batch of two, and (for dynamic models) a second, non-square size with batch one."""
    if static_size is not None:
        return [(2, in_channels, *static_size)]
    return [(2, in_channels, 4 * stride, 4 * stride), (1, in_channels, 3 * stride, 5 * stride)]


def check_static_size(static_size: tuple[int, int], stride: int) -> None:
    height, width = static_size
    if height % stride or width % stride or height <= 0 or width <= 0:
        raise ValueError(
            f"--static {height}x{width}: height and width must be positive multiples of the model stride {stride}"
        )


def export_to_proto(wrapper: DeployableSegmenter, example: torch.Tensor, config: ExportConfig) -> onnx.ModelProto:
    """Trace `wrapper` into an ONNX model with input `image` and the output named by its kind."""
    with quiet_loggers(EXPORTER_LOGGERS), contextlib.redirect_stdout(io.StringIO()):
        proto = _trace(wrapper, example, config)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset != config.opset:
        raise RuntimeError(
            f"the {config.exporter} exporter produced opset {opset}, not the requested {config.opset} "
            f"(the dynamo exporter needs --opset {DEFAULT_OPSET} or higher)"
        )
    return proto


@contextlib.contextmanager
def quiet_loggers(names: tuple[str, ...]) -> Iterator[None]:
    """Raise the given loggers to WARNING for the duration (the exporter's passes are chatty)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [item.level for item in loggers]
    for item in loggers:
        item.setLevel(max(item.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for item, level in zip(loggers, levels, strict=True):
            item.setLevel(level)


def _trace(wrapper: DeployableSegmenter, example: torch.Tensor, config: ExportConfig) -> onnx.ModelProto:
    dynamic_hw = config.static_size is None
    if config.exporter == "dynamo":
        dims: dict[int, object] = {0: torch.export.Dim("batch")}
        if dynamic_hw:
            dims.update({2: torch.export.Dim("height"), 3: torch.export.Dim("width")})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # version-conversion chatter; the checker runs below
            program = torch.onnx.export(
                wrapper,
                (example,),
                None,
                dynamo=True,
                opset_version=config.opset,
                verbose=False,
                input_names=[INPUT_NAME],
                output_names=[config.output],
                dynamic_shapes=(dims,),
            )
        if program is None:
            raise RuntimeError("torch.onnx.export returned no program")
        return program.model_proto
    input_axes = {0: "batch", **({2: "height", 3: "width"} if dynamic_hw else {})}
    # `labels` drops the class axis, so its spatial axes are 1 and 2.
    spatial = (1, 2) if config.output == "labels" else (2, 3)
    output_axes = {0: "batch", **({spatial[0]: "height", spatial[1]: "width"} if dynamic_hw else {})}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(
            wrapper,
            (example,),
            buffer,
            dynamo=False,
            opset_version=config.opset,
            input_names=[INPUT_NAME],
            output_names=[config.output],
            dynamic_axes={INPUT_NAME: input_axes, config.output: output_axes},
        )
    return onnx.load_from_string(buffer.getvalue())


def model_metadata(info: ModelInfo, output: str, checkpoint_sha256: str, stride: int) -> dict[str, str]:
    """The `metadata_props` of an exported model (all `METADATA_KEYS`)."""
    return {
        "class_names": json.dumps(list(info.class_names)),
        "normalization": info.normalization,
        "method": info.method,
        "noisyseg_version": info.noisyseg_version,
        "checkpoint_sha256": checkpoint_sha256,
        "output": output,
        "architecture": info.architecture,
        "in_channels": str(info.in_channels),
        "stride": str(stride),
        "checkpoint": info.checkpoint_description(),
    }


def set_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> None:
    onnx.helper.set_model_props(model, metadata)


# ONNX operators the TensorRT 10 ONNX parser (onnx-tensorrt, docs/operators.md) supports, as far
# as segmentation networks use them; constraints that matter are checked separately below.
TENSORRT_OPS = frozenset(
    """Abs Add And ArgMax ArgMin AveragePool BatchNormalization Cast Ceil Clip Concat Constant
    ConstantOfShape Conv ConvTranspose DepthToSpace DequantizeLinear Div Dropout Elu Equal Erf Exp
    Expand Flatten Floor Gather GatherElements Gemm GlobalAveragePool GlobalMaxPool Greater
    GreaterOrEqual HardSigmoid HardSwish Identity InstanceNormalization LayerNormalization
    LeakyRelu Less LessOrEqual Log LogSoftmax MatMul Max MaxPool Mean Min Mul Neg Not Or Pad Pow
    PRelu QuantizeLinear Range Reciprocal ReduceL1 ReduceL2 ReduceMax ReduceMean ReduceMin
    ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize Round Shape Sigmoid Sign Sin Size
    Slice Softmax Softplus SpaceToDepth Split Sqrt Squeeze Sub Sum Tanh Tile TopK Transpose
    Unsqueeze Where""".split()
)
TENSORRT_OPSET_RANGE = (9, 20)
TENSORRT_RESIZE_MODES = frozenset({"nearest", "linear", "cubic"})
TENSORRT_RESIZE_COORDINATES = frozenset(
    {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
)
# Inputs TensorRT needs as build-time constants: (op, input index, what it is).
TENSORRT_CONSTANT_INPUTS = (
    ("Conv", 1, "weights"),
    ("ConvTranspose", 1, "weights"),
    ("Resize", 2, "scales"),
    ("Slice", 3, "axes"),
    ("Squeeze", 1, "axes"),
    ("Unsqueeze", 1, "axes"),
    ("ReduceMean", 1, "axes"),
    ("ReduceSum", 1, "axes"),
    ("TopK", 1, "K"),
)
# Q/DQ scales and zero points: TensorRT runs symmetric quantisation only.
TENSORRT_ZERO_POINT_INPUT = {"QuantizeLinear": 2, "DequantizeLinear": 2}


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every tensor known at build time: initializers, Constant outputs, DequantizeLinear of those."""
    values = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            attribute = next((a for a in node.attribute if a.name == "value"), None)
            if attribute is not None:
                values[node.output[0]] = onnx.numpy_helper.to_array(attribute.t)
        elif node.op_type == "DequantizeLinear" and node.input[0] in values:
            # Quantised weights (QDQ): the dequantised tensor is still a build-time constant.
            values[node.output[0]] = values[node.input[0]]
    return values


def _attribute(node: onnx.NodeProto, name: str, default: object) -> object:
    for attribute in node.attribute:
        if attribute.name == name:
            value = onnx.helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def tensorrt_compatibility_problems(model: onnx.ModelProto) -> list[str]:
    """Why TensorRT 10's ONNX parser would reject `model` (an empty list: it would not)."""
    problems: list[str] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    low, high = TENSORRT_OPSET_RANGE
    if opset is None or not low <= opset <= high:
        problems.append(f"opset {opset} is outside the range TensorRT 10 parses ({low}..{high})")
    constants = _constant_values(model.graph)
    for node in model.graph.node:
        where = f"node '{node.name or node.output[0]}' ({node.op_type})"
        if node.domain not in ("", "ai.onnx") or node.op_type not in TENSORRT_OPS:
            problems.append(
                f"{where}: operator {node.domain or 'ai.onnx'}::{node.op_type} "
                "is not supported by TensorRT's ONNX parser"
            )
            continue
        problems.extend(_constraint_problems(node, where, constants))
    return problems


def _constraint_problems(node: onnx.NodeProto, where: str, constants: dict[str, np.ndarray]) -> list[str]:
    problems = []
    for op_type, index, what in TENSORRT_CONSTANT_INPUTS:
        if (
            node.op_type == op_type
            and len(node.input) > index
            and node.input[index]
            and node.input[index] not in constants
        ):
            problems.append(
                f"{where}: {what} input '{node.input[index]}' must be a constant (initializer) for TensorRT"
            )
    if node.op_type == "Resize":
        has_scales = len(node.input) > 2 and node.input[2] != ""
        has_sizes = len(node.input) > 3 and node.input[3] != ""
        if not (has_scales or has_sizes):
            problems.append(f"{where}: Resize needs constant scales or a sizes input")
        if _attribute(node, "mode", "nearest") not in TENSORRT_RESIZE_MODES:
            problems.append(f"{where}: Resize mode '{_attribute(node, 'mode', '')}' is not supported by TensorRT")
        if _attribute(node, "coordinate_transformation_mode", "half_pixel") not in TENSORRT_RESIZE_COORDINATES:
            problems.append(
                f"{where}: Resize coordinate mode "
                f"'{_attribute(node, 'coordinate_transformation_mode', '')}' is not supported by TensorRT"
            )
        if _attribute(node, "antialias", 0):
            problems.append(f"{where}: Resize with antialias is not supported by TensorRT")
    if node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
        problems.append(f"{where}: MaxPool's Indices output is not supported by TensorRT")
    zero_point_index = TENSORRT_ZERO_POINT_INPUT.get(node.op_type)
    if zero_point_index is not None and len(node.input) > zero_point_index and node.input[zero_point_index]:
        zero_point = constants.get(node.input[zero_point_index])
        if zero_point is None or np.any(zero_point != 0):
            problems.append(f"{where}: zero point must be a constant 0 for TensorRT (symmetric quantisation)")
    return problems


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, kind: str) -> tuple[float, float, int]:
    """(max abs error, matching argmax pixels, pixels) of one output batch against its reference."""
    if reference.shape != candidate.shape:
        raise ValueError(
            f"output '{kind}': shape {list(candidate.shape)} differs from the reference {list(reference.shape)}"
        )
    if kind == "labels":
        matches = reference == candidate
        return 0.0, float(matches.sum()), matches.size
    # NaN where ONNX Runtime gives a non-finite value counts as an unbounded error.
    error = float(
        np.max(
            np.nan_to_num(np.abs(reference.astype(np.float64) - candidate.astype(np.float64)), nan=np.inf), initial=0.0
        )
    )
    matches = np.argmax(reference, axis=1) == np.argmax(candidate, axis=1)
    return error, float(matches.sum()), matches.size


def check_plausible_logits(logits: torch.Tensor, out: str | Path) -> None:
    """Refuse an export whose PyTorch logits are non-finite or beyond MAX_PLAUSIBLE_LOGIT (for
    every output kind: probabilities and labels of such logits are as meaningless)."""
    where = f"{out}: PyTorch logits of the sample inputs hold"
    advice = "the checkpoint's weights are damaged or diverged; nothing written"
    bad = int((~torch.isfinite(logits)).sum())
    if bad:
        raise RuntimeError(f"{where} {bad} non-finite values (NaN or infinity); {advice}")
    largest = float(logits.abs().max()) if logits.numel() else 0.0
    if largest > MAX_PLAUSIBLE_LOGIT:
        raise RuntimeError(
            f"{where} values up to {largest:.3g}, beyond the plausible logit bound {MAX_PLAUSIBLE_LOGIT:.0e}; {advice}"
        )


def validate_export(
    wrapper: DeployableSegmenter,
    onnx_bytes: bytes,
    shapes: list[tuple[int, int, int, int]],
    config: ExportConfig,
    out: str | Path = "export",
) -> ValidationReport:
    """Run PyTorch and ONNX Runtime on sample inputs of each shape and compare their outputs
    (`out` names the model being exported in errors)."""
    from noisyseg.export.onnxruntime_runner import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(onnx_bytes, providers=["CPUExecutionProvider"])
    device = next(wrapper.parameters()).device
    max_error, max_reference, matching, pixels = 0.0, 0.0, 0.0, 0
    for index, shape in enumerate(shapes):
        images = sample_images(shape, seed=config.validation_seed + index, normalization=wrapper.normalization)
        with torch.inference_mode():
            logits = wrapper.model(wrapper.normalize(torch.from_numpy(images).to(device)))
            check_plausible_logits(logits, out)
            reference = wrapper.from_logits(logits).cpu().numpy()
        candidate = runner.run(images)[config.output]
        error, shape_matching, shape_pixels = compare_outputs(reference, candidate, config.output)
        max_error = max(max_error, error)
        max_reference = max(max_reference, float(np.max(np.abs(reference), initial=0.0)))
        matching += shape_matching
        pixels += shape_pixels
    allowed = config.tolerance.atol + config.tolerance.rtol * max_reference if config.output != "labels" else 0.0
    return ValidationReport(
        shapes=[tuple(s) for s in shapes],
        max_abs_error=max_error,
        allowed_max_abs_error=allowed,
        argmax_agreement=matching / max(pixels, 1),
        min_argmax_agreement=config.tolerance.min_argmax_agreement,
    )


def export_model(
    model: nn.Module, info: ModelInfo, out: str | Path, config: ExportConfig | None = None, checkpoint_sha256: str = ""
) -> ValidationReport:
    """Export `model` (described by `info`) to `out`, validated; raises without writing on failure."""
    config = config or ExportConfig()
    out = Path(out)
    stride = model_stride(model)
    if config.static_size is not None:
        check_static_size(config.static_size, stride)
    device = resolve_device(config.device, field="--device")
    wrapper = DeployableSegmenter(model.eval(), info.normalization, config.output).eval().to(device)
    shapes = validation_shapes(info.in_channels, stride, config.static_size)
    example = torch.from_numpy(
        sample_images((1, *shapes[0][1:]), seed=config.validation_seed, normalization=info.normalization)
    ).to(device)
    proto = export_to_proto(wrapper, example, config)
    set_metadata(proto, model_metadata(info, config.output, checkpoint_sha256, stride))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as err:
        raise RuntimeError(f"{out}: exported graph fails onnx.checker ({err}); nothing written") from err
    problems = tensorrt_compatibility_problems(proto)
    if problems:
        raise RuntimeError(f"{out}: exported graph is not TensorRT-compatible; nothing written: " + "; ".join(problems))
    onnx_bytes = proto.SerializeToString()
    report = validate_export(wrapper, onnx_bytes, shapes, config, out)
    if not report.passed:
        raise RuntimeError(f"{out}: ONNX Runtime does not reproduce PyTorch: {report.describe()}; nothing written")
    atomic_write_bytes(out, onnx_bytes)
    logger.info("wrote %s (%s output, opset %d): %s", out, config.output, config.opset, report.describe())
    return report


def export_checkpoint(checkpoint: str | Path, out: str | Path, config: ExportConfig | None = None) -> ValidationReport:
    """`noisyseg export onnx`: a checkpoint file or run directory to a validated ONNX model."""
    model_file = resolve_model_file(checkpoint)
    model, info = load_model(model_file)
    return export_model(model, info, out, config, checkpoint_sha256=file_sha256(model_file))


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The `metadata_props` of an ONNX model as a dict."""
    return {prop.key: prop.value for prop in model.metadata_props}
