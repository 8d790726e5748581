"""Dynamic batching: concurrent requests gathered into one model call, results split back.

As in MLServer's adaptive batching: requests wait in a queue until a batch is full or the oldest
request has waited `max_delay_s`, then one batched call runs on a worker thread and each request
gets its own slice of the outputs. While a batch runs, the next one fills, so under load batches
are full without waiting.

A batch is full at `max_batch_size` images or at `max_batch_pixels` pixels (images x height x
width), whichever comes first: the pixel budget bounds the model's working memory, which grows
with them. One batch runs at a time, so inference never holds more than one budget's worth.
The queue holds at most `max_queued_images` images and `max_queued_pixels` pixels; beyond
either, `QueueFull` (the server's 503 with Retry-After): its wait is the queued and running
pixels at the model's recent seconds per pixel, so clients of a slow model do not retry every
second.

Only requests whose images have the same shape apart from the batch dimension (channels, height,
width) and the same dtype are batched together; each shape has its own queue. A request is never
split across batches.

The batcher keeps the model's statistics (`serve.statistics`): every request passes through it,
whichever protocol it came by.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from noisyseg.serve.statistics import BatchTimes, ModelStatistics

logger = logging.getLogger(__name__)

# Runs a batch (N, ...) and returns the named outputs, each with N in its first dimension.
BatchFunction = Callable[[np.ndarray, frozenset[str]], dict[str, np.ndarray]]


class QueueFull(RuntimeError):
    """The batcher already holds its maximum of waiting images or pixels; `retry_after_s` is how
    long the queued and running batches are expected to take (at least 1 s)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BatcherStopped(RuntimeError):
    """The batcher is shutting down and takes no new requests."""


@dataclass
class _Pending:
    images: np.ndarray
    outputs: frozenset[str]
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)

    @property
    def count(self) -> int:
        return int(self.images.shape[0])

    @property
    def pixels(self) -> int:
        return image_pixels(self.images.shape)


@dataclass(frozen=True)
class BatchRecord:
    """What one batched call looked like (for metrics and logs)."""

    images: int
    requests: int
    seconds: float


def image_pixels(shape: tuple[int, ...]) -> int:
    """Pixels of a batch of `shape` (N, C, H, W): images x height x width, channels not counted."""
    return int(shape[0]) * math.prod(int(dim) for dim in shape[2:])


class DynamicBatcher:
    """Gathers `submit` calls into batches for `batch_function`; one batch runs at a time."""

    def __init__(
        self,
        batch_function: BatchFunction,
        max_batch_size: int,
        max_delay_s: float,
        max_queued_images: int,
        name: str = "model",
        max_batch_pixels: int | None = None,
        max_queued_pixels: int | None = None,
        on_batch: Callable[[BatchRecord], None] | None = None,
        on_queue_change: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.batch_function = batch_function
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queued_images = max_queued_images
        # None: no pixel budget (batches bounded by images alone).
        self.max_batch_pixels = max_batch_pixels
        self.max_queued_pixels = max_queued_pixels
        self.name = name
        self._on_batch = on_batch
        self._on_queue_change = on_queue_change
        self._queues: dict[tuple[object, ...], deque[_Pending]] = {}
        self._queued_images = 0
        self._queued_pixels = 0
        self._running_pixels = 0
        # Model-call seconds per pixel, averaged over recent batches (None: no batch yet).
        self._seconds_per_pixel: float | None = None
        self.statistics = ModelStatistics()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        # One worker thread: batches of one model run one after another, each using every core.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def start(self) -> None:
        """Start the collecting task on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._collect(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Refuse new requests, finish every queued one, then stop the worker thread."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    async def submit(self, images: np.ndarray, outputs: Iterable[str]) -> dict[str, np.ndarray]:
        """Queue `images` (N, ...) and wait for their outputs (each with N in dimension 0)."""
        started = time.perf_counter_ns()
        succeeded = False
        try:
            result = await self._queue_and_wait(images, outputs)
            succeeded = True
            return result
        finally:
            # Also when the caller gave up (timeout, disconnect): the request failed.
            self.statistics.record_request(succeeded, time.perf_counter_ns() - started)

    async def _queue_and_wait(self, images: np.ndarray, outputs: Iterable[str]) -> dict[str, np.ndarray]:
        if self._stopping or self._task is None:
            raise BatcherStopped(f"model '{self.name}' is not accepting requests (server starting or shutting down)")
        count = int(images.shape[0])
        if count < 1:
            raise ValueError("a request must hold at least one image")
        if self._queued_images + count > self.max_queued_images:
            raise QueueFull(
                f"model '{self.name}' has {self._queued_images} images queued "
                f"(limit {self.max_queued_images}); retry later",
                self._expected_wait_s(),
            )
        pixels = image_pixels(images.shape)
        if self.max_queued_pixels is not None and self._queued_pixels + pixels > self.max_queued_pixels:
            raise QueueFull(
                f"model '{self.name}' has {self._queued_pixels} pixels queued, and this request's {pixels} would pass "
                f"the limit of {self.max_queued_pixels}; retry later",
                self._expected_wait_s(),
            )
        pending = _Pending(images, frozenset(outputs), asyncio.get_running_loop().create_future())
        key = (images.dtype.str, *images.shape[1:])
        self._queues.setdefault(key, deque()).append(pending)
        self._change_queued(pending)
        self._wakeup.set()
        return await pending.future

    def _expected_wait_s(self) -> int:
        """Whole seconds until the queued and running batches are done, by recent batches' pace."""
        pending = (self._queued_pixels + self._running_pixels) * (self._seconds_per_pixel or 0.0)
        return max(1, math.ceil(pending))

    def _change_queued(self, item: _Pending, sign: int = 1) -> None:
        self._queued_images += sign * item.count
        self._queued_pixels += sign * item.pixels
        if self._on_queue_change is not None:
            self._on_queue_change(self._queued_images)

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_abandoned()
            key = self._oldest_key()
            if key is None:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_batch(key)
            batch = self._take_batch(key)
            if batch:
                await self._run_batch(loop, batch)
            # Not held while waiting for the next request: it references the images and results.
            del batch

    def _drop_abandoned(self) -> None:
        """Forget requests whose caller gave up (timed out or disconnected) before they ran."""
        for key in list(self._queues):
            queue = self._queues[key]
            live = deque(item for item in queue if not item.future.done())
            for item in queue:
                if item.future.done():
                    self._change_queued(item, -1)
            if live:
                self._queues[key] = live
            else:
                del self._queues[key]

    def _oldest_key(self) -> tuple[object, ...] | None:
        if not self._queues:
            return None
        return min(self._queues, key=lambda key: self._queues[key][0].enqueued_ns)

    async def _wait_for_batch(self, key: tuple[object, ...]) -> None:
        """Wait until the queue for `key` fills a batch or its oldest request's delay is over."""
        deadline = self._queues[key][0].enqueued_ns / 1e9 + self.max_delay_s
        while not self._stopping and self._queued_count(key) < self._batch_capacity(key):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except TimeoutError:
                return

    def _queued_count(self, key: tuple[object, ...]) -> int:
        return sum(item.count for item in self._queues.get(key, ()))

    def _batch_capacity(self, key: tuple[object, ...]) -> int:
        """Images of the shape `key` in a full batch: `max_batch_size`, fewer if the pixel budget says so."""
        if self.max_batch_pixels is None:
            return self.max_batch_size
        per_image = math.prod(int(dim) for dim in key[2:])  # key: (dtype, C, H, W)
        return max(1, min(self.max_batch_size, self.max_batch_pixels // max(per_image, 1)))

    def _take_batch(self, key: tuple[object, ...]) -> list[_Pending]:
        """Whole requests from the front of the queue, up to a full batch (`_batch_capacity`).

        A request larger than a full batch runs alone rather than waiting forever (the server
        refuses requests over the pixel budget before they get here).
        """
        queue = self._queues[key]
        capacity = self._batch_capacity(key)
        batch: list[_Pending] = []
        images = 0
        while queue and (not batch or images + queue[0].count <= capacity):
            item = queue.popleft()
            self._change_queued(item, -1)
            if item.future.done():
                continue
            batch.append(item)
            images += item.count
        if not queue:
            del self._queues[key]
        return batch

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        started = time.perf_counter_ns()
        queue_ns = [started - item.enqueued_ns for item in batch]
        images = batch[0].images if len(batch) == 1 else np.concatenate([item.images for item in batch])
        wanted = frozenset().union(*(item.outputs for item in batch))
        gathered = time.perf_counter_ns()
        self._running_pixels = image_pixels(images.shape)
        try:
            outputs = await loop.run_in_executor(self._executor, self.batch_function, images, wanted)
        except Exception as err:  # the backend's failure belongs to every request in the batch
            logger.warning("model %s: batch of %d images failed: %s", self.name, len(images), err)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err)
            return
        finally:
            self._running_pixels = 0
        inferred = time.perf_counter_ns()
        per_pixel = (inferred - gathered) / 1e9 / image_pixels(images.shape)
        previous = self._seconds_per_pixel
        self._seconds_per_pixel = per_pixel if previous is None else (previous + per_pixel) / 2
        self._split_outputs(batch, outputs)
        split = time.perf_counter_ns()
        self.statistics.record_batch(
            queue_ns, len(images), BatchTimes(gathered - started, inferred - gathered, split - inferred)
        )
        record = BatchRecord(images=len(images), requests=len(batch), seconds=(inferred - gathered) / 1e9)
        if self._on_batch is not None:
            self._on_batch(record)

    @staticmethod
    def _split_outputs(batch: list[_Pending], outputs: dict[str, np.ndarray]) -> None:
        start = 0
        for item in batch:
            stop = start + item.count
            if not item.future.done():
                item.future.set_result(
                    {name: value[start:stop] for name, value in outputs.items() if name in item.outputs}
                )
            start = stop
