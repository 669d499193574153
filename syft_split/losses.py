"""Losses a label-holding party may compute, by name (the names travel in plans and proposals)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "count_correct"]

#: loss name -> function(logits, labels, reduction="mean")
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "bce_with_logits": F.binary_cross_entropy_with_logits,
}


def count_correct(out: torch.Tensor, y: torch.Tensor) -> int:
    """Correct argmax predictions of ``out`` (N, C) for class labels ``y`` (N,); 0 for other
    shapes (regression, multi-label)."""
    if out.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
        return int((out.argmax(1) == y).sum())
    return 0
