"""Segments whose output depends on the module's mode: measure what training releases.

A segment with a batch-statistics layer (BatchNorm, or InstanceNorm, tracking running
statistics) or a Dropout layer computes something else in eval mode than in the training
forwards whose output leaves. The running statistics come with the model owner's proposed
weights: ``BatchNorm1d`` with ``running_mean = 1000`` and ``bias = 10`` followed by a ReLU
outputs zeros in eval mode and ``x̂ + 10`` (every input value, up to a per-batch affine map)
in training. Measuring eval mode alone would show no leakage at all.

:func:`mode_dependent` names such layers (by module type); :class:`TrainView` is the segment
as training runs it: a deep copy in train mode (the real segment's running statistics and
mode are untouched), on batches of at most ``batch`` rows (what a training forward may see),
without gradients, the global RNG left as found. The suite and the watch measure both modes
of such a segment and report the worse.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..modes import mode_dependent
from .metrics import forward

__all__ = ["mode_dependent", "TrainView", "worse_of"]


class TrainView:
    """``module`` as a training forward runs it (see the module docstring).

    Args:
        module: the segment; it is deep-copied once, its own state is never changed.
        batch: rows per forward (the batch statistics of a training step cover at most the
            proposal's ``max_batch`` records); ``None``: all rows at once.
    """

    def __init__(self, module: nn.Module, batch: int | None) -> None:
        self.module = copy.deepcopy(module).train()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.batch = batch

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # Dropout's masks: seeded, the caller's RNG untouched
            return forward(self.module, x, self.batch)


def worse_of(eval_fig: dict[str, Any], train_fig: dict[str, Any]) -> dict[str, Any]:
    """The watch's figures, the worse of two modes per figure: the lower inversion ratio,
    the higher SSIM and dCor."""
    out = dict(eval_fig)

    def pick(key: str, better_low: bool) -> None:
        a, b = eval_fig.get(key), train_fig.get(key)
        if not isinstance(b, float) or b != b:
            return
        if not isinstance(a, float) or a != a or (b < a if better_low else b > a):
            out[key] = b

    pick("inversion_ratio", True)
    pick("ssim", False)
    pick("dcor", False)
    return out
