"""Leakage measures: dCor on a held-out batch and a model-inversion attack trained on mock data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from syft_split import leakage
from syft_split.datasets import digits_parties
from syft_split.errors import ConfigError, NonFiniteError, ShapeError
from syft_split.leakage import dcor_leakage, inversion_attack


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Mock data (the owner's synthetic stand-in: here other real digits) and a real held-out batch."""
    data = digits_parties(1, seed=0)[0]
    return data.x_train[:600], data.x_test[:150]


def _noise(x: torch.Tensor) -> torch.Tensor:
    return torch.randn(x.shape[0], 32, generator=torch.Generator().manual_seed(x.shape[0]))


def test_all_is_pinned() -> None:
    assert set(leakage.__all__) == {"dcor_leakage", "inversion_attack"}


def test_dcor_leakage(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    _, target = digits
    assert dcor_leakage(target, target * 2) == pytest.approx(1.0, abs=1e-6)
    assert dcor_leakage(target, _noise(target)) < 0.15
    assert dcor_leakage(target, _noise(target), unbiased=False) > 0.3  # the biased V-statistic
    x = target.clone().requires_grad_(True)
    assert isinstance(dcor_leakage(x, x * 3), float)


def test_identity_encoder_is_inverted(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    mock, target = digits
    out = inversion_attack(lambda x: x.flatten(1), mock, target, seed=0)
    assert out["ratio"] < 0.2
    assert out["mse"] < 0.2 * out["baseline_mse"]
    assert out["input_dim"] == 64 and out["activation_dim"] == 64 and out["n_target"] == 150


def test_conv_encoder_leaks(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    mock, target = digits
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    out = inversion_attack(encoder, mock, target, seed=0)
    assert out["ratio"] < 0.5
    assert encoder.training  # mode restored


@pytest.mark.parametrize(
    "encoder", [_noise, lambda x: torch.zeros(x.shape[0], 8)], ids=["noise", "constant"]
)
def test_uninformative_encoder_scores_baseline(digits: tuple[torch.Tensor, torch.Tensor], encoder) -> None:  # type: ignore[no-untyped-def]
    mock, target = digits
    out = inversion_attack(encoder, mock, target, seed=0)
    assert out["ratio"] == pytest.approx(1.0, abs=0.05)


def test_seeded_attack_is_deterministic(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    mock, target = digits
    rng, threads = torch.random.get_rng_state(), torch.get_num_threads()
    a = inversion_attack(lambda x: x[:, :, ::2].flatten(1), mock, target, epochs=5, seed=3)
    b = inversion_attack(lambda x: x[:, :, ::2].flatten(1), mock, target, epochs=5, seed=3)
    c = inversion_attack(lambda x: x[:, :, ::2].flatten(1), mock, target, epochs=5, seed=4)
    assert a == b
    assert a["mse"] != c["mse"]
    assert torch.equal(torch.random.get_rng_state(), rng)  # global RNG untouched
    assert torch.get_num_threads() == threads


def test_attack_validates(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    mock, target = digits
    identity = lambda x: x.flatten(1)  # noqa: E731
    with pytest.raises(ShapeError, match="row shape"):
        inversion_attack(identity, mock, target[:, :, :4])
    with pytest.raises(ShapeError, match="rows"):
        inversion_attack(lambda x: x.flatten(1)[:-1], mock, target)
    with pytest.raises(NonFiniteError):
        inversion_attack(identity, mock, torch.full_like(target, math.nan))
    for bad in ({"epochs": 0}, {"lr": -1.0}, {"val_fraction": 1.0}, {"hidden": 0}, {"num_threads": 0}):
        with pytest.raises(ConfigError):
            inversion_attack(identity, mock, target, **bad)  # type: ignore[arg-type]
