"""A model repository NVIDIA Triton Inference Server serves as it is.

```
REPO/<name>/config.pbtxt
REPO/<name>/1/model.onnx     (platform onnxruntime_onnx)   or
REPO/<name>/1/model.plan     (platform tensorrt_plan, with --engine)
```

`config.pbtxt` declares the platform, `max_batch_size` (> 0, so every `dims` leaves out the batch
dimension), the input and outputs read from the ONNX graph (variable dimensions as -1), dynamic
batching, the (non-decoupled) transaction policy, and the model's metadata (class names,
normalisation, ...) as `parameters`, so a Triton client can read them from the model
configuration. The text is written here by hand (the server needs no Python); the tests parse
it with Triton's own protobuf schema.

`TritonModelConfig` is the one description of that configuration: `to_pbtxt()` is the file,
`to_json()` is what `noisyseg serve` returns for Triton's model-configuration extension
(`GET /v2/models/{name}/config`, gRPC ModelConfig), so both say the same.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from noisyseg.export.onnx_file import load_onnx
from noisyseg.io import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

VERSION_DIR = "1"
# ONNX element types -> Triton data types (model_config.proto DataType).
TRITON_DATA_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}


@dataclass
class TritonTensor:
    name: str
    data_type: str
    dims: list[int]  # without the batch dimension; -1 = variable


@dataclass
class TritonRepoConfig:
    """Options of `noisyseg export triton-repo`."""

    model_name: str | None = None  # default: the ONNX file's stem
    max_batch_size: int = 8
    max_queue_delay_microseconds: int = 100


def triton_tensors(values: list[onnx.ValueInfoProto], what: str) -> list[TritonTensor]:
    """Triton tensor descriptions of graph inputs or outputs (batch dimension removed)."""
    tensors = []
    for value in values:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type not in TRITON_DATA_TYPES:
            raise ValueError(
                f"{what} '{value.name}': element type "
                f"{onnx.TensorProto.DataType.Name(tensor_type.elem_type)} has no Triton equivalent"
            )
        dims = [dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor_type.shape.dim]
        if not dims or dims[0] != -1:
            raise ValueError(
                f"{what} '{value.name}': shape {dims} has no dynamic batch dimension; re-export without a fixed batch"
            )
        tensors.append(TritonTensor(value.name, TRITON_DATA_TYPES[tensor_type.elem_type], dims[1:]))
    return tensors


def triton_data_type(datatype: str) -> str:
    """Triton's model-configuration type for an Open Inference Protocol datatype (FP32 -> TYPE_FP32)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


@dataclass
class TritonModelConfig:
    """A model's Triton configuration: the fields `config.pbtxt` holds (model_config.proto)."""

    name: str
    platform: str
    max_batch_size: int
    inputs: list[TritonTensor]
    outputs: list[TritonTensor]
    # The model's metadata, as string-valued `parameters`.
    parameters: dict[str, str]
    max_queue_delay_microseconds: int

    def to_json(self) -> dict[str, Any]:
        """The configuration in Triton's JSON form (model_config.proto field names)."""
        return {
            "name": self.name,
            "platform": self.platform,
            "max_batch_size": self.max_batch_size,
            "input": [_tensor_json(tensor) for tensor in self.inputs],
            "output": [_tensor_json(tensor) for tensor in self.outputs],
            "dynamic_batching": {
                "preferred_batch_size": [self.max_batch_size],
                "max_queue_delay_microseconds": self.max_queue_delay_microseconds,
            },
            "model_transaction_policy": {"decoupled": False},
            "parameters": {key: {"string_value": value} for key, value in sorted(self.parameters.items())},
        }

    def to_pbtxt(self) -> str:
        """The text of `config.pbtxt` (protobuf text format)."""
        parameters = "\n".join(
            f"parameters {{\n  key: {_quote(key)}\n  value {{ string_value: {_quote(value)} }}\n}}"
            for key, value in sorted(self.parameters.items())
        )
        return (
            f'name: "{self.name}"\nplatform: "{self.platform}"\nmax_batch_size: {self.max_batch_size}\n'
            f"input [\n{','.join(_tensor_block(t) for t in self.inputs)}\n]\n"
            f"output [\n{','.join(_tensor_block(t) for t in self.outputs)}\n]\n"
            f"dynamic_batching {{\n  preferred_batch_size: [ {self.max_batch_size} ]\n"
            f"  max_queue_delay_microseconds: {self.max_queue_delay_microseconds}\n}}\n"
            f"model_transaction_policy {{\n  decoupled: false\n}}\n"
            f"{parameters}\n"
        )


def _tensor_json(tensor: TritonTensor) -> dict[str, Any]:
    return {"name": tensor.name, "data_type": tensor.data_type, "dims": list(tensor.dims)}


def _tensor_block(tensor: TritonTensor) -> str:
    dims = ", ".join(str(dim) for dim in tensor.dims)
    return f'  {{\n    name: "{tensor.name}"\n    data_type: {tensor.data_type}\n    dims: [ {dims} ]\n  }}'


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    return json.dumps(text)  # JSON escaping is valid text-format escaping for these strings


def check_engine_batch(engine: Path, max_batch_size: int) -> None:
    """A plan's profile must allow Triton's largest batch."""
    from noisyseg.export.tensorrt_engine import read_engine_metadata

    largest = max(profile["max"][0] for profile in read_engine_metadata(engine).profiles)
    if max_batch_size > largest:
        raise ValueError(
            f"{engine}: engine profile allows batches up to {largest}; --max-batch-size {max_batch_size} exceeds it"
        )


def model_name_from(path: Path) -> str:
    """A Triton-safe model name from a file name (letters, digits, '_', '-', '.')."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", path.name.split(".")[0]) or "model"


def make_triton_repo(
    onnx_path: str | Path, out: str | Path, engine: str | Path | None = None, config: TritonRepoConfig | None = None
) -> Path:
    """`noisyseg export triton-repo`: write the model directory; returns the config.pbtxt path."""
    # Imported here as onnx_export loads torch; the server imports this module for model_name_from.
    from noisyseg.export.onnx_export import read_metadata

    config = config or TritonRepoConfig()
    onnx_path, out = Path(onnx_path), Path(out)
    if config.max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be at least 1, got {config.max_batch_size}")
    model = load_onnx(onnx_path)
    initializers = {init.name for init in model.graph.initializer}
    inputs = triton_tensors([v for v in model.graph.input if v.name not in initializers], "input")
    outputs = triton_tensors(list(model.graph.output), "output")
    name = config.model_name or model_name_from(onnx_path)
    model_dir = out / name
    if engine is not None:
        engine = Path(engine)
        if not engine.is_file():
            raise FileNotFoundError(f"{engine}: no TensorRT plan file")
        check_engine_batch(engine, config.max_batch_size)
        platform, source, filename = "tensorrt_plan", engine, "model.plan"
    else:
        platform, source, filename = "onnxruntime_onnx", onnx_path, "model.onnx"
    text = TritonModelConfig(
        name,
        platform,
        config.max_batch_size,
        inputs,
        outputs,
        read_metadata(model),
        config.max_queue_delay_microseconds,
    ).to_pbtxt()
    # The model file first: a config without its model would make the server fail to load it.
    atomic_write_bytes(model_dir / VERSION_DIR / filename, source.read_bytes())
    atomic_write_text(model_dir / "config.pbtxt", text)
    logger.info("wrote Triton model '%s' (%s) to %s", name, platform, model_dir)
    return model_dir / "config.pbtxt"
