"""Server memory: one large request at a time, and many at once under the inference budget.

Part 1, one large request (issue 15). Each case starts its own server process (`noisyseg serve
--threads 1`) on a one-layer conv model (1 -> 3 classes), warms it up with a 64 x 64 request,
then sends one 1 x 1 x S x S image (S = 2048 by default). Measured from /proc: the resident
memory before the request (VmRSS) and the process's peak (VmHWM) and, 2 s after the response,
its resident memory again; the growth is peak - before. The same image also goes through the
model alone (`Runtime.infer`, the call the batcher makes, no server) in a fresh process warmed up
the same way: ONNX Runtime's own working memory (its convolution buffers and arena) is the
model's cost, not the server's. The tensors involved are the input and every output array
computed for the request (the model's logits, and probs/labels derived from them). The target:
the server adds at most the tensors involved once more (growth - model alone <= 1x).

Part 2, many at once (issue 26). A server process with its default limits (`--max-batch-pixels`
one 2048 x 2048 image, one batch's worth queued, `--max-held-body-mb 256`) on a UNet exported
as `noisyseg export onnx` does (5 classes, base width 16, the phantom's class names; weights
freshly initialised, on which neither memory nor time depend), then on the one-layer conv model.
First one request over the 64 MiB response limit per protocol (binary `logits` over HTTP, every
output over gRPC): its time to the refusal, and whether the model ran (the statistics'
execution count). Then C clients (16 by default, every other one over gRPC) each send one
1 x 1 x S x S image asking for `labels`, retrying after Retry-After on a 503, until every one
has its answer; every answer is counted, and every 200 is checked against the model run directly.
Meanwhile a separate process probes `GET /v2/health/ready` every 50 ms, and the server's
resident memory is sampled every 20 ms (and its VmHWM read at the end). The budget's cost is
the model alone on one batch at the budget (one S x S image), in a fresh process; the target:
peak RSS <= RSS at rest + that cost + the fixed overhead stated in docs/serving.md.

    .venv/bin/python benchmarks/bench_serve_memory.py              # both parts, Markdown tables
    .venv/bin/python benchmarks/bench_serve_memory.py --part concurrent --model trained.onnx
    .venv/bin/python -m pytest benchmarks/bench_serve_memory.py --benchmark-only -s

Under `--benchmark-disable` (the test run) it shrinks to S = 256 (and 4 clients), so it cannot rot.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from bench_serve import BenchConfig, export_demo_unet
from tritonclient.grpc import service_pb2

from noisyseg.export.onnxruntime_runner import OnnxRuntimeRunner
from noisyseg.serve.loadgen import CLASS_NAMES, ServerProcess, binary_infer_body, write_conv_model
from noisyseg.serve.runtimes import OUTPUT_NAMES, OnnxRuntimeBackend

TARGET_RATIO = 1.0
REFUSAL_LIMIT_MS = 100.0
AFTER_S = 2.0
MIB = 2**20


@dataclass(frozen=True)
class Case:
    name: str
    outputs: tuple[str, ...] | None  # None: no outputs named (every output, as JSON)
    binary_input: bool
    binary_outputs: bool
    server_args: tuple[str, ...] = ()


CASES = (
    Case("binary in, all outputs binary", ("logits", "probs", "labels"), True, True, ("--max-response-mb", "1024")),
    Case("binary in, labels as JSON", ("labels",), True, False),
    Case("binary in, no outputs named, JSON (400 past the 64 MiB limit)", None, True, False),
    Case("JSON in, labels as JSON", ("labels",), False, False),
)


@dataclass
class Row:
    case: str
    status: int
    request_mib: float
    response_mib: float
    tensors_mib: float
    rss_before_mib: float
    peak_mib: float
    rss_after_mib: float
    model_alone_growth_mib: float

    @property
    def growth_mib(self) -> float:
        return self.peak_mib - self.rss_before_mib

    @property
    def server_share_mib(self) -> float:
        return self.growth_mib - self.model_alone_growth_mib

    @property
    def ratio(self) -> float:
        return self.server_share_mib / self.tensors_mib


def request_body(image: np.ndarray, case: Case) -> tuple[bytes, dict[str, str]]:
    tensor: dict = {"name": "image", "shape": list(image.shape), "datatype": "FP32"}
    raw = b""
    if case.binary_input:
        raw = image.tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
    else:
        # Three decimals, as a client printing pixels would: short numbers keep 2048 x 2048
        # under the 64 MiB body limit.
        tensor["data"] = np.round(image.astype(np.float64), 3).ravel().tolist()
    header: dict = {"inputs": [tensor]}
    if case.outputs is not None:
        header["outputs"] = [
            {"name": name, "parameters": {"binary_data": case.binary_outputs}} for name in case.outputs
        ]
    text = json.dumps(header).encode()
    return text + raw, {"Inference-Header-Content-Length": str(len(text))} if raw else {}


def tensor_bytes(image: np.ndarray, case: Case) -> int:
    """The input plus every array the server computes: logits always (the model's output)."""
    pixels = image.size
    classes = len(CLASS_NAMES)
    wanted = set(case.outputs) if case.outputs is not None else {"logits", "probs", "labels"}
    computed = {
        "logits": 4 * classes * pixels,
        "probs": 4 * classes * pixels if "probs" in wanted else 0,
        "labels": 8 * pixels if "labels" in wanted else 0,
    }
    return image.nbytes + sum(computed.values())


def post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v2/models/conv/infer", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, len(response.read())
    finally:
        conn.close()


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found")


def model_alone_growth(model: Path, size: int, outputs: tuple[str, ...], threads: int = 1) -> float:
    """Peak RSS growth of `Runtime.infer` on one S x S image, in a fresh process (MiB)."""
    command = [
        sys.executable,
        __file__,
        "--model-alone",
        str(model),
        "--size",
        str(size),
        "--outputs",
        ",".join(outputs),
        "--threads",
        str(threads),
    ]
    return float(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])


def _run_model_alone(model: Path, size: int, outputs: frozenset[str], threads: int) -> float:
    runtime = OnnxRuntimeBackend(model, name="conv", intra_op_threads=threads).load()
    rng = np.random.default_rng(0)
    runtime.infer(rng.normal(size=(1, 1, 64, 64)).astype(np.float32), outputs)
    image = rng.normal(size=(1, 1, size, size)).astype(np.float32)
    before = _status_mib("VmRSS")
    runtime.infer(image, outputs)
    return _status_mib("VmHWM") - before


def measure(model: Path, case: Case, size: int) -> Row:
    server = ServerProcess(model, "--threads", "1", *case.server_args, log_level="WARNING").wait_until_ready()
    try:
        rng = np.random.default_rng(0)
        warm = rng.normal(size=(1, 1, 64, 64)).astype(np.float32)
        assert post(server.port, *request_body(warm, case))[0] in (200, 400)
        image = rng.normal(size=(1, 1, size, size)).astype(np.float32)
        body, headers = request_body(image, case)
        before = server.rss_bytes()
        status, response_size = post(server.port, body, headers)
        peak = server.peak_rss_bytes()
        time.sleep(AFTER_S)  # a refused request's arrays go with its traceback, at the next garbage collection
        after = server.rss_bytes()
    finally:
        server.kill()
    alone = model_alone_growth(model, size, case.outputs or OUTPUT_NAMES)
    return Row(
        case.name,
        status,
        len(body) / MIB,
        response_size / MIB,
        tensor_bytes(image, case) / MIB,
        before / MIB,
        peak / MIB,
        after / MIB,
        alone,
    )


def run_benchmark(size: int, workdir: Path) -> list[Row]:
    model = write_conv_model(workdir / "conv.onnx")
    return [measure(model, case, size) for case in CASES]


def markdown_table(rows: list[Row], size: int) -> str:
    lines = [
        f"| 1 x 1 x {size} x {size} request | HTTP | request MiB | response MiB | tensors MiB "
        "| server RSS before / peak / after MiB "
        "| server growth MiB (/ tensors) | model alone growth MiB | server's share MiB (/ tensors) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row.case} | {row.status} | {row.request_mib:.1f} | {row.response_mib:.1f} | {row.tensors_mib:.0f} | "
            f"{row.rss_before_mib:.0f} / {row.peak_mib:.0f} / {row.rss_after_mib:.0f} | "
            f"{row.growth_mib:.0f} ({row.growth_mib / row.tensors_mib:.2f}x) | "
            f"{row.model_alone_growth_mib:.0f} | {row.server_share_mib:.0f} ({row.ratio:.2f}x) |"
        )
    return "\n".join(lines)


def test_server_peak_memory_for_one_large_request(benchmark, tmp_path: Path) -> None:
    size = 256 if benchmark.disabled else 2048
    rows = benchmark.pedantic(run_benchmark, args=(size, tmp_path), rounds=1, iterations=1)
    benchmark.extra_info.update({"size": size, "rows": [asdict(row) for row in rows]})
    print(f"\n{markdown_table(rows, size)}")
    # Every output of 2048 x 2048 as JSON text passes the 64 MiB response limit; of 256 x 256, not.
    assert [row.status for row in rows] == [200, 200, 400 if size == 2048 else 200, 200]
    if not benchmark.disabled:  # at 256 x 256 the tensors are smaller than allocator noise
        assert all(row.ratio <= TARGET_RATIO for row in rows), markdown_table(rows, size)


# Part 2: many large requests at once.
CLIENTS = 16
HEALTH_INTERVAL_S = 0.05
RSS_INTERVAL_S = 0.02
# Every client gives up after this long (a server that never answered would show as missing answers).
RUN_LIMIT_S = 1800.0
# Probes the health route from its own process (a prober among the clients' threads would count
# their work on answers as the server's delay) until `stop` exists; prints [start, seconds, status].
HEALTH_PROBER = """
import http.client, json, os, sys, time
port, stop, interval = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
probes = []
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
while not os.path.exists(stop):
    started = time.time()
    try:
        conn.request("GET", "/v2/health/ready")
        response = conn.getresponse()
        response.read()
        status = response.status
    except OSError:
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        status = 0
    probes.append([started, time.time() - started, status])
    time.sleep(interval)
print(json.dumps(probes))
"""


@dataclass
class Answer:
    protocol: str
    status: str  # HTTP status or gRPC code name
    retry_after: bool
    seconds: float


@dataclass
class ConcurrentRow:
    model: str
    size: int
    clients: int
    answers: dict[str, int]
    wrong: int  # 200s whose labels differ from the model run directly
    missing: int  # clients that never got their labels
    seconds: float
    rss_rest_mib: float
    peak_mib: float
    rss_after_mib: float
    budget_cost_mib: float
    health_probes: int
    health_p50_ms: float
    health_p99_ms: float
    health_max_ms: float
    refusals: dict[str, tuple[str, float, bool]] = field(default_factory=dict)  # protocol -> (status, ms, model ran)

    @property
    def over_rest_and_budget_mib(self) -> float:
        return self.peak_mib - self.rss_rest_mib - self.budget_cost_mib


def grpc_request(model: str, image: np.ndarray, outputs: tuple[str, ...]) -> bytes:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="image", datatype="FP32", shape=image.shape)
    request.raw_input_contents.append(image.tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request.SerializeToString()


def http_labels(body: bytes, header_length: int) -> np.ndarray:
    import tritonclient.http as httpclient  # its gevent is only needed here

    return httpclient.InferenceServerClient.parse_response_body(body, header_length=header_length).as_numpy("labels")


def reference_labels(model: Path, image: np.ndarray) -> np.ndarray:
    outputs = OnnxRuntimeRunner(model).run(image)
    return outputs["labels"] if "labels" in outputs else outputs.get("logits", outputs.get("probs")).argmax(axis=1)


class Client(threading.Thread):
    """Sends one image for `labels` until it gets an answer other than 503 / UNAVAILABLE, waiting
    Retry-After (1 s over gRPC, which has no header) between tries."""

    def __init__(
        self, server: ServerProcess, model: str, image_index: int, image: np.ndarray, protocol: str, deadline: float
    ) -> None:
        super().__init__(daemon=True)
        self.server, self.model, self.image_index, self.protocol, self.deadline = (
            server,
            model,
            image_index,
            protocol,
            deadline,
        )
        self.answers: list[Answer] = []
        self.labels: np.ndarray | None = None
        if protocol == "http":
            self.body, self.header_length = binary_infer_body(image, ["labels"])
        else:
            self.message = grpc_request(model, image, ("labels",))

    def run(self) -> None:
        channel = grpc.insecure_channel(
            self.server.grpc_address,
            options=[("grpc.max_receive_message_length", 2**31 - 1), ("grpc.max_send_message_length", 2**31 - 1)],
        )
        try:
            while time.monotonic() < self.deadline:
                started = time.perf_counter()
                retry = self._http(started) if self.protocol == "http" else self._grpc(channel, started)
                if retry is None:
                    return
                time.sleep(retry)
        finally:
            channel.close()

    def _http(self, started: float) -> float | None:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=RUN_LIMIT_S)
        try:
            conn.request(
                "POST",
                f"/v2/models/{self.model}/infer",
                body=self.body,
                headers={"Inference-Header-Content-Length": str(self.header_length)},
            )
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        retry_after = response.getheader("Retry-After")
        self.answers.append(
            Answer("http", str(response.status), retry_after is not None, time.perf_counter() - started)
        )
        if response.status == 200:
            self.labels = http_labels(body, int(response.getheader("Inference-Header-Content-Length")))
        return float(retry_after) if response.status == 503 and retry_after is not None else None

    def _grpc(self, channel: grpc.Channel, started: float) -> float | None:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        try:
            answer = call(self.message, timeout=RUN_LIMIT_S)
        except grpc.RpcError as err:
            retry_after = dict(err.trailing_metadata() or ()).get("retry-after")
            self.answers.append(Answer("grpc", err.code().name, retry_after is not None, time.perf_counter() - started))
            return float(retry_after) if err.code() == grpc.StatusCode.UNAVAILABLE and retry_after is not None else None
        self.answers.append(Answer("grpc", "OK", False, time.perf_counter() - started))
        self.labels = np.frombuffer(service_pb2.ModelInferResponse.FromString(answer).raw_output_contents[0], "<i8")
        return None


def over_limit_refusals(server: ServerProcess, model: str, image: np.ndarray) -> dict[str, tuple[str, float, bool]]:
    """One request per protocol for every output (over the response limit): its answer, its time,
    and whether the model ran for it (the statistics' execution count)."""

    def executions() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("GET", f"/v2/models/{model}/stats")
        count = json.loads(conn.getresponse().read())["model_stats"][0]["execution_count"]
        conn.close()
        return count

    outputs = ("logits", "probs", "labels")
    body, header_length = binary_infer_body(image, outputs)
    message = grpc_request(model, image, outputs)
    refusals = {}
    for protocol in ("http", "grpc"):
        before = executions()
        started = time.perf_counter()
        if protocol == "http":
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
            conn.request(
                "POST",
                f"/v2/models/{model}/infer",
                body=body,
                headers={"Inference-Header-Content-Length": str(header_length)},
            )
            status = str(conn.getresponse().status)
            conn.close()
        else:
            with grpc.insecure_channel(
                server.grpc_address, options=[("grpc.max_send_message_length", 2**31 - 1)]
            ) as channel:
                try:
                    channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(message, timeout=600)
                    status = "OK"
                except grpc.RpcError as err:
                    status = err.code().name
        refusals[protocol] = (status, (time.perf_counter() - started) * 1000, executions() != before)
    return refusals


def refusal_rounds(workdir: Path, size: int, rounds: int = 5) -> float:
    """`over_limit_refusals` `rounds` times against one server on the one-layer model with the
    default limits; prints each protocol's times and returns the slowest."""
    model = write_conv_model(workdir / "conv.onnx")
    image = np.random.default_rng(0).normal(size=(1, 1, size, size)).astype(np.float32)
    server = ServerProcess(model, "--threads", "1", log_level="WARNING").wait_until_ready()
    try:
        rows = [over_limit_refusals(server, "conv", image) for _ in range(rounds)]
    finally:
        server.kill()
    for protocol in ("http", "grpc"):
        answers = {row[protocol][0] for row in rows}
        ran = any(row[protocol][2] for row in rows)
        times = sorted(row[protocol][1] for row in rows)
        print(
            f"{protocol}: {'/'.join(sorted(answers))} in {' '.join(f'{ms:.0f}' for ms in times)} ms "
            f"(median {times[len(times) // 2]:.0f}), model {'ran' if ran else 'not run'}"
        )
    worst = max(row[protocol][1] for row in rows for protocol in ("http", "grpc"))
    print(f"target (refused in under {REFUSAL_LIMIT_MS:g} ms): {'met' if worst < REFUSAL_LIMIT_MS else 'NOT met'}")
    return worst


def run_concurrent(model: Path, name: str, size: int, clients: int) -> ConcurrentRow:
    """`clients` clients at once against `noisyseg serve` on `model`, every other one over gRPC."""
    threads = os.cpu_count() or 1
    scale = (size / 2048) ** 2  # the default limits, for 2048 x 2048 images, scaled to this size
    server_args = (
        "--threads",
        str(threads),
        "--max-batch-pixels",
        str(size * size),
        "--max-response-mb",
        str(64 * scale),
        "--max-held-body-mb",
        str(256 * scale),
        "--max-body-mb",
        str(64 * scale),
        "--grpc-max-receive-mb",
        str(64 * scale),
    )
    images = [np.random.default_rng(seed).normal(size=(1, 1, size, size)).astype(np.float32) for seed in range(2)]
    server = ServerProcess(model, *server_args, log_level="WARNING").wait_until_ready()
    stop = Path(tempfile.mkdtemp()) / "stop"
    try:
        warm = images[0][:, :, :64, :64].copy()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
        conn.request(
            "POST",
            f"/v2/models/{name}/infer",
            body=binary_infer_body(warm, ["labels"])[0],
            headers={"Inference-Header-Content-Length": str(binary_infer_body(warm, ["labels"])[1])},
        )
        assert conn.getresponse().status == 200
        conn.close()
        time.sleep(1.0)
        rest = server.rss_bytes()
        refusals = over_limit_refusals(server, name, images[0])
        prober = subprocess.Popen(
            [sys.executable, "-c", HEALTH_PROBER, str(server.port), str(stop), str(HEALTH_INTERVAL_S)],
            stdout=subprocess.PIPE,
            text=True,
        )
        sampled = [0]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                sampled[0] = max(sampled[0], server.rss_bytes())
                time.sleep(RSS_INTERVAL_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        deadline = time.monotonic() + RUN_LIMIT_S
        workers = [
            Client(server, name, index % 2, images[index % 2], "grpc" if index % 2 else "http", deadline)
            for index in range(clients)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(RUN_LIMIT_S)
        seconds = time.perf_counter() - started
        sampling.set()
        stop.touch()
        probes = json.loads(prober.communicate(timeout=60)[0])
        peak = max(server.peak_rss_bytes(), sampled[0])
        time.sleep(AFTER_S)
        after = server.rss_bytes()
    finally:
        stop.touch()
        server.kill()
    answers = [answer for worker in workers for answer in worker.answers]
    counted = Counter(f"{a.protocol} {a.status}{' +Retry-After' if a.retry_after else ''}" for a in answers)
    references = [reference_labels(model, image).reshape(-1) for image in images]
    wrong = sum(
        1
        for w in workers
        if w.labels is not None and not np.array_equal(w.labels.reshape(-1), references[w.image_index])
    )
    latencies = np.array([seconds for _, seconds, _ in probes]) * 1000
    if any(status != 200 for _, _, status in probes):
        counted["health not 200"] = sum(1 for _, _, status in probes if status != 200)
    return ConcurrentRow(
        name,
        size,
        clients,
        dict(sorted(counted.items())),
        wrong,
        sum(1 for w in workers if w.labels is None),
        seconds,
        rest / MIB,
        peak / MIB,
        after / MIB,
        model_alone_growth(model, size, ("labels",), threads),
        len(probes),
        float(np.percentile(latencies, 50)),
        float(np.percentile(latencies, 99)),
        float(latencies.max()),
        refusals,
    )


def run_concurrent_benchmark(size: int, clients: int, workdir: Path, model: Path | None = None) -> list[ConcurrentRow]:
    unet = model or export_demo_unet(workdir, BenchConfig())
    conv = write_conv_model(workdir / "conv.onnx")
    return [run_concurrent(unet, unet.stem, size, clients), run_concurrent(conv, "conv", size, clients)]


def concurrent_table(rows: list[ConcurrentRow]) -> str:
    lines = [
        "| model | requests at once (HTTP + gRPC) | answers (every try) | wrong / missing | wall s "
        "| server RSS at rest / peak / after MiB "
        "| budget's cost: model alone at the budget MiB | peak - rest - cost MiB | health p50 / p99 / max ms (probes) "
        "| over-limit answer refused: HTTP / gRPC (ms, model ran?) |",
        "| --- | --- | --- | --- | ---: | --- | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        answers = ", ".join(f"{key}: {count}" for key, count in row.answers.items())
        refused = " / ".join(
            f"{status} in {ms:.0f} ms ({'ran' if ran else 'not run'})" for status, ms, ran in row.refusals.values()
        )
        lines.append(
            f"| {row.model} | {row.clients} x 1 x 1 x {row.size} x {row.size} "
            f"({row.clients - row.clients // 2} + {row.clients // 2}), labels "
            f"| {answers} | {row.wrong} / {row.missing} | {row.seconds:.0f} "
            f"| {row.rss_rest_mib:.0f} / {row.peak_mib:.0f} / {row.rss_after_mib:.0f} "
            f"| {row.budget_cost_mib:.0f} | {row.over_rest_and_budget_mib:.0f} "
            f"| {row.health_p50_ms:.0f} / {row.health_p99_ms:.0f} / {row.health_max_ms:.0f} ({row.health_probes}) "
            f"| {refused} |"
        )
    return "\n".join(lines)


# The overhead over the server at rest and the budget's cost that docs/serving.md states: what
# requests hold at once (--max-held-body-mb, 256 MiB for 2048 x 2048 images) and 64 MiB of copies
# made while answers are serialised, scaled like the other limits for smaller images.
def stated_overhead_mib(size: int) -> float:
    return (256 + 64) * (size / 2048) ** 2


def check_concurrent(row: ConcurrentRow, timing: bool = True, memory: bool = True) -> list[str]:
    """What the run broke of issue 26's "done when"; `timing`: also the refusal time target (100 ms,
    which on this shared machine the upload of a 16 MiB body alone can pass); `memory`: also the
    peak RSS bound (meaningless for small images, whose tensors are smaller than allocator noise)."""
    problems = []
    if memory and row.over_rest_and_budget_mib > stated_overhead_mib(row.size):
        problems.append(
            f"peak RSS {row.over_rest_and_budget_mib:.0f} MiB over rest + budget, "
            f"more than {stated_overhead_mib(row.size):.0f}"
        )
    allowed = {"http 200", "http 503 +Retry-After", "grpc OK", "grpc UNAVAILABLE +Retry-After"}
    if set(row.answers) - allowed:
        problems.append(f"answers other than 200 or 503 with Retry-After: {row.answers}")
    if row.wrong or row.missing:
        problems.append(f"{row.wrong} wrong and {row.missing} missing answers")
    if row.health_max_ms >= 1000:
        problems.append(f"health took up to {row.health_max_ms:.0f} ms")
    for protocol, (status, ms, ran) in row.refusals.items():
        if status not in ("400", "INVALID_ARGUMENT") or ran or (timing and ms >= REFUSAL_LIMIT_MS):
            problems.append(
                f"{protocol} over-limit answer: {status} in {ms:.0f} ms, model {'ran' if ran else 'did not run'}"
            )
    return problems


def test_server_memory_and_health_under_many_large_requests(benchmark, tmp_path: Path) -> None:
    size, clients = (256, 4) if benchmark.disabled else (2048, CLIENTS)
    rows = benchmark.pedantic(run_concurrent_benchmark, args=(size, clients, tmp_path), rounds=1, iterations=1)
    benchmark.extra_info.update({"size": size, "clients": clients, "rows": [asdict(row) for row in rows]})
    print(f"\n{concurrent_table(rows)}")
    memory = not benchmark.disabled
    problems = [problem for row in rows for problem in check_concurrent(row, timing=False, memory=memory)]
    assert not problems, concurrent_table(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="image height = width (default 2048)")
    parser.add_argument(
        "--part",
        choices=("single", "concurrent", "both", "refusals"),
        default="both",
        help="which part to run (default both; refusals: only the over-limit refusals, 5 rounds)",
    )
    parser.add_argument("--clients", type=int, default=CLIENTS, help=f"requests at once in part 2 (default {CLIENTS})")
    parser.add_argument("--model", type=Path, help="part 2's first model (default: the UNet exported here)")
    parser.add_argument("--model-alone", type=Path, help=argparse.SUPPRESS)  # the child of `model_alone_growth`
    parser.add_argument("--outputs", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model_alone:
        print(_run_model_alone(args.model_alone, args.size, frozenset(args.outputs.split(",")), args.threads))
        return 0
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the start")
    failed = False
    with tempfile.TemporaryDirectory() as workdir:
        if args.part == "refusals":
            failed |= refusal_rounds(Path(workdir), args.size) > REFUSAL_LIMIT_MS
        if args.part in ("single", "both"):
            rows = run_benchmark(args.size, Path(workdir))
            print(markdown_table(rows, args.size))
            worst = max(row.ratio for row in rows)
            failed |= worst > TARGET_RATIO
            print(
                f"target (server's share <= {TARGET_RATIO:g}x the tensors): "
                f"{'met' if worst <= TARGET_RATIO else 'NOT met'} (worst {worst:.2f}x)"
            )
        if args.part in ("concurrent", "both"):
            concurrent = run_concurrent_benchmark(args.size, args.clients, Path(workdir), args.model)
            print(concurrent_table(concurrent))
            for row in concurrent:
                problems = check_concurrent(row)
                failed |= bool(problems)
                summary = "; ".join(problems) or (
                    "every answer a correct 200 or a 503 with Retry-After, health under 1 s, "
                    "over-limit answers refused before inference"
                )
                print(f"{row.model}: {summary}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
