"""The Triton kernels compiled for an H100 (sm_90) without a GPU, checked for compile errors and
register spills (`kernels/compile_report.py`; `make kernels-compile` compiles every
specialization for sm_80 and sm_90).

The compile runs in a fresh interpreter without TRITON_INTERPRET (conftest.py sets it for the
interpreter tests, and it must be unset when triton is imported for @triton.jit to build real
kernels). The subset: bf16 logits, C = 19, NCHW, ARM's table, forward and backward of the
ARM-weighted CE and of ADELE+ARM at 3 scales, which launches every kernel the package has.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="triton is not importable here: nothing to compile")

from noisyseg.kernels.compile_report import occupancy  # noqa: E402 (after the skip)

KERNELS = {
    "_arm_cross_entropy_forward_kernel",
    "_rescale_kernel",
    "arm_table_kernel",
    "arm_backward_kernel",
    "_statistics_kernel",
    "_gradient_kernel",
}


def _clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(extra)
    return env


def test_subset_compiles_for_sm90_without_spills(tmp_path):
    command = [sys.executable, "-m", "noisyseg.kernels.compile_report", "--out", str(tmp_path)]
    result = subprocess.run(
        [*command, "--subset", "--arch", "90", "--jobs", "2"],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert {entry["kernel"] for entry in report["entries"]} == KERNELS
    for entry in report["entries"]:
        assert entry["arch"] == "sm_90" and entry["status"] == "ok", entry
        assert 0 < entry["registers"] <= 255 and entry["spill_bytes"] == 0, entry
        assert entry["max_warps_per_sm"] >= entry["num_warps"], entry
    # The Markdown report: one summary row per kernel, layout and ARM mode, one row per entry.
    rows = [line for line in (tmp_path / "report.md").read_text().splitlines() if "| sm_90 |" in line]
    assert sum(" | ok | " in line for line in rows) == len(report["entries"])


# A kernel that must spill: one warp holding a 64 x 256 fp32 tile (512 values a thread, against at
# most 255 registers) live across a reduction. It proves the report reads spills, not zeros.
SPILLING_KERNEL = textwrap.dedent(
    """
    import triton
    import triton.language as tl

    @triton.jit
    def hoarding_kernel(x, y, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.arange(0, BLOCK_R)
        columns = tl.arange(0, BLOCK_C)
        tile = tl.load(x + rows[:, None] * BLOCK_C + columns[None, :])
        total = tl.sum(tl.exp(tile), axis=1)
        tl.store(y + rows[:, None] * BLOCK_C + columns[None, :], tile / total[:, None] + tl.sqrt(tile))
    """
)


def test_report_reads_spills_from_the_compiled_kernel(tmp_path):
    (tmp_path / "hoarding.py").write_text(SPILLING_KERNEL)
    script = textwrap.dedent(
        """
        import json, tempfile
        from noisyseg.kernels.compile_report import Specialization, compile_one
        signature = {"x": "*fp32", "y": "*fp32", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
        hints = {"x": [["tt.divisibility", 16]], "y": [["tt.divisibility", 16]]}
        blocks = {"BLOCK_R": 64, "BLOCK_C": 256}
        spec = Specialization("hoarding", "hoarding_kernel", signature, blocks, hints, {"num_warps": 1})
        with tempfile.TemporaryDirectory() as cache:
            print(json.dumps(compile_one(spec, 90, cache)))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=_clean_env(PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path])),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    entry = json.loads(result.stdout.strip().splitlines()[-1])
    assert entry["status"] == "spills" and entry["spill_store_bytes"] > 0 and entry["spill_load_bytes"] > 0, entry


@pytest.mark.parametrize(
    "registers, shared, warps, arch, expected",
    [
        (255, 2048, 4, 90, 8),  # the figure: 2 blocks of 4 warps at 255 registers
        (128, 2048, 4, 90, 16),  # 4096 registers a warp: 16 warps, 4 blocks
        (32, 0, 4, 90, 64),  # registers allow all 64 warps
        (40, 0, 4, 80, 48),  # 40 registers: 1280 a warp, 51 warps fit, 12 blocks of 4
        (64, 100 * 1024, 8, 80, 8),  # shared memory: one block of 101 KiB fits 164 KiB
        (64, 100 * 1024, 8, 90, 16),  # two fit 228 KiB
    ],
)
def test_occupancy_follows_cudas_rules(registers, shared, warps, arch, expected):
    """Hand-computed from CUDA's occupancy rules: registers allocated per warp in units of 256,
    65536 a SM, at most 64 warps and 32 blocks, shared memory per SM plus 1 KiB per block."""
    assert occupancy(arch, registers, shared, warps) == expected
