"""Split learning with local losses at the data owner (``SplitPlan(..., local_loss=LocalLoss(head))``).

After Han, Mu & Chen (2021), "Accelerating federated learning with split learning on locally
generated losses": each data owner trains its segment with an *auxiliary head* and a loss on
its own labels, and sends only activations; the model owner trains the rest of the network on
them. No gradient travels back, so the activations of up to ``batches_per_call`` batches
travel in one call (an epoch starts with calls of 1, 2, 4, ... batches so the model owner can
start after one round trip), and the model owner keeps up to ``batches_ahead`` batches
requested but not yet trained on (their activations are what it holds in memory): with a
round trip of L seconds, an epoch pays about one L instead of one L per batch, the rest
hidden behind computation on both sides.

The data owner reviews the auxiliary head with the segment (it joins the proposal through the
model-owner op ``propose_local_loss``) and must approve with ``local_loss=True``.

Trade-offs (an approximation, not exact split learning): the data owner's segment learns what
helps ITS auxiliary head, not what helps the model owner's layers -- with a weak head the cut
features can be worse than end-to-end ones (Han et al. report small accuracy losses on
CIFAR-10, none on simple data); the model owner trains on activations of weights a few steps
old; labels must be at the data owner; the auxiliary head is extra computation there (small
for a linear head). Supported plans: see :func:`syft_split.pipeline.plan_problems`.

Durability: the data owner saves its segment and auxiliary head after every ``local_forward``
and keeps them across restarts, but the calls carry no step ids, so a call cut by a crash is
not settled exactly once, and ``Trainer.fit`` refuses ``checkpoint_dir`` for these plans
(:mod:`syft_split.host.latency`).
"""

from __future__ import annotations

import copy
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .answers import Answer
from .errors import ConfigError
from .host.latency import MAX_BATCHES_PER_CALL
from .losses import LOSSES
from .pipeline import _Totals, model_owner_step, plan_problems
from .spec import OptimizerSpec, module_to_spec, spec_state
from .transport.latency import submit_call

if TYPE_CHECKING:
    from .session import StepMetrics
    from .topology import SplitPlan
    from .trainer import Trainer
    from .transport.base import Transport

__all__ = ["LocalLoss", "local_loss_epoch"]


@dataclass
class LocalLoss:
    """The auxiliary head every data owner trains its segment with (see the module docstring).

    ``head`` reads the first segment's output; ``loss`` is computed on the data owner's labels;
    ``optimizer`` trains the head there (default: the session's optimizer); the segment
    trains with the optimizer it was proposed with (its plan node's, or the session's).
    """

    head: nn.Module
    loss: str = "cross_entropy"
    batches_per_call: int = 16
    batches_ahead: int = 64
    optimizer: OptimizerSpec | None = None

    def problems(self, plan: SplitPlan) -> list[str]:
        """Why ``plan`` cannot train with this local loss (empty: it can)."""
        out = plan_problems(plan, "a local loss")
        if not isinstance(self.head, nn.Module):
            out.append(f"local_loss.head must be an nn.Module, got {type(self.head).__name__}")
        else:
            try:
                module_to_spec(self.head)
            except ConfigError as exc:
                out.append(f"the auxiliary head cannot run at the data owner: {exc}")
        if self.loss not in LOSSES:
            out.append(f"local_loss.loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        for name, hi in (("batches_per_call", MAX_BATCHES_PER_CALL), ("batches_ahead", 4096)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= hi:
                out.append(f"local_loss.{name} must be an int in 1..{hi}, got {v!r}")
        if plan.share_weights != "none":
            out.append("a local loss keeps every data owner's segment its own (share_weights="
                       "'none')")
        return out

    def attach(self, transport: Transport, party: str, segment: str,
               default: OptimizerSpec) -> None:
        """Attach the head to ``party``'s pending proposal ``segment`` (called by
        :meth:`SplitSession.propose`)."""
        head = copy.deepcopy(self.head)
        transport.call(party, "propose_local_loss", segment=segment, spec=module_to_spec(head),
                       loss=self.loss, optimizer=(self.optimizer or default).to_json(),
                       **{f"state/{k}": v for k, v in spec_state(head).items()})


def _chunks(n: int, k: int) -> list[tuple[int, int]]:
    """Batch ranges of the calls of an epoch: 1, 2, 4, ... batches, then ``k`` per call (the
    first answer comes back after one round trip and one batch, and the model owner starts)."""
    out, start, size = [], 0, 1
    while start < n:
        out.append((start, min(n, start + size)))
        start, size = start + size, min(2 * size, k)
    return out


@dataclass
class _Stream:
    """A trainer's local-loss calls: not yet sent, and in flight (possibly into the next
    epoch), each as (epoch, party, batches)."""

    epoch: int
    todo: deque[tuple[int, str, list[torch.Tensor]]] = field(default_factory=deque)
    pending: deque[tuple[int, str, list[torch.Tensor], Future[dict[str, Any]]]] = field(
        default_factory=deque)
    ahead: int = 0
    planned: int = 0  # the last epoch whose calls were added

    def drain(self) -> None:
        for *_, f in self.pending:
            f.exception()
        self.pending.clear()


_STREAMS: weakref.WeakKeyDictionary[Any, _Stream] = weakref.WeakKeyDictionary()


def _epoch_calls(trainer: Trainer, spec: LocalLoss) -> list[tuple[str, list[torch.Tensor]]]:
    """The calls of one epoch in the trainer's order: round robin over data owners, batches
    grouped by :func:`_chunks`."""
    per_source: dict[str, list[torch.Tensor]] = {}
    for p, idx, _ in trainer._order(trainer._batches()):
        per_source.setdefault(p, []).append(idx)
    calls = []
    rounds = max(len(v) for v in per_source.values())
    for start, stop in _chunks(rounds, spec.batches_per_call):
        for p, batches in per_source.items():
            if batches[start:stop]:
                calls.append((p, batches[start:stop]))
    return calls


def local_loss_epoch(trainer: Trainer, epoch: int) -> StepMetrics:
    """One epoch of the local-loss schedule: the data owners' calls run up to
    ``batches_ahead`` batches ahead of the model owner, which trains on their activations as
    they arrive. Inside :meth:`Trainer.fit`, with epochs still to come, the calls of the next
    epoch start before this one ends (an evaluation in between then sees the data owners'
    segments up to ``batches_ahead`` batches further on)."""
    s = trainer.session
    spec: LocalLoss = s.plan.local_loss
    ds = trainer.train_dataset
    previous = _STREAMS.pop(trainer, None)
    if previous is not None and previous.epoch == epoch:
        stream = previous
    else:
        if previous is not None:
            previous.drain()
        s.flush()
        stream = _Stream(epoch, planned=epoch)
        stream.todo.extend((epoch, p, b) for p, b in _epoch_calls(trainer, spec))
    more = getattr(trainer, "epochs_remaining", 0) > 0

    def submit() -> None:
        e, p, batches = stream.todo.popleft()
        seg = s._seg(p, 0)
        stream.ahead += len(batches)
        stream.pending.append((e, p, batches, submit_call(
            s.transport, seg.party, "local_forward", segment=seg.segment_id, dataset=ds,
            indices=torch.cat(batches), sizes=[int(b.shape[0]) for b in batches])))

    def refill() -> None:
        if more and stream.planned == epoch and not any(e == epoch for e, *_ in stream.todo):
            stream.planned = epoch + 1  # this epoch is all requested: the next one may start
            stream.todo.extend((epoch + 1, p, b) for p, b in _epoch_calls(trainer, spec))
        while stream.todo and (not stream.pending or stream.ahead + len(stream.todo[0][2])
                               <= spec.batches_ahead):
            submit()

    n = sum(len(b) for e, _, b in stream.todo if e == epoch) + sum(
        len(b) for e, _, b, _ in stream.pending if e == epoch)
    totals = _Totals(trainer, n, epoch)
    try:
        while (stream.pending and stream.pending[0][0] == epoch) or any(
                e == epoch for e, *_ in stream.todo):
            refill()
            _, p, batches, fut = stream.pending.popleft()
            response = fut.result()
            sizes = [int(b.shape[0]) for b in batches]
            answer = Answer(p, "local_forward", response, bound=s.max_abs_value)
            acts = answer.tensor("activation", (sum(sizes), *s._seg(p, 0).output_shape)
                                 ).split(sizes)
            labels = response.get("labels")
            if labels is not None and (not isinstance(labels, torch.Tensor) or labels.dim() == 0
                                       or labels.shape[0] != sum(sizes)):
                raise answer.refuse("labels", f"expected one label per record ({sum(sizes)})")
            released = labels.split(sizes) if labels is not None else [None] * len(sizes)
            for idx, act, y in zip(batches, acts, released):
                _, m = model_owner_step(s, act, trainer._label(p, ds, idx), y,
                                        need_grad=False, answer=answer)  # nothing goes back
                trainer.ledger.session_step(s, p, int(idx.shape[0]), local_loss=True)
                totals.add(m)
            stream.ahead -= len(batches)
        refill()
    except BaseException:
        stream.drain()
        raise
    if stream.pending or stream.todo:
        stream.epoch = epoch + 1
        _STREAMS[trainer] = stream
    return totals.result()
