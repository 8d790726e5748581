"""ARM's table (`kernels/contract.py`, ``arm_mode="table"``, the default) against the exact ARM.

The stated bound: at K = contract.ARM_TABLE_SIZE nodes the table path is within
contract.ARM_TABLE_RTOL (1e-5) of the exact path, relative to the largest entry of each
quantity: the loss, every logit gradient and ARM's gradient (its 53 entries together), on
batches whose confidences span ARM's input range (where ARM is constant over a batch its
gradient cancels to zero, and an error relative to zero says nothing). Measured
here in float64 with the reference (`reference.arm_table_weights` against ARM itself), so the
difference is the interpolation's alone; that each fused backend computes the table function is
tested against the same reference in tests/test_kernels_numba.py and test_kernels_triton.py
(fp32 tolerances). The ARMs: two spread 3x their initialisation (as the kernel tests use), and a
steep step like the ones training produces (docs/results.md: w falls from about 0.9 to 0 within
0.2 of v), whose curvature max |w''| = 250 makes linear interpolation hardest.
"""

from __future__ import annotations

import pytest
import torch

from noisyseg.kernels import contract, functional, reference


def spread_arm(seed: int) -> reference.ARM:
    torch.manual_seed(seed)
    arm = reference.ARM().double()
    with torch.no_grad():
        for p in arm.parameters():
            p.mul_(3.0)
    return arm


def step_arm() -> reference.ARM:
    """w(v) = sigmoid(2 - 2 SiLU(SiLU(20 (v - 0.6)))): about 0.89 below v = 0.6, 0 above 0.8."""
    arm = reference.ARM().double()
    with torch.no_grad():
        for p in arm.parameters():
            p.zero_()
        first, second, third, last = arm.layers
        first.weight[0, 0], first.bias[0] = 20.0, -12.0
        second.weight[0, 0] = third.weight[0, 0] = 1.0
        last.weight[0, 0], last.bias[0] = -2.0, 2.0
    return arm


ARMS = {"spread-0": lambda: spread_arm(0), "spread-1": lambda: spread_arm(1), "step": step_arm}


def max_curvature(arm: reference.ARM) -> float:
    v = torch.linspace(-1.0, 1.0, 20001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(arm(v).sum(), v, create_graph=True)
    (curvature,) = torch.autograd.grad(slope.sum(), v)
    return float(curvature.abs().max())


def loss_and_gradients(loss_fn, logits_list, target, arm, arm_mode):
    leaves = [z.clone().requires_grad_() for z in logits_list]
    arm.zero_grad()
    loss_fn(leaves, target, arm, arm_mode).backward()
    arm_grad = torch.cat([p.grad.flatten() for p in arm.parameters()])
    return [loss_fn(logits_list, target, arm, arm_mode).detach(), *(z.grad for z in leaves), arm_grad]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


LOSSES = {
    "arm_cross_entropy": lambda zs, t, arm, mode: reference.arm_cross_entropy(zs[0], t, arm, 255, mode),
    "adele_arm_loss": lambda zs, t, arm, mode: reference.adele_arm_loss(zs, t, arm, 1.0, 0.8, "image", 255, mode),
}


@pytest.mark.parametrize("arm_name", list(ARMS))
@pytest.mark.parametrize("num_classes", [5, 19])
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_table_is_within_its_bound_of_the_exact_arm(arm_name, num_classes, loss_name):
    arm = ARMS[arm_name]()
    num_scales = 1 if loss_name == "arm_cross_entropy" else 3
    gen = torch.Generator().manual_seed(num_classes)
    worst = {}
    for spread in (2.0, 4.0, 8.0):  # confidences spanning [-1, 1] (ARM's gradient is not ~0)
        logits = [
            torch.randn(2, num_classes, 24, 24, generator=gen, dtype=torch.float64) * spread for _ in range(num_scales)
        ]
        target = torch.randint(0, num_classes, (2, 24, 24), generator=gen)
        target[torch.rand(2, 24, 24, generator=gen) < 0.1] = 255
        table = loss_and_gradients(LOSSES[loss_name], logits, target, arm, "table")
        exact = loss_and_gradients(LOSSES[loss_name], logits, target, arm, "exact")
        names = ["loss", *(f"logits[{k}] gradient" for k in range(num_scales)), "ARM gradient"]
        for name, got, want in zip(names, table, exact):
            worst[name] = max(worst.get(name, 0.0), relative_error(got, want))
        # A relative bound needs a gradient that is not zero by symmetry (ARM constant over the
        # batch's confidences cancels its own gradient to rounding).
        assert float(exact[-1].abs().max()) > 1e-6
    assert all(error <= contract.ARM_TABLE_RTOL for error in worst.values()), worst
    assert worst["ARM gradient"] > 0.0  # the table is an approximation, not the MLP itself


def test_the_step_arm_is_as_steep_as_trained_ones():
    """The bound above is stated for ARMs up to this curvature (a trained step's order)."""
    assert max_curvature(step_arm()) > 200.0
    assert max_curvature(spread_arm(0)) < max_curvature(step_arm())


def test_table_holds_arm_at_its_nodes_and_clamps_outside():
    arm = spread_arm(2)
    nodes = contract.arm_table_nodes(torch.float64)
    assert nodes.numel() == contract.ARM_TABLE_SIZE and nodes[0] == -1.0 and nodes[-1] == 1.0
    some = nodes[:: contract.ARM_TABLE_SIZE // 7]
    with torch.no_grad():
        torch.testing.assert_close(reference.arm_table_weights(arm, some), arm(some), rtol=1e-12, atol=1e-12)
        # Confidences rounded just past [-1, 1] read the end nodes.
        beyond = torch.tensor([-1.0 - 1e-6, 1.0 + 1e-6], dtype=torch.float64)
        torch.testing.assert_close(
            reference.arm_table_weights(arm, beyond), arm(torch.tensor([-1.0, 1.0], dtype=torch.float64))
        )


def test_public_losses_default_to_the_table_and_refuse_other_modes():
    arm = spread_arm(3).float()
    logits = torch.randn(2, 5, 6, 7, generator=torch.Generator().manual_seed(3)) * 3
    target = torch.randint(0, 5, (2, 6, 7), generator=torch.Generator().manual_seed(4))
    for backend in ("torch", "numba"):
        default = functional.arm_cross_entropy(logits, target, arm, backend=backend)
        table = reference.arm_cross_entropy(logits.double(), target, arm.double(), 255, "table")
        arm.float()
        torch.testing.assert_close(default.double(), table, rtol=1e-6, atol=0.0)
    with pytest.raises(ValueError, match="arm_mode: expected one of"):
        functional.arm_cross_entropy(logits, target, arm, arm_mode="lookup")
