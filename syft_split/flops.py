"""FLOP formulas torch's :mod:`torch.utils.flop_counter` lacks or gets wrong, for both counts
of the project: the cost ledger's (:mod:`syft_split.ledger`, what a step did) and a proposal's
compute bound (:mod:`syft_split.spec_size`, from shapes alone)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["flop_formulas", "known_formulas"]


def _conv_backward_flop(grad_out_shape: list[int], x_shape: list[int], w_shape: list[int],
                        _bias: Any, _stride: Any, _padding: Any, _dilation: Any,
                        transposed: bool, _output_padding: Any, _groups: int,
                        output_mask: list[bool], out_shape: Any, **kwargs: Any) -> int:
    """torch's ``conv_backward_flop`` counts a grouped convolution's weight gradient as if the
    convolution were dense (``groups`` times too many; a depthwise one C times): each weight
    meets each output position once, so the weight gradient costs what the forward pass does
    (the weight's shape already holds ``in_channels / groups``)."""
    from torch.utils.flop_counter import conv_flop_count

    flops = 0
    if output_mask[0]:  # input gradient: a transposed convolution of grad_out with the weight
        flops += conv_flop_count(grad_out_shape, w_shape, x_shape, not transposed)
    if output_mask[1]:  # weight gradient: the forward's multiply-adds
        flops += conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return flops


def _sdpa_flop(query_shape: list[int], key_shape: list[int], value_shape: list[int],
               *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


def _sdpa_backward_flop(grad_out_shape: list[int], query_shape: list[int],
                        key_shape: list[int], value_shape: list[int], *args: Any,
                        out_shape: Any = None, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return int(sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape))


def flop_formulas() -> dict[Any, Any]:
    """Formulas :class:`FlopCounterMode` gets on top of torch's own: a groups-aware
    convolution backward, and the CPU flash-attention kernel that ``scaled_dot_product_attention``
    (``nn.MultiheadAttention(need_weights=False)``, transformer layers) runs on CPU, which this
    torch does not count (its forward and backward, with torch's own attention formulas)."""
    aten = torch.ops.aten
    formulas: dict[Any, Any] = {aten.convolution_backward: _conv_backward_flop}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_flop
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_backward_flop
    return formulas


def known_formulas() -> dict[Any, Any]:
    """torch's table and :func:`flop_formulas` on top, each taking ``(*args, out_val=...,
    **kwargs)`` as :class:`~torch.utils.flop_counter.FlopCounterMode` calls them."""
    from torch.utils.flop_counter import flop_registry, shape_wrapper

    return {**flop_registry, **{k: shape_wrapper(v) for k, v in flop_formulas().items()}}
