"""Load on loopback: 2,000 requests at concurrency 32 against `noisyseg serve`, zero errors,
every result identical to unbatched inference, batches actually formed, memory flat."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from serve_helpers import write_conv_model

from noisyseg.export.onnxruntime_runner import OnnxRuntimeRunner
from noisyseg.serve.loadgen import ServerProcess, run_load

REQUESTS = 2000
CONCURRENCY = 32
WARMUP = 200
# Allocator noise on top of a steady state; a leak of one 12 KiB response per request would add ~24 MiB.
MAX_RSS_GROWTH_BYTES = 12 * 2**20


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory):
    return write_conv_model(tmp_path_factory.mktemp("load") / "tiny.onnx")


@pytest.fixture(scope="module")
def server(model_path):
    server = ServerProcess(
        model_path, "--max-batch-size", "8", "--max-queue-delay-ms", "2", "--threads", "1", log_level="WARNING"
    )
    try:
        yield server.wait_until_ready()
    finally:
        server.kill()


def batch_sizes(address: str) -> tuple[float, float]:
    """(batched calls, images) from the server's batch-size histogram."""
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    count = re.search(r'^noisyseg_batch_size_count\{model="tiny"\} (\S+)$', text, re.MULTILINE)
    total = re.search(r'^noisyseg_batch_size_sum\{model="tiny"\} (\S+)$', text, re.MULTILINE)
    return (float(count.group(1)), float(total.group(1))) if count and total else (0.0, 0.0)


def test_2000_requests_at_concurrency_32(server, model_path) -> None:
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(1, 1, 32, 32)).astype(np.float32) for _ in range(REQUESTS)]
    host, port = "127.0.0.1", server.port

    warmup = asyncio.run(run_load(host, port, "tiny", images[:WARMUP], CONCURRENCY, outputs=("logits",)))
    assert warmup.errors() == []
    rss_before = server.rss_bytes()
    calls_before, images_before = batch_sizes(server.address)

    result = asyncio.run(
        run_load(host, port, "tiny", images, CONCURRENCY, outputs=("logits", "labels"), keep_replies=True)
    )
    rss_after = server.rss_bytes()
    calls_after, images_after = batch_sizes(server.address)

    assert result.errors() == []
    runner = OnnxRuntimeRunner(model_path, intra_op_threads=1)
    for image, reply in zip(images, result.replies, strict=True):
        # Decoded by tritonclient's own response parser, compared with batch-of-one inference.
        decoded = httpclient.InferenceServerClient.parse_response_body(reply.body, header_length=reply.header_length)
        expected = runner.run(image)["logits"]
        np.testing.assert_array_equal(decoded.as_numpy("logits"), expected)
        np.testing.assert_array_equal(decoded.as_numpy("labels"), expected.argmax(axis=1))
    assert images_after - images_before == REQUESTS
    mean_batch = (images_after - images_before) / (calls_after - calls_before)
    assert mean_batch > 2.0, f"requests were hardly batched (mean batch {mean_batch:.2f})"
    assert rss_after - rss_before < MAX_RSS_GROWTH_BYTES, f"server RSS grew {(rss_after - rss_before) / 2**20:.1f} MiB"
    print(
        f"\n{REQUESTS} requests at concurrency {CONCURRENCY}: {result.throughput:.0f} req/s, "
        f"p50 {result.percentile_ms(50):.1f} ms, p99 {result.percentile_ms(99):.1f} ms, mean batch {mean_batch:.1f}, "
        f"RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB"
    )
