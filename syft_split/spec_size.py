"""How big a declared segment is, from its JSON alone: the data owner's cheap first check.

:func:`spec_size` checks the spec completely (as :func:`~syft_split.spec.module_from_spec`
would) and counts its parameters with arithmetic on the declared arguments: no module is
built and no tensor allocated, so ``Linear(64, 4_000_000)`` is measured in microseconds and
refused before a gigabyte is allocated. Given the input shape, it also propagates shapes on
torch's ``meta`` device (shapes only, no memory) to find the largest activation per record,
which catches zero-parameter blow-ups (huge padding, concatenating a value with itself). It
propagates at several batch sizes: a value whose size is not proportional to the records
(e.g. an outer product across the batch) is refused, as a bound per record times the batch
would not hold for it. A MultiheadAttention node also counts, while it runs, its per-head
score matrices and their softmax (``2 x heads x L x S`` per record): they are no node's
value but are allocated.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .spec_args import layer_defaults
from .spec_graph import GraphSegment, SpecNode, build, parse_spec

__all__ = ["SpecSize", "spec_size"]

#: ops whose value is another's (an item of a tuple, the same tensor): counted once.
_ALIASES = frozenset({"getitem", "Identity"})
#: steps whose backward also keeps int64 indices of their output (two float32s' worth each)
_WITH_INDICES = frozenset({"MaxPool1d", "MaxPool2d", "max_pool1d", "max_pool2d"})
#: arguments that are sizes (a product for the shape-valued ones).
_WIDTHS = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride",
           "padding", "dilation", "num_features", "embed_dim", "num_heads", "kdim", "vdim",
           "shape")
_PRODUCTS = ("normalized_shape", "output_size", "unflattened_size")


@dataclass(frozen=True)
class SpecSize:
    """What a spec declares: ``parameters`` (trainable elements, as
    :func:`~syft_split.spec.count_parameters` counts them once built), ``buffers`` (running
    statistics), ``max_width`` (the largest size argument: features, channels, kernel, padding,
    product of a normalized/output shape), ``layers`` (layers of a chain, nodes of a graph);
    with an input shape, ``activations`` (elements per record of the largest value, for a graph
    of the values alive at once, with the score matrices of an attention node while it runs),
    ``output_shape`` (per record), ``training`` (elements per record a training forward
    keeps until its gradient returns: the input and every node's value, attention scores
    included; a value that only names another, such as an item of a tuple, counts once) and
    ``flops`` (floating-point operations of a forward per record, counted on the meta device
    over the most records propagated: torch's formulas for products, convolutions and
    attention, a pooling op's window, every other op's output elements)."""

    parameters: int
    buffers: int
    max_width: int
    layers: int
    activations: int | None = None
    output_shape: tuple[int, ...] | None = None
    training: int | None = None
    flops: int | None = None


def _int_values(value: Any) -> list[int]:
    items = value if isinstance(value, list) else [value]
    return [v for v in items if isinstance(v, int) and not isinstance(v, bool)]


def _n(value: Any, dims: int) -> int:
    """Elements of a kernel given as an int or a list."""
    return math.prod(value) if isinstance(value, list) else value**dims


def _layer_counts(node: SpecNode) -> tuple[int, int]:
    """(parameters, buffers) of a layer node, from its arguments and torch's defaults."""
    a = {**layer_defaults(node.op), **node.args}
    op = node.op
    if op == "Linear":
        return a["in_features"] * a["out_features"] + a["out_features"] * a["bias"], 0
    if op in ("Conv1d", "Conv2d"):
        cin, cout, groups = a["in_channels"], a["out_channels"], a["groups"]
        if cin % groups or cout % groups:
            raise ConfigError(f"node {node.name!r} ({op}): groups={groups} must divide "
                              f"in_channels={cin} and out_channels={cout}")
        kernel = _n(a["kernel_size"], 1 if op == "Conv1d" else 2)
        return cout * (cin // groups) * kernel + cout * a["bias"], 0
    if op in ("BatchNorm1d", "BatchNorm2d"):
        n = a["num_features"]
        return 2 * n * a["affine"], (2 * n + 1) * a["track_running_stats"]
    if op == "LayerNorm":
        n = _n(a["normalized_shape"], 1)
        return n * a["elementwise_affine"] * (1 + a["bias"]), 0
    if op == "MultiheadAttention":
        e, heads = a["embed_dim"], a["num_heads"]
        if e % heads:
            raise ConfigError(f"node {node.name!r} ({op}): embed_dim={e} must be divisible by "
                              f"num_heads={heads}")
        kdim, vdim = a["kdim"] or e, a["vdim"] or e
        return (e * (e + kdim + vdim) + 3 * e * a["bias"] + e * e + e * a["bias"]
                + 2 * e * a["add_bias_kv"]), 0
    return 0, 0


def _width(node: SpecNode) -> int:
    widths = [abs(v) for k in _WIDTHS for v in _int_values(node.args.get(k))]
    widths += [math.prod(abs(v) for v in _int_values(node.args[k])) for k in _PRODUCTS if k in node.args]
    return max(widths, default=0)


def _elements(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, tuple) and all(isinstance(v, torch.Tensor) or v is None for v in value):
        return sum(v.numel() for v in value if v is not None)
    return 0


@dataclass
class _Run:
    """One propagation at ``batch`` records: every step's label, the elements of its value and
    of what it allocates only while it runs (totals, not per record); the most elements alive
    at once; what a training forward keeps; the output."""

    batch: int
    steps: list[tuple[str, int, int]]
    largest: int
    output: Any
    kept: int = 0


def _propagate(module: nn.Module, shape: tuple[int, ...], batch: int, scores: list[int]) -> _Run:
    out: Any = torch.empty((batch, *shape), device="meta")
    largest = batch * math.prod(shape)
    if isinstance(module, GraphSegment):
        labels = [f"node {n.name!r} ({n.op})" for n in module.parsed.nodes]
        aliases = [n.op in _ALIASES for n in module.parsed.nodes]
        indices = [n.op in _WITH_INDICES for n in module.parsed.nodes]
        steps: Iterator[tuple[str, Any]] = ((n.name, v) for n, v in module.steps(out))
        output = module.parsed.output
    else:
        assert isinstance(module, nn.Sequential)
        labels = [f"layer {i} ({type(layer).__name__})" for i, layer in enumerate(module)]
        aliases = [type(layer).__name__ in _ALIASES for layer in module]
        indices = [type(layer).__name__ in _WITH_INDICES for layer in module]
        steps = _chain_steps(module, out)
        output = str(len(module) - 1)
    # a graph keeps several values at once: the bound is on those alive together
    last: dict[str, int] = {}
    alive: dict[str, int] = {}
    if isinstance(module, GraphSegment):
        last, alive = module.last_uses(), {module.parsed.input: largest}
    run = _Run(batch, [], largest, out, largest)
    scores.clear()
    try:
        with torch.no_grad():
            for j, (name, value) in enumerate(steps):
                alive[name] = _elements(value)
                transient = sum(scores)  # held only while the node runs
                scores.clear()
                run.steps.append((labels[j], alive[name], transient))
                run.kept += transient + (0 if aliases[j] else alive[name] * (3 if indices[j] else 1))
                run.largest = max(run.largest,
                                  (sum(alive.values()) if last else alive[name]) + transient)
                for gone in [n for n in alive if last.get(n, j) <= j]:
                    del alive[gone]
                if name == output:
                    run.output = value
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
        raise ConfigError(f"{labels[len(run.steps)]} does not accept its input (input per "
                          f"record {shape}, {batch} records): {exc}") from exc
    if not isinstance(run.output, torch.Tensor):
        raise ConfigError(f"the segment's output is not a tensor: {type(run.output).__name__}")
    return run


def _compute_mode() -> Any:
    """A dispatch mode counting the floating-point work of what runs under it, from shapes:
    the ledger's formulas where there is one (:mod:`syft_split.flops`: matrix products,
    convolutions, attention), a pooling
    op's output times its window (or its input, adaptive pools), every other op its output's
    elements (elementwise work): a bound, not the ledger's figure. Only what runs inside it
    is counted (no module hooks: other threads are not); views compute nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from .flops import known_formulas

    flop_registry = known_formulas()

    class Mode(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            packet = func.overloadpacket
            aliases = any(r.alias_info is not None for r in func._schema.returns)
            made = [] if aliases else _tensors(out)  # a view computes nothing
            if packet in flop_registry:
                self.flops += int(flop_registry[packet](*args, **kwargs, out_val=out))
            elif "pool" in packet.__name__ and made:
                window = args[1] if len(args) > 1 and isinstance(args[1], list | tuple) else None
                seen = sum(t.numel() for t in _tensors(args[:1]))
                self.flops += max(made[0].numel() * math.prod(window) if window else 0, seen)
            else:
                self.flops += sum(t.numel() for t in made)
            return out

    return Mode()


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def _counted(module: nn.Module, shape: tuple[int, ...], batch: int,
             scores: list[int]) -> tuple[_Run, int]:
    """:func:`_propagate` and the forward's work (shapes only: nothing is computed)."""
    with _compute_mode() as counter:
        run = _propagate(module, shape, batch, scores)
    return run, int(counter.flops)


def _activations(spec: Any, input_shape: Sequence[int],
                 max_batch: int | None = None) -> tuple[int, tuple[int, ...], int, int]:
    shape = tuple(input_shape)
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ConfigError(f"input_shape must be a non-empty list of positive ints, got {input_shape!r}")
    with torch.device("meta"):
        module = build(spec)
    module.eval()
    scores: list[int] = []
    for layer in module.modules():
        if isinstance(layer, nn.MultiheadAttention):
            layer.register_forward_pre_hook(functools.partial(_attention_scores, scores))
    # 2 as the host's probe forward; a step's memory is bounded by its size per record times
    # the records, so every value must grow linearly with them (checked at several batches)
    counted = [_counted(module, shape, b, scores) for b in sorted({2, 1, 3, max_batch or 2})]
    base, *others = [run for run, _ in counted]
    most, flops = counted[-1]
    for run in others:
        for (label, n, t), (_, m, u) in zip(base.steps, run.steps, strict=True):
            if n * run.batch != m * base.batch or t * run.batch != u * base.batch:
                what = "its value holds" if n * run.batch != m * base.batch else "it allocates"
                got = (n, m) if n * run.batch != m * base.batch else (t, u)
                raise ConfigError(
                    f"{label}: {what} {got[0]} elements for {base.batch} record(s) and {got[1]} "
                    f"for {run.batch}: not proportional to the records (a value's size must "
                    "grow linearly with the batch; per-record bounds would not hold)")
    return (base.largest // base.batch, tuple(base.output.shape[1:]), base.kept // base.batch,
            -(-flops // most.batch))


def _attention_scores(found: list[int], layer: nn.MultiheadAttention,
                      args: tuple[Any, ...]) -> None:
    """Record the elements of the per-head score matrices a MultiheadAttention call makes
    (batch x heads x L x S, and their softmax; with dropout its mask and result too): no
    node's value, yet allocated while it runs."""
    query, key = args[0], args[1]
    if query.dim() == 3:
        batch, length = query.shape[:2] if layer.batch_first else query.shape[1::-1]
        source = key.shape[1] if layer.batch_first else key.shape[0]
    else:  # unbatched (L, E)
        batch, length, source = 1, query.shape[0], key.shape[0]
    source += (layer.bias_k is not None) + layer.add_zero_attn
    # scores and softmax; with dropout also its mask and the dropped weights (kept for backward)
    found.append((4 if layer.dropout > 0 else 2) * batch * layer.num_heads * length * source)


def _chain_steps(module: nn.Sequential, x: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    for i, layer in enumerate(module):
        x = layer(x)
        yield str(i), x


def spec_size(spec: Any, input_shape: Sequence[int] | None = None, *,
              max_batch: int | None = None) -> SpecSize:
    """Count what ``spec`` declares without building it; raise ConfigError if it is malformed.

    ``input_shape`` (per record): also propagate shapes on the meta device (no memory) and
    report the largest activation; a spec that does not accept that input is refused, and so
    is one with a value whose size is not proportional to the records (propagated with 1, 2,
    3 and ``max_batch`` records), as a per-record bound times the batch would not hold."""
    parsed = parse_spec(spec)
    params = buffers = width = 0
    for node in parsed.nodes:
        if node.is_layer and node.shares is None:
            p, b = _layer_counts(node)
            params, buffers = params + p, buffers + b
        width = max(width, _width(node))
    size = SpecSize(params, buffers, width, len(parsed.nodes))
    if input_shape is None:
        return size
    activations, out_shape, training, flops = _activations(spec, input_shape, max_batch)
    return SpecSize(params, buffers, width, len(parsed.nodes), activations, out_shape, training,
                    flops)
