"""What both parties agree on before a run: shapes, protection level, masks, bounds."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from syft_split.errors import ConfigError

from .packing import Layout, choose_layout
from .params import CKKSParams

__all__ = ["LayerSpec", "Level"]

Level = Literal["A", "B"]


@dataclass(frozen=True)
class LayerSpec:
    """Public agreement for one encrypted Linear layer (travels in the public context).

    Args:
        batch_size: largest number of rows per step (effective batch; for a convolution
            ``B * L_out``). Smaller batches are zero-padded to this.
        d_in: input features. d_out: output features.
        level: ``"A"`` (server learns z and dW, hides W from the data owner) or ``"B"``
            (weight additively shared, server never sees x, W or dW).
        lr: learning rate of the plain-SGD update of the weight; required for level B.
        bias: whether the server layer has a bias.
        x_bound: the data owner refuses inputs with ``|x| > x_bound``; the server uses it
            to check that values stay within the CKKS headroom.
        mask_bits: server masks are uniform in ``±2**mask_bits``.
        share_bound: level B: the data owner's share A is uniform in ``±share_bound``.
        flood_bits: decryptions returned to the server get uniform noise ``±2**-flood_bits``
            and are rounded to that grid (mitigation of IND-CPA^D key-recovery attacks).
        initial_share: level B: the data owner's first share A_0 is uniform in
            ``±initial_share`` (default 0: W_0 = the server's init, so the first forward
            uses a weight the server knows). The true initial weight is W_s(0) + A_0.
    """

    batch_size: int
    d_in: int
    d_out: int
    level: Level = "A"
    lr: float | None = None
    bias: bool = True
    x_bound: float = 64.0
    mask_bits: int = 12
    share_bound: float = 1.0
    flood_bits: int = 30
    initial_share: float = 0.0

    def validate(self, params: CKKSParams) -> LayerSpec:
        """Check the spec against ``params``; return ``self``.

        Raises:
            ConfigError: naming the argument, the expected and the received value.
        """
        for name in ("batch_size", "d_in", "d_out"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"Expected `{name}` to be a positive int but got {v!r}")
        if self.level not in ("A", "B"):
            raise ConfigError(f"Expected `level` to be 'A' or 'B' but got {self.level!r}")
        if self.level == "B" and (
            self.lr is None or not math.isfinite(self.lr) or self.lr <= 0
        ):
            raise ConfigError(
                f"Level B needs the plain-SGD learning rate `lr` > 0 (got {self.lr!r}): the "
                "data owner folds its mask into the update as eps/lr"
            )
        if not (math.isfinite(self.x_bound) and self.x_bound > 0):
            raise ConfigError(f"Expected `x_bound` > 0 but got {self.x_bound!r}")
        if not (math.isfinite(self.share_bound) and self.share_bound > 0):
            raise ConfigError(f"Expected `share_bound` > 0 but got {self.share_bound!r}")
        if not (math.isfinite(self.initial_share) and 0 <= self.initial_share
                <= self.share_bound):
            raise ConfigError(
                f"Expected `initial_share` in [0, share_bound={self.share_bound}] "
                f"but got {self.initial_share!r}"
            )
        room = params.headroom_bits
        if not (0 <= self.mask_bits <= room - 4):
            raise ConfigError(
                f"Expected `mask_bits` in 0..{room - 4} (headroom {room} bits of "
                f"{params.coeff_mod_bit_sizes} at scale 2^{params.global_scale_bits}) "
                f"but got {self.mask_bits!r}"
            )
        if not (8 <= self.flood_bits <= params.global_scale_bits - 4):
            raise ConfigError(
                f"Expected `flood_bits` in 8..{params.global_scale_bits - 4} "
                f"but got {self.flood_bits!r}"
            )
        return self

    def layouts(self, params: CKKSParams) -> dict[str, Layout]:
        """Ciphertext layouts of the products this layer computes.

        ``forward``: Enc(x) (B x d_in) times W (d_in x d_out).
        ``grad``: Enc(x^T) (d_in x B) times delta (B x d_out) = dW.
        ``input_grad`` (level B): Enc(A) (d_in x d_out) times delta^T = (delta A^T)^T.
        """
        n = params.poly_modulus_degree
        out = {
            "forward": choose_layout(self.batch_size, self.d_in, self.d_out, n),
            "grad": choose_layout(self.d_in, self.batch_size, self.d_out, n),
        }
        if self.level == "B":
            out["input_grad"] = choose_layout(self.d_in, self.d_out, self.batch_size, n)
        return out

    def rotation_steps(self, params: CKKSParams) -> list[int]:
        """Every rotation step (slots) the layouts need; one Galois key each."""
        steps: set[int] = set()
        for layout in self.layouts(params).values():
            steps.update(layout.rotation_steps())
        return sorted(steps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the public-context header)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerSpec:
        """Inverse of :meth:`to_dict` (does not validate)."""
        try:
            lr = d.get("lr")
            return cls(
                batch_size=int(d["batch_size"]),
                d_in=int(d["d_in"]),
                d_out=int(d["d_out"]),
                level=str(d["level"]),  # type: ignore[arg-type]
                lr=None if lr is None else float(lr),
                bias=bool(d["bias"]),
                x_bound=float(d["x_bound"]),
                mask_bits=int(d["mask_bits"]),
                share_bound=float(d["share_bound"]),
                flood_bits=int(d["flood_bits"]),
                initial_share=float(d.get("initial_share", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed layer spec {d!r}") from exc
