"""Defences against leakage through the cut layer and the labels. Pure torch, no transport.

* :func:`distance_correlation` and :class:`NoPeekLoss` — NoPeek (Vepakomma et al., 2019):
  add ``weight · dCor(raw inputs, cut activations)`` to the data owner's loss so the
  activations carry less of the raw input.
* :func:`gaussian_noise` — additive Gaussian noise on activations before they leave.
* :func:`randomized_response` — label differential privacy: each label is kept with
  probability ``e^ε / (e^ε + K - 1)`` and otherwise replaced by one of the other ``K - 1``
  classes uniformly; this is ε-label-DP per record (Warner 1965; Ghazi et al., 2021).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from .errors import ConfigError, NonFiniteError, ShapeError, ValidationError

__all__ = [
    "distance_correlation",
    "NoPeekLoss",
    "gaussian_noise",
    "randomized_response",
    "fixed_randomized_response",
    "keep_probability",
    "flip_probability",
]


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValidationError(f"Expected argument `{name}` to be a torch.Tensor but got {type(t).__name__}")
    if t.dim() < 1:
        raise ShapeError(f"Expected `{name}` with a batch dimension but got a scalar")
    if t.dtype.is_complex:
        raise ValidationError(f"Expected `{name}` to be real but got dtype {t.dtype}")
    return t.reshape(t.shape[0], -1).to(torch.float64)


def _safe_sqrt(t: torch.Tensor) -> torch.Tensor:
    """sqrt with value and gradient 0 where ``t <= 0`` (no inf/NaN gradients)."""
    pos = t > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, t, torch.ones_like(t))), torch.zeros_like(t))


def _centred_distances(x: torch.Tensor, unbiased: bool) -> torch.Tensor:
    n = x.shape[0]
    sq = (x * x).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    d = _safe_sqrt(d2.masked_fill(eye, 0.0))
    if not unbiased:  # double centring
        return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()
    # U-centring (Székely & Rizzo, 2014), zero diagonal
    u = (d - d.sum(dim=0, keepdim=True) / (n - 2) - d.sum(dim=1, keepdim=True) / (n - 2)
         + d.sum() / ((n - 1) * (n - 2)))
    return u.masked_fill(eye, 0.0)


def distance_correlation(x: torch.Tensor, z: torch.Tensor, *, unbiased: bool = False) -> torch.Tensor:
    """Sample distance correlation (Székely, Rizzo & Bakirov, 2007) between two batches.

    Rows are samples; every other dimension is flattened, so ``x`` of shape ``(n, 1, 8, 8)``
    and ``z`` of shape ``(n, 16, 4, 4)`` are fine. Returns a differentiable scalar in
    ``[0, 1]`` (dtype of ``z`` if floating, else float32): ``1`` when ``z`` is a similarity
    (e.g. linear and invertible) of ``x``; near ``0`` for independent batches (the
    V-statistic is biased upwards for small ``n``). It is ``0`` if either batch is constant.
    Computed in float64 with gradients that stay finite at zero distances.

    Raises:
        ShapeError: row counts differ, or fewer than two rows.
        NonFiniteError: NaN or Inf in an input.
    """
    xs, zs = _rows(x, "x"), _rows(z, "z")
    if xs.shape[0] != zs.shape[0]:
        raise ShapeError(
            f"Expected `x` and `z` with the same number of rows but got {xs.shape[0]} and {zs.shape[0]}"
        )
    need = 4 if unbiased else 2
    if xs.shape[0] < need:
        raise ShapeError(f"Expected a batch of at least {need} rows for distance correlation "
                         f"(unbiased={unbiased}) but got {xs.shape[0]}")
    for name, t in (("x", xs), ("z", zs)):
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"Expected `{name}` to be finite but it contains NaN or Inf")
    a, b = _centred_distances(xs, unbiased), _centred_distances(zs, unbiased)
    dcov2 = (a * b).mean()
    dvar2 = (a * a).mean() * (b * b).mean()
    denom = _safe_sqrt(dvar2)
    ok = denom > 1e-300
    ratio = torch.where(ok, dcov2 / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(dcov2))
    out = _safe_sqrt(ratio.clamp(0.0, 1.0))
    dtype = z.dtype if z.dtype.is_floating_point else torch.float32
    return out.to(dtype)


class NoPeekLoss:
    """NoPeek regulariser: ``loss(inputs, activations) = weight · dCor(inputs, activations)``.

    Add it to the task loss on the data owner's side, where both the raw inputs and the
    cut activations are at hand::

        nopeek = NoPeekLoss(0.5)
        loss = F.cross_entropy(logits, y) + nopeek(x, activations)
    """

    def __init__(self, weight: float) -> None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
            math.isfinite(weight) and weight >= 0
        ):
            raise ConfigError(f"Expected argument `weight` to be a finite float >= 0 but got {weight!r}")
        self.weight = float(weight)

    def __call__(self, inputs: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        """``weight · distance_correlation(inputs, activations)``, differentiable in both."""
        return self.weight * distance_correlation(inputs, activations)

    def __repr__(self) -> str:
        return f"NoPeekLoss(weight={self.weight})"


def gaussian_noise(act: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``act + N(0, sigma²)`` elementwise; gradients pass through unchanged.

    Args:
        act: floating-point activations.
        sigma: noise standard deviation, finite and ``>= 0`` (``0`` returns ``act``).
        generator: a seeded :class:`torch.Generator` for reproducible noise (on ``act``'s device).
    """
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (
        math.isfinite(sigma) and sigma >= 0
    ):
        raise ConfigError(f"Expected argument `sigma` to be a finite float >= 0 but got {sigma!r}")
    if not isinstance(act, torch.Tensor) or not act.dtype.is_floating_point:
        got = act.dtype if isinstance(act, torch.Tensor) else type(act).__name__
        raise ValidationError(f"Expected `act` to be a floating-point tensor but got {got}")
    if sigma == 0:
        return act
    noise = torch.randn(act.shape, generator=generator, dtype=act.dtype, device=act.device)
    return act + sigma * noise


def _check_rr(num_classes: int, epsilon: float) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"Expected argument `num_classes` to be an int >= 2 but got {num_classes!r}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (
        math.isfinite(epsilon) and epsilon > 0
    ):
        raise ConfigError(f"Expected argument `epsilon` to be a finite float > 0 but got {epsilon!r}")


def keep_probability(num_classes: int, epsilon: float) -> float:
    """Probability that randomized response keeps the true label: ``e^ε / (e^ε + K - 1)``."""
    _check_rr(num_classes, epsilon)
    return 1.0 / (1.0 + (num_classes - 1) * math.exp(-epsilon))


def flip_probability(num_classes: int, epsilon: float) -> float:
    """Probability that randomized response changes the label: ``(K - 1) / (e^ε + K - 1)``.

    Each particular wrong class is reported with probability ``1 / (e^ε + K - 1)``.
    """
    _check_rr(num_classes, epsilon)
    t = (num_classes - 1) * math.exp(-epsilon)
    return t / (1.0 + t)


def randomized_response(labels: torch.Tensor, num_classes: int, epsilon: float,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """ε-label-DP labels by K-ary randomized response.

    Each label is kept with probability :func:`keep_probability`, otherwise replaced by a
    class drawn uniformly from the other ``K - 1``. Returns a new int64 tensor of the same
    shape; ``labels`` is not modified.

    Raises:
        ConfigError: ``num_classes < 2`` or ``epsilon`` not a finite float > 0.
        ValidationError: labels not integer, or outside ``[0, num_classes)``.
    """
    _check_rr(num_classes, epsilon)
    labels = _checked_labels(labels, num_classes)
    keep = torch.rand(labels.shape, generator=generator, device=labels.device) >= flip_probability(
        num_classes, epsilon
    )
    other = torch.randint(0, num_classes - 1, labels.shape, generator=generator, device=labels.device)
    return _respond(labels, keep, other)


def _checked_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``labels`` as int64, refused if not integer or outside ``[0, num_classes)``."""
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValidationError(f"Expected `labels` to be an integer tensor but got {got}")
    labels = labels.to(torch.int64)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValidationError(  # no label value in the message: it may leave the data owner
            f"Expected labels in [0, {num_classes}); some are outside it")
    return labels


def _respond(labels: torch.Tensor, keep: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Each label kept where ``keep``, else the ``other`` class (drawn from the K - 1 others:
    ``other`` in ``[0, K - 1)`` skips the label's own class)."""
    return torch.where(keep, labels, other + (other >= labels).to(torch.int64))


def fixed_randomized_response(labels: torch.Tensor, records: Sequence[str], num_classes: int,
                              epsilon: float, key: bytes) -> torch.Tensor:
    """:func:`randomized_response` with each record's randomness fixed: drawn from
    BLAKE2b keyed with ``key`` (secret, at least 16 bytes) over the record's name in
    ``records`` (one per label, e.g. ``"dataset/index"``). The same record under the same key
    always gives the same noisy label, so a record released any number of times is one
    ε-label-DP release; the draws of different records (or keys) are independent.

    Raises:
        ConfigError: as :func:`randomized_response`; a key shorter than 16 bytes.
        ValidationError: as :func:`randomized_response`; ``records`` not one per label.
    """
    _check_rr(num_classes, epsilon)
    if not isinstance(key, bytes) or not 16 <= len(key) <= 64:
        raise ConfigError("Expected argument `key` to be 16..64 secret bytes")
    labels = _checked_labels(labels, num_classes)
    if labels.dim() != 1:
        raise ValidationError("Expected `labels` to be a 1-d integer tensor")
    if len(records) != labels.shape[0]:
        raise ValidationError(f"Expected one record name per label ({labels.shape[0]}), got "
                              f"{len(records)}")
    flip = flip_probability(num_classes, epsilon)
    u, r = [], []
    for name in records:
        d = hashlib.blake2b(str(name).encode(), key=key, digest_size=16).digest()
        u.append(int.from_bytes(d[:8], "big") / 2.0**64)  # uniform in [0, 1)
        r.append(int.from_bytes(d[8:], "big") % (num_classes - 1))  # bias < 2^-60
    return _respond(labels, torch.tensor(u, dtype=torch.float64) >= flip,
                    torch.tensor(r, dtype=torch.int64))
