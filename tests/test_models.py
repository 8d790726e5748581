"""Models: shapes at many sizes, the reference UNet's size, init, gradients, ONNX export."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from noisyseg.models import create_model

# Small widths keep every test CPU-fast; the structure is the same as at full width.
SMALL_MODELS = [
    ("unet", {"base_width": 4}),
    ("unet", {"base_width": 4, "depth": 3}),
    ("deeplabv3plus", {"base_width": 4}),
    ("deeplabv3plus", {"base_width": 4, "output_stride": 8}),
]
MODEL_IDS = [f"{name}-{'-'.join(f'{k}{v}' for k, v in kwargs.items())}" for name, kwargs in SMALL_MODELS]


def build(name: str, kwargs: dict, seed: int = 0, **extra) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, **kwargs, **extra)


@pytest.mark.parametrize(("name", "kwargs"), SMALL_MODELS, ids=MODEL_IDS)
def test_logits_have_input_size_at_stride_multiples_and_other_sizes(name: str, kwargs: dict) -> None:
    model = build(name, kwargs, in_channels=2, num_classes=3).eval()
    s = model.stride
    assert s == {"unet": 2 ** kwargs.get("depth", 4), "deeplabv3plus": kwargs.get("output_stride", 16)}[name]
    # Multiples of the stride (square and not), then the 0.7x / 1.5x multiscale sizes.
    sizes = [
        (s, s),
        (2 * s, 3 * s),
        (4 * s, s),
        (int(0.7 * 4 * s), int(0.7 * 3 * s)),
        (s + 7, 2 * s + 1),
    ]
    with torch.no_grad():
        for height, width in sizes:
            logits = model(torch.randn(2, 2, height, width))
            assert logits.shape == (2, 3, height, width)
            assert torch.isfinite(logits).all()


def _double_conv_parameters(cin: int, cout: int) -> int:
    """Two bias-free 3x3 convs, each followed by BatchNorm (weight and bias)."""
    return 9 * cin * cout + 9 * cout * cout + 2 * 2 * cout


# The reference bilinear UNet (1 input channel, 5 classes), block by block: encoder, then
# decoder blocks whose input is the skip concatenated with the upsampled features.
REFERENCE_UNET_BLOCKS = [
    (1, 64),
    (64, 128),
    (128, 256),
    (256, 512),
    (512, 512),
    (1024, 256),
    (512, 128),
    (256, 64),
    (128, 64),
]
REFERENCE_UNET_PARAMETERS = sum(_double_conv_parameters(cin, cout) for cin, cout in REFERENCE_UNET_BLOCKS) + 64 * 5 + 5


def test_default_unet_matches_reference_structure_and_size() -> None:
    model = create_model("unet")
    assert model.stride == 16
    # Encoder widths 64-128-256-512-512 (method-spec section 7).
    encoder_widths = [model.inc[0].out_channels] + [down[1][0].out_channels for down in model.downs]
    assert encoder_widths == [64, 128, 256, 512, 512]
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == REFERENCE_UNET_PARAMETERS == 13_390_469


@pytest.mark.parametrize(("name", "kwargs"), SMALL_MODELS, ids=MODEL_IDS)
def test_every_3x3_conv_is_batch_normalised(name: str, kwargs: dict) -> None:
    modules = list(build(name, kwargs).modules())
    convs_3x3 = [m for m in modules if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert convs_3x3 and all(not conv.bias for conv in convs_3x3)  # bias is redundant before BN
    assert sum(isinstance(m, nn.BatchNorm2d) for m in modules) >= len(convs_3x3)


@pytest.mark.parametrize(("name", "kwargs"), SMALL_MODELS, ids=MODEL_IDS)
def test_init_is_deterministic_given_the_seed(name: str, kwargs: dict) -> None:
    first, second, other = (build(name, kwargs, seed=seed).state_dict() for seed in (7, 7, 8))
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first if key.endswith("weight"))


@pytest.mark.parametrize(("name", "kwargs"), SMALL_MODELS, ids=MODEL_IDS)
def test_gradient_reaches_every_parameter(name: str, kwargs: dict) -> None:
    model = build(name, kwargs).train()
    stride = model.stride
    logits = model(torch.randn(2, 1, 2 * stride, 3 * stride))
    target = torch.randint(0, 5, (2, 2 * stride, 3 * stride))
    nn.functional.cross_entropy(logits, target).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, f"{param_name} got no gradient"


def test_unknown_model_and_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="known models: deeplabv3plus, deeplabv3plus_timm, unet"):
        create_model("segformer")
    with pytest.raises(ValueError, match="model 'unet': bad arguments"):
        create_model("unet", widths=[1, 2])
    with pytest.raises(ValueError, match="output_stride must be one of"):
        create_model("deeplabv3plus", output_stride=32)


def _export_legacy_onnx(model: nn.Module, example: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch 2.13 marks the TorchScript exporter deprecated; it is the fast path tested here.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={
                "image": {0: "batch", 2: "height", 3: "width"},
                "logits": {0: "batch", 2: "height", 3: "width"},
            },
        )
    return buffer.getvalue()


@pytest.mark.parametrize(("name", "kwargs"), SMALL_MODELS, ids=MODEL_IDS)
def test_onnx_export_with_dynamic_batch_and_size_matches_pytorch(name: str, kwargs: dict) -> None:
    model = build(name, kwargs).eval()
    stride = model.stride
    session = ort.InferenceSession(
        _export_legacy_onnx(model, torch.randn(1, 1, 2 * stride, 2 * stride)),
        providers=["CPUExecutionProvider"],
    )
    for shape in [(1, 1, 2 * stride, 2 * stride), (3, 1, 3 * stride, 5 * stride)]:
        image = torch.randn(*shape)
        with torch.no_grad():
            expected = model(image).numpy()
        (logits,) = session.run(None, {"image": image.numpy()})
        assert logits.shape == expected.shape
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
