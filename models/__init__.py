"""Segmentation networks, one file per family; `create_model` builds one by name.

Every model maps (N, in_channels, H, W) float32 to logits (N, num_classes, H, W) for any H, W
divisible by `model.stride` (and, for multiscale training, any size of at least `stride`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

# The one table of model families: name -> "module:constructor" (its keyword arguments are the
# model's `model.kwargs`). Imported when a model is built, so naming models, reading a model
# file's description or serving an ONNX model never imports torch; `deeplabv3plus_timm` needs
# the `timm` extra.
MODEL_CONSTRUCTORS: dict[str, str] = {
    "unet": "noisyseg.models.unet:unet",
    "deeplabv3plus": "noisyseg.models.deeplab:deeplabv3plus",
    # The class itself: its __init__ arguments are the model's kwargs.
    "deeplabv3plus_timm": "noisyseg.models.timm_deeplab:TimmDeepLabV3Plus",
}


def model_constructor(name: str) -> Callable[..., nn.Module]:
    """The constructor of the model family `name` (a key of `MODEL_CONSTRUCTORS`)."""
    if name not in MODEL_CONSTRUCTORS:
        raise ValueError(f"unknown model '{name}'; known models: {', '.join(sorted(MODEL_CONSTRUCTORS))}")
    module, function = MODEL_CONSTRUCTORS[name].split(":")
    return getattr(importlib.import_module(module), function)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model `name` (a key of `MODEL_CONSTRUCTORS`) with its constructor's arguments."""
    constructor = model_constructor(name)
    try:
        # Checked up front so an unknown keyword (say from a hand-edited config) reads as bad
        # input, without mistaking a TypeError raised inside the constructor for one.
        inspect.signature(constructor).bind(**kwargs)
    except TypeError as err:
        raise ValueError(f"model '{name}': bad arguments {sorted(kwargs)} ({err})") from err
    return constructor(**kwargs)


__all__ = ["MODEL_CONSTRUCTORS", "create_model", "model_constructor"]
