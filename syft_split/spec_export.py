"""From the model owner's modules to declared specs (the other direction is spec_graph).

A standard layer is declared by its type and constructor arguments, and only if rebuilding it
from them gives the same layer (same attributes, same weight names, shapes and dtypes, no
hooks): a spec never silently drops ``divisor_override``, ``return_indices``, a missing bias
or a float64 weight. A ``torch.fx.GraphModule`` (what :func:`~syft_split.split.split_model`
makes of a segment that is not a chain) becomes a graph spec, node by node; anything without
a declared form is refused with an error naming the node and what it calls.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .spec_args import GRAPH_LAYERS, LAYER_ARG_TYPES, LAYER_ARGS
from .spec_graph import (
    NAME_RE,
    RESERVED_NAMES,
    allowed_ops,
    build_layer,
    check_layer_args,
    parse_spec,
)

__all__ = ["ancestors", "layer_args", "layer_spec", "chain_layers", "graph_spec", "describe_target",
           "check_layer_tensors"]


def _arg_value(layer: nn.Module, kind: str, arg: str) -> Any:
    if kind == "MultiheadAttention" and arg in ("bias", "add_bias_kv"):
        return (layer.in_proj_bias if arg == "bias" else layer.bias_k) is not None
    value = getattr(layer, arg)
    if arg == "bias" and not isinstance(value, bool):
        return value is not None
    if isinstance(value, (torch.Size, tuple)):
        return list(value)
    return value


def layer_args(layer: nn.Module) -> dict[str, Any]:
    """The declared arguments of a standard layer, read from it (none for other modules)."""
    kind = type(layer).__name__
    return {a: _arg_value(layer, kind, a) for a in LAYER_ARGS.get(kind, ())}


def _differences(layer: nn.Module, fresh: nn.Module) -> list[str]:
    out = []
    for key, value in vars(layer).items():
        if key.startswith("_") or key in ("training", "inplace"):
            continue
        if isinstance(value, (bool, int, float, str, tuple, list, type(None))):
            if getattr(fresh, key, None) != value:
                out.append(f"{key}={value!r}")
    own, new = layer.state_dict(), fresh.state_dict()
    if set(own) != set(new):
        out.append(f"weights {sorted(own)} (declared layer: {sorted(new)})")
    for key in sorted(set(own) & set(new)):
        if own[key].shape != new[key].shape or own[key].dtype != new[key].dtype:
            out.append(f"weight {key} {tuple(own[key].shape)} {own[key].dtype} (declared layer: "
                       f"{tuple(new[key].shape)} {new[key].dtype})")
    if layer._forward_hooks or layer._forward_pre_hooks:
        out.append("forward hooks")
    return out


def layer_spec(layer: nn.Module, where: str) -> tuple[str, dict[str, Any]]:
    """``(type, args)`` declaring ``layer``, or ConfigError saying what cannot be declared."""
    kind = type(layer).__name__
    if kind not in LAYER_ARG_TYPES or type(layer) is not getattr(nn, kind):
        raise ConfigError(f"{where} ({type(layer).__module__}.{type(layer).__qualname__}) has "
                          f"no declared form; allowed: {allowed_ops()}")
    args = layer_args(layer)
    check_layer_args(f"{where} ({kind})", kind, args)
    with torch.device("meta"):
        fresh = build_layer(f"{where} ({kind})", kind, args)
    problems = _differences(layer, fresh)
    if problems:
        raise ConfigError(f"{where} ({kind}) has {', '.join(problems)}, which its declared form "
                          f"{kind}({args}) would not rebuild")
    return kind, args


def chain_layers(module: nn.Module) -> list[nn.Module]:
    """The layers of a (nested) ``nn.Sequential``, in order; any other module is one layer."""
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in chain_layers(child)]
    return [module]


def check_layer_tensors(layers: list[tuple[str, nn.Module]]) -> None:
    """Refuse weights a spec cannot carry: a parameter or buffer held by two different layers
    (tied weights: the rebuilt segment would hold two copies and untie them) and a frozen
    parameter (``requires_grad=False``: the data owner trains every parameter it runs).
    ``layers``: (label, layer), each layer once."""
    owners: dict[int, tuple[str, str]] = {}
    for label, layer in layers:
        for key, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
            first = owners.setdefault(id(tensor), (label, key))
            if first[0] != label:
                raise ConfigError(
                    f"{label}'s {key} is the same tensor as {first[0]}'s {first[1]}: a spec "
                    "cannot tie weights between different layers (the rebuilt segment would "
                    "untie them); call the same layer twice instead, or untie them (clone) "
                    "before declaring the segment")
        for key, param in layer.named_parameters():
            if not param.requires_grad:
                raise ConfigError(
                    f"{label}'s {key} is frozen (requires_grad=False), but the data owner "
                    "trains every parameter of a segment it runs: unfreeze it to have it "
                    "trained there, or keep the frozen layer at the model owner (cut the "
                    "model so that it falls in the model owner's segment)")


# ------------------------------------------------------------------ fx graphs
#: fx call targets with a declared form: target -> (op, parameter names in call order).
_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...]]] = {
    operator.add: ("add", ("input", "other")),
    torch.add: ("add", ("input", "other", "alpha")),
    operator.sub: ("sub", ("input", "other")),
    torch.sub: ("sub", ("input", "other", "alpha")),
    operator.mul: ("mul", ("input", "other")),
    torch.mul: ("mul", ("input", "other")),
    operator.truediv: ("div", ("input", "other")),
    torch.div: ("div", ("input", "other", "rounding_mode")),
    operator.matmul: ("matmul", ("input", "other")),
    torch.matmul: ("matmul", ("input", "other")),
    torch.cat: ("cat", ("tensors", "dim")),
    torch.concat: ("cat", ("tensors", "dim")),
    torch.flatten: ("flatten", ("input", "start_dim", "end_dim")),
    torch.relu: ("relu", ("input",)),
    F.relu: ("relu", ("input", "inplace")),
    torch.tanh: ("tanh", ("input",)),
    F.tanh: ("tanh", ("input",)),
    torch.sigmoid: ("sigmoid", ("input",)),
    F.sigmoid: ("sigmoid", ("input",)),
    F.gelu: ("gelu", ("input", "approximate")),
    F.softmax: ("softmax", ("input", "dim", "_stacklevel", "dtype")),
    torch.softmax: ("softmax", ("input", "dim", "dtype")),
    F.max_pool1d: ("max_pool1d", ("input", "kernel_size", "stride", "padding", "dilation",
                                  "ceil_mode", "return_indices")),
    F.max_pool2d: ("max_pool2d", ("input", "kernel_size", "stride", "padding", "dilation",
                                  "ceil_mode", "return_indices")),
    F.avg_pool1d: ("avg_pool1d", ("input", "kernel_size", "stride", "padding", "ceil_mode",
                                  "count_include_pad")),
    F.avg_pool2d: ("avg_pool2d", ("input", "kernel_size", "stride", "padding", "ceil_mode",
                                  "count_include_pad", "divisor_override")),
    F.adaptive_avg_pool1d: ("adaptive_avg_pool1d", ("input", "output_size")),
    F.adaptive_avg_pool2d: ("adaptive_avg_pool2d", ("input", "output_size")),
    torch.reshape: ("reshape", ("input", "shape")),
    torch.transpose: ("transpose", ("input", "dim0", "dim1")),
    torch.permute: ("permute", ("input", "dims")),
    torch.mean: ("mean", ("input", "dim", "keepdim", "dtype")),
    torch.unsqueeze: ("unsqueeze", ("input", "dim")),
    operator.getitem: ("getitem", ("input", "index")),
}
_METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "add": ("add", ("input", "other", "alpha")),
    "sub": ("sub", ("input", "other", "alpha")),
    "mul": ("mul", ("input", "other")),
    "div": ("div", ("input", "other", "rounding_mode")),
    "matmul": ("matmul", ("input", "other")),
    "flatten": ("flatten", ("input", "start_dim", "end_dim")),
    "relu": ("relu", ("input",)),
    "tanh": ("tanh", ("input",)),
    "sigmoid": ("sigmoid", ("input",)),
    "softmax": ("softmax", ("input", "dim", "dtype")),
    "view": ("view", ("input", "*shape")),
    "reshape": ("reshape", ("input", "*shape")),
    "transpose": ("transpose", ("input", "dim0", "dim1")),
    "permute": ("permute", ("input", "*dims")),
    "mean": ("mean", ("input", "dim", "keepdim", "dtype")),
    "unsqueeze": ("unsqueeze", ("input", "dim")),
    "contiguous": ("contiguous", ("input",)),
    "size": ("size", ("input", "dim")),
}
#: call arguments a declared op drops, and the only value each may have.
_FIXED = {"alpha": 1, "rounding_mode": None, "dtype": None, "return_indices": False,
          "divisor_override": None, "inplace": False}
_NAMESPACES = (("torch", torch), ("torch.nn.functional", F), ("torch.special", torch.special),
               ("torch.linalg", torch.linalg), ("torch.fft", torch.fft), ("operator", operator),
               ("math", math))


def describe_target(node: fx.Node) -> str:
    """What a function, method or attribute node calls, as a reader knows it
    (``torch.special.erf``, ``Tensor.float``)."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "get_attr":
        return f"the tensor attribute {node.target!r}"
    for prefix, namespace in _NAMESPACES:
        for name in dir(namespace):
            if not name.startswith("_") and getattr(namespace, name, None) is node.target:
                return f"{prefix}.{name}"
    target = node.target
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"


def _refuse(node: fx.Node, what: str, why: str = "which has no declared form") -> ConfigError:
    return ConfigError(f"node {node.name!r} calls {what}, {why}; allowed: {allowed_ops()}")


def _literal(node: fx.Node, key: str, value: Any) -> Any:
    if isinstance(value, (torch.Size, tuple, list)):
        return [_literal(node, key, v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"node {node.name!r}: argument {key}={value!r} is not a declared literal")


def _bind(node: fx.Node, params: tuple[str, ...]) -> dict[str, Any]:
    bound: dict[str, Any] = {}
    for i, value in enumerate(node.args):
        if i >= len(params):
            raise ConfigError(f"node {node.name!r}: {len(node.args)} positional arguments, "
                              f"expected at most {len(params)}")
        if params[i].startswith("*"):
            rest = node.args[i:]
            bound[params[i][1:]] = list(rest[0]) if len(rest) == 1 and isinstance(
                rest[0], (tuple, list, torch.Size)) else list(rest)
            break
        bound[params[i]] = value
    names = {p.lstrip("*") for p in params}
    for key, value in node.kwargs.items():
        if key not in names:
            raise ConfigError(f"node {node.name!r}: keyword {key!r} has no declared form")
        bound[key] = value
    return bound


def _function_node(node: fx.Node, op: str, bound: dict[str, Any],
                   names: dict[fx.Node, str]) -> dict[str, Any]:
    inputs: list[str] = []
    args: dict[str, Any] = {}
    first = bound.pop("input", None)
    other = bound.get("other")
    if op in ("add", "mul") and not isinstance(first, fx.Node) and isinstance(other, fx.Node):
        first, bound["other"] = other, first  # 2 * x == x * 2 (IEEE: exact)
    if op == "cat":
        tensors = bound.pop("tensors", None)
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
            raise ConfigError(f"node {node.name!r}: cat takes a list of traced values")
        inputs = [names[t] for t in tensors]
    elif not isinstance(first, fx.Node):
        raise ConfigError(f"node {node.name!r} applies {op} to a number first ({first!r}), "
                          "which has no declared form")
    else:
        inputs = [names[first]]
    for key, value in bound.items():
        if key == "_stacklevel":
            continue
        if key == "inplace" and value is True:
            if len(first.users) > 1:  # type: ignore[union-attr]
                raise ConfigError(f"node {node.name!r} ({op}) works in place on "
                                  f"{first.name!r}, which other nodes read too")  # type: ignore[union-attr]
            continue  # in place on a value nothing else reads: the same result
        if key in _FIXED:
            if value != _FIXED[key]:
                raise ConfigError(f"node {node.name!r} ({op}): {key}={value!r} has no declared "
                                  f"form (only {_FIXED[key]!r})")
        elif key == "other" and isinstance(value, fx.Node):
            inputs.append(names[value])
        elif key in ("shape", "dims"):
            args[key] = [names[v] if isinstance(v, fx.Node) else _literal(node, key, v)
                         for v in value]
        else:
            args[key] = _literal(node, key, value)
    return {"name": names[node], "op": op, "args": args, "inputs": inputs}


def _module_node(gm: fx.GraphModule, node: fx.Node, names: dict[fx.Node, str],
                 owners: dict[int, str], layers: dict[str, nn.Module]) -> dict[str, Any]:
    module = gm.get_submodule(str(node.target))
    where = f"node {node.name!r}: module {node.target!r}"
    kind, args = layer_spec(module, where)
    inputs = node.args
    wanted = 3 if kind in GRAPH_LAYERS else 1
    allowed_kw = set(GRAPH_LAYERS.get(kind, {}))
    if len(inputs) != wanted or not all(isinstance(i, fx.Node) for i in inputs) or (
            set(node.kwargs) - allowed_kw):
        raise ConfigError(f"{where} ({kind}) is called with arguments {node.args} "
                          f"{dict(node.kwargs)}; its declared form takes {wanted} traced "
                          "input(s)" + (f" and keywords {sorted(allowed_kw)}" if allowed_kw else ""))
    if getattr(module, "inplace", False) and len(inputs[0].users) > 1:  # type: ignore[union-attr]
        raise ConfigError(f"{where} ({kind}) works in place on a value other nodes read too; "
                          "use inplace=False")
    entry: dict[str, Any] = {"name": names[node], "op": kind,
                             "inputs": [names[i] for i in inputs]}  # type: ignore[index]
    if id(module) in owners:
        entry["shares"] = owners[id(module)]
    else:
        owners[id(module)] = names[node]
        layers[names[node]] = module
        entry["args"] = args
    if node.kwargs:
        entry["call"] = {k: _literal(node, k, v) for k, v in node.kwargs.items()}
    return entry


def _spec_names(graph: fx.Graph) -> dict[fx.Node, str]:
    names: dict[fx.Node, str] = {}
    used: set[str] = set()
    for node in graph.nodes:
        name = node.name if NAME_RE.match(node.name) else "v"
        while name in RESERVED_NAMES or name in used:
            name += "_"
        names[node] = name
        used.add(name)
    return names


def ancestors(nodes: list[fx.Node]) -> set[fx.Node]:
    """Every node that ``nodes`` are computed from (not ``nodes`` themselves, unless one is
    computed from another)."""
    seen: set[fx.Node] = set()
    stack = [i for n in nodes for i in n.all_input_nodes]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _live(graph: fx.Graph) -> set[fx.Node]:
    """The nodes the graph's output is computed from (and the output)."""
    outputs = [n for n in graph.nodes if n.op == "output"]
    return ancestors(outputs) | set(outputs)


def graph_spec(gm: fx.GraphModule) -> tuple[dict[str, Any], dict[str, nn.Module]]:
    """A traced module as a graph spec, and the layers that own weights (by node name)."""
    names = _spec_names(gm.graph)
    nodes: list[dict[str, Any]] = []
    owners: dict[int, str] = {}
    layers: dict[str, nn.Module] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ConfigError(f"a declared graph has one input; this one takes {len(placeholders)}")
    output: Any = None
    live = _live(gm.graph)
    for node in gm.graph.nodes:
        if node.op == "placeholder" or (node.op in ("call_function", "call_method")
                                        and node not in live):
            continue  # e.g. the unused half of an unpacked tuple; a dead layer call is refused
        if node.op == "output":
            output = node.args[0]
        elif node.op == "call_module":
            nodes.append(_module_node(gm, node, names, owners, layers))
        elif node.op == "get_attr":
            raise _refuse(node, describe_target(node), "a raw tensor, which has no declared "
                          "form (declared weights live inside standard layers)")
        elif node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
            nodes.append({"name": names[node], "op": "shape", "args": {},
                          "inputs": [names[node.args[0]]]})
        else:
            table = _METHODS if node.op == "call_method" else _FUNCTIONS
            try:
                op, params = table[node.target]
            except (KeyError, TypeError):
                raise _refuse(node, describe_target(node)) from None
            nodes.append(_function_node(node, op, _bind(node, params), names))
    if not isinstance(output, fx.Node):
        raise ConfigError(f"a declared graph returns one tensor; this one returns {output!r}")
    spec = {"input": names[placeholders[0]], "nodes": nodes, "output": names[output]}
    parse_spec(spec)  # what the data owner will check (e.g. x + x.size(0) adds an int)
    return spec, layers
