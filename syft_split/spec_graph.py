"""Both declared spec forms, checked, and the module that runs a declared graph.

A spec is JSON the data owner reads before anything runs. Two forms:

- **chain** (``{"layers": [{"type", "args"}, ...]}``): standard layers applied one after the
  other; rebuilt as ``nn.Sequential`` (state keys ``"0.weight"``, ...).
- **graph** (``{"input": "x", "nodes": [...], "output": "name"}``): the output is a node (not
  the input) and every node is one the output is computed from; each node is
  ``{"name", "op", "args", "inputs"}`` where ``op`` is a standard layer or a functional op of
  :data:`~syft_split.spec_args.OPS` and ``inputs`` name the spec's input or earlier nodes
  (so the graph has no cycles). A node ``{"name", "op", "shares": "fc", "inputs"}`` calls the
  same layer (same weights) as node ``fc``. Rebuilt as :class:`GraphSegment`, a small
  interpreter that runs exactly the declared nodes in order (state keys ``"layers.fc.weight"``).

:func:`parse_spec` checks either form completely (types, names, wiring; a key neither form
declares is refused, and so is a spec giving both ``layers`` and ``nodes``) without building
anything; :func:`build` makes the module.
"""

from __future__ import annotations

import copy
import functools
import operator
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .spec_args import GRAPH_LAYERS, LAYER_ARG_TYPES, OPS, REQUIRED, check_args, layer_defaults

__all__ = ["MAX_NODES", "SpecNode", "ParsedSpec", "GraphSegment", "parse_spec", "build",
           "build_layer", "allowed_ops",
           "check_layer_args", "NAME_RE", "RESERVED_NAMES"]

#: the most layers/nodes a spec may declare (a larger spec is refused before any check).
MAX_NODES = 4096
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
RESERVED_NAMES = frozenset(dir(nn.ModuleDict()))
_GRAPH_KEYS = {"name", "op", "args", "inputs", "shares", "call"}
_CHAIN_KEYS = {"type", "args"}


def allowed_ops() -> str:
    """The allow-list, as error messages print it."""
    return f"layers {sorted(LAYER_ARG_TYPES)}; functions {sorted(OPS)}"


@dataclass(frozen=True)
class SpecNode:
    """One checked layer or op. ``kind`` is what it produces: tensor, tuple, int or shape."""

    name: str
    op: str
    args: dict[str, Any]
    inputs: tuple[str, ...]
    shares: str | None = None
    call: dict[str, Any] = field(default_factory=dict)
    kind: str = "tensor"

    @property
    def is_layer(self) -> bool:
        return self.op in LAYER_ARG_TYPES


@dataclass(frozen=True)
class ParsedSpec:
    """A checked spec: ``form`` is ``"chain"`` or ``"graph"``."""

    form: str
    input: str
    nodes: tuple[SpecNode, ...]
    output: str


@functools.cache
def _required(kind: str) -> tuple[str, ...]:
    return tuple(a for a in LAYER_ARG_TYPES[kind] if a not in layer_defaults(kind))


def check_layer_args(where: str, kind: str, args: Any) -> dict[str, Any]:
    """``args`` if they are valid arguments of layer ``kind`` (JSON types), else ConfigError."""
    return check_args(where, args, LAYER_ARG_TYPES[kind], _required(kind))


def _parse_chain(spec: dict[str, Any]) -> ParsedSpec:
    extra = sorted(set(spec) - {"layers"})
    if extra:
        raise ConfigError(f"chain spec: keys {extra} not allowed; allowed: layers")
    layers = spec["layers"]
    if len(layers) > MAX_NODES:
        raise ConfigError(f"spec declares {len(layers)} layers; at most {MAX_NODES}")
    nodes = []
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict):
            raise ConfigError(f"layer {i}: expected an object, got {entry!r}")
        extra = sorted(set(entry) - _CHAIN_KEYS)
        if extra:
            raise ConfigError(f"layer {i}: keys {extra} not allowed; allowed: "
                              f"{sorted(_CHAIN_KEYS)}")
        kind = entry.get("type")
        if kind not in LAYER_ARG_TYPES:
            raise ConfigError(f"layer {i}: type {kind!r} is not allowed; allowed: "
                              f"{sorted(LAYER_ARG_TYPES)}")
        if kind in GRAPH_LAYERS:
            raise ConfigError(f"layer {i}: {kind} takes several inputs or returns a tuple; "
                              "declare it in a graph spec")
        args = check_layer_args(f"layer {i} ({kind})", kind, entry.get("args", {}))
        nodes.append(SpecNode(str(i), kind, args, (str(i - 1) if i else "input",)))
    return ParsedSpec("chain", "input", tuple(nodes), nodes[-1].name if nodes else "input")


def _kind_of(where: str, op: str, inputs: list[SpecNode | str], args: dict[str, Any]) -> str:
    """The value kind ``op`` produces, checking the kinds it reads ("input" is a tensor)."""
    kinds = ["tensor" if isinstance(i, str) else i.kind for i in inputs]
    if op == "getitem":
        if kinds[0] == "tuple":
            if args["index"] not in (0, 1):
                raise ConfigError(f"{where}: index {args['index']} of an attention output "
                                  "must be 0 (output) or 1 (weights)")
            return "tensor"
        if kinds[0] == "shape":
            return "int"
        raise ConfigError(f"{where}: getitem reads a tuple or a shape, not a {kinds[0]}")
    if any(k != "tensor" for k in kinds):
        raise ConfigError(f"{where}: {op} reads tensors, but its inputs are {kinds}")
    if op == "MultiheadAttention":
        return "tuple"
    if op == "size":
        return "shape" if args["dim"] is None else "int"
    return "shape" if op == "shape" else "tensor"


def _graph_node(j: int, entry: Any, known: dict[str, SpecNode | str]) -> SpecNode:
    if not isinstance(entry, dict):
        raise ConfigError(f"node {j}: expected an object, got {entry!r}")
    name = entry.get("name")
    where = f"node {j} ({name!r})"
    extra = sorted(set(entry) - _GRAPH_KEYS)
    if extra:
        raise ConfigError(f"{where}: keys {extra} not allowed; allowed: {sorted(_GRAPH_KEYS)}")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"{where}: a name is an identifier of at most 64 characters")
    if name in known:
        raise ConfigError(f"{where}: the name {name!r} is already used")
    raw_inputs = entry.get("inputs")
    if not isinstance(raw_inputs, list) or not all(isinstance(i, str) for i in raw_inputs):
        raise ConfigError(f"{where}: inputs must be a list of names, got {raw_inputs!r}")
    unknown = [i for i in raw_inputs if i not in known]
    if unknown:
        raise ConfigError(f"{where}: inputs {unknown} are not the input or an earlier node")
    inputs = [known[i] for i in raw_inputs]
    op, shares = entry.get("op"), entry.get("shares")
    if shares is not None:
        owner = known.get(shares) if isinstance(shares, str) else None
        if not isinstance(owner, SpecNode) or not owner.is_layer or owner.shares is not None:
            raise ConfigError(f"{where}: shares={shares!r} must name an earlier layer node that "
                              "owns its weights")
        if op not in (None, owner.op) or "args" in entry:
            raise ConfigError(f"{where}: a node sharing {shares!r} repeats no args and its op "
                              f"is {owner.op!r}")
        op, args = owner.op, owner.args
    elif op in LAYER_ARG_TYPES:
        if name in RESERVED_NAMES:
            raise ConfigError(f"{where}: a layer's name is not a torch.nn.Module attribute")
        args = check_layer_args(f"{where} ({op})", op, entry.get("args", {}))
    elif op in OPS:
        spec_args = OPS[op].args
        given = check_args(f"{where} ({op})", entry.get("args", {}),
                           {k: t for k, (t, _) in spec_args.items()})
        missing = [k for k, (_, d) in spec_args.items() if d is REQUIRED and k not in given]
        if missing:
            raise ConfigError(f"{where} ({op}): missing arguments {missing}")
        args = {k: given.get(k, d) for k, (_, d) in spec_args.items()
                if not (k == "other" and given.get(k) is None)}
    else:
        raise ConfigError(f"{where}: op {op!r} is not allowed; allowed: {allowed_ops()}")
    call = entry.get("call", {})
    call = check_args(f"{where} ({op})", call, GRAPH_LAYERS.get(op, {}))
    least, most = OPS[op].inputs if op in OPS else (3, 3) if op in GRAPH_LAYERS else (1, 1)
    if not least <= len(inputs) <= (most if most is not None else len(inputs)):
        wanted = least if least == most else f"{least} to {most or 'any number of'}"
        raise ConfigError(f"{where} ({op}): takes {wanted} inputs, got {len(inputs)}")
    if op in ("add", "sub", "mul", "div") and (len(inputs) == 2) == ("other" in args):
        raise ConfigError(f"{where} ({op}): give two inputs, or one input and a number 'other'")
    for ref in args.get("shape", []) if op in ("reshape", "view") else []:
        target = known.get(ref) if isinstance(ref, str) else None
        if isinstance(ref, str) and (not isinstance(target, SpecNode) or target.kind != "int"):
            raise ConfigError(f"{where} ({op}): shape entry {ref!r} must be an int or an "
                              "earlier node holding an int (e.g. a size)")
    kind = _kind_of(f"{where} ({op})", op, inputs, args)
    return SpecNode(name, op, args, tuple(raw_inputs), shares, call, kind)


def _parse_graph(spec: dict[str, Any]) -> ParsedSpec:
    extra = sorted(set(spec) - {"input", "nodes", "output"})
    if extra:
        raise ConfigError(f"graph spec: keys {extra} not allowed; allowed: input, nodes, output")
    entry, nodes = spec.get("input"), spec["nodes"]
    if not isinstance(entry, str) or not NAME_RE.match(entry):
        raise ConfigError(f"graph spec: input must be an identifier, got {entry!r}")
    if not 1 <= len(nodes) <= MAX_NODES:
        raise ConfigError(f"graph spec declares {len(nodes)} nodes; expected 1 to {MAX_NODES}")
    known: dict[str, SpecNode | str] = {entry: entry}
    parsed = []
    for j, raw in enumerate(nodes):
        node = _graph_node(j, raw, known)
        known[node.name] = node
        parsed.append(node)
    out = spec.get("output")
    target = known.get(out) if isinstance(out, str) else None
    if not isinstance(target, SpecNode) or target.kind != "tensor":
        raise ConfigError(f"graph spec: output {out!r} must name a node holding a tensor"
                          + (" (not the input)" if out == entry else ""))
    needed = {target.name}
    for node in reversed(parsed):
        if node.name in needed:
            needed.update(node.inputs)
            if node.op in ("reshape", "view"):
                needed.update(s for s in node.args["shape"] if isinstance(s, str))
    unused = [node.name for node in parsed if node.name not in needed]
    if unused:
        raise ConfigError(f"graph spec: nodes {unused[:8]}{' ...' if len(unused) > 8 else ''} do "
                          f"not reach the output {target.name!r}: a graph lists only the nodes "
                          "its output is computed from")
    return ParsedSpec("graph", entry, tuple(parsed), target.name)


def parse_spec(spec: Any) -> ParsedSpec:
    """Check a spec of either form completely; raise ConfigError naming the first problem."""
    if isinstance(spec, dict) and "layers" in spec and "nodes" in spec:
        raise ConfigError("segment spec declares both 'layers' (a chain) and 'nodes' (a graph); "
                          "a spec is one or the other")
    if isinstance(spec, dict) and isinstance(spec.get("layers"), list):
        return _parse_chain(spec)
    if isinstance(spec, dict) and isinstance(spec.get("nodes"), list):
        return _parse_graph(spec)
    raise ConfigError("segment spec must be an object with a 'layers' list (a chain) or a "
                      "'nodes' list (a graph)")


def _ctor(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def build_layer(where: str, kind: str, args: dict[str, Any]) -> nn.Module:
    """``torch.nn.<kind>(**args)`` for checked args; torch's own refusals become ConfigError."""
    try:
        return getattr(nn, kind)(**{k: _ctor(v) for k, v in args.items()})  # type: ignore[no-any-return]
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise ConfigError(f"{where}: invalid arguments {args}: {exc}") from exc


def _binary(fn: Callable[[Any, Any], Any]) -> Callable[[list[Any], dict[str, Any]], Any]:
    return lambda v, a: fn(v[0], v[1] if len(v) == 2 else a["other"])


def _pool(fn: Callable[..., Any]) -> Callable[[list[Any], dict[str, Any]], Any]:
    return lambda v, a: fn(v[0], **{k: _ctor(x) for k, x in a.items()})


_RUN: dict[str, Callable[[list[Any], dict[str, Any]], Any]] = {
    "add": _binary(operator.add),
    "sub": _binary(operator.sub),
    "mul": _binary(operator.mul),
    "div": _binary(operator.truediv),
    "matmul": lambda v, a: operator.matmul(v[0], v[1]),
    "cat": lambda v, a: torch.cat(v, dim=a["dim"]),
    "flatten": lambda v, a: torch.flatten(v[0], a["start_dim"], a["end_dim"]),
    "relu": lambda v, a: torch.relu(v[0]),
    "tanh": lambda v, a: torch.tanh(v[0]),
    "sigmoid": lambda v, a: torch.sigmoid(v[0]),
    "gelu": lambda v, a: F.gelu(v[0], approximate=a["approximate"]),
    "softmax": lambda v, a: F.softmax(v[0], dim=a["dim"]),
    "max_pool1d": _pool(F.max_pool1d),
    "max_pool2d": _pool(F.max_pool2d),
    "avg_pool1d": _pool(F.avg_pool1d),
    "avg_pool2d": _pool(F.avg_pool2d),
    "adaptive_avg_pool1d": _pool(F.adaptive_avg_pool1d),
    "adaptive_avg_pool2d": _pool(F.adaptive_avg_pool2d),
    "reshape": lambda v, a: v[0].reshape(a["shape"]),
    "view": lambda v, a: v[0].view(a["shape"]),
    "transpose": lambda v, a: v[0].transpose(a["dim0"], a["dim1"]),
    "permute": lambda v, a: v[0].permute(a["dims"]),
    "mean": lambda v, a: v[0].mean(dim=_ctor(a["dim"]), keepdim=a["keepdim"]),
    "unsqueeze": lambda v, a: v[0].unsqueeze(a["dim"]),
    "contiguous": lambda v, a: v[0].contiguous(),
    "getitem": lambda v, a: v[0][a["index"]],
    "size": lambda v, a: v[0].size() if a["dim"] is None else v[0].size(a["dim"]),
    "shape": lambda v, a: v[0].shape,
}


class GraphSegment(nn.Module):
    """Runs a declared graph: each node, in the declared order, on the values it names.

    Layers live in ``self.layers`` under their node's name; nothing else runs."""

    def __init__(self, parsed: ParsedSpec, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = copy.deepcopy(spec)
        self.parsed = parsed
        self.layers = nn.ModuleDict()
        for j, node in enumerate(parsed.nodes):
            if node.is_layer and node.shares is None:
                self.layers[node.name] = build_layer(f"node {j} ({node.name!r}, {node.op})",
                                                     node.op, node.args)

    def last_uses(self) -> dict[str, int]:
        """For every value, the index of the last node that reads it (the output: past the
        end); a value nobody reads is dropped right after its node."""
        last = {n.name: j for j, n in enumerate(self.parsed.nodes)}
        last[self.parsed.input] = -1
        for j, node in enumerate(self.parsed.nodes):
            refs = list(node.inputs)
            if node.op in ("reshape", "view") and not node.is_layer:
                refs += [s for s in node.args["shape"] if isinstance(s, str)]
            for name in refs:
                last[name] = max(last.get(name, j), j)
        last[self.parsed.output] = len(self.parsed.nodes)
        return last

    def steps(self, x: torch.Tensor) -> Iterator[tuple[SpecNode, Any]]:
        """Run the nodes in order on input ``x``, yielding each node with its value; a value
        is dropped after the last node that reads it (memory: the values alive at once)."""
        env: dict[str, Any] = {self.parsed.input: x}
        last = self.last_uses()
        for j, node in enumerate(self.parsed.nodes):
            values = [env[i] for i in node.inputs]
            if node.is_layer:
                env[node.name] = self.layers[node.shares or node.name](*values, **node.call)
            else:
                args = node.args
                if node.op in ("reshape", "view"):
                    args = {"shape": [env[s] if isinstance(s, str) else s for s in args["shape"]]}
                env[node.name] = _RUN[node.op](values, args)
            value = env[node.name]
            del values
            for name in [n for n in env if last.get(n, j) <= j]:
                del env[name]
            yield node, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for node, value in self.steps(x):
            if node.name == self.parsed.output:
                out = value
        return out


def build(spec: Any) -> nn.Sequential | GraphSegment:
    """The module a spec declares: ``nn.Sequential`` (chain) or :class:`GraphSegment`."""
    parsed = parse_spec(spec)
    if parsed.form == "graph":
        return GraphSegment(parsed, spec)
    return nn.Sequential(*(build_layer(f"layer {i} ({n.op})", n.op, n.args)
                           for i, n in enumerate(parsed.nodes)))
