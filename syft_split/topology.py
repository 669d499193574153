"""One configuration model: who holds which segment, the data, and the labels.

A :class:`SplitPlan` is a small graph. Each :class:`Node` is a segment (a plain ``nn.Module``)
with an owner and the nodes it reads from; each :class:`Task` is a loss on a node's output,
with where its labels live. Owners are

- :data:`DATA_OWNER` -- "the data owner whose records this step uses": every name in
  ``data_owners`` runs its own copy (horizontal split learning: vanilla, U-shaped, multi-client);
- :data:`MODEL_OWNER` -- the party driving training;
- a party name -- one party runs that node for everybody: a relay in multi-hop plans, or a
  data holder of its own columns in vertical plans (then ``data_owners`` is empty and records
  are aligned across those parties).

Constructors cover the topologies of the literature: :meth:`SplitPlan.vanilla`,
:meth:`~SplitPlan.u_shaped`, :meth:`~SplitPlan.multi_hop`, :meth:`~SplitPlan.vertical`,
:meth:`~SplitPlan.multi_task`. :meth:`SplitPlan.validate` raises one
:class:`~syft_split.errors.ConfigError` listing every problem, before anything is sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import ConfigError
from .losses import LOSSES
from .modes import mixed_modes, mode_dependent
from .spec import OptimizerSpec, module_to_spec
from .transport.base import MODEL_OWNER

__all__ = ["ALIGNED", "DATA_OWNER", "MAX_FEATURE_BYTES", "MERGES", "MODEL_OWNER", "RELEASED", "Node",
           "SplitPlan", "Task"]

#: owner placeholder: "the data owner whose records this step uses".
DATA_OWNER = "data_owner"
#: label location: held by the data owner, sent with each batch's activations (original SplitNN).
RELEASED = "released"
#: the record source of a vertical plan: records aligned across the parties (e.g. by PSI).
ALIGNED = "aligned"
#: how a node with several inputs combines them (at the model owner).
MERGES = ("concat", "sum", "mean")
#: the default of :attr:`SplitPlan.max_feature_bytes`: a data owner's host refuses a proposal
#: whose values over ``max_batch`` records pass ``HostLimits.max_activation_bytes``, 1 GiB by
#: default (the input included), so an honest data owner's features never exceed it either.
MAX_FEATURE_BYTES = 1 << 30


@dataclass
class Node:
    """A segment, its owner, and the nodes it reads (``()``: the owner's own data).

    ``optimizer`` overrides the session's optimizer for this segment's parameters."""

    module: nn.Module
    owner: str
    inputs: tuple[int, ...] = ()
    merge: str = "concat"
    name: str = ""
    optimizer: OptimizerSpec | None = None


@dataclass
class Task:
    """A loss on ``node``'s output; ``labels`` is MODEL_OWNER, DATA_OWNER (U-shaped: the
    node runs at the data owner, which keeps labels and outputs) or RELEASED."""

    node: int
    loss: str = "cross_entropy"
    weight: float = 1.0
    labels: str = MODEL_OWNER
    name: str = "main"


@dataclass
class SplitPlan:
    """Nodes in forward order (inputs point backwards), tasks, and the data owners."""

    nodes: list[Node]
    tasks: list[Task]
    data_owners: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=lambda: ["train", "test"])
    max_batch: int = 1024
    #: the model owner's bound on the features of ``max_batch`` records (float32), read from
    #: each data owner's ``describe`` before anything is allocated for them: the model owner
    #: dry-runs its input segments on zeros of the declared feature shape, and a data owner
    #: chooses that shape (a larger one is a problem of the data contract)
    max_feature_bytes: int = MAX_FEATURE_BYTES
    #: how the data owners' segment weights may move: "none"; "peer" (relayed sealed between
    #: data owners, or securely averaged among them: relay and SplitFed schedules); or
    #: "model_owner" (the proposal asks that the model owner may read them: each data owner
    #: grants that separately, since weights reveal training data)
    share_weights: str = "none"
    #: defences every data owner applies on its side to its input segment: ``nopeek`` (weight
    #: of the distance-correlation loss), ``noise_sigma`` (Gaussian noise on released
    #: activations), ``label_epsilon`` + ``num_classes`` (randomized response on released labels)
    defences: dict[str, float] = field(default_factory=dict)
    #: the model owner's layer that runs on CKKS ciphertexts (set by :func:`syft_split.he.protect`)
    encrypted: Any = None
    #: an auxiliary head each data owner trains its segment with (:class:`syft_split.local_loss.
    #: LocalLoss`): no gradient returns, many batches per call; an approximation
    local_loss: Any = None

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- constructors
    @classmethod
    def chain(cls, segments: Sequence[nn.Module], owners: Sequence[str],
              data_owners: str | Sequence[str] = (), *, labels: str = MODEL_OWNER,
              loss: str = "cross_entropy", **kwargs: object) -> SplitPlan:
        """Segments applied one after the other, each at its owner."""
        nodes = [Node(m, o, () if i == 0 else (i - 1,), name=f"seg{i}")
                 for i, (m, o) in enumerate(zip(segments, owners))]
        if len(owners) != len(segments):
            raise ConfigError(f"{len(segments)} segments but {len(owners)} owners")
        task = Task(len(nodes) - 1, loss=loss, labels=labels)
        return cls(nodes, [task], _names(data_owners), **kwargs)  # type: ignore[arg-type]

    @classmethod
    def vanilla(cls, segments: Sequence[nn.Module], data_owners: str | Sequence[str], *,
                labels: str = MODEL_OWNER, **kwargs: object) -> SplitPlan:
        """Data owners run the first segment; the model owner runs the rest and the loss.

        ``labels``: MODEL_OWNER (the model owner passes label tensors) or RELEASED (each data
        owner sends its batch's labels with the activations, as in the original SplitNN).
        """
        labels = RELEASED if labels == DATA_OWNER else labels
        owners = [DATA_OWNER] + [MODEL_OWNER] * (len(segments) - 1)
        return cls.chain(segments, owners, data_owners, labels=labels, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def u_shaped(cls, segments: Sequence[nn.Module], data_owners: str | Sequence[str],
                 **kwargs: object) -> SplitPlan:
        """Data owners run the first and last segments and keep labels and outputs; the model
        owner runs the middle."""
        owners = [DATA_OWNER] + [MODEL_OWNER] * (len(segments) - 2) + [DATA_OWNER]
        return cls.chain(segments, owners, data_owners, labels=DATA_OWNER, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def multi_hop(cls, segments: Sequence[nn.Module], data_owners: str | Sequence[str],
                  hops: Sequence[str], **kwargs: object) -> SplitPlan:
        """Data owners run segment 0; relay party ``hops[k]`` runs segment ``k + 1``; the model
        owner runs the rest. Activations relay through the parties in order, gradients back."""
        owners = [DATA_OWNER, *hops] + [MODEL_OWNER] * (len(segments) - 1 - len(hops))
        return cls.chain(segments, owners, data_owners, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def vertical(cls, encoders: Mapping[str, nn.Module], head: nn.Module | Sequence[nn.Module],
                 *, merge: str = "concat", loss: str = "cross_entropy",
                 **kwargs: object) -> SplitPlan:
        """Each party encodes its own columns of the same (aligned) records; the model owner
        merges the encodings and runs ``head`` (and holds the labels)."""
        nodes = [Node(m, party, name=f"enc:{party}") for party, m in encoders.items()]
        heads = [head] if isinstance(head, nn.Module) else list(head)
        merge_inputs = tuple(range(len(nodes)))
        for k, m in enumerate(heads):
            inputs = merge_inputs if k == 0 else (len(nodes) - 1,)
            nodes.append(Node(m, MODEL_OWNER, inputs, merge=merge, name=f"head{k}"))
        return cls(nodes, [Task(len(nodes) - 1, loss=loss)], [], **kwargs)  # type: ignore[arg-type]

    @classmethod
    def multi_task(cls, trunk: Sequence[nn.Module], heads: Mapping[str, nn.Module],
                   data_owners: str | Sequence[str], *, trunk_owners: Sequence[str] | None = None,
                   losses: Mapping[str, str] | None = None,
                   weights: Mapping[str, float] | None = None, **kwargs: object) -> SplitPlan:
        """A shared trunk (segment 0 at the data owners) feeding several heads at the model
        owner; the training loss is the weighted sum of the heads' losses."""
        owners = list(trunk_owners or [DATA_OWNER] + [MODEL_OWNER] * (len(trunk) - 1))
        nodes = [Node(m, o, () if i == 0 else (i - 1,), name=f"trunk{i}")
                 for i, (m, o) in enumerate(zip(trunk, owners))]
        tasks = []
        for name, head in heads.items():
            nodes.append(Node(head, MODEL_OWNER, (len(trunk) - 1,), name=f"head:{name}"))
            tasks.append(Task(len(nodes) - 1, loss=(losses or {}).get(name, "cross_entropy"),
                              weight=(weights or {}).get(name, 1.0), name=name))
        return cls(nodes, tasks, _names(data_owners), **kwargs)  # type: ignore[arg-type]

    # ----------------------------------------------------------------- views
    @property
    def segments(self) -> list[nn.Module]:
        return [n.module for n in self.nodes]

    @property
    def owners(self) -> list[str]:
        return [n.owner for n in self.nodes]

    @property
    def is_vertical(self) -> bool:
        """Input nodes held by named parties (records aligned across them)."""
        return any(not n.inputs and n.owner not in (DATA_OWNER, MODEL_OWNER) for n in self.nodes)

    @property
    def sources(self) -> list[str]:
        """Record sources a trainer iterates: the data owners, or :data:`ALIGNED`."""
        return [ALIGNED] if self.is_vertical else list(self.data_owners)

    @property
    def parties(self) -> list[str]:
        """Every party other than the model owner that runs a node."""
        named = [o for o in self.owners if o not in (DATA_OWNER, MODEL_OWNER)]
        return list(dict.fromkeys([*self.data_owners, *named]))

    @property
    def relays(self) -> list[str]:
        return [n.owner for n in self.nodes
                if n.inputs and n.owner not in (DATA_OWNER, MODEL_OWNER)]

    @property
    def label_location(self) -> str:
        return self.tasks[0].labels if len(self.tasks) == 1 else "per_task"

    @property
    def release_labels(self) -> bool:
        return any(t.labels == RELEASED for t in self.tasks)

    def consumers(self, i: int) -> list[int]:
        return [j for j, n in enumerate(self.nodes) if i in n.inputs]

    def task_at(self, i: int) -> Task | None:
        return next((t for t in self.tasks if t.node == i), None)

    def remote_loss_node(self, i: int) -> bool:
        """Node ``i`` computes its task's loss where it runs (U-shaped tail)."""
        task = self.task_at(i)
        return task is not None and task.labels == DATA_OWNER

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        problems: list[str] = []
        n = len(self.nodes)
        if n < 2:
            problems.append(f"a split needs at least 2 segments, got {n}")
        for i, node in enumerate(self.nodes):
            where = f"segment {i}{f' ({node.name})' if node.name else ''}"
            if not isinstance(node.owner, str) or not node.owner:
                problems.append(f"{where} has no owner")
                continue
            if any(not isinstance(j, int) or not 0 <= j < i for j in node.inputs):
                problems.append(f"{where} reads {node.inputs}: inputs must be earlier segments")
            if not node.inputs and node.owner == MODEL_OWNER:
                problems.append(f"{where} reads data but belongs to the model owner, who has none")
            if len(node.inputs) > 1 and node.owner != MODEL_OWNER:
                problems.append(f"{where} merges several inputs: merging happens at the model owner")
            if node.merge not in MERGES:
                problems.append(f"{where}: merge must be one of {MERGES}, got {node.merge!r}")
            if node.owner != MODEL_OWNER and isinstance(node.module, nn.Module):
                mixed = mixed_modes(node.module)
                if mixed:
                    problems.append(
                        f"{where} has layers in another training mode than the segment "
                        f"({', '.join(mixed[:5])}): its host runs a segment all in train() "
                        "or all in eval(); keep such layers at the model owner")
                elif not node.module.training and mode_dependent(node.module):
                    problems.append(
                        f"{where} is in eval() and holds "
                        f"{', '.join(mode_dependent(node.module))}: its host trains a segment "
                        "in train() (batch statistics, dropout); .train() it, or keep it at "
                        "the model owner")
            if node.owner != MODEL_OWNER:
                try:
                    module_to_spec(node.module)
                except ConfigError as exc:
                    if node.owner != DATA_OWNER:
                        party = f"party {node.owner!r}"
                    elif self.data_owners:
                        party = ("data owner" + "s" * (len(self.data_owners) > 1) + " "
                                 + ", ".join(repr(d) for d in self.data_owners))
                    else:
                        party = "the data owner"
                    problems.append(f"{where} cannot be placed on {party}: {exc}")
            if i < n - 1 and not self.consumers(i) and self.task_at(i) is None:
                problems.append(f"{where}: its output is used by nothing and no task")
        if MODEL_OWNER not in self.owners:
            problems.append("the model owner must hold at least one segment")
        placeholder_inputs = [i for i, nd in enumerate(self.nodes)
                              if not nd.inputs and nd.owner == DATA_OWNER]
        if placeholder_inputs and self.is_vertical:
            problems.append("a plan reads data either from every data owner (DATA_OWNER) or "
                            "from named parties (vertical), not both")
        if placeholder_inputs and not self.data_owners:
            problems.append("segments run at DATA_OWNER but data_owners is empty")
        if len(set(self.data_owners)) != len(self.data_owners):
            problems.append(f"data_owners repeat: {self.data_owners}")
        reserved = {MODEL_OWNER, DATA_OWNER, ALIGNED} & set(self.data_owners)
        if reserved:
            problems.append(f"{sorted(reserved)} are reserved party names")
        both = set(self.relays) & set(self.data_owners)
        if both:
            problems.append(f"{sorted(both)} cannot be both a data owner and a relay party")
        problems.extend(self._task_problems())
        problems.extend(self._shared_tensor_problems())
        if self.share_weights not in ("none", "model_owner", "peer"):
            problems.append(f"share_weights must be 'none', 'model_owner' or 'peer', "
                            f"got {self.share_weights!r}")
        if self.share_weights != "none" and len(self.data_owners) < 2:
            problems.append("sharing client weights needs at least two data owners")
        bad_def = set(self.defences) - {"nopeek", "noise_sigma", "label_epsilon", "num_classes"}
        if bad_def:
            problems.append(f"unknown defences {sorted(bad_def)}; known: nopeek, noise_sigma, "
                            "label_epsilon (with num_classes)")
        if self.defences.get("label_epsilon") and not self.release_labels:
            problems.append("label_epsilon protects released labels, but no task releases them")
        if self.encrypted is not None and not (
            0 <= self.encrypted.node < n and self.nodes[self.encrypted.node].owner == MODEL_OWNER
        ):
            problems.append("the encrypted layer must belong to a model-owner segment")
        if self.local_loss is not None:
            problems.extend(self.local_loss.problems(self))
        if not 0 < self.max_batch:
            problems.append(f"max_batch must be positive, got {self.max_batch}")
        bound = self.max_feature_bytes
        if not isinstance(bound, int) or isinstance(bound, bool) or bound <= 0:
            problems.append(f"max_feature_bytes must be a positive int, got {bound!r}")
        if problems:
            raise ConfigError("invalid split plan:\n  - " + "\n  - ".join(problems))

    def _shared_tensor_problems(self) -> list[str]:
        """A tensor held by a model-owner segment and a remote one: the remote copy would
        train apart from the model owner's (the unsplit model has one)."""
        mine: dict[int, int] = {}
        for i, node in enumerate(self.nodes):
            if node.owner == MODEL_OWNER and isinstance(node.module, nn.Module):
                for t in [*node.module.parameters(), *node.module.buffers()]:
                    mine.setdefault(id(t), i)
        problems = []
        for i, node in enumerate(self.nodes):
            if node.owner == MODEL_OWNER or not isinstance(node.module, nn.Module):
                continue
            for name, t in [*node.module.named_parameters(), *node.module.named_buffers()]:
                if id(t) in mine:
                    problems.append(f"segment {i} ({node.owner}) shares {name!r} with model-owner "
                                    f"segment {mine[id(t)]}: the copies would train apart")
                    break
        return problems

    def _task_problems(self) -> list[str]:
        problems: list[str] = []
        if not self.tasks:
            return ["a plan needs at least one task (a loss)"]
        n = len(self.nodes)
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            problems.append(f"task names repeat: {names}")
        for t in self.tasks:
            if not 0 <= t.node < n:
                problems.append(f"task {t.name!r} points at segment {t.node}, which does not exist")
                continue
            owner = self.nodes[t.node].owner
            if self.consumers(t.node):
                problems.append(f"task {t.name!r}: segment {t.node} feeds other segments; a task "
                                "reads a final output")
            if t.loss not in LOSSES:
                problems.append(f"task {t.name!r}: loss must be one of {sorted(LOSSES)}, "
                                f"got {t.loss!r}")
            if t.labels not in (MODEL_OWNER, DATA_OWNER, RELEASED):
                problems.append(f"task {t.name!r}: labels must be at {MODEL_OWNER!r}, "
                                f"{DATA_OWNER!r} or {RELEASED!r}, got {t.labels!r}")
            elif t.labels == DATA_OWNER and owner != DATA_OWNER:
                problems.append(f"task {t.name!r}: labels at the data owner need the output "
                                f"segment there too (U-shaped), but segment {t.node} is {owner}'s")
            elif t.labels != DATA_OWNER and owner != MODEL_OWNER:
                problems.append(f"task {t.name!r}: segment {t.node} runs at {owner}, so the labels "
                                "must be there too (labels=DATA_OWNER)")
            if t.labels == RELEASED and self.is_vertical:
                problems.append(f"task {t.name!r}: released labels need a single data owner per "
                                "record; in a vertical plan the model owner holds the labels")
        for i in range(n):
            if not self.consumers(i) and self.task_at(i) is None and i == n - 1:
                problems.append(f"the last segment ({i}) has no task: nothing to train")
        return problems


def _names(data_owners: str | Sequence[str]) -> list[str]:
    return [data_owners] if isinstance(data_owners, str) else list(data_owners)
