"""`--device` and `--precision` resolution (runtime/device.py)."""

from __future__ import annotations

import pytest
import torch

from noisyseg.runtime.device import resolve_device, resolve_precision

CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: torch.cuda.is_available() is False here"
)


def test_auto_is_the_cpu_without_a_gpu_and_the_gpu_with_one() -> None:
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "CPU"])
def test_malformed_devices_name_the_field(name: str) -> None:
    with pytest.raises(ValueError, match=f"^device: expected one of auto, cpu, cuda, cuda:N, got '{name}'"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_cuda_without_one_says_why() -> None:
    with pytest.raises(ValueError, match="device: 'cuda:0' asks for a CUDA GPU, but .*use --device cpu or auto"):
        resolve_device("cuda:0")


@CUDA
def test_cuda_is_the_local_ranks_gpu_and_an_index_past_the_last_is_refused() -> None:
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="this process sees"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_precision_auto_is_fp32_on_the_cpu_and_bf16_on_a_gpu_that_has_it() -> None:
    assert resolve_precision("auto", torch.device("cpu")).dtype is None
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert resolve_precision("auto", torch.device("cuda", 0)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="^precision: expected one of auto, fp32, bf16, fp16, got 'fp8'"):
        resolve_precision("fp8", torch.device("cpu"))


def test_bf16_autocasts_a_convolution_on_the_cpu_and_fp32_leaves_it_alone() -> None:
    conv = torch.nn.Conv2d(1, 2, 3)
    image = torch.randn(1, 1, 8, 8)
    with resolve_precision("bf16", torch.device("cpu")).autocast(torch.device("cpu")):
        assert conv(image).dtype == torch.bfloat16
    with resolve_precision("fp32", torch.device("cpu")).autocast(torch.device("cpu")):
        assert conv(image).dtype == torch.float32


def test_only_fp16_scales_the_loss() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp16", cpu).grad_scaler(cpu).is_enabled()
    assert not resolve_precision("bf16", cpu).grad_scaler(cpu).is_enabled()
