"""Deprecated alias: the models moved to `noisyseg.models` (kept for the README's old import)."""

import warnings

from noisyseg.models import create_model

warnings.warn(
    "noisyseg.models moved to noisyseg.models; import create_model from there", DeprecationWarning, stacklevel=2
)

__all__ = ["create_model"]
