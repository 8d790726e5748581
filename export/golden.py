"""Golden outputs, the Polygraphy way: record on one machine, check on another.

`make_golden` runs an ONNX model with ONNX Runtime on the CPU (the fp32 reference) over sample
inputs and saves inputs, outputs and a description in one `.npz`; `check_golden` runs any model
(`.onnx` through ONNX Runtime, `.plan` through TensorRT) on the saved inputs and compares:
argmax agreement per pixel, max and median abs error, with tolerances chosen by the checked
model's precision. So a CPU machine records what a GPU machine's engine must reproduce.

The `.npz` holds `case<i>.input` and `case<i>.output.<name>` arrays and `meta`, a JSON string:
the ONNX file's SHA-256, its metadata, input/output names, and the versions that produced it.
Everything loads with `allow_pickle=False`.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from noisyseg import __version__
from noisyseg.export.data_inputs import metadata_stride, open_data, shape_batches, source_pairs
from noisyseg.export.onnx_export import sample_images
from noisyseg.export.onnx_file import load_onnx
from noisyseg.export.onnxruntime_runner import OnnxRuntimeRunner
from noisyseg.io import atomic_write_bytes, file_sha256

logger = logging.getLogger(__name__)

META_KEY = "meta"
DEFAULT_BATCH = 2
DEFAULT_SIZE = 256


class Runner(Protocol):
    """What `OnnxRuntimeRunner` and `TensorRTRunner` have in common."""

    input_name: str
    input_shape: list[int | str]
    output_names: list[str]

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria for one precision; errors are relative to max(1, max |golden output|)."""

    max_abs_error: float
    median_abs_error: float
    min_argmax_agreement: float


TOLERANCES = {
    "fp32": Tolerance(max_abs_error=1e-3, median_abs_error=1e-4, min_argmax_agreement=0.999),
    "fp16": Tolerance(max_abs_error=5e-2, median_abs_error=5e-3, min_argmax_agreement=0.995),
    "bf16": Tolerance(max_abs_error=1e-1, median_abs_error=1e-2, min_argmax_agreement=0.99),
    "int8": Tolerance(max_abs_error=5e-1, median_abs_error=5e-2, min_argmax_agreement=0.98),
}


@dataclass
class OutputComparison:
    """One output of the checked model against the golden one, over all cases."""

    name: str
    max_abs_error: float
    median_abs_error: float
    argmax_agreement: float
    scale: float
    tolerance: Tolerance

    @property
    def is_labels(self) -> bool:
        return self.name == "labels"

    @property
    def passed(self) -> bool:
        agreement_ok = self.argmax_agreement >= self.tolerance.min_argmax_agreement
        if self.is_labels:
            return agreement_ok
        return (
            agreement_ok
            and self.max_abs_error <= self.tolerance.max_abs_error * self.scale
            and self.median_abs_error <= self.tolerance.median_abs_error * self.scale
        )

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        agreement = (
            f"argmax agreement {100 * self.argmax_agreement:.4f}% "
            f"(min {100 * self.tolerance.min_argmax_agreement:.2f}%)"
        )
        if self.is_labels:
            return f"{self.name}: {verdict}: {agreement}"
        return (
            f"{self.name}: {verdict}: {agreement}, max abs error {self.max_abs_error:.3g} "
            f"(max {self.tolerance.max_abs_error * self.scale:.3g}), median abs error {self.median_abs_error:.3g} "
            f"(max {self.tolerance.median_abs_error * self.scale:.3g})"
        )


@dataclass
class CheckReport:
    model: str
    precision: str
    cases: int
    outputs: list[OutputComparison]

    @property
    def passed(self) -> bool:
        return all(output.passed for output in self.outputs)

    def describe(self) -> str:
        lines = [
            f"{self.model} ({self.precision}) on {self.cases} golden case(s): {'PASSED' if self.passed else 'FAILED'}"
        ]
        return "\n".join(lines + [f"  {output.describe()}" for output in self.outputs])


def golden_inputs(
    shapes: list[tuple[int, int, int, int]],
    seed: int,
    data_dir: Path | None,
    split: str,
    normalization: str = "zscore",
    stride: int = 1,
    layout: str = "auto",
    layout_options: dict[str, Any] | None = None,
) -> list[np.ndarray]:
    """One input batch per shape: synthetic raw images (in the value range `normalization`
    expects), or the first images of a data split in any layout, raw (the model normalises them):
    consecutive images of one size batched, zero-padded on the bottom and right to `stride`."""
    if data_dir is None:
        return [
            sample_images(shape, seed=seed + index, normalization=normalization) for index, shape in enumerate(shapes)
        ]
    source = open_data(data_dir, split, layout, layout_options)
    batch = shapes[0][0] if shapes else DEFAULT_BATCH
    first = range(min(len(source), batch * max(1, len(shapes))))
    return [chunk.images for chunk in shape_batches(source_pairs(source, first), batch, stride)]


def default_shapes(runner: OnnxRuntimeRunner) -> list[tuple[int, int, int, int]]:
    """Batch 2 at 256 x 256 where the model leaves a dimension free, its own size where fixed."""
    defaults = (DEFAULT_BATCH, 1, DEFAULT_SIZE, DEFAULT_SIZE)
    dims = [
        dim if isinstance(dim, int) and dim > 0 else default
        for dim, default in zip(runner.input_shape, defaults, strict=True)
    ]
    return [(dims[0], dims[1], dims[2], dims[3])]


def make_golden(
    onnx_path: str | Path,
    out: str | Path,
    shapes: list[tuple[int, int, int, int]] | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
    split: str = "test",
    layout: str = "auto",
    layout_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`noisyseg export golden`: save inputs and ONNX Runtime (CPU, fp32) outputs; returns the meta."""
    onnx_path = Path(onnx_path)
    runner = OnnxRuntimeRunner(onnx_path, providers=["CPUExecutionProvider"])
    inputs = golden_inputs(
        shapes or default_shapes(runner),
        seed,
        Path(data_dir) if data_dir else None,
        split,
        runner.metadata.get("normalization", "zscore"),
        metadata_stride(runner.metadata),
        layout,
        layout_options,
    )
    arrays: dict[str, np.ndarray] = {}
    for index, images in enumerate(inputs):
        arrays[f"case{index}.input"] = images
        for name, value in runner.run(images).items():
            arrays[f"case{index}.output.{name}"] = value
    meta = {
        "onnx_file": onnx_path.name,
        "onnx_sha256": file_sha256(onnx_path),
        "model_metadata": runner.metadata,
        "input_name": runner.input_name,
        "output_names": runner.output_names,
        "cases": len(inputs),
        "onnxruntime_version": ort.__version__,
        "noisyseg_version": __version__,
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays, **{META_KEY: np.array(json.dumps(meta))})
    atomic_write_bytes(out, buffer.getvalue())
    logger.info("wrote %s: %d case(s), outputs %s", out, len(inputs), runner.output_names)
    return meta


def load_golden(path: str | Path) -> tuple[dict[str, Any], list[np.ndarray], list[dict[str, np.ndarray]]]:
    """(meta, inputs per case, outputs per case) of a golden file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no golden file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a noisyseg golden file (not an .npz archive: {err})") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path}: not a noisyseg golden file (a single .npy array, expected the .npz that `export golden` writes)"
        )
    try:
        with archive:
            meta = json.loads(str(archive[META_KEY]))
            inputs = [archive[f"case{i}.input"] for i in range(meta["cases"])]
            outputs = [
                {name: archive[f"case{i}.output.{name}"] for name in meta["output_names"]} for i in range(meta["cases"])
            ]
    except (
        KeyError,
        TypeError,
        ValueError,
        OSError,
        EOFError,
        zipfile.BadZipFile,
    ) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not a noisyseg golden file ({err})") from err
    return meta, inputs, outputs


def open_runner(model_path: Path) -> tuple[Runner, str]:
    """The runner for a model file and its precision (.onnx: int8 if it holds Q/DQ, else fp32)."""
    if model_path.suffix in (".plan", ".engine"):
        from noisyseg.export.tensorrt_engine import TensorRTRunner

        engine_runner = TensorRTRunner(model_path)
        return engine_runner, engine_runner.engine_metadata.precision
    if model_path.suffix == ".onnx":
        from noisyseg.export.tensorrt_engine import is_quantized

        quantized = is_quantized(load_onnx(model_path))
        return OnnxRuntimeRunner(model_path), "int8" if quantized else "fp32"
    raise ValueError(f"{model_path}: expected a .onnx model or a TensorRT .plan")


def compare_output(
    name: str, golden: list[np.ndarray], actual: list[np.ndarray], tolerance: Tolerance
) -> OutputComparison:
    """Pool all cases of one output and measure agreement and errors."""
    matching, pixels, errors = 0, 0, []
    for expected, got in zip(golden, actual, strict=True):
        if expected.shape != got.shape:
            raise ValueError(f"output '{name}': shape {list(got.shape)} differs from the golden {list(expected.shape)}")
        if name == "labels":
            agree = expected == got
        else:
            agree = np.argmax(expected, axis=1) == np.argmax(got, axis=1)
            errors.append(np.abs(expected.astype(np.float64) - got.astype(np.float64)).ravel())
        matching += int(agree.sum())
        pixels += agree.size
    all_errors = np.concatenate(errors) if errors else np.zeros(1)
    scale = max(1.0, max(float(np.max(np.abs(expected), initial=0.0)) for expected in golden))
    return OutputComparison(
        name=name,
        max_abs_error=float(all_errors.max()),
        median_abs_error=float(np.median(all_errors)),
        argmax_agreement=matching / max(pixels, 1),
        scale=scale if name != "labels" else 1.0,
        tolerance=tolerance,
    )


def check_golden(model_path: str | Path, golden_path: str | Path, precision: str | None = None) -> CheckReport:
    """`noisyseg export check`: run `model_path` on the golden inputs and compare its outputs."""
    model_path = Path(model_path)
    meta, inputs, golden_outputs = load_golden(golden_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: no model file")
    runner, detected_precision = open_runner(model_path)
    precision = precision or detected_precision
    if precision not in TOLERANCES:
        raise ValueError(f"precision '{precision}' has no tolerances (known: {', '.join(TOLERANCES)})")
    missing = [name for name in meta["output_names"] if name not in runner.output_names]
    if missing:
        raise ValueError(
            f"{model_path}: has outputs {runner.output_names}, the golden file expects {meta['output_names']}"
        )
    actual = [runner.run(images) for images in inputs]
    comparisons = [
        compare_output(
            name, [case[name] for case in golden_outputs], [case[name] for case in actual], TOLERANCES[precision]
        )
        for name in meta["output_names"]
    ]
    if model_path.suffix == ".onnx" and file_sha256(model_path) != meta["onnx_sha256"]:
        logger.info(
            "%s differs from the golden's model %s (expected for a quantised model)", model_path.name, meta["onnx_file"]
        )
    return CheckReport(model=model_path.name, precision=precision, cases=len(inputs), outputs=comparisons)
