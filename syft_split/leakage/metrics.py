"""Leakage figures: distance correlation, MSE ratio and SSIM. Pure torch, no transport.

* :func:`dcor_leakage` — distance correlation between raw inputs and what leaves.
* :func:`mse_ratio` — reconstruction MSE over the MSE of predicting the attacker's prior
  mean (``1``: no better than guessing the mean; ``0``: exact reconstruction).
* :func:`ssim` — structural similarity (Wang, Bovik, Sheikh & Simoncelli, "Image quality
  assessment: from error visibility to structural similarity", IEEE TIP 13(4), 2004, eq. 13)
  for image-shaped records.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..defences import distance_correlation
from ..errors import ConfigError, NonFiniteError, ShapeError, ValidationError

__all__ = ["dcor_leakage", "mse_ratio", "ssim", "is_image_shape", "as_rows", "encode", "forward",
           "row_chunks"]


def dcor_leakage(raw: torch.Tensor, activations: torch.Tensor, *, unbiased: bool = True) -> float:
    """Distance correlation between raw inputs and their cut activations, as a float.

    ``1`` means the activations are a similarity (e.g. invertible linear map) of the inputs;
    ``≈ 0`` means no dependence is detectable on this batch. With ``unbiased=True`` (default)
    the bias-corrected estimator (Székely & Rizzo, 2014) is used and the batch needs
    ≥ 4 rows; ``unbiased=False`` gives the classic V-statistic used by NoPeek, which drifts
    towards 1 for small batches of high-dimensional data. No gradients are recorded.
    """
    with torch.no_grad():
        return float(distance_correlation(raw.detach(), activations.detach(), unbiased=unbiased))


def mse_ratio(pred: torch.Tensor, target: torch.Tensor, prior_mean: torch.Tensor) -> dict[str, float]:
    """``mse(pred, target) / mse(prior_mean, target)`` and both MSEs (mean over all elements).

    ``prior_mean`` is what an attacker guesses without the activations (the mock mean), one
    record's shape. The ratio is NaN when the baseline is 0.
    """
    pred, target = pred.detach().float(), target.detach().float()
    if pred.shape != target.shape:
        raise ShapeError(f"Expected `pred` of shape {tuple(target.shape)} but got {tuple(pred.shape)}")
    mse = float(((pred - target) ** 2).mean())
    base = float(((prior_mean.detach().float().reshape(1, *target.shape[1:]) - target) ** 2).mean())
    return {"mse": mse, "baseline_mse": base, "ratio": mse / base if base > 0 else math.nan}


def is_image_shape(shape: tuple[int, ...] | torch.Size) -> bool:
    """Whether records of this shape (without the batch) are images SSIM applies to:
    ``(C, H, W)`` with ``C <= 4`` and ``H, W >= 3``."""
    return len(shape) == 3 and shape[0] <= 4 and shape[1] >= 3 and shape[2] >= 3


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    ax = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-record SSIM of two image batches ``(N, C, H, W)``, a tensor of ``N`` values.

    Wang et al. (2004), eq. 13, with local statistics under a Gaussian window::

        SSIM(x, y) = (2 μx μy + C1)(2 sigmaxy + C2) / ((μx² + μy² + C1)(sigmax² + sigmay² + C2)),
        C1 = (k1 L)², C2 = (k2 L)², L = data_range,

    averaged over the window positions that fit in the image ("valid") and over channels.
    The window is ``window`` wide (11, sigma = 1.5, as in the paper and torchmetrics), shrunk to
    the largest odd size that fits (7 for 8x8 digits). Identical images score exactly 1;
    values lie in ``[-1, 1]``. Computed in float64.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValidationError("Expected `x` and `y` to be tensors")
    if x.shape != y.shape or x.dim() != 4:
        raise ShapeError(f"Expected two (N, C, H, W) batches of one shape but got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if not (isinstance(data_range, (int, float)) and math.isfinite(data_range) and data_range > 0):
        raise ConfigError(f"Expected argument `data_range` to be a finite float > 0 but got {data_range!r}")
    for name, t in (("x", x), ("y", y)):
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"Expected `{name}` to be finite but it contains NaN or Inf")
    n, c, h, w = x.shape
    size = min(window, h, w)
    size -= 1 - size % 2  # odd
    if size < 1:
        raise ShapeError(f"Expected images of at least 1x1 pixels but got {h}x{w}")
    kern = _gaussian_window(size, sigma, torch.float64).expand(c, 1, size, size)
    xd, yd = x.detach().to(torch.float64), y.detach().to(torch.float64)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kern, groups=c)

    mx, my = blur(xd), blur(yd)
    vx = blur(xd * xd) - mx * mx
    vy = blur(yd * yd) - my * my
    cxy = blur(xd * yd) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return smap.reshape(n, -1).mean(dim=1)


def as_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` as finite float32 rows ``(N, features)``, detached; clear errors otherwise."""
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValidationError(f"Expected `{name}` to be a floating-point tensor but got {got}")
    if t.dim() < 1:
        raise ShapeError(f"Expected `{name}` with a batch dimension but got a scalar")
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"Expected `{name}` to be finite but it contains NaN or Inf")
    return t.detach().reshape(t.shape[0], -1).to(torch.float32)


def row_chunks(n: int, max_batch: int | None) -> list[slice]:
    """``n`` rows in consecutive slices of at most ``max_batch`` rows, as even as possible (a
    batch-statistics layer never sees a lone last row); one slice when ``max_batch`` is
    ``None`` or at least ``n``."""
    if max_batch is None or max_batch >= n or n == 0:
        return [slice(0, n)]
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ConfigError(f"Expected argument `max_batch` to be None or an int >= 1 but got {max_batch!r}")
    k = -(-n // max_batch)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def forward(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
            max_batch: int | None) -> torch.Tensor:
    """``f(x)`` computed on at most ``max_batch`` rows at a time (no gradients), rows joined."""
    with torch.no_grad():
        parts = [f(x[s]) for s in row_chunks(x.shape[0], max_batch)]
    if len(parts) == 1:
        return parts[0]
    for z in parts:
        if not isinstance(z, torch.Tensor):
            raise ValidationError(f"Expected `encoder` to return a tensor but got {type(z).__name__}")
    return torch.cat(parts)


def encode(encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, name: str,
           max_batch: int | None = None) -> torch.Tensor:
    """``encoder(x)`` as rows, without gradients, an ``nn.Module`` in eval mode (mode restored),
    on at most ``max_batch`` rows at a time (``None``: all at once)."""
    was_training = isinstance(encoder, nn.Module) and encoder.training
    if isinstance(encoder, nn.Module):
        encoder.eval()
    try:
        z = forward(encoder, x, max_batch)
    finally:
        if was_training:
            assert isinstance(encoder, nn.Module)
            encoder.train()
    if not isinstance(z, torch.Tensor):
        raise ValidationError(f"Expected `encoder` to return a tensor but got {type(z).__name__}")
    if z.dim() < 1 or z.shape[0] != x.shape[0]:
        raise ShapeError(f"Expected `encoder({name})` with {x.shape[0]} rows but got shape {tuple(z.shape)}")
    return as_rows(z.float() if not z.dtype.is_floating_point else z, f"encoder({name})")
