"""ONNX Runtime inference for exported noisyseg models (used by the demo, the server, benchmarks).

`OnnxRuntimeRunner(model_path).run(images)` takes a float32 batch (N, C, H, W) of raw pixels (the
exported graph normalises them itself) and returns the graph's outputs by name. Session options
are chosen for throughput on one request stream: full graph optimisation, sequential execution,
intra-op threads from the machine. The CPU provider is the default; the CUDA and TensorRT
execution providers are used, best first, when the installed onnxruntime build has them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

logger = logging.getLogger(__name__)

# Best first: ORT assigns each node to the first listed provider that can run it.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def default_providers() -> list[str]:
    """The accelerated providers this onnxruntime build offers, best first, then the CPU."""
    available = set(ort.get_available_providers())
    return [name for name in PREFERRED_PROVIDERS if name in available]


def session_options(intra_op_threads: int | None = None, allow_spinning: bool = True) -> ort.SessionOptions:
    """Options for low latency on one stream of requests.

    `allow_spinning=False` stops the intra-op threads busy-waiting after each run: a loop of
    back-to-back calls profits from spinning, a server whose event loop shares the cores does not.
    """
    options = ort.SessionOptions()
    if not allow_spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads or os.cpu_count() or 1
    # Operators run one after another, so a second pool would only compete for the cores.
    options.inter_op_num_threads = 1
    return options


class OnnxRuntimeRunner:
    """One ONNX Runtime session over an exported model, with its metadata and I/O names.

    `model_path` is an .onnx file (or its serialised bytes); `providers` defaults to
    `default_providers()`; `intra_op_threads` defaults to `os.cpu_count()`; `allow_spinning`
    as in `session_options`. A run whose input is larger than `shrink_arena_above_bytes` gives
    the host memory arena's unused buffers back when it ends: the arena otherwise keeps what its
    largest input needed for the session's lifetime (a server's hundreds of MiB after one large
    image), while smaller runs keep reusing it (turning the arena off cost a UNet about 20%).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | bytes,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        allow_spinning: bool = True,
        shrink_arena_above_bytes: int | None = None,
    ) -> None:
        # Serialised bytes are accepted so a model can be checked before it is written.
        model_source: str | bytes
        if isinstance(model_path, bytes):
            self.model_path, model_source = Path("<in-memory model>"), model_path
        else:
            self.model_path = Path(model_path)
            if not self.model_path.is_file():
                raise FileNotFoundError(f"{self.model_path}: no ONNX model file")
            model_source = str(self.model_path)
        requested = list(providers) if providers is not None else default_providers()
        unknown = [name for name in requested if name not in ort.get_available_providers()]
        if unknown:
            raise ValueError(
                f"execution providers {unknown} are not available in this onnxruntime build "
                f"(available: {ort.get_available_providers()})"
            )
        try:
            self.session = ort.InferenceSession(
                model_source, sess_options=session_options(intra_op_threads, allow_spinning), providers=requested
            )
        except Exception as err:  # onnxruntime raises its own exception types for unreadable models
            raise ValueError(f"{self.model_path}: ONNX Runtime cannot load the model ({err})") from err
        model_input = self.session.get_inputs()[0]
        self.input_name: str = model_input.name
        self.input_shape: list[int | str] = list(model_input.shape)
        self.output_names: list[str] = [output.name for output in self.session.get_outputs()]
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.providers: list[str] = list(self.session.get_providers())
        self.shrink_arena_above_bytes = shrink_arena_above_bytes
        self._shrink_arena = ort.RunOptions()
        # The host arena only: device memory is the device's own to manage.
        self._shrink_arena.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        logger.info("%s: ONNX Runtime session on %s", self.model_path.name, ", ".join(self.providers))

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run a batch (N, C, H, W) and return every output of the graph by name."""
        batch = self._checked_input(images)
        large = self.shrink_arena_above_bytes is not None and batch.nbytes > self.shrink_arena_above_bytes
        outputs = self.session.run(self.output_names, {self.input_name: batch}, self._shrink_arena if large else None)
        return dict(zip(self.output_names, outputs, strict=True))

    def _checked_input(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != len(self.input_shape):
            raise ValueError(
                f"input '{self.input_name}': expected {len(self.input_shape)} dimensions "
                f"{self.input_shape}, got shape {list(images.shape)}"
            )
        for axis, (expected, actual) in enumerate(zip(self.input_shape, images.shape, strict=True)):
            if isinstance(expected, int) and expected != actual:
                raise ValueError(
                    f"input '{self.input_name}': dimension {axis} must be {expected} "
                    f"(model shape {self.input_shape}), got shape {list(images.shape)}"
                )
        return np.ascontiguousarray(images, dtype=np.float32)
