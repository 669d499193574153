"""Helpers both parties of the encrypted layer use: message kinds, masks, checks."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from syft_split.errors import CiphertextError, NonFiniteError, ShapeError

__all__ = ["combine_shares"]

ENC_INPUT, MASKED_OUTPUT, OUTPUT_RETURN = "enc_input", "masked_output", "output_return"
MASKED_GRAD, GRAD_RETURN = "masked_grad", "grad_return"


def combine_shares(server_share: torch.Tensor, client_share: torch.Tensor) -> torch.Tensor:
    """The true level-B weight ``W = W_s + A`` (the layer's weight shape); tests only."""
    if server_share.shape != client_share.shape:
        raise ShapeError(
            f"shares: expected equal shapes, got {tuple(server_share.shape)} "
            f"and {tuple(client_share.shape)}"
        )
    return server_share.to(torch.float64) + client_share.to(torch.float64)


def as_array(t: Any, what: str) -> np.ndarray:
    """float64 numpy copy of a tensor/array; refuses other types and non-finite values."""
    if isinstance(t, torch.Tensor):
        a = t.detach().cpu().to(torch.float64).numpy()
    elif isinstance(t, np.ndarray):
        a = t.astype(np.float64)
    else:
        raise ShapeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if not np.isfinite(a).all():
        raise NonFiniteError(f"{what}: contains NaN or Inf")
    return a


class Random:
    """Uniform masks from the OS CSPRNG (or a seeded numpy generator, for tests)."""

    def __init__(self, seed: int | None) -> None:
        self._rng = None if seed is None else np.random.default_rng(seed)

    def uniform(self, shape: tuple[int, ...], bound: float) -> np.ndarray:
        """Real values uniform in ``±bound``."""
        n = int(np.prod(shape))
        if self._rng is not None:
            u = self._rng.random(n)
        else:
            u = (np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)) * 2.0**-53
        return ((2.0 * u - 1.0) * bound).reshape(shape)

    def complex_uniform(self, shape: tuple[int, ...], bound: float) -> np.ndarray | None:
        """Complex values, real and imaginary parts uniform in ``±bound`` (None if empty)."""
        if int(np.prod(shape)) == 0:
            return None
        return self.uniform(shape, bound) + 1j * self.uniform(shape, bound)


def flood(a: np.ndarray, bits: int, rnd: Random) -> np.ndarray:
    """Noise ±2^-bits, then round to that grid: what a decryption leaks is coarsened."""
    q = 2.0**-bits
    return np.round((a + rnd.uniform(a.shape, q)) / q) * q


def check_ctx(head: dict[str, Any], cid: str, what: str) -> None:
    """Refuse messages bound to another public context (another key owner or run)."""
    if head.get("ctx") != cid:
        raise CiphertextError(
            f"{what}: message belongs to CKKS context {head.get('ctx')!r}, expected {cid!r} "
            "(ciphertexts from another key owner or run)"
        )
