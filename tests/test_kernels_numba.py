"""The numba CPU backend against the reference (`kernels/reference.py`): loss values, gradients
to every logit map and to all 53 ARM parameters, over odd and power-of-two shapes, ignored
pixels, both rho masks, 2 and 3 scales, grad_output != 1, non-contiguous and half-precision
inputs, plus hypothesis property tests over shapes and ignore patterns.

Tolerances: fp32 ones are derived per comparison from the rounding error of the sums involved
(tests/fp32_tolerance.py: lambda sqrt(n) u sum |terms| for sums over n pixels and C classes,
with ARM's parameter gradients, sums of cancelling per-pixel terms, bounded entry by entry
from fp64 per-pixel Jacobians); fp16/bf16 inputs rtol 2e-2 / 5e-2 (the gradient is
rounded to the input dtype, the reference sees the same rounded logits).
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
from fp32_tolerance import assert_within, fp32_tolerance
from hypothesis import given, settings
from hypothesis import strategies as st

from noisyseg.kernels import functional, numba_common, reference
from noisyseg.kernels.reference import ARM

fused = functional.losses_on("numba")

FP32 = None  # derived per comparison: fp32_tolerance.fp32_tolerance
LOW_PRECISION = {
    torch.float16: {"rtol": 2e-2, "value_atol": 1e-3, "grad_atol": 1e-4, "arm_atol": 1e-3},
    torch.bfloat16: {"rtol": 5e-2, "value_atol": 1e-2, "grad_atol": 1e-3, "arm_atol": 1e-2},
}


def make_batch(n=3, c=5, h=17, w=23, ignore_fraction=0.2, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=gen) * scale
    target = torch.randint(0, c, (n, h, w), generator=gen)
    target[torch.rand(n, h, w, generator=gen) < ignore_fraction] = 255
    return logits, target


def related_scales(logits, num_scales, seed=0):
    """Scale maps that agree in part (like a network's outputs at three input sizes)."""
    gen = torch.Generator().manual_seed(seed + 100)
    return [logits] + [logits * 0.7 + torch.randn(logits.shape, generator=gen) for _ in range(num_scales - 1)]


def seeded_arm(seed=0):
    torch.manual_seed(seed)
    arm = ARM()
    with torch.no_grad():  # spread the weights so ARM is far from constant
        for p in arm.parameters():
            p.mul_(3.0)
    return arm


def evaluate(module, name, logits_list, target, arm, grad_output=1.0, **kwargs):
    """Loss value, gradient of every logit map and of every ARM parameter for one backend."""
    leaves = [z.detach().clone().requires_grad_(True) for z in logits_list]
    if arm is not None:
        arm.zero_grad()
    if name == "arm_cross_entropy":
        loss = module.arm_cross_entropy(leaves[0], target, arm, **kwargs)
    elif name == "multiscale_consistency":
        loss = module.multiscale_consistency(leaves, target, **kwargs)
    else:
        loss = module.adele_arm_loss(leaves, target, arm, **kwargs)
    (loss * grad_output).backward()
    # An all-ignored batch leaves the reference's ARM outside the graph: no gradient means zero.
    arm_grads = (
        [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in arm.parameters()] if arm is not None else []
    )
    return loss.detach(), [z.grad for z in leaves], arm_grads


def assert_matches_reference(name, logits_list, target, arm, tol=FP32, grad_output=1.0, **kwargs):
    """The fused loss against the reference computing the same function: ARM through its table
    unless ``arm_mode="exact"`` is passed (the table's own bound: tests/test_arm_table.py)."""
    if name != "multiscale_consistency":
        kwargs.setdefault("arm_mode", "table")
    want = evaluate(reference, name, logits_list, target, arm, grad_output, **kwargs)
    got = evaluate(fused, name, logits_list, target, arm, grad_output, **kwargs)
    assert got[0].dtype == want[0].dtype
    if tol is None:  # fp32: from the sizes of the sums involved
        assert all(z.dtype == torch.float32 for z in logits_list)
        fp32 = fp32_tolerance(logits_list, target, arm, want[1], grad_output, kwargs.get("ignore_index", 255))
        assert_within(got[0], want[0], fp32.value_atol, fp32.value_rtol, "loss value")
        for got_grad, want_grad, atol in zip(got[1], want[1], fp32.logit_atol):
            assert got_grad.dtype == want_grad.dtype and got_grad.shape == want_grad.shape
            assert_within(got_grad, want_grad, atol, fp32.logit_rtol, "logit gradient")
        for index, (got_grad, want_grad) in enumerate(zip(got[2], want[2])):
            assert_within(got_grad, want_grad, fp32.arm_atol[index], 0.0, f"ARM parameter {index}")
        return got
    torch.testing.assert_close(got[0], want[0], rtol=tol["rtol"], atol=tol["value_atol"])
    for got_grad, want_grad in zip(got[1], want[1]):
        assert got_grad.dtype == want_grad.dtype and got_grad.shape == want_grad.shape
        torch.testing.assert_close(got_grad, want_grad, rtol=tol["rtol"], atol=tol["grad_atol"])
    # ARM's gradient sums terms that cancel (exactly 0 for a single valid pixel): its absolute
    # tolerance also scales with the largest entry.
    arm_scale = max((g.abs().max().item() for g in want[2]), default=0.0)
    for got_grad, want_grad in zip(got[2], want[2]):
        torch.testing.assert_close(got_grad, want_grad, rtol=tol["rtol"], atol=tol["arm_atol"] + 1e-4 * arm_scale)
    return got


SHAPES = [(3, 17, 23), (2, 16, 16)]


@pytest.mark.parametrize("num_classes", [2, 5, 19, 21, 150])
@pytest.mark.parametrize("shape", SHAPES, ids=["odd", "pow2"])
@pytest.mark.parametrize("arm_mode", ["table", "exact", None], ids=["arm-table", "arm-exact", "uniform"])
def test_arm_cross_entropy_matches_reference(num_classes, shape, arm_mode):
    n, h, w = shape
    logits, target = make_batch(n, num_classes, h, w, seed=num_classes)
    arm = seeded_arm(num_classes) if arm_mode else None
    assert_matches_reference("arm_cross_entropy", [logits], target, arm, arm_mode=arm_mode or "table")


@pytest.mark.parametrize("num_classes", [2, 19])
@pytest.mark.parametrize("num_scales", [2, 3])
@pytest.mark.parametrize("mask, rho", [("image", 0.3), ("pixel", 0.5)])
@pytest.mark.parametrize("shape", SHAPES, ids=["odd", "pow2"])
def test_multiscale_consistency_matches_reference(num_classes, num_scales, mask, rho, shape):
    n, h, w = shape
    logits, target = make_batch(n, num_classes, h, w, seed=num_scales)
    scales = related_scales(logits, num_scales)
    assert_matches_reference("multiscale_consistency", scales, target, None, rho=rho, mask=mask)


def confident_and_uniform_images():
    """Three scales of two images: image 0 confident, image 1 near-uniform at every scale."""
    logits, target = make_batch(n=2, c=5, h=8, w=9, seed=3)
    logits[0] *= 6.0
    logits[1] *= 0.01
    scales = related_scales(logits, 3)
    scales[1][1] *= 0.01
    scales[2][1] *= 0.01
    return scales, target


@pytest.mark.parametrize("arm_mode", ["table", "exact", None], ids=["arm-table", "arm-exact", "no-arm"])
def test_image_mask_drops_the_images_below_rho(arm_mode):
    """rho between the two images keeps only image 0's KL term; each scale's CE keeps both."""
    scales, target = confident_and_uniform_images()
    if arm_mode is None:
        loss, _, _ = assert_matches_reference("multiscale_consistency", scales, target, None, rho=0.6, mask="image")
    else:
        loss, _, _ = assert_matches_reference(
            "adele_arm_loss", scales, target, seeded_arm(3), rho=0.6, mask="image", arm_mode=arm_mode
        )
    assert 0.0 < loss.item()


@pytest.mark.parametrize("arm_mode", ["table", "exact"])
def test_arm_gradient_alone_with_the_consistency_term(arm_mode):
    """Logits that need no gradient: the value and ARM's gradient without writing the logits'."""
    scales, target = confident_and_uniform_images()
    arm_fused, arm_reference = seeded_arm(4), seeded_arm(4)
    values = []
    for module, arm in ((fused, arm_fused), (reference, arm_reference)):
        loss = module.adele_arm_loss(scales, target, arm, lam=0.7, rho=0.6, mask="image", arm_mode=arm_mode)
        loss.backward()
        values.append(loss.detach())
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)
    for got, want in zip(arm_fused.parameters(), arm_reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6)


def test_consistency_survives_probabilities_that_underflow_in_every_scale():
    """Logits spread over hundreds: some p_k are 0 in fp32 at every scale; log q stays finite."""
    logits, target = make_batch(n=2, c=5, h=6, w=7, seed=4, scale=80.0)
    scales = [logits, logits * 1.1, logits * 0.9]
    got = assert_matches_reference("multiscale_consistency", scales, target, None, rho=0.0, mask="pixel")
    assert torch.isfinite(got[0]) and all(torch.isfinite(g).all() for g in got[1])


@pytest.mark.parametrize("num_scales", [2, 3])
@pytest.mark.parametrize("arm_mode", ["table", "exact", None], ids=["arm-table", "arm-exact", "uniform"])
@pytest.mark.parametrize("mask", ["image", "pixel"])
def test_adele_arm_loss_matches_reference(num_scales, arm_mode, mask):
    logits, target = make_batch(3, 21, 17, 23, seed=5)
    arm = seeded_arm(5) if arm_mode else None
    scales = related_scales(logits, num_scales)
    assert_matches_reference(
        "adele_arm_loss", scales, target, arm, lam=0.7, rho=0.4, mask=mask, arm_mode=arm_mode or "table"
    )


@pytest.mark.parametrize("arm_mode", ["table", "exact"])
def test_adele_arm_loss_without_consistency_term(arm_mode):
    """lam = 0: the table path writes every scale's gradient in one pass and leaves each
    scale's own 1/sum(w) to backward."""
    logits, target = make_batch(2, 7, 17, 23, seed=15)
    scales = related_scales(logits, 3)
    assert_matches_reference(
        "adele_arm_loss", scales, target, seeded_arm(15), grad_output=-1.5, lam=0.0, arm_mode=arm_mode
    )


@pytest.mark.parametrize("name", ["arm_cross_entropy", "multiscale_consistency", "adele_arm_loss"])
def test_grad_output_other_than_one_is_honoured(name):
    logits, target = make_batch(seed=6)
    arm = None if name == "multiscale_consistency" else seeded_arm(6)
    if name == "arm_cross_entropy":
        assert_matches_reference(name, [logits], target, arm, grad_output=-2.5)
    else:
        assert_matches_reference(name, related_scales(logits, 3), target, arm, grad_output=-2.5, rho=0.3)


@pytest.mark.parametrize(
    "layout",
    [
        lambda z: z.contiguous(memory_format=torch.channels_last),
        lambda z: torch.cat([z, z], dim=3)[..., ::2],
        lambda z: z.transpose(2, 3).contiguous().transpose(2, 3),
    ],
    ids=["channels_last", "strided_slice", "transposed"],
)
def test_non_contiguous_inputs(layout):
    logits, target = make_batch(seed=7)
    strided = layout(logits)
    assert not strided.is_contiguous()
    arm = seeded_arm(7)
    assert_matches_reference("arm_cross_entropy", [strided], target, arm)
    assert_matches_reference("adele_arm_loss", [strided, layout(logits * 0.5)], target, arm, rho=0.3)


def test_logits_without_two_spatial_dimensions():
    """(N, C, L) and (N, C) logits, as the reference accepts them."""
    logits, target = make_batch(n=2, c=6, h=1, w=29, seed=8)
    arm = seeded_arm(8)
    assert_matches_reference("arm_cross_entropy", [logits[:, :, 0]], target[:, 0], arm)
    assert_matches_reference("adele_arm_loss", [logits[:, :, 0, 0]] * 2, target[:, 0, 0], arm, rho=0.2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    logits, target = make_batch(seed=9)
    arm = seeded_arm(9)
    scales = [z.to(dtype) for z in related_scales(logits, 3)]
    assert_matches_reference("adele_arm_loss", scales, target, arm, tol=LOW_PRECISION[dtype], rho=0.3)
    assert_matches_reference("arm_cross_entropy", scales[:1], target, arm, tol=LOW_PRECISION[dtype])


@pytest.mark.parametrize("name", ["arm_cross_entropy", "multiscale_consistency", "adele_arm_loss"])
@pytest.mark.parametrize("with_arm", [True, False], ids=["arm", "uniform"])
def test_all_ignored_batch_gives_zero_and_zero_gradients(name, with_arm):
    logits, _ = make_batch(seed=10)
    target = torch.full((3, 17, 23), 255)
    arm = seeded_arm(10) if with_arm and name != "multiscale_consistency" else None
    if name == "arm_cross_entropy":
        loss, grads, arm_grads = evaluate(fused, name, [logits], target, arm)
    else:
        loss, grads, arm_grads = evaluate(fused, name, [logits, logits * 2], target, arm, rho=0.0)
    assert loss.item() == 0.0
    for grad in [*grads, *arm_grads]:
        assert torch.all(grad == 0)


def test_ignored_pixels_get_zero_gradient_and_do_not_change_the_loss():
    logits, target = make_batch(seed=11)
    arm = seeded_arm(11)
    ignored = (target == 255).unsqueeze(1).expand_as(logits)
    changed = torch.where(ignored, torch.randn_like(logits) * 10, logits)
    first = evaluate(fused, "adele_arm_loss", [logits, logits * 0.5], target, arm, rho=0.0)
    second = evaluate(fused, "adele_arm_loss", [changed, changed * 0.5], target, arm, rho=0.0)
    torch.testing.assert_close(first[0], second[0])
    assert torch.all(first[1][0][ignored] == 0)


def test_an_ignored_pixels_infinite_logit_leaves_arm_cross_entropy_finite():
    """Class 0 stands in for an ignored pixel's target inside the pass; a -inf logit there once
    made the masked sums 0 * inf = NaN. The loss and gradients equal those with the pixel's
    logits finite."""
    logits, target = make_batch(seed=13)
    arm = seeded_arm(13)
    pixel = (target == 255).nonzero()[0]
    infinite = logits.clone()
    infinite[pixel[0], 0, pixel[1], pixel[2]] = -float("inf")
    want = evaluate(fused, "arm_cross_entropy", [logits], target, arm)
    got = evaluate(fused, "arm_cross_entropy", [infinite], target, arm)
    assert torch.isfinite(got[0])
    torch.testing.assert_close(got[0], want[0])
    for got_grad, want_grad in zip([*got[1], *got[2]], [*want[1], *want[2]]):
        torch.testing.assert_close(got_grad, want_grad)


def test_other_ignore_index():
    logits, target = make_batch(seed=12)
    target[target == 255] = -1
    assert_matches_reference(
        "adele_arm_loss",
        [logits, logits.flip(-1)],
        target,
        seeded_arm(12),
        rho=0.3,
        ignore_index=-1,
    )


def test_results_are_deterministic():
    logits, target = make_batch(n=2, c=19, h=40, w=50, seed=13)
    arm = seeded_arm(13)
    first = evaluate(fused, "adele_arm_loss", [logits, logits * 0.5, logits.flip(-1)], target, arm)
    second = evaluate(fused, "adele_arm_loss", [logits, logits * 0.5, logits.flip(-1)], target, arm)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1] + first[2], second[1] + second[2]))


def test_forward_without_gradients_gives_the_same_value():
    logits, target = make_batch(seed=14)
    arm = seeded_arm(14)
    with torch.no_grad():
        value = fused.adele_arm_loss([logits, logits * 0.5], target, arm, rho=0.3)
    torch.testing.assert_close(
        value,
        reference.adele_arm_loss([logits, logits * 0.5], target, arm, rho=0.3).detach(),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: fused.arm_cross_entropy(torch.randn(1, 3, 2), torch.tensor([[0, 7]]), None),
            r"class ids must be in \[0, 3\)",
        ),
        (
            lambda: fused.arm_cross_entropy(torch.randn(1, 3, 2), torch.tensor([[-3, 0]]), ARM()),
            r"class ids must be in \[0, 3\)",
        ),
        (
            lambda: fused.arm_cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, 5, dtype=torch.long), None),
            "target: expected shape",
        ),
        (
            lambda: fused.multiscale_consistency(
                [torch.randn(1, 3, 2), torch.randn(1, 3, 3)], torch.zeros(1, 2, dtype=torch.long)
            ),
            "logits_per_scale",
        ),
        (
            lambda: fused.adele_arm_loss(
                [torch.randn(1, 3, 2)], torch.zeros(1, 2, dtype=torch.long), None, mask="global"
            ),
            "mask",
        ),
    ],
)
def test_bad_inputs_raise_the_reference_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_dispatch_through_the_public_registry():
    logits, target = make_batch(seed=15)
    arm = seeded_arm(15)
    got = functional.adele_arm_loss([logits, logits * 0.5], target, arm, rho=0.3, backend="numba")
    torch.testing.assert_close(
        got,
        reference.adele_arm_loss([logits, logits * 0.5], target, arm, rho=0.3).detach(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_vectorised_exp_and_log_against_numpy():
    values = np.linspace(-87.0, 88.0, 4001, dtype=np.float32)
    exps = np.array([numba_common.fast_exp(v) for v in values], np.float32)
    np.testing.assert_allclose(exps, np.exp(values.astype(np.float64)), rtol=3e-7)
    positives = np.exp(np.linspace(-69.0, 69.0, 4001)).astype(np.float32)
    logs = np.array([numba_common.fast_log(v) for v in positives], np.float32)
    np.testing.assert_allclose(logs, np.log(positives.astype(np.float64)), rtol=3e-7, atol=3e-7)
    sigmoids = np.array([numba_common.fast_sigmoid(v) for v in values[::40]], np.float32)
    np.testing.assert_allclose(sigmoids, 1 / (1 + np.exp(-values[::40].astype(np.float64))), rtol=3e-7)


@pytest.mark.parametrize("width", [0, 1, 15, 16, 17, 63, 1024, 1031])
def test_streamed_rows_equal_a_copy_at_every_alignment(width):
    """Non-temporal stores for the whole cache lines, ordinary ones at both ends: every offset
    into a 64-byte-aligned buffer (and a byte-misaligned row, copied by plain stores) gets exactly
    the source row, and nothing outside it is written."""
    import numba

    @numba.njit
    def copy_and_fence(dst, src, width):
        numba_common.stream_row(dst, src, width)
        numba_common.stream_fence()

    source = np.random.default_rng(width).normal(size=max(width, 1)).astype(np.float32)
    for offset in range(17):
        buffer = torch.full((width + 48,), -7.0).numpy()  # torch's allocator: 64-byte aligned
        assert buffer.ctypes.data % 64 == 0
        copy_and_fence(buffer[offset : offset + width], source, width)
        np.testing.assert_array_equal(buffer[offset : offset + width], source[:width])
        outside = np.concatenate([buffer[:offset], buffer[offset + width :]])
        np.testing.assert_array_equal(outside, np.full_like(outside, -7.0))
    raw = np.zeros(4 * width + 8, np.uint8)
    misaligned = np.frombuffer(raw.data, np.float32, count=width, offset=1)
    copy_and_fence(misaligned, source, width)
    np.testing.assert_array_equal(misaligned, source[:width])
    if numba_common.X86:  # the whole lines really are streaming stores
        assert "movntps" in next(iter(copy_and_fence.inspect_asm().values()))


def test_widened_float32_rows_added_at_a_place():
    import numba

    @numba.njit
    def add_all(flat, places, rows):
        for i in range(places.shape[0]):
            numba_common.add_widened_float32x4(flat, places[i], rows, 4 * i)

    rng = np.random.default_rng(0)
    places = rng.integers(0, 37, 500)  # overlapping and repeated places
    rows = rng.normal(size=(500, 4)).astype(np.float32)
    got = np.zeros(40)
    add_all(got, places, rows.reshape(-1))
    want = np.zeros(40)
    for place, row in zip(places, rows.astype(np.float64)):
        want[place : place + 4] += row
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_four_float64_adds_at_a_place():
    import numba

    @numba.njit
    def add_all(flat, places, values):
        for i in range(places.shape[0]):
            numba_common.add_float64x4(flat, places[i], values[i, 0], values[i, 1], values[i, 2], values[i, 3])

    rng = np.random.default_rng(0)
    places = rng.integers(0, 37, 500)  # overlapping and repeated places
    values = rng.normal(size=(500, 4))
    got = np.zeros(40)
    add_all(got, places, values)
    want = np.zeros(40)
    for place, row in zip(places, values):
        want[place : place + 4] += row
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not numba_common.X86, reason="the denormal flush is set on x86 only (MXCSR)")
def test_denormals_flushed_between_flush_and_restore():
    import numba

    @numba.njit
    def squares(values, inside, after):
        saved = numba_common.flush_denormals()
        for j in range(values.shape[0]):
            inside[j] = values[j] * values[j]
        numba_common.restore_denormals(saved)
        for j in range(values.shape[0]):
            after[j] = values[j] * values[j]

    values = np.full(16, 1e-20, np.float32)  # squares 1e-40: below float32's normal range
    inside, after = np.empty_like(values), np.empty_like(values)
    squares(values, inside, after)
    assert not inside.any()
    np.testing.assert_allclose(after, 1e-40, rtol=1e-3)


@pytest.mark.skipif(not numba_common.X86, reason="the instruction checked is x86's")
def test_prefetch_row_compiles_to_prefetch_instructions_and_leaves_the_row_alone():
    import numba

    @numba.njit
    def touch(row, width):
        numba_common.prefetch_row(row, width)

    row = np.arange(40, dtype=np.float32)
    touch(row, 40)
    np.testing.assert_array_equal(row, np.arange(40, dtype=np.float32))
    assembly = "\n".join(touch.inspect_asm().values())
    assert "prefetcht0" in assembly


def test_the_loss_leaves_the_callers_denormals_alone():
    """The fused kernels flush denormals on their threads while they run; the calling thread
    computes subnormal numbers as before once the loss and its gradient returned."""
    torch.manual_seed(0)
    logits = [(torch.randn(2, 5, 16, 16) * 30).requires_grad_(True) for _ in range(3)]
    target = torch.randint(0, 5, (2, 16, 16))
    fused.adele_arm_loss(logits, target, ARM()).backward()
    tiny = np.full(4, 1e-20, np.float32)
    np.testing.assert_allclose(tiny * tiny, 1e-40, rtol=1e-3)
    assert torch.tensor(1e-20) * torch.tensor(1e-20) > 0


@pytest.mark.parametrize("copies", [1, 2])
def test_table_bins_against_a_direct_scatter(copies):
    """Each valid pixel adds its loss and weight to its interval's row (and f times each), in
    copy j % copies for pixel j; the node sums add the copies and give a pixel 1 - f at its node
    and f at the next. The loss and weight columns are exact float64 sums of the float32 inputs;
    f times either is rounded to float32 before it is added, at most 2^-24 of the term."""
    from noisyseg.kernels.contract import ARM_TABLE_SIZE
    from noisyseg.kernels.numba_arm import block_table_bins, node_sums

    rng = np.random.default_rng(1)
    width = 301
    node = np.concatenate(
        [
            rng.integers(0, ARM_TABLE_SIZE - 1, 150),
            np.arange(50) + 4000,  # consecutive intervals: neighbouring rows
            np.full(101, ARM_TABLE_SIZE - 2),  # one interval: the chain that copies split
        ]
    ).astype(np.int32)
    fraction, loss, weight = (rng.random(width).astype(np.float32) for _ in range(3))
    valid = rng.random(width) > 0.2
    bins = np.zeros((copies * ARM_TABLE_SIZE, 4))
    block_table_bins(bins, node, fraction, loss, weight, valid, width, np.empty(4 * width, np.float32))
    want_rows = np.zeros((copies, ARM_TABLE_SIZE, 4))
    want_nodes = np.zeros((ARM_TABLE_SIZE, 2))
    magnitude = np.zeros((ARM_TABLE_SIZE, 2))  # sum of the values that reach a node
    for copy in range(copies):
        kept = valid & (np.arange(width) % copies == copy)
        f = fraction.astype(np.float64)[kept]
        for column, values in enumerate((loss, weight)):
            np.add.at(want_rows[copy, :, column], node[kept], values[kept])
            np.add.at(want_rows[copy, :, column + 2], node[kept], f * values[kept])
            np.add.at(want_nodes[:, column], node[kept], (1 - f) * values[kept])
            np.add.at(want_nodes[:, column], node[kept] + 1, f * values[kept])
            np.add.at(magnitude[:, column], node[kept], values[kept])
            np.add.at(magnitude[:, column], node[kept] + 1, values[kept])
    got_rows = bins.reshape(copies, ARM_TABLE_SIZE, 4)
    np.testing.assert_allclose(got_rows[..., :2], want_rows[..., :2], rtol=1e-12, atol=1e-12)
    rounding = 2.0**-24 * np.abs(want_rows[..., 2:]) + 1e-12
    assert (np.abs(got_rows[..., 2:] - want_rows[..., 2:]) <= rounding).all()
    assert (np.abs(node_sums(bins) - want_nodes) <= 2.0**-23 * magnitude + 1e-12).all()
    assert all(got_rows[copy].any() for copy in range(copies))


_VECTOR_PROBE = """
import numba, numpy as np
from noisyseg.kernels import numba_common

@numba.njit
def scale(values):
    for j in range(values.shape[0]):
        values[j] *= np.float32(2.0)

values = np.ones(64, np.float32)
scale(values)
print(numba.config.CPU_FEATURES, "zmm" in next(iter(scale.inspect_asm().values())))
"""


@pytest.mark.skipif(
    "+avx512f" not in __import__("numba.core.codegen").core.codegen.get_host_cpu_features().split(","),
    reason="512-bit vectors need an AVX-512 host",
)
def test_kernels_compile_with_512_bit_vectors_unless_the_user_chose_features():
    def probe(**env: str) -> list[str]:
        clean = {k: v for k, v in os.environ.items() if k != "NUMBA_CPU_FEATURES"}
        result = subprocess.run(
            [sys.executable, "-c", _VECTOR_PROBE], capture_output=True, text=True, check=True, env={**clean, **env}
        )
        return result.stdout.split()

    features, wide = probe()
    assert features.endswith(f",-{numba_common.PREFER_256_BIT}") and wide == "True"  # zmm registers in the assembly
    from numba.core.codegen import get_host_cpu_features

    # A user's choice is kept as it is. The host's own features are not enough to show it: LLVM
    # tunes Intel's AVX-512 server CPUs to 256-bit vectors but AMD's Zen 4 to 512, so the choice
    # here asks for the 256-bit preference explicitly.
    chosen = f"{get_host_cpu_features()},+{numba_common.PREFER_256_BIT}"
    features, wide = probe(NUMBA_CPU_FEATURES=chosen)
    assert features == chosen and wide == "False"


def test_block_size_bounds():
    assert numba_common.block_size(1, 2) == 1024
    assert numba_common.block_size(3, 150) == 64
    assert numba_common.block_size(3, 4000) == 16


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(2, 12),
    h=st.integers(1, 9),
    w=st.integers(1, 40),
    num_scales=st.integers(1, 3),
    ignore_fraction=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    with_arm=st.booleans(),
    mask=st.sampled_from(["image", "pixel"]),
    seed=st.integers(0, 2**16),
)
def test_property_adele_arm_loss_matches_reference(n, c, h, w, num_scales, ignore_fraction, with_arm, mask, seed):
    logits, target = make_batch(n, c, h, w, ignore_fraction, seed)
    arm = seeded_arm(seed) if with_arm else None
    scales = related_scales(logits, num_scales, seed)
    assert_matches_reference("adele_arm_loss", scales, target, arm, lam=0.5, rho=0.4, mask=mask)


@settings(max_examples=15, deadline=None)
@given(
    c=st.integers(2, 30),
    length=st.integers(1, 3000),
    ignore_fraction=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_property_arm_cross_entropy_over_pixel_counts(c, length, ignore_fraction, seed):
    """Pixel counts around and across block boundaries, in (N, C, L) form."""
    logits, target = make_batch(2, c, 1, length, ignore_fraction, seed)
    assert_matches_reference("arm_cross_entropy", [logits[:, :, 0]], target[:, 0], seeded_arm(seed))


@pytest.mark.parametrize("num_scales", [1, 3])
def test_repeated_backward_with_retained_graph(num_scales):
    """Backward rescales the gradient buffer in place: a second backward with another
    grad_output must give its own right gradient and leave the first one's untouched."""
    logits, target = make_batch(seed=16)
    arm = seeded_arm(16)
    scales = related_scales(logits, num_scales)
    leaves = [z.clone().requires_grad_(True) for z in scales]
    loss = fused.adele_arm_loss(leaves, target, arm, rho=0.3)
    grads = {}
    for upstream in (0.0, 3.0, -0.5):
        grads[upstream] = torch.autograd.grad(loss, leaves, torch.tensor(upstream), retain_graph=True)
    want = evaluate(reference, "adele_arm_loss", scales, target, arm, grad_output=-0.5, rho=0.3)[1]
    for got, expected in zip(grads[-0.5], want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert all(torch.all(g == 0) for g in grads[0.0])
    for scaled, base in zip(grads[3.0], grads[-0.5]):
        torch.testing.assert_close(scaled, base * -6.0, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("num_scales", [1, 3])
def test_backward_into_leaves_hands_out_the_buffer_and_accumulates_over_repeats(num_scales):
    """Autograd keeps the first backward's gradient as handed out (a referenced tensor would be
    cloned), and .grad accumulated over three backward passes is three times the reference's,
    although the first .grad is the buffer a repeated backward starts from."""
    logits, target = make_batch(seed=17)
    arm = seeded_arm(17)
    scales = related_scales(logits, num_scales)
    leaves = [z.clone().requires_grad_(True) for z in scales]
    handed_out = []
    leaves[0].register_hook(lambda g: handed_out.append(g.data_ptr()))
    loss = fused.adele_arm_loss(leaves, target, arm, rho=0.3)
    loss.backward(retain_graph=True)
    assert leaves[0].grad.data_ptr() == handed_out[0]
    loss.backward(retain_graph=True)
    loss.backward()
    want = evaluate(reference, "adele_arm_loss", scales, target, arm, grad_output=3.0, rho=0.3)[1]
    for got, expected in zip(leaves, want):
        torch.testing.assert_close(got.grad, expected, rtol=1e-5, atol=1e-7)


def test_backward_refuses_to_repeat_from_a_gradient_changed_in_place():
    logits, target = make_batch(seed=18)
    leaves = [logits.clone().requires_grad_(True)]
    loss = fused.adele_arm_loss(leaves, target, seeded_arm(18))
    loss.backward(retain_graph=True)
    leaves[0].grad.zero_()
    with pytest.raises(RuntimeError, match=r"gradient of logits\[0\] it handed out was changed in place"):
        loss.backward()


_BINDING_PROBE = """
import json, os, sys
import numba
from noisyseg.kernels import numba_common
threads = int(sys.argv[1])
numba.set_num_threads(threads)
bound = numba_common.bind_worker_threads(threads)
single_cpu = []
for tid in os.listdir("/proc/self/task"):
    status = open(f"/proc/self/task/{tid}/status").read()
    allowed = next(line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
    if allowed.isdigit():
        single_cpu.append(int(allowed))
print(json.dumps({"bound": bound, "single_cpu": sorted(single_cpu)}))
"""


def _probe_binding(threads: int, **env: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _BINDING_PROBE, str(threads)],
        capture_output=True, text=True, check=True, env={**os.environ, **env},
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2
    or not Path("/proc/self/task").exists(),
    reason="binding numba's workers needs Linux and at least 2 CPUs",
)  # fmt: skip
def test_workers_bound_one_per_cpu_only_when_they_fill_the_cpus():
    cpus = sorted(os.sched_getaffinity(0))
    environment = {"NUMBA_NUM_THREADS": str(len(cpus)), "NUMBA_THREADING_LAYER": "workqueue"}
    # the kernel's view of each thread's CPU set (/proc), not the backend's own bookkeeping
    full = _probe_binding(len(cpus), **environment)
    assert full == {"bound": True, "single_cpu": cpus}
    assert _probe_binding(1, **environment) == {"bound": False, "single_cpu": []}
    opted_out = _probe_binding(len(cpus), **environment, NOISYSEG_BIND_NUMBA_THREADS="0")
    assert opted_out == {"bound": False, "single_cpu": []}


def test_kernels_use_no_more_threads_than_torch():
    import numba

    previous_torch, previous_numba = torch.get_num_threads(), numba.get_num_threads()
    try:
        torch.set_num_threads(1)
        with numba_common.threads_like_torch():
            assert numba.get_num_threads() == 1
        assert numba.get_num_threads() == previous_numba  # the caller's setting is restored
        logits, target = make_batch(seed=3)
        fused.arm_cross_entropy(logits.requires_grad_(True), target, seeded_arm(3)).backward()
        assert torch.get_num_threads() == 1  # and torch's, which shares numba's OpenMP runtime
        torch.set_num_threads(max(previous_numba, 1) + 4)  # numba's own setting caps it
        with numba_common.threads_like_torch():
            assert numba.get_num_threads() == previous_numba
    finally:
        torch.set_num_threads(previous_torch)
