"""Triton's statistics extension: a model's request and batch counts with cumulative durations.

The dynamic batcher keeps one `ModelStatistics` per model, so requests over HTTP and gRPC count
alike. The fields are Triton's (`GET /v2/models/{name}/stats`, gRPC ModelStatistics):
- `success` / `fail`: requests answered / failed (rejected when the queue is full, the model
  failed, or the caller gave up), with the time each spent in the batcher (queue to result);
- `queue`: time from entering the queue to the start of its batch;
- `compute_input` / `compute_infer` / `compute_output`: the batch's input gathering, model call
  and output split, counted once per request of the batch (as Triton does);
- `batch_stats`: the same three per batch size, counted once per model call;
- `inference_count` (images inferred), `execution_count` (model calls), `last_inference` (ms
  since the epoch). No response cache exists, so `cache_hit` and `cache_miss` stay zero.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")
BATCH_DURATIONS = ("compute_input", "compute_infer", "compute_output")


@dataclass(frozen=True)
class BatchTimes:
    """Nanoseconds one batched call spent on each step."""

    compute_input: int
    compute_infer: int
    compute_output: int


class ModelStatistics:
    """Counts and cumulative nanoseconds, updated from the event loop and read by any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # name -> [count, ns]
        self._durations = {name: [0, 0] for name in DURATIONS}
        self._batches: dict[int, dict[str, list[int]]] = {}
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0

    def record_request(self, succeeded: bool, ns: int) -> None:
        with self._lock:
            self._add("success" if succeeded else "fail", ns)

    def record_batch(self, queue_ns: list[int], images: int, times: BatchTimes) -> None:
        """One model call on `images` images from requests that waited `queue_ns` each."""
        with self._lock:
            for waited in queue_ns:
                self._add("queue", waited)
                for name in BATCH_DURATIONS:
                    self._add(name, getattr(times, name))
            per_size = self._batches.setdefault(images, {name: [0, 0] for name in BATCH_DURATIONS})
            for name in BATCH_DURATIONS:
                per_size[name][0] += 1
                per_size[name][1] += getattr(times, name)
            self.inference_count += images
            self.execution_count += 1
            self.last_inference_ms = time.time_ns() // 1_000_000

    def _add(self, name: str, ns: int) -> None:
        self._durations[name][0] += 1
        self._durations[name][1] += ns

    def to_json(self, name: str, version: str) -> dict[str, Any]:
        """One entry of Triton's `model_stats` list."""
        with self._lock:
            return {
                "name": name,
                "version": version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {key: _duration(value) for key, value in self._durations.items()},
                "batch_stats": [
                    {"batch_size": size, **{key: _duration(value) for key, value in per_size.items()}}
                    for size, per_size in sorted(self._batches.items())
                ],
            }


def _duration(value: list[int]) -> dict[str, int]:
    return {"count": value[0], "ns": value[1]}
