"""DeepLabv3+ (Chen et al. 2018) over a small dilated residual backbone.

The ARM paper's coarse-label experiments use DeepLabv3+ with a ResNet-101; this is the same
design scaled down so it trains on a CPU: a ResNet-style backbone of basic blocks whose last
stages trade stride for dilation (output stride 16 or 8), ASPP (a 1x1 branch, three dilated 3x3
branches and an image-pooling branch), and a decoder that fuses the stride-4 low-level features.

Export notes: the image-pooling branch is a plain global mean (no adaptive pooling) and every
resize takes its size from a tensor's shape, so any input of at least `stride` pixels per side
works and the logits always have the input's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# ASPP dilation rates per output stride, as in the DeepLabv3 paper (doubled at stride 8).
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1
) -> nn.Sequential:
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) with optional stride or dilation."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(in_channels, out_channels, stride=stride, dilation=dilation)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(self.conv1(x))) + self.shortcut(x))


def residual_stage(in_channels: int, out_channels: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
    layers = [BasicBlock(in_channels, out_channels, stride=stride, dilation=dilation)]
    layers += [BasicBlock(out_channels, out_channels, dilation=dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and an image-pooling branch."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(in_channels, out_channels, kernel_size=1)])
        self.branches.extend(conv_bn_relu(in_channels, out_channels, dilation=rate) for rate in rates)
        # No BatchNorm on the pooled branch: a 1x1 map has one value per channel, which breaks
        # BatchNorm's training statistics at batch size 1.
        self.image_pool = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), nn.ReLU(inplace=True))
        self.project = conv_bn_relu(out_channels * (len(rates) + 2), out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [branch(x) for branch in self.branches]
        pooled = self.image_pool(x.mean((2, 3), keepdim=True))
        outputs.append(pooled.expand(-1, -1, x.shape[2], x.shape[3]))
        return self.project(torch.cat(outputs, dim=1))


class DeepLabV3PlusHead(nn.Module):
    """DeepLabv3+'s head over any backbone: ASPP on the deepest features, fused with projected
    stride-4 low-level features in the decoder, then the classifier. Subclasses build their
    backbone, call `build_head` and run `decode` (the attribute names stay those of the original
    model, so checkpoints keep their keys)."""

    stride: int

    def build_head(
        self, high_channels: int, low_channels: int, aspp_channels: int, num_classes: int, output_stride: int
    ) -> None:
        self.aspp = ASPP(high_channels, aspp_channels, ASPP_RATES[output_stride])
        # The low-level projection is narrow (48 of 256 in the paper) so ASPP features dominate.
        low_level_channels = max(8, aspp_channels * 3 // 16)
        self.low_level_project = conv_bn_relu(low_channels, low_level_channels, kernel_size=1)
        self.decoder = nn.Sequential(
            conv_bn_relu(aspp_channels + low_level_channels, aspp_channels),
            conv_bn_relu(aspp_channels, aspp_channels),
        )
        self.classifier = nn.Conv2d(aspp_channels, num_classes, kernel_size=1)

    def decode(
        self, low_level: torch.Tensor, high_level: torch.Tensor, size: tuple[int, int] | torch.Size
    ) -> torch.Tensor:
        """Logits at `size` from the stride-4 features and the deepest (stride 8 or 16) ones."""
        features = self.aspp(high_level)
        features = F.interpolate(features, size=low_level.shape[-2:], mode="bilinear", align_corners=False)
        features = self.decoder(torch.cat([self.low_level_project(low_level), features], dim=1))
        logits = self.classifier(features)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def check_output_stride(name: str, output_stride: int) -> None:
    if output_stride not in ASPP_RATES:
        raise ValueError(f"{name}: output_stride must be one of {sorted(ASPP_RATES)}, got {output_stride}")


class DeepLabV3Plus(DeepLabV3PlusHead):
    """DeepLabv3+ mapping (N, in_channels, H, W) to logits (N, num_classes, H, W)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 5,
        base_width: int = 16,
        output_stride: int = 16,
        blocks: Sequence[int] = (2, 2, 2, 2),
        aspp_channels: int | None = None,
    ) -> None:
        super().__init__()
        check_output_stride("deeplabv3plus", output_stride)
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"deeplabv3plus: blocks must be four positive stage depths, got {list(blocks)}")
        widths = [base_width * 2**stage for stage in range(4)]
        aspp_channels = aspp_channels or 8 * base_width
        # Stride 16: only the last stage is dilated; stride 8: the last two.
        stage3_stride, stage3_dilation, stage4_dilation = (2, 1, 2) if output_stride == 16 else (1, 2, 4)
        self.stride = output_stride
        self.stem = nn.Sequential(conv_bn_relu(in_channels, widths[0], stride=2), conv_bn_relu(widths[0], widths[0]))
        # Stages reach strides 4 (the decoder's low-level features), 8, then 16 or 8.
        self.layer1 = residual_stage(widths[0], widths[0], blocks[0], stride=2, dilation=1)
        self.layer2 = residual_stage(widths[0], widths[1], blocks[1], stride=2, dilation=1)
        self.layer3 = residual_stage(widths[1], widths[2], blocks[2], stage3_stride, stage3_dilation)
        self.layer4 = residual_stage(widths[2], widths[3], blocks[3], 1, stage4_dilation)
        self.build_head(widths[3], widths[0], aspp_channels, num_classes, output_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_level = self.layer1(self.stem(x))
        return self.decode(low_level, self.layer4(self.layer3(self.layer2(low_level))), x.shape[-2:])


def deeplabv3plus(
    in_channels: int = 1,
    num_classes: int = 5,
    base_width: int = 16,
    output_stride: int = 16,
    blocks: Sequence[int] = (2, 2, 2, 2),
    aspp_channels: int | None = None,
) -> DeepLabV3Plus:
    """DeepLabv3+ with a small dilated ResNet backbone (widths base*(1, 2, 4, 8))."""
    return DeepLabV3Plus(
        in_channels=in_channels,
        num_classes=num_classes,
        base_width=base_width,
        output_stride=output_stride,
        blocks=tuple(blocks),
        aspp_channels=aspp_channels,
    )
