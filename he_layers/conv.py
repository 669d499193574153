"""Convolutions as an encrypted Linear over im2col patches (data owner unfolds).

A ``Conv1d``/``Conv2d`` (groups=1, zero padding) equals ``patches @ W.view(C_out, -1).T + b``
where ``patches`` has one row per output position: the effective batch is ``B * L_out``,
so the layout chooser often picks the one-feature-per-ciphertext layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from syft_split.errors import ConfigError, ShapeError

__all__ = ["ConvAsLinear"]


def _pair(v: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, tuple) else (v,) * dims


@dataclass(frozen=True)
class ConvAsLinear:
    """Geometry of a Conv1d/Conv2d seen as a Linear over patches.

    Build with :meth:`from_module`. The data owner calls :meth:`unfold` (forward) and
    :meth:`fold_input_grad` (backward); the model owner calls :meth:`fold_output` and
    :meth:`unfold_output_grad`, and uses :meth:`linear_weight` for the encrypted layer.
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]

    @classmethod
    def from_module(cls, conv: nn.Module) -> ConvAsLinear:
        """Geometry of ``conv`` (check it with :func:`he_layers.explain_unprotectable` first:
        groups, padding modes and other unsupported settings are refused there)."""
        if not isinstance(conv, nn.Conv1d | nn.Conv2d):
            raise ConfigError(f"expected nn.Conv1d or nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ConfigError(
                f"{type(conv).__name__} with groups={conv.groups}, padding={conv.padding!r}, "
                f"padding_mode={conv.padding_mode!r} cannot run encrypted (use groups=1, "
                "integer zero padding)")
        dims = 1 if isinstance(conv, nn.Conv1d) else 2
        return cls(
            conv.in_channels, conv.out_channels, _pair(conv.kernel_size, dims),
            _pair(conv.stride, dims), _pair(conv.padding, dims),  # type: ignore[arg-type]
            _pair(conv.dilation, dims),
        )

    def to_dict(self, input_spatial: tuple[int, ...] | None = None) -> dict[str, Any]:
        """JSON-ready geometry (``LayerSpec.conv`` with ``input_spatial``)."""
        out: dict[str, Any] = {
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size), "stride": list(self.stride),
            "padding": list(self.padding), "dilation": list(self.dilation),
        }
        if input_spatial is not None:
            out["input_spatial"] = [int(v) for v in input_spatial]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConvAsLinear:
        """Inverse of :meth:`to_dict` (``input_spatial`` is ignored).

        Raises:
            ConfigError: missing keys, non-positive sizes or mismatched dimensions.
        """
        try:
            dims = len(d["kernel_size"])
            geo = cls(int(d["in_channels"]), int(d["out_channels"]),
                      *(tuple(int(v) for v in d[k])
                        for k in ("kernel_size", "stride", "padding", "dilation")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed convolution geometry {d!r}") from exc
        sizes = (geo.kernel_size, geo.stride, geo.dilation)
        if dims not in (1, 2) or any(len(t) != dims for t in (*sizes, geo.padding)) or min(
                geo.in_channels, geo.out_channels, *geo.kernel_size, *geo.stride,
                *geo.dilation) < 1 or min(geo.padding) < 0:
            raise ConfigError(f"malformed convolution geometry {d!r}")
        return geo

    @property
    def dims(self) -> int:
        """1 (Conv1d) or 2 (Conv2d)."""
        return len(self.kernel_size)

    @property
    def d_in(self) -> int:
        """Patch length ``C_in * prod(kernel)``."""
        return self.in_channels * math.prod(self.kernel_size)

    @property
    def d_out(self) -> int:
        """Output channels."""
        return self.out_channels

    def output_spatial(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """Output length/size for an input of spatial size ``spatial``."""
        out = []
        for n, k, s, p, d in zip(spatial, self.kernel_size, self.stride, self.padding,
                                 self.dilation, strict=True):
            out.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
        return tuple(out)

    def rows(self, input_shape: tuple[int, ...]) -> int:
        """Effective batch ``B * L_out`` (rows of the encrypted matrix)."""
        return input_shape[0] * math.prod(self.output_spatial(tuple(input_shape[2:])))

    def linear_weight(self, conv: nn.Module) -> torch.Tensor:
        """``conv.weight`` as a ``(C_out, d_in)`` Linear weight (same memory order as unfold)."""
        weight = cast(torch.Tensor, conv.weight)
        return weight.detach().reshape(self.out_channels, -1)

    def _2d(self) -> dict[str, tuple[int, ...]]:
        if self.dims == 2:
            return {"kernel_size": self.kernel_size, "dilation": self.dilation,
                    "padding": self.padding, "stride": self.stride}
        return {"kernel_size": (1, self.kernel_size[0]), "dilation": (1, self.dilation[0]),
                "padding": (0, self.padding[0]), "stride": (1, self.stride[0])}

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ShapeError(
                f"conv input: expected (B, {self.in_channels}, ...) with {self.dims} spatial "
                f"dims, got {tuple(x.shape)}"
            )

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """Data owner: ``x`` (B, C_in, *spatial) -> patches (B * L_out, d_in)."""
        self._check_input(x)
        x4 = x if self.dims == 2 else x.unsqueeze(2)
        cols = F.unfold(x4, **self._2d())  # (B, d_in, L)
        return cols.transpose(1, 2).reshape(-1, self.d_in)

    def fold_output(
        self, z: torch.Tensor, batch: int, out_spatial: tuple[int, ...]
    ) -> torch.Tensor:
        """Model owner: rows (B * L_out, C_out) -> (B, C_out, *out_spatial)."""
        n = math.prod(out_spatial)
        if z.shape != (batch * n, self.out_channels):
            raise ShapeError(
                f"conv output rows: expected {(batch * n, self.out_channels)}, got {tuple(z.shape)}"
            )
        return z.reshape(batch, n, self.out_channels).transpose(1, 2).reshape(
            batch, self.out_channels, *out_spatial)

    def unfold_output_grad(self, delta: torch.Tensor) -> torch.Tensor:
        """Model owner: dL/dy (B, C_out, *out_spatial) -> rows (B * L_out, C_out)."""
        if delta.dim() != self.dims + 2 or delta.shape[1] != self.out_channels:
            raise ShapeError(
                f"conv output gradient: expected (B, {self.out_channels}, ...), "
                f"got {tuple(delta.shape)}"
            )
        b = delta.shape[0]
        return delta.reshape(b, self.out_channels, -1).transpose(1, 2).reshape(
            -1, self.out_channels)

    def fold_input_grad(
        self, dpatches: torch.Tensor, input_shape: tuple[int, ...]
    ) -> torch.Tensor:
        """Data owner: dL/dpatches (B * L_out, d_in) -> dL/dx (B, C_in, *spatial) (col2im)."""
        b, spatial = input_shape[0], tuple(input_shape[2:])
        n = math.prod(self.output_spatial(spatial))
        if dpatches.shape != (b * n, self.d_in):
            raise ShapeError(
                f"patch gradient: expected {(b * n, self.d_in)}, got {tuple(dpatches.shape)}"
            )
        cols = dpatches.reshape(b, n, self.d_in).transpose(1, 2)
        size = spatial if self.dims == 2 else (1, spatial[0])
        out = F.fold(cols, output_size=size, **self._2d())
        return out if self.dims == 2 else out.squeeze(2)
