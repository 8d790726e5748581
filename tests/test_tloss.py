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


def test_values_are_the_negative_log_density_of_scipys_multivariate_t() -> None:
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(0, 2, size=(2, 4, 3, 3)))
    target = torch.from_numpy(rng.integers(0, 4, size=(2, 3, 3)))
    target[0, 0, 0] = target[1, 2, 1] = 255
    log_nu = 0.4
    losses = student_t_loss(logits, target, torch.tensor(log_nu, dtype=torch.float64), reduction="none")
    probs = torch.softmax(logits, dim=1).numpy()
    nu = math.exp(log_nu) + 1e-8
    expected = np.zeros((2, 3, 3))
    for n, i, j in np.ndindex(2, 3, 3):
        if target[n, i, j] != 255:
            one_hot = np.eye(4)[int(target[n, i, j])]
            expected[n, i, j] = -stats.multivariate_t(loc=probs[n, :, i, j], shape=np.eye(4), df=nu).logpdf(one_hot)
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-10, atol=1e-12)
    mean = student_t_loss(logits, target, torch.tensor(log_nu, dtype=torch.float64))
    assert mean.item() == pytest.approx(expected.sum() / 16, rel=1e-12)


def test_gradients_match_finite_differences_and_the_closed_form() -> None:
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(0, 1.5, size=(2, 3, 4, 4))).requires_grad_()
    target = torch.from_numpy(rng.integers(0, 3, size=(2, 4, 4)))
    target[1, 0, :2] = 255
    log_nu = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, v: student_t_loss(z, target, v), (logits, log_nu))
    # Closed form: for pixel loss l(p, nu) with d = ||y - p||^2 and D classes,
    #   dl/dp = (nu + D) / (nu + d) * (p - y)
    #   dl/dnu = -psi((nu + D)/2)/2 + psi(nu/2)/2 + D/(2 nu) + log(1 + d/nu)/2 - (nu + D) d / (2 nu (nu + d))
    # and dnu/dlog_nu = exp(log_nu) = nu - 1e-8.
    probs = torch.softmax(logits.detach(), dim=1).requires_grad_()
    valid = target != 255
    safe = torch.where(valid, target, 0)
    one_hot = torch.nn.functional.one_hot(safe, 3).permute(0, 3, 1, 2).double()
    d = ((one_hot - probs.detach()) ** 2).sum(dim=1)
    nu, big_d = math.exp(0.7) + 1e-8, 3
    # The loss as a function of p: differentiate through p with the same formula.
    distance = ((one_hot - probs) ** 2).sum(dim=1)
    per_pixel = (nu + big_d) / 2 * torch.log1p(distance / nu)
    (grad_p,) = torch.autograd.grad(per_pixel[valid].sum(), probs)
    expected_p = (nu + big_d) / (nu + d)[:, None] * (probs.detach() - one_hot) * valid[:, None]
    torch.testing.assert_close(grad_p, expected_p, rtol=1e-12, atol=1e-12)
    loss = student_t_loss(logits.detach(), target, log_nu)
    (grad_nu,) = torch.autograd.grad(loss, log_nu)
    dn = d.numpy()[valid.numpy()]
    per_pixel_dnu = (
        -special.digamma((nu + big_d) / 2) / 2
        + special.digamma(nu / 2) / 2
        + big_d / (2 * nu)
        + np.log1p(dn / nu) / 2
        - (nu + big_d) * dn / (2 * nu * (nu + dn))
    )
    assert grad_nu.item() == pytest.approx((nu - 1e-8) * per_pixel_dnu.mean(), rel=1e-9)


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
