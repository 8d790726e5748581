"""The fp32 tolerance model of tests/fp32_tolerance.py: it covers real fp32 sums, yet rejects
a gradient that is wrong by far less than the old fixed tolerances would notice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fp32_tolerance import U, assert_within, fp32_tolerance, sum_error_bound

from noisyseg.kernels import functional, reference


@pytest.mark.parametrize("positive", [True, False], ids=["positive", "mixed-sign"])
def test_bound_covers_sequential_fp32_sums(positive):
    """np.cumsum in float32 is recursive summation, the worst ordering: over 200 draws of
    sums of up to 4096 terms, every fp32 sum is within the bound of the exact (fp64) one."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(200):
        n = int(rng.integers(2, 4097))
        terms = rng.exponential(size=n) if positive else rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)
        fp32 = float(np.cumsum(terms.astype(np.float32))[-1])
        exact = float(np.sum(terms.astype(np.float32).astype(np.float64)))
        bound = float(sum_error_bound(torch.from_numpy(terms)))
        worst = max(worst, abs(fp32 - exact) / bound)
    assert worst <= 1.0
    assert worst > 0.01  # and the bound is not vacuous: within two orders of real errors


def test_bound_on_one_hand_computed_sum():
    # 4 terms 1, 2^-24, 2^-24, 2^-24: bound 4 * sqrt(4) * u * (1 + 3u) ~= 8u.
    terms = torch.tensor([1.0, U, U, U], dtype=torch.float64)
    assert float(sum_error_bound(terms)) == pytest.approx(8 * U * (1 + 3 * U))
    fp32 = np.float32(1.0)
    for t in terms[1:].tolist():
        fp32 = np.float32(fp32 + np.float32(t))  # each 1 + u rounds back to 1 (ties to even)
    assert abs(float(fp32) - float(terms.sum())) == pytest.approx(3 * U) and 3 * U <= 8 * U


def _numba_and_reference(num_classes):
    gen = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(3, num_classes, 17, 23, generator=gen) * 2.0
    target = torch.randint(0, num_classes, (3, 17, 23), generator=gen)
    target[torch.rand(3, 17, 23, generator=gen) < 0.2] = 255
    torch.manual_seed(0)
    arm = reference.ARM()
    with torch.no_grad():
        for p in arm.parameters():
            p.mul_(3.0)
    results = []
    for module in (functional.losses_on("numba"), reference):
        leaf = logits.clone().requires_grad_(True)
        arm.zero_grad()
        module.arm_cross_entropy(leaf, target, arm).backward()
        results.append([p.grad.clone() for p in arm.parameters()])
    tolerance = fp32_tolerance([logits], target, arm, [torch.ones(1)], 1.0)
    return results, tolerance.arm_atol


def test_a_perturbed_arm_gradient_entry_is_rejected():
    (got, want), atol = _numba_and_reference(19)
    for g, w, a in zip(got, want, atol):
        assert assert_within(g, w, a, 0.0) <= 1.0
    index = max(range(len(want)), key=lambda i: float(want[i].abs().max()))
    perturbed = got[index].clone()
    flat = perturbed.view(-1)
    entry = int(want[index].abs().argmax())
    flat[entry] *= 1.0 + 1e-3
    with pytest.raises(AssertionError, match="exceeds the fp32 allowance"):
        assert_within(perturbed, want[index], atol[index], 0.0)
