"""What a model owner's call saves in the data owner's state directory (:mod:`.store`):
what its op changed, nothing else (:func:`persist`, called by
:meth:`~syft_split.host.core.DataOwnerHost.handle` before it answers).

================================  =============================================================
the call                          saved
================================  =============================================================
refused before its op ran         nothing (an unknown op or segment, not the segment's driver,
                                  a step answered from its record)
training op that ran              the segment (every ``checkpoint_every``-th change, with its
                                  records-per-minute window), ``host.sspl`` for an op without a
                                  segment (``propose``) or of a family keeping host state
a no-op (``Call.unchanged``)      nothing (a ``discard`` with nothing pending)
op that raised                    only a segment it changed all the same (:func:`mark`: a step
                                  applied before the refusal, a halt, statistics a forward
                                  updated); what its ``undo`` put back is no change. A family's
                                  op with a segment (relay, secure rounds): as if it had run
an evaluation (``train=False``)   nothing
a rate window changed alone       at most every :data:`~.guard.WINDOW_SAVE_S` (1 s, from the
                                  end of the last such save) per file: an evaluation's records
                                  (the segment's file), a proposal attempt that was then
                                  refused (``host.sspl``)
================================  =============================================================

A crash loses at most the rate-window entries charged in the :data:`~.guard.WINDOW_SAVE_S`
after the last such save (and before the crash): after a restart a cap counts those records
(or proposal attempts) as not made, so it is looser by at most one second's worth, never
stricter. The cost: at most one save of the file per second of the calls' own time (a save
slower than a second is followed by a second without one). After a failed
save (``store.unsaved``: memory holds more than the files) every call of an op that changes
state, refused or not, and every replayed step, tries to save everything, until one succeeds.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .guard import Call, window_save_due
from .records import Runtime

if TYPE_CHECKING:
    from .core import DataOwnerHost
    from .dispatch import OpSpec

__all__ = ["Ran", "before", "mark", "persist"]


@dataclass
class Ran:
    """How a call's op went, as :func:`persist` needs it (made by :func:`before`)."""

    #: the segment's :func:`mark` before the op (None: no segment)
    mark: tuple[Any, ...] | None
    #: the segment's records-per-minute count before the op (``Guard.charged``)
    seg_charged: int | None
    #: proposal attempts counted before the op (``ProposalOps.charged``)
    host_charged: int
    #: the op raised (refused, or failed); ``undone``: its ``Call.undo`` ran
    failed: bool = False
    undone: bool = False


def mark(rt: Runtime) -> tuple[Any, ...]:
    """What an op that raised may have changed of a segment all the same, as its file holds
    it: its status (a halt), steps (one applied before the refusal), what is pending, the
    steps it remembers, its weights and buffers (torch counts every in-place change to a
    tensor: an optimizer step, a load, BatchNorm's batch count updated by a forward) and its
    dropout stream. The last four items are objects, compared by identity."""
    tensors = itertools.chain(rt.module.parameters(), rt.module.buffers())
    return (rt.proposal.status, rt.steps, rt.pending_loss_grads, len(rt.records),
            sum(t._version for t in tensors), rt.pending_output, rt.pending_source,
            rt.records[-1] if rt.records else None, rt.torch_rng)


def _moved(was: tuple[Any, ...] | None, rt: Runtime, undone: bool) -> bool:
    """Whether segment ``rt``'s :func:`mark` moved from ``was``; after an undo, whether it was
    halted meanwhile (an undo puts everything else back, but leaves a halted segment as the
    halt found it)."""
    now = mark(rt)
    if was is None:
        return True
    if undone:
        return bool(was[0] != now[0])
    return was[:5] != now[:5] or any(a is not b for a, b in zip(was[5:], now[5:]))


def _attempts(host: DataOwnerHost) -> int:
    """Proposal attempts counted against the per-user rate (``host.sspl`` keeps the window)."""
    return int(getattr(host.families.get("proposals"), "charged", 0))


def before(host: DataOwnerHost, call: Call) -> Ran:
    """Read what :func:`persist` compares, just before ``call``'s op runs."""
    rt = call.rt
    return Ran(None if rt is None else mark(rt),
               None if rt is None else host.guard.charged(rt.id), _attempts(host))


def persist(host: DataOwnerHost, spec: OpSpec | None, call: Call | None,
            ran: Ran | None, *, replayed: bool = False) -> None:
    """Save what the call changed (see the module docstring); ``ran`` None: its op did not
    run. Raises what a failed write raised (the store is then marked unsaved)."""
    store = host.store
    if store is None:
        return
    if replayed:  # nothing ran; its record is on disk unless a save failed
        if store.unsaved:
            store.save_all(host)
        return
    if spec is None or call is None:
        return
    if store.unsaved and spec.mutates:  # a save failed: any such call retries them all
        store.save_all(host)
        return
    if ran is None:
        return
    rt = call.rt
    if ran.failed:
        seg = rt is not None and (spec.family_state or _moved(ran.mark, rt, ran.undone))
        whole = rt is not None and spec.family_state
    elif not spec.mutates or (spec.evaluates and call.req.get("train", True) is False):
        seg = whole = False  # an evaluation forward or loss step; other ops ignore train
    else:
        seg = rt is not None and not call.unchanged
        whole = rt is None or spec.family_state
    now = time.time()  # wall clock, as the windows' entries
    saves = host.window_saves
    if rt is not None and seg and spec.family_state:
        # what the family records (a round loaded, a relay seen) never outruns the weights
        # it changed: the segment first, whatever checkpoint_every says
        store.save_runtime(rt)
    elif rt is not None and seg:
        store.changed(rt)  # a training call's window is saved with its step
    elif rt is not None and host.guard.charged(rt.id) != ran.seg_charged and \
            window_save_due(saves, rt.id, now):
        try:  # its records-per-minute window, changed alone
            store.save_runtime(rt)
        finally:
            saves[rt.id] = time.time()
    if whole:
        store.save_host(host)
    elif _attempts(host) != ran.host_charged and window_save_due(saves, "", now):
        try:  # the proposal-rate windows, changed alone
            store.save_host(host)
        finally:
            saves[""] = time.time()
