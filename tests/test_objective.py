"""The method objective against the loss specification (kernels/reference.py) and PyTorch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from noisyseg.config import build_config
from noisyseg.kernels import reference
from noisyseg.methods.objective import MethodObjective


def logits_and_target(seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # Confident logits, so the rho mask keeps every image at divisor 1 and would drop them at 3.
    logits = [6.0 * torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64) for _ in range(3)]
    target = torch.randint(0, 4, (2, 8, 8), generator=generator)
    target[0, 0, :3] = 255
    return logits, target


@pytest.mark.parametrize("divisor", [1.0, 3.0])
def test_logit_divisor_divides_inside_the_cross_entropy_only(divisor: float) -> None:
    config = build_config(
        overrides=["data=unused", "out=unused", "method=adele", f"adele.logit_divisor={divisor}", "loss.backend=torch"]
    )
    logits, target = logits_and_target()
    _, terms = MethodObjective(config, ignore_index=255)(logits, target, None, False)
    expected_ce = torch.stack([F.cross_entropy(z / divisor, target, ignore_index=255) for z in logits]).mean()
    # The consistency term and its rho mask see the undivided logits, as the reference code has it.
    expected_consistency = reference.multiscale_consistency(logits, target, 0.8, "image", 255)
    assert terms["ce"].item() == pytest.approx(expected_ce.item(), rel=1e-10)
    assert terms["consistency"].item() == pytest.approx(expected_consistency.item(), rel=1e-10)
    assert expected_consistency.item() > 0.01
