"""Serving benchmark: `noisyseg serve` under load vs calling the ONNX Runtime runner directly.

One run measures, for each concurrency c in (1, 8, 32): the runner itself on batches of c
images (images/s, per-call latency), both as `OnnxRuntimeRunner` opens the model by default and
with the server's session options (no thread spinning), then the server with c clients each sending one image per
request (images/s, per-request latency p50/p99). The model is a UNet at the CPU demo width
(base_width 16, random weights: speed does not depend on them) at 128 x 128, exported to ONNX.
The target: at concurrency 32 the server delivers at least 80% of the better direct throughput.

    .venv/bin/python benchmarks/bench_serve.py            # prints a Markdown table
    .venv/bin/python -m pytest benchmarks/bench_serve.py --benchmark-only -s

Under `--benchmark-disable` (the test run) it shrinks to a few requests, so it cannot rot.

With `--perf-analyzer` (or a `perf_analyzer` binary on PATH under pytest) it also runs Triton's
own load generator against the same model served by `noisyseg serve`, over HTTP and over gRPC:

    perf_analyzer -m unet -u 127.0.0.1:PORT -i http|grpc --shape image:1,SIZE,SIZE --concurrency-range 1:32

and records its throughput and latency (and the server-side queue and compute times it reads
through the statistics extension) beside this load generator's. The binary comes with the
`perf-analyzer` wheel on PyPI, which needs glibc 2.38 or newer.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from noisyseg.export.onnx_export import ExportConfig, export_checkpoint, sample_images
from noisyseg.export.onnxruntime_runner import OnnxRuntimeRunner
from noisyseg.models import create_model
from noisyseg.models.model_file import ModelInfo, save_model
from noisyseg.serve.loadgen import ServerProcess, run_load
from noisyseg.serve.runtimes import OnnxRuntimeBackend

CONCURRENCIES = (1, 8, 32)
TARGET_RATIO = 0.8


@dataclass
class BenchConfig:
    size: int = 128
    base_width: int = 16
    # Requests per concurrency level (the server side) and seconds per batch size (direct).
    requests_per_client: int = 8
    min_requests: int = 64
    direct_seconds: float = 8.0
    max_batch_size: int = 32
    max_queue_delay_ms: float = 5.0


@dataclass
class Row:
    concurrency: int
    # The runner as `OnnxRuntimeRunner(path)` makes it, and with the server's session options
    # (thread spinning off); latencies are of the faster of the two.
    direct_default_images_per_s: float
    direct_no_spin_images_per_s: float
    direct_p50_ms: float
    direct_p99_ms: float
    server_images_per_s: float
    server_p50_ms: float
    server_p99_ms: float

    @property
    def direct_images_per_s(self) -> float:
        return max(self.direct_default_images_per_s, self.direct_no_spin_images_per_s)

    @property
    def ratio(self) -> float:
        """Server throughput over the best direct throughput."""
        return self.server_images_per_s / self.direct_images_per_s


def export_demo_unet(directory: Path, config: BenchConfig) -> Path:
    torch.manual_seed(0)
    model = create_model("unet", base_width=config.base_width)
    checkpoint = directory / "model.safetensors"
    classes = ["background", "esophagus", "heart", "trachea", "aorta"]
    save_model(checkpoint, model, ModelInfo("unet", {"base_width": config.base_width}, classes))
    onnx_path = directory / "unet.onnx"
    export_checkpoint(checkpoint, onnx_path, ExportConfig(exporter="torchscript"))
    return onnx_path


def measure_direct(
    runner: OnnxRuntimeRunner, batch: np.ndarray, seconds: float, min_calls: int = 3
) -> tuple[float, list[float]]:
    """Images/s and per-call latencies of the runner on `batch`, after one warm-up call."""
    runner.run(batch)
    latencies: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(latencies) < min_calls:
        call = time.perf_counter()
        runner.run(batch)
        latencies.append(time.perf_counter() - call)
    return len(batch) * len(latencies) / (time.perf_counter() - started), latencies


@dataclass
class PerfAnalyzerRow:
    """One concurrency level of perf_analyzer's CSV (`-f`); latencies are per request."""

    protocol: str
    concurrency: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    server_queue_ms: float
    server_compute_infer_ms: float


def run_perf_analyzer(
    binary: str, onnx_path: Path, config: BenchConfig, workdir: Path, concurrency_range: str
) -> list[PerfAnalyzerRow]:
    """perf_analyzer over HTTP and gRPC against `noisyseg serve` serving `onnx_path`."""
    server = ServerProcess(
        onnx_path,
        "--name",
        "unet",
        "--max-batch-size",
        str(config.max_batch_size),
        "--max-queue-delay-ms",
        str(config.max_queue_delay_ms),
        log_level="WARNING",
    ).wait_until_ready()
    rows: list[PerfAnalyzerRow] = []
    try:
        for protocol, address in (("http", server.address), ("grpc", server.grpc_address)):
            report = workdir / f"perf_analyzer_{protocol}.csv"
            command = [
                binary,
                "-m",
                "unet",
                "-u",
                address,
                "-i",
                protocol,
                "--shape",
                f"image:1,{config.size},{config.size}",
                "--concurrency-range",
                concurrency_range,
                "-f",
                str(report),
            ]
            subprocess.run(command, check=True, timeout=3600)
            rows.extend(_perf_analyzer_rows(protocol, report))
    finally:
        server.kill()
    return rows


def _perf_analyzer_rows(protocol: str, report: Path) -> list[PerfAnalyzerRow]:
    """Its CSV: one line per concurrency, latencies and server times in microseconds."""
    with report.open(newline="") as handle:
        rows = [
            PerfAnalyzerRow(
                protocol,
                int(line["Concurrency"]),
                float(line["Inferences/Second"]),
                float(line["p50 latency"]) / 1000,
                float(line["p99 latency"]) / 1000,
                float(line["Server Queue"]) / 1000,
                float(line["Server Compute Infer"]) / 1000,
            )
            for line in csv.DictReader(handle)
        ]
    # perf_analyzer orders its lines by throughput.
    return sorted(rows, key=lambda row: row.concurrency)


def perf_analyzer_table(rows: list[PerfAnalyzerRow]) -> str:
    lines = [
        "| protocol | concurrency | images/s | p50 / p99 ms per request | server queue / compute ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row.protocol} | {row.concurrency} | {row.images_per_s:.1f} | {row.p50_ms:.0f} / {row.p99_ms:.0f} | "
            f"{row.server_queue_ms:.1f} / {row.server_compute_infer_ms:.1f} |"
        )
    return "\n".join(lines)


def run_benchmark(config: BenchConfig, onnx_path: Path) -> list[Row]:
    default_runner = OnnxRuntimeRunner(onnx_path)
    # The server's own backend, whose session runs without thread spinning.
    no_spin_runner = OnnxRuntimeBackend(onnx_path, "unet").load().runner
    server = ServerProcess(
        onnx_path,
        "--name",
        "unet",
        "--max-batch-size",
        str(config.max_batch_size),
        "--max-queue-delay-ms",
        str(config.max_queue_delay_ms),
        log_level="WARNING",
    ).wait_until_ready()
    rows = []
    try:
        for concurrency in CONCURRENCIES:
            batch = sample_images((concurrency, 1, config.size, config.size), seed=concurrency)
            default_rate, default_latencies = measure_direct(default_runner, batch, config.direct_seconds)
            no_spin_rate, no_spin_latencies = measure_direct(no_spin_runner, batch, config.direct_seconds)
            direct_latencies = default_latencies if default_rate >= no_spin_rate else no_spin_latencies
            requests = max(config.min_requests, config.requests_per_client * concurrency)
            images = [sample_images((1, 1, config.size, config.size), seed=i) for i in range(requests)]
            # Warm-up: one round per client, so connections and ONNX Runtime's arenas are ready.
            asyncio.run(run_load("127.0.0.1", server.port, "unet", images[:concurrency], concurrency))
            result = asyncio.run(run_load("127.0.0.1", server.port, "unet", images, concurrency))
            if result.errors():
                raise RuntimeError(f"server errors at concurrency {concurrency}: {result.errors()[:3]}")
            rows.append(
                Row(
                    concurrency,
                    default_rate,
                    no_spin_rate,
                    float(np.percentile(direct_latencies, 50) * 1000),
                    float(np.percentile(direct_latencies, 99) * 1000),
                    result.throughput,
                    result.percentile_ms(50),
                    result.percentile_ms(99),
                )
            )
    finally:
        server.kill()
    return rows


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| concurrency (= direct batch) | direct images/s (default / no spin) | direct p50 / p99 ms per call "
        "| server images/s | server p50 / p99 ms per request | server / best direct |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row.concurrency} | "
            f"{row.direct_default_images_per_s:.1f} / {row.direct_no_spin_images_per_s:.1f} | "
            f"{row.direct_p50_ms:.0f} / {row.direct_p99_ms:.0f} | "
            f"{row.server_images_per_s:.1f} | {row.server_p50_ms:.0f} / {row.server_p99_ms:.0f} | "
            f"{100 * row.ratio:.0f}% |"
        )
    return "\n".join(lines)


def conditions() -> str:
    load = os.getloadavg()[0]
    return (
        f"{os.cpu_count()} CPU cores, load average {load:.1f} at the start, onnxruntime CPU, torch {torch.__version__}"
    )


def test_server_throughput_vs_direct_runner(benchmark, tmp_path: Path) -> None:
    quick = benchmark.disabled
    config = (
        BenchConfig(size=64, base_width=4, min_requests=8, requests_per_client=1, direct_seconds=0.2)
        if quick
        else BenchConfig()
    )
    started_conditions = conditions()
    onnx_path = export_demo_unet(tmp_path, config)
    rows = benchmark.pedantic(run_benchmark, args=(config, onnx_path), rounds=1, iterations=1)
    benchmark.extra_info.update(
        {"config": asdict(config), "rows": [asdict(row) for row in rows], "conditions": started_conditions}
    )
    print(f"\n{started_conditions}\n{markdown_table(rows)}")
    assert [row.concurrency for row in rows] == list(CONCURRENCIES)
    assert all(row.server_images_per_s > 0 and row.direct_images_per_s > 0 for row in rows)


def test_perf_analyzer_csv_is_read_as_its_documentation_shows(tmp_path: Path) -> None:
    """The `-f` report of perf_analyzer's documentation (Triton's perf_analyzer.md, microseconds)."""
    report = tmp_path / "perf.csv"
    report.write_text(
        "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
        "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency\n"
        "1,69.2,225,2148,64,206,11781,19,0,13891,18795,19753,21018\n"
        "3,84.2,237,1768,21673,209,11742,17,0,35398,43984,47085,51701\n"
    )
    rows = _perf_analyzer_rows("grpc", report)
    assert rows[0] == PerfAnalyzerRow("grpc", 1, 69.2, 13.891, 21.018, 0.064, 11.781)
    assert [row.concurrency for row in rows] == [1, 3]


@pytest.mark.skipif(
    shutil.which("perf_analyzer") is None,
    reason="no perf_analyzer on PATH (pip install perf-analyzer; needs glibc 2.38+)",
)
def test_perf_analyzer_over_http_and_grpc(benchmark, tmp_path: Path) -> None:
    quick = benchmark.disabled
    config = BenchConfig(size=64, base_width=4) if quick else BenchConfig()
    onnx_path = export_demo_unet(tmp_path, config)
    binary = shutil.which("perf_analyzer")
    assert binary is not None
    concurrency = "1:2" if quick else "1:32"
    rows = benchmark.pedantic(
        run_perf_analyzer, args=(binary, onnx_path, config, tmp_path, concurrency), rounds=1, iterations=1
    )
    benchmark.extra_info.update({"config": asdict(config), "perf_analyzer": [asdict(row) for row in rows]})
    print(f"\n{conditions()}\n{perf_analyzer_table(rows)}")
    assert {row.protocol for row in rows} == {"http", "grpc"}
    assert all(row.images_per_s > 0 for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=BenchConfig.size, help="image height = width (default 128)")
    parser.add_argument("--requests-per-client", type=int, default=BenchConfig.requests_per_client)
    parser.add_argument("--direct-seconds", type=float, default=BenchConfig.direct_seconds)
    parser.add_argument(
        "--max-queue-delay-ms", type=float, default=BenchConfig.max_queue_delay_ms, help="the server's batching delay"
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument(
        "--perf-analyzer",
        nargs="?",
        const="perf_analyzer",
        metavar="BINARY",
        help="also run Triton's perf_analyzer (default: the one on PATH) over HTTP and gRPC",
    )
    parser.add_argument(
        "--concurrency-range", default="1:32", help="perf_analyzer's --concurrency-range (default 1:32)"
    )
    args = parser.parse_args()
    config = BenchConfig(
        size=args.size,
        requests_per_client=args.requests_per_client,
        direct_seconds=args.direct_seconds,
        max_queue_delay_ms=args.max_queue_delay_ms,
    )
    binary = shutil.which(args.perf_analyzer) if args.perf_analyzer else None
    if args.perf_analyzer and binary is None:
        parser.error(
            f"--perf-analyzer: no executable {args.perf_analyzer!r} (pip install perf-analyzer; it needs glibc 2.38+)"
        )
    started_conditions = conditions()
    analyzer_rows: list[PerfAnalyzerRow] = []
    with tempfile.TemporaryDirectory() as workdir:
        onnx_path = export_demo_unet(Path(workdir), config)
        rows = run_benchmark(config, onnx_path)
        if binary is not None:
            analyzer_rows = run_perf_analyzer(binary, onnx_path, config, Path(workdir), args.concurrency_range)
    print(started_conditions)
    print(markdown_table(rows))
    if analyzer_rows:
        print(perf_analyzer_table(analyzer_rows))
    at_32 = rows[-1].ratio
    print(
        f"target (server >= {100 * TARGET_RATIO:.0f}% of direct at concurrency 32): "
        f"{'met' if at_32 >= TARGET_RATIO else 'NOT met'} ({100 * at_32:.0f}%)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "config": asdict(config),
                    "conditions": started_conditions,
                    "rows": [asdict(row) for row in rows],
                    "perf_analyzer": [asdict(row) for row in analyzer_rows],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
