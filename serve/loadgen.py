"""Load-testing tools for the server (used by the load test and the benchmark).

`run_load(host, port, model, images, concurrency)` keeps `concurrency` keep-alive connections
busy, each sending one request at a time in the binary tensor format, and records every
request's latency and status. It speaks plain HTTP/1.1 over asyncio streams, so the client
costs little CPU next to the server it measures. `ServerProcess` starts `noisyseg serve` in its
own process, as a user would (HTTP and gRPC, each on a free port), and reads its memory use.
`write_conv_model` writes a tiny real ONNX segmenter, so the server's own costs are what a test
or benchmark sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from noisyseg.serve.protocol import HEADER_LENGTH_HEADER

# The classes and stride `write_conv_model` records in its model's metadata.
CLASS_NAMES = ["background", "liver", "kidney"]
STRIDE = 2


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def header_length(self) -> int | None:
        value = self.headers.get(HEADER_LENGTH_HEADER.lower())
        return int(value) if value is not None else None


@dataclass
class LoadResult:
    seconds: float
    latencies_s: list[float]
    replies: list[Reply | None] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.latencies_s)

    @property
    def throughput(self) -> float:
        """Requests per second over the whole run."""
        return self.requests / self.seconds

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.latencies_s), q) * 1000.0)

    def errors(self) -> list[str]:
        return [
            f"request {i}: HTTP {r.status} {r.body[:200]!r}"
            for i, r in enumerate(self.replies)
            if r and r.status != 200
        ]


def binary_infer_body(image_batch: np.ndarray, outputs: Sequence[str], input_name: str = "image") -> tuple[bytes, int]:
    """A binary-extension infer request for one FP32 batch; returns the body and its JSON length."""
    raw = np.ascontiguousarray(image_batch, dtype="<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": input_name,
                    "shape": list(image_batch.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in outputs],
        }
    ).encode()
    return header + raw, len(header)


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> Reply:
    writer.write(request)
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("server closed the connection")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Reply(status, headers, body)


async def run_load(
    host: str,
    port: int,
    model: str,
    images: Sequence[np.ndarray],
    concurrency: int,
    outputs: Sequence[str] = ("labels",),
    keep_replies: bool = False,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """Send one request per item of `images` (each N x C x H x W) with `concurrency` in flight."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    requests: list[bytes] = []
    for batch in images:
        body, json_length = binary_infer_body(batch, outputs)
        head = (
            f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n"
            f"{HEADER_LENGTH_HEADER}: {json_length}\r\n{extra}\r\n"
        )
        requests.append(head.encode() + body)
    latencies = [0.0] * len(requests)
    replies: list[Reply | None] = [None] * len(requests)
    next_index = iter(range(len(requests)))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for index in next_index:
                started = time.perf_counter()
                reply = await _exchange(reader, writer, requests[index])
                latencies[index] = time.perf_counter() - started
                replies[index] = reply if keep_replies or reply.status != 200 else Reply(reply.status, {}, b"")
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
    return LoadResult(time.perf_counter() - started, latencies, replies)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """`noisyseg serve --model PATH ...` as a user runs it, in its own process on a free port."""

    def __init__(self, model_path: Path, *args: str, log_level: str = "INFO") -> None:
        self.port = free_port()
        self.grpc_port = free_port()
        while self.grpc_port == self.port:
            self.grpc_port = free_port()
        command = [
            sys.executable,
            "-m",
            "noisyseg",
            "--log-level",
            log_level,
            "serve",
            "--model",
            str(model_path),
            "--port",
            str(self.port),
            "--grpc-port",
            str(self.grpc_port),
            *args,
        ]
        # A file, not a pipe: a full pipe would block the server's logging under load.
        self.log_file = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT, text=True)

    def log(self) -> str:
        self.log_file.seek(0)
        return self.log_file.read()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def wait_until_ready(self, timeout_s: float = 60.0) -> ServerProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"noisyseg serve exited with {self.process.returncode}: {self.log()}")
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if conn.recv(64).startswith(b"HTTP/1.1 200"):
                        return self
            time.sleep(0.1)
        raise RuntimeError("noisyseg serve did not become ready")

    def rss_bytes(self) -> int:
        """The server process's resident memory, from /proc."""
        return self._status_bytes("VmRSS")

    def peak_rss_bytes(self) -> int:
        """The most resident memory the server process has had since it started."""
        return self._status_bytes("VmHWM")

    def _status_bytes(self, field: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not found")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.log_file.close()


def write_conv_model(path: Path, output: str = "logits", in_channels: int = 1, seed: int = 0) -> Path:
    """A real ONNX segmentation-shaped model: 3x3 conv to one score map per class.

    `output` "logits" ends at the conv, "labels" adds an ArgMax over classes (int64). The 3x3
    kernel mixes neighbouring pixels, so results depend on each image's own layout: a batcher
    that mixed up images would be caught.
    """
    import onnx  # here: the load tools need it, the server does not
    from onnx import TensorProto, helper, numpy_helper

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
