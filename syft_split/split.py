"""Split an ordinary ``nn.Module`` into ordered segments at named cut points.

``nn.Sequential`` models are cut between children (cut names are the child names). Other
models are traced with ``torch.fx``; a cut is valid where exactly one value crosses it (no
skip connection jumps over it). Segments are deep copies, so training them never touches
the original model, and ``segments[-1](...(segments[0](x)))`` equals ``model(x)`` exactly.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from .errors import SplitError

__all__ = ["cut_points", "split_model", "compose"]

# functions/methods in a traced graph that map to a standard layer (so the segment can be
# placed on a data owner as a declared spec).
_FUNCTION_LAYERS = {
    torch.relu: nn.ReLU,
    torch.nn.functional.relu: nn.ReLU,
    torch.tanh: nn.Tanh,
    torch.sigmoid: nn.Sigmoid,
}


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many kinds of errors on data-dependent control flow
        raise SplitError(
            f"cannot trace {type(model).__name__} with torch.fx ({exc}); wrap the layers in an "
            "nn.Sequential or remove data-dependent control flow from forward()"
        ) from exc


def _cut_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _analyse(gm: fx.GraphModule) -> tuple[list[fx.Node], dict[str, int], dict[int, list[str]]]:
    """Compute nodes, valid cut names -> index, and for invalid positions the crossing values."""
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise SplitError(
            f"{type(gm).__name__}.forward takes {len(placeholders)} inputs; only single-input "
            "models can be split"
        )
    body = [n for n in nodes if n.op not in ("placeholder", "output")]
    order = {n: i for i, n in enumerate(body)}
    valid: dict[str, int] = {}
    crossing: dict[int, list[str]] = {}
    for i, node in enumerate(body[:-1]):
        live = [
            n for n in [placeholders[0], *body[: i + 1]]
            if any(u.op == "output" or order.get(u, -1) > i for u in n.users)
        ]
        if live == [node]:
            valid[_cut_name(node)] = i
        else:
            crossing[i] = [n.name for n in live]
    return body, valid, crossing


def cut_points(model: nn.Module) -> list[str]:
    """Names at which ``model`` can be split (a cut goes right after the named layer)."""
    if isinstance(model, nn.Sequential):
        return [name for name, _ in list(model.named_children())[:-1]]
    _, valid, _ = _analyse(_trace(model))
    return list(valid)


def _unknown(name: str, valid: Sequence[str], why: str = "") -> SplitError:
    reason = f" ({why})" if why else ""
    return SplitError(f"cannot cut at {name!r}{reason}; valid cut names: {list(valid)}")


def _split_sequential(model: nn.Sequential, cuts: Sequence[str]) -> list[nn.Module]:
    names = [name for name, _ in model.named_children()]
    valid = names[:-1]
    positions = []
    for cut in cuts:
        if cut not in valid:
            why = "it is the last layer" if cut in names else "no such layer"
            raise _unknown(cut, valid, why)
        positions.append(names.index(cut) + 1)
    bounds = [0, *positions, len(names)]
    children = list(model.named_children())
    return [
        nn.Sequential(OrderedDict((n, copy.deepcopy(m)) for n, m in children[a:b]))
        for a, b in zip(bounds, bounds[1:])
    ]


def _as_sequential(gm: fx.GraphModule, nodes: list[fx.Node]) -> nn.Module | None:
    """Rebuild a chain of nodes as ``nn.Sequential`` when each node only feeds the next."""
    layers: list[tuple[str, nn.Module]] = []
    prev: fx.Node | None = None
    for node in nodes:
        args = list(node.args)
        if prev is not None and (not args or args[0] is not prev):
            return None
        if node.op == "call_module" and len(args) == 1 and not node.kwargs:
            layers.append((str(node.target).replace(".", "_"),
                           copy.deepcopy(gm.get_submodule(str(node.target)))))
        elif node.op == "call_function" and node.target in _FUNCTION_LAYERS and len(args) == 1:  # type: ignore[comparison-overlap]
            layers.append((node.name, _FUNCTION_LAYERS[node.target]()))  # type: ignore[index]
        elif node.op in ("call_function", "call_method") and node.target in (torch.flatten,
                                                                            "flatten"):
            rest = args[1:] + list(node.kwargs.values())
            if not all(isinstance(a, int) for a in rest):
                return None
            layers.append((node.name, nn.Flatten(*rest) if rest else nn.Flatten(0)))  # type: ignore[arg-type]
        else:
            return None
        prev = node
    return nn.Sequential(OrderedDict(layers))


def _graph_segment(gm: fx.GraphModule, nodes: list[fx.Node]) -> nn.Module:
    seq = _as_sequential(gm, nodes)
    if seq is not None:
        return seq
    graph = fx.Graph()
    entry = nodes[0].all_input_nodes
    env: dict[fx.Node, fx.Node] = {}
    x = graph.placeholder("x")
    for n in entry:
        env[n] = x
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[nodes[-1]])
    return fx.GraphModule(copy.deepcopy(gm), graph)


def split_model(model: nn.Module, cuts: str | Sequence[str]) -> list[nn.Module]:
    """Split ``model`` right after each named cut point; return ``len(cuts) + 1`` segments.

    Each segment is a plain ``nn.Module`` (an ``nn.Sequential`` where possible) holding a copy
    of the original weights. Raises :class:`SplitError` listing the valid cut names.
    """
    if isinstance(cuts, str):
        cuts = [cuts]
    if not cuts:
        raise SplitError("give at least one cut name; valid cut names: "
                         f"{cut_points(model)}")
    if len(set(cuts)) != len(cuts):
        raise SplitError(f"cut names repeat: {list(cuts)}")
    if isinstance(model, nn.Sequential):
        segments = _split_sequential(model, cuts)
    else:
        gm = _trace(model)
        body, valid, crossing = _analyse(gm)
        names_by_index = {i: _cut_name(n) for i, n in enumerate(body)}
        positions = []
        for cut in cuts:
            if cut in valid:
                positions.append(valid[cut] + 1)
                continue
            idx = next((i for i, nm in names_by_index.items() if nm == cut), None)
            if idx is None:
                raise _unknown(cut, list(valid), "no such layer")
            if idx == len(body) - 1:
                raise _unknown(cut, list(valid), "it is the last layer")
            raise _unknown(cut, list(valid),
                           f"values {crossing.get(idx)} cross it: a skip connection")
        if positions != sorted(positions):
            raise SplitError(f"cut names must be in forward order: {list(cuts)}")
        bounds = [0, *positions, len(body)]
        segments = [_graph_segment(gm, body[a:b]) for a, b in zip(bounds, bounds[1:])]
    if isinstance(model, nn.Sequential):
        positions_ok = [list(dict(model.named_children())).index(c) for c in cuts]
        if positions_ok != sorted(positions_ok):
            raise SplitError(f"cut names must be in forward order: {list(cuts)}")
    for seg in segments:
        seg.train(model.training)
    return segments


def compose(segments: Sequence[nn.Module]) -> nn.Sequential:
    """The segments back to back, as one module."""
    return nn.Sequential(*segments)
