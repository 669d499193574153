"""What both parties agree on before a run: shapes, protection level, masks, bounds."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from syft_split.errors import ConfigError

from .packing import Layout, choose_layout
from .params import CKKSParams

__all__ = ["LayerSpec", "Level"]

Level = Literal["A", "B"]

_CONV_KEYS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
              "input_spatial")


@dataclass(frozen=True)
class LayerSpec:
    """Public agreement for one encrypted Linear or convolution (travels in the public context).

    Args:
        batch_size: largest number of records per step. Smaller batches are zero-padded.
        d_in: input features per record (a convolution: ``C_in * prod(input_spatial)``, the
            flattened activation the data owner's segment produces).
        d_out: output features per record (a convolution: ``C_out * prod(output spatial)``).
        level: ``"A"`` (server learns z and dW, hides W from the data owner) or ``"B"``
            (weight additively shared, server never sees x, W or dW).
        lr: learning rate of the weight's SGD update; required for level B.
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
        momentum, weight_decay: level B: the weight follows ``torch.optim.SGD(lr, momentum,
            weight_decay)`` (no dampening, no Nesterov); both parties need them to keep
            ``W_s + A`` on that trajectory. Ignored at level A (any optimizer there).
        workers: processes the model owner splits each product over (1: one core; 2 also
            uses a second core, see :mod:`he_layers.workers`). Agreed because it shapes the
            layouts (the output chunks the processes share).
        conv: a convolution's geometry (:meth:`ConvAsLinear.to_dict` plus
            ``input_spatial``), or None for a Linear. The data owner unfolds (im2col) its
            activation before encrypting; the product has ``batch_size * L_out`` rows.
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
    momentum: float = 0.0
    weight_decay: float = 0.0
    workers: int = 1
    conv: dict[str, Any] | None = field(default=None, hash=False)

    # -- the matrix product behind the layer ---------------------------------------
    def geometry(self) -> Any:
        """The :class:`ConvAsLinear` of a convolution spec (None for a Linear)."""
        if self.conv is None:
            return None
        from .conv import ConvAsLinear

        return ConvAsLinear.from_dict(self.conv)

    @property
    def input_spatial(self) -> tuple[int, ...]:
        """A convolution's input length / (H, W); ``()`` for a Linear."""
        return () if self.conv is None else tuple(int(v) for v in self.conv["input_spatial"])

    @property
    def output_spatial(self) -> tuple[int, ...]:
        """A convolution's output length / (H, W); ``()`` for a Linear."""
        geo = self.geometry()
        return () if geo is None else geo.output_spatial(self.input_spatial)

    @property
    def rows(self) -> int:
        """Rows of the encrypted matrix: the batch, times ``L_out`` for a convolution."""
        return self.batch_size * math.prod(self.output_spatial)

    @property
    def mat_in(self) -> int:
        """Columns of the encrypted matrix (a convolution: the patch length ``C_in * k``)."""
        geo = self.geometry()
        return self.d_in if geo is None else int(geo.d_in)

    @property
    def mat_out(self) -> int:
        """Columns of the product (a convolution: ``C_out``)."""
        geo = self.geometry()
        return self.d_out if geo is None else int(geo.d_out)

    def validate(self, params: CKKSParams) -> LayerSpec:
        """Check the spec against ``params``; return ``self``.

        Raises:
            ConfigError: naming the argument, the expected and the received value.
        """
        for name in ("batch_size", "d_in", "d_out"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"Expected `{name}` to be a positive int but got {v!r}")
        for name in ("mask_bits", "flood_bits"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"Expected `{name}` to be an int but got {v!r}")
        for name in ("lr", "x_bound", "share_bound", "initial_share", "momentum",
                     "weight_decay"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and not isinstance(v, bool)) and not (
                    name == "lr" and v is None):
                raise ConfigError(f"Expected `{name}` to be a number but got {v!r}")
        if self.level not in ("A", "B"):
            raise ConfigError(f"Expected `level` to be 'A' or 'B' but got {self.level!r}")
        if self.level == "B" and (
            self.lr is None or not math.isfinite(self.lr) or self.lr <= 0
        ):
            raise ConfigError(
                f"Level B needs the SGD learning rate `lr` > 0 (got {self.lr!r}): the "
                "data owner folds its mask into the update as eps/lr"
            )
        for name, hi in (("momentum", 1.0), ("weight_decay", math.inf)):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and 0 <= v and v < hi):
                raise ConfigError(f"Expected `{name}` in [0, {hi}) but got {v!r}")
        if not (isinstance(self.workers, int) and not isinstance(self.workers, bool)
                and 1 <= self.workers <= 8):
            raise ConfigError(f"Expected `workers` in 1..8 but got {self.workers!r}")
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
        if self.conv is not None:
            self._validate_conv()
        return self

    def _validate_conv(self) -> None:
        conv = self.conv
        if not isinstance(conv, dict) or set(conv) != set(_CONV_KEYS):
            raise ConfigError(f"Expected `conv` with keys {list(_CONV_KEYS)} but got {conv!r}")
        try:
            geo = self.geometry()
            spatial = self.input_spatial
            out = geo.output_spatial(spatial)
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"malformed convolution geometry {conv!r}: {exc}") from exc
        if len(spatial) != geo.dims or min(out, default=0) < 1:
            raise ConfigError(
                f"convolution input_spatial {list(spatial)} gives output {list(out)} "
                f"(expected {geo.dims} positive sizes)"
            )
        want_in = geo.in_channels * math.prod(spatial)
        want_out = geo.out_channels * math.prod(out)
        if (self.d_in, self.d_out) != (want_in, want_out):
            raise ConfigError(
                f"convolution {geo.in_channels}x{list(spatial)} -> {geo.out_channels}x"
                f"{list(out)}: expected d_in={want_in}, d_out={want_out}, got "
                f"d_in={self.d_in}, d_out={self.d_out}"
            )

    def layouts(self, params: CKKSParams) -> dict[str, Layout]:
        """Ciphertext layouts of the products this layer computes.

        ``forward``: Enc(x) (rows x mat_in) times W (mat_in x mat_out).
        ``grad``: Enc(x^T) (mat_in x rows) times delta (rows x mat_out) = dW; the data owner
        encrypts the baby-step rotations and the product is not rescaled, so dW keeps
        ~1e-9 absolute precision (exact zeros stay ~0 for Adam-like optimizers).
        ``input_grad`` (level B): Enc(A) (mat_in x mat_out) times delta^T = (delta A^T)^T.
        """
        n = params.poly_modulus_degree
        rows, d_in, d_out = self.rows, self.mat_in, self.mat_out
        out = {
            "forward": choose_layout(rows, d_in, d_out, n, workers=self.workers),
            "grad": choose_layout(d_in, rows, d_out, n, client_baby=True,
                                  workers=self.workers),
        }
        if self.level == "B":
            out["input_grad"] = choose_layout(d_in, d_out, rows, n, workers=self.workers)
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
            conv = d.get("conv")
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
                momentum=float(d.get("momentum", 0.0)),
                weight_decay=float(d.get("weight_decay", 0.0)),
                workers=int(d.get("workers", 1)),
                conv=None if conv is None else dict(conv),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed layer spec {d!r}") from exc
