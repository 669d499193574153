"""CKKS parameter sets and their validation (128-bit security, precision, headroom).

The encrypted layer spends exactly one multiplicative level, so a parameter set is
``coeff_mod_bit_sizes = (q0, q1, ..., special)``: ``q0`` bounds the decrypted values
(headroom = ``q0 - global_scale_bits`` bits), ``q1`` is the prime dropped by the single
rescale, the last prime is SEAL's special (key-switching) prime.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from syft_split.errors import InsecureParametersError

__all__ = ["CKKSParams", "MAX_COEFF_BITS_128", "MIN_SCALE_BITS", "MIN_HEADROOM_BITS"]

#: Largest total coefficient-modulus size (bits) at 128-bit classical security
#: (HomomorphicEncryption.org standard, ternary secrets; the table SEAL enforces).
MAX_COEFF_BITS_128: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}

#: Below 2^25 the CKKS rounding noise is ~1e-4 relative: useless for gradients.
MIN_SCALE_BITS = 25

#: Decrypted values (signal + mask) must stay below 2^(q0 - scale - 1).
MIN_HEADROOM_BITS = 10


@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters for one encrypted layer.

    Args:
        poly_modulus_degree: ring dimension N (slots = N/2).
        coeff_mod_bit_sizes: prime sizes ``(q0, q1, ..., special)``; at least three.
        global_scale_bits: log2 of the encoding scale of encrypted inputs.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60)
    global_scale_bits: int = 40

    @property
    def slots(self) -> int:
        """Complex slots per ciphertext (N/2)."""
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        """Encoding scale of encrypted inputs and of decrypted outputs."""
        return float(2**self.global_scale_bits)

    @property
    def headroom_bits(self) -> int:
        """log2 of the largest magnitude a decrypted value may have (plus sign bit)."""
        return self.coeff_mod_bit_sizes[0] - self.global_scale_bits

    @property
    def total_coeff_bits(self) -> int:
        """Sum of all prime sizes (what the security table bounds)."""
        return sum(self.coeff_mod_bit_sizes)

    def validate(self) -> CKKSParams:
        """Refuse parameters below 128-bit security or too imprecise; return ``self``.

        Raises:
            InsecureParametersError: with the expected and the received value.
        """
        n = self.poly_modulus_degree
        if not isinstance(n, int) or isinstance(n, bool):
            raise InsecureParametersError(
                f"poly_modulus_degree must be an int, got {type(n).__name__} {n!r}")
        if not isinstance(self.coeff_mod_bit_sizes, (tuple, list)):
            raise InsecureParametersError(
                f"coeff_mod_bit_sizes must be a sequence of ints, got {self.coeff_mod_bit_sizes!r}")
        bits = tuple(self.coeff_mod_bit_sizes)
        if any(isinstance(b, bool) for b in bits):
            raise InsecureParametersError(f"coeff_mod_bit_sizes must be ints, got {bits!r}")
        if n not in MAX_COEFF_BITS_128:
            raise InsecureParametersError(
                f"poly_modulus_degree must be one of {sorted(MAX_COEFF_BITS_128)}, got {n!r}"
            )
        if len(bits) < 3:
            raise InsecureParametersError(
                "coeff_mod_bit_sizes needs at least 3 primes (q0 for headroom, one rescale "
                f"prime, one special prime), e.g. (60, 40, 60); got {bits!r}"
            )
        if any(not isinstance(b, int) or b < 20 or b > 60 for b in bits):
            raise InsecureParametersError(
                f"every prime in coeff_mod_bit_sizes must be 20..60 bits, got {bits!r}"
            )
        limit = MAX_COEFF_BITS_128[n]
        if sum(bits) > limit:
            raise InsecureParametersError(
                f"coeff_mod_bit_sizes {bits!r} total {sum(bits)} bits: below 128-bit security "
                f"for poly_modulus_degree={n} (expected total <= {limit} bits, got {sum(bits)}); "
                "use fewer/smaller primes or a larger poly_modulus_degree"
            )
        s = self.global_scale_bits
        if not isinstance(s, int) or isinstance(s, bool) or s < MIN_SCALE_BITS:
            raise InsecureParametersError(
                f"global_scale_bits too small for training precision "
                f"(expected >= {MIN_SCALE_BITS}, got {s!r}); 2^40 is recommended"
            )
        middle = bits[1:-1]
        if any(s > b for b in middle):
            raise InsecureParametersError(
                f"global_scale_bits={s} exceeds a middle (rescale) prime of {bits!r} "
                f"(expected scale bits <= {min(middle)}, got {s})"
            )
        if bits[0] - s < MIN_HEADROOM_BITS:
            raise InsecureParametersError(
                f"first prime leaves {bits[0] - s} bits of headroom above the scale "
                f"(expected >= {MIN_HEADROOM_BITS}, got {bits[0] - s}); make q0 larger "
                "or the scale smaller, e.g. (60, 40, 60) with 2^40"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the public-context header)."""
        d = asdict(self)
        d["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CKKSParams:
        """Inverse of :meth:`to_dict` (does not validate)."""
        try:
            return cls(
                poly_modulus_degree=int(d["poly_modulus_degree"]),
                coeff_mod_bit_sizes=tuple(int(b) for b in d["coeff_mod_bit_sizes"]),
                global_scale_bits=int(d["global_scale_bits"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InsecureParametersError(f"malformed CKKS parameters {d!r}") from exc
