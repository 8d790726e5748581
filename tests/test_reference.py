"""The reference losses against independent computations: torch's own cross-entropy, numpy
re-implementations of the formulas, hand-computed cases and float64 gradcheck."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from noisyseg.kernels.reference import (
    ARM,
    adele_arm_loss,
    arm_cross_entropy,
    arm_pixel_weights,
    multiscale_consistency,
    normalized_confidence,
)


def make_batch(n=2, c=4, h=5, w=6, ignore_fraction=0.2, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=gen, dtype=dtype) * 2
    target = torch.randint(0, c, (n, h, w), generator=gen)
    target[torch.rand(n, h, w, generator=gen) < ignore_fraction] = 255
    return logits, target


def seeded_arm(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    arm = ARM().to(dtype)
    with torch.no_grad():  # spread the weights so the ARM is far from constant
        for p in arm.parameters():
            p.mul_(3.0)
    return arm


def numpy_arm(arm, confidence):
    """The 1-4-4-4-1 MLP written out in numpy from ARM's parameters."""
    hidden = confidence.reshape(1, -1).astype(np.float64)
    layers = list(arm.layers)
    for index, layer in enumerate(layers):
        weight = layer.weight.detach().double().numpy()[:, :, 0, 0]
        bias = layer.bias.detach().double().numpy()[:, None]
        hidden = weight @ hidden + bias
        if index < len(layers) - 1:
            hidden = hidden / (1 + np.exp(-hidden))  # swish
        else:
            hidden = 1 / (1 + np.exp(-hidden))
    return hidden[0]


def numpy_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def test_arm_has_53_parameters_and_outputs_in_unit_interval():
    arm = ARM()
    assert sum(p.numel() for p in arm.parameters()) == 53
    weights = arm(torch.linspace(-1, 1, 101))
    assert weights.shape == (101,)
    assert torch.all((weights > 0) & (weights < 1))


def test_normalized_confidence_extremes_and_hand_case():
    one_hot = torch.eye(4).reshape(4, 4, 1)  # four pixels, each one-hot
    assert torch.allclose(normalized_confidence(one_hot), torch.ones(4, 1))
    uniform = torch.full((1, 4, 1), 0.25)
    assert torch.allclose(normalized_confidence(uniform), -torch.ones(1, 1))
    # C = 3, p = (0.5, 0.3, 0.2): v = ((1/6)^2 + (1/30)^2 + (2/15)^2) / 3
    p = torch.tensor([0.5, 0.3, 0.2]).reshape(1, 3, 1)
    v = ((0.5 - 1 / 3) ** 2 + (0.3 - 1 / 3) ** 2 + (0.2 - 1 / 3) ** 2) / 3
    assert normalized_confidence(p).item() == pytest.approx(2 * 9 / 2 * v - 1, rel=1e-6)


def test_without_arm_equals_torch_cross_entropy():
    logits, target = make_batch()
    logits.requires_grad_(True)
    ours = arm_cross_entropy(logits, target, None)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    theirs = F.cross_entropy(logits, target, ignore_index=255)
    (grad_theirs,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(grad_ours, grad_theirs)


def test_arm_cross_entropy_value_and_logit_gradient_match_numpy():
    logits, target = make_batch(n=2, c=5, h=4, w=3, seed=1)
    arm = seeded_arm(1)
    logits.requires_grad_(True)
    loss = arm_cross_entropy(logits, target, arm)
    (grad,) = torch.autograd.grad(loss, logits)

    z = logits.detach().double().numpy()
    y = target.numpy()
    valid = y != 255
    p = numpy_softmax(z)
    c = z.shape[1]
    v = ((p - 1 / c) ** 2).mean(axis=1)
    v_hat = 2 * c**2 / (c - 1) * v - 1
    w = numpy_arm(arm, v_hat[valid])
    p_valid = np.moveaxis(p, 1, -1)[valid]  # (P, C)
    y_valid = y[valid]
    pixel_loss = -np.log(p_valid[np.arange(len(y_valid)), y_valid])
    expected = (w * pixel_loss).sum() / w.sum()
    assert loss.item() == pytest.approx(expected, rel=1e-5)

    one_hot = np.eye(c)[y_valid]
    expected_grad_valid = (w / w.sum())[:, None] * (p_valid - one_hot)
    grad_np = np.moveaxis(grad.double().numpy(), 1, -1)
    np.testing.assert_allclose(grad_np[valid], expected_grad_valid, rtol=1e-4, atol=1e-7)
    assert np.all(grad_np[~valid] == 0)


def test_arm_parameter_gradient_is_through_l2_with_constant_l1():
    """ARM's gradient equals the derivative of sum_i w2_i(theta) l_i / S0, S0 held fixed,
    whose own autograd is verified by float64 gradcheck."""
    logits, target = make_batch(n=1, c=3, h=4, w=4, seed=2)
    arm = seeded_arm(2, dtype=torch.float64)
    loss = arm_cross_entropy(logits.double(), target, arm)
    grads = torch.autograd.grad(loss, list(arm.parameters()))

    valid = target != 255
    probs = torch.softmax(logits.double(), 1)
    confidence = normalized_confidence(probs)[valid]
    pixel_loss = F.cross_entropy(logits.double(), target, ignore_index=255, reduction="none")[valid]
    names = [name for name, _ in arm.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in arm.parameters())

    def l2_weights(*flat):
        weights = functional_call(arm, dict(zip(names, flat)), (confidence,))
        return weights / weights.norm()

    s0 = l2_weights(*params).sum().detach()

    def surrogate(*flat):
        return (l2_weights(*flat) * pixel_loss).sum() / s0

    assert torch.autograd.gradcheck(surrogate, params)
    expected = torch.autograd.grad(surrogate(*params), params)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_weighted_cross_entropy_gradcheck_float64():
    """With the weights as constant inputs, the network's loss is an ordinary function."""
    logits, target = make_batch(n=1, c=3, h=3, w=4, seed=3, dtype=torch.float64)
    arm = seeded_arm(3, dtype=torch.float64)
    valid = target != 255
    with torch.no_grad():
        weights = arm_pixel_weights(arm, normalized_confidence(torch.softmax(logits, 1))[valid])

    def weighted_ce(z):
        pixel_loss = F.cross_entropy(z, target, ignore_index=255, reduction="none")[valid]
        return (weights * pixel_loss).sum()

    z = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(weighted_ce, (z,))
    (expected,) = torch.autograd.grad(weighted_ce(z), z)
    (got,) = torch.autograd.grad(arm_cross_entropy(z, target, arm), z)
    torch.testing.assert_close(got, expected)


def test_plain_cross_entropy_gradcheck_float64():
    logits, target = make_batch(n=2, c=3, h=3, w=3, seed=4, dtype=torch.float64)
    z = logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: arm_cross_entropy(x, target, None), (z,))


@pytest.mark.parametrize("mask", ["image", "pixel"])
@pytest.mark.parametrize("num_scales", [2, 3])
def test_multiscale_consistency_gradcheck_float64(mask, num_scales):
    gen = torch.Generator().manual_seed(5)
    target = torch.randint(0, 4, (2, 3, 4), generator=gen)
    target[0, 0] = 255
    scales = [
        torch.randn(2, 4, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(num_scales)
    ]
    assert torch.autograd.gradcheck(
        lambda *z: multiscale_consistency(list(z), target, rho=0.0, mask=mask), tuple(scales)
    )


def test_multiscale_consistency_hand_computed_single_pixels():
    # Two scales, two classes, pixel 0 valid, pixel 1 ignored.
    z1 = torch.tensor([[[[2.0, 9.0]], [[0.0, 9.0]]]])  # (N=1, C=2, H=1, W=2)
    z2 = torch.tensor([[[[0.0, -9.0]], [[1.0, 0.0]]]])
    target = torch.tensor([[[0, 255]]])
    p1 = np.array([1 / (1 + math.exp(-2)), 1 - 1 / (1 + math.exp(-2))])
    p2 = np.array([1 / (1 + math.exp(1)), 1 - 1 / (1 + math.exp(1))])
    q = (p1 + p2) / 2
    kl = (p1 * np.log(p1 / q)).sum() + (p2 * np.log(p2 / q)).sum()
    got = multiscale_consistency([z1, z2], target, rho=0.0)
    assert got.item() == pytest.approx(kl, rel=1e-5)
    # max q at the valid pixel is about 0.6: rho above it masks the image out entirely.
    assert multiscale_consistency([z1, z2], target, rho=0.7).item() == 0.0


def test_masked_out_pixels_still_count_in_the_denominator():
    gen = torch.Generator().manual_seed(6)
    sharp = torch.randn(1, 3, 1, 4, generator=gen) * 8
    flat = torch.randn(1, 3, 1, 4, generator=gen) * 0.01
    z1 = torch.cat([sharp, flat])  # image 0 confident, image 1 near-uniform
    z2 = z1 + torch.randn(z1.shape, generator=gen)
    target = torch.zeros(2, 1, 4, dtype=torch.long)
    everything = multiscale_consistency([z1, z2], target, rho=0.0)
    first_only = multiscale_consistency([z1[:1], z2[:1]], target[:1], rho=0.0) / 2
    kept = multiscale_consistency([z1, z2], target, rho=0.6, mask="image")
    torch.testing.assert_close(kept, first_only)
    assert kept < everything


def test_pixel_mask_keeps_only_confident_pixels():
    z1 = torch.tensor([[[[6.0, 0.0]], [[0.0, 0.0]]]])
    z2 = torch.tensor([[[[5.0, 0.5]], [[0.0, 0.0]]]])
    target = torch.tensor([[[0, 0]]])
    per_pixel = multiscale_consistency([z1, z2], target, rho=0.8, mask="pixel")
    only_first = multiscale_consistency([z1[..., :1], z2[..., :1]], target[..., :1], rho=0.0) / 2
    torch.testing.assert_close(per_pixel, only_first)


def test_detaching_q_leaves_the_gradient_unchanged():
    """Why a fused kernel may treat q as a constant (method-spec section 4)."""
    gen = torch.Generator().manual_seed(7)
    scales = [torch.randn(1, 5, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    target = torch.zeros(1, 3, 3, dtype=torch.long)
    (full,) = [torch.autograd.grad(multiscale_consistency(scales, target, rho=0.0), scales)]
    log_p = [F.log_softmax(z, 1) for z in scales]
    log_q = (torch.logsumexp(torch.stack(log_p), 0) - math.log(3)).detach()
    detached = sum((lp.exp() * (lp - log_q)).sum() for lp in log_p) / 9
    for got, want in zip(full, torch.autograd.grad(detached, scales)):
        torch.testing.assert_close(got, want)


def test_ignored_pixels_contribute_nothing():
    logits, target = make_batch(seed=8)
    arm = seeded_arm(8)
    ignored = (target == 255).unsqueeze(1).expand_as(logits)
    changed = torch.where(ignored, torch.randn_like(logits) * 10, logits)
    for fn in (
        lambda z: arm_cross_entropy(z, target, arm),
        lambda z: multiscale_consistency([z, z * 0.5], target, rho=0.0),
        lambda z: adele_arm_loss([z, z * 0.5], target, arm),
    ):
        torch.testing.assert_close(fn(logits), fn(changed))
        z = logits.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(z), z)
        assert torch.all(grad[ignored] == 0)


def test_all_ignored_batch_gives_zero_and_zero_gradients():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255)
    arm = ARM()
    for loss in (
        arm_cross_entropy(logits, target, arm),
        arm_cross_entropy(logits, target, None),
        multiscale_consistency([logits, logits * 2], target),
        adele_arm_loss([logits, logits * 2], target, arm),
    ):
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.all(grad == 0) and not torch.isnan(grad).any()


def test_adele_arm_loss_combines_the_terms():
    logits, target = make_batch(seed=9)
    second = logits.flip(-1)
    arm = seeded_arm(9)
    expected = (
        arm_cross_entropy(logits, target, arm)
        + arm_cross_entropy(second, target, arm)
        + 0.5 * multiscale_consistency([logits, second], target, rho=0.3)
    ) / 2
    got = adele_arm_loss([logits, second], target, arm, lam=0.5, rho=0.3)
    torch.testing.assert_close(got, expected)


def test_half_precision_inputs_give_fp32_loss_and_input_dtype_gradients():
    logits, target = make_batch(seed=10)
    half = logits.half().requires_grad_(True)
    loss = arm_cross_entropy(half, target, seeded_arm(10))
    assert loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, half)
    assert grad.dtype == torch.float16


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: arm_cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, 5, dtype=torch.long), None),
            "target: expected shape",
        ),
        (lambda: arm_cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, 4), None), "integer class ids"),
        (
            lambda: arm_cross_entropy(torch.randn(1, 3, 2), torch.tensor([[0, 7]]), None),
            r"class ids must be in \[0, 3\)",
        ),
        (
            lambda: multiscale_consistency(
                [torch.randn(1, 3, 2), torch.randn(1, 3, 3)], torch.zeros(1, 2, dtype=torch.long)
            ),
            "logits_per_scale",
        ),
        (
            lambda: multiscale_consistency([torch.randn(1, 3, 2)], torch.zeros(1, 2, dtype=torch.long), mask="global"),
            "mask",
        ),
    ],
)
def test_bad_inputs_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_packed_parameters_follow_the_documented_layout_and_carry_gradients():
    from noisyseg.kernels.contract import (
        ARM_NUM_PARAMETERS,
        ARM_PARAMETER_OFFSETS,
        pack_arm_parameters,
    )

    arm = seeded_arm(11)
    flat = pack_arm_parameters(arm)
    assert flat.shape == (ARM_NUM_PARAMETERS,) == (53,)
    for name, param in arm.named_parameters():
        start, end = ARM_PARAMETER_OFFSETS[name]
        assert torch.equal(flat[start:end], param.reshape(-1))
    (flat * torch.arange(53.0)).sum().backward()
    for name, param in arm.named_parameters():
        start, end = ARM_PARAMETER_OFFSETS[name]
        assert torch.equal(param.grad.reshape(-1), torch.arange(start, end, dtype=torch.float32))


def test_auto_backend_picks_fused_kernels_by_device_and_the_reference_for_fp64():
    from noisyseg.kernels.functional import resolve_backend

    assert resolve_backend("auto", torch.zeros(1)) == "numba"
    assert resolve_backend("auto", torch.zeros(1, dtype=torch.float64)) == "torch"
    assert resolve_backend("triton", torch.zeros(1)) == "triton"
    with pytest.raises(ValueError, match="backend: expected one of"):
        resolve_backend("cuda", torch.zeros(1))


def test_a_backend_whose_package_is_missing_is_named(monkeypatch):
    import sys

    from noisyseg.kernels import functional

    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.delitem(sys.modules, "noisyseg.kernels.triton_arm_cross_entropy", raising=False)
    monkeypatch.delitem(sys.modules, "noisyseg.kernels.triton_adele_arm", raising=False)
    logits, target = make_batch()
    with pytest.raises(RuntimeError, match="backend 'triton' needs the 'triton' package"):
        functional.arm_cross_entropy(logits, target, None, backend="triton")
