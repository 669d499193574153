"""The review a data owner reads before approving a proposal."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..spec import count_parameters, describe
from .records import Proposal

if TYPE_CHECKING:
    from .core import DataOwnerHost

__all__ = ["review_text"]


def _shape(shape: tuple[int, ...]) -> str:
    return ", ".join(map(str, shape))


def review_text(host: DataOwnerHost, p: Proposal, extra: list[str]) -> str:
    """Layers, parameters, what leaves per step and how much; ``extra``: lines the op
    families add (encryption, leakage measured on the owner's records, weight sharing)."""
    assert p.module is not None
    out_bytes = 4 * math.prod(p.output_shape)
    leaves = {
        "input": f"activations float32 (batch, {_shape(p.output_shape)})",
        "middle": f"activations float32 (batch, {_shape(p.output_shape)}) and the gradient "
                  f"w.r.t. its input (batch, {_shape(p.input_shape)})",
        "loss": f"the gradient w.r.t. its input (batch, {_shape(p.input_shape)}) and two status "
                "scalars (loss, correct count); labels and outputs stay here",
    }.get(p.role)  # other roles (e.g. federated "local") state what leaves in their own lines
    if p.role == "loss":
        out_bytes = 4 * math.prod(p.input_shape)
    lines = [
        f"Proposal {p.id} from {p.driver} (role: {p.role}, status: {p.status})",
        f"  reads datasets: {p.datasets}; input per record {p.input_shape}",
        "  layers:",
        *("    " + line for line in describe(p.module, p.input_shape)),
        f"  parameters: {count_parameters(p.module)}; optimizer: {p.optimizer!r}",
    ]
    if p.he is None and leaves is not None:
        lines += [f"  leaves per step: {leaves}",
                  f"  bytes leaving per record: {out_bytes}; max batch {p.max_batch} "
                  f"(<= {out_bytes * p.max_batch} bytes per step)"]
    lines.append(f"  every value leaving is checked: approved shape, float32, finite, "
                 f"|value| <= {host.limits.max_abs_value:g}")
    if p.role == "input" and p.he is None:
        lines.extend(_leakage_lines(host, p))
    if p.loss:
        lines.append(f"  loss computed here: {p.loss}")
    if p.release_labels:
        lines.append("  ALSO RELEASES LABELS of each batch to the model owner")
    for name, value in p.defences.items():
        lines.append(f"  defence here: {name}={value}")
    lines.extend(extra)
    return "\n".join(lines)


def _leakage_lines(host: DataOwnerHost, p: Proposal) -> list[str]:
    """Measured on the owner's own records: how much the proposed outputs reveal."""
    from ..leakage import dcor_leakage

    assert p.module is not None
    x = host.datasets[p.datasets[0]].features[:128].to(torch.float32)
    was = p.module.training
    p.module.eval()
    with torch.no_grad():
        out = p.module(x)
    p.module.train(was)
    lines = [f"  measured on {x.shape[0]} of your records: distance correlation between "
             f"your data and what would leave = {dcor_leakage(x, out):.3f} (1.0: a copy)"]
    if math.prod(p.output_shape) >= math.prod(p.input_shape):
        lines.append(f"  WARNING: {math.prod(p.output_shape)} values leave per record, at "
                     f"least the {math.prod(p.input_shape)} it has: such a segment can pass "
                     "your data through (e.g. identity weights)")
    return lines
