"""DeepLabv3+ on timm backbones, and RGB models with ImageNet normalisation from checkpoint to
served request: shapes at output stride 8 and 16, weights from a file the test writes, the
one-line error for hub weights offline, the ModelInfo round trip, ONNX export checked against
PyTorch, and one request through the ONNX Runtime and PyTorch backends.

Backbones: ResNet-50 and ResNet-101 (the papers') and ConvNeXt-T, at output strides 8 and 16;
weights from a local `.safetensors`, a plain `.pth` state dict and a checkpoint written by timm's
own `CheckpointSaver`; one timm model exported to ONNX and checked against ONNX Runtime.

Everything runs offline. The timm tests (marker `timm`) skip, saying why, where timm cannot be
imported: it is the optional extra `noisyseg[timm]`, since timm needs torchvision and PyPI's
torchvision wheels are CUDA builds that do not import next to the CPU torch this project pins.
`make test-timm` runs them in a second locked environment (torch 2.14.1 with torchvision 0.29.1,
`constraints-timm.txt`) with NOISYSEG_REQUIRE_TIMM=1, where a timm that does not import is an
error rather than a skip. The RGB/ImageNet path runs everywhere on the built-in `deeplabv3plus`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from safetensors.torch import save_file
from serve_helpers import running_server

from noisyseg.data.folder import normalize_image
from noisyseg.export.onnx_export import (
    DeployableSegmenter,
    ExportConfig,
    export_model,
    sample_images,
)
from noisyseg.export.onnxruntime_runner import OnnxRuntimeRunner
from noisyseg.models import create_model
from noisyseg.models.model_file import ModelInfo, load_model, read_model_info, save_model
from noisyseg.run.run_dir import RunDir
from noisyseg.serve.runtimes import open_runtimes

CLASSES = ["road", "car", "person"]
BACKBONE = "resnet18"  # the smallest ResNet, where a test is about the wrapper, not the backbone
# The papers' backbones and another family (a stride-4 stem: its first features are the decoder's).
BACKBONES = ["resnet50", "resnet101", "convnext_tiny"]
# A narrow head keeps each test to a few seconds (the paper's ASPP width is the default, 256).
TIMM_KWARGS = {"backbone": BACKBONE, "aspp_channels": 32}

try:
    import timm

    TIMM_ERROR = None
except Exception as err:  # a torchvision built for CUDA raises RuntimeError next to a CPU torch
    timm = None
    TIMM_ERROR = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
if TIMM_ERROR is not None and os.environ.get("NOISYSEG_REQUIRE_TIMM"):
    raise RuntimeError(f"NOISYSEG_REQUIRE_TIMM is set but timm does not import: {TIMM_ERROR}")
skip_without_timm = pytest.mark.skipif(
    TIMM_ERROR is not None,
    reason=f"timm does not import here ({TIMM_ERROR}); it is the optional extra noisyseg[timm] "
    "(timm needs torchvision, whose PyPI wheels are CUDA builds "
    "that cannot load next to torch+cpu); make test-timm runs it",
)


def needs_timm(test):
    return pytest.mark.timm(skip_without_timm(test))


def timm_model(output_stride: int = 16, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(
        "deeplabv3plus_timm",
        **{**TIMM_KWARGS, **kwargs},
        output_stride=output_stride,
        in_channels=3,
        num_classes=len(CLASSES),
    )


def rgb_images(shape: tuple[int, int, int, int], seed: int) -> np.ndarray:
    return sample_images(shape, seed=seed, normalization="imagenet")


def test_bad_pretrained_values_are_clear_errors(tmp_path: Path) -> None:
    """Checked before timm is imported, so these hold with or without the extra."""
    with pytest.raises(ValueError, match="pretrained weight file .*missing.safetensors does not exist"):
        create_model("deeplabv3plus_timm", pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"must be one of \.safetensors, \.pth"):
        create_model("deeplabv3plus_timm", pretrained=str(tmp_path / "weights.txt"))
    with pytest.raises(ValueError, match="pretrained must be false, true"):
        create_model("deeplabv3plus_timm", pretrained=3)
    with pytest.raises(ValueError, match="output_stride must be one of"):
        create_model("deeplabv3plus_timm", output_stride=32)


def test_without_timm_the_error_names_the_extra() -> None:
    """In a fresh interpreter where `import timm` fails (as it does beside a CPU torch)."""
    code = (
        "import sys\n"
        "sys.modules['timm'] = None  # import timm raises ImportError\n"
        "from noisyseg.models import create_model\n"
        "try:\n"
        f"    create_model('deeplabv3plus_timm', backbone='{BACKBONE}')\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "deeplabv3plus_timm needs timm" in result.stdout and "pip install 'noisyseg[timm]'" in result.stdout


@needs_timm
@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_logits_have_the_input_size_at_output_stride(backbone: str, output_stride: int) -> None:
    model = timm_model(output_stride, backbone=backbone).eval()
    assert model.stride == output_stride
    # timm's own backbone without dilation: its feature strides, which dilation caps at the
    # output stride; its (last) stride-4 features feed the decoder.
    plain = timm.create_model(backbone, features_only=True).feature_info.reduction()
    assert model.backbone.feature_info.reduction() == [min(r, output_stride) for r in plain]
    assert model.low_level_index == len(plain) - 1 - plain[::-1].index(4)
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, 64, 96))
        assert features[-1].shape[-2:] == (64 // output_stride, 96 // output_stride)
        for height, width in [(64, 96), (37, 50)]:
            logits = model(torch.randn(2, 3, height, width))
            assert logits.shape == (2, len(CLASSES), height, width)
            assert torch.isfinite(logits).all()


@needs_timm
@pytest.mark.parametrize("form", ["safetensors", "pth", "timm-checkpoint"])
def test_backbone_weights_load_from_a_file_the_test_writes(tmp_path: Path, form: str) -> None:
    """ResNet-50's weights as the hub ships them (.safetensors), as a plain state dict (.pth) and
    as timm's training writes them (`CheckpointSaver`: a .pth.tar holding the state dict among
    the optimiser's and the epoch's)."""
    backbone = "resnet50"
    torch.manual_seed(123)
    network = timm.create_model(backbone, pretrained=False)
    reference = network.state_dict()
    if form == "safetensors":
        path = tmp_path / f"{backbone}.safetensors"
        save_file({k: v.contiguous() for k, v in reference.items()}, str(path))
    elif form == "pth":
        path = tmp_path / f"{backbone}.pth"
        torch.save(reference, path)  # read back with weights_only=True
    else:
        from timm.utils import CheckpointSaver

        saver = CheckpointSaver(network, torch.optim.SGD(network.parameters(), lr=0.1), checkpoint_dir=str(tmp_path))
        saver.save_checkpoint(epoch=0, metric=0.5)
        (path,) = tmp_path.glob("checkpoint-0.pth.tar")
        assert torch.load(path, weights_only=True)["epoch"] == 0
    loaded = timm_model(backbone=backbone, pretrained=str(path)).backbone.state_dict()
    random = timm_model(backbone=backbone, seed=5).backbone.state_dict()
    assert set(loaded) <= set(reference) and "conv1.weight" in loaded and "layer4.2.conv3.weight" in loaded
    for key, value in loaded.items():
        assert torch.equal(value, reference[key]), key
    assert not torch.equal(random["conv1.weight"], reference["conv1.weight"])


@needs_timm
def test_hub_weights_offline_without_cache_is_a_clear_one_line_error(tmp_path: Path) -> None:
    """No network and an empty hub cache, in a fresh interpreter (the hub reads its settings at import)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(cache),
        "HF_HUB_CACHE": str(cache / "hub"),
        "TORCH_HOME": str(cache / "torch"),
        "XDG_CACHE_HOME": str(cache),
    }
    code = (
        "from noisyseg.models import create_model\n"
        "try:\n"
        f"    create_model('deeplabv3plus_timm', backbone='{BACKBONE}', pretrained=True)\n"
        "except ValueError as err:\n"
        "    print(err)\n"
        "else:\n"
        "    print('built')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    message = result.stdout.strip()
    assert result.returncode == 0, result.stderr
    assert "\n" not in message, message
    assert f"no ImageNet weights for backbone '{BACKBONE}' from the timm hub" in message
    assert "model.kwargs.pretrained to a local .safetensors/.pth file" in message


@needs_timm
def test_model_info_round_trip_needs_neither_hub_nor_weight_file(tmp_path: Path) -> None:
    weights = tmp_path / "imagenet.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(BACKBONE).state_dict().items()}, str(weights))
    kwargs = {
        **TIMM_KWARGS,
        "output_stride": 8,
        "pretrained": str(weights),
        "in_channels": 3,
        "num_classes": len(CLASSES),
    }
    model = create_model("deeplabv3plus_timm", **kwargs).eval()
    info = ModelInfo("deeplabv3plus_timm", kwargs, CLASSES, normalization="imagenet", method="arm")
    path = tmp_path / "model.safetensors"
    save_model(path, model, info)
    weights.unlink()  # a served model rebuilds without the file it was trained from
    loaded, loaded_info = load_model(path)
    assert loaded_info == info == read_model_info(path)
    assert loaded.stride == 8
    images = torch.from_numpy(normalize_image(rgb_images((1, 3, 48, 64), seed=1)[0], "imagenet"))[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))


def test_imagenet_normalisation_in_the_wrapper_matches_the_training_loader() -> None:
    images = rgb_images((2, 3, 24, 40), seed=2)
    assert images.min() >= 0 and images.max() <= 255 and images.max() > 100
    wrapper = DeployableSegmenter(torch.nn.Identity(), "imagenet", "logits")
    expected = np.stack([normalize_image(image, "imagenet") for image in images])
    np.testing.assert_allclose(wrapper(torch.from_numpy(images)).numpy(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs 3 \\(RGB\\) channels"):
        wrapper(torch.zeros(1, 1, 8, 8))


RGB_MODELS = [
    pytest.param("deeplabv3plus", {"base_width": 4}, id="deeplabv3plus"),
    pytest.param(
        "deeplabv3plus_timm",
        TIMM_KWARGS,
        id=f"deeplabv3plus_timm-{BACKBONE}",
        marks=[pytest.mark.timm, skip_without_timm],
    ),
]


@pytest.mark.parametrize(("architecture", "kwargs"), RGB_MODELS)
def test_rgb_imagenet_model_exports_and_serves(tmp_path: Path, architecture: str, kwargs: dict) -> None:
    """Export (dynamo, validated against PyTorch, TensorRT-compatible), then one request each
    through the ONNX Runtime backend and the PyTorch backend on raw 0-255 RGB pixels."""
    torch.manual_seed(0)
    kwargs = {**kwargs, "in_channels": 3, "num_classes": len(CLASSES)}
    model = create_model(architecture, **kwargs).eval()
    info = ModelInfo(architecture, kwargs, CLASSES, normalization="imagenet", method="arm")
    run_dir = RunDir(tmp_path / "run")
    save_model(run_dir.model_file, model, info)
    onnx_path = tmp_path / "model.onnx"
    report = export_model(model, info, onnx_path, ExportConfig())  # raises unless validated and TensorRT-compatible
    assert report.passed and report.shapes[0][1] == 3
    runner = OnnxRuntimeRunner(onnx_path)
    assert runner.metadata["normalization"] == "imagenet" and runner.metadata["in_channels"] == "3"

    images = rgb_images((1, 3, 2 * model.stride, 3 * model.stride), seed=4)
    normalised = np.stack([normalize_image(image, "imagenet") for image in images])
    with torch.no_grad():
        reference = model(torch.from_numpy(normalised)).numpy()
    expected = runner.run(images)["logits"]
    np.testing.assert_allclose(expected, reference, rtol=1e-3, atol=1e-3)

    runtimes = open_runtimes(onnx_path, name="onnx") + open_runtimes(run_dir.path, name="torch")
    assert [(r.backend, r.input_shape[1]) for r in runtimes] == [("onnxruntime", 3), ("pytorch", 3)]
    with running_server(runtimes) as server:
        client = httpclient.InferenceServerClient(server.address)
        for runtime in runtimes:
            tensor = httpclient.InferInput("image", list(images.shape), "FP32")
            tensor.set_data_from_numpy(images, binary_data=True)
            result = client.infer(
                runtime.name, [tensor], outputs=[httpclient.InferRequestedOutput("logits", binary_data=True)]
            )
            np.testing.assert_allclose(
                result.as_numpy("logits"), expected, rtol=1e-3, atol=1e-3, err_msg=runtime.backend
            )
        client.close()
