"""Can this module be the encrypted first server layer? Collects every problem at once."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

from syft_split.errors import ConfigError

from .params import CKKSParams

__all__ = ["explain_unprotectable"]

_SUPPORTED = "nn.Linear, nn.Conv1d or nn.Conv2d"


def _kind_problems(layer: nn.Module) -> list[str]:
    name = type(layer).__name__
    if isinstance(layer, nn.Sequential | nn.ModuleList | nn.ModuleDict):
        first = next(iter(layer.children()), None)
        hint = f" (its first child is {type(first).__name__})" if first is not None else ""
        return [f"{name} is a container: pass the first server layer itself{hint}"]
    if isinstance(layer, nn.RNNBase):
        return [
            f"nn.{name} is not supported: recurrent gates are nonlinear and need many "
            f"multiplicative levels; use {_SUPPORTED} as the first server layer and put the "
            f"{name} after it"
        ]
    if isinstance(layer, nn.Embedding | nn.EmbeddingBag):
        return [
            f"nn.{name} is a table lookup on integer ids, not supported: one-hot encode on the "
            "data owner and use nn.Linear(num_embeddings, embedding_dim, bias=False)"
        ]
    if isinstance(layer, nn.Conv3d | nn.ConvTranspose1d | nn.ConvTranspose2d
                  | nn.ConvTranspose3d):
        return [f"nn.{name} is not supported; use {_SUPPORTED}"]
    if isinstance(layer, nn.Bilinear):
        return [f"nn.{name} multiplies two encrypted inputs (two levels); use nn.Linear"]
    if isinstance(layer, nn.modules.lazy.LazyModuleMixin):
        return [f"{name} is not initialized; run one plain forward or use a non-lazy layer"]
    if not isinstance(layer, nn.Linear | nn.Conv1d | nn.Conv2d):
        return [
            f"{name} is not supported as the encrypted first server layer: it must be one "
            f"affine map ({_SUPPORTED}); nonlinear layers cannot run in one CKKS level"
        ]
    # it runs as a plain affine map of its .weight and .bias: anything else it does is lost
    if torch.nn.utils.parametrize.is_parametrized(layer):
        return [f"{name} has parametrizations (e.g. weight_norm): its weight is computed from "
                "other parameters, which would not train; remove them"]
    if type(layer) not in (nn.Linear, nn.Conv1d, nn.Conv2d):
        return [f"{name} subclasses an {_SUPPORTED} layer: it would run as the plain layer (its "
                f"own forward ignored); use the torch layer itself"]
    if layer._forward_hooks or layer._forward_pre_hooks:
        return [f"{name} has forward hooks (e.g. the old weight_norm): they would not run on "
                "the encrypted layer; remove them"]
    return []


def _conv_problems(conv: nn.Conv1d | nn.Conv2d) -> list[str]:
    out = []
    name = type(conv).__name__
    if conv.groups != 1:
        out.append(f"{name} with groups={conv.groups} is not supported (use groups=1)")
    if conv.padding_mode != "zeros":
        out.append(
            f"{name} with padding_mode={conv.padding_mode!r} is not supported (use 'zeros', "
            "or pad on the data owner before the split)"
        )
    if isinstance(conv.padding, str):
        if conv.padding == "same":
            out.append(
                f"{name} with padding='same' is not supported; give explicit integer padding "
                "(e.g. padding=kernel_size//2 for odd kernels, stride 1)"
            )
    return out


def explain_unprotectable(
    layer: nn.Module,
    *,
    batch_size: int | None = None,
    params: CKKSParams | None = None,
    input_spatial: tuple[int, ...] | None = None,
    max_step_mb: float = 512.0,
    options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Why ``layer`` cannot be the CKKS-protected first server layer (``[]`` if it can).

    Args:
        layer: the candidate module.
        batch_size: rows per step (for a conv: the image batch; with ``input_spatial``
            the effective batch B*L_out is used). Enables the size checks.
        params: CKKS parameters (default ``CKKSParams()``); validated too.
        input_spatial: conv input length / (H, W), for the effective batch.
        max_step_mb: refuse layouts needing more ciphertext bytes per step than this.
        options: :class:`LayerSpec` fields the layer will be agreed with (``x_bound`` and
            ``mask_bits`` bound the headroom; every field is validated against ``params``).
    """
    if not isinstance(layer, nn.Module):
        return [f"expected an nn.Module, got {type(layer).__name__}"]
    problems = _kind_problems(layer)
    if problems:
        return problems
    if isinstance(layer, nn.Conv1d | nn.Conv2d):
        problems += _conv_problems(layer)
    w = cast(torch.Tensor, layer.weight)
    if not w.is_floating_point():
        problems.append(f"weight dtype {w.dtype} is not floating point")
    p = params or CKKSParams()
    try:
        p.validate()
    except ConfigError as exc:
        problems.append(str(exc))
        return problems
    conv_geo = None
    if isinstance(layer, nn.Linear):
        d_in, d_out = int(layer.in_features), int(layer.out_features)
    else:
        conv = cast(nn.Conv1d | nn.Conv2d, layer)
        kernel = conv.kernel_size if isinstance(conv.kernel_size, tuple) else (conv.kernel_size,)
        d_in, d_out = int(conv.in_channels) * math.prod(kernel), int(conv.out_channels)
        if input_spatial is not None and not problems:
            from .conv import ConvAsLinear

            conv_geo = ConvAsLinear.from_module(conv)
    opts = {k: v for k, v in (options or {}).items() if k != "conv"}
    x_bound = float(opts.get("x_bound", 64.0))
    mask_bits = int(opts.get("mask_bits", 12))
    w2 = w.detach().double().reshape(d_out, -1)
    bound = x_bound * float(w2.abs().sum(dim=1).max()) + 2.0**mask_bits
    limit = 2.0 ** (p.headroom_bits - 1)
    if bound > limit:
        problems.append(
            f"weights too large for the CKKS headroom: |x W| could reach {bound:.4g} "
            f"> {limit:.4g} with x_bound={x_bound}; rescale inputs/weights or use a larger q0"
        )
    if batch_size is not None and not problems and (conv_geo is not None or
                                                    isinstance(layer, nn.Linear)):
        from .review import estimate_step_bytes

        if conv_geo is not None:
            assert input_spatial is not None
            out_sp = conv_geo.output_spatial(tuple(input_spatial))
            if min(out_sp) < 1:
                return [*problems, f"input_spatial {tuple(input_spatial)} is smaller than the "
                        f"kernel: the convolution's output would be {out_sp}"]
            agreement = {"batch_size": batch_size,
                         "d_in": conv_geo.in_channels * math.prod(input_spatial),
                         "d_out": conv_geo.out_channels * math.prod(out_sp), "level": "A",
                         "options": {**opts, "conv": conv_geo.to_dict(tuple(input_spatial))}}
        else:
            agreement = {"batch_size": batch_size, "d_in": d_in, "d_out": d_out, "level": "A",
                         "options": opts}
        try:
            est = estimate_step_bytes({**agreement, "params": p.to_dict()})
        except ConfigError as exc:  # options that do not fit these parameters
            return [*problems, str(exc)]
        mb = (est["bytes_up"] + est["bytes_down"]) / 2**20
        if mb > max_step_mb:
            problems.append(
                f"batch {batch_size} needs ~{mb:.0f} MB of ciphertexts per step "
                f"(> max_step_mb={max_step_mb}); reduce the batch or the layer's input "
                "(e.g. pool/downsample on the data owner first)"
            )
    return problems
