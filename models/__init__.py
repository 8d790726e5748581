"""Segmentation networks, one file per family; `create_model` builds one by name.

Every model maps (N, in_channels, H, W) float32 to logits (N, num_classes, H, W) for any H, W
divisible by `model.stride` (and, for multiscale training, any size of at least `stride`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from noisyseg.models.deeplab import DeepLabV3Plus, deeplabv3plus
from noisyseg.models.timm_deeplab import TimmDeepLabV3Plus
from noisyseg.models.unet import UNet, unet

# The one table of model families: name -> constructor (its keyword arguments are the model's
# `model.kwargs`). `deeplabv3plus_timm` needs the `timm` extra; it is imported when built.
MODEL_CONSTRUCTORS: dict[str, Callable[..., nn.Module]] = {
    "unet": unet,
    "deeplabv3plus": deeplabv3plus,
    # The class itself: its __init__ arguments are the model's kwargs.
    "deeplabv3plus_timm": TimmDeepLabV3Plus,
}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model `name` (a key of `MODEL_CONSTRUCTORS`) with its constructor's arguments."""
    if name not in MODEL_CONSTRUCTORS:
        raise ValueError(
            f"unknown model '{name}'; known models: {', '.join(sorted(MODEL_CONSTRUCTORS))}"
        )
    constructor = MODEL_CONSTRUCTORS[name]
    try:
        # Checked up front so an unknown keyword (say from a hand-edited config) reads as bad
        # input, without mistaking a TypeError raised inside the constructor for one.
        inspect.signature(constructor).bind(**kwargs)
    except TypeError as err:
        raise ValueError(f"model '{name}': bad arguments {sorted(kwargs)} ({err})") from err
    return constructor(**kwargs)


__all__ = [
    "MODEL_CONSTRUCTORS",
    "DeepLabV3Plus",
    "TimmDeepLabV3Plus",
    "UNet",
    "create_model",
    "deeplabv3plus",
    "unet",
]
