"""Reading an ONNX model file (no torch here: the server imports it through `triton_repo`)."""

from __future__ import annotations

from pathlib import Path

import onnx


def load_onnx(path: str | Path, load_external_data: bool = False) -> onnx.ModelProto:
    """The model in `path`; a file that is not ONNX is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ONNX model file")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as err:  # protobuf's DecodeError, or an external-data file that is missing
        raise ValueError(f"{path}: not an ONNX model ({err})") from err
    if not model.graph.node or not model.graph.input:
        # Protobuf parses an empty file (and some other bytes) as an empty model.
        raise ValueError(f"{path}: not an ONNX model (it holds no graph)")
    return model
