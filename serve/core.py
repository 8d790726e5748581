"""What both endpoints share: the served models (`ModelTable`, one dynamic batcher per model) and
`run_inference`, which checks a decoded request against its model and waits for its outputs.

`serve.app` (HTTP) and `serve.grpc_server` (gRPC) both import it, so neither imports the other.

Every limit on what a request may cost is checked here, before it is queued, for both protocols:
its pixels against the inference budget (`max_batch_pixels`), the size of the answer it asks for
against the response limits (each front end measures its own encoding), and the request bodies
and messages held at once (`bodies`, shared by both endpoints).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import numpy as np

from noisyseg.export.triton_repo import TritonModelConfig, TritonTensor, triton_data_type
from noisyseg.serve.allocator import release_free_memory
from noisyseg.serve.batcher import (
    BatcherStopped,
    BatchRecord,
    DynamicBatcher,
    QueueFull,
    image_pixels,
)
from noisyseg.serve.errors import BadRequest, Busy, NotFound, RequestTimeout, ServeError, Unavailable, quoted
from noisyseg.serve.http_bodies import BodyBudget
from noisyseg.serve.metrics import ServerMetrics
from noisyseg.serve.protocol import BINARY_EXTENSION, InferenceRequest, PlannedOutput
from noisyseg.serve.runtimes import Runtime, TensorSpec
from noisyseg.serve.settings import ServerSettings

logger = logging.getLogger(__name__)

SERVER_NAME = "noisyseg"
# Protocol extensions (Triton's names) both endpoints implement.
SERVER_EXTENSIONS = [BINARY_EXTENSION, "model_configuration", "statistics"]

# Bodies (and JSON text) above this size are decoded or printed off the event loop.
_INLINE_CODEC_BYTES = 64 * 1024
T = TypeVar("T")
# A front end's check of the answer a request asks for, before inference: raises a ServeError
# when its encoding of `outputs` would pass a limit, else returns its size (None: not known).
ResponseCheck = Callable[[list[PlannedOutput]], "int | None"]


class BackendFailure(ServeError):
    """The model failed on a request the server had accepted: the server's fault (500)."""

    status_code = 500


@dataclass
class ServedModel:
    runtime: Runtime
    batcher: DynamicBatcher


class ModelTable:
    """The served models by name, with the server's readiness."""

    def __init__(self, runtimes: Sequence[Runtime], settings: ServerSettings, metrics: ServerMetrics) -> None:
        names = [runtime.name for runtime in runtimes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        if not runtimes:
            raise ValueError("no models to serve")
        self.settings = settings
        self.metrics = metrics
        self.runtimes = list(runtimes)
        self.models: dict[str, ServedModel] = {}
        self.ready = False
        # What requests hold at once, both endpoints together; once the last large one is done,
        # malloc's free pages go back to the system (in a worker thread: it takes milliseconds).
        self.bodies = BodyBudget(
            settings.max_held_body_bytes,
            on_idle=lambda: asyncio.get_running_loop().run_in_executor(None, release_free_memory),
        )

    def start(self) -> None:
        """Create and start one batcher per model (inside the running event loop)."""
        for runtime in self.runtimes:
            self.models[runtime.name] = ServedModel(runtime, self._batcher_for(runtime))
            self.models[runtime.name].batcher.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await asyncio.gather(*(model.batcher.stop() for model in self.models.values()))

    def _batcher_for(self, runtime: Runtime) -> DynamicBatcher:
        name = runtime.name

        def record_batch(record: BatchRecord) -> None:
            self.metrics.batch_size.observe(record.images, name)

        def record_queue(images: int) -> None:
            self.metrics.queued_images.set(name, value=images)

        return DynamicBatcher(
            runtime.infer,
            max_batch_size=self.max_batch_size(runtime),
            max_delay_s=self.max_queue_delay_s(runtime),
            max_queued_images=self.settings.max_queued_images,
            max_batch_pixels=self.settings.max_batch_pixels,
            max_queued_pixels=self.settings.queued_pixels,
            name=name,
            on_batch=record_batch,
            on_queue_change=record_queue,
        )

    def max_batch_size(self, runtime: Runtime) -> int:
        """The server's maximum, lowered to the model's own where it has one."""
        return min(self.settings.max_batch_size, runtime.max_batch_size or self.settings.max_batch_size)

    def max_queue_delay_s(self, runtime: Runtime) -> float:
        """The model's own batching delay (from its repository config) or the server's."""
        if runtime.max_queue_delay_ms is not None:
            return runtime.max_queue_delay_ms / 1000.0
        return self.settings.max_queue_delay_s

    def runtime(self, name: str, version: str | None = None) -> Runtime:
        """The runtime for `name` (and `version`, when given) or NotFound."""
        runtime = next((item for item in self.runtimes if item.name == name), None)
        if runtime is None:
            known = ", ".join(sorted(item.name for item in self.runtimes))
            raise NotFound(f"unknown model {quoted(name)} (served models: {known})")
        if version is not None and version != runtime.version:
            raise NotFound(f"model '{name}' has no version {quoted(version)} (served version: {runtime.version})")
        return runtime

    def served(self, name: str, version: str | None = None) -> ServedModel:
        """The running model, or NotFound / Unavailable (not started or shutting down)."""
        runtime = self.runtime(name, version)
        if not self.ready or name not in self.models:
            raise Unavailable(f"model '{runtime.name}' is not ready (server starting or shutting down)")
        return self.models[name]

    def model_config(self, name: str, version: str | None = None) -> TritonModelConfig:
        """The model's Triton configuration as served: the fields `export triton-repo` writes, with
        the batching this server applies and every output it offers."""
        runtime = self.runtime(name, version)
        return TritonModelConfig(
            runtime.name,
            runtime.platform,
            self.max_batch_size(runtime),
            [_triton_tensor(runtime.input_spec())],
            [_triton_tensor(spec) for spec in runtime.output_specs()],
            runtime.model_metadata,
            round(self.max_queue_delay_s(runtime) * 1e6),
        )

    def statistics(self, name: str | None = None, version: str | None = None) -> dict[str, Any]:
        """Triton's statistics response for one model, or for every model when `name` is None."""
        names = [self.runtime(name, version).name] if name else [runtime.name for runtime in self.runtimes]
        return {
            "model_stats": [
                self.served(item).batcher.statistics.to_json(item, self.models[item].runtime.version) for item in names
            ]
        }


def _triton_tensor(spec: TensorSpec) -> TritonTensor:
    """A served tensor as the model configuration describes it (without the batch dimension)."""
    return TritonTensor(spec.name, triton_data_type(spec.datatype), list(spec.shape[1:]))


async def run_inference(
    table: ModelTable,
    model: ServedModel,
    request: InferenceRequest,
    check_response: ResponseCheck,
    take: Callable[[int], None],
    deadline_s: float = math.inf,
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Check a decoded request against its model, batch it and wait for the output names and arrays
    (HTTP and gRPC alike). `check_response` sees the outputs it asks for before it is queued, so an
    answer over a size limit is refused before any work; the answer's size is then taken from the
    request's share of `table.bodies` (`take`), which it holds until the answer is sent.
    `deadline_s` is the transport's own limit."""
    runtime = model.runtime
    images, outputs, size = plan_answer(table, runtime, request, check_response)
    take(size or 0)
    timeout = min(table.settings.request_timeout_s, request.timeout_s() or math.inf, deadline_s)
    return outputs, await _submit(model.batcher, images, outputs, timeout)


def plan_answer(
    table: ModelTable, runtime: Runtime, request: InferenceRequest, check_response: ResponseCheck
) -> tuple[np.ndarray, list[str], int | None]:
    """A request checked against its model: its image batch, the outputs to return and the
    answer's size as `check_response` sees it (which refuses one over a limit). Needs only the
    inputs' shapes, so it also runs on `decode_request_header`'s placeholders."""
    images, outputs = _validate_for_model(
        request, runtime, table.max_batch_size(runtime), table.settings.max_batch_pixels
    )
    return images, outputs, check_response(runtime.planned_outputs(images.shape, outputs, request.wants_binary))


def input_bytes_outside(request: InferenceRequest, message: bytes | bytearray) -> int:
    """Bytes of a decoded request's tensors that are not views of its `message`: JSON numbers and
    gRPC tensors are decoded into arrays of their own, held beside the message (binary HTTP
    tensors are views of the body)."""
    whole = np.frombuffer(message, np.uint8)
    return sum(tensor.array.nbytes for tensor in request.inputs if not np.may_share_memory(tensor.array, whole))


async def off_loop_if_large(size: int, function: Callable[..., T], *args: Any) -> T:
    """Run `function` in a worker thread when `size` (bytes of body or JSON text) is large.

    Parsing, checking or printing a big tensor takes milliseconds and would stall every other
    request on the event loop; small payloads are cheaper than the thread hop.
    """
    if size > _INLINE_CODEC_BYTES:
        return await anyio.to_thread.run_sync(function, *args)
    return function(*args)


async def _submit(
    batcher: DynamicBatcher, images: np.ndarray, outputs: list[str], timeout: float
) -> dict[str, np.ndarray]:
    try:
        # Not asyncio.wait_for: its task and the exception it raises reference each other, so a
        # refused request's tensors stayed in memory until the next garbage collection.
        async with asyncio.timeout(timeout):
            return await batcher.submit(images, outputs)
    except TimeoutError:
        raise RequestTimeout(f"model '{batcher.name}' did not answer within {timeout:g} s") from None
    except QueueFull as err:
        raise Busy(str(err), err.retry_after_s) from None
    except BatcherStopped as err:
        raise Unavailable(str(err)) from None
    except ServeError:
        raise
    except Exception as err:  # the backend failed on input the server accepted: a server fault
        logger.exception("model %s: inference failed", batcher.name)
        raise BackendFailure(f"model '{batcher.name}' failed to run the batch ({type(err).__name__}: {err})") from None


def _validate_for_model(
    request: InferenceRequest, runtime: Runtime, max_batch: int, max_pixels: int
) -> tuple[np.ndarray, list[str]]:
    """The image batch and the output names to return, or BadRequest saying what is wrong."""
    names = [tensor.name for tensor in request.inputs]
    if names != [runtime.input_name]:
        raise BadRequest(
            f"model '{runtime.name}' takes exactly one input named '{runtime.input_name}', got {quoted(names)}"
        )
    tensor = request.inputs[0]
    spec = runtime.input_spec()
    where = f"input {quoted(tensor.name)}"
    if tensor.datatype != spec.datatype:
        raise BadRequest(f"{where}: datatype must be {spec.datatype}, got {tensor.datatype}")
    _check_shape(where, tensor.shape, spec.shape, runtime.min_spatial_size, max_batch)
    pixels = image_pixels(tensor.shape)
    if pixels > max_pixels:
        batch, _, height, width = tensor.shape
        raise BadRequest(
            f"{where}: {batch} x {height} x {width} = {pixels} pixels exceeds the server's inference budget of "
            f"{max_pixels} pixels per model call (--max-batch-pixels); send fewer or smaller images, or tiles"
        )
    try:
        runtime.check_input_shape(tensor.shape)
    except ValueError as err:
        raise BadRequest(str(err)) from None
    offered = runtime.output_names
    wanted = [item.name for item in request.outputs] if request.outputs is not None else list(offered)
    unknown = [out for out in wanted if out not in offered]
    if unknown:
        raise BadRequest(
            f"model '{runtime.name}' cannot produce outputs {quoted(unknown)}; available outputs: {', '.join(offered)}"
        )
    if len(set(wanted)) != len(wanted):
        raise BadRequest(f"outputs requested more than once: {quoted(wanted)}")
    return tensor.array, wanted


def _check_shape(where: str, shape: tuple[int, ...], expected: tuple[int, ...], min_size: int, max_batch: int) -> None:
    described = f"expected [N, C, H, W] matching {list(expected)}, got {quoted(list(shape))}"
    if len(shape) != len(expected):
        raise BadRequest(f"{where}: shape must have {len(expected)} dimensions; {described}")
    for axis, (want, got) in enumerate(zip(expected, shape, strict=True)):
        if want != -1 and want != got:
            raise BadRequest(f"{where}: dimension {axis} must be {want}; {described}")
    batch, _, height, width = shape
    if not 1 <= batch <= max_batch:
        raise BadRequest(
            f"{where}: batch dimension must be between 1 and the maximum batch size {max_batch}, got {batch}"
        )
    if height < min_size or width < min_size:
        raise BadRequest(
            f"{where}: height and width must be at least {min_size} pixels (the model's stride), got {height}x{width}"
        )


def presented_key(headers: dict[bytes, bytes]) -> bytes | None:
    """The API key a request carries ('Authorization: Bearer KEY' or 'X-API-Key: KEY'), if any."""
    authorization = headers.get(b"authorization")
    if authorization is not None and authorization[:7].lower() == b"bearer ":
        return authorization[7:].strip()
    return headers.get(b"x-api-key")
