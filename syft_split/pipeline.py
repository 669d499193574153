"""Pipelined split learning with a gradient delay of one step (``Trainer(gradient_delay=1)``).

Exact split learning needs one round trip per step: the data owner's forward of batch t+1
waits for the gradient of batch t. Here the model owner keeps two requests in flight per data
owner: it sends the gradient of batch t together with the forward of batch t+2, so the
activation of batch t+2 is computed before the gradient of batch t+1 arrived. The data owner
stashes the weights each pending forward used (host op ``pipe_forward``), so every gradient
is exact for the weights that produced its activation and is applied one step late.

Trade-offs (an approximation, not exact split learning): the data owner's weights run one
update behind the model owner's view (stale gradients, as in PipeDream-style pipelining);
with small learning rates this matches exact training closely, with large ones it can slow
convergence. It hides at most one round trip per two steps: with a round trip of L seconds
and C seconds of computation per step, a step costs about max(C, (L + C) / 2) instead of
L + C. Over long round trips the local-loss schedule (:mod:`syft_split.local_loss`), which
sends many batches per call and no gradients back, is the faster one. Only plans whose data
owners run the first segment and the model owner everything else (vanilla, multi-task heads,
labels at the model owner or released) are supported; no encryption, no multi-hop.

Durability: the data owner saves its segment after every pipelined call, but the calls carry
no step ids and the pending forwards live in memory only, so a call cut by a crash is not
settled exactly once, and ``Trainer.fit`` refuses ``checkpoint_dir`` with ``gradient_delay``
(:mod:`syft_split.host.latency`). A failed epoch drops the pending forwards at every data
owner it can reach and raises its own error; each epoch starts by dropping them again.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import CancelledError, Future
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .answers import Answer
from .errors import ConfigError, ProtocolError
from .losses import LOSSES, count_correct
from .remote import RemoteSegment
from .topology import DATA_OWNER, MODEL_OWNER, RELEASED
from .transport.latency import submit_call

if TYPE_CHECKING:
    from .session import SplitSession, StepMetrics
    from .topology import SplitPlan
    from .trainer import Trainer

__all__ = ["plan_problems", "check_latency_options", "model_owner_step",
           "pipelined_epoch"]


def plan_problems(plan: SplitPlan, what: str) -> list[str]:
    """Why ``plan`` cannot run a latency-tolerant schedule (``what`` names it)."""
    problems = []
    inputs = [i for i, n in enumerate(plan.nodes) if not n.inputs]
    if inputs != [0] or plan.nodes[0].owner != DATA_OWNER:
        problems.append(f"{what} needs exactly one input segment, segment 0, run by every data "
                        "owner")
    if any(n.owner != MODEL_OWNER for n in plan.nodes[1:]):
        problems.append(f"{what} needs every segment after the first at the model owner "
                        "(no U-shape, no multi-hop)")
    if plan.encrypted is not None:
        problems.append(f"{what} does not combine with an encrypted layer")
    return problems


def check_latency_options(session: SplitSession, schedule: str, gradient_delay: int) -> None:
    """Refuse (ConfigError) a trainer configuration the latency-tolerant schedules cannot run."""
    local = session.plan.local_loss is not None
    if gradient_delay not in (0, 1):
        raise ConfigError(f"gradient_delay must be 0 (exact) or 1 (pipelined), got "
                          f"{gradient_delay!r}")
    if (local or gradient_delay) and schedule != "round_robin":
        raise ConfigError(f"local losses and pipelining run with schedule='round_robin', not "
                          f"{schedule!r}")
    if local and gradient_delay:
        raise ConfigError("a local-loss plan sends no gradients: gradient_delay does not apply")
    if gradient_delay:
        problems = plan_problems(session.plan, "pipelining")
        if problems:
            raise ConfigError("cannot pipeline this plan:\n  - " + "\n  - ".join(problems))


def model_owner_step(session: SplitSession, act: torch.Tensor, labels: Any,
                     released: torch.Tensor | None, *, need_grad: bool = True,
                     answer: Answer | None = None) -> tuple[torch.Tensor | None, StepMetrics]:
    """One step of the model owner's segments on a data owner's activation: forward, losses of
    every task, backward, optimizer step. Returns the gradient w.r.t. ``act`` (None without
    ``need_grad``: then it is not computed) and metrics. ``released`` labels are checked
    against each task's loss first, as a field of ``answer`` (the data owner's answer they
    came in), before anything is stepped."""
    from .session import StepMetrics

    plan = session.plan
    leaf = act.detach().requires_grad_(need_grad)
    session.zero_grad()
    values: dict[int, torch.Tensor] = {0: leaf}
    for i in range(1, len(plan.nodes)):
        values[i] = plan.nodes[i].module(session._merge(i, values))
    total: torch.Tensor | None = None
    per_task: dict[str, dict[str, float]] = {}
    if answer is None:
        answer = Answer("the data owner", "forward", {}, bound=session.max_abs_value)
    for task in plan.tasks:
        out = values[task.node]
        if task.labels == RELEASED:
            if released is None:
                raise ProtocolError("the data owner released no labels with its activations")
            y = answer.labels("labels", released, out, task.loss)
        elif isinstance(labels, dict):
            y = labels[task.name]
        elif labels is None:
            raise ConfigError(f"task {task.name!r} has its labels at the model owner: pass them "
                              "to the trainer")
        else:
            y = labels
        loss = LOSSES[task.loss](out, y)
        per_task[task.name] = {"loss": float(loss.detach()), "correct": count_correct(out, y)}
        weighted = loss if task.weight == 1.0 else task.weight * loss
        total = weighted if total is None else total + weighted
    assert total is not None
    total.backward()
    session.step()
    first = per_task[plan.tasks[0].name]
    grad = None if not need_grad else (
        leaf.grad.detach() if leaf.grad is not None else torch.zeros_like(leaf))
    return grad, StepMetrics(float(total.detach()), int(first["correct"]),
                                      int(act.shape[0]),
                                      per_task if len(plan.tasks) > 1 else {})


class _Totals:
    def __init__(self, trainer: Trainer, total: int, epoch: int) -> None:
        self.trainer = trainer
        self.loss_sum, self.correct, self.count = 0.0, 0, 0
        self.bar = tqdm(total=total, desc=f"epoch {epoch}", disable=not trainer.progress,
                        leave=False)

    def add(self, m: StepMetrics) -> None:
        self.trainer.report.steps += 1
        self.loss_sum += m.loss * m.count
        self.correct += m.correct
        self.count += m.count
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.loss_sum / self.count:.3f}",
                             acc=f"{self.correct / self.count:.3f}")

    def result(self) -> StepMetrics:
        from .session import StepMetrics

        self.bar.close()
        return StepMetrics(self.loss_sum / max(self.count, 1), self.correct, self.count)


def pipelined_epoch(trainer: Trainer, epoch: int) -> StepMetrics:
    """One epoch with a gradient delay of one step (see the module docstring)."""
    s = trainer.session
    order = [(p, idx) for p, idx, _ in trainer._order(trainer._batches())]
    segs: dict[str, RemoteSegment] = {p: s._seg(p, 0) for p in s.plan.sources}
    s.flush()  # nothing of an exact step may be pending at the data owners
    for seg in segs.values():  # start clean: drop forwards an interrupted epoch left pending
        s.transport.call(seg.party, "pipe_discard", segment=seg.segment_id)
    queues: dict[str, deque[Future[dict[str, Any]]]] = {p: deque() for p in segs}
    todo: dict[str, deque[torch.Tensor]] = {p: deque() for p in segs}
    for p, idx in order:
        todo[p].append(idx)
    seq = dict.fromkeys(segs, 0)
    ds = trainer.train_dataset

    def send(p: str, op: str, **fields: Any) -> None:
        seg = segs[p]
        queues[p].append(submit_call(s.transport, seg.party, op, segment=seg.segment_id,
                                     seq=seq[p], **fields))
        seq[p] += 1

    totals = _Totals(trainer, len(order), epoch)
    try:
        for p in segs:  # two forwards in flight per data owner
            for _ in range(min(2, len(todo[p]))):
                send(p, "pipe_forward", indices=todo[p].popleft(), dataset=ds)
        for p, idx in order:
            response = queues[p].popleft().result()
            answer = Answer(p, "pipe_forward", response, bound=s.max_abs_value)
            act = answer.tensor("activation", (int(idx.shape[0]), *segs[p].output_shape))
            grad, m = model_owner_step(s, act, trainer._label(p, ds, idx),
                                       response.get("labels"), answer=answer)
            assert grad is not None
            trainer.ledger.session_step(s, p, int(idx.shape[0]))  # data owner + model owner
            if todo[p]:
                send(p, "pipe_forward", indices=todo[p].popleft(), dataset=ds, grad=grad)
            else:
                send(p, "pipe_backward", grad=grad)
            totals.add(m)
        for q in queues.values():  # the last gradients are applied
            while q:
                q.popleft().result()
    except BaseException as exc:
        _discard_all(s, segs, queues, exc)
        raise
    return totals.result()


def _discard_all(s: SplitSession, segs: dict[str, RemoteSegment],
                 queues: dict[str, deque[Future[dict[str, Any]]]], exc: BaseException) -> None:
    """After a failed pipelined epoch: wait for what is in flight, then drop the pending
    forwards at every data owner, each on its own (one still unreachable does not stop the
    others); failures are noted on ``exc``, which the caller raises (the next epoch discards
    again before it starts)."""
    for q in queues.values():
        for f in q:
            with suppress(CancelledError):  # wait for what is in flight
                f.exception()
    for p, seg in segs.items():
        try:
            s.transport.call(seg.party, "pipe_discard", segment=seg.segment_id)
        except Exception as err:  # the original error is the one raised
            exc.add_note(f"pipe_discard at {p} failed too: {type(err).__name__}: {err}")

