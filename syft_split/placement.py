"""Where a plan's segments run and what is proposed to each host.

The model owner's side of placing a :class:`~syft_split.topology.SplitPlan`: which party runs
each node for a record source, the (input, output) shapes of every node (a dry run on zeros,
checked against each data owner's published data contract), and the fields of the
``propose`` request that puts a segment up for review. :class:`~syft_split.session.SplitSession`
drives these; they hold no state of their own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .errors import ConfigError
from .modes import eval_mode
from .spec import OptimizerSpec, module_to_spec, spec_state
from .topology import DATA_OWNER, MODEL_OWNER, SplitPlan

__all__ = ["Shapes", "host_of", "merge_inputs", "node_shapes", "placements", "proposal_fields"]

#: (input shape, output shape) per record of one node
Shapes = tuple[tuple[int, ...], tuple[int, ...]]


def host_of(plan: SplitPlan, source: str, i: int) -> str:
    """The party that runs node ``i`` for records from ``source``."""
    owner = plan.nodes[i].owner
    return source if owner == DATA_OWNER else owner


def merge_inputs(plan: SplitPlan, i: int, values: dict[int, torch.Tensor],
                 device: torch.device) -> torch.Tensor:
    """Node ``i``'s input: its inputs' values (on ``device``) merged as the node says."""
    node = plan.nodes[i]
    xs = [values[j].to(device) for j in node.inputs]
    if len(xs) == 1:
        return xs[0]
    if node.merge == "concat":
        return torch.cat([x.flatten(1) for x in xs], dim=1)
    stacked = torch.stack(xs)
    return stacked.sum(0) if node.merge == "sum" else stacked.mean(0)


def node_shapes(plan: SplitPlan, source: str, describe: Callable[[str], dict[str, Any]],
                device: torch.device) -> list[Shapes]:
    """(input, output) shape per record of every node for records from ``source`` (a dry
    run on zeros, here). ``describe(party)`` is the party's published dataset metadata; a
    malformed answer, and every problem of the data contract (features of ``max_batch``
    records over ``plan.max_feature_bytes`` among them), is raised as :class:`ConfigError`
    before anything is allocated."""
    values: dict[int, torch.Tensor] = {}
    shapes = []
    with torch.no_grad():
        for i, node in enumerate(plan.nodes):
            if node.inputs:
                try:
                    x = merge_inputs(plan, i, values, device)
                except RuntimeError as exc:
                    shapes_in = [tuple(values[j].shape[1:]) for j in node.inputs]
                    raise ConfigError(f"segment {i} cannot merge its inputs {shapes_in} by "
                                      f"{node.merge!r}: {exc}") from exc
            else:
                from .contract import check_describe, require  # the data contract

                party = host_of(plan, source, i)
                meta = check_describe(party, describe(party))
                require(plan, {party: meta})  # every problem, and why; the features' size too
                x = torch.zeros((2, *meta[plan.datasets[0]]["feature_shape"]))
            at = next((p.device for p in node.module.parameters()), None)
            x = x if at is None else x.to(at)
            enc = plan.encrypted
            if enc is not None and i == enc.node:
                x = enc.linear(x.flatten(1))
            try:
                with eval_mode(node.module):  # each submodule keeps its own mode after
                    values[i] = node.module(x)
            except RuntimeError as exc:
                raise ConfigError(f"segment {i} ({node.name}) does not accept input "
                                  f"{tuple(x.shape[1:])}: {exc}") from exc
            shapes.append((tuple(x.shape[1:]), tuple(values[i].shape[1:])))
    return shapes


def placements(plan: SplitPlan, describe: Callable[[str], dict[str, Any]],
               device: torch.device | None = None) -> Iterator[tuple[int, str, str, Shapes]]:
    """(node, hosting party, role, shapes) of every remote segment, once. Shapes are checked
    for every record source before the first is yielded."""
    at = device if device is not None else torch.device("cpu")
    all_shapes = {source: node_shapes(plan, source, describe, at) for source in plan.sources}
    seen: set[tuple[str, int]] = set()
    for source in plan.sources:
        for i, node in enumerate(plan.nodes):
            host = host_of(plan, source, i)
            if node.owner == MODEL_OWNER or (host, i) in seen:
                continue
            seen.add((host, i))
            role = "input" if not node.inputs else "loss" if plan.remote_loss_node(i) else "middle"
            yield i, host, role, all_shapes[source][i]


def proposal_fields(plan: SplitPlan, i: int, role: str, input_shape: tuple[int, ...],
                    optimizer: OptimizerSpec) -> dict[str, Any]:
    """The fields of the ``propose`` request for node ``i`` in ``role``: its spec, initial
    state, optimizer and everything the data owner reviews with it."""
    node = plan.nodes[i]
    task = plan.task_at(i)
    module = copy.deepcopy(node.module)
    fields: dict[str, Any] = {
        "role": role,
        "spec": module_to_spec(module),
        "optimizer": (node.optimizer or optimizer).to_json(),
        "datasets": list(plan.datasets) if role != "middle" else [],
        "input_shape": list(input_shape),
        "max_batch": plan.max_batch,
        **{f"state/{k}": v for k, v in spec_state(module).items()},
    }
    if role == "loss" and task is not None:
        fields["loss"] = task.loss
    if role == "input" and plan.release_labels:
        fields["release_labels"] = True
    if node.owner == DATA_OWNER:
        fields["share_weights"] = plan.share_weights
    if role == "input" and plan.defences:
        fields["defences"] = dict(plan.defences)
    if role == "input" and plan.encrypted is not None:
        fields["he"] = plan.encrypted.agreement()
    return fields
