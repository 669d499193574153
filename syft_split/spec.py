"""Declared segment specs: a readable, code-free description of a segment.

A data owner never runs code it has not read. The model owner sends a segment as a JSON
spec plus its initial weights as tensors; the data owner's host rebuilds the module from that
spec. Two forms (both checked completely, argument types included, before anything is built):

- a **chain** ``{"layers": [{"type": "Linear", "args": {...}}, ...]}`` of standard layers
  (:data:`LAYER_ARGS`), rebuilt as ``nn.Sequential``;
- a **graph** ``{"input": "x", "nodes": [{"name", "op", "args", "inputs"}, ...], "output"}``
  of standard layers and a few functional ops (:data:`FUNCTIONAL_OPS`: add, cat, flatten,
  pooling, reshape, ...), rebuilt as :class:`GraphSegment`, which runs exactly those nodes.
  ``split_model`` makes such segments from residual blocks, branches and functional code.

:func:`spec_size` measures a spec from its JSON alone (the host's first check);
:func:`describe` renders the review a data owner reads before approving; :func:`spec_state`
and :func:`load_spec_state` move weights between the model owner's segment and the rebuilt one.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import ConfigError
from .spec_args import GRAPH_LAYERS, LAYER_ARGS, OPS
from .spec_export import chain_layers, check_layer_tensors, graph_spec, layer_args, layer_spec
from .spec_graph import GraphSegment, build
from .spec_size import SpecSize, spec_size

__all__ = [
    "LAYER_ARGS",
    "FUNCTIONAL_OPS",
    "GraphSegment",
    "OptimizerSpec",
    "SpecSize",
    "module_to_spec",
    "module_from_spec",
    "describe",
    "count_parameters",
    "spec_state",
    "load_spec_state",
    "spec_size",
]

#: functional ops a graph spec may use between layers (see :mod:`syft_split.spec_args`).
FUNCTIONAL_OPS: tuple[str, ...] = tuple(OPS)

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


def _state_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(key prefix, layer): the rebuilt module's state keys are the prefix + the layer's keys."""
    if isinstance(module, GraphSegment):
        return [("", module)]
    if isinstance(module, fx.GraphModule):
        return [(f"layers.{name}.", layer) for name, layer in graph_spec(module)[1].items()]
    return [(f"{i}.", layer) for i, layer in enumerate(chain_layers(module))]


def module_to_spec(module: nn.Module) -> dict[str, Any]:
    """Describe ``module`` as JSON: a chain for (nested) ``nn.Sequential`` of standard layers,
    a graph for a ``torch.fx.GraphModule`` (as :func:`~syft_split.split.split_model` makes).

    Raises :class:`ConfigError` naming the first layer or node that has no declared form
    (for a graph node: what it calls, e.g. ``torch.special.erf``) and the allowed ops, and
    naming layers whose weights a spec cannot carry: a parameter or buffer shared by two
    different layers (tied weights) or a frozen parameter (the data owner would train it)."""
    if isinstance(module, GraphSegment):
        check_layer_tensors([(f"node {name!r} ({type(layer).__name__})", layer)
                             for name, layer in module.layers.items()])
        return copy.deepcopy(module.spec)
    if isinstance(module, fx.GraphModule):
        spec, owners = graph_spec(module)
        check_layer_tensors([(f"node {name!r} ({type(layer).__name__})", layer)
                             for name, layer in owners.items()])
        return spec
    layers: list[dict[str, Any]] = []
    seen: dict[int, int] = {}
    labelled: list[tuple[str, nn.Module]] = []
    for i, layer in enumerate(chain_layers(module)):
        kind, args = layer_spec(layer, f"layer {i}")
        if kind in GRAPH_LAYERS:
            raise ConfigError(f"layer {i} ({kind}) takes several inputs or returns a tuple: a "
                              "chain cannot declare it (split_model makes a graph segment)")
        if id(layer) in seen and layer.state_dict():
            raise ConfigError(f"layer {i} ({kind}) is the same module as layer {seen[id(layer)]}: "
                              "a chain cannot share weights between layers")
        if id(layer) not in seen:
            labelled.append((f"layer {i} ({kind})", layer))
        seen.setdefault(id(layer), i)
        layers.append({"type": kind, "args": args})
    check_layer_tensors(labelled)
    return {"layers": layers}


def spec_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s weights keyed as in the module :func:`module_from_spec` builds."""
    return {prefix + k: v.detach().clone()
            for prefix, layer in _state_layers(module) for k, v in layer.state_dict().items()}


def load_spec_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load weights keyed as :func:`spec_state` keys them (e.g. a data owner's released
    segment) into ``module``, the model owner's segment; refuse a key set that differs."""
    own = spec_state(module)
    if set(state) != set(own):
        raise ConfigError(f"weights {sorted(state)} do not match the segment's {sorted(own)}")
    for prefix, layer in _state_layers(module):
        layer.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def module_from_spec(spec: Any) -> nn.Module:
    """Build the module a spec declares (``nn.Sequential`` for a chain, :class:`GraphSegment`
    for a graph); refuse anything outside the allow-lists or with mistyped arguments."""
    return build(spec)


def count_parameters(module: nn.Module) -> int:
    """Trainable elements (a layer shared by several graph nodes counts once)."""
    return sum(p.numel() for p in module.parameters())


def _shape_text(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape[1:]))
    if isinstance(value, tuple) and all(isinstance(v, torch.Tensor) or v is None for v in value):
        return "(" + ", ".join("None" if v is None else str(tuple(v.shape[1:])) for v in value) + ")"
    return repr(tuple(value)) if isinstance(value, torch.Size) else repr(value)


def _describe_graph(module: GraphSegment, x: torch.Tensor) -> list[str]:
    lines = [f"input {module.parsed.input}: {tuple(x.shape[1:])}"]
    for node, value in module.steps(x):
        inputs = ", ".join(node.inputs)
        kwargs = "".join(f", {k}={v!r}" for k, v in {**node.call,
                                                     **({} if node.is_layer else node.args)}.items())
        note = ""
        if node.shares is not None:
            text, note = f"{node.shares}({inputs}{kwargs})", f"[same layer as {node.shares}]"
        elif node.is_layer:
            args = ", ".join(f"{k}={v!r}" for k, v in node.args.items())
            text = f"{node.op}({args})({inputs}{kwargs})"
            note = f"[{count_parameters(module.layers[node.name])} params]"
        else:
            text = f"{node.op}({inputs}{kwargs})"
        lines.append(f"{node.name} = {text} -> {_shape_text(value)}" + (f"  {note}" if note else ""))
    lines.append(f"output: {module.parsed.output}")
    return lines


def describe(module: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """One line per layer (chain) or per node (graph: ``name = op(inputs, args) -> shape
    [params]``), with output shapes per record and parameter counts."""
    if isinstance(module, fx.GraphModule):
        rebuilt = module_from_spec(module_to_spec(module))
        load_spec_state(rebuilt, spec_state(module))
        module = rebuilt
    x = torch.zeros((1, *input_shape))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            if isinstance(module, GraphSegment):
                return _describe_graph(module, x)
            lines = []
            for layer in chain_layers(module):
                x = layer(x)
                args = ", ".join(f"{a}={v}" for a, v in layer_args(layer).items())
                lines.append(f"{type(layer).__name__}({args}) -> {tuple(x.shape[1:])}  "
                             f"[{count_parameters(layer)} params]")
            return lines
    finally:
        module.train(was_training)
