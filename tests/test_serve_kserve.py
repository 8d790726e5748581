"""KServe's Python SDK v2 clients (`InferenceRESTClient`, `InferenceGRPCClient`) against
`noisyseg serve`: answers equal ONNX Runtime run directly on the same model.

The clients run in a child process (`kserve_clients.py`): KServe's protobuf messages cannot be
imported next to tritonclient.grpc's, which other serving tests use.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.special import softmax
from serve_helpers import write_conv_model

from noisyseg.export.onnxruntime_runner import OnnxRuntimeRunner
from noisyseg.serve.loadgen import ServerProcess

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("kserve") is None,
    reason="kserve is not installed (the `clients` extra: pip install -e '.[clients]'; make install includes it)",
)
CLIENTS = Path(__file__).with_name("kserve_clients.py")


def test_kserve_rest_and_grpc_clients_get_onnx_runtime_results(tmp_path: Path) -> None:
    model = write_conv_model(tmp_path / "conv.onnx")
    images = np.random.default_rng(3).normal(size=(2, 1, 8, 10)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    server = ServerProcess(model, "--threads", "1").wait_until_ready()
    try:
        run = subprocess.run(
            [
                sys.executable,
                str(CLIENTS),
                f"http://{server.address}",
                server.grpc_address,
                "conv",
                str(tmp_path / "images.npy"),
                str(tmp_path / "answers.npz"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.kill()
    assert run.returncode == 0, run.stderr[-3000:]
    answers = dict(np.load(tmp_path / "answers.npz"))
    logits = OnnxRuntimeRunner(model).run(images)["logits"]
    ways = ["rest-binary", "rest-json", "grpc-raw", "grpc-contents"]
    assert sorted(answers) == sorted(f"{way}.{out}" for way in ways for out in ("logits", "probs", "labels"))
    for way in ways:
        np.testing.assert_allclose(answers[f"{way}.logits"], logits, rtol=1e-6, atol=1e-6, err_msg=way)
        np.testing.assert_allclose(answers[f"{way}.probs"], softmax(logits, axis=1), rtol=1e-5, atol=1e-7, err_msg=way)
        np.testing.assert_array_equal(answers[f"{way}.labels"], logits.argmax(axis=1), err_msg=way)
