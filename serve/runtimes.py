"""Model runtimes: one class per backend behind one interface (load, metadata, infer on a batch).

Every backend runs a noisyseg model whose input is the raw image batch (float32 N x C x H x W,
normalisation inside the model) and whose native output is one of `logits`, `probs` or
`labels`. The base class offers clients every output derivable from the native one: from logits
it computes probs (softmax over classes) and labels (argmax); from probs, labels; a model that
outputs only labels offers only labels.

Backends: ONNX Runtime (`.onnx`, the default), TensorRT (`.plan`, needs the `gpu` extra) and a
PyTorch checkpoint (a training run directory or `.safetensors` file), plus the model repository
written by `noisyseg export triton-repo`, served one runtime per model.
"""

from __future__ import annotations

import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from noisyseg.serve.protocol import PlannedOutput, datatype_of

logger = logging.getLogger(__name__)

OUTPUT_NAMES = ("logits", "probs", "labels")
# Batches larger than this (one 1024 x 1024 float32 image) end with ONNX Runtime's arena shrunk.
SHRINK_ARENA_ABOVE_BYTES = 4 * 2**20
# What each native output lets the server offer.
DERIVABLE_OUTPUTS = {
    "logits": ("logits", "probs", "labels"),
    "probs": ("probs", "labels"),
    "labels": ("labels",),
}
# ONNX ArgMax yields int64, so derived labels match a graph that ends in ArgMax.
LABELS_DTYPE = np.dtype(np.int64)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as model metadata describes it; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    """Softmax over `axis` in the logits' precision, stable for large logits."""
    shifted = logits - logits.max(axis=axis, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=axis, keepdims=True)
    return shifted


def derive_outputs(native: Mapping[str, np.ndarray], wanted: frozenset[str]) -> dict[str, np.ndarray]:
    """The `wanted` outputs, computed from the model's native one where the model lacks them."""
    result = {name: native[name] for name in wanted if name in native}
    missing = wanted - result.keys()
    if not missing:
        return result
    if "probs" in missing:
        if "logits" not in native:
            raise ValueError("probs were requested but the model outputs neither probs nor logits")
        result["probs"] = softmax(native["logits"].astype(np.float32, copy=True))
    if "labels" in missing:
        scores = native.get("logits", native.get("probs"))
        if scores is None:
            raise ValueError("labels were requested but the model outputs neither labels, logits nor probs")
        result["labels"] = scores.argmax(axis=1).astype(LABELS_DTYPE)
    if "logits" in missing:
        raise ValueError("logits were requested but the model does not output logits")
    return result


def _dimension(value: object) -> int:
    """A model dimension for metadata: named or unknown dimensions are variable (-1)."""
    return value if isinstance(value, int) and value > 0 else -1


class Runtime(ABC):
    """One loaded model: its protocol metadata and batched inference."""

    platform: ClassVar[str]
    backend: ClassVar[str]
    # Backends that hand the batch to torch.from_numpy, which wants a writeable array: a request's
    # tensor is a read-only view of its gRPC message, copied only for them.
    needs_writeable_input: ClassVar[bool] = False

    def __init__(self, path: str | Path, name: str, version: str = "1") -> None:
        self.path = Path(path)
        self.name = name
        self.version = version
        self.input_name = "images"
        # (N, C, H, W) with -1 for variable dimensions.
        self.input_shape: tuple[int, ...] = (-1, -1, -1, -1)
        self.native_output = "logits"
        self.class_names: list[str] = []
        # Smallest height and width the network accepts (its downsampling factor).
        self.min_spatial_size = 1
        self.labels_dtype = LABELS_DTYPE
        # Largest batch the model itself takes (None: no limit of its own).
        self.max_batch_size: int | None = None
        # The model's own batching delay, from its repository config (None: the server's).
        self.max_queue_delay_ms: float | None = None
        # What the exported model records about itself (export's metadata_props), as strings.
        self.model_metadata: dict[str, str] = {}
        self._loaded = False

    @abstractmethod
    def _load(self) -> None:
        """Open the model and fill in `input_name`, `input_shape`, `native_output`, `class_names`."""

    @abstractmethod
    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run a float32 batch (N, C, H, W); return the native output(s) by name."""

    def load(self) -> Runtime:
        """Open the model (once); returns self so `Backend(...).load()` reads naturally."""
        if not self._loaded:
            self._load()
            if self.native_output not in DERIVABLE_OUTPUTS:
                raise ValueError(
                    f"{self.path}: model output '{self.native_output}' is not one of {', '.join(OUTPUT_NAMES)}"
                )
            self._loaded = True
            logger.info(
                "model %s (version %s): %s backend, input %s %s, outputs %s, checkpoint %s",
                self.name,
                self.version,
                self.backend,
                self.input_name,
                list(self.input_shape),
                self.output_names,
                self.model_metadata.get("checkpoint", "not recorded"),
            )
        return self

    @property
    def output_names(self) -> tuple[str, ...]:
        return DERIVABLE_OUTPUTS[self.native_output]

    @property
    def num_classes(self) -> int:
        return len(self.class_names) or -1

    def input_spec(self) -> TensorSpec:
        return TensorSpec(self.input_name, "FP32", self.input_shape)

    def output_specs(self, input_shape: tuple[int, ...] | None = None) -> list[TensorSpec]:
        """Every output offered, shaped for a batch of `input_shape` (default: the model's input, -1
        for variable dimensions); the number of classes is -1 when the model does not say."""
        batch, _, height, width = input_shape or self.input_shape
        scores_shape = (batch, self.num_classes, height, width)
        specs = {
            "logits": TensorSpec("logits", "FP32", scores_shape),
            "probs": TensorSpec("probs", "FP32", scores_shape),
            "labels": TensorSpec("labels", datatype_of(self.labels_dtype), (batch, height, width)),
        }
        return [specs[name] for name in self.output_names]

    def planned_outputs(
        self, input_shape: tuple[int, ...], names: Sequence[str], binary: Callable[[str], bool]
    ) -> list[PlannedOutput]:
        """The outputs `names` of a batch of `input_shape`, as the response will carry them (`binary`
        says which go as raw bytes), known before the batch runs."""
        specs = {spec.name: spec for spec in self.output_specs(input_shape)}
        # Labels are class indices.
        largest = self.num_classes - 1 if self.num_classes > 0 else None
        return [
            PlannedOutput(
                name, specs[name].datatype, specs[name].shape, binary(name), largest if name == "labels" else None
            )
            for name in names
        ]

    def metadata(self) -> dict[str, Any]:
        """The protocol's model metadata response."""
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": self.platform,
            "inputs": [self.input_spec().to_json()],
            "outputs": [spec.to_json() for spec in self.output_specs()],
            "parameters": {"class_names": json.dumps(self.class_names), "backend": self.backend},
        }

    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        """Raise ValueError if the backend cannot run a batch of `shape` (beyond the metadata)."""
        # Most backends take any shape the metadata allows; TensorRT has profile bounds.
        return None

    def infer(self, images: np.ndarray, outputs: frozenset[str]) -> dict[str, np.ndarray]:
        """Run a batch and return the requested outputs (any of `output_names`)."""
        if self.needs_writeable_input and not images.flags.writeable:
            images = images.copy()
        return derive_outputs(self._run(images), outputs)


def _class_names_from_metadata(metadata: Mapping[str, str]) -> list[str]:
    raw = metadata.get("class_names")
    if raw is None:
        return []
    try:
        names = json.loads(raw)
    except json.JSONDecodeError:
        return [name.strip() for name in raw.split(",") if name.strip()]
    return [str(name) for name in names] if isinstance(names, list) else []


def _positive_int(raw: str | None, default: int) -> int:
    try:
        value = int(raw) if raw is not None else default
    except ValueError:
        return default
    return value if value > 0 else default


class _RunnerRuntime(Runtime):
    """A backend over one of export's runners (`.input_name`, `.input_shape`, `.output_names`, `.run`)."""

    runner: Any

    def _adopt_runner(self, runner: Any, metadata: Mapping[str, str]) -> None:
        self.runner = runner
        self.input_name = runner.input_name
        self.input_shape = tuple(_dimension(dim) for dim in runner.input_shape)
        if len(self.input_shape) != 4:
            raise ValueError(f"{self.path}: model input must be N x C x H x W, got shape {list(runner.input_shape)}")
        known = [name for name in runner.output_names if name in OUTPUT_NAMES]
        if not known:
            raise ValueError(
                f"{self.path}: model outputs {list(runner.output_names)}; expected one of {', '.join(OUTPUT_NAMES)}"
            )
        # The richest output wins if a graph has several (logits give all three).
        self.native_output = min(known, key=OUTPUT_NAMES.index)
        self.class_names = _class_names_from_metadata(metadata)
        self.min_spatial_size = _positive_int(metadata.get("stride"), default=1)
        self.model_metadata = dict(metadata)

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return self.runner.run(images)


class OnnxRuntimeBackend(_RunnerRuntime):
    """An exported `.onnx` model on ONNX Runtime (CPU by default)."""

    platform = "onnxruntime_onnx"
    backend = "onnxruntime"

    def __init__(self, path: str | Path, name: str, version: str = "1", intra_op_threads: int | None = None) -> None:
        super().__init__(path, name, version)
        self.intra_op_threads = intra_op_threads

    def _load(self) -> None:
        from noisyseg.export.onnxruntime_runner import OnnxRuntimeRunner

        # No thread spinning: ONNX Runtime's intra-op threads otherwise spin after each run
        # waiting for the next, taking the cores from the event loop that parses, batches and
        # answers requests (measured on 2 cores: about 45% more throughput with spinning off).
        # Arena shrunk after large inputs: it would keep the buffers of the largest image ever served.
        runner = OnnxRuntimeRunner(
            self.path,
            intra_op_threads=self.intra_op_threads,
            allow_spinning=False,
            shrink_arena_above_bytes=SHRINK_ARENA_ABOVE_BYTES,
        )
        self._adopt_runner(runner, runner.metadata)
        # The arena never gives back its first region, which is as large as the first run needs:
        # a first run on the smallest image keeps it small whatever the first request.
        _, channels, height, width = self.input_shape
        side = self.min_spatial_size
        runner.run(
            np.zeros((1, max(channels, 1), height if height > 0 else side, width if width > 0 else side), np.float32)
        )


class PyTorchBackend(Runtime):
    """A training checkpoint (run directory or `.safetensors`), wrapped exactly as export wraps it,
    on `device` (`cpu`, `auto`, `cuda` or `cuda:N`)."""

    platform = "pytorch_libtorch"
    backend = "pytorch"
    needs_writeable_input = True

    def __init__(self, path: str | Path, name: str, version: str = "1", device: str = "cpu") -> None:
        super().__init__(path, name, version)
        self.device_name = device

    def _load(self) -> None:
        from noisyseg.export.onnx_export import (
            INPUT_NAME,
            DeployableSegmenter,
            model_metadata,
            model_stride,
        )
        from noisyseg.io import file_sha256
        from noisyseg.models.model_file import load_model
        from noisyseg.run.run_dir import resolve_model_file
        from noisyseg.runtime.device import resolve_device

        self.device = resolve_device(self.device_name, field="--device")
        model_file = resolve_model_file(self.path)
        model, info = load_model(model_file)
        self.module = DeployableSegmenter(model, info.normalization, output="logits").eval().to(self.device)
        self.native_output = "logits"
        self.class_names = list(info.class_names)
        self.input_name = INPUT_NAME
        self.input_shape = (-1, info.in_channels, -1, -1)
        self.min_spatial_size = model_stride(model)
        # What `export onnx` would record for this checkpoint.
        checkpoint = file_sha256(model_file)
        self.model_metadata = model_metadata(info, self.native_output, checkpoint, self.min_spatial_size)

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            output = self.module(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device))
        return {self.native_output: output.cpu().numpy()}


class TensorRTBackend(_RunnerRuntime):
    """A TensorRT plan built by `noisyseg export engine` (needs the `gpu` extra and a GPU)."""

    platform = "tensorrt_plan"
    backend = "tensorrt"
    needs_writeable_input = True

    def _load(self) -> None:
        from noisyseg.export.tensorrt_engine import TensorRTRunner, require_tensorrt

        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no TensorRT plan file")
        # Checked first, so a machine without TensorRT hears which extra to install.
        require_tensorrt()
        runner = TensorRTRunner(self.path)
        self._adopt_runner(runner, runner.metadata)
        self.max_batch_size = int(runner.profile.max[0])

    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        # Each request is checked at batch 1; the batcher keeps batches within max_batch_size.
        self.runner.profile.check_within((1, *shape[1:]), f"input '{self.input_name}'")


BACKENDS_BY_SUFFIX: dict[str, type[Runtime]] = {
    ".onnx": OnnxRuntimeBackend,
    ".plan": TensorRTBackend,
    ".engine": TensorRTBackend,
    ".safetensors": PyTorchBackend,
}
REPOSITORY_CONFIG = "config.pbtxt"
REPOSITORY_MODEL_FILES = ("model.onnx", "model.plan")


def open_runtimes(
    path: str | Path, name: str | None = None, intra_op_threads: int | None = None, device: str = "cpu"
) -> list[Runtime]:
    """Load what `path` holds: an ONNX model, a TensorRT plan, a PyTorch checkpoint (file or run
    directory, run on `device`) or a Triton model repository (every model in it). `name` renames
    a single model.
    """
    from noisyseg.export.triton_repo import model_name_from
    from noisyseg.run.run_dir import MODEL_FILE, RunDir

    path = Path(path)
    if path.is_dir() and RunDir(path).model_file.is_file():
        return [PyTorchBackend(path, name or model_name_from(path.resolve()), device=device).load()]
    if path.is_dir():
        if name is not None:
            raise ValueError(
                f"{path}: --name renames a single model, but a model repository serves each model under its own name"
            )
        return [runtime.load() for runtime in repository_runtimes(path, intra_op_threads)]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file or directory")
    backend = BACKENDS_BY_SUFFIX.get(path.suffix.lower())
    if backend is None:
        raise ValueError(
            f"{path}: unknown model type '{path.suffix}'; expected {', '.join(BACKENDS_BY_SUFFIX)}, "
            f"a run directory holding {MODEL_FILE}, or a model repository"
        )
    return [_create(backend, path, name or model_name_from(path), "1", intra_op_threads, device).load()]


def _create(
    backend: type[Runtime], path: Path, name: str, version: str, intra_op_threads: int | None, device: str = "cpu"
) -> Runtime:
    if issubclass(backend, OnnxRuntimeBackend):
        return backend(path, name, version, intra_op_threads=intra_op_threads)
    if issubclass(backend, PyTorchBackend):
        return backend(path, name, version, device=device)
    return backend(path, name, version)


def repository_runtimes(repository: Path, intra_op_threads: int | None = None) -> list[Runtime]:
    """One (unloaded) runtime per model of a Triton model repository, at its latest version."""
    model_dirs = sorted(child for child in repository.iterdir() if (child / REPOSITORY_CONFIG).is_file())
    if not model_dirs:
        raise FileNotFoundError(
            f"{repository}: not a model repository (no <model>/{REPOSITORY_CONFIG}) and no run directory"
        )
    return [_repository_model(model_dir, intra_op_threads) for model_dir in model_dirs]


def _repository_model(model_dir: Path, intra_op_threads: int | None) -> Runtime:
    versions = sorted(
        (int(child.name), child) for child in model_dir.iterdir() if child.is_dir() and child.name.isdigit()
    )
    # Triton's default version policy: serve the latest version.
    for version, version_dir in reversed(versions):
        for filename in REPOSITORY_MODEL_FILES:
            if (version_dir / filename).is_file():
                backend = BACKENDS_BY_SUFFIX[Path(filename).suffix]
                runtime = _create(backend, version_dir / filename, model_dir.name, str(version), intra_op_threads)
                _apply_repository_config(runtime, (model_dir / REPOSITORY_CONFIG).read_text(encoding="utf-8"))
                return runtime
    raise FileNotFoundError(f"{model_dir}: no <version>/{' or '.join(REPOSITORY_MODEL_FILES)} in this repository model")


def _apply_repository_config(runtime: Runtime, config_text: str) -> None:
    """Take the batching settings of a `config.pbtxt` (protobuf text) for this model.

    Only two scalar fields matter to this server, so they are read directly rather than through
    Triton's protobuf schema (which ships only with `tritonclient[grpc]`).
    """
    max_batch = re.search(r"^\s*max_batch_size\s*:\s*(\d+)", config_text, re.MULTILINE)
    if max_batch is not None and int(max_batch.group(1)) > 0:
        runtime.max_batch_size = int(max_batch.group(1))
    delay = re.search(r"max_queue_delay_microseconds\s*:\s*(\d+)", config_text)
    if delay is not None:
        runtime.max_queue_delay_ms = int(delay.group(1)) / 1000.0
