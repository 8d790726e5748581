"""The T-Loss: values against a hand computation and scipy's multivariate t, gradients against
finite differences and the closed form, its learned tolerance in training and across a resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import test_trainer
import torch
from safetensors.torch import load_file
from scipy import special, stats
from test_trainer import tiny_config, train_until_crash

from noisyseg.config import build_config
from noisyseg.methods.losses import TLoss, pixel_loss, student_t_loss
from noisyseg.methods.objective import MethodObjective
from noisyseg.training.trainer import train

# The trainer tests' tiny data folders (a module fixture).
folders = test_trainer.folders


def test_value_by_hand() -> None:
    # Two classes, logits (0, 0): p = (1/2, 1/2), label 0, ||y - p||^2 = 1/2; nu = e^0 = 1, D = 2:
    # -lgamma(3/2) + lgamma(1/2) + log(pi) + 3/2 log(1 + 1/2), with lgamma(1/2) = log(pi)/2 and
    # lgamma(3/2) = log(pi)/2 - log 2: log 2 + log pi + 3/2 log 3/2.
    expected = math.log(2) + math.log(math.pi) + 1.5 * math.log(1.5)
    loss = student_t_loss(
        torch.zeros(1, 2, 1, 1, dtype=torch.float64),
        torch.zeros(1, 1, 1, dtype=torch.long),
        torch.tensor(0.0, dtype=torch.float64),
    )
    assert loss.item() == pytest.approx(expected, rel=1e-8)  # nu = 1 + 1e-8 (kept positive)
    assert expected == pytest.approx(2.4460747, abs=1e-6)


def test_values_are_the_negative_log_density_of_scipys_multivariate_t_over_each_image() -> None:
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(0, 2, size=(2, 4, 3, 3)))
    target = torch.from_numpy(rng.integers(0, 4, size=(2, 3, 3)))
    target[0, 0, 0] = target[1, 2, 1] = target[1, 0, 2] = 255
    log_nu = 0.4
    losses = student_t_loss(logits, target, torch.tensor(log_nu, dtype=torch.float64), reduction="none")
    probs = torch.softmax(logits, dim=1).numpy()
    nu = math.exp(log_nu) + 1e-8
    expected = np.zeros((2, 3, 3))
    image_losses = []
    for n in range(2):
        valid = target[n].numpy() != 255
        # The image is one observation: its valid pixels' one-hot labels and softmax, flattened.
        one_hot = np.eye(4)[target[n].numpy()[valid]].ravel()
        mean = probs[n].transpose(1, 2, 0)[valid].ravel()
        image_loss = -stats.multivariate_t(loc=mean, shape=np.eye(one_hot.size), df=nu).logpdf(one_hot)
        expected[n][valid] = image_loss / valid.sum()
        image_losses.append(image_loss)
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-10, atol=1e-12)
    mean_loss = student_t_loss(logits, target, torch.tensor(log_nu, dtype=torch.float64))
    assert mean_loss.item() == pytest.approx(sum(image_losses) / 15, rel=1e-12)  # 15 valid pixels
    # An image without valid pixels adds nothing, and no NaN.
    target[1] = 255
    alone = student_t_loss(logits, target, torch.tensor(log_nu, dtype=torch.float64), reduction="none")
    assert torch.all(alone[1] == 0) and alone[0].sum().item() == pytest.approx(image_losses[0], rel=1e-12)


def test_gradients_match_finite_differences_and_the_closed_form() -> None:
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(0, 1.5, size=(2, 3, 4, 4))).requires_grad_()
    target = torch.from_numpy(rng.integers(0, 3, size=(2, 4, 4)))
    target[1, 0, :2] = 255
    log_nu = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, v: student_t_loss(z, target, v), (logits, log_nu))
    # Closed form, per image with P valid pixels, D = 3 P and residual r = sum ||y - p||^2:
    #   dL/dp = (nu + D) / (nu + r) * (p - y)
    #   dL/dnu = -psi((nu + D)/2)/2 + psi(nu/2)/2 + D/(2 nu) + log(1 + r/nu)/2 - (nu + D) r / (2 nu (nu + r))
    # the mean divides the sum of L by the batch's valid pixels, and dnu/dlog_nu = nu - 1e-8.
    probs = torch.softmax(logits.detach(), dim=1).requires_grad_()
    valid = target != 255
    one_hot = torch.nn.functional.one_hot(torch.where(valid, target, 0), 3).permute(0, 3, 1, 2).double()
    squared = ((one_hot - probs.detach()) ** 2).sum(dim=1) * valid
    pixels = valid.flatten(1).sum(dim=1).double()
    r, big_d = squared.flatten(1).sum(dim=1), 3 * pixels
    nu = math.exp(0.7) + 1e-8
    # The loss as a function of p: differentiate through p with the same formula.
    residual = (((one_hot - probs) ** 2).sum(dim=1) * valid).flatten(1).sum(dim=1)
    (grad_p,) = torch.autograd.grad(((nu + big_d) / 2 * torch.log1p(residual / nu)).sum(), probs)
    expected_p = ((nu + big_d) / (nu + r))[:, None, None, None] * (probs.detach() - one_hot) * valid[:, None]
    torch.testing.assert_close(grad_p, expected_p, rtol=1e-12, atol=1e-12)
    loss = student_t_loss(logits.detach(), target, log_nu)
    (grad_nu,) = torch.autograd.grad(loss, log_nu)
    rn, dn = r.numpy(), big_d.numpy()
    per_image_dnu = (
        -special.digamma((nu + dn) / 2) / 2
        + special.digamma(nu / 2) / 2
        + dn / (2 * nu)
        + np.log1p(rn / nu) / 2
        - (nu + dn) * rn / (2 * nu * (nu + rn))
    )
    assert grad_nu.item() == pytest.approx((nu - 1e-8) * per_image_dnu.sum() / pixels.sum().item(), rel=1e-9)


def test_a_saturated_pixel_does_not_send_nu_to_zero() -> None:
    # The per-pixel form's failure: a pixel predicted exactly (r = 0) had a loss falling without
    # bound as nu -> 0. Over an image with one pixel still wrong, L has a finite minimiser in nu.
    logits = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    logits[:, 0] = 200.0  # background everywhere, saturated: p = (1, 0, 0) exactly
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 0, 0] = 1
    values = [student_t_loss(logits, target, torch.tensor(v, dtype=torch.float64)).item() for v in (-12.0, -6.0, 0.0)]
    assert values[0] > values[1] and np.isfinite(values).all()


def test_the_module_owns_nu_and_the_objective_trains_it() -> None:
    module = TLoss()
    assert [name for name, _ in module.named_parameters()] == ["log_nu"] and module.nu.item() == pytest.approx(math.e)
    with pytest.raises(ValueError, match="needs its TLoss module"):
        pixel_loss("tloss", torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    config = build_config(None, ["data=x", "out=y", "method=tloss", "loss.tloss_log_nu=0.5"])
    objective = MethodObjective(config, ignore_index=255)
    assert [name for name, _ in objective.named_parameters()] == ["tloss.log_nu"]
    logits = [torch.randn(2, 3, 5, 5, requires_grad=True) for _ in config.adele.scales]
    target = torch.randint(0, 3, (2, 5, 5))
    loss, terms = objective(logits, target, None, False)
    expected = torch.stack([student_t_loss(z, target, torch.tensor(0.5)) for z in logits]).mean()
    torch.testing.assert_close(loss, expected)
    assert terms["tloss_nu"].item() == pytest.approx(math.exp(0.5))
    loss.backward()
    assert objective.tloss is not None and objective.tloss.log_nu.grad is not None and objective.tloss.log_nu.grad != 0
    with pytest.raises(ValueError, match="loss.tloss_log_nu"):
        build_config(None, ["data=x", "out=y", "loss.tloss_log_nu=.inf"])


def test_a_tloss_run_learns_nu_and_resumes_exactly(
    folders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_config(folders, straight, "method=tloss", "epochs=3"))
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    nus = [r["loss"]["tloss_nu"] for r in records]
    assert all(np.isfinite(nus)) and nus[-1] != pytest.approx(math.e, abs=1e-6)  # nu moved
    tensors = load_file(str(straight / "checkpoint" / "state.safetensors"))
    assert math.exp(tensors["objective.tloss.log_nu"].item()) == pytest.approx(nus[-1], rel=0.2)
    config = tiny_config(folders, resumed, "method=tloss", "epochs=3")
    train_until_crash(config, 2, monkeypatch)
    train(config, resume=True)
    again = load_file(str(resumed / "checkpoint" / "state.safetensors"))
    assert tensors.keys() == again.keys()
    for key in tensors:
        assert torch.equal(tensors[key], again[key]), key
    assert (straight / "metrics.jsonl").read_text() == (resumed / "metrics.jsonl").read_text()
