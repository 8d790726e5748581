"""DeepLabv3+ over a backbone from `timm` (ResNet-50/101 as in the ARM paper, or any timm model
that offers features): the backbone is `timm.create_model(name, features_only=True,
output_stride=8|16)`, its stride-4 features feed the decoder and its deepest ones ASPP (the head
of `deeplab.py`, with the paper's widths: ASPP 256, low-level projection 48).

ImageNet weights (`pretrained`): `False` initialises at random; `True` takes the backbone's
default weights from the timm hub (or the local hub cache); a path to a `.safetensors` file (or a
`.pth`/`.pt`/`.bin`/`.pth.tar` file, read with `torch.load(weights_only=True)`, never unpickling
code) loads that file through timm's `pretrained_cfg_overlay=dict(file=PATH)`, which adapts the
stem to `in_channels` and drops the classifier as for hub weights. A file may hold the full timm
model's state dict, the backbone's alone, or a checkpoint of timm's training (its EMA weights
when it has them, as timm loads it). When neither is available a one-line ValueError says so.

timm needs torchvision, which is an optional extra (`pip install 'noisyseg[timm]'`): the CPU
build of torch this project pins has no CPU build of torchvision on PyPI, whose wheels are CUDA
builds that fail to import next to a CPU torch. Everything else in noisyseg works without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from noisyseg.models.deeplab import DeepLabV3PlusHead, check_output_stride

NAME = "deeplabv3plus_timm"
# Weight files a local `pretrained` may name: safetensors first; the torch formats are read
# with weights_only=True (timm's default). `.pth.tar`: the checkpoints timm's own training writes
# (`timm.utils.CheckpointSaver`), whose `state_dict` (or `state_dict_ema`) timm takes.
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".pth.tar")
LOW_LEVEL_REDUCTION = 4


def import_timm() -> Any:
    """The timm module, or an ImportError naming the extra to install."""
    try:
        import timm
    except Exception as err:  # a CUDA-only torchvision raises RuntimeError on import, not ImportError
        raise ImportError(
            f"{NAME} needs timm and a torchvision that imports next to this torch "
            f"(pip install 'noisyseg[timm]'): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    return timm


def pretrained_source(pretrained: bool | str | Path) -> bool | Path:
    """`pretrained` checked: False, True (hub), or the Path of an existing weight file."""
    if isinstance(pretrained, bool):
        return pretrained
    if isinstance(pretrained, str | Path):
        path = Path(pretrained).expanduser()
        if not path.name.lower().endswith(WEIGHT_SUFFIXES):
            raise ValueError(
                f"{NAME}: pretrained file {path} must be one of {', '.join(WEIGHT_SUFFIXES)} "
                f"(or pretrained: true for the timm hub, false for random initialisation)"
            )
        if not path.is_file():
            raise ValueError(f"{NAME}: pretrained weight file {path} does not exist")
        return path
    raise ValueError(
        f"{NAME}: pretrained must be false, true (timm hub) or the path of a weight file, got {pretrained!r}"
    )


def create_backbone(backbone: str, in_channels: int, output_stride: int, pretrained: bool | Path) -> nn.Module:
    """`timm.create_model(backbone, features_only=True, ...)` with weights as `pretrained` says."""
    timm = import_timm()
    kwargs: dict[str, Any] = {"features_only": True, "output_stride": output_stride, "in_chans": in_channels}
    if isinstance(pretrained, Path):
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained)})
    else:
        kwargs["pretrained"] = pretrained
    try:
        return timm.create_model(backbone, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"{NAME}: timm has no model '{backbone}' (timm.list_models() names them)") from err
        if pretrained is True:
            raise _no_hub_weights(backbone, err) from err
        if isinstance(pretrained, Path):
            raise ValueError(f"{NAME}: cannot load backbone weights from {pretrained}: {err}") from err
        raise
    except OSError as err:  # the hub's LocalEntryNotFoundError, a failed download
        if pretrained is True:
            raise _no_hub_weights(backbone, err) from err
        raise
    except TypeError as err:
        raise ValueError(
            f"{NAME}: timm model '{backbone}' does not take these options {sorted(kwargs)} ({err})"
        ) from err


def _no_hub_weights(backbone: str, err: BaseException) -> ValueError:
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ValueError(
        f"{NAME}: no ImageNet weights for backbone '{backbone}' from the timm hub (offline with "
        f"nothing cached, or none published: {type(err).__name__}: {first_line}); set "
        f"model.kwargs.pretrained to a local .safetensors/.pth file, or to false for random initialisation"
    )


class TimmDeepLabV3Plus(DeepLabV3PlusHead):
    """DeepLabv3+ mapping (N, in_channels, H, W) to logits (N, num_classes, H, W) over a timm
    backbone; `stride` is the output stride (inputs a multiple of it keep exact alignment)."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 19,
        backbone: str = "resnet50",
        output_stride: int = 16,
        pretrained: bool | str | Path = False,
        aspp_channels: int = 256,
    ) -> None:
        super().__init__()
        check_output_stride(NAME, output_stride)
        self.backbone = create_backbone(backbone, in_channels, output_stride, pretrained_source(pretrained))
        reductions = [int(r) for r in self.backbone.feature_info.reduction()]
        channels = [int(c) for c in self.backbone.feature_info.channels()]
        if reductions[-1] != output_stride:
            raise ValueError(
                f"{NAME}: backbone '{backbone}' does not support output_stride {output_stride} "
                f"(its features reach stride {reductions[-1]}; their strides are {reductions})"
            )
        low_levels = [i for i, r in enumerate(reductions) if r == LOW_LEVEL_REDUCTION]
        if not low_levels:
            raise ValueError(
                f"{NAME}: backbone '{backbone}' has no stride-{LOW_LEVEL_REDUCTION} features for the "
                f"decoder (its feature strides are {reductions})"
            )
        # The deepest stride-4 level: the end of ResNet's layer1, as in the paper.
        self.low_level_index = low_levels[-1]
        self.stride = output_stride
        self.build_head(channels[-1], channels[self.low_level_index], aspp_channels, num_classes, output_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        return self.decode(features[self.low_level_index], features[-1], x.shape[-2:])
