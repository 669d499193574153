"""The model owner's session: place a plan's segments on hosts, then train as if local.

>>> session = SplitSession(plan, transport, optimizer=OptimizerSpec("adam", lr=1e-3))
>>> ids = session.propose()            # data owners review and approve once
>>> out = session.forward("hospital", idx)          # vanilla: logits at the model owner
>>> loss = F.cross_entropy(out, y[idx]); loss.backward(); session.step()

``session.loss(party, idx)`` works in every setting (it computes the loss where the labels
are: at the model owner, or at the data owner in the U-shaped setting).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ApprovalError, ConfigError, ProtocolError
from .host import LOSSES
from .remote import ActivationPointer, RemoteSegment, remote_loss
from .spec import OptimizerSpec, module_to_spec, spec_state
from .topology import DATA_OWNER, MODEL_OWNER, SplitPlan
from .transport.base import Transport

__all__ = ["SplitSession", "StepMetrics"]


@dataclass
class StepMetrics:
    """Loss and accuracy counts of one batch."""

    loss: float
    correct: int
    count: int


class SplitSession:
    """Everything the model owner drives: see the module docstring."""

    def __init__(self, plan: SplitPlan, transport: Transport, *,
                 optimizer: OptimizerSpec | None = None, fuse: bool = True) -> None:
        plan.validate()
        missing = [d for d in plan.data_owners + plan.relays if d not in transport.parties()]
        if missing:
            raise ConfigError(f"parties {missing} are not reachable through the transport; "
                              f"connected: {transport.parties()}")
        self.plan = plan
        self.transport = transport
        self.optimizer_spec = optimizer or OptimizerSpec("sgd", lr=0.01)
        self.fuse = fuse
        #: modules the model owner runs, by segment position (shared by all data owners)
        self.local: dict[int, nn.Module] = {
            i: seg for i, (seg, o) in enumerate(zip(plan.segments, plan.owners)) if o == MODEL_OWNER
        }
        params = [p for m in self.local.values() for p in m.parameters()]
        self.optimizer = self.optimizer_spec.build(params)
        self.remote: dict[tuple[str, int], RemoteSegment] = {}
        self.metadata: dict[str, dict[str, Any]] = {}
        self._proposed: dict[tuple[str, int], dict[str, Any]] = {}

    # ------------------------------------------------------------------ placement
    def _shapes(self, feature_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Per-record input shape of every segment (dry run on zeros, at the model owner)."""
        shapes = [feature_shape]
        x = torch.zeros((2, *feature_shape))
        with torch.no_grad():
            for seg in self.plan.segments:
                was = seg.training
                seg.eval()
                x = seg(x)
                seg.train(was)
                shapes.append(tuple(x.shape[1:]))
        return shapes

    def propose(self) -> dict[str, list[str]]:
        """Send every data-owner segment to its host for review; return proposal ids by party."""
        out: dict[str, list[str]] = {}
        last = len(self.plan.segments) - 1
        for party in self.plan.data_owners:
            meta = self.transport.call(party, "describe")["datasets"]
            missing = [d for d in self.plan.datasets if d not in meta]
            if missing:
                raise ConfigError(f"{party} has no datasets {missing}; it has {sorted(meta)}")
            self.metadata[party] = meta
            feature_shape = tuple(meta[self.plan.datasets[0]]["feature_shape"])
            shapes = self._shapes(feature_shape)
            for i, owner in enumerate(self.plan.owners):
                host = self._host(party, i)
                if owner == MODEL_OWNER or (host, i) in self.remote:
                    continue
                role = "input" if i == 0 else ("loss" if i == last else "middle")
                module = copy.deepcopy(self.plan.segments[i])
                fields: dict[str, Any] = {
                    "role": role,
                    "spec": module_to_spec(module),
                    "optimizer": self.optimizer_spec.to_json(),
                    "datasets": list(self.plan.datasets) if owner == DATA_OWNER else [],
                    "input_shape": list(shapes[i]),
                    "max_batch": self.plan.max_batch,
                    **{f"state/{k}": v for k, v in spec_state(module).items()},
                }
                if role == "loss":
                    fields["loss"] = self.plan.loss
                if role == "input" and self.plan.release_labels:
                    fields["release_labels"] = True
                response = self.transport.call(host, "propose", **fields)
                pid = response["segment"]
                self.remote[(host, i)] = RemoteSegment(
                    self.transport, host, pid, role, shapes[i], shapes[i + 1], fuse=self.fuse)
                out.setdefault(host, []).append(pid)
        return out

    def status(self) -> dict[str, str]:
        """Approval status of every proposed segment."""
        return {seg.segment_id: self.transport.call(seg.party, "status",
                                                    segment=seg.segment_id)["status"]
                for seg in self.remote.values()}

    def require_approved(self) -> None:
        waiting = {k: v for k, v in self.status().items() if v != "approved"}
        if waiting:
            raise ApprovalError(f"segments not approved yet: {waiting}")

    def _host(self, party: str, i: int) -> str:
        """The party that runs segment ``i`` in ``party``'s chain."""
        owner = self.plan.owners[i]
        return party if owner == DATA_OWNER else owner

    def _seg(self, party: str, i: int) -> RemoteSegment:
        seg = self.remote.get((self._host(party, i), i))
        if seg is None:
            raise ProtocolError(f"no segment {i} placed at {party!r}; call propose() first")
        return seg

    # ------------------------------------------------------------------ low-level steps
    def send_forward(self, party: str, indices: torch.Tensor, *,
                     dataset: str | None = None) -> ActivationPointer:
        """Run the first segment at ``party`` on ``indices``; return a pointer to the activation."""
        return ActivationPointer(self._seg(party, 0), indices, None, dataset)

    def _run(self, party: str, indices: torch.Tensor, dataset: str | None,
             stop_before_loss: bool) -> torch.Tensor:
        h = self.send_forward(party, indices, dataset=dataset).resolve()
        n = len(self.plan.segments)
        for i in range(1, n):
            if self.plan.owners[i] == MODEL_OWNER:
                h = self.local[i](h)
            elif i == n - 1 and stop_before_loss:
                return h
            else:
                h = ActivationPointer(self._seg(party, i), None, h, dataset).resolve()
        return h

    def forward(self, party: str, indices: torch.Tensor, *,
                dataset: str | None = None) -> torch.Tensor:
        """Output of the whole model on ``party``'s records (vanilla plans), autograd-connected."""
        if self.plan.owners[-1] == DATA_OWNER:
            raise ProtocolError("in a U-shaped plan the output stays at the data owner; "
                                "use session.loss(party, indices)")
        return self._run(party, torch.as_tensor(indices), dataset, stop_before_loss=False)

    def loss(self, party: str, indices: torch.Tensor, labels: torch.Tensor | None = None, *,
             dataset: str | None = None) -> tuple[torch.Tensor, StepMetrics]:
        """The training loss on ``party``'s records, wherever the labels are; call
        ``.backward()`` on it, then :meth:`step`."""
        indices = torch.as_tensor(indices)
        if self.plan.owners[-1] == DATA_OWNER:
            h = self._run(party, indices, dataset, stop_before_loss=True)
            loss, m = remote_loss(h, self._seg(party, len(self.plan.segments) - 1), indices,
                                  dataset)
            return loss, StepMetrics(float(loss.detach()), int(m["correct"]), int(m["count"]))
        out = self._run(party, indices, dataset, stop_before_loss=False)
        y = self._labels(party, labels)
        loss = LOSSES[self.plan.loss](out, y)
        return loss, StepMetrics(float(loss.detach()), _correct(out, y), int(indices.shape[0]))

    def _labels(self, party: str, labels: torch.Tensor | None) -> torch.Tensor:
        if self.plan.release_labels:
            y = self._seg(party, 0).last_labels
            if y is None:
                raise ProtocolError(f"{party} released no labels with its activations")
            return y
        if labels is None:
            raise ConfigError("labels are at the model owner: pass them to loss()/the trainer")
        return labels

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        """Optimizer step for the model owner's segments (data owners step in their backward)."""
        self.optimizer.step()

    def flush(self) -> None:
        """Deliver every held-back gradient (data owners then have stepped)."""
        for seg in self.remote.values():
            seg.flush()

    def discard(self) -> None:
        """Drop pending forwards everywhere (after a failed step), keeping weights."""
        for seg in self.remote.values():
            seg.discard()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate_batch(self, party: str, indices: torch.Tensor, labels: torch.Tensor | None = None,
                       *, dataset: str | None = None) -> StepMetrics:
        """Loss and correct count on a batch, without gradient bookkeeping anywhere."""
        indices = torch.as_tensor(indices)
        n = len(self.plan.segments)
        h = self._seg(party, 0).forward(indices=indices, dataset=dataset, train=False)
        labels_out = self._seg(party, 0).last_labels
        for m in self.local.values():
            m.eval()
        try:
            for i in range(1, n):
                if self.plan.owners[i] == MODEL_OWNER:
                    h = self.local[i](h)
                elif i == n - 1:
                    r = self._seg(party, i).loss_step(h, indices, dataset=dataset, train=False)
                    return StepMetrics(r["loss_sum"] / r["count"], int(r["correct"]),
                                       int(r["count"]))
                else:
                    h = self._seg(party, i).forward(x=h, dataset=dataset, train=False)
        finally:
            for m in self.local.values():
                m.train()
        y = labels_out if self.plan.release_labels else self._labels(party, labels)
        assert y is not None
        loss = float(LOSSES[self.plan.loss](h, y))
        return StepMetrics(loss, _correct(h, y), int(indices.shape[0]))

    def records(self, party: str, dataset: str) -> int:
        """Number of records ``party`` holds in ``dataset`` (public metadata)."""
        if party not in self.metadata:
            self.metadata[party] = self.transport.call(party, "describe")["datasets"]
        return int(self.metadata[party][dataset]["records"])


def _correct(out: torch.Tensor, y: torch.Tensor) -> int:
    if out.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
        return int((out.argmax(1) == y).sum())
    return 0
