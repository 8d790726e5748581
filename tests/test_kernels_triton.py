"""The Triton backend against the reference losses (`kernels/reference.py`, itself tested
against torch's cross-entropy, numpy and gradcheck in test_reference.py).

Compiled on CUDA tensors when a GPU is present; otherwise through TRITON_INTERPRET=1 on CPU
tensors (set by conftest.py), with small shapes because the interpreter is slow. Several
shapes span more than one pixel block per image (cross-entropy: 17 x 23 pixels with C=19 is
four blocks; multiscale: 9 x 11 with C=19 or 21 is two), so the per-block partial sums, the
per-image maximum of q and their reduction are exercised.

Tolerances: fp32 ones are derived per comparison from the rounding error of the sums involved
(tests/fp32_tolerance.py: lambda sqrt(n) u sum |terms| for sums over n pixels and C classes,
with ARM's parameter gradients bounded entry by entry from fp64 per-pixel Jacobians); fp16
rtol 1e-2 / atol 1e-5 against the reference run on the same fp16 logits (the gradient is
written in fp16 before its fp32 rescale); bf16 rtol 5e-2 (the interpreter has no bf16
arithmetic, but the kernels only load and store bf16 and compute in fp32).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fp32_tolerance import assert_within, fp32_tolerance

from noisyseg.kernels import functional, reference

fused = functional.losses_on("triton")

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32 = None  # derived per comparison: fp32_tolerance.fp32_tolerance
FP16 = {"rtol": 1e-2, "logit_atol": 1e-5, "arm_atol": 1e-3, "value_atol": 1e-4}
BF16 = {"rtol": 5e-2, "logit_atol": 1e-4, "arm_atol": 1e-2, "value_atol": 1e-3}
TOLERANCES = {torch.float32: FP32, torch.float16: FP16, torch.bfloat16: BF16}
GRAD_OUTPUT = 2.5


def make_target(n: int, c: int, h: int, w: int, seed: int, ignore_fraction: float = 0.2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (n, h, w), generator=gen)
    target[torch.rand(n, h, w, generator=gen) < ignore_fraction] = 255
    return target.to(DEVICE)


def make_logits(n: int, c: int, h: int, w: int, seed: int, spread: float = 2.0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, h, w, generator=gen) * spread).to(device=DEVICE, dtype=dtype)


def seeded_arm(seed: int = 3) -> reference.ARM:
    """An ARM spread far from constant (as in test_reference.py) whose weights stay away from
    saturation on these inputs, so every parameter gets a non-zero gradient."""
    torch.manual_seed(seed)
    arm = reference.ARM()
    with torch.no_grad():
        for p in arm.parameters():
            p.mul_(3.0)
    return arm.to(DEVICE)


def run(loss_fn, logits_list, arm, grad_output=GRAD_OUTPUT):
    """Loss value, gradients of every logits tensor and of ARM's parameters."""
    leaves = [z.detach().clone().requires_grad_() for z in logits_list]
    if arm is not None:
        arm.zero_grad()
    loss = loss_fn(leaves, arm)
    (loss * grad_output).backward()
    arm_grads = [p.grad.clone() for p in arm.parameters()] if arm is not None else []
    return loss.detach(), [z.grad for z in leaves], arm_grads


def assert_matches_reference(fused_fn, reference_fn, logits_list, arm, tolerances=FP32, grad_output=GRAD_OUTPUT):
    value, grads, arm_grads = run(fused_fn, logits_list, arm, grad_output)
    expected_value, expected_grads, expected_arm_grads = run(reference_fn, logits_list, arm, grad_output)
    assert value.dtype == torch.float32
    if tolerances is None:  # fp32: from the sizes of the sums (needs the target's valid pixels)
        assert all(z.dtype == torch.float32 for z in logits_list)
        tol = fp32_tolerance(logits_list, fused_fn.target, arm, expected_grads, grad_output, fused_fn.ignore_index)
        assert_within(value, expected_value, tol.value_atol, tol.value_rtol, "loss value")
        for grad, expected, atol in zip(grads, expected_grads, tol.logit_atol):
            assert grad.dtype == expected.dtype and grad.shape == expected.shape
            assert_within(grad, expected, atol, tol.logit_rtol, "logit gradient")
        for index, (grad, expected) in enumerate(zip(arm_grads, expected_arm_grads)):
            assert_within(grad, expected, tol.arm_atol[index], 0.0, f"ARM parameter {index} gradient")
        return value, grads, arm_grads
    torch.testing.assert_close(value, expected_value.float(), rtol=tolerances["rtol"], atol=tolerances["value_atol"])
    for grad, expected in zip(grads, expected_grads):
        assert grad.dtype == expected.dtype and grad.shape == expected.shape
        torch.testing.assert_close(grad, expected, rtol=tolerances["rtol"], atol=tolerances["logit_atol"])
    for grad, expected in zip(arm_grads, expected_arm_grads):
        torch.testing.assert_close(grad, expected, rtol=tolerances["rtol"], atol=tolerances["arm_atol"])
    return value, grads, arm_grads


def _loss_fn(fn, target, ignore_index):
    """A loss closure that also names its target (the fp32 tolerances need its valid pixels)."""
    fn.target, fn.ignore_index = target, ignore_index
    return fn


# Each pair is the fused loss and the reference computing the same function: ARM through its
# table by default (its bound against the exact ARM: tests/test_arm_table.py), or "exact".
def ce_pair(target, ignore_index=255, arm_mode="table"):
    return (
        _loss_fn(
            lambda zs, arm: fused.arm_cross_entropy(zs[0], target, arm, ignore_index, arm_mode=arm_mode),
            target,
            ignore_index,
        ),
        lambda zs, arm: reference.arm_cross_entropy(zs[0], target, arm, ignore_index, arm_mode),
    )


def ms_pair(target, rho, mask):
    return (
        _loss_fn(lambda zs, arm: fused.multiscale_consistency(zs, target, rho, mask), target, 255),
        lambda zs, arm: reference.multiscale_consistency(zs, target, rho, mask),
    )


def adele_pair(target, lam, rho, mask="image", arm_mode="table"):
    return (
        _loss_fn(lambda zs, arm: fused.adele_arm_loss(zs, target, arm, lam, rho, mask, arm_mode=arm_mode), target, 255),
        lambda zs, arm: reference.adele_arm_loss(zs, target, arm, lam, rho, mask, 255, arm_mode),
    )


def mixed_confidence_scales(n, c, h, w, num_scales, seed):
    """Logits per scale whose images range from confident to uncertain (spread 6 down to 0.3
    over the batch), so a rho of 0.8 keeps some images and drops others."""
    spreads = torch.linspace(6.0, 0.3, n).reshape(n, 1, 1, 1).to(DEVICE)
    return [make_logits(n, c, h, w, seed + k, spread=1.0) * spreads for k in range(num_scales)]


def kept_image_count(logits_list, target, rho):
    """Images the reference's rule keeps: max over valid pixels and classes of q above rho."""
    q = torch.stack([torch.softmax(z.float(), dim=1) for z in logits_list]).mean(0).amax(dim=1)
    q = torch.where(target != 255, q, torch.zeros_like(q))
    return int((q.reshape(q.shape[0], -1).amax(dim=1) > rho).sum())


# --------------------------------------------------------------------- ARM cross-entropy


@pytest.mark.parametrize("num_classes", [2, 5, 19, 21])
@pytest.mark.parametrize("arm_mode", [None, "table", "exact"], ids=["uniform", "arm-table", "arm-exact"])
def test_arm_cross_entropy_matches_reference(num_classes, arm_mode):
    logits = make_logits(3, num_classes, 17, 23, seed=num_classes)
    target = make_target(3, num_classes, 17, 23, seed=num_classes)
    arm = seeded_arm() if arm_mode else None
    _, _, arm_grads = assert_matches_reference(*ce_pair(target, arm_mode=arm_mode or "table"), [logits], arm)
    assert all(bool(g.abs().sum() > 0) for g in arm_grads)


@pytest.mark.parametrize("shape", [(2, 150, 4, 5), (2, 19, 16, 16), (3, 7, 1, 1)], ids=["c150", "pow2", "one-pixel"])
def test_arm_cross_entropy_other_shapes(shape):
    logits = make_logits(*shape, seed=1)
    target = make_target(*shape, seed=1, ignore_fraction=0.1)
    assert_matches_reference(*ce_pair(target), [logits], seeded_arm())


def test_arm_cross_entropy_on_flat_spatial_layout_and_other_ignore_index():
    logits = make_logits(2, 6, 1, 40, seed=2).reshape(2, 6, 40)
    target = make_target(2, 6, 1, 40, seed=2).reshape(2, 40)
    target[target == 255] = -100
    assert_matches_reference(*ce_pair(target, ignore_index=-100), [logits], seeded_arm())


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_arm_cross_entropy_non_contiguous_logits(layout):
    if layout == "channels_last":
        logits = make_logits(2, 5, 9, 11, seed=4).to(memory_format=torch.channels_last)
    else:
        logits = make_logits(2, 8, 9, 22, seed=4)[:, 1:6, :, ::2]
    assert not logits.is_contiguous()
    target = make_target(2, 5, 9, 11, seed=4).transpose(1, 2).contiguous().transpose(1, 2)
    assert_matches_reference(*ce_pair(target), [logits], seeded_arm())


def test_arm_cross_entropy_grad_output_one_and_float16():
    logits = make_logits(2, 19, 9, 11, seed=5, dtype=torch.float16)
    target = make_target(2, 19, 9, 11, seed=5)
    assert_matches_reference(*ce_pair(target), [logits], seeded_arm(), tolerances=FP16, grad_output=1.0)


def test_arm_cross_entropy_bfloat16():
    # The kernels only load bf16 and cast to fp32, which the interpreter supports too.
    logits = make_logits(2, 19, 9, 11, seed=6, dtype=torch.bfloat16)
    target = make_target(2, 19, 9, 11, seed=6)
    assert_matches_reference(*ce_pair(target), [logits], seeded_arm(), tolerances=BF16)


@pytest.mark.parametrize("with_arm", [False, True], ids=["uniform", "arm"])
def test_arm_cross_entropy_all_ignored_gives_zero_not_nan(with_arm):
    logits = make_logits(2, 5, 4, 6, seed=7)
    target = torch.full((2, 4, 6), 255, device=DEVICE)
    value, grads, arm_grads = run(ce_pair(target)[0], [logits], seeded_arm() if with_arm else None)
    assert value.item() == 0.0
    assert torch.equal(grads[0], torch.zeros_like(grads[0]))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in arm_grads)


def test_arm_cross_entropy_is_deterministic():
    logits = make_logits(2, 5, 17, 23, seed=8)
    target = make_target(2, 5, 17, 23, seed=8)
    first = run(ce_pair(target)[0], [logits], seeded_arm())
    second = run(ce_pair(target)[0], [logits], seeded_arm())
    assert torch.equal(first[0], second[0]) and torch.equal(first[1][0], second[1][0])
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2]))


def test_losses_without_grad_match_reference():
    logits = mixed_confidence_scales(2, 5, 6, 7, 2, seed=11)
    target = make_target(2, 5, 6, 7, seed=11)
    arm = seeded_arm()
    with torch.no_grad():
        got = (fused.arm_cross_entropy(logits[0], target, arm), fused.adele_arm_loss(logits, target, arm))
        expected = (
            reference.arm_cross_entropy(logits[0], target, arm, arm_mode="table"),
            reference.adele_arm_loss(logits, target, arm, arm_mode="table"),
        )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arm_mode", ["table", "exact"])
@pytest.mark.parametrize("loss", ["cross_entropy", "adele"])
def test_arm_step_on_detached_logits(loss, arm_mode):
    """ARM's adversarial step backpropagates into ARM only; the logits are detached."""
    logits = mixed_confidence_scales(2, 5, 6, 7, 2, seed=12)
    target = make_target(2, 5, 6, 7, seed=12)
    grads = []
    for module in (fused, reference):
        arm = seeded_arm()
        if loss == "cross_entropy":
            module.arm_cross_entropy(logits[0], target, arm, arm_mode=arm_mode).backward()
        else:
            module.adele_arm_loss(logits, target, arm, 0.5, 0.8, arm_mode=arm_mode).backward()
        grads.append([p.grad for p in arm.parameters()])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_arm_cross_entropy_refuses_a_second_backward():
    logits = make_logits(1, 3, 2, 2, seed=9).requires_grad_()
    loss = fused.arm_cross_entropy(logits, make_target(1, 3, 2, 2, seed=9, ignore_fraction=0.0), None)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_bad_inputs_raise_the_reference_errors():
    logits = make_logits(1, 4, 3, 3, seed=10)
    target = make_target(1, 4, 3, 3, seed=10, ignore_fraction=0.0)
    target[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 4\)"):
        fused.arm_cross_entropy(logits, target, None)
    with pytest.raises(ValueError, match="target: expected shape"):
        fused.arm_cross_entropy(logits, target[:, :2], None)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        fused.arm_cross_entropy(logits.double(), make_target(1, 4, 3, 3, seed=10), None)
    with pytest.raises(ValueError, match="at least 2 classes"):
        fused.arm_cross_entropy(logits[:, :1], torch.zeros(1, 3, 3, dtype=torch.long, device=DEVICE), seeded_arm())
    with pytest.raises(ValueError, match="mask: expected one of"):
        fused.multiscale_consistency([logits, logits], make_target(1, 4, 3, 3, seed=10), mask="row")
    with pytest.raises(ValueError, match="at most 4 scales"):
        fused.adele_arm_loss([logits] * 5, make_target(1, 4, 3, 3, seed=10), None)


# ------------------------------------------------------------------ multiscale consistency


@pytest.mark.parametrize("num_scales", [2, 3])
@pytest.mark.parametrize("mask", ["image", "pixel"])
def test_multiscale_consistency_matches_reference(num_scales, mask):
    logits = mixed_confidence_scales(3, 5, 9, 11, num_scales, seed=20)
    target = make_target(3, 5, 9, 11, seed=20)
    if mask == "image":
        assert kept_image_count(logits, target, 0.8) in (1, 2)  # the mask keeps some images, not all
    value, _, _ = assert_matches_reference(*ms_pair(target, 0.8, mask), logits, None)
    assert value.item() > 0


def test_multiscale_consistency_many_classes_and_float16():
    logits = mixed_confidence_scales(2, 21, 9, 11, 2, seed=21)  # two pixel blocks per image
    target = make_target(2, 21, 9, 11, seed=21)
    assert_matches_reference(*ms_pair(target, 0.5, "pixel"), logits, None)
    half = [z.half() for z in logits]
    assert_matches_reference(*ms_pair(target, 0.5, "image"), half, None, tolerances=FP16)


def test_multiscale_consistency_scales_with_different_layouts():
    logits = mixed_confidence_scales(2, 5, 6, 7, 2, seed=22)
    logits[1] = logits[1].to(memory_format=torch.channels_last)
    target = make_target(2, 5, 6, 7, seed=22)
    assert_matches_reference(*ms_pair(target, 0.5, "image"), logits, None)


def test_multiscale_consistency_all_ignored_gives_zero_not_nan():
    logits = mixed_confidence_scales(2, 5, 3, 4, 2, seed=23)
    target = torch.full((2, 3, 4), 255, device=DEVICE)
    value, grads, _ = run(ms_pair(target, 0.0, "image")[0], logits, None)
    assert value.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


# ------------------------------------------------------------------------ ADELE + ARM


@pytest.mark.parametrize("num_scales", [2, 3])
@pytest.mark.parametrize("arm_mode", [None, "table", "exact"], ids=["uniform", "arm-table", "arm-exact"])
def test_adele_arm_loss_matches_reference(num_scales, arm_mode):
    logits = mixed_confidence_scales(3, 5, 9, 11, num_scales, seed=30)
    target = make_target(3, 5, 9, 11, seed=30)
    assert kept_image_count(logits, target, 0.8) in (1, 2)
    arm = seeded_arm() if arm_mode else None
    _, _, arm_grads = assert_matches_reference(*adele_pair(target, 0.7, 0.8, arm_mode=arm_mode or "table"), logits, arm)
    assert all(bool(g.abs().sum() > 0) for g in arm_grads)


@pytest.mark.parametrize("num_scales", [1, 4])
def test_adele_arm_loss_one_and_four_scales_without_consistency(num_scales):
    """The scale count and the consistency switch are runtime values of one compiled kernel."""
    logits = mixed_confidence_scales(2, 5, 6, 7, num_scales, seed=36)
    target = make_target(2, 5, 6, 7, seed=36)
    assert_matches_reference(*adele_pair(target, 0.0, 0.8), logits, seeded_arm())
    assert_matches_reference(*adele_pair(target, 1.0, 0.5, "pixel"), logits, seeded_arm())


def test_adele_arm_loss_pixel_mask_many_classes_single_scale():
    logits = mixed_confidence_scales(2, 19, 9, 11, 2, seed=31)  # two pixel blocks per image
    target = make_target(2, 19, 9, 11, seed=31)
    assert_matches_reference(*adele_pair(target, 1.5, 0.6, "pixel"), logits, seeded_arm())
    assert_matches_reference(*adele_pair(target, 1.0, 0.6), logits[:1], seeded_arm())


def test_adele_arm_loss_150_classes_spans_channel_blocks():
    logits = mixed_confidence_scales(2, 150, 3, 4, 2, seed=35)  # three channel blocks of 64
    target = make_target(2, 150, 3, 4, seed=35)
    assert_matches_reference(*adele_pair(target, 1.0, 0.3), logits, seeded_arm())


def test_adele_arm_loss_float16_non_contiguous():
    logits = [z.half().to(memory_format=torch.channels_last) for z in mixed_confidence_scales(2, 5, 6, 7, 3, seed=32)]
    target = make_target(2, 5, 6, 7, seed=32)
    assert_matches_reference(*adele_pair(target, 1.0, 0.8), logits, seeded_arm(), tolerances=FP16)


def test_adele_arm_loss_all_ignored_gives_zero_not_nan():
    logits = mixed_confidence_scales(2, 5, 3, 4, 2, seed=33)
    target = torch.full((2, 3, 4), 255, device=DEVICE)
    value, grads, arm_grads = run(adele_pair(target, 1.0, 0.0)[0], logits, seeded_arm())
    assert value.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads + arm_grads)


def test_registered_through_the_public_dispatch():
    logits = mixed_confidence_scales(2, 5, 4, 6, 2, seed=34)
    target = make_target(2, 5, 4, 6, seed=34)
    arm = seeded_arm()
    expected = reference.adele_arm_loss(logits, target, arm, 0.5, 0.8, arm_mode="table")
    got = functional.adele_arm_loss(logits, target, arm, 0.5, 0.8, backend="triton")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    got_ce = functional.arm_cross_entropy(logits[0], target, arm, backend="triton")
    expected_ce = reference.arm_cross_entropy(logits[0], target, arm, arm_mode="table")
    torch.testing.assert_close(got_ce, expected_ce, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- compiled code, without a GPU

# Runs in a fresh interpreter without TRITON_INTERPRET, so @triton.jit builds real kernels; a
# stub driver names an sm_90 target and every launch becomes a warmup (compile only, through
# ptxas to a cubin). CPU tensors stand in for device tensors: only their dtypes and
# alignments matter to the compiler. The interpreter cannot catch what this catches (the
# launcher reserves argument names such as "params", type errors in constexpr branches).
COMPILE_SCRIPT = textwrap.dedent(
    """
    import os
    import torch
    import triton.runtime.jit as jit
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class StubDriver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)
        def get_current_device(self):
            return 0
        def get_current_stream(self, device=None):
            return 0

    driver.set_active(StubDriver())
    compiled = set()
    def compile_only(self, grid):
        def launch(*args, **kwargs):
            kernel = self.warmup(*args, grid=grid, **kwargs)
            assert kernel.asm["cubin"], self.fn.__name__
            compiled.add(self.fn.__name__)
        return launch
    jit.JITFunction.__getitem__ = compile_only

    from noisyseg.kernels import functional, reference
    from noisyseg.kernels import triton_adele_arm, triton_arm_cross_entropy  # noqa: F401 (build the kernels)
    fused = functional.losses_on("triton")
    os.environ["TRITON_INTERPRET"] = "1"  # from here on only read by check_device: accept CPU tensors
    arm = reference.ARM()
    target = torch.randint(0, 19, (2, 8, 8))
    logits = torch.randn(2, 19, 8, 8, dtype=torch.float16, requires_grad=True)
    fused.arm_cross_entropy(logits, target, arm).backward()
    scales = [torch.randn(2, 19, 8, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    fused.adele_arm_loss(scales, target, arm).backward()
    fused.multiscale_consistency(scales[:2], target, mask="pixel").backward()
    print(" ".join(sorted(compiled)))
    """
)


@pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU every test above runs compiled")
def test_kernels_compile_for_sm90_without_a_gpu():
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"this triton build ships no ptxas ({ptxas}) to compile for CUDA")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == sorted(
        [
            "_arm_cross_entropy_forward_kernel",
            "_rescale_kernel",
            "arm_backward_kernel",
            "arm_table_kernel",
            "_statistics_kernel",
            "_gradient_kernel",
        ]
    )


# ------------------------------------------------ larger shapes and bf16, compiled (CUDA only)

needs_cuda = pytest.mark.skipif(
    DEVICE != "cuda", reason="larger shapes run compiled on CUDA only (too slow for the interpreter)"
)
# The benchmark's shapes (benchmarks/bench_kernels.py). fp32 tolerances are derived from the
# sizes of the sums (10^5 pixels here instead of 10^2); bf16 as above (inputs rounded alike).
LARGE_SHAPES = {"cityscapes": (4, 19, 256, 256), "ade20k": (2, 150, 128, 128), "segthor": (5, 5, 256, 256)}
LARGE_TOLERANCES = {torch.float32: FP32, torch.bfloat16: BF16}
large_cases = pytest.mark.parametrize(
    "shape_name, dtype",
    [(name, dtype) for name in LARGE_SHAPES for dtype in LARGE_TOLERANCES],
    ids=[f"{name}-{str(dtype).removeprefix('torch.')}" for name in LARGE_SHAPES for dtype in LARGE_TOLERANCES],
)


@needs_cuda
@large_cases
def test_arm_cross_entropy_large_shapes_compiled(shape_name, dtype):
    shape = LARGE_SHAPES[shape_name]
    logits = make_logits(*shape, seed=40, dtype=dtype)
    target = make_target(*shape, seed=40, ignore_fraction=0.05)
    assert_matches_reference(*ce_pair(target), [logits], seeded_arm(), tolerances=LARGE_TOLERANCES[dtype])


@needs_cuda
@large_cases
def test_adele_arm_loss_large_shapes_compiled(shape_name, dtype):
    n, c, h, w = LARGE_SHAPES[shape_name]
    logits = [z.to(dtype) for z in mixed_confidence_scales(n, c, h, w, 3, seed=41)]
    target = make_target(n, c, h, w, seed=41, ignore_fraction=0.05)
    assert_matches_reference(*adele_pair(target, 1.0, 0.8), logits, seeded_arm(), tolerances=LARGE_TOLERANCES[dtype])


@needs_cuda
@pytest.mark.parametrize("mask", ["image", "pixel"])
def test_multiscale_consistency_bfloat16_compiled(mask):
    logits = [z.bfloat16() for z in mixed_confidence_scales(4, 19, 64, 96, 2, seed=42)]
    target = make_target(4, 19, 64, 96, seed=42)
    assert_matches_reference(*ms_pair(target, 0.8, mask), logits, None, tolerances=BF16)
