"""Splitting: composed segments equal the original model exactly; bad cuts explain themselves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from syft_split import SplitError, compose, cut_points, split_model
from syft_split.models import digits_cnn


class NamedCNN(nn.Module):
    """A module with named children and functional ops in forward (split via torch.fx)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.pool2 = nn.MaxPool2d(2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.pool2(torch.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.c(self.b(h) + h)


@pytest.mark.parametrize(
    "make, cuts, shape",
    [
        (digits_cnn, ["pool1"], (7, 1, 8, 8)),
        (digits_cnn, ["pool1", "relu3"], (7, 1, 8, 8)),
        (NamedCNN, ["pool1"], (5, 1, 8, 8)),
        (NamedCNN, ["pool1", "pool2"], (5, 1, 8, 8)),
        (Residual, ["a"], (3, 4)),
    ],
)
def test_composed_segments_equal_original_exactly(make, cuts, shape) -> None:
    torch.manual_seed(0)
    model = make()
    segments = split_model(model, cuts)
    assert len(segments) == len(cuts) + 1
    for _ in range(3):
        x = torch.randn(shape)
        assert torch.equal(compose(segments)(x), model(x))


def test_segments_are_copies_of_the_weights() -> None:
    model = digits_cnn()
    first = split_model(model, "pool1")[0]
    with torch.no_grad():
        first[0].weight.add_(1.0)
    assert not torch.equal(first[0].weight, model.conv1.weight)


def test_fx_segments_become_plain_sequentials() -> None:
    segments = split_model(NamedCNN(), ["pool1"])
    assert all(isinstance(s, nn.Sequential) for s in segments)
    assert [type(m).__name__ for m in segments[0]] == ["Conv2d", "ReLU", "MaxPool2d"]


def test_cut_points_lists_layers() -> None:
    assert cut_points(digits_cnn())[:3] == ["conv1", "relu1", "pool1"]
    assert "fc2" not in cut_points(digits_cnn())  # the last layer is not a cut
    assert cut_points(NamedCNN()) == ["conv1", "relu", "pool1", "conv2", "relu_1", "pool2",
                                      "flatten"]


@pytest.mark.parametrize(
    "make, cut, reason",
    [
        (digits_cnn, "pool9", "no such layer"),
        (digits_cnn, "fc2", "last layer"),
        (NamedCNN, "conv3", "no such layer"),
        (Residual, "b", "skip connection"),
    ],
)
def test_bad_cut_lists_valid_names(make, cut, reason) -> None:
    model = make()
    with pytest.raises(SplitError) as err:
        split_model(model, cut)
    assert reason in str(err.value)
    for name in cut_points(model):
        assert repr(name) in str(err.value)


def test_cuts_out_of_order_rejected() -> None:
    with pytest.raises(SplitError, match="forward order"):
        split_model(digits_cnn(), ["pool2", "pool1"])
    with pytest.raises(SplitError, match="forward order"):
        split_model(NamedCNN(), ["pool2", "pool1"])
