"""What a declared segment may contain, and the type of every argument it may carry.

A data owner rebuilds a segment from JSON, so every argument is checked for its exact JSON
type before torch sees it: sizes are ints (never floats, bools or strings), flags are bools,
probabilities are numbers in [0, 1]. :data:`LAYER_ARG_TYPES` lists the standard ``torch.nn``
layers a spec may name (both spec forms); :data:`OPS` lists the few functional operations a
*graph* spec may use between layers. Nothing here builds a module or allocates a tensor.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import ConfigError

__all__ = ["LAYER_ARG_TYPES", "LAYER_ARGS", "GRAPH_LAYERS", "OPS", "ArgType", "OpDef",
           "MAX_CAT_INPUTS", "check_args", "layer_defaults"]


@dataclass(frozen=True)
class ArgType:
    """An argument's JSON type: ``expected`` is what the error message says."""

    expected: str
    ok: Callable[[Any], bool]


def _is_int(v: Any, lo: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ints(lo: int | None, n: int | None, *, single: bool = True) -> ArgType:
    """An int >= lo (if ``single``), or a list of ``n`` such ints (any length >= 1 if None)."""
    bound = "" if lo is None else f" >= {lo}"
    count = "" if n is None else f"{n} "
    text = (f"an int{bound} or " if single else "") + f"a list of {count}ints{bound}"
    return ArgType(text, lambda v: (single and _is_int(v, lo)) or (
        isinstance(v, list) and (len(v) == n if n is not None else len(v) >= 1)
        and all(_is_int(e, lo) for e in v)))


def _opt(t: ArgType) -> ArgType:
    return ArgType(f"null or {t.expected}", lambda v: v is None or t.ok(v))


def _choice(*options: str) -> ArgType:
    return ArgType(f"one of {list(options)}", lambda v: isinstance(v, str) and v in options)


def _either(a: ArgType, b: ArgType) -> ArgType:
    return ArgType(f"{a.expected}, or {b.expected}", lambda v: a.ok(v) or b.ok(v))


POS = ArgType("an int >= 1", lambda v: _is_int(v, 1))
INT = ArgType("an int", _is_int)
BOOL = ArgType("a bool", lambda v: isinstance(v, bool))
NUM = ArgType("a finite number", _is_num)
POS_NUM = ArgType("a number > 0", lambda v: _is_num(v) and v > 0)
PROB = ArgType("a number in [0, 1]", lambda v: _is_num(v) and 0 <= v <= 1)
DIMS = _ints(None, None)
SIZES = ArgType("a list of ints >= 1 or -1",
                lambda v: isinstance(v, list) and len(v) >= 1
                and all(_is_int(e, 1) or e == -1 for e in v))
#: reshape/view sizes: ints (>= -1) or names of earlier nodes holding an int (``x.size(0)``)
SHAPE = ArgType("a list of ints >= -1 or names of int-valued nodes",
                lambda v: isinstance(v, list) and len(v) >= 1
                and all(_is_int(e, -1) or isinstance(e, str) for e in v))


def _conv(n: int) -> dict[str, ArgType]:
    return {"in_channels": POS, "out_channels": POS, "kernel_size": _ints(1, n),
            "stride": _ints(1, n), "padding": _either(_ints(0, n), _choice("same", "valid")),
            "dilation": _ints(1, n), "groups": POS, "bias": BOOL,
            "padding_mode": _choice("zeros", "reflect", "replicate", "circular")}


def _max_pool(n: int) -> dict[str, ArgType]:
    return {"kernel_size": _ints(1, n), "stride": _opt(_ints(1, n)), "padding": _ints(0, n),
            "dilation": _ints(1, n), "ceil_mode": BOOL}


def _avg_pool(n: int) -> dict[str, ArgType]:
    return {"kernel_size": _ints(1, n), "stride": _opt(_ints(1, n)), "padding": _ints(0, n),
            "ceil_mode": BOOL, "count_include_pad": BOOL}


def _batch_norm() -> dict[str, ArgType]:
    return {"num_features": POS, "eps": POS_NUM, "momentum": _opt(PROB), "affine": BOOL,
            "track_running_stats": BOOL}


#: layer type -> its constructor arguments (in spec order) and their JSON types.
LAYER_ARG_TYPES: dict[str, dict[str, ArgType]] = {
    "Linear": {"in_features": POS, "out_features": POS, "bias": BOOL},
    "Conv1d": _conv(1),
    "Conv2d": _conv(2),
    "MaxPool1d": _max_pool(1),
    "MaxPool2d": _max_pool(2),
    "AvgPool1d": _avg_pool(1),
    "AvgPool2d": _avg_pool(2),
    "AdaptiveAvgPool1d": {"output_size": _ints(1, 1)},
    "AdaptiveAvgPool2d": {"output_size": _ints(1, 2)},
    "BatchNorm1d": _batch_norm(),
    "BatchNorm2d": _batch_norm(),
    "LayerNorm": {"normalized_shape": _ints(1, None), "eps": POS_NUM, "elementwise_affine": BOOL,
                  "bias": BOOL},
    "Dropout": {"p": PROB},
    "Flatten": {"start_dim": INT, "end_dim": INT},
    "Unflatten": {"dim": INT, "unflattened_size": SIZES},
    "ReLU": {},
    "LeakyReLU": {"negative_slope": NUM},
    "ELU": {"alpha": NUM},
    "GELU": {"approximate": _choice("none", "tanh")},
    "Tanh": {},
    "Sigmoid": {},
    "Softmax": {"dim": INT},
    "Identity": {},
    "MultiheadAttention": {"embed_dim": POS, "num_heads": POS, "dropout": PROB, "bias": BOOL,
                           "add_bias_kv": BOOL, "add_zero_attn": BOOL, "kdim": _opt(POS),
                           "vdim": _opt(POS), "batch_first": BOOL},
}

#: layer type -> constructor arguments read from (and passed back to) the module.
LAYER_ARGS: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in LAYER_ARG_TYPES.items()}

#: layers that take several inputs or return a tuple: only a graph spec can wire them.
GRAPH_LAYERS: dict[str, dict[str, ArgType]] = {
    "MultiheadAttention": {"need_weights": BOOL, "average_attn_weights": BOOL},
}


def layer_defaults(kind: str) -> dict[str, Any]:
    """The torch defaults of ``kind``'s declared arguments (required ones are absent)."""
    return dict(_defaults(kind))


@functools.cache
def _defaults(kind: str) -> tuple[tuple[str, Any], ...]:
    params = inspect.signature(getattr(nn, kind).__init__).parameters
    return tuple((a, params[a].default) for a in LAYER_ARGS[kind]
                 if params[a].default is not inspect.Parameter.empty)


@dataclass(frozen=True)
class OpDef:
    """A functional operation of a graph spec: how many tensor inputs, which literal args.

    ``inputs`` is ``(least, most)`` (``most=None``: any number); ``args`` maps each literal
    argument to its type and default (``REQUIRED`` when there is none)."""

    inputs: tuple[int, int | None]
    args: dict[str, tuple[ArgType, Any]]


REQUIRED = object()
#: the most inputs a ``cat`` node lists (a name may be listed more than once; as many as
#: ``HostLimits.max_layers``' default, so any graph of distinct values fits)
MAX_CAT_INPUTS = 256
_SCALAR: dict[str, tuple[ArgType, Any]] = {"other": (_opt(NUM), None)}


def _pool(n: int, avg: bool) -> dict[str, tuple[ArgType, Any]]:
    ints = _ints(1, n)
    out = {"kernel_size": (ints, REQUIRED), "stride": (_opt(ints), None),
           "padding": (_ints(0, n), 0), "ceil_mode": (BOOL, False)}
    if avg:
        out["count_include_pad"] = (BOOL, True)
    else:
        out["dilation"] = (ints, 1)
    return out


#: functional op -> its definition. Binary ops take two tensors, or one and ``other`` (a number).
OPS: dict[str, OpDef] = {
    "add": OpDef((1, 2), _SCALAR),
    "sub": OpDef((1, 2), _SCALAR),
    "mul": OpDef((1, 2), _SCALAR),
    "div": OpDef((1, 2), _SCALAR),
    "matmul": OpDef((2, 2), {}),
    "cat": OpDef((1, MAX_CAT_INPUTS), {"dim": (INT, 0)}),
    "flatten": OpDef((1, 1), {"start_dim": (INT, 0), "end_dim": (INT, -1)}),
    "relu": OpDef((1, 1), {}),
    "tanh": OpDef((1, 1), {}),
    "sigmoid": OpDef((1, 1), {}),
    "gelu": OpDef((1, 1), {"approximate": (_choice("none", "tanh"), "none")}),
    "softmax": OpDef((1, 1), {"dim": (INT, REQUIRED)}),
    "max_pool1d": OpDef((1, 1), _pool(1, avg=False)),
    "max_pool2d": OpDef((1, 1), _pool(2, avg=False)),
    "avg_pool1d": OpDef((1, 1), _pool(1, avg=True)),
    "avg_pool2d": OpDef((1, 1), _pool(2, avg=True)),
    "adaptive_avg_pool1d": OpDef((1, 1), {"output_size": (_ints(1, 1), REQUIRED)}),
    "adaptive_avg_pool2d": OpDef((1, 1), {"output_size": (_ints(1, 2), REQUIRED)}),
    "reshape": OpDef((1, 1), {"shape": (SHAPE, REQUIRED)}),
    "view": OpDef((1, 1), {"shape": (SHAPE, REQUIRED)}),
    "transpose": OpDef((1, 1), {"dim0": (INT, REQUIRED), "dim1": (INT, REQUIRED)}),
    "permute": OpDef((1, 1), {"dims": (_ints(None, None, single=False), REQUIRED)}),
    "mean": OpDef((1, 1), {"dim": (_ints(None, None), REQUIRED), "keepdim": (BOOL, False)}),
    "unsqueeze": OpDef((1, 1), {"dim": (INT, REQUIRED)}),
    "contiguous": OpDef((1, 1), {}),
    # values that are not tensors: a tuple item (attention output), a size, a shape
    "getitem": OpDef((1, 1), {"index": (INT, REQUIRED)}),
    "size": OpDef((1, 1), {"dim": (_opt(INT), None)}),
    "shape": OpDef((1, 1), {}),
}


def check_args(where: str, args: Any, types: dict[str, ArgType],
               required: tuple[str, ...] = ()) -> dict[str, Any]:
    """``args`` if it is an object whose every value has its declared type, else ConfigError."""
    if not isinstance(args, dict):
        raise ConfigError(f"{where}: arguments must be an object, got {args!r}")
    unknown = sorted(set(args) - set(types))
    if unknown:
        raise ConfigError(f"{where}: arguments {unknown} not allowed; allowed: {list(types)}")
    missing = [a for a in required if a not in args]
    if missing:
        raise ConfigError(f"{where}: missing arguments {missing}")
    for name, value in args.items():
        if not types[name].ok(value):
            raise ConfigError(f"{where}: argument {name}={value!r} ({type(value).__name__}) "
                              f"must be {types[name].expected}")
    return dict(args)
