"""UNet as in the ADELE reference code (SegTHOR experiments).

The classic bilinear UNet (Ronneberger et al., in the widely used `Pytorch-UNet` layout the ADELE
code builds on): two 3x3 conv + BatchNorm + ReLU per block, max-pool down, bilinear upsampling
(align_corners=True) with skip concatenation, 1x1 classifier. With bilinear upsampling the
bottleneck keeps the width of the deepest encoder block, so the encoder widths are
base*(1, 2, 4, 8, 8) for depth 4: 64-128-256-512-512 by default.

Export notes: every resize takes its size from the skip tensor's shape, so the network runs on
any input of at least `stride` pixels per side and returns logits of exactly the input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BatchNorm -> ReLU) twice."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pool, then a double convolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """Bilinear upsampling to the skip tensor's size, concatenation, double convolution."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # Resizing to the skip's exact size (not a fixed factor 2) handles odd feature sizes.
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """Bilinear UNet mapping (N, in_channels, H, W) to logits (N, num_classes, H, W)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 5, base_width: int = 64, depth: int = 4) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"unet: depth must be >= 1, got {depth}")
        if base_width < 1:
            raise ValueError(f"unet: base_width must be >= 1, got {base_width}")
        widths = [base_width * 2**level for level in range(depth)]
        self.stride = 2**depth
        self.inc = DoubleConv(in_channels, widths[0])
        # The bottleneck keeps the deepest width: bilinear upsampling adds no channels.
        self.downs = nn.ModuleList(Down(widths[i - 1], widths[i]) for i in range(1, depth))
        self.downs.append(Down(widths[-1], widths[-1]))
        self.ups = nn.ModuleList(Up(2 * widths[level], widths[max(level - 1, 0)]) for level in reversed(range(depth)))
        self.classifier = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.classifier(x)


def unet(in_channels: int = 1, num_classes: int = 5, base_width: int = 64, depth: int = 4) -> UNet:
    """The ADELE reference UNet; `base_width=8` or 16 gives a CPU-sized network."""
    return UNet(in_channels=in_channels, num_classes=num_classes, base_width=base_width, depth=depth)
