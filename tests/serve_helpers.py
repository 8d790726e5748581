"""Shared pieces of the serving tests: small real ONNX runtimes and a server on a loopback port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from noisyseg.commands.serve import uvicorn_config
from noisyseg.serve.app import create_app
from noisyseg.serve.loadgen import CLASS_NAMES as CLASS_NAMES
from noisyseg.serve.loadgen import STRIDE as STRIDE
from noisyseg.serve.loadgen import write_conv_model
from noisyseg.serve.runtimes import OnnxRuntimeBackend, Runtime
from noisyseg.serve.settings import ServerSettings


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
