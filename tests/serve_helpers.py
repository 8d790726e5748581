"""Shared pieces of the serving tests: small real ONNX models and a server on a loopback port."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import uvicorn
from onnx import TensorProto, helper, numpy_helper

from noisyseg.serve.app import create_app
from noisyseg.serve.commands import uvicorn_config
from noisyseg.serve.runtimes import OnnxRuntimeBackend, Runtime
from noisyseg.serve.settings import ServerSettings

CLASS_NAMES = ["background", "liver", "kidney"]
STRIDE = 2


def write_conv_model(path: Path, output: str = "logits", in_channels: int = 1, seed: int = 0) -> Path:
    """A real ONNX segmentation-shaped model: 3x3 conv to one score map per class.

    `output` "logits" ends at the conv, "labels" adds an ArgMax over classes (int64). The 3x3
    kernel mixes neighbouring pixels, so results depend on each image's own layout: a batcher
    that mixed up images would be caught.
    """
    rng = np.random.default_rng(seed)
    classes = len(CLASS_NAMES)
    weight = numpy_helper.from_array(rng.normal(size=(classes, in_channels, 3, 3)).astype(np.float32), "weight")
    bias = numpy_helper.from_array(rng.normal(size=(classes,)).astype(np.float32), "bias")
    nodes = [helper.make_node("Conv", ["image", "weight", "bias"], ["scores"], pads=[1, 1, 1, 1])]
    if output == "labels":
        nodes.append(helper.make_node("ArgMax", ["scores"], ["labels"], axis=1, keepdims=0))
        graph_output = helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch", "height", "width"])
    else:
        nodes.append(helper.make_node("Identity", ["scores"], [output]))
        graph_output = helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", classes, "height", "width"])
    graph = helper.make_graph(
        nodes,
        "conv_segmenter",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", in_channels, "height", "width"])],
        [graph_output],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"class_names": json.dumps(CLASS_NAMES), "stride": str(STRIDE), "output": output})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def conv_runtime(tmp_path: Path, name: str = "conv", output: str = "logits") -> Runtime:
    path = write_conv_model(tmp_path / f"{name}.onnx", output=output)
    return OnnxRuntimeBackend(path, name=name, intra_op_threads=1).load()


def free_socket() -> socket.socket:
    # proto must be IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only
    # then, and without it every keep-alive request waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ServerThread:
    """uvicorn serving `create_app(runtimes, settings)` on 127.0.0.1 in a background thread."""

    def __init__(self, runtimes: list[Runtime], settings: ServerSettings | None = None) -> None:
        self.settings = settings or ServerSettings()
        self.app = create_app(runtimes, self.settings)
        self.socket = free_socket()
        self.port = self.socket.getsockname()[1]
        config = uvicorn_config(self.app, self.settings, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """host:port, as tritonclient takes it."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.socket.close()
        if self.thread.is_alive():
            raise RuntimeError("test server did not shut down")


@contextlib.contextmanager
def running_server(runtimes: list[Runtime], settings: ServerSettings | None = None) -> Iterator[ServerThread]:
    server = ServerThread(runtimes, settings).start()
    try:
        yield server
    finally:
        server.stop()

