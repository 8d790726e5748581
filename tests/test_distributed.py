"""Distributed training: helpers under a real 2-process gloo group, and a torchrun training run.

The helper test spawns two processes with `torch.multiprocessing` on a TCP store at 127.0.0.1
and checks every collective against the single-process computation it replaces. The training
test runs `torchrun --nproc-per-node 2 -m noisyseg train` on a tiny phantom and compares it with
a single-process run of the same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from dist_helpers import child_env, free_port, make_phantom, train_args
from safetensors.torch import load_file
from torch import nn

from noisyseg.cli import build_parser
from noisyseg.commands.train import train_and_draw, train_config_from_args
from noisyseg.data.run_data import load_split
from noisyseg.runtime import distributed as D

pytestmark = pytest.mark.timeout(240)


# ----------------------------------------------------------------------------- pure helpers


def test_shards_are_disjoint_cover_the_batch_and_weight_the_mean() -> None:
    for batch_size in range(1, 8):
        for world in (1, 2, 3):
            batch = torch.arange(10, 10 + batch_size)
            shards = [D.shard_batch(batch, r, world) for r in range(world)]
            real = [s for s in shards if not s.padding]
            assert torch.equal(torch.cat([s.rows for s in real]).sort().values, batch)
            # The average of weighted per-rank means is the global mean, for any values.
            values = torch.rand(30, dtype=torch.float64)
            weighted = sum(s.loss_weight * values[s.rows].mean() for s in shards) / world
            assert weighted == pytest.approx(values[batch].mean().item(), rel=1e-12)
            assert all(len(s.rows) >= 1 for s in shards)  # every rank joins the gradient all-reduce
    blocks = [D.shard_indices(7, r, 3) for r in range(3)]
    assert [i for b in blocks for i in b] == list(range(7))


def test_fault_spec_parsing_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert D.parse_fault_spec("checkpoint-write:2:enospc", "1") == D.FaultSpec("checkpoint-write", 2, "enospc", 1)
    for bad in ("checkpoint-write", "nowhere:1", "train-step:0", "train-step:1:explode"):
        with pytest.raises(ValueError, match=D.FAULT_ENV):
            D.parse_fault_spec(bad)
    monkeypatch.setenv(D.FAULT_ENV, "metrics-write:2:enospc")
    D.fault_point("metrics-write")  # first visit: nothing
    D.fault_point("train-step")  # another point: nothing
    with pytest.raises(OSError, match="No space left"):
        D.fault_point("metrics-write")
    monkeypatch.setenv(D.FAULT_RANK_ENV, "1")
    monkeypatch.setenv(D.FAULT_ENV, "metrics-write:1:enospc")
    D.fault_point("metrics-write")  # this process is rank 0: not the targeted rank


def test_environment_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        D.init_distributed("gloo", 5)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        D.init_distributed("gloo", 5)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    with pytest.raises(
        RuntimeError, match=r"rank 0 of 2: could not join the gloo process group .* distributed.timeout_s=2 s"
    ):
        D.init_distributed("gloo", 2)  # rank 1 never comes
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert D.init_distributed("gloo", 5) == D.SINGLE_PROCESS


# ----------------------------------------------------------------------------- collectives, 2 ranks


def small_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)
    )


def collective_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    ctx = D.init_distributed("gloo", timeout_s=60)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(5, 1, 6, 6, generator=generator)
    shard = D.shard_batch(torch.arange(5), rank, world)
    # Synchronised batch norm inside DDP: the DDP gradient of the weighted local loss must equal
    # the single-process gradient of the global mean loss.
    net = D.convert_sync_batchnorm(small_net(), ctx)
    ddp = nn.parallel.DistributedDataParallel(net)
    local = inputs[shard.rows].clone().requires_grad_(True)
    (shard.loss_weight * (ddp(local) ** 2).mean()).backward()
    result: dict[str, torch.Tensor] = {"rows": shard.rows, "input_grad": local.grad}
    result.update({f"grad.{k}": p.grad for k, p in net.named_parameters()})
    result.update({f"buf.{k}": b.clone() for k, b in net.named_buffers()})
    # Gradient averaging for a module outside DDP (ARM), count reduction, row gathering.
    extra = nn.Linear(2, 1)
    extra.weight.grad = torch.full_like(extra.weight, float(rank + 1))
    D.average_gradients(ctx, list(extra.parameters()), "test")
    result["averaged"] = extra.weight.grad.clone()
    result["counts"] = torch.from_numpy(D.all_reduce_counts(ctx, np.full((2, 2), rank + 1, dtype=np.int64), "test"))
    rows, labels = D.all_gather_rows(
        ctx, np.arange(rank + 1, dtype=np.int64) + 10 * rank, np.full((rank + 1, 2, 2), rank, dtype=np.uint8), "test"
    )
    result["gathered_rows"], result["gathered_labels"] = torch.from_numpy(rows), torch.from_numpy(labels)
    try:
        D.agree_on_error(ctx, ValueError("bad run dir") if rank == 1 else None, "preparing")
    except (ValueError, RuntimeError) as err:
        result["agreed_error"] = torch.tensor(list(str(err).encode()))
    D.verify_agreement(ctx, D.state_digest([torch.ones(3)], [np.zeros(2)], "same"), "identical state")
    try:
        D.verify_agreement(ctx, D.state_digest([torch.full((3,), float(rank))]), "weights")
    except RuntimeError as err:
        result["disagreement"] = torch.tensor(list(str(err).encode()))
    torch.save(result, Path(out) / f"rank{rank}.pt")
    D.shutdown(ctx)


def test_collectives_match_the_single_process_computation(tmp_path: Path) -> None:
    mp.start_processes(collective_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    inputs = torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    net = small_net()
    (net(inputs) ** 2).mean().backward()
    for name, param in net.named_parameters():
        for rank in ranks:
            torch.testing.assert_close(rank[f"grad.{name}"], param.grad, rtol=1e-4, atol=1e-6)
    for name, buffer in net.named_buffers():
        for rank in ranks:
            torch.testing.assert_close(rank[f"buf.{name}"], buffer, rtol=1e-5, atol=1e-6)
    # Input gradients: the gradient of the sum of all ranks' losses, which is world size times
    # the single-process gradient of the global mean (DDP averages only parameter gradients).
    for rank in ranks:
        torch.testing.assert_close(rank["input_grad"] / 2, inputs.grad[rank["rows"]], rtol=1e-4, atol=1e-8)
    for rank in ranks:
        assert torch.equal(rank["averaged"], torch.full((1, 2), 1.5))
        assert torch.equal(rank["counts"], torch.full((2, 2), 3, dtype=torch.int64))
        assert rank["gathered_rows"].tolist() == [0, 10, 11]
        assert rank["gathered_labels"][:, 0, 0].tolist() == [0, 1, 1]
        assert b"bad run dir" in bytes(rank["agreed_error"].tolist())
    assert b"rank 1 failed during preparing" in bytes(ranks[0]["agreed_error"].tolist())
    for rank in ranks:
        assert b"ranks [1] disagree with rank 0 about weights" in bytes(rank["disagreement"].tolist())


# ----------------------------------------------------------------------------- torchrun training


@pytest.mark.parametrize(
    ("timing", "streamed"),
    [("iteration", False), ("epoch", False), ("iteration", True), ("epoch", True)],
    ids=["iteration", "epoch", "iteration-streamed", "epoch-streamed"],
)
def test_two_process_training_matches_the_single_process_run(tmp_path: Path, timing: str, streamed: bool) -> None:
    """torchrun, 2 gloo ranks, global batch 5 (12 slices: batches of 5, 5, 2, so shards of 3 and
    2 rows with loss weights 1.2 and 0.8, then 1 and 1), synchronised batch norm: the same
    trigger epochs as one process with batch 5, the same weights up to float32 reduction order,
    and a label store that differs in at most a few pixels (see the bound below). `iteration`
    timing corrects each rank's shard after its steps, `epoch` timing in a sharded prediction
    pass at the end of the epoch. `streamed`: items read from disk through the DataLoader into
    a memory-mapped store, corrected maps exchanged between ranks at the epoch's end."""
    phantom = make_phantom(tmp_path / "phantom")
    streaming = ("--set=loader.cache=false", "--set=loader.num_workers=0") if streamed else ()
    options = (
        "--batch-size",
        "5",
        "--set=distributed.sync_batchnorm=true",
        f"--set=adele.correction_timing={timing}",
        *streaming,
    )
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "noisyseg",
        "--log-level",
        "INFO",
    ]
    result = subprocess.run(
        [*launcher, *train_args(phantom, ddp_out, *options)], env=child_env(), capture_output=True, timeout=200
    )
    log = result.stderr.decode()
    assert result.returncode == 0, log[-4000:]
    # Every epoch the ranks compare digests of weights, ARM, triggers and label store (a
    # mismatch stops the run); rank 0 logs the agreement.
    agreements = [line for line in log.splitlines() if "replicas agree" in line]
    assert len(agreements) == 4 and all("2 ranks" in line for line in agreements), log[-4000:]
    # As the train command does (train, then draw the curves): the outputs are compared below.
    train_and_draw(train_config_from_args(build_parser().parse_args(train_args(phantom, single_out, *options))))

    ddp_summary, single_summary = (json.loads((o / "summary.json").read_text()) for o in (ddp_out, single_out))
    assert (
        ddp_summary["trigger_epoch"] == single_summary["trigger_epoch"] and 3 in ddp_summary["trigger_epoch"].values()
    )
    ddp_state, single_state = (load_file(str(o / "checkpoint" / "state.safetensors")) for o in (ddp_out, single_out))
    assert ddp_state.keys() == single_state.keys()
    for key in (k for k in single_state if k.startswith(("model.", "arm.")) and single_state[k].is_floating_point()):
        torch.testing.assert_close(ddp_state[key], single_state[key], rtol=1e-3, atol=1e-4, msg=key)
    ddp_labels, single_labels = (np.load(o / "checkpoint" / "labels.npy") for o in (ddp_out, single_out))
    original = load_split(phantom[0], "train", labels_root=phantom[1]).masks
    assert np.count_nonzero(single_labels != original) > 100, "the comparison needs corrected labels"
    # Float32 sums run in another order (batch-norm statistics over two shards, DDP's gradient
    # average), so the weights differ by about 1e-4 after 4 epochs; only a pixel whose
    # confidence lies that close to tau (or whose two best classes are that close) can be
    # corrected differently. Measured: 0 of 12288 pixels differ; bound: 0.1%.
    assert np.count_nonzero(ddp_labels != single_labels) <= 1e-3 * single_labels.size
    # Label Wave's prediction changes: each rank compares its shard's rows, the maps are exchanged
    # at each epoch's end (cached); streamed under several ranks they are not measured.
    ddp_changes, single_changes = (
        [json.loads(line)["prediction_change"] for line in (o / "metrics.jsonl").read_text().splitlines()]
        for o in (ddp_out, single_out)
    )
    assert single_changes[0] is None and None not in single_changes[1:]
    if streamed:
        assert ddp_changes == [None] * len(single_changes)
    else:
        assert ddp_changes[0] is None and ddp_changes[1:] == pytest.approx(single_changes[1:], abs=1e-3)
    # Only rank 0 wrote, atomically, every output a run has.
    assert {p.name for p in ddp_out.iterdir()} == {p.name for p in single_out.iterdir()}
