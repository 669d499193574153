"""The review a data owner reads before approving a proposal."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..spec import count_parameters, describe
from .records import Proposal

if TYPE_CHECKING:
    from .dispatch import Host

__all__ = ["review_text", "record_rate"]


def _shape(shape: tuple[int, ...]) -> str:
    return ", ".join(map(str, shape))


def record_rate(cap: int | None) -> str:
    """How fast records can be read, as the review says it."""
    return ("HostLimits.max_records_per_minute is not set: NO CAP, set it" if cap is None
            else f"at most {cap} records a minute (max_records_per_minute)")


#: what the review says of each defence, after its value
_DEFENCE_NOTES = {
    "label_epsilon": " (each record's label is randomized ONCE: every release of it, in every "
                     "epoch, gives the same noisy label)",
    "nopeek": " (holds against a semi-honest model owner only: a malicious one scales the "
              "gradient it sends until the NoPeek term no longer counts; the leakage watch "
              "measures what leaks regardless)",
}


def review_text(host: Host, p: Proposal, extra: list[str]) -> str:
    """Layers, parameters, what leaves per step and how much; ``extra``: lines the op
    families add (leakage measured on the owner's records, encryption, weight sharing)."""
    assert p.module is not None
    out_bytes = 4 * math.prod(p.output_shape)
    leaves = {
        "input": f"activations float32 (batch, {_shape(p.output_shape)})",
        "middle": f"activations float32 (batch, {_shape(p.output_shape)}) and the gradient "
                  f"w.r.t. its input (batch, {_shape(p.input_shape)})",
        "loss": f"the gradient w.r.t. its input (batch, {_shape(p.input_shape)}) and two status "
                "scalars (loss, correct count); the labels themselves and the outputs stay "
                "here",
    }.get(p.role)  # other roles (e.g. federated "local") state what leaves in their own lines
    if p.role == "loss":
        out_bytes = 4 * math.prod(p.input_shape)
    lines = [
        f"Proposal {p.id} from {host.who(p.driver)} (role: {p.role}, status: {p.status})",
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
    rate = record_rate(host.limits.max_records_per_minute)
    if p.loss:
        lines.append(f"  loss computed here: {p.loss}")
    if p.role == "loss":
        lines.append("  LABELS CAN BE READ: the model owner knows this segment's weights (it "
                     "proposed them) and chooses its input; a malicious one reads EVERY LABEL "
                     "a call touches exactly, from one training loss step's input gradient "
                     "(then discarded: no weight changes) or from evaluation losses; " + rate)
    if p.release_labels:
        lines.append("  ALSO RELEASES LABELS of each batch to the model owner")
    for name, value in p.defences.items():
        lines.append(f"  defence here: {name}={value}" + _DEFENCE_NOTES.get(name, ""))
    if p.defences.get("noise_sigma", 0) > 0:
        lines.append(f"    activation noise is drawn afresh on every release: a record released "
                     f"n times has its noise averaged down to sigma/sqrt(n); {rate}")
    lines.extend(extra)
    return "\n".join(lines)
