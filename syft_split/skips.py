"""What a :class:`~syft_split.trainer.Trainer` does when a data owner fails a step: unreachable
(a :class:`~syft_split.errors.TransportError`) or refused (the model owner's answer checks,
:mod:`syft_split.answers`, raised a :class:`~syft_split.errors.ValidationError` naming it).
Under ``on_unreachable="skip"`` that data owner sits out the rest of the epoch and the run
report lists it (``reason``: "unreachable" or "refused"); otherwise the error is raised. A
refused step is dropped on both sides either way."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import SyftSplitError, TransportError, ValidationError

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["flush", "refused", "unreachable"]


def unreachable(trainer: Trainer, exc: TransportError, party: str, epoch: int,
                step: int) -> None:
    """A party failed in transit: skip it for the rest of the epoch (or raise)."""
    who = exc.party or party
    if trainer.on_unreachable != "skip" or who != party:
        raise exc
    trainer.session.zero_grad()
    trainer.down.add(party)
    trainer.report.note_unreachable(party, epoch, step, exc)


def refused(trainer: Trainer, exc: ValidationError, party: str, epoch: int, step: int) -> None:
    """The model owner refused an answer of ``party``'s step (``exc.party``: the data
    owner that sent it; None: not an answer, e.g. a host's own refusal of a request, which
    is raised). The step is dropped on both sides whatever ``on_unreachable`` says: no
    model-owner step, and at every data owner that ran this batch the pending step is
    discarded (a gradient held back from an earlier step delivered first), so the next
    training request works. Then, under ``"skip"`` and if ``party`` sent the refused
    answer, it is skipped for the rest of the epoch and reported; otherwise ``exc`` is
    raised."""
    if exc.party is None:
        raise exc
    s = trainer.session
    if step >= 0:  # training: evaluation leaves nothing pending at the data owners
        for (host, i), seg in s.remote.items():
            if host != s._host(party, i) or (
                    s.he is not None and not s.plan.nodes[i].inputs):
                continue  # (an encrypted forward left pending: he_state discards it)
            try:
                seg.abandon()
            except SyftSplitError as err:  # unreachable: kept, sent before its next request
                exc.add_note(f"discarding the step at {host} failed too: "
                             f"{type(err).__name__}: {err}")
    s.zero_grad()  # (after abandon(), which reads whether this step's backward ran)
    if trainer.on_unreachable != "skip" or exc.party != party:
        raise exc
    trainer.down.add(party)
    trainer.report.note_unreachable(party, epoch, step, exc, reason="refused")


def flush(trainer: Trainer) -> None:
    """Deliver held-back gradients; an unreachable party's stay held (sent when it is back)."""
    skip = trainer.unavailable()
    for seg in trainer.session.remote.values():
        if seg.party in skip:
            continue
        try:
            seg.flush()
        except TransportError as exc:
            if trainer.on_unreachable != "skip":
                raise
            trainer.down.add(seg.party)
            trainer.report.note_unreachable(seg.party, None, None, exc)
