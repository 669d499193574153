"""The model owner's session: place a plan's segments on hosts, then train as if local.

>>> session = SplitSession(plan, transport, optimizer=OptimizerSpec("adam", lr=1e-3))
>>> ids = session.propose()            # data owners review and approve once
>>> out = session.forward("hospital", idx)          # vanilla: logits at the model owner
>>> loss = F.cross_entropy(out, y[idx]); loss.backward(); session.step()

``session.loss(party, idx)`` works in every setting (it computes the loss where the labels
are: at the model owner, or at the data owner in the U-shaped setting).
``session.to("cuda")`` runs the model owner's segments on a GPU; everything on the wire stays
CPU tensors (moved on arrival and before sending).
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .answers import MAX_ABS_VALUE, Answer
from .contract import check_describe
from .errors import ApprovalError, ConfigError, ProtocolError
from .he_state import HEState, encrypted_forward
from .losses import LOSSES, count_correct
from .modes import eval_mode
from .placement import host_of, merge_inputs, node_shapes, placements, proposal_fields
from .remote import ActivationPointer, RemoteSegment, remote_loss
from .spec import OptimizerSpec
from .topology import DATA_OWNER, MODEL_OWNER, RELEASED, SplitPlan, Task
from .transport.base import CallPolicy, Transport

__all__ = ["SplitSession", "StepMetrics"]


@dataclass
class StepMetrics:
    """Loss and accuracy counts of one batch (``per_task``: each task's loss and correct
    count when the plan has several; ``correct`` is the first task's)."""

    loss: float
    correct: int
    count: int
    per_task: dict[str, dict[str, float]] = field(default_factory=dict)


class SplitSession:
    """Everything the model owner drives: see the module docstring.

    ``source`` arguments name where a batch's records come from: a data owner of the plan,
    or :data:`~syft_split.topology.ALIGNED` for vertical plans. ``policy`` sets the timeouts
    and retries of the transport's calls (:class:`~syft_split.transport.base.CallPolicy`).
    Data owners' answers are checked before use (:mod:`syft_split.answers`); ``max_abs_value``
    bounds the magnitude of the tensors they answer with (the hosts' default bound: raise it
    if a data owner raised its ``HostLimits.max_abs_value``).
    """

    def __init__(self, plan: SplitPlan, transport: Transport, *,
                 optimizer: OptimizerSpec | None = None, fuse: bool = True,
                 policy: CallPolicy | None = None,
                 max_abs_value: float = MAX_ABS_VALUE) -> None:
        plan.validate()
        missing = [d for d in plan.parties if d not in transport.parties()]
        if missing:
            raise ConfigError(f"parties {missing} are not reachable through the transport; "
                              f"connected: {transport.parties()}")
        self.plan = plan
        self.transport = transport
        if policy is not None:  # timeouts and retries of this session's calls
            transport.policy = policy
        self.optimizer_spec = optimizer or OptimizerSpec("sgd", lr=0.01)
        self.fuse = fuse
        if (not isinstance(max_abs_value, (int, float)) or isinstance(max_abs_value, bool)
                or not max_abs_value > 0):
            raise ConfigError(f"max_abs_value must be > 0, got {max_abs_value!r}")
        #: the bound on |value| of the tensors in data owners' answers
        self.max_abs_value = float(max_abs_value)
        #: modules the model owner runs, by node index (shared by all data owners)
        self.local: dict[int, nn.Module] = {
            i: n.module for i, n in enumerate(plan.nodes) if n.owner == MODEL_OWNER
        }
        #: one optimizer for the model owner's segments, plus one per segment that overrides it
        self.optimizers = _build_optimizers(plan, self.local, self.optimizer_spec)
        #: remote segments by (hosting party, node index)
        self.remote: dict[tuple[str, int], RemoteSegment] = {}
        self.metadata: dict[str, dict[str, Any]] = {}
        #: the token of each segment's propose request (see :meth:`propose`)
        self._tokens: dict[tuple[str, int], str] = {}
        #: segments proposed by a propose() call that then failed: the next call returns them
        self._unreported: set[tuple[str, int]] = set()
        #: the encrypted layer's model-owner side (HE-protected plans only)
        self.he = HEState(self, plan.encrypted) if plan.encrypted is not None else None
        #: where the model owner's segments compute (see :meth:`to`)
        self.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> SplitSession:
        """Run the model owner's segments (parameters and optimizer state) on ``device``.

        Activations arriving from data owners move there; gradients and activations leaving
        go back to the CPU for the wire. HE-protected plans stay on the CPU."""
        device = torch.device(device)
        if self.plan.encrypted is not None and device.type != "cpu":
            raise ConfigError(f"an HE-protected plan computes on the CPU; cannot move to {device}")
        for m in self.local.values():
            m.to(device)
        for opt in self.optimizers:
            for state in opt.state.values():
                for k, v in state.items():
                    if isinstance(v, torch.Tensor) and k != "step":  # Adam keeps step on CPU
                        state[k] = v.to(device)
        self.device = device
        return self

    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as it goes on the wire (CPU; differentiable)."""
        return t if t.device.type == "cpu" else t.cpu()

    # ------------------------------------------------------------------ placement
    def _host(self, source: str, i: int) -> str:
        """The party that runs node ``i`` for records from ``source``."""
        return host_of(self.plan, source, i)

    def _seg(self, source: str, i: int) -> RemoteSegment:
        seg = self.remote.get((self._host(source, i), i))
        if seg is None:
            raise ProtocolError(f"no segment {i} placed for {source!r}; call propose() first")
        return seg

    def _describe(self, party: str) -> dict[str, Any]:
        if party not in self.metadata:
            self.metadata[party] = dict(check_describe(party,
                                                       self.transport.call(party, "describe")))
        return self.metadata[party]

    def _merge(self, i: int, values: dict[int, torch.Tensor]) -> torch.Tensor:
        return merge_inputs(self.plan, i, values, self.device)

    def _shapes(self, source: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(input, output) shape per record of every node (dry run on zeros, here)."""
        return node_shapes(self.plan, source, self._describe, self.device)

    def propose(self) -> dict[str, list[str]]:
        """Send every remote segment to its host for review; return proposal ids by party.

        Shapes are checked for every record source first: a plan whose shapes do not meet
        fails with :class:`ConfigError` before anything is proposed anywhere. Each segment's
        request carries a token: after a failure (no answer, or ``StateSaveError``) call this
        again; a segment its host already holds is answered, not proposed twice, and the ids
        proposed before the failure are returned with the others."""
        out: dict[str, list[str]] = {}
        for i, host, role, shapes in list(placements(self.plan, self._describe, self.device)):
            placed = self.remote.get((host, i))
            if placed is not None:  # by an earlier call; one that failed did not return it
                if (host, i) in self._unreported:
                    out.setdefault(host, []).append(placed.segment_id)
                continue
            fields = proposal_fields(self.plan, i, role, shapes[0], self.optimizer_spec)
            # one token per segment until its proposal is answered: a propose that failed
            # (no answer, or answered StateSaveError) and is sent again makes no second one
            fields["token"] = self._tokens.setdefault((host, i), secrets.token_hex(16))
            pid = Answer(host, "propose", self.transport.call(host, "propose", **fields)
                         ).segment_id()
            if role == "input" and self.plan.local_loss is not None:  # reviewed with it
                self.plan.local_loss.attach(self.transport, host, pid, self.optimizer_spec)
            self.remote[(host, i)] = RemoteSegment(
                self.transport, host, pid, role, shapes[0], shapes[1], fuse=self.fuse,
                max_abs_value=self.max_abs_value)
            self._unreported.add((host, i))
            out.setdefault(host, []).append(pid)
        self._unreported.clear()
        return out

    def segment_ids(self) -> dict[str, str]:
        """``{"party:node": segment id}`` of every placed segment: what :meth:`attach` takes."""
        return {f"{host}:{i}": seg.segment_id for (host, i), seg in self.remote.items()}

    def attach(self, segments: Mapping[str, str], *,
               states: Mapping[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
        """Re-attach to segments approved earlier (e.g. by a model-owner process that crashed)
        instead of proposing them again; ``segments`` is what :meth:`segment_ids` returned.

        ``states`` (by the same keys, from a checkpoint: :meth:`RemoteSegment.state`) restores
        step ids and held-back gradients, so training continues exactly. Without one, each
        segment continues after the last step its data owner applied, and a step left pending
        there is discarded: its gradient died with the old process (reported in the result).
        Returns the data owners' view per key: status, steps, last step id, what was discarded.
        """
        out: dict[str, dict[str, Any]] = {}
        placed: dict[tuple[str, int], RemoteSegment] = {}
        for i, host, role, shapes in placements(self.plan, self._describe, self.device):
            key = f"{host}:{i}"
            if key not in segments:
                raise ConfigError(f"no segment id for {key}; got {sorted(segments)}")
            seg = RemoteSegment(self.transport, host, str(segments[key]), role, shapes[0],
                                shapes[1], fuse=self.fuse, max_abs_value=self.max_abs_value)
            info = self.transport.call(host, "status", segment=seg.segment_id)
            if info["status"] != "approved":
                why = f" ({info['reason']})" if info.get("reason") else ""
                raise ApprovalError(f"segment {seg.segment_id} on {host} is {info['status']}"
                                    f"{why}: it cannot be attached")
            seg.next_step = int(info.get("last_step", 0)) + 1
            placed[(host, i)] = seg
            out[key] = dict(info)
        for (host, i), seg in placed.items():
            key = f"{host}:{i}"
            if states is not None and key in states:
                seg.load_state(dict(states[key]))
            elif out[key].get("pending"):
                out[key]["discarded"] = seg.discard()
        self.remote.update(placed)
        return out

    def status(self) -> dict[str, str]:
        """Approval status of every proposed segment (``"approved"``, ``"pending"``, ...)."""
        return {seg.segment_id: self.transport.call(seg.party, "status",
                                                    segment=seg.segment_id)["status"]
                for seg in self.remote.values()}

    def require_approved(self) -> None:
        waiting = {k: v for k, v in self.status().items() if v != "approved"}
        if waiting:
            raise ApprovalError(f"segments not approved yet: {waiting}")

    # ------------------------------------------------------------------ low-level steps
    def send_forward(self, source: str, indices: torch.Tensor, *,
                     dataset: str | None = None, node: int | None = None) -> ActivationPointer:
        """Run an input segment on ``indices``; return a pointer to its activation."""
        if node is None:
            node = next(i for i, n in enumerate(self.plan.nodes) if not n.inputs)
        return ActivationPointer(self._seg(source, node), torch.as_tensor(indices), None, dataset)

    def _graph(self, source: str, indices: torch.Tensor, dataset: str | None,
               inputs: dict[int, torch.Tensor] | None = None, *, evaluate: bool = False,
               ) -> tuple[dict[int, torch.Tensor], dict[str, tuple[torch.Tensor, dict[str, Any]]]]:
        """Every node's output, and the loss of each task whose loss is at a data owner: for
        training (autograd across parties) or, with ``evaluate``, in the evaluation form (data
        owners get ``train=False``: nothing is left pending there)."""
        values: dict[int, torch.Tensor] = {}
        remote_losses: dict[str, tuple[torch.Tensor, dict[str, Any]]] = {}
        enc = self.plan.encrypted
        for i, node in enumerate(self.plan.nodes):
            if enc is not None and i == enc.node:
                assert self.he is not None
                values[i] = node.module(
                    self.he.forward(source, indices, dataset, train=False) if evaluate
                    else encrypted_forward(self.he, source, indices, dataset))
            elif enc is not None and not node.inputs:
                continue  # its activation only ever travels encrypted, into the layer above
            elif node.owner == MODEL_OWNER:
                values[i] = node.module(self._merge(i, values))
            elif not node.inputs and inputs is not None and i in inputs:
                values[i] = inputs[i].to(self.device)  # fetched already (concurrent rounds)
            elif not node.inputs:
                values[i] = (self._seg(source, i).forward(indices=indices, dataset=dataset,
                                                          train=False) if evaluate
                             else self.send_forward(source, indices, dataset=dataset,
                                                    node=i).resolve()).to(self.device)
            elif self.plan.remote_loss_node(i):
                task = self.plan.task_at(i)
                assert task is not None
                x, seg = self._wire(self._merge(i, values)), self._seg(source, i)
                if evaluate:
                    r = seg.loss_step(x, indices, dataset=dataset, train=False)
                    remote_losses[task.name] = (
                        torch.tensor(r["loss_sum"] / r["count"], dtype=torch.float64),
                        {"correct": r["correct"]})  # checked by loss_step
                else:
                    remote_losses[task.name] = remote_loss(x, seg, indices, dataset)
            else:
                x, seg = self._wire(self._merge(i, values)), self._seg(source, i)
                values[i] = (seg.forward(x=x, dataset=dataset, train=False) if evaluate
                             else ActivationPointer(seg, None, x, dataset).resolve()
                             ).to(self.device)
        return values, remote_losses

    def forward(self, source: str, indices: torch.Tensor, *,
                dataset: str | None = None) -> torch.Tensor:
        """Output of the first task's segment (at the model owner), autograd-connected.

        Under ``torch.no_grad()`` this is inference: a held-back gradient is delivered first,
        then data owners run their segments in evaluation mode (``train=False``: no step is
        left pending there, their BatchNorm statistics do not move); the model owner's
        segments run in the mode they are in (``.eval()`` them for a full evaluation, or use
        :meth:`evaluate_batch`)."""
        task = self.plan.tasks[0]
        if task.labels == DATA_OWNER:
            raise ProtocolError("in a U-shaped plan the output stays at the data owner; "
                                "use session.loss(source, indices)")
        if not torch.is_grad_enabled():
            self.flush(source)
            values, _ = self._graph(source, torch.as_tensor(indices), dataset, evaluate=True)
        else:
            values, _ = self._graph(source, torch.as_tensor(indices), dataset)
        return values[task.node]

    def loss(self, source: str, indices: torch.Tensor,
             labels: torch.Tensor | dict[str, torch.Tensor] | None = None, *,
             dataset: str | None = None,
             inputs: dict[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, StepMetrics]:
        """The training loss (weighted sum over tasks) wherever the labels are; call
        ``.backward()`` on it, then :meth:`step`. Under ``torch.no_grad()`` it is inference,
        as :meth:`forward` is (data owners evaluate; nothing is left pending).

        ``inputs``: activations of data-owner input segments fetched already (node index ->
        a leaf tensor that requires grad, from :meth:`RemoteSegment.forward`); those segments
        are not called, and sending their gradients is the caller's job
        (:mod:`syft_split.rounds` fetches a round's activations concurrently this way)."""
        indices = torch.as_tensor(indices)
        evaluate = not torch.is_grad_enabled() and inputs is None
        if evaluate:  # inference, as in forward(): nothing left pending at the data owners
            self.flush(source)
        values, remote = self._graph(source, indices, dataset, inputs, evaluate=evaluate)
        total: torch.Tensor | None = None
        per_task: dict[str, dict[str, float]] = {}
        for task in self.plan.tasks:
            if task.name in remote:
                loss, m = remote[task.name]
                correct = int(m["correct"])
            else:
                out = values[task.node]
                y = self._labels(source, task, labels, out).to(out.device)
                loss = LOSSES[task.loss](out, y)
                correct = count_correct(out, y)
            per_task[task.name] = {"loss": float(loss.detach()), "correct": correct}
            total = task.weight * loss if total is None else total + task.weight * loss
        assert total is not None
        first = per_task[self.plan.tasks[0].name]
        return total, StepMetrics(float(total.detach()), int(first["correct"]),
                                  int(indices.shape[0]),
                                  per_task if len(self.plan.tasks) > 1 else {})

    def _labels(self, source: str, task: Task,
                labels: torch.Tensor | dict[str, torch.Tensor] | None,
                out: torch.Tensor) -> torch.Tensor:
        if task.labels == RELEASED:  # a data owner's answer: checked against the task's loss
            inputs = [i for i, n in enumerate(self.plan.nodes) if not n.inputs]
            seg = self._seg(source, inputs[0])
            if seg.last_labels is None:
                raise ProtocolError(f"{source} released no labels with its activations")
            return Answer(seg.party, "forward", {}, bound=self.max_abs_value).labels(
                "labels", seg.last_labels, out, task.loss)
        if isinstance(labels, dict):
            if task.name not in labels:
                raise ConfigError(f"no labels for task {task.name!r}; got {sorted(labels)}")
            return labels[task.name]
        if labels is None:
            raise ConfigError(f"task {task.name!r} has its labels at the model owner: pass them "
                              "to loss()/the trainer")
        return labels

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self._steps_done()

    def step(self) -> None:
        """Optimizer step for the model owner's segments (data owners step in their backward).

        One backward per step: data owners step on every gradient they receive, so a second
        training pass through a remote segment before this raises ``ProtocolError`` (no
        gradient accumulation across remote segments)."""
        for opt in self.optimizers:
            opt.step()
        self._steps_done()

    def _steps_done(self) -> None:
        for seg in self.remote.values():
            seg.awaiting_step = False

    def flush(self, source: str | None = None) -> None:
        """Deliver every held-back gradient (data owners then have stepped); ``source``: only
        those of the segments that run ``source``'s records (the others may be unreachable)."""
        for (host, i), seg in self.remote.items():
            if source is None or host == self._host(source, i):
                seg.flush()

    def discard(self) -> dict[str, dict[str, bool]]:
        """Drop the step in flight everywhere (after a failed step), keeping weights: requests
        whose delivery is unknown are settled first; returns, per segment id, what was dropped
        (held-back gradient / loss weight never sent, the data owner's pending step)."""
        self._steps_done()
        return {seg.segment_id: seg.discard() for seg in self.remote.values()}

    def unsettled(self) -> dict[str, dict[str, Any]]:
        """Requests whose delivery is unknown (after a timeout or lost connection), by segment
        id; they are sent again, under their step ids, before anything else on that segment."""
        return {seg.segment_id: u for seg in self.remote.values()
                if (u := seg.unsettled) is not None}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate_batch(self, source: str, indices: torch.Tensor,
                       labels: torch.Tensor | dict[str, torch.Tensor] | None = None, *,
                       dataset: str | None = None) -> StepMetrics:
        """Loss and correct counts on a batch, without gradient bookkeeping anywhere: on the
        current weights (a held-back gradient is delivered first), every segment in
        evaluation mode (the model owner's get their own modes back afterwards)."""
        with torch.no_grad(), eval_mode(*self.local.values()):
            return self.loss(source, indices, labels, dataset=dataset)[1]

    def measure_leakage(self, dataset: str, *, budget_s: float | None = None,
                        skip: Collection[str] = ()) -> dict[str, dict[str, float]]:
        """Ask every data owner to run, on its side, the attack suite on what its input
        segment releases (white-box inversion, a converged decoder, linear checks, dCor,
        labels), scored on held-out records of ``dataset``; only the figures come back
        (``inversion_ratio``/``inversion_ssim``: the worst case over the attacks)."""
        self.flush()
        out = {}
        extra = {} if budget_s is None else {"budget_s": budget_s}
        for (host, _i), seg in self.remote.items():
            if seg.role == "input" and seg.segment_id and host not in skip:
                r = self.transport.call(host, "leakage", segment=seg.segment_id, dataset=dataset,
                                        **extra)
                out[host] = {k: float(v) for k, v in Answer(host, "leakage", r).figures().items()}
        return out

    def watch_status(self, *, skip: Collection[str] = ()) -> dict[str, dict[str, Any]]:
        """Each data owner's live leakage watch on its input segment: the figures measured now
        on the current weights, or ``halted`` with the reason if it stopped the segment."""
        from .errors import LeakageHaltError

        out: dict[str, dict[str, Any]] = {}
        for (host, _i), seg in self.remote.items():
            if seg.role != "input" or host in skip:
                continue
            try:
                figures = Answer(host, "watch", self.transport.call(
                    host, "watch", segment=seg.segment_id)).figures(text=True)
            except LeakageHaltError as exc:
                figures = {"halted": True, "reason": str(exc)}
            if figures:  # no watch there: nothing to report
                out[host] = figures
        return out

    def export_model(self, source: str | None = None) -> nn.Sequential:
        """The trained model in one ``nn.Sequential``; see :func:`syft_split.export.export_model`
        (chain plans; each data owner must have released its weights first)."""
        from .export import export_model

        return export_model(self, source)

    def records(self, source: str, dataset: str) -> int:
        """Number of records ``source`` holds in ``dataset`` (public metadata)."""
        inputs = [i for i, n in enumerate(self.plan.nodes) if not n.inputs]
        counts = {int(self._describe(self._host(source, i))[dataset]["records"]) for i in inputs}
        if len(counts) != 1:
            raise ConfigError(f"input parties hold different numbers of {dataset!r} records "
                              f"{sorted(counts)}: align them first")
        return counts.pop()


def _build_optimizers(plan: SplitPlan, local: Mapping[int, nn.Module],
                      default_spec: OptimizerSpec) -> list[torch.optim.Optimizer]:
    """The default optimizer over the model owner's segments without an override, then one
    per overriding segment. A layer shared by several segments is stepped once (parameters
    are taken by identity); one parameter under two optimizers is a :class:`ConfigError`."""
    groups: list[tuple[OptimizerSpec, list[nn.Parameter]]] = [(default_spec, [])]
    where: dict[int, tuple[int, int]] = {}  # id(parameter) -> (group, segment)
    for i, m in local.items():
        spec = plan.nodes[i].optimizer
        if spec is not None:
            groups.append((spec, []))
        g = 0 if spec is None else len(groups) - 1
        for p in m.parameters():
            if id(p) in where:
                first_g, first_i = where[id(p)]
                if first_g != g:
                    raise ConfigError(f"segments {first_i} and {i} share a parameter under "
                                      "two optimizers (optimizer= overrides), which would step "
                                      "it twice: leave both on the session's optimizer")
                continue
            where[id(p)] = (g, i)
            groups[g][1].append(p)
    return [spec.build(params) for spec, params in groups]
