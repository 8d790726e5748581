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
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HELD_BODY_BYTES,
    DEFAULT_MAX_RESPONSE_BYTES,
    ServerSettings,
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
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="images per batched model call (default 8)")
    parser.add_argument(
        "--max-queue-delay-ms", type=float, default=5.0,
        help="longest a request waits for others to batch with (default 5 ms)",
    )
    parser.add_argument("--api-key-file", metavar="FILE", help="require this key ('Authorization: Bearer KEY' or 'X-API-Key')")
    _mib_option(parser, "--max-body-mb", DEFAULT_MAX_BODY_BYTES, "largest request body accepted")
    _mib_option(parser, "--max-held-body-mb", DEFAULT_MAX_HELD_BODY_BYTES, "request bodies held in memory at once, all requests together; beyond it 503 with Retry-After")
    parser.add_argument(
        "--body-timeout-s", type=float, default=DEFAULT_BODY_TIMEOUT_S,
        help=f"longest a client may take to send a request body (default {DEFAULT_BODY_TIMEOUT_S:g} s)",
    )
    _mib_option(parser, "--max-response-mb", DEFAULT_MAX_RESPONSE_BYTES, "largest response body (request 'labels' or binary data for large images)")
    parser.add_argument("--request-timeout-s", type=float, default=60.0, help="per-request timeout (default 60 s)")
    parser.add_argument("--openapi", action="store_true", help="serve the OpenAPI schema at /openapi.json (off by default)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per model (default: one per core)")
    parser.add_argument("--device", default="cpu", help="device of a served run directory or .safetensors model: cpu (default), auto, cuda or cuda:N")
    grpc_group = parser.add_argument_group("gRPC endpoint (same models, batchers and API key as HTTP)")
    grpc_group.add_argument("--grpc-port", type=int, default=8001, help="gRPC port on --host (default 8001)")
    grpc_group.add_argument("--no-grpc", action="store_true", help="serve HTTP only")
    _mib_option(grpc_group, "--grpc-max-receive-mb", DEFAULT_GRPC_MAX_RECEIVE_BYTES, "largest gRPC request message")
    _mib_option(grpc_group, "--grpc-max-send-mb", DEFAULT_GRPC_MAX_SEND_BYTES, "largest gRPC response message")
    parser.set_defaults(func=run_serve)


def _mib_option(parser: Any, flag: str, default_bytes: int, what: str) -> None:
    """A size option given in MiB (`_mebibytes` turns it into bytes)."""
    parser.add_argument(flag, type=float, default=default_bytes / 2**20, help=f"{what}, in MiB (default {default_bytes // 2**20})")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """The typed settings for the parsed command line."""
    return ServerSettings(
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms,
        # Room for a few full batches per model; beyond it clients get 503 and retry.
        max_queued_images=max(512, 4 * args.max_batch_size),
        max_body_bytes=_mebibytes(args.max_body_mb),
        max_held_body_bytes=_mebibytes(args.max_held_body_mb),
        body_timeout_s=args.body_timeout_s,
        max_response_bytes=_mebibytes(args.max_response_mb),
        request_timeout_s=args.request_timeout_s,
        intra_op_threads=args.threads,
        api_key=read_api_key(args.api_key_file) if args.api_key_file else None,
        grpc_port=None if args.no_grpc else args.grpc_port,
        grpc_max_receive_bytes=_mebibytes(args.grpc_max_receive_mb),
        grpc_max_send_bytes=_mebibytes(args.grpc_max_send_mb),
        openapi=args.openapi,
    )


def uvicorn_config(app: FastAPI, settings: ServerSettings, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for the app: the standard asyncio loop and h11, whatever else is
    installed (uvicorn would pick uvloop and httptools when present, which the gRPC endpoint on
    the same loop and the HTTP behaviour the tests pin down were not tested with)."""
    import uvicorn

    return uvicorn.Config(
        app,
        loop="asyncio",
        http="h11",
        timeout_graceful_shutdown=math.ceil(settings.graceful_shutdown_s),
        # The app writes its own access lines (JSON) and the CLI configured logging already.
        access_log=False,
        log_config=None,
        **options,
    )


def _mebibytes(value: float) -> int:
    return max(1, math.floor(value * 2**20))


def run_serve(args: argparse.Namespace) -> int:
    """Load the model(s), then serve until SIGINT/SIGTERM (requests in flight are finished)."""
    import uvicorn

    from noisyseg.serve.app import create_app
    from noisyseg.serve.runtimes import open_runtimes

    settings = settings_from_args(args)
    if not settings.is_loopback and settings.api_key is None:
        logger.warning("listening on %s without an API key: anyone who can reach this port can use the models", settings.host)
    runtimes = open_runtimes(args.model, name=args.name, intra_op_threads=settings.intra_op_threads, device=args.device)
    app = create_app(runtimes, settings)
    config = uvicorn_config(app, settings, host=settings.host, port=settings.port)
    logger.info("listening on http://%s:%d (models: %s)", settings.host, settings.port, ", ".join(r.name for r in runtimes))
    uvicorn.Server(config).run()
    return 0
