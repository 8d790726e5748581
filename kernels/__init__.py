"""Loss functions for training on noisy labels, with interchangeable backends.

``backend="torch"`` is the readable reference (`noisyseg.kernels.reference`, the
specification); ``"auto"`` picks the fastest backend available for the tensors' device.
"""

from noisyseg.kernels.functional import (
    BACKENDS,
    adele_arm_loss,
    arm_cross_entropy,
    multiscale_consistency,
)
from noisyseg.kernels.reference import (
    ARM,
    arm_pixel_weights,
    arm_reweighted_loss,
    normalized_confidence,
)

__all__ = [
    "ARM",
    "BACKENDS",
    "adele_arm_loss",
    "arm_cross_entropy",
    "arm_pixel_weights",
    "arm_reweighted_loss",
    "multiscale_consistency",
    "normalized_confidence",
]
