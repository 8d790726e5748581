"""TensorRT engines: build a plan from an exported ONNX model, and run it (TensorRT 10 Python API).

`build_engine` parses the ONNX file (reporting every parser error with its node), adds one
optimisation profile for the image input, sets the precision flags, a workspace memory-pool
limit and an optional timing cache, and writes `model.plan` plus `model.plan.json`: the TensorRT
version, GPU name and compute capability, precision, profile, SHA-256 of the ONNX file and of
the plan, and the ONNX model's own metadata (class names, normalisation, ...).

`TensorRTRunner` offers the same interface as `OnnxRuntimeRunner` (`input_name`, `input_shape`,
`output_names`, `metadata`, `providers`, `run(images) -> {name: array}`), so the server treats
both alike. Before deserialising it checks the sidecar against this machine (TensorRT version,
compute capability, plan hash) and refuses a mismatch: an engine only runs where it was built.
CUDA memory and the stream come from torch (a CUDA build of torch is needed on the GPU machine).

`tensorrt` is imported lazily: it installs only where an NVIDIA driver is present (the `gpu`
extra). Note that `tensorrt-stubs` (installed for mypy) creates an empty `tensorrt` namespace
package, so "importable" is not "installed": `tensorrt_available` checks for the real module.

Precision: `fp32` (TF32 allowed by TensorRT's default), `fp16`, `bf16`, or `int8`, which needs
an explicitly quantised (QDQ) model from `noisyseg export quantize` (implicit calibration is
deprecated since TensorRT 10.1); int8 builds also enable fp16 for the layers left unquantised.
The precision flags are TensorRT 10 API (TensorRT 11 removes them in favour of strong typing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx

from noisyseg import __version__
from noisyseg.export.onnx_file import load_onnx
from noisyseg.io import atomic_write_bytes, atomic_write_json, file_sha256

if TYPE_CHECKING:
    import tensorrt as trt
    import torch

logger = logging.getLogger(__name__)

GPU_EXTRA_MESSAGE = (
    "TensorRT is not installed; it needs an NVIDIA GPU and driver: install the gpu extra there "
    "with pip install 'noisyseg[gpu]'"
)
Precision = Literal["fp32", "fp16", "bf16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")
PLAN_METADATA_SUFFIX = ".json"
# Default profile for dynamic dimensions (batch, height, width); fixed dimensions keep their size.
DEFAULT_PROFILE = {"min": (1, 128, 128), "opt": (1, 256, 256), "max": (8, 512, 512)}
Shape = tuple[int, ...]


class TensorRTUnavailableError(RuntimeError):
    """TensorRT (or a CUDA device) is missing on this machine."""


def tensorrt_available() -> bool:
    """True when the real TensorRT runtime is importable (not only its type stubs)."""
    try:
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "Builder")


def require_tensorrt() -> None:
    """Raise `TensorRTUnavailableError` naming the `gpu` extra unless TensorRT and CUDA are usable."""
    if not tensorrt_available():
        raise TensorRTUnavailableError(GPU_EXTRA_MESSAGE)
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailableError(
            "TensorRT is installed but no CUDA device is visible (torch.cuda.is_available() is False)"
        )


def plan_metadata_path(plan_path: str | Path) -> Path:
    """`model.plan` -> `model.plan.json`."""
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + PLAN_METADATA_SUFFIX)


def parse_shape(text: str, flag: str) -> Shape:
    """'1x1x256x256' -> (1, 1, 256, 256)."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{flag} '{text}': expected NxCxHxW with positive integers, e.g. 1x1x256x256") from None
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"{flag} '{text}': expected NxCxHxW with positive integers, e.g. 1x1x256x256")
    return shape


@dataclass
class ShapeProfile:
    """One optimisation profile of the image input (each shape N x C x H x W)."""

    min: Shape
    opt: Shape
    max: Shape

    def check_within(self, shape: Shape, what: str) -> None:
        if len(shape) != len(self.min) or any(
            not lo <= s <= hi for s, lo, hi in zip(shape, self.min, self.max, strict=False)
        ):
            raise ValueError(
                f"{what}: shape {list(shape)} is outside the engine's optimisation profile "
                f"(min {list(self.min)}, max {list(self.max)}); rebuild with --min-shape/--max-shape covering it"
            )


@dataclass
class EngineBuildConfig:
    """Options of `noisyseg export engine`."""

    precision: Precision = "fp32"
    # None: from the ONNX input (fixed dimensions) and DEFAULT_PROFILE (dynamic ones).
    min_shape: Shape | None = None
    opt_shape: Shape | None = None
    max_shape: Shape | None = None
    timing_cache: Path | None = None
    workspace_gib: float = 4.0


@dataclass
class EngineMetadata:
    """The `model.plan.json` sidecar."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    input_name: str
    input_shape: list[int | str]
    output_names: list[str]
    profiles: list[dict[str, list[int]]]
    onnx_file: str
    onnx_sha256: str
    plan_sha256: str
    model_metadata: dict[str, str] = field(default_factory=dict)
    noisyseg_version: str = __version__
    host: str = field(default_factory=platform.node)


def onnx_input(model: onnx.ModelProto) -> tuple[str, list[int | str]]:
    """(name, shape with dim_param names for dynamic axes) of the model's image input."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"expected one graph input (the image), found {[value.name for value in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    return inputs[0].name, [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?") for dim in dims]


def resolve_profile(input_shape: list[int | str], config: EngineBuildConfig) -> ShapeProfile:
    """The profile: explicit shapes where given, else fixed dims from the model and defaults."""
    if len(input_shape) != 4:
        raise ValueError(f"model input must be N x C x H x W, got {input_shape}")

    def default(kind: str) -> Shape:
        batch, height, width = DEFAULT_PROFILE[kind]
        defaults = (batch, None, height, width)
        return tuple(
            dim if isinstance(dim, int) and dim > 0 else int(defaults[axis] or 1)
            for axis, dim in enumerate(input_shape)
        )

    profile = ShapeProfile(
        min=config.min_shape or default("min"),
        opt=config.opt_shape or default("opt"),
        max=config.max_shape or default("max"),
    )
    for axis, dim in enumerate(input_shape):
        sizes = (profile.min[axis], profile.opt[axis], profile.max[axis])
        if isinstance(dim, int) and dim > 0 and any(size != dim for size in sizes):
            raise ValueError(
                f"profile dimension {axis} must be {dim} (fixed in the model), got min/opt/max {list(sizes)}"
            )
        if not sizes[0] <= sizes[1] <= sizes[2]:
            raise ValueError(f"profile dimension {axis}: need min <= opt <= max, got {list(sizes)}")
    return profile


def is_quantized(model: onnx.ModelProto) -> bool:
    """True for an explicitly quantised (QDQ) model."""
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node)


def current_gpu() -> tuple[str, str]:
    """(name, compute capability 'major.minor') of the current CUDA device."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def tensorrt_logger() -> trt.ILogger:
    """A TensorRT logger: warnings and errors, plus TensorRT's info when this module logs debug."""
    import tensorrt as trt

    severity = trt.Logger.INFO if logger.isEnabledFor(logging.DEBUG) else trt.Logger.WARNING
    return trt.Logger(severity)


def parse_onnx(
    builder: trt.Builder, trt_logger: trt.ILogger, onnx_path: Path
) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    """Parse the ONNX file into a network (explicit batch, the TensorRT 10 default).

    Raises with every parser error and its node. The parser is returned with the network
    because it owns the weights the network refers to: it must live until the build is done.
    """
    import tensorrt as trt

    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for index in range(parser.num_errors):
            error = parser.get_error(index)
            errors.append(f"node {error.node()} '{error.node_name()}' ({error.node_operator()}): {error.desc()}")
        raise RuntimeError(f"{onnx_path}: TensorRT's ONNX parser rejected the model: " + "; ".join(errors))
    return network, parser


def configure_builder(
    builder: trt.Builder, network: trt.INetworkDefinition, profile: ShapeProfile, config: EngineBuildConfig
) -> trt.IBuilderConfig:
    """Builder config: one optimisation profile, precision flags, workspace limit, timing cache."""
    import tensorrt as trt

    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gib * (1 << 30)))
    optimization_profile = builder.create_optimization_profile()
    optimization_profile.set_shape(
        network.get_input(0).name, trt.Dims(list(profile.min)), trt.Dims(list(profile.opt)), trt.Dims(list(profile.max))
    )
    builder_config.add_optimization_profile(optimization_profile)
    if config.precision in ("fp16", "int8"):
        if not builder.platform_has_fast_fp16:
            logger.warning("this GPU has no fast fp16; the engine may be slower than fp32")
        builder_config.set_flag(trt.BuilderFlag.FP16)
    if config.precision == "bf16":
        builder_config.set_flag(trt.BuilderFlag.BF16)
    if config.precision == "int8":
        builder_config.set_flag(trt.BuilderFlag.INT8)
    if config.timing_cache is not None:
        cache_bytes = config.timing_cache.read_bytes() if config.timing_cache.is_file() else b""
        timing_cache = builder_config.create_timing_cache(cache_bytes)
        builder_config.set_timing_cache(timing_cache, ignore_mismatch=False)
    return builder_config


def build_engine(onnx_path: str | Path, out: str | Path, config: EngineBuildConfig | None = None) -> EngineMetadata:
    """`noisyseg export engine`: build `out` (a plan) and `out`.json from an ONNX model."""
    config = config or EngineBuildConfig()
    onnx_path, out = Path(onnx_path), Path(out)
    if config.precision not in PRECISIONS:
        raise ValueError(f"precision '{config.precision}' is not one of {PRECISIONS}")
    model = load_onnx(onnx_path)
    input_name, input_shape = onnx_input(model)
    profile = resolve_profile(input_shape, config)
    if config.precision == "int8" and not is_quantized(model):
        raise ValueError(
            f"{onnx_path}: --int8 needs an explicitly quantised (QDQ) model: run `noisyseg export quantize` first"
        )
    require_tensorrt()
    import tensorrt as trt

    trt_logger = tensorrt_logger()
    builder = trt.Builder(trt_logger)
    network, _parser = parse_onnx(builder, trt_logger, onnx_path)
    builder_config = configure_builder(builder, network, profile, config)
    logger.info(
        "building %s engine from %s (profile min %s opt %s max %s)",
        config.precision,
        onnx_path,
        profile.min,
        profile.opt,
        profile.max,
    )
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT failed to build the engine (see the TensorRT log above)")
    plan = bytes(serialized)
    if config.timing_cache is not None:
        atomic_write_bytes(config.timing_cache, bytes(builder_config.get_timing_cache().serialize()))
    gpu_name, capability = current_gpu()
    metadata = EngineMetadata(
        tensorrt_version=trt.__version__,
        gpu_name=gpu_name,
        compute_capability=capability,
        precision=config.precision,
        input_name=input_name,
        input_shape=input_shape,
        output_names=[output.name for output in model.graph.output],
        profiles=[{"min": list(profile.min), "opt": list(profile.opt), "max": list(profile.max)}],
        onnx_file=onnx_path.name,
        onnx_sha256=file_sha256(onnx_path),
        plan_sha256=hashlib.sha256(plan).hexdigest(),
        model_metadata={prop.key: prop.value for prop in model.metadata_props},
    )
    # The plan first: a sidecar without its plan would describe nothing.
    atomic_write_bytes(out, plan)
    atomic_write_json(plan_metadata_path(out), asdict(metadata))
    logger.info("wrote %s (%.1f MiB) and %s", out, len(plan) / 2**20, plan_metadata_path(out).name)
    return metadata


def read_engine_metadata(plan_path: str | Path) -> EngineMetadata:
    """Read and validate `model.plan.json`."""
    path = plan_metadata_path(plan_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: engine metadata missing (written beside the plan by `noisyseg export engine`)"
        )
    try:
        return EngineMetadata(**json.loads(path.read_text()))
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: malformed engine metadata ({err})") from err


def engine_mismatches(
    metadata: EngineMetadata, plan_path: Path, tensorrt_version: str, compute_capability: str
) -> list[str]:
    """Why the plan cannot run here (an empty list: it can)."""
    problems = []
    if metadata.tensorrt_version != tensorrt_version:
        problems.append(f"built with TensorRT {metadata.tensorrt_version}, this machine has {tensorrt_version}")
    if metadata.compute_capability != compute_capability:
        problems.append(
            f"built for compute capability {metadata.compute_capability} "
            f"({metadata.gpu_name}), this GPU is {compute_capability}"
        )
    actual_sha = file_sha256(plan_path)
    if metadata.plan_sha256 != actual_sha:
        problems.append(
            f"plan SHA-256 {actual_sha[:12]}... does not match the metadata's {metadata.plan_sha256[:12]}..."
        )
    return problems


def dims_tuple(dims: trt.Dims) -> Shape:
    """A TensorRT `Dims` as a tuple of ints."""
    return tuple(dims[axis] for axis in range(len(dims)))


def torch_dtype(trt_dtype: trt.DataType) -> torch.dtype:
    """The torch dtype of a TensorRT I/O tensor type."""
    import tensorrt as trt
    import torch

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.INT8: torch.int8,
        trt.DataType.UINT8: torch.uint8,
        trt.DataType.BOOL: torch.bool,
    }
    if trt_dtype not in table:
        raise ValueError(f"unsupported TensorRT I/O type {trt_dtype}")
    return table[trt_dtype]


class TensorRTRunner:
    """Runs a TensorRT plan on the current CUDA device; same interface as `OnnxRuntimeRunner`."""

    def __init__(self, plan_path: str | Path) -> None:
        self.plan_path = Path(plan_path)
        if not self.plan_path.is_file():
            raise FileNotFoundError(f"{self.plan_path}: no TensorRT plan file")
        self.engine_metadata = read_engine_metadata(self.plan_path)
        require_tensorrt()
        import tensorrt as trt
        import torch

        self._check_machine(trt.__version__)
        self._runtime = trt.Runtime(tensorrt_logger())
        engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if engine is None:
            raise RuntimeError(f"{self.plan_path}: TensorRT could not deserialise the plan; rebuild the engine here")
        self.engine: trt.ICudaEngine = engine
        self.context: trt.IExecutionContext = engine.create_execution_context()
        names = [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]
        inputs = [name for name in names if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise ValueError(f"{self.plan_path}: expected one input tensor, found {inputs}")
        self.input_name: str = inputs[0]
        self.input_shape: list[int | str] = list(self.engine_metadata.input_shape)
        self.output_names: list[str] = [
            name for name in names if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT
        ]
        self.metadata: dict[str, str] = dict(self.engine_metadata.model_metadata)
        self.providers: list[str] = [f"TensorRT {trt.__version__} ({self.engine_metadata.precision})"]
        low, opt, high = engine.get_tensor_profile_shape(self.input_name, 0)
        self.profile = ShapeProfile(min=dims_tuple(low), opt=dims_tuple(opt), max=dims_tuple(high))
        self._stream = torch.cuda.Stream()

    def _check_machine(self, tensorrt_version: str) -> None:
        _, capability = current_gpu()
        problems = engine_mismatches(self.engine_metadata, self.plan_path, tensorrt_version, capability)
        if problems:
            raise RuntimeError(
                f"{self.plan_path}: engine does not match this machine "
                f"({'; '.join(problems)}); rebuild the engine here: "
                f"noisyseg export engine --onnx {self.engine_metadata.onnx_file} --out {self.plan_path.name}"
            )

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run a batch (N, C, H, W) and return every output by name (numpy, on the host)."""
        import torch

        images = np.asarray(images)
        self.profile.check_within(tuple(images.shape), f"input '{self.input_name}'")
        device_input = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).cuda()
        if not self.context.set_input_shape(self.input_name, tuple(device_input.shape)):
            raise ValueError(f"input '{self.input_name}': TensorRT rejected shape {list(device_input.shape)}")
        self.context.set_tensor_address(self.input_name, device_input.data_ptr())
        outputs: dict[str, torch.Tensor] = {}
        for name in self.output_names:
            shape = dims_tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=torch_dtype(self.engine.get_tensor_dtype(name)), device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        # The input copy ran on torch's current stream; the engine runs on its own stream.
        self._stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError(f"{self.plan_path}: TensorRT execution failed")
        self._stream.synchronize()
        return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}
