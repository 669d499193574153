"""Concurrent rounds: the model owner drives every data owner of a round at once.

A SplitFed round (:mod:`~syft_split.schedules`) has every data owner train one batch against
the model owner's segments, then averages. Driven one data owner after the other, a round
over N datasites costs the sum of N round trips; :class:`SplitFedRounds` overlaps them:

1. **forward**, all data owners at once: each runs its input segment on its batch;
2. **model owner**, in the round's order: for each data owner, the rest of the network, the
   loss, backward and the optimizer step (SplitFed v1: on that data owner's copy of the model
   owner's segments, :class:`~syft_split.schedules.ServerCopies`; v2: on the one copy, in
   order) -- exactly the computation of the sequential schedule;
3. **backward**, all at once: each data owner receives its cut-layer gradient and steps;
4. **averaging**: the data owners' segments by secure aggregation among them (the trainer's
   :class:`~syft_split.schedules.SecureAverage`, each phase -- contribute, aggregate -- for
   every data owner at once) and, for v1, the server copies (:meth:`ServerCopies.average`).

Results equal the sequential schedule's (the same operations in the same order per party).
Data owners of unequal size: one without a batch in a round sits it out of the averaging
(weight 0) and is relayed the average, so it continues from it like everybody else. A data
owner's ``HostLimits.min_cohort`` may refuse a round's cohort (too few members with a batch,
or a batch under a tenth of the largest) or relaying its weights: that is its policy, not a
failure. The round is then not averaged (every data owner, and with v1 its server copy, keeps
its weights) or the average not relayed, ``report.not_averaged`` says which round and why,
and every data owner trains on.

Failures: :func:`run_each` bounds the calls in flight (``max_workers``) and gives each data
owner ``deadline_s`` per phase. A data owner whose call fails or does not answer in time is
reported by name (:class:`PartyFailure`, also in the run report) and dropped for the rest of
the run; the round goes on with the others, whose steps and averaging are kept. A bad answer
is its sender's failure only: an activation the model owner refuses (its answer's check,
:mod:`syft_split.answers`) fails that data owner in phase ``"forward"``, a non-finite loss or
gradient on it in phase ``"model owner"``, before anything changed, and a bad
secure-aggregation contribution fails its sender (see
:class:`~syft_split.schedules.SecureAverage`), never the peers whose refusals follow. A call
past its deadline is abandoned, not killed: its (daemon) thread ends when the transport returns.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch

from .errors import ConfigError, NonFiniteError, TransportError, ValidationError
from .schedules import ServerCopies
from .session import SplitSession, StepMetrics
from .topology import DATA_OWNER, MODEL_OWNER

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = [
    "PartyFailure",
    "RoundResult",
    "RoundTiming",
    "SplitFedRounds",
    "run_each",
    "unsupported",
]

_log = logging.getLogger(__name__)
T = TypeVar("T")


# --------------------------------------------------------------------- bounded concurrency
def run_each(keys: Iterable[str], fn: Callable[[str], T], *, max_workers: int = 8,
             deadline_s: float | None = None) -> tuple[dict[str, T], dict[str, BaseException]]:
    """Run ``fn(key)`` for every key, at most ``max_workers`` at a time; return (results,
    errors) by key. A call running longer than ``deadline_s`` counts as failed
    (:class:`~syft_split.errors.TransportError`) and is abandoned: a fresh worker takes its
    place, so one stalled party never stalls the others. Workers are daemon threads."""
    keys = list(dict.fromkeys(keys))
    if not isinstance(max_workers, int) or max_workers < 1:
        raise ConfigError(f"max_workers must be an int >= 1, got {max_workers!r}")
    if deadline_s is not None and not deadline_s > 0:
        raise ConfigError(f"deadline_s must be > 0 or None, got {deadline_s!r}")
    results: dict[str, T] = {}
    errors: dict[str, BaseException] = {}
    if not keys:
        return results, errors
    todo: queue.SimpleQueue[str] = queue.SimpleQueue()
    for k in keys:
        todo.put(k)
    cond = threading.Condition()
    started: dict[str, float] = {}
    abandoned: set[str] = set()

    def worker() -> None:
        while True:
            try:
                key = todo.get_nowait()
            except queue.Empty:
                return
            with cond:
                started[key] = time.monotonic()
            try:
                ok, value = True, fn(key)
            except BaseException as exc:  # reported per key, never lost
                ok, value = False, exc  # type: ignore[assignment]
            with cond:
                if key in abandoned:  # past its deadline: a replacement took this place
                    return
                if ok:
                    results[key] = value
                else:
                    errors[key] = value  # type: ignore[assignment]
                cond.notify_all()

    def spawn() -> None:
        threading.Thread(target=worker, daemon=True, name="syft-split-round").start()

    for _ in range(min(max_workers, len(keys))):
        spawn()
    with cond:
        while len(results) + len(errors) < len(keys):
            wait = None
            if deadline_s is not None:
                now = time.monotonic()
                left = []
                for k, t0 in list(started.items()):
                    if k in results or k in errors:
                        continue
                    if now - t0 >= deadline_s:
                        errors[k] = TransportError(f"{k} did not answer within {deadline_s:g} s")
                        abandoned.add(k)
                        spawn()  # keep max_workers calls in flight
                    else:
                        left.append(t0 + deadline_s - now)
                wait = max(min(left), 0.001) if left else 0.05
            cond.wait(wait)
    return results, errors


@dataclass
class PartyFailure:
    """A data owner that failed a round: in which phase, and the error (class: message)."""

    party: str
    round: int
    phase: str
    error: str


@dataclass
class RoundTiming:
    """Wall seconds of one round and of its phases; ``model_owner_s`` is the model owner's own
    compute (its segments, and the averaging arithmetic of its server copies)."""

    seconds: float = 0.0
    forward_s: float = 0.0
    model_owner_s: float = 0.0
    backward_s: float = 0.0
    aggregate_s: float = 0.0
    parties: int = 0


@dataclass
class RoundResult:
    """What one round produced: the step metrics of every data owner that completed it."""

    metrics: dict[str, StepMetrics] = field(default_factory=dict)
    timing: RoundTiming = field(default_factory=RoundTiming)


def unsupported(session: SplitSession) -> str | None:
    """Why the plan's rounds cannot run concurrently (None: they can). Every data owner must
    run only its input segment, the model owner everything else, and no layer be encrypted."""
    plan = session.plan
    if plan.encrypted is not None:
        return "HE-protected plans run the encrypted layer one data owner at a time"
    for i, node in enumerate(plan.nodes):
        if node.owner not in (DATA_OWNER, MODEL_OWNER):
            return f"segment {i} runs at {node.owner!r}, a party shared by every data owner"
        if node.owner == DATA_OWNER and node.inputs:
            return f"segment {i} runs at the data owners after a model-owner segment (U-shaped)"
    return None


# ------------------------------------------------------------------------- SplitFed rounds
class SplitFedRounds:
    """Run a :class:`~syft_split.trainer.Trainer`'s SplitFed epochs round by round, every data
    owner of a round concurrently (see the module docstring).

    ``max_workers`` bounds the calls in flight; ``deadline_s`` is each data owner's time per
    phase of a round (None: as long as the transport waits). ``timings`` holds every round's
    :class:`RoundTiming`, ``failures`` every :class:`PartyFailure`, ``dropped`` the data
    owners left out since they failed.
    """

    def __init__(self, trainer: Trainer, *, max_workers: int = 8,
                 deadline_s: float | None = None) -> None:
        if trainer.schedule not in ("splitfed_v1", "splitfed_v2"):
            raise ConfigError(f"concurrent rounds run SplitFed schedules, not {trainer.schedule!r}")
        why = unsupported(trainer.session)
        if why:
            raise ConfigError(f"this plan cannot run SplitFed rounds concurrently: {why}; use "
                              "max_workers=1")
        if not isinstance(max_workers, int) or max_workers < 1:
            raise ConfigError(f"max_workers must be an int >= 1, got {max_workers!r}")
        if deadline_s is not None and not deadline_s > 0:
            raise ConfigError(f"party_deadline_s must be > 0 or None, got {deadline_s!r}")
        self.trainer = trainer
        self.session = trainer.session
        self.max_workers = max_workers
        self.deadline_s = deadline_s
        self.copies: ServerCopies | None = None
        self.dropped: dict[str, PartyFailure] = {}
        self.failures: list[PartyFailure] = []
        self.timings: list[RoundTiming] = []
        self.rounds_run = 0
        #: seconds of each round of the last epoch
        self.epoch_round_seconds: list[float] = []
        self._node = next(i for i, n in enumerate(self.session.plan.nodes) if not n.inputs)

    def _each(self, phase: str, keys: Iterable[str], fn: Callable[[str], T]) -> dict[str, T]:
        results, errors = run_each(keys, fn, max_workers=self.max_workers,
                                   deadline_s=self.deadline_s)
        for party, exc in errors.items():
            self._drop(party, phase, exc)
        return results

    def _drop(self, party: str, phase: str, exc: BaseException) -> None:
        failure = PartyFailure(party, self.rounds_run, phase, f"{type(exc).__name__}: {exc}")
        self.failures.append(failure)
        self.dropped[party] = failure
        self.trainer.report.party_failures.append(asdict(failure))
        _log.warning("round %d: %s failed in %s (%s); continuing without it",
                     self.rounds_run, party, phase, failure.error)

    def _model_owner_step(self, p: str, idx: torch.Tensor, act: torch.Tensor
                          ) -> tuple[torch.Tensor, StepMetrics]:
        """The model owner's part of ``p``'s step on its activation ``act``: the rest of the
        network, the loss, backward and the optimizer step; returns the cut-layer gradient.

        ``p``'s activation was checked with its answer (:mod:`syft_split.answers`); the loss
        and every gradient are checked before the step: such a failure (a
        :class:`ValidationError`)
        raises before any weight or optimizer state changes, and buffers the forward moved
        (BatchNorm statistics) are put back, so one data owner's bad answer is its failure
        alone. Every other error (the model owner's own: labels it lacks, weights already not
        finite) is raised as it is: the run stops, no data owner is blamed for it."""
        s, tr = self.session, self.trainer
        if self.copies is not None:
            self.copies.use(p)
        buffers = [(b, b.detach().clone()) for m in s.local.values() for b in m.buffers()]
        s.zero_grad()
        try:
            leaf = act.detach().requires_grad_()
            loss, m = s.loss(p, idx, tr._label(p, tr.train_dataset, idx), dataset=tr.train_dataset,
                             inputs={self._node: leaf})
            if not bool(torch.isfinite(loss.detach()).all()):
                raise NonFiniteError(f"{p}: the loss on its activation is {float(loss.detach()):g}")
            loss.backward()
            bad = [n for m_ in s.local.values() for n, w in m_.named_parameters()
                   if w.grad is not None and not bool(torch.isfinite(w.grad).all())]
            if leaf.grad is None or not bool(torch.isfinite(leaf.grad).all()):
                bad.append("the cut layer")
            if bad:
                raise NonFiniteError(f"{p}: its activation gives non-finite gradients of "
                                     f"{', '.join(bad[:5])}")
        except BaseException as exc:
            s.zero_grad()
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            own = [n for m_ in s.local.values() for n, w in m_.named_parameters()
                   if isinstance(exc, NonFiniteError) and not bool(torch.isfinite(w).all())]
            if own:  # the model owner's own weights: not the data owner's doing (no drop)
                raise FloatingPointError(f"the model owner's weights {', '.join(own[:5])} are "
                                         "not finite") from exc
            raise
        s.step()
        if self.copies is not None:
            self.copies.save(p)
        assert leaf.grad is not None
        return leaf.grad.detach(), m

    def run_round(self, batches: Sequence[tuple[str, torch.Tensor]], *,
                  at: tuple[int, int] | None = None) -> RoundResult:
        """One round: ``batches`` holds (data owner, record indices) in the round's order;
        ``at`` (epoch, round of the epoch) names it in the report."""
        s, tr = self.session, self.trainer
        if tr.schedule == "splitfed_v1" and self.copies is None:
            self.copies = ServerCopies(s, s.plan.sources)
        ds = tr.train_dataset
        out = RoundResult()
        timing = out.timing
        t_round = time.perf_counter()
        todo = [(p, idx) for p, idx in batches if p not in self.dropped]
        index = dict(todo)
        n_failed = len(self.failures)

        t0 = time.perf_counter()
        acts = self._each("forward", index, lambda p: s._seg(p, self._node).forward(
            indices=index[p], dataset=ds, train=True))
        timing.forward_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        grads: dict[str, torch.Tensor] = {}
        for p, idx in todo:
            if p not in acts:
                continue
            try:
                grads[p], out.metrics[p] = self._model_owner_step(p, idx, acts[p])
            except ValidationError as err:  # this data owner's answer: its failure alone
                self._drop(p, "model owner", err)
        timing.model_owner_s = time.perf_counter() - t0

        def backward(p: str) -> None:
            seg = s._seg(p, self._node)
            seg.backward(grads[p])
            seg.flush()

        t0 = time.perf_counter()
        done = self._each("backward", grads, backward)
        timing.backward_s = time.perf_counter() - t0
        for p in list(out.metrics):
            if p not in done:
                del out.metrics[p]

        t0 = time.perf_counter()
        sizes = {p: float(index[p].shape[0]) for p in out.metrics}
        members = [p for p in s.plan.sources if p not in self.dropped]
        weights = [sizes.get(p, 0.0) for p in members]
        if sum(weights) > 0:
            # secure aggregation among the data owners, each phase's calls overlapped
            failed = tr._average(members, weights, each=lambda keys, fn: run_each(
                keys, fn, max_workers=self.max_workers, deadline_s=self.deadline_s))
            for p, exc in failed.items():
                self._drop(p, "aggregate", exc)
            outcome = tr._average.last  # a cohort refused by min_cohort: not averaged
            kept = {p: w for p, w in sizes.items() if p not in self.dropped}
            if self.copies is not None and sum(kept.values()) > 0 and (
                    outcome.not_averaged is None):
                t_mo = time.perf_counter()
                self.copies.average(kept, keep=list(outcome.not_relayed))
                timing.model_owner_s += time.perf_counter() - t_mo
            tr.note_averaging(outcome, *(at or (None, self.rounds_run)))
        timing.aggregate_s = time.perf_counter() - t0
        timing.seconds = time.perf_counter() - t_round
        timing.parties = len(out.metrics)
        self.timings.append(timing)
        for p in out.metrics:  # the cost ledger (counted on copies here, outside the timing)
            tr.ledger.session_step(s, p, int(index[p].shape[0]))
        self.rounds_run += 1
        if todo and not out.metrics:
            why = "; ".join(f"{f.party} ({f.phase}): {f.error}" for f in self.failures[n_failed:])
            raise TransportError(f"every data owner of round {self.rounds_run - 1} failed: {why}")
        return out

    def train_epoch(self, epoch: int = 0) -> StepMetrics:
        """One pass over every data owner's training records, round by round."""
        from tqdm.auto import tqdm

        tr = self.trainer
        loss_sum, correct, count = 0.0, 0, 0
        first = len(self.timings)
        bar = tqdm(tr._batches(), desc=f"epoch {epoch}", disable=not tr.progress, leave=False)
        for k, batches in enumerate(bar):
            result = self.run_round(batches, at=(epoch, k))
            for m in result.metrics.values():
                tr.report.steps += 1
                loss_sum += m.loss * m.count
                correct += m.correct
                count += m.count
            if count:
                bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct / count:.3f}")
        self.epoch_round_seconds = [t.seconds for t in self.timings[first:]]
        return StepMetrics(loss_sum / max(count, 1), correct, count)

    def __repr__(self) -> str:
        return (f"SplitFedRounds(max_workers={self.max_workers}, deadline_s={self.deadline_s}, "
                f"rounds={self.rounds_run}, dropped={sorted(self.dropped)})")
