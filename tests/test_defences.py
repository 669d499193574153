"""Defences: distance correlation / NoPeek, activation noise, label DP by randomized response."""

from __future__ import annotations

import math

import pytest
import torch

from syft_split import defences
from syft_split.defences import (
    NoPeekLoss,
    distance_correlation,
    fixed_randomized_response,
    flip_probability,
    gaussian_noise,
    keep_probability,
    randomized_response,
)
from syft_split.errors import ConfigError, NonFiniteError, ShapeError, ValidationError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_all_is_pinned() -> None:
    assert set(defences.__all__) == {
        "distance_correlation", "NoPeekLoss", "gaussian_noise", "randomized_response",
        "keep_probability", "flip_probability", "fixed_randomized_response",
    }


@pytest.mark.parametrize("unbiased", [False, True])
def test_dcor_is_one_for_similarities(unbiased: bool) -> None:
    x = torch.randn(64, 1, 8, 8, generator=_gen())
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=_gen(1)))
    assert distance_correlation(x, x, unbiased=unbiased).item() == pytest.approx(1.0, abs=1e-6)
    assert distance_correlation(x, -3.0 * x + 2.0, unbiased=unbiased).item() == pytest.approx(1.0, abs=1e-6)
    rotated = (x.flatten(1) @ q).reshape(64, 4, 16)  # other shape, same distances
    assert distance_correlation(x, 0.5 * rotated, unbiased=unbiased).item() == pytest.approx(1.0, abs=1e-5)


def test_dcor_of_independent_noise_is_small() -> None:
    g = _gen(2)
    x, z = torch.randn(500, 2, generator=g), torch.randn(500, 3, generator=g)
    assert distance_correlation(x, z).item() < 0.15
    # high-dimensional small batch: the V-statistic drifts up, the bias-corrected one does not
    x, z = torch.randn(64, 64, generator=g), torch.randn(64, 256, generator=g)
    assert distance_correlation(x, z, unbiased=True).item() < 0.2
    dep = x[:, :32] + 0.1 * torch.randn(64, 32, generator=g)
    assert distance_correlation(x, dep, unbiased=True).item() > 0.5


def test_dcor_edge_cases() -> None:
    x = torch.randn(2, 3, generator=_gen())
    assert distance_correlation(x, 2 * x).item() == pytest.approx(1.0)  # batch of 2 works
    assert distance_correlation(x, torch.ones(2, 4)).item() == 0.0  # constant: 0, not NaN
    with pytest.raises(ShapeError, match="at least 2"):
        distance_correlation(x[:1], x[:1])
    with pytest.raises(ShapeError, match="at least 4"):
        distance_correlation(x, x, unbiased=True)
    with pytest.raises(ShapeError, match="same number of rows"):
        distance_correlation(x, torch.randn(3, 3))
    with pytest.raises(NonFiniteError):
        distance_correlation(x, torch.tensor([[1.0], [math.nan]]))
    assert distance_correlation(x.double(), x.double()).dtype == torch.float64
    assert distance_correlation(x, x).dtype == torch.float32


def test_gradient_flows_and_stays_finite() -> None:
    x = torch.randn(16, 1, 8, 8, generator=_gen())
    x = torch.cat([x, x[:3]]).requires_grad_(True)  # duplicate rows: zero distances
    layer = torch.nn.Linear(64, 8)
    nopeek = NoPeekLoss(0.5)
    loss = nopeek(x, layer(x.flatten(1)))
    assert loss.item() == pytest.approx(0.5 * distance_correlation(x, layer(x.flatten(1))).item())
    loss.backward()
    for grad in (x.grad, layer.weight.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # minimising NoPeek alone lowers the dependence
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    before = distance_correlation(x, layer(x.flatten(1))).item()
    for _ in range(20):
        opt.zero_grad()
        nopeek(x.detach(), layer(x.detach().flatten(1))).backward()
        opt.step()
    assert distance_correlation(x, layer(x.flatten(1))).item() < before


@pytest.mark.parametrize("weight", [-1.0, math.nan, math.inf, True, "1"])
def test_nopeek_weight_validated(weight: object) -> None:
    with pytest.raises(ConfigError, match="weight"):
        NoPeekLoss(weight)  # type: ignore[arg-type]


def test_gaussian_noise() -> None:
    act = torch.zeros(200, 50, requires_grad=True)
    a, b = gaussian_noise(act, 0.3, _gen(5)), gaussian_noise(act, 0.3, _gen(5))
    assert torch.equal(a, b)
    assert a.std().item() == pytest.approx(0.3, rel=0.05)
    a.sum().backward()
    assert act.grad is not None and torch.equal(act.grad, torch.ones_like(act))
    assert gaussian_noise(act, 0.0) is act
    for sigma in (-0.1, math.nan, math.inf):
        with pytest.raises(ConfigError, match="sigma"):
            gaussian_noise(act, sigma)
    with pytest.raises(ValidationError):
        gaussian_noise(torch.zeros(3, dtype=torch.int64), 1.0)


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 3.0])
def test_randomized_response_keep_rate_matches_theory(epsilon: float) -> None:
    k, n = 10, 40_000
    labels = torch.randint(0, k, (n,), generator=_gen(7))
    noisy = randomized_response(labels, k, epsilon, _gen(8))
    p = math.exp(epsilon) / (math.exp(epsilon) + k - 1)
    assert keep_probability(k, epsilon) == pytest.approx(p)
    assert flip_probability(k, epsilon) == pytest.approx(1 - p)
    kept = (noisy == labels).double().mean().item()
    assert abs(kept - p) < 4 * math.sqrt(p * (1 - p) / n)
    # a flipped label is uniform over the other K-1 classes
    offsets = (noisy - labels)[noisy != labels] % k  # 1..K-1
    counts = torch.bincount(offsets, minlength=k)[1:].double()
    assert counts.min() > 0.85 * counts.mean()
    assert noisy.dtype == torch.int64 and noisy.min() >= 0 and noisy.max() < k


def test_randomized_response_binary_and_reproducible() -> None:
    assert keep_probability(2, math.log(3)) == pytest.approx(0.75)
    labels = torch.tensor([0, 1, 1, 0] * 50)
    first, again = (randomized_response(labels, 2, 1.0, _gen(1)) for _ in range(2))
    assert torch.equal(first, again)
    assert flip_probability(10, 1e4) == 0.0  # no overflow for a huge epsilon


@pytest.mark.parametrize("epsilon", [0, -1.0, math.nan, math.inf, True])
def test_epsilon_validated(epsilon: object) -> None:
    with pytest.raises(ConfigError, match="epsilon"):
        randomized_response(torch.tensor([0, 1]), 2, epsilon)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="epsilon"):
        flip_probability(2, epsilon)  # type: ignore[arg-type]


def test_labels_validated() -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        randomized_response(torch.tensor([0]), 1, 1.0)
    with pytest.raises(ValidationError, match=r"\[0, 3\)"):
        randomized_response(torch.tensor([0, 3]), 3, 1.0)
    with pytest.raises(ValidationError, match="integer"):
        randomized_response(torch.tensor([0.0, 1.0]), 3, 1.0)


def test_fixed_randomized_response_draws_each_record_once() -> None:
    y = torch.randint(0, 10, (4000,), generator=torch.Generator().manual_seed(0))
    names = [f"train/{i}" for i in range(4000)]
    key = bytes(range(32))
    a = fixed_randomized_response(y, names, 10, 1.0, key)
    assert torch.equal(a, fixed_randomized_response(y, names, 10, 1.0, key))  # same draw
    assert torch.equal(a[7:9], fixed_randomized_response(y[7:9], names[7:9], 10, 1.0, key))
    assert abs(float((a != y).float().mean()) - flip_probability(10, 1.0)) < 0.03
    assert int(a.min()) >= 0 and int(a.max()) < 10
    other = fixed_randomized_response(y, names, 10, 1.0, bytes(32))  # another key
    assert float((other != a).float().mean()) > 0.5
    with pytest.raises(ConfigError):
        fixed_randomized_response(y, names, 10, 1.0, b"short")
    with pytest.raises(ValidationError):
        fixed_randomized_response(y, names[:-1], 10, 1.0, key)
