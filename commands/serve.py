"""`noisyseg serve`: an Open Inference Protocol server for an exported model, a checkpoint or a
Triton model repository."""

from __future__ import annotations

import argparse
import logging
import math
from typing import TYPE_CHECKING, Any

from noisyseg.serve.settings import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_GRPC_MAX_RECEIVE_BYTES,
    DEFAULT_GRPC_MAX_SEND_BYTES,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_BATCH_PIXELS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HELD_BODY_BYTES,
    DEFAULT_MAX_RESPONSE_BYTES,
    MIB,
    OPTION_RANGES,
    ServerSettings,
    mib_to_bytes,
    plain_number,
    read_api_key,
)

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over the Open Inference Protocol (KServe v2, HTTP and gRPC)",
        description=(
            "Serve a model with the protocol NVIDIA Triton Inference Server and KServe speak: "
            "tritonclient (HTTP and gRPC) works against it unchanged. PATH is an ONNX model (ONNX Runtime), a "
            "TensorRT plan (needs the gpu extra), a training run directory or .safetensors "
            "checkpoint (PyTorch), or a model repository from `noisyseg export triton-repo`."
        ),
    )
    parser.add_argument("--model", required=True, metavar="PATH", help="model file, run directory or model repository")
    parser.add_argument("--name", help="model name for a single model (default: the file or directory name)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    _option(parser, "--port", 8000, "HTTP port")
    _option(parser, "--max-batch-size", 8, "images per batched model call")
    _option(
        parser,
        "--max-batch-pixels",
        DEFAULT_MAX_BATCH_PIXELS,
        "the inference memory budget: pixels (images x height x width) in one model call, HTTP and gRPC "
        "together. ONNX Runtime's working memory grows with them (the demo UNet: about 500 bytes a pixel, "
        "so the default, one 2048 x 2048 image, is about 2 GiB); one batch runs at a time and one batch's "
        "worth may wait (503 with Retry-After beyond it); a single request over it gets 400",
    )
    _option(parser, "--max-queue-delay-ms", 5.0, "longest a request waits for others to batch with")
    parser.add_argument(
        "--api-key-file", metavar="FILE", help="require this key ('Authorization: Bearer KEY' or 'X-API-Key')"
    )
    _option(parser, "--max-body-mb", DEFAULT_MAX_BODY_BYTES / MIB, "largest request body accepted")
    _option(
        parser,
        "--max-held-body-mb",
        DEFAULT_MAX_HELD_BODY_BYTES / MIB,
        "request bodies and gRPC messages held in memory at once, "
        "all requests together; beyond it 503 with Retry-After",
    )
    _option(
        parser,
        "--header-timeout-s",
        DEFAULT_HEADER_TIMEOUT_S,
        "longest a client may take to send a request's headers (the connection is closed)",
    )
    _option(
        parser, "--body-timeout-s", DEFAULT_BODY_TIMEOUT_S, "longest a client may take to send a request body (408)"
    )
    _option(
        parser,
        "--max-response-mb",
        DEFAULT_MAX_RESPONSE_BYTES / MIB,
        "largest response, HTTP or gRPC, refused before inference (request 'labels' or binary data for large images)",
    )
    _option(parser, "--request-timeout-s", 60.0, "per-request timeout")
    parser.add_argument(
        "--openapi", action="store_true", help="serve the OpenAPI schema at /openapi.json (off by default)"
    )
    _option(parser, "--threads", None, "ONNX Runtime threads per model (default: one per core)")
    parser.add_argument(
        "--device",
        default="cpu",
        help="device of a served run directory or .safetensors model: cpu (default), auto, cuda or cuda:N",
    )
    grpc_group = parser.add_argument_group("gRPC endpoint (same models, batchers and API key as HTTP)")
    _option(grpc_group, "--grpc-port", 8001, "gRPC port on --host")
    grpc_group.add_argument("--no-grpc", action="store_true", help="serve HTTP only")
    _option(grpc_group, "--grpc-max-receive-mb", DEFAULT_GRPC_MAX_RECEIVE_BYTES / MIB, "largest gRPC request message")
    _option(grpc_group, "--grpc-max-send-mb", DEFAULT_GRPC_MAX_SEND_BYTES / MIB, "largest gRPC response message")
    parser.set_defaults(func=run_serve)


def _option(parser: Any, flag: str, default: float | None, what: str) -> None:
    """A size, time or count option: read as text here, checked against its range in
    `settings_from_args` (`OPTION_RANGES`), so every one is refused the same way, naming itself."""
    shown = f"default {plain_number(default)}; " if default is not None else ""
    parser.add_argument(flag, default=default, metavar="N", help=f"{what} ({shown}range {OPTION_RANGES[flag]})")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """The typed settings for the parsed command line; ValueError naming the flag of a bad value."""

    def number(flag: str) -> Any:
        return OPTION_RANGES[flag].parse(getattr(args, flag[2:].replace("-", "_")), flag)

    def size(flag: str) -> int:
        return mib_to_bytes(number(flag))

    max_batch_size = number("--max-batch-size")
    return ServerSettings(
        host=args.host,
        port=number("--port"),
        max_batch_size=max_batch_size,
        max_queue_delay_ms=number("--max-queue-delay-ms"),
        # Room for a few full batches per model; beyond it clients get 503 and retry.
        max_queued_images=max(512, 4 * max_batch_size),
        max_batch_pixels=number("--max-batch-pixels"),
        max_body_bytes=size("--max-body-mb"),
        max_held_body_bytes=size("--max-held-body-mb"),
        header_timeout_s=number("--header-timeout-s"),
        body_timeout_s=number("--body-timeout-s"),
        max_response_bytes=size("--max-response-mb"),
        request_timeout_s=number("--request-timeout-s"),
        intra_op_threads=number("--threads") if args.threads is not None else None,
        api_key=read_api_key(args.api_key_file) if args.api_key_file else None,
        grpc_port=None if args.no_grpc else number("--grpc-port"),
        grpc_max_receive_bytes=size("--grpc-max-receive-mb"),
        grpc_max_send_bytes=size("--grpc-max-send-mb"),
        openapi=args.openapi,
    )


def uvicorn_config(app: FastAPI, settings: ServerSettings, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for the app: the standard asyncio loop and h11, whatever else is
    installed (uvicorn would pick uvloop and httptools when present, which the gRPC endpoint on
    the same loop and the HTTP behaviour the tests pin down were not tested with)."""
    import uvicorn

    from noisyseg.serve.connections import header_timeout_protocol

    return uvicorn.Config(
        app,
        loop="asyncio",
        # h11, with a deadline on each request's headers (`--header-timeout-s`).
        http=header_timeout_protocol(settings.header_timeout_s),
        timeout_graceful_shutdown=math.ceil(settings.graceful_shutdown_s),
        # The app writes its own access lines (JSON) and the CLI configured logging already.
        access_log=False,
        log_config=None,
        **options,
    )


def run_serve(args: argparse.Namespace) -> int:
    """Load the model(s), then serve until SIGINT/SIGTERM (requests in flight are finished)."""
    import uvicorn

    from noisyseg.serve.allocator import map_large_allocations
    from noisyseg.serve.app import create_app
    from noisyseg.serve.runtimes import open_runtimes

    settings = settings_from_args(args)
    map_large_allocations()
    if not settings.is_loopback and settings.api_key is None:
        logger.warning(
            "listening on %s without an API key: anyone who can reach this port can use the models", settings.host
        )
    runtimes = open_runtimes(args.model, name=args.name, intra_op_threads=settings.intra_op_threads, device=args.device)
    app = create_app(runtimes, settings)
    config = uvicorn_config(app, settings, host=settings.host, port=settings.port)
    logger.info(
        "listening on http://%s:%d (models: %s)", settings.host, settings.port, ", ".join(r.name for r in runtimes)
    )
    uvicorn.Server(config).run()
    return 0
