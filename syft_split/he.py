"""HE hardening: the model owner's first layer after the cut runs on CKKS ciphertexts.

``protect(plan, level="A"|"B", ...)`` turns a split plan into its protected form: the first
``nn.Linear`` of the model owner's segment right after the data owners' input segment becomes a
:mod:`he_layers` encrypted layer. The data owner's host encrypts its cut-layer activation with
a secret key generated for this run and never released; the model owner only ever holds the
public context, ciphertexts and masked values. What each party learns at each level is written
down in ``he_layers/README.md``.

Per training step (all messages bytes in the wire format; 3 calls per data owner)::

    forward     model owner -> data owner: indices        <- Enc(x) [, Enc(x^T), Enc(A)]
    he_output   model owner -> data owner: Enc(xW+b+R1)   <- masked decryption
    (model owner: z, upper layers, loss, delta = dL/dz)
    he_grad     model owner -> data owner: Enc(x^T delta + R2), dL/dx material
                <- masked dW; the data owner backpropagates dL/dx and steps its segment

The data owner's side of these ops is :mod:`syft_split.he_host`. This module imports
:mod:`he_layers` (and so TenSEAL) only when an encrypted plan is used.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import ConfigError

if TYPE_CHECKING:
    from .session import SplitSession
    from .topology import SplitPlan

__all__ = ["EncryptedLayer", "protect", "explain", "HEState", "encrypted_forward"]


@dataclass
class EncryptedLayer:
    """Which layer runs encrypted, and the public agreement both sides build it from."""

    node: int
    linear: nn.Linear
    level: str = "A"
    lr: float = 0.05
    batch_size: int = 64
    params: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def agreement(self) -> dict[str, Any]:
        """The JSON the data owner reviews and builds its keys from."""
        return {"level": self.level, "lr": self.lr, "batch_size": self.batch_size,
                "d_in": self.linear.in_features, "d_out": self.linear.out_features,
                "bias": self.linear.bias is not None, "params": dict(self.params),
                "options": dict(self.options)}


def _split_first_linear(module: nn.Module) -> tuple[nn.Linear | None, nn.Module, list[str]]:
    """(first Linear, what runs after it, problems); a leading Flatten moves to the data owner."""
    layers = list(module) if isinstance(module, nn.Sequential) else [module]
    while layers and isinstance(layers[0], nn.Flatten) and layers[0].start_dim == 1:
        layers.pop(0)
    if not layers:
        return None, nn.Identity(), ["the model owner's segment is empty"]
    first = layers[0]
    if not isinstance(first, nn.Linear):
        from he_layers import explain_unprotectable

        why = explain_unprotectable(first) or [
            f"{type(first).__name__} is not supported as the encrypted layer"]
        return None, nn.Identity(), [
            *why, "put an nn.Linear first in the model owner's segment (after an optional "
            "nn.Flatten), e.g. cut the model right before its first Linear"]
    rest = nn.Sequential(*layers[1:]) if len(layers) > 1 else nn.Identity()
    return first, rest, []


def explain(plan: SplitPlan, *, level: str = "A", batch_size: int = 64,
            params: dict[str, Any] | None = None) -> list[str]:
    """Why ``plan`` cannot be protected (empty list if it can), and what to change."""
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
    linear, _, why = _split_first_linear(plan.nodes[consumers[0]].module)
    problems += why
    if linear is not None:
        try:
            ckks = CKKSParams(**(params or {}))
        except TypeError as exc:
            return [*problems, f"bad CKKS parameters {params}: {exc}"]
        problems += explain_unprotectable(linear, batch_size=batch_size, params=ckks)
    return problems


def protect(plan: SplitPlan, *, level: str = "A", lr: float = 0.05, batch_size: int = 64,
            params: dict[str, Any] | None = None, **options: Any) -> SplitPlan:
    """The HE-protected form of ``plan``: its first model-owner Linear after the cut runs on
    CKKS ciphertexts (trained with plain SGD at ``lr``; ``options`` go to
    :class:`he_layers.LayerSpec`, e.g. ``x_bound``, ``initial_share``).

    Raises :class:`ConfigError` explaining why the plan cannot be protected.
    """
    problems = explain(plan, level=level, batch_size=batch_size, params=params)
    if problems:
        raise ConfigError("cannot protect this plan:\n  - " + "\n  - ".join(problems))
    inputs = [i for i, n in enumerate(plan.nodes) if not n.inputs]
    node = plan.consumers(inputs[0])[0]
    linear, rest, _ = _split_first_linear(plan.nodes[node].module)
    assert linear is not None
    nodes = [dataclasses.replace(n) for n in plan.nodes]
    nodes[node] = dataclasses.replace(nodes[node], module=rest)
    enc = EncryptedLayer(node, copy.deepcopy(linear), level, lr, batch_size, dict(params or {}),
                         dict(options))
    return dataclasses.replace(plan, nodes=nodes, max_batch=min(plan.max_batch, batch_size),
                               encrypted=enc)


# ----------------------------------------------------------------------- model owner side
class HEState:
    """The model owner's encrypted layer: one HEServer per data owner (each has its own keys),
    kept on one set of weights."""

    def __init__(self, session: SplitSession, enc: EncryptedLayer) -> None:
        self.session = session
        self.enc = enc
        self.servers: dict[str, Any] = {}
        self.weight = enc.linear.weight.detach().clone().double()
        self.bias = None if enc.linear.bias is None else enc.linear.bias.detach().clone().double()

    def server(self, source: str) -> Any:
        from he_layers import HEServer, ServerContext

        if source not in self.servers:
            seg = self.session._seg(source, 0)
            raw = self.session.transport.call(seg.party, "he_context",
                                              segment=seg.segment_id)["context"]
            ctx = ServerContext.from_bytes(raw)  # refuses a context holding a secret key
            self.servers[source] = HEServer(ctx, self.weight, self.bias)
        server = self.servers[source]
        if self.enc.level == "A" and len(self.servers) > 1:
            server.set_parameters(weight=self.weight, bias=self.bias)
        return server

    def forward(self, source: str, indices: torch.Tensor, dataset: str | None,
                train: bool) -> torch.Tensor:
        seg = self.session._seg(source, 0)
        server = self.server(source)
        fields: dict[str, Any] = {"indices": indices.to(torch.int64), "train": train}
        if dataset is not None:
            fields["dataset"] = dataset
        msg = self.session.transport.call(seg.party, "forward", segment=seg.segment_id,
                                          **fields)["he_input"]
        masked = server.forward(msg)
        back = self.session.transport.call(seg.party, "he_output", segment=seg.segment_id,
                                           msg=masked)["msg"]
        return server.receive_output(back).to(torch.float32)

    def backward(self, source: str, delta: torch.Tensor) -> None:
        seg = self.session._seg(source, 0)
        server = self.servers[source]
        msg = server.backward(delta.detach().double())
        back = self.session.transport.call(seg.party, "he_grad", segment=seg.segment_id,
                                           msg=msg)["msg"]
        server.receive_gradients(back)
        server.apply_sgd()
        self.weight, self.bias = server.weight, server.bias

    def costs(self) -> dict[str, float]:
        """HE cost of the run: seconds in enc/server/dec and ciphertext bytes per party."""
        out: dict[str, float] = {}
        for source, server in self.servers.items():
            seg = self.session._seg(source, 0)
            client = self.session.transport.call(seg.party, "he_costs", segment=seg.segment_id)
            for k, v in client.items():
                out[f"{source}.{k}"] = float(v)
            for k, v in server.costs.as_dict().items():
                out[f"model_owner.{source}.{k}"] = float(v)
        return out


class _HEBoundary(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, state: HEState, source: str,
                indices: torch.Tensor, dataset: str | None) -> torch.Tensor:
        ctx.state, ctx.source = state, source
        return state.forward(source, indices, dataset, train=True)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        ctx.state.backward(ctx.source, grads[0])
        return None, None, None, None, None


def encrypted_forward(state: HEState, source: str, indices: torch.Tensor,
                      dataset: str | None) -> torch.Tensor:
    """z = x W + b for ``source``'s records, wired to autograd (backward runs the protocol)."""
    anchor = torch.zeros((), requires_grad=True)
    out: torch.Tensor = _HEBoundary.apply(anchor, state, source, indices, dataset)
    return out
