"""HE hardening: the model owner's first layer after the cut runs on CKKS ciphertexts.

``protect(plan, level="A"|"B", ...)`` turns a split plan into its protected form: the first
layer of the model owner's segment right after the data owners' input segment — an
``nn.Linear`` (after an optional ``nn.Flatten``), ``nn.Conv1d`` or ``nn.Conv2d`` — becomes a
:mod:`he_layers` encrypted layer. The data owner's host encrypts its cut-layer activation
with a secret key generated for this run and never released; the model owner only ever
holds the public context, ciphertexts and masked values. What each party learns at each
level is written down in ``he_layers/README.md``.

Per training step (all messages bytes in the wire format; 3 calls per data owner)::

    forward     model owner -> data owner: indices        <- Enc(x) [, Enc(x^T), Enc(A)]
    he_output   model owner -> data owner: Enc(xW+b+R1)   <- masked decryption
    (model owner: z, upper layers, loss, delta = dL/dz)
    he_grad     model owner -> data owner: Enc(x^T delta + R2), dL/dx material
                <- masked dW; the data owner backpropagates dL/dx and steps its segment

Optimizers: at level A the model owner holds W in plain and receives dW, so the encrypted
layer's parameters are trained by the segment's own optimizer (momentum, Adam, schedules...).
At level B the weight is additively shared with the data owner, whose share update is only
consistent with a linear update rule it knows: ``SGD(lr, momentum, weight_decay)`` agreed in
the encryption agreement; ``protect`` warns and records the replacement.

The model owner's side of these ops is :mod:`syft_split.he_state`, the data owner's
:mod:`syft_split.he_host`. This module imports :mod:`he_layers` (and so TenSEAL) only when an
encrypted plan is used.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .errors import ConfigError

if TYPE_CHECKING:
    from .topology import SplitPlan

__all__ = ["EncryptedLayer", "ProtectedSegment", "protect", "explain", "agreed_layer"]

_CONVS = (nn.Conv1d, nn.Conv2d)


class _FlatInput(nn.Module):
    """The encrypted layer as a function of the flattened activation the data owner sends."""

    def __init__(self, layer: nn.Module, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.layer = layer
        self.input_shape = input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layer(x.reshape(x.shape[0], *self.input_shape))
        return out


class ProtectedSegment(nn.Module):
    """Level A: the model owner's segment without its first layer, which it keeps as
    ``encrypted`` so that the segment's optimizer trains it (its forward runs on ciphertexts
    in :class:`HEState`; ``forward`` here runs only the rest)."""

    def __init__(self, encrypted: nn.Module, rest: nn.Module) -> None:
        super().__init__()
        self.encrypted = encrypted
        self.rest = rest

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.rest(z)
        return out


@dataclass
class EncryptedLayer:
    """Which layer runs encrypted, and the public agreement both sides build it from.

    ``module`` is the model owner's ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` (level A: its
    parameters are trained by the segment's optimizer); ``input_shape`` the activation shape
    per record at the cut; ``optimizer`` what trains the weight (recorded in the agreement).
    """

    node: int
    module: nn.Module
    input_shape: tuple[int, ...]
    level: str = "A"
    lr: float | None = None
    batch_size: int = 64
    params: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)

    @property
    def linear(self) -> nn.Module:
        """The layer as a function of the flattened activation (``(B, d_in) -> output``)."""
        if isinstance(self.module, nn.Linear):
            return self.module
        return _FlatInput(self.module, self.input_shape)

    @property
    def d_in(self) -> int:
        """Values per record entering the layer (the flattened activation)."""
        return math.prod(self.input_shape)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The layer's output shape per record."""
        with torch.no_grad():
            out = self.linear(torch.zeros(1, self.d_in))
        return tuple(out.shape[1:])

    def agreement(self) -> dict[str, Any]:
        """The JSON the data owner reviews and builds its keys from.

        ``LayerSpec(batch_size, d_in, d_out, level, lr, bias, **options)`` and
        ``CKKSParams(**params)`` rebuild the spec; ``layer`` and ``optimizer`` are for the
        review (what runs encrypted, and what trains its weight).
        """
        return {"level": self.level, "lr": self.lr, "batch_size": self.batch_size,
                "d_in": self.d_in, "d_out": math.prod(self.output_shape),
                "bias": getattr(self.module, "bias", None) is not None,
                "params": dict(self.params), "options": dict(self.options),
                "layer": repr(self.module), "optimizer": dict(self.optimizer)}


def agreed_layer(agreement: dict[str, Any]) -> tuple[Any, Any]:
    """The ``(LayerSpec, CKKSParams)`` an agreement (:meth:`EncryptedLayer.agreement`) stands
    for, validated: what the data owner builds its keys from, and what the model owner holds
    the data owner's public context to.

    Raises:
        ConfigError: a field missing or of the wrong type, or values he_layers refuses.
    """
    from he_layers import CKKSParams, LayerSpec

    try:
        params = CKKSParams(**agreement.get("params", {})).validate()
        spec = LayerSpec(batch_size=agreement["batch_size"], d_in=agreement["d_in"],
                         d_out=agreement["d_out"], level=agreement["level"],
                         lr=agreement["lr"], bias=agreement["bias"],
                         **agreement.get("options", {})).validate(params)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"bad encryption agreement {agreement!r:.400}: {exc}") from exc
    return spec, params


def _layers(module: nn.Module) -> list[nn.Module]:
    """A segment as a flat list of layers (nested ``nn.Sequential`` are expanded)."""
    if not isinstance(module, nn.Sequential):
        return [module]
    out: list[nn.Module] = []
    for child in module:
        out += _layers(child)
    return out


def _split_first_layer(module: nn.Module) -> tuple[nn.Module | None, nn.Module, list[str]]:
    """(first layer, what runs after it, problems); a leading Flatten before a Linear moves to
    the data owner (it flattens what it encrypts anyway)."""
    layers = _layers(module)
    if not isinstance(module, nn.Sequential) and len(list(module.children())) > 0:
        return None, nn.Identity(), [
            f"the model owner's segment is a {type(module).__name__} (a traced graph); its "
            "first layer cannot be taken out: use an nn.Sequential model or cut it by name"]
    first_flatten = bool(layers) and isinstance(layers[0], nn.Flatten)
    while layers and isinstance(layers[0], nn.Flatten) and layers[0].start_dim == 1:
        layers.pop(0)
    if not layers:
        return None, nn.Identity(), ["the model owner's segment is empty"]
    first = layers[0]
    if first_flatten and isinstance(first, _CONVS):
        return None, nn.Identity(), [f"{type(first).__name__} after nn.Flatten is not "
                                     "supported; cut the model right before the convolution"]
    if not isinstance(first, nn.Linear | nn.Conv1d | nn.Conv2d):
        from he_layers import explain_unprotectable

        why = explain_unprotectable(first) or [
            f"{type(first).__name__} is not supported as the encrypted layer"]
        return None, nn.Identity(), [
            *why, "put an nn.Linear (after an optional nn.Flatten), nn.Conv1d or nn.Conv2d "
            "first in the model owner's segment, e.g. cut the model right before it"]
    rest = nn.Sequential(*layers[1:]) if len(layers) > 1 else nn.Identity()
    return first, rest, []


def _input_shape(layer: nn.Module, input_shape: Any) -> tuple[tuple[int, ...], list[str]]:
    """The activation shape per record entering ``layer`` (checked), and problems."""
    if isinstance(layer, nn.Linear):
        if input_shape is not None and math.prod(tuple(input_shape)) != layer.in_features:
            return (), [f"input_shape {tuple(input_shape)} has {math.prod(tuple(input_shape))} "
                        f"values per record; the Linear expects {layer.in_features}"]
        return (int(layer.in_features),), []
    conv = cast(nn.Conv1d | nn.Conv2d, layer)
    dims = 1 if isinstance(conv, nn.Conv1d) else 2
    name = type(conv).__name__
    example = "(16, 46)" if dims == 1 else "(16, 4, 4)"
    if input_shape is None:
        return (), [f"{name} needs the activation shape at the cut: pass input_shape=(C, "
                    f"{'L' if dims == 1 else 'H, W'}) to protect(), e.g. {example}"]
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != dims + 1 or shape[0] != conv.in_channels or min(shape) < 1:
        return (), [f"{name} expects input_shape (C={conv.in_channels}, "
                    f"{'L' if dims == 1 else 'H, W'}), got {shape}"]
    return shape, []


def explain(plan: SplitPlan, *, level: str = "A", batch_size: int = 64,
            params: dict[str, Any] | None = None,
            input_shape: tuple[int, ...] | None = None, **options: Any) -> list[str]:
    """Why ``plan`` cannot be protected (empty list if it can), and what to change.

    ``params`` and ``options`` are those :func:`protect` would get.

    Supported: vanilla or U-shaped plans whose model-owner segment after the cut starts with
    ``nn.Linear`` (after an optional ``nn.Flatten``), ``nn.Conv1d`` or ``nn.Conv2d`` (groups=1,
    zero padding; give ``input_shape``). Not supported, and listed when met: vertical plans,
    level B with several data owners, other first layers (norms, activations, pooling,
    recurrent, attention, embeddings, transposed or 3-D convolutions), traced (non-Sequential)
    segments, parameters outside 128-bit security, and layers too large per step.
    """
    from he_layers import CKKSParams, explain_unprotectable

    from .topology import DATA_OWNER, MODEL_OWNER

    problems: list[str] = []
    inputs = [i for i, n in enumerate(plan.nodes) if not n.inputs]
    if len(inputs) != 1 or plan.nodes[inputs[0]].owner != DATA_OWNER:
        return ["HE protection needs one input segment run by every data owner (vanilla or "
                "U-shaped plans); vertical plans are not supported"]
    consumers = plan.consumers(inputs[0])
    if len(consumers) != 1 or plan.nodes[consumers[0]].owner != MODEL_OWNER:
        return ["the segment after the cut must be the model owner's"]
    if level not in ("A", "B"):
        problems.append(f"level must be 'A' or 'B', got {level!r}")
    if level == "B" and len(plan.data_owners) > 1:
        problems.append("level B shares the weight with one data owner; use level A for "
                        f"{len(plan.data_owners)} data owners")
    layer, _, why = _split_first_layer(plan.nodes[consumers[0]].module)
    problems += why
    if layer is None:
        return problems
    shape, why = _input_shape(layer, input_shape)
    problems += why
    try:
        ckks = CKKSParams(**(params or {}))
    except TypeError as exc:
        return [*problems, f"bad CKKS parameters {params}: {exc}"]
    spatial = shape[1:] if isinstance(layer, _CONVS) and shape else None
    problems += explain_unprotectable(layer, batch_size=batch_size, params=ckks,
                                      input_spatial=spatial, options=options)
    return problems


def protect(plan: SplitPlan, *, level: str = "A", lr: float = 0.05, batch_size: int = 64,
            params: dict[str, Any] | None = None, input_shape: tuple[int, ...] | None = None,
            **options: Any) -> SplitPlan:
    """The HE-protected form of ``plan``: the first model-owner Linear/Conv1d/Conv2d after
    the cut runs on CKKS ciphertexts.

    Args:
        level: ``"A"`` or ``"B"`` (see ``he_layers/README.md``).
        lr: level B only: the SGD learning rate of the encrypted weight (level A trains it
            with the segment's optimizer, like every other layer).
        batch_size: largest batch per step (the plan's ``max_batch`` is capped to it).
        params: :class:`he_layers.CKKSParams` fields (default N=8192, (60, 40, 60), 2^40).
        input_shape: the activation shape per record at the cut; required for a
            convolution (e.g. ``(16, 4, 4)``).
        options: :class:`he_layers.LayerSpec` fields, e.g. ``x_bound``, ``initial_share``,
            level B ``momentum`` / ``weight_decay``, ``workers=2`` (the model owner's
            ciphertext products split over a second process: both cores).

    Level B replaces the segment's optimizer for the encrypted weight by the agreed
    ``SGD(lr, momentum, weight_decay)``: a ``UserWarning`` says so and the agreement's
    ``optimizer`` field records it.

    Raises :class:`ConfigError` explaining why the plan cannot be protected.
    """
    problems = explain(plan, level=level, batch_size=batch_size, params=params,
                       input_shape=input_shape, **options)
    if problems:
        raise ConfigError("cannot protect this plan:\n  - " + "\n  - ".join(problems))
    inputs = [i for i, n in enumerate(plan.nodes) if not n.inputs]
    node = plan.consumers(inputs[0])[0]
    layer, rest, _ = _split_first_layer(plan.nodes[node].module)
    assert layer is not None
    layer = copy.deepcopy(layer)
    shape, _ = _input_shape(layer, input_shape)
    opts = dict(options)
    if isinstance(layer, _CONVS):
        from he_layers import ConvAsLinear

        opts["conv"] = ConvAsLinear.from_module(layer).to_dict(shape[1:])
    nodes = [dataclasses.replace(n) for n in plan.nodes]
    if level == "A":
        for key in ("momentum", "weight_decay"):
            if opts.pop(key, 0.0):
                raise ConfigError(f"{key} is a level-B agreement; at level A the segment's "
                                  "optimizer trains the encrypted layer (set it there)")
        optimizer: dict[str, Any] = {"name": "the segment's optimizer (at the model owner)"}
        nodes[node] = dataclasses.replace(nodes[node], module=ProtectedSegment(layer, rest))
        he_lr = None
    else:
        optimizer = {"name": "sgd", "lr": lr, "momentum": float(opts.get("momentum", 0.0)),
                     "weight_decay": float(opts.get("weight_decay", 0.0)),
                     "replaces": "the segment's optimizer, for this layer's weight and bias"}
        warnings.warn(
            f"level B: the encrypted {type(layer).__name__} trains with SGD(lr={lr}, "
            f"momentum={optimizer['momentum']}, weight_decay={optimizer['weight_decay']}) "
            "agreed with the data owner, not with the segment's optimizer (a nonlinear rule "
            "such as Adam would need the gradient the model owner must not see)",
            UserWarning, stacklevel=2)
        nodes[node] = dataclasses.replace(nodes[node], module=rest)
        he_lr = lr
    enc = EncryptedLayer(node, layer, shape, level, he_lr, batch_size, dict(params or {}),
                         opts, optimizer)
    return dataclasses.replace(plan, nodes=nodes, max_batch=min(plan.max_batch, batch_size),
                               encrypted=enc)


# ----------------------------------------------------------------------- model owner side
