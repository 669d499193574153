"""Secure aggregation of segment weights among data owners: the arithmetic, nothing else.

Pairwise-mask secure aggregation in the style of Bonawitz et al. (CCS 2017), without the
dropout-recovery round (a round with a missing member aborts, and the model owner runs it again
among the others, :class:`syft_split.schedules.SecureAverage`; see SECURITY.md). Every member
``i`` of a round turns its weight vector into fixed point, scaled by its share of the averaging
weight, ``q_i = round(w_i / W * theta_i * 2^FRACTION_BITS)`` as int64, and adds one mask per
other member ``j``::

    y_i = q_i + sum_{j > i} m_ij - sum_{j < i} m_ij      (mod 2^64)

``m_ij`` is the same stream at ``i`` and ``j``: SHAKE-256 over a key derived (BLAKE2b) from
their X25519 shared secret and the round's canonical descriptor. Masks cancel in the sum, so
``sum_i y_i = sum_i q_i`` and :func:`decode` gives the weighted average; a single ``y_i`` is
uniform to anyone who lacks one of ``i``'s pairwise secrets. Only library primitives are used
(hashlib's SHAKE-256 and BLAKE2b here; the key exchange and the authenticated sealing of each
``y_i`` for its recipient are PyNaCl's, in :mod:`syft_split.host.aggregation`).

Fresh masks need a fresh descriptor: a member must never mask two different vectors under the
same descriptor (the difference would be unmasked). The host enforces strictly increasing
round numbers per segment for that reason.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, ValidationError

__all__ = [
    "FRACTION_BITS",
    "canonical",
    "flatten",
    "unflatten",
    "encode",
    "pair_mask",
    "mask",
    "total",
    "decode",
    "cohort_rule",
]

#: fixed-point fraction bits: values are exact to 2^-32 (~2.3e-10) per member.
FRACTION_BITS = 32
_SCALE = float(2**FRACTION_BITS)
_MASK_DOMAIN = b"syft-split/secagg/pair-mask/v1"


def canonical(obj: Any) -> bytes:
    """Canonical JSON bytes of ``obj`` (sorted keys, no spaces, no NaN): what masks bind to."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"not canonical JSON data: {exc}") from exc


def flatten(state: Mapping[str, torch.Tensor], keys: Sequence[str]) -> np.ndarray:
    """The tensors ``keys`` of ``state`` as one float64 vector, in that order."""
    if not keys:
        return np.zeros(0)
    return np.concatenate([state[k].detach().to(torch.float64).reshape(-1).numpy()
                           for k in keys])


def unflatten(vector: np.ndarray, like: Mapping[str, torch.Tensor], keys: Sequence[str]
              ) -> dict[str, torch.Tensor]:
    """Split ``vector`` back into tensors shaped and typed like ``like[k]`` for each of ``keys``."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for k in keys:
        ref = like[k]
        n = ref.numel()
        out[k] = torch.from_numpy(vector[offset:offset + n].copy()).reshape(ref.shape).to(ref.dtype)
        offset += n
    if offset != vector.shape[0]:
        raise ValidationError(f"vector of {vector.shape[0]} values does not fit {offset}")
    return out


def encode(vector: np.ndarray, fraction: float, members: int) -> np.ndarray:
    """``round(fraction * vector * 2^FRACTION_BITS)`` as uint64 (two's complement), refused if a
    sum over ``members`` such values could overflow int64."""
    if not (math.isfinite(fraction) and 0 <= fraction <= 1):
        raise ValidationError(f"an averaging fraction must be in [0, 1], got {fraction!r}")
    scaled = np.asarray(vector, dtype=np.float64) * (fraction * _SCALE)
    if not np.isfinite(scaled).all():
        raise ValidationError("weights to aggregate are not finite")
    limit = 2.0**62 / max(members, 1)
    if scaled.size and float(np.abs(scaled).max()) >= limit:
        raise ValidationError(f"a weight of magnitude {float(np.abs(vector).max()):.3g} is too "
                              f"large for fixed-point aggregation over {members} members "
                              f"(|w * fraction| < {limit / _SCALE:.3g})")
    return np.rint(scaled).astype(np.int64).view(np.uint64)


def pair_mask(shared_key: bytes, context: bytes, n: int) -> np.ndarray:
    """``n`` uint64 words of the mask two members derive from their shared secret."""
    if not isinstance(shared_key, bytes) or len(shared_key) < 16:
        raise ConfigError("a pairwise mask needs a shared key of at least 16 bytes")
    key = hashlib.blake2b(_MASK_DOMAIN, key=shared_key[:64], digest_size=32).digest()
    stream = hashlib.shake_256(key + context).digest(8 * n)
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def mask(q: np.ndarray, me: str, shared_keys: Mapping[str, bytes], context: bytes
         ) -> np.ndarray:
    """``q`` plus the masks of ``me`` with every other member (``shared_keys``: member name ->
    shared key); added towards members whose name sorts after ``me``, subtracted otherwise."""
    out = q.astype(np.uint64, copy=True)
    for peer, key in sorted(shared_keys.items()):
        if peer == me:
            raise ConfigError(f"{me!r} cannot mask with itself")
        pair = canonical(sorted([me, peer]))
        m = pair_mask(key, context + b"|" + pair, out.shape[0])
        if me < peer:
            out += m
        else:
            out -= m
    return out


def total(contributions: Iterable[np.ndarray]) -> np.ndarray:
    """The sum of every member's masked contribution (mod 2^64): the masks cancel."""
    acc: np.ndarray | None = None
    for y in contributions:
        acc = y.astype(np.uint64, copy=True) if acc is None else acc + y
    if acc is None:
        raise ValidationError("no contributions to sum")
    return acc


def decode(summed: np.ndarray) -> np.ndarray:
    """The float64 vector a fixed-point sum stands for."""
    return summed.view(np.int64).astype(np.float64) / _SCALE


def cohort_rule(members: int, weights: Sequence[float], least: int) -> str | None:
    """``HostLimits.min_cohort`` (``least``) on a cohort of ``members`` with these averaging
    ``weights``: why a data owner at that limit refuses it (at least ``least`` members and,
    from 3, every weight at least a tenth of the largest, so that no single peer reads its
    weights out of the average), None if it takes part. The host enforces it; the model owner
    asks it beforehand so as not to start a round a member refuses."""
    if members < least:
        return (f"averages only in cohorts of at least {least} members (HostLimits.min_cohort), "
                f"got {members}")
    if least >= 3 and min(weights) * 10 < max(weights):
        return ("needs every averaging weight to be at least a tenth of the largest "
                f"(HostLimits.min_cohort={least}: no single peer reads its weights)")
    return None

