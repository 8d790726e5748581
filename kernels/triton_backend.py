"""The Triton backend of `noisyseg.kernels` (GPU; CPU tensors through ``TRITON_INTERPRET=1``).

The three losses, one op file each (kernels, launch helper and autograd Function together).
`noisyseg.kernels.functional` imports this module only when the triton backend is chosen, so
importing `noisyseg.kernels` works on machines without triton.
"""

from noisyseg.kernels.triton_adele_arm import adele_arm_loss
from noisyseg.kernels.triton_arm_cross_entropy import arm_cross_entropy
from noisyseg.kernels.triton_multiscale_consistency import multiscale_consistency

__all__ = ["adele_arm_loss", "arm_cross_entropy", "multiscale_consistency"]
