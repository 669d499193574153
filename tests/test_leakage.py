"""Leakage measures: dCor, MSE ratio, SSIM, and the learned-decoder inversion attack."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from syft_split import leakage
from syft_split.datasets import digits_parties
from syft_split.errors import ConfigError, NonFiniteError, ShapeError
from syft_split.leakage import Release, dcor_leakage, decoder_attack, inversion_attack, mse_ratio, ssim
from syft_split.models import digits_cnn
from syft_split.split import split_model


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Mock data (the owner's synthetic stand-in: here other real digits) and a real held-out batch."""
    data = digits_parties(1, seed=0)[0]
    return data.x_train[:600], data.x_test[:150]


def _noise(x: torch.Tensor) -> torch.Tensor:
    return torch.randn(x.shape[0], 32, generator=torch.Generator().manual_seed(x.shape[0]))


def test_all_is_pinned() -> None:
    assert set(leakage.__all__) == {
        "dcor_leakage", "inversion_attack", "decoder_attack", "whitebox_inversion", "passthrough_check",
        "leakage_suite", "label_leakage", "review_lines", "LeakageWatch", "WatchBound", "label_alignment",
        "Release", "mse_ratio", "ssim",
    }
    for name in leakage.__all__:
        assert getattr(leakage, name).__doc__


def test_dcor_leakage(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    _, target = digits
    assert dcor_leakage(target, target * 2) == pytest.approx(1.0, abs=1e-6)
    assert dcor_leakage(target, _noise(target)) < 0.15
    assert dcor_leakage(target, _noise(target), unbiased=False) > 0.3  # the biased V-statistic
    x = target.clone().requires_grad_(True)
    assert isinstance(dcor_leakage(x, x * 3), float)


def test_mse_ratio() -> None:
    target = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    out = mse_ratio(target.clone(), target, torch.tensor([1.0, 1.0]))
    assert out == {"mse": 0.0, "baseline_mse": 1.0, "ratio": 0.0}
    assert mse_ratio(torch.ones(2, 2), target, torch.ones(2))["ratio"] == pytest.approx(1.0)
    assert math.isnan(mse_ratio(torch.ones(2, 2), torch.ones(2, 2), torch.ones(2))["ratio"])  # baseline 0
    with pytest.raises(ShapeError):
        mse_ratio(torch.ones(3, 2), target, torch.ones(2))


def _ssim_reference(x: np.ndarray, y: np.ndarray, L: float, size: int = 7, sigma: float = 1.5) -> float:
    """Wang et al. (2004) eq. 13, window by window, in plain numpy loops (one channel)."""
    ax = np.arange(size) - (size - 1) / 2
    g = np.exp(-(ax**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            a, b = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    _, target = digits
    x = target[:6]
    assert torch.equal(ssim(x, x), torch.ones(6, dtype=torch.float64))  # identical images: exactly 1
    y = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    got = ssim(x, y)
    want = [_ssim_reference(x[i, 0].double().numpy(), y[i, 0].double().numpy(), 1.0) for i in range(6)]
    assert got.tolist() == pytest.approx(want, abs=1e-10)
    assert torch.allclose(got, ssim(y, x))  # symmetric
    assert float(got.max()) < 0.9
    # constant images: the structure term is C2/C2, SSIM = (2ab + C1) / (a² + b² + C1)
    a, b, c1 = 0.25, 0.75, 0.01**2  # exact in float32
    const = ssim(torch.full((1, 1, 8, 8), a), torch.full((1, 1, 8, 8), b))
    assert float(const) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-12)
    with pytest.raises(ShapeError):
        ssim(x, x[:, :, :4])
    with pytest.raises(ConfigError):
        ssim(x, x, data_range=0.0)
    with pytest.raises(NonFiniteError):
        ssim(x, torch.full_like(x, math.nan))


def test_identity_encoder_is_inverted(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    mock, target = digits
    out = inversion_attack(lambda x: x.flatten(1), mock, target, seed=0)
    assert out["ratio"] < 0.05
    assert out["mse"] < 0.05 * out["baseline_mse"]
    assert out["ssim"] > 0.95
    assert out["input_dim"] == 64 and out["activation_dim"] == 64 and out["n_target"] == 150


def test_conv_encoder_leaks(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    mock, target = digits
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    out = inversion_attack(encoder, mock, target, seed=0)
    assert out["ratio"] < 0.3
    assert encoder.training  # mode restored


def test_decoder_is_trained_to_convergence(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The earlier attacker stopped after ~80 optimiser steps; the converged decoder (early
    stopping on held-back mock rows, mixup pairs) reconstructs the demo segment's input with
    clearly lower error (1.9x on these weights)."""
    mock, target = digits
    torch.manual_seed(0)
    encoder = split_model(digits_cnn(), cuts=["pool1"])[0]  # the demo's input segment
    mock = mock[:200]
    early = decoder_attack(encoder, mock, target, augment=0, batch_size=128, hidden=128, lr=3e-3,
                           max_epochs=40, patience=40)
    full = decoder_attack(encoder, mock, target)
    assert early["steps"] <= 80
    assert full["ratio"] < 0.7 * early["ratio"]
    assert full["best_epoch"] < full["epochs"]  # stopped on validation, not on the cap
    assert not full["budget_hit"] and full["seconds"] > 0


@pytest.mark.parametrize(
    "encoder", [_noise, lambda x: torch.zeros(x.shape[0], 8)], ids=["noise", "constant"]
)
def test_uninformative_encoder_scores_baseline(digits: tuple[torch.Tensor, torch.Tensor], encoder) -> None:  # type: ignore[no-untyped-def]
    mock, target = digits
    out = inversion_attack(encoder, mock, target, seed=0)
    assert out["ratio"] == pytest.approx(1.0, abs=0.05)


def test_noise_release_is_what_the_decoder_sees(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    mock, target = digits
    identity = lambda x: x.flatten(1)  # noqa: E731
    plain = decoder_attack(identity, mock[:200], target, max_epochs=30)
    noisy = decoder_attack(identity, mock[:200], target, release=Release(noise_sigma=1.0), max_epochs=30)
    assert noisy["ratio"] > 3 * plain["ratio"]


def test_seeded_attack_is_deterministic(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    mock, target = digits
    rng, threads = torch.random.get_rng_state(), torch.get_num_threads()
    a = inversion_attack(lambda x: x[:, :, ::2].flatten(1), mock, target, epochs=5, seed=3, augment=200)
    b = inversion_attack(lambda x: x[:, :, ::2].flatten(1), mock, target, epochs=5, seed=3, augment=200)
    c = inversion_attack(lambda x: x[:, :, ::2].flatten(1), mock, target, epochs=5, seed=4, augment=200)
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
    for bad in ({"epochs": 0}, {"lr": -1.0}, {"val_fraction": 1.0}, {"hidden": 0}, {"num_threads": 0},
                {"augment": -1}, {"patience": 0}, {"budget_s": 0.0}, {"epochs": True}):
        with pytest.raises(ConfigError):
            inversion_attack(identity, mock, target, **bad)  # type: ignore[arg-type]
