"""A data owner whose state directory cannot be written (disk full): the model owner's client
keeps a step answered StateSaveError in flight (it ran and is recorded there), and a
data-owner op whose save fails says so."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from syft_split import DataOwnerHost, wire
from syft_split.errors import StateSaveError
from syft_split.remote import RemoteSegment
from syft_split.spec import module_to_spec, spec_state
from syft_split.transport.inprocess import InProcessTransport

USER = "model-owner@example.org"


def _no_space(fd: int) -> None:
    raise OSError(28, "No space left on device")


def _host(root: Path) -> DataOwnerHost:
    host = DataOwnerHost("a", state_dir=root)
    host.add_dataset("train", torch.randn(40, 8), torch.randint(0, 3, (40,)))
    host.restore_state()
    return host


def _propose(host: DataOwnerHost) -> str:
    m = nn.Sequential(nn.Linear(8, 3))
    req = {"op": "propose", "role": "input", "datasets": ["train"], "spec": module_to_spec(m),
           "optimizer": {"name": "sgd", "lr": 0.1},
           **{f"state/{k}": v for k, v in spec_state(m).items()}}
    return str(wire.decode(host.handle(USER, wire.encode(req)))["segment"])


def test_a_step_answered_state_save_error_stays_in_flight_and_is_settled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = _host(tmp_path / "state")
    pid = _propose(host)
    host.approve(pid)
    seg = RemoteSegment(InProcessTransport([host], user=USER), "a", pid, "input", (8,), (3,))
    seg.forward(indices=torch.arange(4))
    seg.backward(torch.ones(4, 3))  # held back: travels with the next forward (step 2)
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(StateSaveError):
        seg.forward(indices=torch.arange(4, 8))
    rt = host.runtimes[pid]
    assert rt.steps == 1 and rt.last_step == 2  # the gradient was applied there
    assert seg.unsettled == {"op": "forward", "step": 2, "carries_gradient": True}
    assert seg._held_grad is None  # never held again: it is in the request in flight
    with pytest.raises(StateSaveError):  # still full: kept again, nothing new sent
        seg.forward(indices=torch.arange(8, 12))
    assert seg.unsettled is not None and seg.unsettled["step"] == 2
    monkeypatch.undo()  # the disk recovers: training goes on, the gradient applied once
    seg.forward(indices=torch.arange(8, 12))
    seg.backward(torch.ones(4, 3))
    seg.flush()
    assert seg.unsettled is None
    assert rt.steps == 2
    assert seg.next_step == rt.last_step + 1
    again = _host(tmp_path / "state")  # and it is on disk
    assert again.runtimes[pid].steps == 2


def test_state_save_error_says_whether_sending_again_is_safe(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = _host(tmp_path / "state")
    pid = _propose(host)
    host.approve(pid)
    monkeypatch.setattr(os, "fsync", _no_space)
    m = nn.Sequential(nn.Linear(8, 3))
    propose = {"op": "propose", "role": "input", "datasets": ["train"],
               "spec": module_to_spec(m), "optimizer": {"name": "sgd", "lr": 0.1},
               **{f"state/{k}": v for k, v in spec_state(m).items()}}
    answer = wire.decode(host.handle(USER, wire.encode(propose)))
    assert answer["error"] == "StateSaveError"
    assert "no step id: sent again it runs again" in answer["message"]
    assert "same step id" not in answer["message"]
    forward = {"op": "forward", "segment": pid, "indices": torch.arange(4), "step": 1}
    answer = wire.decode(host.handle(USER, wire.encode(forward)))
    assert answer["error"] == "StateSaveError"
    assert "Send the same request again (same step id)" in answer["message"]


def test_a_data_owner_op_whose_save_fails_says_so_and_is_saved_by_the_next_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "state"
    host = _host(root)
    pid = _propose(host)
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(StateSaveError, match=r"'approve' took effect .* not durable"):
        host.approve(pid)
    monkeypatch.undo()
    assert host.proposal(pid).status == "approved"  # in effect, in memory
    entry = host.audit[-1]
    assert entry.op == "owner.approve" and entry.outcome.startswith("StateSaveError")
    assert host.store is not None and host.store.unsaved
    assert _host(root).proposal(pid).status == "pending"  # not on disk yet
    host.release_weights(pid)  # the next change saves everything
    assert not host.store.unsaved
    assert _host(root).proposal(pid).status == "approved"


def test_a_propose_sent_again_after_a_failed_save_makes_one_proposal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from syft_split import OptimizerSpec, SplitPlan, SplitSession, split_model

    host = _host(tmp_path / "state")
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    plan = SplitPlan.vanilla(split_model(model, "1"), "a", datasets=["train"])
    session = SplitSession(plan, InProcessTransport([host], user=USER),
                           optimizer=OptimizerSpec("sgd", lr=0.1))
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(StateSaveError, match=r"same token\) to get its proposal"):
        session.propose()
    assert len(host.proposals()) == 1  # it ran; the model owner has no id for it
    monkeypatch.undo()
    ids = session.propose()  # the same request (same token): answered, not made again
    assert len(host.proposals()) == 1 and ids == {"a": [host.proposals()[0].id]}
    host.close()
    restarted = _host(tmp_path / "state")  # the token survives a restart of the data owner
    again = SplitSession(plan, InProcessTransport([restarted], user=USER),
                         optimizer=OptimizerSpec("sgd", lr=0.1))
    again._tokens = dict(session._tokens)
    assert again.propose() == ids and len(restarted.proposals()) == 1


def test_a_token_names_one_request(tmp_path: Path) -> None:

    host = _host(tmp_path / "state")
    token = "ab" * 16

    def propose(width: int, tok: object = token, seed: int = 0) -> dict[str, object]:
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(8, width))
        req = {"op": "propose", "role": "input", "datasets": ["train"], "token": tok,
               "spec": module_to_spec(m), "optimizer": {"name": "sgd", "lr": 0.1},
               **{f"state/{k}": v for k, v in spec_state(m).items()}}
        return wire.decode(host.handle(USER, wire.encode(req)))

    first = propose(3)
    assert propose(3)["segment"] == first["segment"] and len(host.proposals()) == 1
    for other in (propose(5), propose(3, seed=1)):  # the same token for another spec, or
        # the same spec with other weights: refused, nothing made
        assert other["error"] == "ProtocolError" and "another request" in str(other["message"])
    host.reject(str(first["segment"]))  # a rejected proposal answers its status
    assert propose(3) == {**first, "status": "rejected"}
    assert propose(3, "XYZ")["error"] == "ProtocolError"  # not hex
    assert wire.decode(host.handle("someone-else", wire.encode(  # tokens are per caller
        {"op": "status", "segment": first["segment"]})))["error"] == "AuthorizationError"
    assert len(host.proposals()) == 1


def test_a_halt_whose_save_fails_is_in_effect_audited_and_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "state"
    host = _host(root)
    pid = _propose(host)
    host.approve(pid)
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(StateSaveError, match=r"halted .* could not be saved"):
        host.owner("halt", segment=pid, reason="suspicious")
    monkeypatch.undo()
    assert [e.op for e in host.audit[-2:]] == ["halt", "owner.halt"]  # audited, both
    assert host.audit[-1].outcome.startswith("StateSaveError")
    answer = wire.decode(host.handle(USER, wire.encode(
        {"op": "forward", "segment": pid, "indices": torch.arange(4)})))
    assert answer["error"] == "ApprovalError" and "suspicious" in str(answer["message"])
    assert _host(root).proposal(pid).status == "halted"  # that refused call saved it


def test_a_propose_that_failed_half_way_returns_every_id_when_called_again() -> None:
    """Proposals made before the failure are returned by the next call (they were left out,
    and a data owner following the returned ids never approved them)."""
    from syft_split import OptimizerSpec, SplitPlan, SplitSession, deploy
    from syft_split.errors import TransportError

    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    dep = deploy.inprocess({p: {"train": (x, y)} for p in ("a", "b")})
    t = dep.transport
    failures = [4]  # b's propose fails in transit on every attempt (1 + 3 retries), once
    sent = t.request

    def request(party: str, data: bytes) -> bytes:
        if party == "b" and wire.decode(data).get("op") == "propose" and failures[0] > 0:
            failures[0] -= 1
            raise TransportError("b: connection reset")
        return sent(party, data)

    t.request = request  # type: ignore[method-assign]
    plan = SplitPlan.vanilla([nn.Linear(4, 4), nn.Linear(4, 2)], ["a", "b"], datasets=["train"])
    session = SplitSession(plan, t, optimizer=OptimizerSpec("sgd", lr=0.1))
    with pytest.raises(TransportError):
        session.propose()
    ids = session.propose()
    assert ids == {"a": ["a/seg1"], "b": ["b/seg1"]}
    assert {p: len(h.proposals()) for p, h in dep.owners.items()} == {"a": 1, "b": 1}
    assert session.propose() == {}  # all returned: nothing new
    dep.approve_all(ids)
    assert set(session.status().values()) == {"approved"}
