"""Server settings: one typed, validated dataclass built by `noisyseg serve` (or by tests)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from noisyseg.io import read_text

# Triton's default cap on an HTTP request; responses get the same.
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
# gRPC messages: requests as large as HTTP bodies; responses (float32 logits of a full batch)
# may be larger than the request that asked for them.
DEFAULT_GRPC_MAX_RECEIVE_BYTES = DEFAULT_MAX_BODY_BYTES
DEFAULT_GRPC_MAX_SEND_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
# Four bodies of the largest size in memory at once.
DEFAULT_MAX_HELD_BODY_BYTES = 4 * DEFAULT_MAX_BODY_BYTES
DEFAULT_BODY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ServerSettings:
    """How the server listens, batches and protects itself."""

    host: str = "127.0.0.1"
    port: int = 8000
    # Dynamic batching: a batch runs when it holds `max_batch_size` images or when its oldest
    # request has waited `max_queue_delay_ms`, whichever comes first.
    max_batch_size: int = 8
    max_queue_delay_ms: float = 5.0
    # Images allowed to wait per model; beyond it requests get 503 instead of unbounded memory.
    max_queued_images: int = 512
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Request bodies all requests hold at once (read, decoded or in inference); beyond it 503.
    max_held_body_bytes: int = DEFAULT_MAX_HELD_BODY_BYTES
    # Longest a client may take to send a request body (slow uploads hold memory).
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    # Largest response body; a larger answer is a 400 pointing at `labels` or binary data.
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    request_timeout_s: float = 60.0
    # How long shutdown waits for requests in flight before closing connections.
    graceful_shutdown_s: float = 30.0
    # Threads per ONNX Runtime session (None: one per core).
    intra_op_threads: int | None = None
    api_key: str | None = field(default=None, repr=False)
    # The gRPC endpoint on `host` (None: HTTP only) and its message-size limits.
    grpc_port: int | None = None
    grpc_max_receive_bytes: int = DEFAULT_GRPC_MAX_RECEIVE_BYTES
    grpc_max_send_bytes: int = DEFAULT_GRPC_MAX_SEND_BYTES
    # Serve the OpenAPI schema at /openapi.json (no docs pages: theirs load scripts from a CDN).
    openapi: bool = False

    def __post_init__(self) -> None:
        positive = {
            "max_batch_size": self.max_batch_size,
            "max_queued_images": self.max_queued_images,
            "max_body_bytes": self.max_body_bytes,
            "max_held_body_bytes": self.max_held_body_bytes,
            "body_timeout_s": self.body_timeout_s,
            "max_response_bytes": self.max_response_bytes,
            "request_timeout_s": self.request_timeout_s,
            "grpc_max_receive_bytes": self.grpc_max_receive_bytes,
            "grpc_max_send_bytes": self.grpc_max_send_bytes,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"server setting {name} must be positive, got {value}")
        if self.max_queue_delay_ms < 0 or self.graceful_shutdown_s < 0:
            raise ValueError("server settings max_queue_delay_ms and graceful_shutdown_s must not be negative")
        for name, port in (("port", self.port), ("grpc_port", self.grpc_port)):
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"server setting {name} must be in 0..65535, got {port}")
        if max(self.grpc_max_receive_bytes, self.grpc_max_send_bytes) >= 2**31:
            raise ValueError("server settings grpc_max_receive_bytes and grpc_max_send_bytes must be below 2 GiB (gRPC's limit)")
        if self.grpc_port is not None and self.grpc_port == self.port != 0:
            raise ValueError(f"server settings port and grpc_port must differ, both are {self.port}")
        if self.max_queued_images < self.max_batch_size:
            raise ValueError(
                f"server setting max_queued_images ({self.max_queued_images}) must be at least "
                f"max_batch_size ({self.max_batch_size})"
            )
        if self.max_held_body_bytes < self.max_body_bytes:
            raise ValueError(
                f"server setting max_held_body_bytes ({self.max_held_body_bytes}) must be at least "
                f"max_body_bytes ({self.max_body_bytes})"
            )
        if self.api_key is not None and not self.api_key:
            raise ValueError("server setting api_key must not be empty (leave it unset for no key)")

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_ms / 1000.0

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def read_api_key(path: str | Path) -> str:
    """The key in `path` (surrounding whitespace stripped); an empty file is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: API key file not found")
    key = read_text(path, "API key file").strip()
    if not key:
        raise ValueError(f"{path}: API key file is empty")
    return key
