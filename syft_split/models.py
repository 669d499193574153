"""Reference models used by the demo, tests, tutorials and benchmarks."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["digits_cnn"]


def digits_cnn(channels: int = 16, hidden: int = 64, classes: int = 10) -> nn.Sequential:
    """A small CNN for 1x8x8 inputs with named layers (cut at ``"pool1"`` for the demo)."""
    c2 = 2 * channels
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, channels, 3, padding=1)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(channels, c2, 3, padding=1)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(c2 * 4, hidden)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(hidden, classes)),
    ]))
