"""Server settings: one typed, validated dataclass built by `noisyseg serve` (or by tests)."""

from __future__ import annotations

import ipaddress
import math
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
# A client's request line and headers are a few hundred bytes: ten seconds is generous, and a
# connection that trickles them in slowly is closed instead of held open for good.
DEFAULT_HEADER_TIMEOUT_S = 10.0
# Pixels (images x height x width) in one model call. Inference memory grows with them: the demo
# UNet needs about 500 bytes a pixel in ONNX Runtime (measured, docs/serving.md), so the default,
# one 2048 x 2048 image, keeps a batch near 2 GiB.
DEFAULT_MAX_BATCH_PIXELS = 2048 * 2048
MIB = 2**20


@dataclass(frozen=True)
class OptionRange:
    """The values one size, time or count option of `noisyseg serve` takes: a finite number in
    (low, high], or [low, high] with `low_included`; whole numbers only with `whole`."""

    low: float
    high: float
    unit: str
    low_included: bool = False
    whole: bool = False

    def __str__(self) -> str:
        opening = "[" if self.low_included else "("
        return f"{opening}{plain_number(self.low)}, {plain_number(self.high)}] {self.unit}".rstrip()

    def parse(self, value: str | float, flag: str) -> float:
        """`value` (the command line's text or a default) as a number, or ValueError naming `flag`."""
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        above = number >= self.low if self.low_included else number > self.low
        inside = math.isfinite(number) and above and number <= self.high
        if not inside or (self.whole and not number.is_integer()):
            kind = "a whole number" if self.whole else "a finite number"
            raise ValueError(f"{flag} must be {kind} in {self}, got {value!r}")
        return int(number) if self.whole else number


def plain_number(number: float) -> str:
    """A number as a person writes it: 4194304 rather than 4.1943e+06."""
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


# Every size, time and count option of `noisyseg serve`, HTTP and gRPC alike, is read through
# its range here: a bad value stops the command before the server starts, naming the flag.
_MIB_RANGE = OptionRange(0, 16384, "MiB")
OPTION_RANGES = {
    "--port": OptionRange(0, 65535, "", low_included=True, whole=True),
    "--grpc-port": OptionRange(0, 65535, "", low_included=True, whole=True),
    "--max-batch-size": OptionRange(1, 65536, "images", low_included=True, whole=True),
    "--max-batch-pixels": OptionRange(1, 2**36, "pixels", low_included=True, whole=True),
    "--max-queue-delay-ms": OptionRange(0, 60_000, "ms", low_included=True),
    "--max-body-mb": _MIB_RANGE,
    "--max-held-body-mb": _MIB_RANGE,
    "--max-response-mb": _MIB_RANGE,
    # gRPC's message limits are signed 32-bit byte counts.
    "--grpc-max-receive-mb": OptionRange(0, 2047, "MiB"),
    "--grpc-max-send-mb": OptionRange(0, 2047, "MiB"),
    "--header-timeout-s": OptionRange(0, 3600, "s"),
    "--body-timeout-s": OptionRange(0, 3600, "s"),
    "--request-timeout-s": OptionRange(0, 86_400, "s"),
    "--threads": OptionRange(1, 1024, "threads", low_included=True, whole=True),
}


def mib_to_bytes(mib: float) -> int:
    """A size in MiB as bytes: at least one byte for any positive size."""
    return max(1, math.floor(mib * MIB))


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
    # Longest a client may take to send a request's line and headers (then the connection closes).
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    # The inference memory budget: pixels in one model call, HTTP and gRPC requests together.
    max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS
    # Pixels allowed to wait per model: one full batch beside the one running (None: as many as
    # `max_batch_pixels`), so a queued request waits for at most two model calls.
    max_queued_pixels: int | None = None
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
            "header_timeout_s": self.header_timeout_s,
            "max_batch_pixels": self.max_batch_pixels,
            "queued_pixels": self.queued_pixels,
            "max_response_bytes": self.max_response_bytes,
            "request_timeout_s": self.request_timeout_s,
            "grpc_max_receive_bytes": self.grpc_max_receive_bytes,
            "grpc_max_send_bytes": self.grpc_max_send_bytes,
        }
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"server setting {name} must be a positive finite number, got {value}")
        for name, value in (
            ("max_queue_delay_ms", self.max_queue_delay_ms),
            ("graceful_shutdown_s", self.graceful_shutdown_s),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"server setting {name} must be a finite number, not negative, got {value}")
        if self.queued_pixels < self.max_batch_pixels:
            raise ValueError(
                f"server setting max_queued_pixels ({self.queued_pixels}) "
                f"must be at least max_batch_pixels ({self.max_batch_pixels})"
            )
        for name, port in (("port", self.port), ("grpc_port", self.grpc_port)):
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"server setting {name} must be in 0..65535, got {port}")
        if max(self.grpc_max_receive_bytes, self.grpc_max_send_bytes) >= 2**31:
            raise ValueError(
                "server settings grpc_max_receive_bytes and grpc_max_send_bytes must be below 2 GiB (gRPC's limit)"
            )
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
    def queued_pixels(self) -> int:
        return self.max_queued_pixels if self.max_queued_pixels is not None else self.max_batch_pixels

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
