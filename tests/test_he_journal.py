"""The model owner's journal of an encrypted step in flight (real CKKS, in process): a new or
the same model-owner process takes a journaled step only if the data owner applied that very
request, settles again after a transport failure, and never sends an applied step again as
another message. Every gradient is applied once; the run ends where an uninterrupted one ends."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from syft_split import InProcessTransport, SplitSession, Trainer, wire
from syft_split.errors import StateSaveError, TransportError

from .conftest import FAST, ChaosTransport, Crash
from .test_he_restart import B, Y, _applied_once_like, _fit, _host, _plan, _session, _weights

pytestmark = [pytest.mark.he]


def _until_done(t: ChaosTransport, session: SplitSession, level: str,
                ckpt: Path) -> tuple[SplitSession, int]:
    """``_fit`` with checkpoints in ``ckpt``; each :class:`Crash` is a new model-owner
    process (a new session, other initial weights) resuming from the checkpoint."""
    crashed = 0
    while True:
        try:
            _fit(session, checkpoint_dir=ckpt, resume=True)
            return session, crashed
        except Crash:
            crashed += 1
            plan, opt = _plan(level, seed=99)
            session = SplitSession(plan, t, optimizer=opt)


@pytest.mark.parametrize("level", ["A", "B"])
def test_a_journal_whose_step_was_used_by_a_discard_is_not_taken(tmp_path: Path,
                                                                 level: str) -> None:
    """The model owner dies after journaling step 3 but before sending it; the next process
    discards the forward left pending under step 3 and dies too. The third one must not take
    the journal (step 3 was a discard there, not its gradient message): it resumes, every
    gradient applied once, and ends where an uninterrupted run ends."""
    ref_host = _host(tmp_path / "ref")
    ref = _session(InProcessTransport([ref_host]), ref_host, level)
    _fit(ref)

    t = ChaosTransport(lambda _: _host(tmp_path / "h"), ["h"],
                       {("he_grad", 3): "model_owner_before",
                        ("he_output", 4): "model_owner_before"})
    session, crashed = _until_done(t, _session(t, t.host("h"), level), level, tmp_path / "mo")
    host = t.host("h")
    assert crashed == 2
    (pid,) = session.segment_ids().values()
    info = t.call("h", "status", segment=pid)
    assert info["steps"] == 4 and not info["pending"]  # each gradient applied once
    assert [op for _, op, _ in info["recent"]] == ["discard", "discard", "he_grad", "he_grad"]
    for got, want in zip(_weights(session, host), _weights(ref, ref_host), strict=True):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


class _StatusDown(ChaosTransport):
    """After the model owner's crash the data owner is unreachable for a moment: every
    attempt of the second ``status`` request of the new process fails (the first one, the
    re-attach, goes through)."""

    def __init__(self, *args: Any, down: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.down, self.crashed, self.statuses = down, False, 0

    def request(self, party: str, data: bytes) -> bytes:
        if self.crashed and wire.decode(data).get("op") == "status":
            self.statuses += 1
            if 2 <= self.statuses < 2 + self.down:
                exc = TransportError(f"{party}: connection refused (down for a moment)")
                exc.party = party
                raise exc
        try:
            return super().request(party, data)
        except Crash:
            self.crashed = True
            raise


@pytest.mark.parametrize("level", ["A", "B"])
def test_settling_again_after_a_transport_failure(tmp_path: Path, level: str) -> None:
    """The model owner dies right after its gradient of step 3 was applied; the new process
    cannot reach the data owner while it settles (reads the journal). The same process tries
    again (``fit`` once more): it settles then, takes step 3's answer from the data owner's
    record instead of sending step 3 again with another message (which overwrote the journal
    and was refused forever), and ends where an uninterrupted run ends."""
    ref_host = _host(tmp_path / "ref")
    ref = _session(InProcessTransport([ref_host]), ref_host, level)
    _fit(ref)

    t = _StatusDown(lambda _: _host(tmp_path / "h"), ["h"], {("he_grad", 3): "model_owner"},
                    down=1 + FAST.retries)
    with pytest.raises(Crash):
        _fit(_session(t, t.host("h"), level), checkpoint_dir=tmp_path / "mo", resume=True)
    plan, opt = _plan(level, seed=99)
    session = SplitSession(plan, t, optimizer=opt)  # the new process
    with pytest.raises(TransportError, match="down for a moment"):
        _fit(session, checkpoint_dir=tmp_path / "mo", resume=True)
    report = _fit(session, checkpoint_dir=tmp_path / "mo", resume=True)  # tries again
    host = t.host("h")
    assert report.extra["resumed"] == 1  # the failed attempt saved no checkpoint
    _applied_once_like(t, session, host, _weights(ref, ref_host))


@pytest.mark.parametrize("level", ["A", "B"])
def test_settling_after_a_skipped_batch(tmp_path: Path, level: str) -> None:
    """As above with ``on_unreachable="skip"``: the trainer skips the data owner for the rest
    of the epoch and settles at its next batch, in the next epoch. Step 3 (applied there, its
    batch now skipped here) is answered from the data owner's record, never sent again as
    another message, and the run finishes: every gradient applied once."""
    t = _StatusDown(lambda _: _host(tmp_path / "h"), ["h"], {("he_grad", 3): "model_owner"},
                    down=1 + FAST.retries)
    session = _session(t, t.host("h"), level)
    with pytest.raises(Crash):
        _fit(session, checkpoint_dir=tmp_path / "mo", resume=True)
    plan, opt = _plan(level, seed=99)
    session = SplitSession(plan, t, optimizer=opt)  # the new process
    trainer = Trainer(session, batch_size=B, seed=0, progress=False, measure_leakage=False,
                      labels={"h": {"train": Y, "test": Y[:16]}}, on_unreachable="skip")
    with pytest.warns(UserWarning, match="batch was skipped"):
        report = trainer.fit(2, verbose=False, checkpoint_dir=tmp_path / "mo", resume=True)
    assert [u["batch"] for u in report.extra["unreachable"]] == [2]
    host = t.host("h")
    (pid,) = session.segment_ids().values()
    # epoch 1: batches 0-2 (all by the crashed process), batch 3 skipped; epoch 2: 4 batches
    assert t.call("h", "status", segment=pid)["steps"] == 7
    audit = [e for e in host.audit_log() if e["op"] == "he_grad"]
    assert sum("answered from the record" in e["outcome"] for e in audit) == 1
    assert all(e["outcome"].startswith("ok") for e in audit)


class _AnswerLost(ChaosTransport):
    """The ``first``-th ``he_grad`` is applied but its answer is lost, and the data owner
    cannot be reached by the retries of it (the call fails: its fate is unknown)."""

    def __init__(self, *args: Any, first: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.lost = range(first, first + 1 + FAST.retries)
        self.grads = 0

    def request(self, party: str, data: bytes) -> bytes:
        if wire.decode(data).get("op") == "he_grad":
            self.grads += 1
            if self.grads in self.lost:
                if self.grads == self.lost.start:
                    super().request(party, data)  # applied there
                exc = TransportError(f"{party}: connection reset, response lost")
                exc.party = party
                raise exc
        return super().request(party, data)


@pytest.mark.parametrize("level", ["A", "B"])
def test_a_gradient_whose_answer_was_lost_is_not_sent_again_as_another(
        tmp_path: Path, level: str) -> None:
    """Step 3's gradient is applied but no answer comes back. The same process resumes from
    its checkpoint (``fit`` again): it settles the data owner again and takes step 3's
    answer from the record (the journal kept the message that was applied), instead of
    running step 3 again with a new message that overwrote the journal and was refused."""
    ref_host = _host(tmp_path / "ref")
    ref = _session(InProcessTransport([ref_host]), ref_host, level)
    _fit(ref)

    t = _AnswerLost(lambda _: _host(tmp_path / "h"), ["h"], {}, first=3)
    session = _session(t, t.host("h"), level)
    with pytest.raises(TransportError, match="response lost"):
        _fit(session, checkpoint_dir=tmp_path / "mo", resume=True)
    _fit(session, checkpoint_dir=tmp_path / "mo", resume=True)
    host = t.host("h")
    _applied_once_like(t, session, host, _weights(ref, ref_host))


@pytest.mark.parametrize("level", ["A", "B"])
def test_a_lost_answer_in_a_run_that_skips_the_data_owner(tmp_path: Path, level: str) -> None:
    """As above with ``on_unreachable="skip"`` (no new ``fit``): the data owner is settled
    again at its next batch, in the next epoch; step 3's answer comes from the record (its
    batch was skipped here) and the run goes on: every gradient applied once."""
    t = _AnswerLost(lambda _: _host(tmp_path / "h"), ["h"], {}, first=3)
    session = _session(t, t.host("h"), level)
    trainer = Trainer(session, batch_size=B, seed=0, progress=False, measure_leakage=False,
                      labels={"h": {"train": Y, "test": Y[:16]}}, on_unreachable="skip")
    with pytest.warns(UserWarning, match="batch was skipped"):
        report = trainer.fit(2, verbose=False, checkpoint_dir=tmp_path / "mo")
    assert [u["batch"] for u in report.extra["unreachable"]] == [2]
    (pid,) = session.segment_ids().values()
    assert t.call("h", "status", segment=pid)["steps"] == 7  # 3 + (batch 3 skipped) + 4
    audit = [e for e in t.host("h").audit_log() if e["op"] == "he_grad"]
    assert sum("answered from the record" in e["outcome"] for e in audit) == 1


class _DiskFull(ChaosTransport):
    """The data owner's disk is full while it answers the ``at``-th ``he_grad``: applied and
    recorded there, answered StateSaveError."""

    def __init__(self, *args: Any, at: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.at, self.grads = at, 0

    def request(self, party: str, data: bytes) -> bytes:
        if wire.decode(data).get("op") == "he_grad":
            self.grads += 1
            if self.grads == self.at:
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(os, "fsync", _no_space)
                    return super().request(party, data)
        return super().request(party, data)


def _no_space(fd: int) -> None:
    raise OSError(28, "No space left on device")


def test_a_gradient_answered_state_save_error_is_settled_by_the_journal(tmp_path: Path) -> None:
    """Step 3's gradient is applied there but cannot be saved (StateSaveError). The same
    process trains on (``fit`` again, not resuming): it settles the data owner again, takes
    step 3's answer from the record instead of sending another message under step 3 (refused
    as a different request, for ever)."""
    t = _DiskFull(lambda _: _host(tmp_path / "h"), ["h"], {}, at=3)
    session = _session(t, t.host("h"), "A")
    with pytest.raises(StateSaveError):
        _fit(session, checkpoint_dir=tmp_path / "mo")
    with pytest.warns(UserWarning, match="batch was skipped"):
        _fit(session, checkpoint_dir=tmp_path / "mo")
    (pid,) = session.segment_ids().values()
    assert t.call("h", "status", segment=pid)["steps"] == 2 + 1 + 4
    audit = [e for e in t.host("h").audit_log() if e["op"] == "he_grad"]
    assert sum("answered from the record" in e["outcome"] for e in audit) == 1
