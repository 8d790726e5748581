"""How far ARM's table (`kernels/contract.py`) is from the exact ARM, per table size: the figures
behind ARM_TABLE_SIZE (docs/benchmarks.md, "ARM's table").

``.venv/bin/python benchmarks/arm_table_error.py [--sizes 2048 4096 8192]`` prints, per table
size and ARM, the largest difference relative to the largest entry, in float64 with the reference
(`reference.arm_table_weights` against ARM itself), of the loss, the logit gradients and ARM's
gradient (its 53 entries together), over the batches and losses of tests/test_arm_table.py
(ARM-weighted CE and ADELE+ARM at 3 scales, C = 5 and 19, logits spread 2, 4 and 8). The ARMs are
that test's: two spread 3x their initialisation, and a step like trained ones (max |w''| 250).
The last column, for scale: the exact path computed in float32 against the same in float64.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_arm_table import ARMS, LOSSES, loss_and_gradients, max_curvature, relative_error  # noqa: E402

from noisyseg.kernels import contract  # noqa: E402


def table_errors(size: int, arm_name: str) -> dict[str, float]:
    """Worst relative difference of the table path at `size` nodes against the exact path."""
    previous = contract.ARM_TABLE_SIZE, contract.ARM_TABLE_SCALE
    contract.ARM_TABLE_SIZE, contract.ARM_TABLE_SCALE = size, (size - 1) / 2.0
    try:
        arm = ARMS[arm_name]()
        worst = {"loss": 0.0, "logit gradients": 0.0, "ARM gradient": 0.0, "fp32 exact ARM gradient": 0.0}
        for loss_name, loss_fn in LOSSES.items():
            num_scales = 1 if loss_name == "arm_cross_entropy" else 3
            for num_classes in (5, 19):
                gen = torch.Generator().manual_seed(num_classes)
                for spread in (2.0, 4.0, 8.0):
                    logits = [
                        torch.randn(2, num_classes, 24, 24, generator=gen, dtype=torch.float64) * spread
                        for _ in range(num_scales)
                    ]
                    target = torch.randint(0, num_classes, (2, 24, 24), generator=gen)
                    target[torch.rand(2, 24, 24, generator=gen) < 0.1] = 255
                    table = loss_and_gradients(loss_fn, logits, target, arm, "table")
                    exact = loss_and_gradients(loss_fn, logits, target, arm, "exact")
                    worst["loss"] = max(worst["loss"], relative_error(table[0], exact[0]))
                    for got, want in zip(table[1:-1], exact[1:-1]):
                        worst["logit gradients"] = max(worst["logit gradients"], relative_error(got, want))
                    worst["ARM gradient"] = max(worst["ARM gradient"], relative_error(table[-1], exact[-1]))
                    # The exact path's own rounding in fp32, for scale.
                    single = loss_and_gradients(loss_fn, [z.float() for z in logits], target, arm.float(), "exact")
                    arm.double()
                    worst["fp32 exact ARM gradient"] = max(
                        worst["fp32 exact ARM gradient"], relative_error(single[-1].double(), exact[-1])
                    )
        return worst
    finally:
        contract.ARM_TABLE_SIZE, contract.ARM_TABLE_SCALE = previous


def main() -> None:
    parser = argparse.ArgumentParser(description="ARM's table against the exact ARM, per table size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    args = parser.parse_args()
    print("| K | ARM (max abs w'') | loss | logit gradients | ARM gradient | fp32 exact path: ARM gradient |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for size in args.sizes:
        for arm_name in ARMS:
            errors = table_errors(size, arm_name)
            curvature = max_curvature(ARMS[arm_name]())
            print(
                f"| {size} | {arm_name} ({curvature:.3g}) | "
                + " | ".join(f"{errors[key]:.1e}" for key in errors)
                + " |"
            )


if __name__ == "__main__":
    main()
