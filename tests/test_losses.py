"""GCE and OHEM against hand computation and plain-PyTorch references, alone and through ARM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from noisyseg.kernels import ARM, arm_reweighted_loss
from noisyseg.methods.losses import (
    generalized_cross_entropy,
    ohem_cross_entropy,
    ohem_keep_mask,
    pixel_loss,
    segmentation_loss,
)

IGNORE = 255


def _two_class_logits(true_class_probs: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """One image, one row of pixels, labelled class 1, with p(class 1) as given.

    With logits (0, log(p / (1 - p))) the softmax gives exactly p for class 1.
    """
    p = torch.tensor(true_class_probs, dtype=torch.float64)
    logits = torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))]).reshape(1, 2, 1, -1)
    target = torch.ones(1, 1, len(true_class_probs), dtype=torch.int64)
    return logits, target


def test_gce_matches_hand_computation() -> None:
    # Pixel 0: logits (2, 0, 0), label 0; pixel 1: logits (0, 1, 3), label 2; pixel 2 ignored.
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 3.0, 0.0]]).reshape(1, 3, 1, 3)
    target = torch.tensor([[[0, 2, IGNORE]]])
    q = 0.7
    p0 = math.exp(2) / (math.exp(2) + 1 + 1)
    p1 = math.exp(3) / (1 + math.e + math.exp(3))
    expected = [(1 - p0**q) / q, (1 - p1**q) / q, 0.0]

    per_pixel = generalized_cross_entropy(logits, target, q=q, reduction="none")
    np.testing.assert_allclose(per_pixel.reshape(-1).numpy(), expected, rtol=1e-6)
    mean = generalized_cross_entropy(logits, target, q=q)
    assert mean.item() == pytest.approx((expected[0] + expected[1]) / 2, rel=1e-6)
    assert generalized_cross_entropy(logits, target, q=q, reduction="sum").item() == pytest.approx(
        sum(expected), rel=1e-6
    )


def test_gce_gradient_matches_autograd_of_naive_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 3, generator=generator, requires_grad=True)
    target = torch.randint(0, 4, (2, 5, 3), generator=generator)
    target[0, 0, :] = IGNORE
    generalized_cross_entropy(logits, target, q=0.7).backward()

    naive_logits = logits.detach().double().requires_grad_(True)
    valid = target != IGNORE
    p_y = torch.softmax(naive_logits, dim=1).gather(1, target.clamp(max=3).unsqueeze(1)).squeeze(1)
    ((1 - p_y[valid] ** 0.7) / 0.7).mean().backward()
    torch.testing.assert_close(logits.grad, naive_logits.grad.float(), rtol=1e-5, atol=1e-7)


def test_gce_tends_to_cross_entropy_for_small_q() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, generator=generator)
    target = torch.randint(0, 3, (2, 4, 4), generator=generator)
    reference = F.cross_entropy(logits, target)
    assert generalized_cross_entropy(logits, target, q=1e-4).item() == pytest.approx(reference.item(), rel=1e-3)


def test_ohem_keeps_pixels_below_threshold_on_hand_made_case() -> None:
    probs = [0.1, 0.5, 0.65, 0.8, 0.9, 0.95]
    logits, target = _two_class_logits(probs)
    target[0, 0, 1] = IGNORE  # the 0.5 pixel does not count at all
    keep = ohem_keep_mask(logits, target, threshold=0.7, min_kept=0).reshape(-1).tolist()
    assert keep == [True, False, True, False, False, False]

    loss = ohem_cross_entropy(logits, target, threshold=0.7, min_kept=0)
    assert loss.item() == pytest.approx((-math.log(0.1) - math.log(0.65)) / 2, rel=1e-6)
    per_pixel = ohem_cross_entropy(logits, target, threshold=0.7, min_kept=0, reduction="none").reshape(-1)
    np.testing.assert_allclose(per_pixel.numpy(), [-math.log(0.1), 0, -math.log(0.65), 0, 0, 0], rtol=1e-6)


def test_ohem_min_kept_raises_the_threshold_to_keep_the_hardest_pixels() -> None:
    logits, target = _two_class_logits([0.95, 0.1, 0.9, 0.65, 0.8, 0.5])
    # 4 hardest valid pixels: 0.1, 0.5, 0.65, 0.8 (threshold 0.7 alone would keep 3).
    keep = ohem_keep_mask(logits, target, threshold=0.7, min_kept=4).reshape(-1).tolist()
    assert keep == [False, True, False, True, True, True]
    # min_kept counts per image: two copies of the image keep 4 pixels each.
    keep_batch = ohem_keep_mask(logits.repeat(2, 1, 1, 1), target.repeat(2, 1, 1), 0.7, min_kept=4)
    assert keep_batch.sum().item() == 8
    # Asking for more pixels than there are keeps all of them.
    assert ohem_keep_mask(logits, target, threshold=0.7, min_kept=100).all()


def test_ohem_gradient_reaches_only_the_kept_pixels() -> None:
    logits, target = _two_class_logits([0.1, 0.9])
    logits = logits.float().requires_grad_(True)
    ohem_cross_entropy(logits, target, threshold=0.7, min_kept=0).backward()
    # Only the kept pixel (p = 0.1) has a gradient: d(-log p1)/dz = p - onehot.
    expected = torch.tensor([[0.9, 0.0], [-0.9, 0.0]]).reshape(1, 2, 1, 2)
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["ce", "gce", "ohem"])
def test_arm_combination_equals_arm_reweighted_loss_of_the_pixel_loss(name: str) -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 6, 6, requires_grad=True)
    target = torch.randint(0, 5, (2, 6, 6))
    target[1, :2] = IGNORE
    arm = ARM()
    params = {"gce_q": 0.7, "ohem_threshold": 0.7, "ohem_min_kept": 10}

    combined = segmentation_loss(name, logits, target, arm=arm, **params)
    combined_grads = torch.autograd.grad(combined, [logits, *arm.parameters()])

    if name == "gce":
        losses = generalized_cross_entropy(logits, target, q=0.7, reduction="none")
        counted = target != IGNORE
    elif name == "ohem":
        losses = ohem_cross_entropy(logits, target, 0.7, 10, reduction="none")
        counted = ohem_keep_mask(logits, target, 0.7, 10)
    else:
        losses = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")
        counted = target != IGNORE
    reference = arm_reweighted_loss(losses, torch.softmax(logits.detach(), 1), counted, arm)
    reference_grads = torch.autograd.grad(reference, [logits, *arm.parameters()])

    torch.testing.assert_close(combined, reference)
    for got, expected in zip(combined_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", ["ce", "gce", "ohem"])
def test_without_arm_the_combination_is_the_mean_reduction(name: str) -> None:
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, 0] = IGNORE
    plain = {
        "ce": lambda: F.cross_entropy(logits, target, ignore_index=IGNORE),
        "gce": lambda: generalized_cross_entropy(logits, target, q=0.7),
        "ohem": lambda: ohem_cross_entropy(logits, target, 0.7, 3),
    }[name]()
    combined = segmentation_loss(name, logits, target, gce_q=0.7, ohem_threshold=0.7, ohem_min_kept=3)
    torch.testing.assert_close(combined, plain)


def test_all_ignored_batch_gives_zero_not_nan() -> None:
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.full((1, 2, 2), IGNORE)
    for loss in (generalized_cross_entropy(logits, target), ohem_cross_entropy(logits, target)):
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.equal(grad, torch.zeros_like(grad))


def test_bad_input_is_named() -> None:
    logits = torch.randn(1, 3, 2, 2)
    target = torch.zeros(1, 2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="q: GCE needs 0 < q <= 1"):
        generalized_cross_entropy(logits, target, q=0.0)
    with pytest.raises(ValueError, match="target: expected shape"):
        generalized_cross_entropy(logits, target[:, :1])
    with pytest.raises(ValueError, match="target: class ids"):
        ohem_cross_entropy(logits, target + 3)
    with pytest.raises(ValueError, match="min_kept"):
        ohem_cross_entropy(logits, target, min_kept=-1)
    with pytest.raises(ValueError, match="reduction"):
        generalized_cross_entropy(logits, target, reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown per-pixel loss 'focal'"):
        pixel_loss("focal", logits, target)
