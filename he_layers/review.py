"""What an encryption agreement costs in traffic, for the data owner's review (no keys needed).

:func:`estimate_step_bytes` reads the agreement the model owner proposes (the dict of
``syft_split.he.EncryptedLayer.agreement()``: ``batch_size, d_in, d_out, level, lr, bias``,
``params`` for :class:`CKKSParams`, ``options`` for :class:`LayerSpec`) and states the bytes
that leave the data owner per step, ciphertexts and masked plaintext values apart. SEAL
compresses ciphertexts, so sizes are estimates (within ~5% of the measured messages).
"""

from __future__ import annotations

import json
import math
from typing import Any

from syft_split.errors import ConfigError

from .packing import Layout
from .params import CKKSParams
from .spec import LayerSpec

__all__ = ["estimate_step_bytes", "spec_from_agreement"]

_FRAME = 256  # JSON header of one message (approx.)


#: the fields of an encryption agreement (``layer`` and ``optimizer``: what the model owner
#: says runs encrypted and trains it, for the review); the host stores what it approved
AGREEMENT_KEYS = frozenset({"level", "lr", "batch_size", "d_in", "d_out", "bias", "params",
                            "options", "layer", "optimizer"})
#: the most JSON an agreement may take (the host keeps it with the proposal, in its state)
MAX_AGREEMENT_CHARS = 16384


def spec_from_agreement(agreement: dict[str, Any]) -> tuple[LayerSpec, CKKSParams]:
    """The (validated) :class:`LayerSpec` and :class:`CKKSParams` an agreement describes,
    built exactly as the data owner's host builds its keys."""
    if not isinstance(agreement, dict) or set(agreement) - AGREEMENT_KEYS:
        extra = sorted(set(agreement) - AGREEMENT_KEYS) if isinstance(agreement, dict) else None
        raise ConfigError(f"an encryption agreement is a dict of {sorted(AGREEMENT_KEYS)}; "
                          f"unknown: {extra}")
    size = len(json.dumps(agreement, default=str))
    if size > MAX_AGREEMENT_CHARS:
        raise ConfigError(f"the encryption agreement takes {size} characters of JSON; at most "
                          f"{MAX_AGREEMENT_CHARS}")
    try:
        spec = LayerSpec(batch_size=agreement["batch_size"], d_in=agreement["d_in"],
                         d_out=agreement["d_out"], level=agreement["level"],
                         lr=agreement.get("lr"), bias=agreement.get("bias", True),
                         **agreement.get("options", {}))
        params = CKKSParams(**agreement.get("params", {}))
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"bad encryption agreement {agreement}: {exc}") from exc
    try:
        params.validate()
        return spec.validate(params), params
    except (TypeError, ValueError) as exc:  # a field of the wrong type the checks missed
        raise ConfigError(f"bad encryption agreement {agreement}: {exc}") from exc


def _input_ct(params: CKKSParams) -> int:
    """A fresh seeded symmetric ciphertext at the top data level (one polynomial + seed)."""
    n, bits = params.poly_modulus_degree, params.coeff_mod_bit_sizes[:-1]
    return min(n * len(bits) * 8, math.ceil(n * sum(bits) / 8 * 1.15)) + 192


def _output_ct(params: CKKSParams, rescaled: bool = True) -> int:
    """A result ciphertext: two polynomials modulo q0 (rescaled) or q0*q1 (weight gradient)."""
    n, bits = params.poly_modulus_degree, params.coeff_mod_bit_sizes[:-1]
    if rescaled:
        return 2 * n * 8 + 128
    return min(2 * n * len(bits) * 8, math.ceil(2 * n * sum(bits) / 8 * 1.15)) + 128


def _galois_key(params: CKKSParams) -> int:
    n, bits = params.poly_modulus_degree, params.coeff_mod_bit_sizes
    return math.ceil((len(bits) - 1) * n * sum(bits) / 8 * 1.12)


def estimate_step_bytes(agreement: dict[str, Any]) -> dict[str, int]:
    """Bytes per step for an encryption agreement, from the data owner's side.

    Returns (ints): ``ciphertexts_up``, ``ciphertext_bytes_up``, ``plain_bytes_up`` (the
    masked, rounded values returned in plain), ``bytes_up`` (everything that leaves the
    data owner in a training step); the same ``*_down`` for what arrives; ``bytes_up_eval``
    / ``bytes_down_eval`` for an evaluation (forward-only) step; ``public_context_bytes``
    and ``rotation_keys`` (sent once per run); ``plain_split_bytes_up`` (the float32
    activation plain split learning would send instead) for comparison.

    Raises:
        ConfigError: the agreement does not describe a valid layer.
    """
    spec, params = spec_from_agreement(agreement)
    lay: dict[str, Layout] = spec.layouts(params)
    ct_in, ct_out = _input_ct(params), _output_ct(params)
    rows, b = spec.rows, spec.batch_size
    n_up = lay["forward"].n_inputs + lay["grad"].n_inputs
    n_down = lay["forward"].n_outputs + lay["grad"].n_outputs
    down = (lay["forward"].n_outputs * ct_out
            + lay["grad"].n_outputs * _output_ct(params, rescaled=False))
    if spec.level == "B":
        n_up += lay["input_grad"].n_inputs
        n_down += lay["input_grad"].n_outputs
        down += lay["input_grad"].n_outputs * ct_out
    plain_up = 8 * (rows * spec.mat_out + spec.mat_in * spec.mat_out) + 2 * _FRAME
    plain_down = 8 * b * spec.d_in if spec.level == "A" else 0
    eval_up = lay["forward"].n_inputs * ct_in + 8 * rows * spec.mat_out + 2 * _FRAME
    out = {
        "ciphertexts_up": n_up,
        "ciphertext_bytes_up": n_up * ct_in + _FRAME,
        "plain_bytes_up": plain_up,
        "ciphertexts_down": n_down,
        "ciphertext_bytes_down": down + 2 * _FRAME,
        "plain_bytes_down": plain_down,
        "bytes_up_eval": eval_up,
        "bytes_down_eval": lay["forward"].n_outputs * ct_out + _FRAME,
        "rotation_keys": len(spec.rotation_steps(params)),
        "plain_split_bytes_up": 4 * b * spec.d_in,
    }
    out["bytes_up"] = out["ciphertext_bytes_up"] + plain_up
    out["bytes_down"] = out["ciphertext_bytes_down"] + plain_down
    out["public_context_bytes"] = out["rotation_keys"] * _galois_key(params) + 4096
    return out
