"""The dynamic batcher: batches formed, results split back correctly, shapes never mixed."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from noisyseg.serve.batcher import BatcherStopped, DynamicBatcher, QueueFull


def per_image(images: np.ndarray) -> np.ndarray:
    """A per-image computation whose result depends on the whole image (so a mix-up shows)."""
    flat = images.reshape(len(images), -1)
    return np.cumsum(flat, axis=1) * (1.0 + flat.std(axis=1, keepdims=True))


class RecordingModel:
    """Runs `per_image` on each batch, recording the batch shapes; optionally slow or failing."""

    def __init__(self, seconds: float = 0.0, fail_on_shape: tuple[int, ...] | None = None) -> None:
        self.seconds = seconds
        self.fail_on_shape = fail_on_shape
        self.batch_shapes: list[tuple[int, ...]] = []
        self.lock = threading.Lock()

    def __call__(self, images: np.ndarray, outputs: frozenset[str]) -> dict[str, np.ndarray]:
        with self.lock:
            self.batch_shapes.append(images.shape)
        time.sleep(self.seconds)
        if self.fail_on_shape is not None and images.shape[1:] == self.fail_on_shape:
            raise RuntimeError("backend refused this shape")
        result = {"scores": per_image(images), "sums": images.reshape(len(images), -1).sum(axis=1)}
        return {name: value for name, value in result.items() if name in outputs}


def make_batcher(model: RecordingModel, **kwargs) -> DynamicBatcher:
    options = {"max_batch_size": 8, "max_delay_s": 0.02, "max_queued_images": 256}
    options.update(kwargs)
    return DynamicBatcher(model, **options)


def images(seed: int, count: int = 1, size: tuple[int, int] = (4, 4)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, 1, *size)).astype(np.float32)


async def submit_all(batcher: DynamicBatcher, requests: list[np.ndarray], outputs=("scores",)) -> list:
    return await asyncio.gather(*(batcher.submit(item, outputs) for item in requests), return_exceptions=True)


def test_concurrent_requests_are_batched_and_each_gets_its_own_result() -> None:
    model = RecordingModel(seconds=0.01)
    requests = [images(seed, count=1 + seed % 3) for seed in range(30)]

    async def scenario() -> list:
        batcher = make_batcher(model)
        batcher.start()
        results = await submit_all(batcher, requests)
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result["scores"], per_image(request))
        assert set(result) == {"scores"}
    sizes = [shape[0] for shape in model.batch_shapes]
    assert sum(sizes) == sum(len(request) for request in requests)
    assert max(sizes) <= 8
    # 60 images at up to 8 per batch: far fewer calls than requests.
    assert len(sizes) <= 12, sizes


def test_requests_of_different_sizes_are_never_batched_together() -> None:
    model = RecordingModel()
    sizes = [(4, 4), (4, 6), (6, 4), (4, 4), (8, 8), (4, 6)] * 4
    requests = [images(seed, size=size) for seed, size in enumerate(sizes)]

    async def scenario() -> list:
        batcher = make_batcher(model)
        batcher.start()
        results = await submit_all(batcher, requests)
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result["scores"], per_image(request))
    assert {shape[1:] for shape in model.batch_shapes} == {(1, *size) for size in set(sizes)}
    assert len(model.batch_shapes) == len(set(sizes))


def test_a_lone_request_waits_at_most_the_delay_and_a_full_batch_does_not_wait() -> None:
    model = RecordingModel()

    async def scenario() -> tuple[float, float]:
        batcher = make_batcher(model, max_batch_size=4, max_delay_s=0.3)
        batcher.start()
        started = time.perf_counter()
        await batcher.submit(images(0), ["scores"])
        lone = time.perf_counter() - started
        started = time.perf_counter()
        await submit_all(batcher, [images(seed) for seed in range(4)])
        full = time.perf_counter() - started
        await batcher.stop()
        return lone, full

    lone, full = asyncio.run(scenario())
    assert 0.25 <= lone < 2.0
    assert full < 0.25
    assert [shape[0] for shape in model.batch_shapes] == [1, 4]


def test_a_request_larger_than_the_maximum_runs_alone() -> None:
    model = RecordingModel()

    async def scenario() -> list:
        batcher = make_batcher(model, max_batch_size=4)
        batcher.start()
        results = await submit_all(batcher, [images(1, count=6), images(2, count=2)])
        await batcher.stop()
        return results

    big, small = asyncio.run(scenario())
    np.testing.assert_array_equal(big["scores"], per_image(images(1, count=6)))
    np.testing.assert_array_equal(small["scores"], per_image(images(2, count=2)))
    assert sorted(shape[0] for shape in model.batch_shapes) == [2, 6]


def test_a_failing_batch_fails_only_its_requests_and_the_batcher_goes_on() -> None:
    model = RecordingModel(fail_on_shape=(1, 6, 6))

    async def scenario() -> list:
        batcher = make_batcher(model)
        batcher.start()
        results = await submit_all(batcher, [images(1, size=(6, 6)), images(2), images(3, size=(6, 6))])
        results.append(await batcher.submit(images(4), ["scores"]))
        await batcher.stop()
        return results

    bad1, good, bad2, later = asyncio.run(scenario())
    assert isinstance(bad1, RuntimeError) and isinstance(bad2, RuntimeError)
    np.testing.assert_array_equal(good["scores"], per_image(images(2)))
    np.testing.assert_array_equal(later["scores"], per_image(images(4)))


def test_a_full_queue_refuses_and_an_abandoned_request_never_runs() -> None:
    model = RecordingModel(seconds=0.2)

    async def scenario() -> None:
        batcher = make_batcher(model, max_batch_size=2, max_queued_images=4, max_delay_s=0.0)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(images(0, count=2), ["scores"]))
        await asyncio.sleep(0.05)  # the first batch is running; the next ones queue
        queued = asyncio.ensure_future(batcher.submit(images(1, count=2), ["scores"]))
        abandoned = asyncio.ensure_future(batcher.submit(images(2, count=2), ["scores"]))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="4 images queued"):
            await batcher.submit(images(3), ["scores"])
        abandoned.cancel()
        await asyncio.gather(first, queued)
        await batcher.stop()

    asyncio.run(scenario())
    assert [shape[0] for shape in model.batch_shapes] == [2, 2]


def test_stop_finishes_queued_requests_then_refuses_new_ones() -> None:
    model = RecordingModel(seconds=0.05)

    async def scenario() -> list:
        batcher = make_batcher(model, max_batch_size=2, max_delay_s=1.0)
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(images(seed), ["sums"])) for seed in range(5)]
        await asyncio.sleep(0.01)
        await batcher.stop()
        with pytest.raises(BatcherStopped):
            await batcher.submit(images(9), ["sums"])
        return [task.result() for task in pending]

    results = asyncio.run(scenario())
    for seed, result in enumerate(results):
        np.testing.assert_allclose(result["sums"], images(seed).reshape(1, -1).sum(axis=1), rtol=1e-6)


def test_statistics_count_requests_batches_and_durations_as_triton_defines_them() -> None:
    model = RecordingModel(seconds=0.05, fail_on_shape=(1, 6, 6))

    async def scenario() -> DynamicBatcher:
        batcher = make_batcher(model, max_batch_size=4, max_delay_s=0.2)
        batcher.start()
        # Whole requests up to 4 images: [1, 1, 1] run together, then [2] alone.
        await submit_all(batcher, [images(0), images(1), images(2), images(3, count=2)])
        failed = await submit_all(batcher, [images(4, size=(6, 6))])
        assert isinstance(failed[0], RuntimeError)
        await batcher.stop()
        return batcher

    stats = asyncio.run(scenario()).statistics.to_json("m", "1")
    assert [shape[0] for shape in model.batch_shapes] == [3, 2, 1]
    assert (stats["inference_count"], stats["execution_count"]) == (5, 2)
    assert stats["last_inference"] > 0
    inference = stats["inference_stats"]
    assert inference["success"]["count"] == 4 and inference["fail"]["count"] == 1
    for name in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert inference[name]["count"] == 4, name
    # Each request's model call slept 50 ms, and each request's time in the batcher covers its
    # queueing and its batch's three steps.
    assert inference["compute_infer"]["ns"] >= 4 * 50_000_000
    steps = sum(inference[name]["ns"] for name in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert inference["success"]["ns"] >= steps
    assert inference["cache_hit"] == inference["cache_miss"] == {"count": 0, "ns": 0}
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in stats["batch_stats"]] == [(2, 1), (3, 1)]
    assert all(b["compute_infer"]["ns"] >= 50_000_000 for b in stats["batch_stats"])


def test_batches_stay_within_the_pixel_budget_and_the_queue_within_its_pixels() -> None:
    model = RecordingModel(seconds=0.2)
    budget = 3 * 8 * 8  # pixels: three 8 x 8 images

    async def scenario() -> list:
        batcher = make_batcher(
            model, max_batch_size=8, max_delay_s=0.05, max_batch_pixels=budget, max_queued_pixels=4 * budget
        )
        batcher.start()
        small = [images(seed, size=(8, 8)) for seed in range(5)]
        wide = [images(10 + seed, count=2, size=(8, 12)) for seed in range(2)]
        results = await submit_all(batcher, small + wide)
        # The queue holds 4 budgets' worth: 12 images of 8 x 8 wait, a 13th is refused.
        blocker = asyncio.ensure_future(batcher.submit(images(20, count=3, size=(8, 8)), ["scores"]))
        await asyncio.sleep(0.05)  # a full batch: running now (0.2 s), and the queue empty again
        queued = [
            asyncio.ensure_future(batcher.submit(images(30 + seed, size=(8, 8)), ["scores"])) for seed in range(12)
        ]
        await asyncio.sleep(0)
        with pytest.raises(
            QueueFull, match=f"768 pixels queued, and this request's 64 would pass the limit of {4 * budget}"
        ):
            await batcher.submit(images(50, size=(8, 8)), ["scores"])
        await asyncio.gather(blocker, *queued)
        await batcher.stop()
        return [small + wide, results]

    requests, results = asyncio.run(scenario())
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result["scores"], per_image(request))
    pixels = [shape[0] * shape[2] * shape[3] for shape in model.batch_shapes]
    assert max(pixels) <= budget, model.batch_shapes
    # Three 8 x 8 images fill a batch; a request of two 8 x 12 images (192 pixels) runs alone.
    assert (3, 1, 8, 8) in model.batch_shapes and (2, 1, 8, 12) in model.batch_shapes


def test_a_full_queue_says_how_long_its_batches_will_take() -> None:
    model = RecordingModel(seconds=0.3)

    async def scenario() -> QueueFull:
        batcher = make_batcher(model, max_delay_s=0.0, max_batch_pixels=64, max_queued_pixels=3 * 64)
        batcher.start()
        await batcher.submit(images(0, size=(8, 8)), ["scores"])  # the pace: 0.3 s for 64 pixels
        running = asyncio.ensure_future(batcher.submit(images(1, size=(8, 8)), ["scores"]))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(batcher.submit(images(2 + seed, size=(8, 8)), ["scores"])) for seed in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as full:
            await batcher.submit(images(9, size=(8, 8)), ["scores"])
        await asyncio.gather(running, *queued)
        await batcher.stop()
        return full.value

    full = asyncio.run(scenario())
    # Three queued batches and the running one: four model calls of 0.3 s (a little more under load).
    assert full.retry_after_s in (2, 3), full.retry_after_s
