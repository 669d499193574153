"""Split an ordinary ``nn.Module`` into ordered segments at named cut points.

``nn.Sequential`` models are cut between children (cut names are the child names). Other
models are traced with ``torch.fx``; a cut goes right after one call and is valid where
exactly that call's value crosses it: no skip connection jumps over it, no parallel branch is
still open, and no weights are used on both sides (split copies would train apart). Cut names
are module names; a module called several times (one ``nn.ReLU`` reused) has one cut name per
call, ``"act#1"``, ``"act#2"``, ...; function calls are named as fx names them (``"relu_1"``).

Segments are deep copies, so training them never touches the original model, and
``segments[-1](...(segments[0](x)))`` equals ``model(x)`` exactly. A segment is an
``nn.Sequential`` where its calls form a chain, else a ``torch.fx.GraphModule`` of exactly
the model's calls (:func:`~syft_split.spec.module_to_spec` declares it as a graph spec).
"""

from __future__ import annotations

import copy
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import SplitError
from .modes import restore_modes, save_modes
from .spec_export import ancestors, describe_target

__all__ = ["cut_points", "split_model", "compose"]

# functions in a traced chain that map to a standard layer (so a chain segment stays an
# nn.Sequential of declared layers).
_FUNCTION_LAYERS: dict[Any, type[nn.Module]] = {
    torch.relu: nn.ReLU, F.relu: nn.ReLU, torch.tanh: nn.Tanh, F.tanh: nn.Tanh,
    torch.sigmoid: nn.Sigmoid, F.sigmoid: nn.Sigmoid,
}


def _trace(model: nn.Module) -> fx.GraphModule:
    """The model's graph; traced in train() and in eval() (each layer's mode given back): a
    forward that branches on ``self.training`` would be frozen in one mode, so it is refused."""
    saved = save_modes([model])
    try:
        model.train()
        gm = _trace_once(model)
        for node in gm.graph.nodes:
            if node.op == "call_function" and "training" in node.kwargs:
                raise SplitError(
                    f"node {node.name!r} calls {describe_target(node)} with training="
                    f"{node.kwargs['training']} frozen when the model was traced, so the split "
                    "model would not follow .train()/.eval(); use the module form (nn.Dropout, "
                    "nn.BatchNorm)")
        model.eval()
        if _trace_once(model).code != gm.code:
            raise SplitError(
                f"the forward of {type(model).__name__} (or of a module it calls) branches on "
                "self.training: its traced graph differs between train() and eval(), and a "
                "split would freeze one of them; move the branch into a module that is called "
                "as a layer (like nn.Dropout), or wrap the layers in an nn.Sequential")
    finally:
        restore_modes(saved)
    return gm


def _trace_once(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many kinds of errors on data-dependent control flow
        raise SplitError(
            f"cannot trace {type(model).__name__} with torch.fx ({exc}); wrap the layers in an "
            "nn.Sequential or remove data-dependent control flow from forward()"
        ) from exc


@dataclass
class _Traced:
    gm: fx.GraphModule
    entry: fx.Node
    body: list[fx.Node]                  # calls in forward order (no placeholder/output/get_attr)
    names: dict[fx.Node, str]            # cut name of each call
    calls: dict[str, list[str]]          # module called several times -> cut names of its calls
    valid: dict[str, int]                # cut name -> position in body
    last_use: dict[fx.Node, int]         # value -> position of its last reader (len(body): output)
    ties: list[tuple[int, int, str]]     # first and last call using the same weights, and whose


def _cut_names(body: list[fx.Node]) -> tuple[dict[fx.Node, str], dict[str, list[str]]]:
    count = Counter(str(n.target) for n in body if n.op == "call_module")
    seen: Counter[str] = Counter()
    names: dict[fx.Node, str] = {}
    for n in body:
        if n.op == "call_module" and count[str(n.target)] > 1:
            seen[str(n.target)] += 1
            names[n] = f"{n.target}#{seen[str(n.target)]}"
        else:
            names[n] = str(n.target) if n.op == "call_module" else n.name
    taken = Counter(names.values())
    for n in body:  # a module name equal to a function call's name: use the call's fx name
        if taken[names[n]] > 1 and n.op == "call_module":
            names[n] = n.name
    if len(set(names.values())) != len(names):
        names = {n: n.name for n in body}
    calls = {t: [names[n] for n in body if n.op == "call_module" and str(n.target) == t]
             for t, k in count.items() if k > 1}
    return names, calls


def _tensor_ids(gm: fx.GraphModule, node: fx.Node) -> dict[int, str]:
    """Weights (params and buffers) a call uses, by id -> a readable owner name."""
    out: dict[int, str] = {}
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        for key, t in [*module.named_parameters(), *module.named_buffers()]:
            out[id(t)] = f"{node.target}.{key}"
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            out[id(_fetch_attr(gm, str(arg.target)))] = str(arg.target)
    return out


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _crossing_reason(node: fx.Node, live: list[fx.Node], later: set[fx.Node],
                     label: dict[fx.Node, str]) -> str:
    """Why ``live`` values crossing a cut right after ``node`` make it invalid."""
    crossing = [label[v] for v in live]
    before = ancestors([node])
    for v in live:
        if v is node:
            continue
        readers = [u for u in v.users if u in later]
        merges = [u for u in readers if node in ancestors([u])]
        if v not in before or not merges:
            reader = label.get(readers[0], "the output") if readers else "the output"
            return (f"values {crossing} cross it: parallel branches ({label[v]!r} is still read "
                    f"after the cut by {reader!r}, beside {label[node]!r})")
    v = next(v for v in live if v is not node)
    return (f"values {crossing} cross it: a skip connection ({label[v]!r} jumps over the cut "
            "and is read after it again)")


def _analyse(gm: fx.GraphModule) -> _Traced:
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise SplitError(f"{type(gm).__name__}.forward takes {len(placeholders)} inputs; only "
                         "single-input models can be split")
    body = [n for n in nodes if n.op not in ("placeholder", "output", "get_attr")]
    order = {n: i for i, n in enumerate(body)}
    names, calls = _cut_names(body)
    last_use = {v: max((order.get(u, len(body)) for u in v.users), default=-1)
                for v in [placeholders[0], *body]}
    spans: dict[int, list[int]] = {}
    owner: dict[int, str] = {}
    for i, n in enumerate(body):
        for key, who in _tensor_ids(gm, n).items():
            spans.setdefault(key, []).append(i)
            owner.setdefault(key, who)
    ties = [(p[0], p[-1], owner[k]) for k, p in spans.items() if p[0] < p[-1]]
    valid: dict[str, int] = {}
    live = {placeholders[0]} if last_use[placeholders[0]] >= 0 else set()
    for i, node in enumerate(body[:-1]):  # sweep: the values read after position i
        live = {v for v in live if last_use[v] > i}
        if last_use[node] > i:
            live.add(node)
        if live == {node} and not any(a <= i < b for a, b, _ in ties):
            valid[names[node]] = i
    return _Traced(gm, placeholders[0], body, names, calls, valid, last_use, ties)


def _why(t: _Traced, i: int) -> str:
    """Why the position after call ``i`` is not a cut."""
    label = {**t.names, t.entry: t.entry.name}
    tied = [(a, b, who) for a, b, who in t.ties if a <= i < b]
    if tied:
        a, b, who = tied[0]
        return (f"the weights {who!r} are used on both sides of it (by {label[t.body[a]]!r} and "
                f"{label[t.body[b]]!r}); split copies would train apart")
    live = [v for v in [t.entry, *t.body[: i + 1]] if t.last_use[v] > i]
    node = t.body[i]
    if node not in live:
        return f"its value is not read after it; values {[label[v] for v in live]} cross it"
    output = next(n for n in t.gm.graph.nodes if n.op == "output")
    return _crossing_reason(node, live, set(t.body[i + 1:]) | {output}, label)


def cut_points(model: nn.Module) -> list[str]:
    """Names at which ``model`` can be split (a cut goes right after the named call)."""
    if isinstance(model, nn.Sequential):
        return [name for name, why in _sequential_cuts(model)[1].items() if not why]
    return list(_analyse(_trace(model)).valid)


def _unknown(name: str, valid: Sequence[str], why: str = "") -> SplitError:
    reason = f" ({why})" if why else ""
    return SplitError(f"cannot cut at {name!r}{reason}; valid cut names: {list(valid)}")


def _sequential_cuts(model: nn.Sequential) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """Children (repeats included, unlike ``named_children``) and cut name -> why not (or '')."""
    children = [(name, m) for name, m in model._modules.items() if m is not None]
    spans: dict[int, list[int]] = {}
    for i, (_, child) in enumerate(children):
        for t in [*child.parameters(), *child.buffers()]:
            spans.setdefault(id(t), []).append(i)
    cuts: dict[str, str] = {}
    for i, (name, _) in enumerate(children[:-1]):
        tied = [p for p in spans.values() if p[0] <= i < p[-1]]
        cuts[name] = "" if not tied else (
            f"layers {children[tied[0][0]][0]!r} and {children[tied[0][-1]][0]!r} share weights "
            "across it; split copies would train apart")
    return children, cuts


def _split_sequential(model: nn.Sequential, cuts: Sequence[str]) -> list[nn.Module]:
    children, reasons = _sequential_cuts(model)
    names = [name for name, _ in children]
    valid = [n for n, r in reasons.items() if not r]
    positions = []
    for cut in cuts:
        if cut not in valid:
            why = (reasons.get(cut) or "no such layer") if cut != names[-1] else "it is the last layer"
            raise _unknown(cut, valid, why)
        positions.append(names.index(cut) + 1)
    if positions != sorted(positions):
        raise SplitError(f"cut names must be in forward order: {list(cuts)}")
    bounds = [0, *positions, len(names)]
    return [nn.Sequential(OrderedDict(zip(names[a:b], copy.deepcopy([m for _, m in children[a:b]]))))
            for a, b in zip(bounds, bounds[1:])]


def _position(t: _Traced, cut: str) -> int:
    if cut in t.valid:
        return t.valid[cut] + 1
    if cut in t.calls:
        raise _unknown(cut, list(t.valid), f"module {cut!r} is called {len(t.calls[cut])} times; "
                       f"name the call: {t.calls[cut]}")
    idx = next((i for i, n in enumerate(t.body) if t.names[n] == cut), None)
    if idx is None:  # an fx node name (e.g. "act_1") also names its call
        idx = next((i for i, n in enumerate(t.body) if n.name == cut), None)
        if idx is not None and t.names[t.body[idx]] in t.valid:
            return idx + 1
    if idx is None:
        raise _unknown(cut, list(t.valid), "no such layer")
    if idx == len(t.body) - 1:
        raise _unknown(cut, list(t.valid), "it is the last layer")
    raise _unknown(cut, list(t.valid), _why(t, idx))


def _as_sequential(gm: fx.GraphModule, nodes: list[fx.Node], entry: fx.Node) -> nn.Module | None:
    """The calls as ``nn.Sequential`` when each only reads the previous one's value."""
    layers: list[tuple[str, nn.Module]] = []
    memo: dict[int, Any] = {}
    prev = entry
    used: set[str] = set()
    for node in nodes:
        args = list(node.args)
        if not args or args[0] is not prev or any(isinstance(a, fx.Node) for a in args[1:]):
            return None
        if node.op == "call_module" and len(args) == 1 and not node.kwargs:
            target = str(node.target)
            module = gm.get_submodule(target)
            if target in used and any(True for _ in [*module.parameters(), *module.buffers()]):
                return None  # a layer with weights called twice: keep the sharing (graph)
            used.add(target)
            layers.append((node.name, copy.deepcopy(module, memo)))
        elif (node.op == "call_function" and node.target in _FUNCTION_LAYERS and len(args) == 1
              and set(node.kwargs) <= {"inplace"}):
            layers.append((node.name, _FUNCTION_LAYERS[node.target]()))
        elif (node.op, node.target) in (("call_function", torch.flatten), ("call_method", "flatten")):
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            if not isinstance(start, int) or not isinstance(end, int) or len(args) > 3:
                return None
            layers.append((node.name, nn.Flatten(start, end)))
        else:
            return None
        prev = node
    return nn.Sequential(OrderedDict(layers))


def _segment(t: _Traced, nodes: list[fx.Node], entry: fx.Node, out: Any) -> nn.Module:
    if out is nodes[-1]:
        seq = _as_sequential(t.gm, nodes, entry)
        if seq is not None:
            return seq
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {entry: graph.placeholder("x")}
    root: dict[str, Any] = {}
    memo: dict[int, Any] = {}

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env and n.op == "get_attr":
            root[str(n.target)] = copy.deepcopy(_fetch_attr(t.gm, str(n.target)), memo)
            env[n] = graph.get_attr(str(n.target))
        return env[n]

    for node in nodes:
        if node.op == "call_module":
            root[str(node.target)] = copy.deepcopy(t.gm.get_submodule(str(node.target)), memo)
        env[node] = graph.node_copy(node, lookup)
    graph.output(fx.map_arg(out, lookup))
    return fx.GraphModule(root, graph)


def split_model(model: nn.Module, cuts: str | Sequence[str]) -> list[nn.Module]:
    """Split ``model`` right after each named cut point; return ``len(cuts) + 1`` segments.

    Each segment is a plain ``nn.Module`` (an ``nn.Sequential`` where possible) holding a copy
    of the original weights. Raises :class:`SplitError` saying why a cut is not valid
    (a skip connection, parallel branches, weights used on both sides, an ambiguous name)
    and listing the valid cut names.
    """
    if isinstance(cuts, str):
        cuts = [cuts]
    if not cuts:
        raise SplitError("give at least one cut name; valid cut names: "
                         f"{cut_points(model)}")
    if len(set(cuts)) != len(cuts):
        raise SplitError(f"cut names repeat: {list(cuts)}")
    # every layer keeps its own training flag (a frozen BatchNorm stays frozen): each is
    # tagged with it, the tag travels with its copy; modules made here take their children's
    # mode when they all agree (a frozen trunk stays frozen), else the model's
    for m in model.modules():
        m.__dict__[_MODE_TAG] = m.training
    try:
        segments = _split(model, cuts)
    finally:
        for m in model.modules():
            m.__dict__.pop(_MODE_TAG, None)
    for seg in segments:
        made = []  # containers made here: their children's mode when they agree
        for m in seg.modules():
            if _MODE_TAG in m.__dict__:
                m.training = m.__dict__.pop(_MODE_TAG)
            else:
                made.append(m)
        for m in reversed(made):  # children first
            modes = {c.training for c in m.children()}
            m.training = modes.pop() if len(modes) == 1 else model.training
    return segments


#: the attribute carrying a layer's training flag through :func:`split_model`'s copies
_MODE_TAG = "_syft_split_training"


def _split(model: nn.Module, cuts: Sequence[str]) -> list[nn.Module]:
    if isinstance(model, nn.Sequential):
        segments = _split_sequential(model, cuts)
    else:
        t = _analyse(_trace(model))
        positions = [_position(t, cut) for cut in cuts]
        if positions != sorted(positions):
            raise SplitError(f"cut names must be in forward order: {list(cuts)}")
        output = next(n for n in t.gm.graph.nodes if n.op == "output")
        bounds = [0, *positions, len(t.body)]
        entries = [t.entry, *(t.body[p - 1] for p in positions)]
        outs = [*(t.body[p - 1] for p in positions), output.args[0]]
        segments = [_segment(t, t.body[a:b], e, o)
                    for (a, b), e, o in zip(zip(bounds, bounds[1:]), entries, outs)]
    return segments


def compose(segments: Sequence[nn.Module]) -> nn.Sequential:
    """The segments back to back, as one module."""
    return nn.Sequential(*segments)
