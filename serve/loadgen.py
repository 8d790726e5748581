"""Load-testing tools for the server (used by the load test and the benchmark).

`run_load(host, port, model, images, concurrency)` keeps `concurrency` keep-alive connections
busy, each sending one request at a time in the binary tensor format, and records every
request's latency and status. It speaks plain HTTP/1.1 over asyncio streams, so the client
costs little CPU next to the server it measures. `ServerProcess` starts `noisyseg serve` in its
own process, as a user would (HTTP and gRPC, each on a free port), and reads its memory use.
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
        return [f"request {i}: HTTP {r.status} {r.body[:200]!r}" for i, r in enumerate(self.replies) if r and r.status != 200]


def binary_infer_body(image_batch: np.ndarray, outputs: Sequence[str], input_name: str = "image") -> tuple[bytes, int]:
    """A binary-extension infer request for one FP32 batch; returns the body and its JSON length."""
    raw = np.ascontiguousarray(image_batch, dtype="<f4").tobytes()
    header = json.dumps({
        "inputs": [{"name": input_name, "shape": list(image_batch.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in outputs],
    }).encode()
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
        command = [sys.executable, "-m", "noisyseg", "--log-level", log_level, "serve", "--model", str(model_path),
                   "--port", str(self.port), "--grpc-port", str(self.grpc_port), *args]
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
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS not found")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.log_file.close()
