"""Declared segment specs: a readable, code-free description of a segment's layers.

A data owner never runs code it has not read. The model owner sends a segment as a JSON
spec (layer types from a fixed list of standard torch layers, with their constructor
arguments) plus its initial weights as tensors; the data owner's host rebuilds the module
from that spec. :func:`describe` renders the review a data owner reads before approving.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ConfigError

__all__ = [
    "LAYER_ARGS",
    "OptimizerSpec",
    "module_to_spec",
    "module_from_spec",
    "describe",
    "count_parameters",
    "spec_state",
]

#: layer type -> constructor arguments read from (and passed back to) the module.
LAYER_ARGS: dict[str, tuple[str, ...]] = {
    "Linear": ("in_features", "out_features", "bias"),
    "Conv1d": ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
               "groups", "bias", "padding_mode"),
    "Conv2d": ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
               "groups", "bias", "padding_mode"),
    "MaxPool1d": ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    "MaxPool2d": ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    "AvgPool1d": ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    "AvgPool2d": ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    "AdaptiveAvgPool1d": ("output_size",),
    "AdaptiveAvgPool2d": ("output_size",),
    "BatchNorm1d": ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    "BatchNorm2d": ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    "LayerNorm": ("normalized_shape", "eps", "elementwise_affine"),
    "Dropout": ("p",),
    "Flatten": ("start_dim", "end_dim"),
    "Unflatten": ("dim", "unflattened_size"),
    "ReLU": (),
    "LeakyReLU": ("negative_slope",),
    "ELU": ("alpha",),
    "GELU": ("approximate",),
    "Tanh": (),
    "Sigmoid": (),
    "Identity": (),
}

_OPTIMIZERS = {"sgd": ("lr", "momentum", "weight_decay", "nesterov", "dampening"),
               "adam": ("lr", "betas", "eps", "weight_decay"),
               "adamw": ("lr", "betas", "eps", "weight_decay")}


class OptimizerSpec:
    """A declared optimizer (name + hyper-parameters) that each party builds for itself.

    >>> OptimizerSpec("adam", lr=1e-3).build(nn.Linear(2, 2).parameters())  # doctest: +SKIP
    """

    def __init__(self, name: str = "sgd", **hyper: Any) -> None:
        name = name.lower()
        if name not in _OPTIMIZERS:
            raise ConfigError(f"optimizer {name!r} not supported; choose from {sorted(_OPTIMIZERS)}")
        unknown = set(hyper) - set(_OPTIMIZERS[name])
        if unknown:
            raise ConfigError(
                f"optimizer {name!r} does not take {sorted(unknown)}; "
                f"allowed: {list(_OPTIMIZERS[name])}"
            )
        if "lr" not in hyper:
            hyper["lr"] = 0.01 if name == "sgd" else 1e-3
        for key, value in hyper.items():
            ok = isinstance(value, (int, float)) or (
                isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value)
            )
            if not ok:
                raise ConfigError(f"optimizer argument {key}={value!r} must be a number")
        self.name = name
        self.hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in hyper.items()}

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, **self.hyper}

    @classmethod
    def from_json(cls, data: Any) -> OptimizerSpec:
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise ConfigError(f"optimizer spec must be an object with a name, got {data!r}")
        hyper = {k: v for k, v in data.items() if k != "name"}
        return cls(data["name"], **hyper)

    def build(self, params: Any) -> torch.optim.Optimizer:
        kwargs: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v)
                                  for k, v in self.hyper.items()}
        if self.name == "sgd":
            return torch.optim.SGD(params, **kwargs)
        if self.name == "adam":
            return torch.optim.Adam(params, **kwargs)
        return torch.optim.AdamW(params, **kwargs)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyper.items())
        return f"OptimizerSpec({self.name!r}, {args})"


def _layers_of(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        out: list[nn.Module] = []
        for child in module:
            out.extend(_layers_of(child))
        return out
    return [module]


def _arg_value(layer: nn.Module, arg: str) -> Any:
    value = getattr(layer, arg)
    if arg == "bias" and not isinstance(value, bool):
        return value is not None
    if isinstance(value, torch.Size):
        return list(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def module_to_spec(module: nn.Module) -> dict[str, Any]:
    """Describe ``module`` (a layer or nested ``nn.Sequential`` of standard layers) as JSON.

    Raises :class:`ConfigError` naming the first layer that has no declared form.
    """
    layers = []
    for i, layer in enumerate(_layers_of(module)):
        kind = type(layer).__name__
        if kind not in LAYER_ARGS or type(layer).__module__.split(".")[0] != "torch":
            raise ConfigError(
                f"layer {i} ({kind}) has no declared form; a segment placed on a data owner "
                f"must be made of standard layers: {sorted(LAYER_ARGS)}"
            )
        layers.append({"type": kind, "args": {a: _arg_value(layer, a) for a in LAYER_ARGS[kind]}})
    return {"layers": layers}


def spec_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s weights keyed as in the module :func:`module_from_spec` builds."""
    return {
        f"{i}.{k}": v.detach().clone()
        for i, layer in enumerate(_layers_of(module))
        for k, v in layer.state_dict().items()
    }


def _as_ctor_arg(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def module_from_spec(spec: Any) -> nn.Sequential:
    """Build the ``nn.Sequential`` a spec declares; refuse anything outside :data:`LAYER_ARGS`."""
    if not isinstance(spec, dict) or not isinstance(spec.get("layers"), list):
        raise ConfigError("segment spec must be an object with a 'layers' list")
    modules = []
    for i, entry in enumerate(spec["layers"]):
        if not isinstance(entry, dict):
            raise ConfigError(f"layer {i}: expected an object, got {entry!r}")
        kind, args = entry.get("type"), entry.get("args", {})
        if kind not in LAYER_ARGS:
            raise ConfigError(f"layer {i}: type {kind!r} is not allowed; allowed: {sorted(LAYER_ARGS)}")
        if not isinstance(args, dict) or set(args) - set(LAYER_ARGS[kind]):
            raise ConfigError(
                f"layer {i} ({kind}): arguments {sorted(args) if isinstance(args, dict) else args!r}"
                f" not allowed; allowed: {list(LAYER_ARGS[kind])}"
            )
        try:
            modules.append(getattr(nn, kind)(**{k: _as_ctor_arg(v) for k, v in args.items()}))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"layer {i} ({kind}): invalid arguments {args}: {exc}") from exc
    return nn.Sequential(*modules)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(module: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """One line per layer: type, arguments, output shape per record, parameter count."""
    lines = []
    x = torch.zeros((1, *input_shape))
    was_training = module.training
    module.eval()
    with torch.no_grad():
        for layer in _layers_of(module):
            x = layer(x)
            args = ", ".join(f"{a}={_arg_value(layer, a)}" for a in LAYER_ARGS.get(
                type(layer).__name__, ()))
            lines.append(
                f"{type(layer).__name__}({args}) -> {tuple(x.shape[1:])}  "
                f"[{count_parameters(layer)} params]"
            )
    module.train(was_training)
    return lines
