"""Server metrics in the Prometheus text exposition format (version 0.0.4), kept by hand.

Three small thread-safe families (counter, gauge, histogram), each with fixed label names; the
inference threads and the event loop both update them, hence the locks.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    pairs = [f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _format_number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Family(ABC):
    kind = ""

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        self.name = name
        self.help_text = help_text
        self.label_names = tuple(label_names)
        self._lock = threading.Lock()

    def _key(self, labels: Sequence[str]) -> tuple[str, ...]:
        if len(labels) != len(self.label_names):
            raise ValueError(f"metric {self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(labels)

    def _header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} {self.kind}"]

    @abstractmethod
    def render(self) -> list[str]:
        """The family's lines in the text exposition format."""


class Counter(_Family):
    kind = "counter"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, label_names)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self._header() + [
            f"{self.name}{_format_labels(self.label_names, key)} {_format_number(value)}" for key, value in items
        ]


class Gauge(Counter):
    kind = "gauge"

    def set(self, *labels: str, value: float) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = value


class Histogram(_Family):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float], label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, label_names)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        # Per label set: counts per bucket (not cumulative), the sum and the total count.
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, value: float, *labels: str) -> None:
        key = self._key(labels)
        index = next(i for i, bound in enumerate(self.buckets) if value <= bound)
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * len(self.buckets), [0.0]))
            counts[index] += 1
            total[0] += value

    def count(self, *labels: str) -> int:
        with self._lock:
            series = self._series.get(self._key(labels))
            return sum(series[0]) if series else 0

    def render(self) -> list[str]:
        lines = self._header()
        with self._lock:
            items = sorted((key, (list(counts), total[0])) for key, (counts, total) in self._series.items())
        for key, (counts, total) in items:
            cumulative = 0
            for bound, count in zip(self.buckets, counts, strict=True):
                cumulative += count
                labels = _format_labels(self.label_names, key, f'le="{_format_number(bound)}"')
                lines.append(f"{self.name}_bucket{labels} {cumulative}")
            plain = _format_labels(self.label_names, key)
            lines.append(f"{self.name}_sum{plain} {_format_number(total)}")
            lines.append(f"{self.name}_count{plain} {cumulative}")
        return lines


class ServerMetrics:
    """The server's metric families; `render()` is the body of `GET /metrics`."""

    def __init__(self) -> None:
        self.http_requests = Counter(
            "noisyseg_http_requests_total", "HTTP requests answered, by route and status code.", ("route", "code")
        )
        self.grpc_requests = Counter(
            "noisyseg_grpc_requests_total", "gRPC calls answered, by method and status code.", ("method", "code")
        )
        self.inference_requests = Counter(
            "noisyseg_inference_requests_total", "Inference requests, by model and outcome.", ("model", "outcome")
        )
        self.inference_latency = Histogram(
            "noisyseg_inference_request_duration_seconds",
            "Time from receiving an inference request to sending its response.",
            LATENCY_BUCKETS_S,
            ("model",),
        )
        self.batch_size = Histogram(
            "noisyseg_batch_size", "Images per batched model call.", BATCH_SIZE_BUCKETS, ("model",)
        )
        self.queued_images = Gauge(
            "noisyseg_queued_images", "Images waiting in the dynamic batcher's queue.", ("model",)
        )

    def render(self) -> str:
        families: list[_Family] = [
            self.http_requests,
            self.grpc_requests,
            self.inference_requests,
            self.inference_latency,
            self.batch_size,
            self.queued_images,
        ]
        lines: list[str] = []
        for family in families:
            lines.extend(family.render())
        return "\n".join(lines) + "\n"
