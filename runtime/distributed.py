"""Distributed training helpers (torchrun / DistributedDataParallel) and the fault-injection hook.

A run is distributed when it is started by `torchrun` (or anything else that sets `RANK`,
`WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`) with `WORLD_SIZE` above 1. Every
helper here is a no-op for a single process, so the trainer calls them unconditionally.

Sharding. All ranks draw the same per-epoch permutation (one seeded generator, checkpointed),
cut it into the same global batches as a single-process run, and each rank takes a contiguous,
disjoint part of every global batch (`shard_batch`). Each rank's loss is scaled by
`world_size * local_rows / global_rows`, so DistributedDataParallel's gradient average equals the
gradient of the global batch mean. A final global batch with fewer rows than ranks is padded by
repeating rows with loss weight 0 (every rank must join the gradient all-reduce); padded rows
are neither counted in metrics nor corrected.

Batch normalisation. Without synchronisation each rank normalises with the statistics of its own
shard. `convert_sync_batchnorm` synchronises them: `torch.nn.SyncBatchNorm` on GPUs, and on CPU
(which SyncBatchNorm refuses) `CpuSyncBatchNorm` here, an all-reduce of per-channel sums in the
forward and of the gradient sums in the backward, so the global batch is normalised as one.

Faults. `fault_point(name)` is called by the trainer at the places where a crash matters (see
`FAULT_POINTS`). With `NOISYSEG_FAULT_POINT=POINT:N[:ACTION]`, the N-th time (1-based, counted per
training run) this process reaches POINT it kills itself with SIGKILL (ACTION `kill`, the default) or raises
OSError(ENOSPC) as a full disk would (`enospc`). `NOISYSEG_FAULT_RANK=R` limits it to rank R.
Tests use it to crash at exact moments; it costs one dictionary look-up when unset.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from noisyseg.runtime.device import resolve_device

log = logging.getLogger(__name__)

FAULT_ENV = "NOISYSEG_FAULT_POINT"
FAULT_RANK_ENV = "NOISYSEG_FAULT_RANK"
FAULT_POINTS = (
    "train-step",  # before each optimisation step
    "label-store-update",  # when corrected rows are written into the in-memory store
    "checkpoint-write",  # inside checkpoint.tmp/: tensors written, label store and state.json not
    "label-store-write",  # inside checkpoint.tmp/: labels.npy written, labels.json not
    "checkpoint-swap",  # between renaming checkpoint/ to checkpoint.old/ and checkpoint.tmp/ in
    "metrics-write",  # before metrics.jsonl is rewritten
)
FAULT_ACTIONS = ("kill", "enospc")
BACKENDS = ("auto", "gloo", "nccl")


# ----------------------------------------------------------------------------- fault injection


@dataclass(frozen=True)
class FaultSpec:
    """Where and how to fail: at the `occurrence`-th visit of `point`, `action`, on `rank` (None: any)."""

    point: str
    occurrence: int
    action: str = "kill"
    rank: int | None = None


def parse_fault_spec(text: str, rank_text: str | None = None) -> FaultSpec:
    """`checkpoint-write:2` or `checkpoint-write:2:enospc` -> FaultSpec; ValueError names the variable."""
    parts = text.split(":")
    expected = (
        f"POINT:N[:ACTION] with POINT one of {', '.join(FAULT_POINTS)} and ACTION one of {', '.join(FAULT_ACTIONS)}"
    )
    if len(parts) not in (2, 3) or parts[0] not in FAULT_POINTS or not parts[1].isdigit() or int(parts[1]) < 1:
        raise ValueError(f"{FAULT_ENV}={text!r}: expected {expected}")
    action = parts[2] if len(parts) == 3 else "kill"
    if action not in FAULT_ACTIONS:
        raise ValueError(f"{FAULT_ENV}={text!r}: expected {expected}")
    if rank_text is not None and not rank_text.isdigit():
        raise ValueError(f"{FAULT_RANK_ENV}={rank_text!r}: expected a rank number")
    return FaultSpec(parts[0], int(parts[1]), action, None if rank_text is None else int(rank_text))


class _FaultCounter:
    """Visits per point, restarted whenever the environment asks for a different fault."""

    def __init__(self) -> None:
        self.key: tuple[str, str | None] | None = None
        self.visits: dict[str, int] = {}

    def visit(self, key: tuple[str, str | None], point: str) -> int:
        if key != self.key:
            self.key, self.visits = key, {}
        self.visits[point] = self.visits.get(point, 0) + 1
        return self.visits[point]


_fault_counter = _FaultCounter()


def reset_fault_counts() -> None:
    """Count visits afresh (each training run counts its own; see `fault_point`)."""
    _fault_counter.key, _fault_counter.visits = None, {}


def fault_point(point: str) -> None:
    """Kill this process, or raise OSError(ENOSPC), if `NOISYSEG_FAULT_POINT` asks for it here."""
    text = os.environ.get(FAULT_ENV)
    if not text:
        return
    rank_text = os.environ.get(FAULT_RANK_ENV)
    spec = parse_fault_spec(text, rank_text)
    if spec.point != point or (spec.rank is not None and spec.rank != int(os.environ.get("RANK", "0"))):
        return
    if _fault_counter.visit((text, rank_text), point) != spec.occurrence:
        return
    if spec.action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected by {FAULT_ENV}={text})")
    log.warning("%s=%s: killing this process (pid %d) with SIGKILL", FAULT_ENV, text, os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run. A single process is rank 0 of 1 with no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")
    timeout_s: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


SINGLE_PROCESS = DistContext()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer (set by torchrun)") from None


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) without it."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"environment RANK={rank}, WORLD_SIZE={world_size}: expected 0 <= RANK < WORLD_SIZE")
    return rank, world_size, local_rank


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` -> nccl when the ranks train on GPUs, else gloo."""
    if backend not in BACKENDS:
        raise ValueError(f"distributed backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("distributed backend 'nccl' needs the ranks on CUDA GPUs; use 'gloo' with --device cpu")
    return backend


def init_distributed(backend: str = "auto", timeout_s: float = 300.0, device: str = "auto") -> DistContext:
    """Join the process group described by the torchrun environment (no-op for one process).

    `device` (`runtime/device.py`) is resolved per rank: `auto` and `cuda` give each rank its
    local GPU. `timeout_s` bounds every collective: a rank that dies or stalls makes the others
    fail with an error after at most this long instead of hanging.
    """
    rank, world_size, local_rank = env_ranks()
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world_size == 1:
        return replace(SINGLE_PROCESS, device=resolved)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(f"environment variable {name} is not set: start distributed runs with torchrun")
    backend = resolve_backend(backend, resolved)
    endpoint = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if not dist.is_initialized():
        try:
            # device_id binds nccl's communicator to this rank's GPU at once (None on CPU).
            dist.init_process_group(
                backend, timeout=timedelta(seconds=timeout_s), device_id=resolved if backend == "nccl" else None
            )
        except dist.DistError as err:
            raise RuntimeError(
                f"rank {rank} of {world_size}: could not join the {backend} process group at "
                f"{endpoint} within distributed.timeout_s={timeout_s:g} s ({_first_line(err)})"
            ) from err
    log.info(
        "rank %d of %d (local rank %d) joined the %s process group at %s",
        rank,
        world_size,
        local_rank,
        backend,
        endpoint,
    )
    return DistContext(rank, world_size, local_rank, backend, resolved, timeout_s)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (after a successful run; on errors the process just exits).

    A barrier first, so that no rank tears down gloo while another is still busy (rank 0 writes
    the summary and plots after the last collective): a rank that left early aborted now and
    then at exit with "terminate called without an active exception" (seen in 3 of about 40
    two-rank test runs on 2 cores).
    """
    if ctx.enabled and dist.is_initialized():
        with peer_errors(ctx, "the final barrier"):
            dist.barrier()
        dist.destroy_process_group()


class PeersLostError(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or became unreachable."""


@contextlib.contextmanager
def peer_errors(ctx: DistContext, what: str) -> Iterator[None]:
    """Turn a failed collective into one clear PeersLostError naming the rank and the timeout."""
    if not ctx.enabled:
        yield
        return
    try:
        yield
    except PeersLostError:
        raise
    except (dist.DistError, RuntimeError) as err:
        if isinstance(err, dist.DistError) or _looks_like_peer_failure(err):
            raise PeersLostError(
                f"{ctx.describe()}: lost the other ranks during {what} (a rank died, or none answered within "
                f"distributed.timeout_s={ctx.timeout_s:g} s): {_first_line(err)}. Training stopped; the last complete "
                "checkpoint is kept, continue with --resume"
            ) from err
        raise


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _looks_like_peer_failure(err: RuntimeError) -> bool:
    text = str(err).lower()
    return any(marker in text for marker in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))


# ----------------------------------------------------------------------------- sharding


@dataclass(frozen=True)
class Shard:
    """This rank's rows of one global batch; `loss_weight` rescales its mean loss (0 for padding)."""

    rows: torch.Tensor
    loss_weight: float
    padding: bool = False


def shard_batch(batch: torch.Tensor, rank: int, world_size: int) -> Shard:
    """Contiguous, disjoint part `rank` of a global batch (sizes differ by at most one).

    The weight `world_size * len(rows) / len(batch)` makes the average over ranks of the
    weighted per-rank mean losses equal the mean over the global batch.
    """
    if world_size == 1:
        return Shard(batch, 1.0)
    if len(batch) < world_size:
        if rank < len(batch):
            return Shard(batch[rank : rank + 1], world_size / len(batch))
        return Shard(batch[rank % len(batch) : rank % len(batch) + 1], 0.0, padding=True)
    rows = torch.tensor_split(batch, world_size)[rank]
    return Shard(rows, world_size * len(rows) / len(batch))


def shard_indices(count: int, rank: int, world_size: int) -> range:
    """The contiguous block of `range(count)` evaluated by `rank` (possibly empty)."""
    bounds = np.linspace(0, count, world_size + 1).round().astype(int)
    return range(int(bounds[rank]), int(bounds[rank + 1]))


# ----------------------------------------------------------------------------- collectives


def all_reduce_sum(ctx: DistContext, values: torch.Tensor, what: str) -> torch.Tensor:
    """Sum of `values` over ranks (a new tensor on this rank's device, same dtype)."""
    if not ctx.enabled:
        return values.clone()
    reduced = values.detach().clone().to(ctx.device)
    with peer_errors(ctx, what):
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(values.device)


def all_reduce_counts(ctx: DistContext, counts: np.ndarray, what: str) -> np.ndarray:
    """Sum of an integer count array (confusion matrices) over ranks, exactly (int64)."""
    if not ctx.enabled:
        return counts
    return all_reduce_sum(ctx, torch.from_numpy(np.ascontiguousarray(counts, dtype=np.int64)), what).numpy()


def average_gradients(ctx: DistContext, parameters: Sequence[nn.Parameter], what: str) -> None:
    """Replace each gradient by its mean over ranks (for modules not wrapped in DDP, e.g. ARM).

    Every rank runs the same code, so the set of parameters with a gradient is the same on all.
    """
    if not ctx.enabled:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = all_reduce_sum(ctx, torch.cat([g.reshape(-1) for g in grads]), what) / ctx.world_size
    for grad, chunk in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(chunk.view_as(grad))


def all_gather_rows(ctx: DistContext, rows: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate (rows (k,), labels (k, H, W) uint8) of all ranks, in rank order.

    The label store's corrections travel this way: each rank corrects only its own rows, and
    every rank applies everyone's corrections, so all copies of the store stay identical.
    """
    if not ctx.enabled:
        return rows, labels
    count = torch.tensor([len(rows)], dtype=torch.int64)
    counts = _all_gather_tensor(ctx, count, what).tolist()
    most = max(counts)
    if most == 0:
        return rows, labels
    pad_rows = np.zeros(most, dtype=np.int64)
    pad_rows[: len(rows)] = rows
    pad_labels = np.zeros((most, *labels.shape[1:]), dtype=np.uint8)
    pad_labels[: len(rows)] = labels
    gathered_rows = _all_gather_tensor(ctx, torch.from_numpy(pad_rows), what).numpy()
    gathered_labels = _all_gather_tensor(ctx, torch.from_numpy(pad_labels), what).numpy()
    keep = [slice(r * most, r * most + n) for r, n in enumerate(counts)]
    return np.concatenate([gathered_rows[k] for k in keep]), np.concatenate([gathered_labels[k] for k in keep])


def _all_gather_tensor(ctx: DistContext, tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Tensors of equal shape from all ranks, stacked along dim 0 in rank order."""
    local = tensor.contiguous().to(ctx.device)
    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    with peer_errors(ctx, what):
        dist.all_gather(parts, local)
    return torch.cat([p.cpu() for p in parts])


def agree_on_error(ctx: DistContext, error: BaseException | None, what: str) -> None:
    """Raise on every rank if any rank failed `what` (so none waits for a rank that gave up)."""
    if not ctx.enabled:
        if error is not None:
            raise error
        return
    messages: list[Any] = [None] * ctx.world_size
    with peer_errors(ctx, what):
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"{ctx.describe()}: rank {rank} failed during {what}: {message}")


def verify_agreement(ctx: DistContext, digest: str, what: str) -> None:
    """Raise on every rank unless all ranks hold the same `digest` of their replicated state."""
    if not ctx.enabled:
        return
    digests: list[Any] = [None] * ctx.world_size
    with peer_errors(ctx, what):
        dist.all_gather_object(digests, digest)
    differing = [rank for rank, other in enumerate(digests) if other != digests[0]]
    if differing:
        raise RuntimeError(
            f"{ctx.describe()}: ranks {differing} disagree with rank 0 about "
            f"{what} (digests {digests}); the replicas diverged, training stopped"
        )


def state_digest(tensors: Sequence[torch.Tensor], arrays: Sequence[np.ndarray] = (), extra: str = "") -> str:
    """SHA-256 over tensors' and arrays' bytes and a text (what ranks must agree on)."""
    digest = hashlib.sha256(extra.encode())
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def broadcast_buffers(ctx: DistContext, module: nn.Module, what: str) -> None:
    """Copy rank 0's buffers (batch-norm running statistics) to every rank.

    DDP does this at the start of each training forward; doing it after the last step of an
    epoch makes evaluation and checkpoints see the same model on every rank.
    """
    if not ctx.enabled:
        return
    with peer_errors(ctx, what):
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier(ctx: DistContext, what: str) -> None:
    if ctx.enabled:
        with peer_errors(ctx, what):
            dist.barrier()


# ----------------------------------------------------------------------------- synchronised batch norm


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the union of all ranks' batches (training mode), CPU and gloo."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, stats_out: list[torch.Tensor]
    ) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        local = torch.cat(
            [
                x.sum(dims, dtype=torch.float64),
                (x.double() * x.double()).sum(dims),
                x.new_tensor([x.numel() // x.shape[1]], dtype=torch.float64),
            ]
        )
        dist.all_reduce(local)
        channels = x.shape[1]
        total = local[-1]
        mean = local[:channels] / total
        var = (local[channels : 2 * channels] / total - mean * mean).clamp_min(0.0)
        stats_out.extend([mean.float(), var.float(), total])
        shape = [1, channels] + [1] * (x.dim() - 2)
        invstd = torch.rsqrt(var.float() + eps).view(shape)
        normalised = (x - mean.float().view(shape)) * invstd
        ctx.save_for_backward(normalised, weight, invstd, total.float())
        return normalised * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        normalised, weight, invstd, total = ctx.saved_tensors
        dims = [0, *range(2, grad_out.dim())]
        shape = invstd.shape
        grad_weight = (grad_out * normalised).sum(dims)
        grad_bias = grad_out.sum(dims)
        sums = torch.cat([grad_bias, grad_weight])
        dist.all_reduce(sums)
        channels = grad_out.shape[1]
        mean_grad = (sums[:channels] / total).view(shape)
        mean_grad_normalised = (sums[channels:] / total).view(shape)
        grad_in = (grad_out - mean_grad - normalised * mean_grad_normalised) * invstd * weight.view(shape)
        return grad_in, grad_weight, grad_bias, None, None


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span all ranks (gloo); same parameters and buffers.

    Outside a process group, or in eval mode, it is exactly BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (
            self.training
            and dist.is_initialized()
            and dist.get_world_size() > 1
            and self.affine
            and self.track_running_stats
        ):
            return super().forward(x)
        assert self.running_mean is not None and self.running_var is not None and self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        stats: list[torch.Tensor] = []
        out = _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps, stats)
        mean, var, total = stats
        with torch.no_grad():
            self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            self.running_var.mul_(1 - momentum).add_(var * (total / (total - 1)).float(), alpha=momentum)
        return out


def convert_sync_batchnorm(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Synchronise every BatchNorm2d across ranks: torch's SyncBatchNorm on GPU, ours on CPU."""
    if not ctx.enabled:
        return model
    if ctx.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _replace_batchnorm(model)


def _replace_batchnorm(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        replacement = CpuSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        replacement.load_state_dict(module.state_dict())
        if module.affine:
            # Keep the very Parameter objects, so optimisers built earlier still update them.
            replacement.weight, replacement.bias = module.weight, module.bias
        replacement.train(module.training)
        return replacement
    for name, child in module.named_children():
        setattr(module, name, _replace_batchnorm(child))
    return module
