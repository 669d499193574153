"""A halt takes effect at once: the model owner's op in progress when the data owner asks for
it is refused (nothing of its answer leaves), local training stops where it stands, and the
halt is audited and saved (a restart keeps the segment halted).

The op in progress is made slow deterministically: a forward hook on the segment's module
waits on an event the test sets only once the halt was asked."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from syft_split import DataOwnerHost, wire
from syft_split.datasite_serve import _Entry, _owner_call
from syft_split.host.channel import serving_lock
from syft_split.spec import module_to_spec, spec_state

MO = "syft-user:" + "a" * 32
WAIT_S = 30.0  # an upper bound on waiting for the other thread (never asserted)


def _host(state_dir: Path | None = None) -> DataOwnerHost:
    host = DataOwnerHost("a", state_dir=state_dir)
    g = torch.Generator().manual_seed(0)
    host.add_dataset("train", torch.randn(12, 4, generator=g),
                     torch.randint(0, 3, (12,), generator=g))
    host.restore_state()
    return host


def _ask(host: DataOwnerHost, op: str, **fields: Any) -> dict[str, Any]:
    """What the model owner receives for one request: the decoded answer bytes."""
    return dict(wire.decode(host.handle(MO, wire.encode({"op": op, **fields}))))


def _segment(host: DataOwnerHost) -> str:
    m = nn.Sequential(nn.Linear(4, 3))
    answer = _ask(host, "propose", role="input", datasets=["train"], spec=module_to_spec(m),
                  optimizer={"name": "sgd", "lr": 0.1},
                  **{f"state/{k}": v for k, v in spec_state(m).items()})
    pid = str(answer["segment"])
    host.approve(pid)
    return pid


class Gate:
    """A forward hook that, on its ``at``-th call, says so and waits until opened."""

    def __init__(self, module: nn.Module, at: int = 1) -> None:
        self.entered, self.opened, self.calls, self.at = threading.Event(), threading.Event(), 0, at
        module.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.entered.set()
            self.opened.wait(WAIT_S)


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


@pytest.fixture
def host() -> Iterator[DataOwnerHost]:
    h = _host()
    yield h
    h.close()


def _refused(answer: dict[str, Any], pid: str, word: str = "halted") -> None:
    """The model owner got the halt error and nothing else (no activation, no labels)."""
    assert set(answer) <= {"error", "message"}, sorted(answer)
    assert answer["error"] == "ApprovalError", answer
    assert pid in answer["message"] and word in answer["message"], answer


@pytest.mark.parametrize("op", ["halt", "reject", "forget_user"])
def test_the_op_in_progress_is_refused_when_the_console_halts_in_process(
        host: DataOwnerHost, op: str) -> None:
    pid = _segment(host)
    gate = Gate(host.runtimes[pid].module)
    t, got = _in_thread(lambda: _ask(host, "forward", segment=pid, indices=torch.arange(4)))
    try:
        assert gate.entered.wait(WAIT_S), "the forward never started"
        fields = {"user": MO} if op == "forget_user" else {"segment": pid}
        host.owner(op, **fields)  # the console: returns with the halt in force
    finally:
        gate.opened.set()
        t.join(WAIT_S)
    _refused(got[0], pid)
    forward = [e for e in host.audit if e.op == "forward"]
    assert len(forward) == 1 and forward[0].outcome.startswith("ApprovalError"), forward
    assert any(e.op == f"owner.{op}" and e.outcome == "ok" for e in host.audit)
    assert host.proposal(pid).status == ("rejected" if op == "reject" else "halted")
    _refused(_ask(host, "forward", segment=pid, indices=torch.arange(4)), pid,
             "rejected" if op == "reject" else "halted")
    rt = host.runtimes.get(pid)
    assert rt is None or rt.pending_output is None  # nothing of the refused step is pending


def _datasite_halt_during(op: Callable[[], Any], host: DataOwnerHost, entry: _Entry,
                          gate: Gate, pid: str) -> tuple[list[Any], list[Any]]:
    """Run the model owner's ``op`` in a thread until ``gate`` holds it, ask the admin's halt
    of ``pid`` as a datasite does (``_owner_call``, in another thread), open the gate once the
    halt was asked; the answers of both (each a one-item list once its thread ended)."""
    admin = SimpleNamespace(role=SimpleNamespace(name="ADMIN"))
    t_mo, got = _in_thread(op)
    try:
        assert gate.entered.wait(WAIT_S), "the model owner's op never started"
        request = wire.encode({"segment": pid, "reason": "the data owner stops it"})
        t_halt, halted = _in_thread(lambda: _owner_call(admin, entry, "admin", "halt", request))
        pause = threading.Event()  # never set: a wait between looks
        for _ in range(int(WAIT_S * 20)):  # until the halt was asked (the gate closed)
            if host.guard.stopped(pid) is not None or pause.wait(0.05):
                break
    finally:
        gate.opened.set()
        t_mo.join(WAIT_S)
    t_halt.join(WAIT_S)
    return got, halted


def test_a_datasite_halt_closes_the_gate_before_it_waits_for_the_lock(
        host: DataOwnerHost) -> None:
    """As on a datasite: the model owner's op holds the serving lock; the admin's ``halt``
    (``datasite_serve._owner_call``) waits for it, but the op's answer is refused, and the
    halt returns saved and audited after it."""
    pid = _segment(host)
    entry = _Entry("", host, serving_lock(host))
    gate = Gate(host.runtimes[pid].module)

    def model_owner() -> dict[str, Any]:
        with entry.lock:  # as datasite_serve.serve answers a model owner's call
            return _ask(host, "forward", segment=pid, indices=torch.arange(4))

    got, halted = _datasite_halt_during(model_owner, host, entry, gate, pid)
    _refused(got[0], pid)
    assert wire.decode(halted[0]) == {"segment": pid, "status": "halted"}
    ops = [(e.op, e.outcome.split(":")[0]) for e in host.audit[-3:]]
    assert ops == [("forward", "ApprovalError"), ("halt", "the data owner stops it"),
                   ("owner.halt", "ok")], ops


def test_local_training_stops_at_the_next_local_step(host: DataOwnerHost) -> None:
    """fl_train with several local epochs: halted during its 3rd local step, it runs no
    4th, and its weights never leave."""
    m = nn.Sequential(nn.Linear(4, 3))
    answer = _ask(host, "fl_propose", spec=module_to_spec(m), datasets=["train"],
                  loss="cross_entropy", optimizer={"name": "sgd", "lr": 0.1},
                  **{f"state/{k}": v for k, v in spec_state(m).items()})
    assert "segment" in answer, answer
    pid = str(answer["segment"])
    host.approve(pid)
    gate = Gate(host.runtimes[pid].module, at=3)
    t, got = _in_thread(lambda: _ask(host, "fl_train", segment=pid, epochs=5, batch_size=2,
                                     **{f"state/{k}": v for k, v in spec_state(m).items()}))
    try:
        assert gate.entered.wait(WAIT_S), "local training never started"
        host.halt(pid, "the data owner stops local training")
    finally:
        gate.opened.set()
        t.join(WAIT_S)
    _refused(got[0], pid)
    assert gate.calls == 3  # 5 epochs x 6 local steps were asked for: it stopped at once


def test_a_restart_keeps_the_gate_closed(tmp_path: Path) -> None:
    host = _host(tmp_path / "state")
    pid = _segment(host)
    host.halt(pid, "halted before the restart")
    host.close()
    again = _host(tmp_path / "state")
    try:
        assert again.guard.stopped(pid) == "halted before the restart"
        assert again.proposal(pid).status == "halted"
        _refused(_ask(again, "forward", segment=pid, indices=torch.arange(4)), pid)
    finally:
        again.close()


def test_a_halt_of_an_unknown_segment_closes_nothing(host: DataOwnerHost) -> None:
    pid = _segment(host)
    from syft_split.errors import ApprovalError

    with pytest.raises(ApprovalError):
        host.halt("a/seg999", "no such segment")
    assert host.guard.stops() == {}
    assert "activation" in _ask(host, "forward", segment=pid, indices=torch.arange(4), train=False)


def test_a_halt_that_fails_leaves_the_gate_open(tmp_path: Path) -> None:
    """Review R12: a ``halt`` the console sends with a mistyped field fails (ConfigError);
    the gate it closed first opens again, in process and on a datasite alike, so the segment
    is neither halted nor refused, and a restart does not bring a closed gate back."""
    from syft_split.errors import ConfigError

    host = _host(tmp_path / "state")
    pid = _segment(host)
    with pytest.raises(ConfigError):
        host.owner_call("owner", "halt", {"segment": pid, "reson": "a typo"})
    entry = _Entry("", host, serving_lock(host))
    admin = SimpleNamespace(role=SimpleNamespace(name="ADMIN"))
    answer = wire.decode(_owner_call(admin, entry, "admin", "halt",
                                     wire.encode({"segment": pid, "reson": "a typo"})))
    assert answer["error"] == "ConfigError", answer
    assert host.guard.stops() == {} and host.proposal(pid).status == "approved"
    assert "activation" in _ask(host, "forward", segment=pid, indices=torch.arange(4), train=False)
    host.owner_call("owner", "channel_settings", {})  # any later save of host.sspl
    host.close()
    again = _host(tmp_path / "state")
    try:
        assert again.guard.stops() == {}
        assert "activation" in _ask(again, "forward", segment=pid, indices=torch.arange(4),
                                    train=False)
    finally:
        again.close()


def test_a_failed_halt_never_opens_a_gate_another_halt_asked_for(host: DataOwnerHost) -> None:
    """Review R13: a halt whose fields the op does not take closes nothing; of two halts asked
    for one segment (both waiting for the serving lock), the one that fails leaves the gate
    to the other."""
    pid = _segment(host)
    assert host.ask_halt("halt", {"segment": pid, "reson": "a typo"}) == []
    assert host.guard.stops() == {}
    first = host.ask_halt("halt", {"segment": pid, "reason": "one"})
    second = host.ask_halt("halt", {"segment": pid, "reason": "two"})
    host.undo_halt(first)  # the first failed (as owner_call and _owner_call undo it)
    _refused(_ask(host, "forward", segment=pid, indices=torch.arange(4), train=False), pid,
             "being halted")
    host.undo_halt(second)  # the second failed too: nobody halts it any more
    assert "activation" in _ask(host, "forward", segment=pid, indices=torch.arange(4), train=False)


def test_a_forget_user_whose_save_fails_leaves_every_gate_closed(tmp_path: Path) -> None:
    """Review R13: ``forget_user`` halts the user's segments one by one; when the second
    halt's save fails (disk full) the op ends with StateSaveError, and the segments it did
    not reach stay closed: the forgotten user drives none of them."""
    host = _host(tmp_path / "state")
    pids = [_segment(host) for _ in range(3)]
    store = host.store
    assert store is not None
    real, calls = store.save_host, []

    def disk_full(h: DataOwnerHost) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(h)

    store.save_host = disk_full  # type: ignore[method-assign]
    entry = _Entry("", host, serving_lock(host))
    admin = SimpleNamespace(role=SimpleNamespace(name="ADMIN"))
    answer = wire.decode(_owner_call(admin, entry, "admin", "forget_user",
                                     wire.encode({"user": MO})))
    store.save_host = real  # type: ignore[method-assign]
    try:
        assert answer["error"] == "StateSaveError", answer
        for pid in pids:
            _refused(_ask(host, "forward", segment=pid, indices=torch.arange(4), train=False),
                     pid, "halt")
    finally:
        host.close()


def test_a_channel_frame_in_progress_is_refused(host: DataOwnerHost) -> None:
    """A step over a direct channel (answered under the same lock as the endpoint): the
    datasite's halt waits for it, its answer is refused, the channel then closes."""
    from syft_split.channel import ChannelClient, ChannelTicket
    from syft_split.errors import AccessError
    from syft_split.host.channel import close_channels

    m = nn.Sequential(nn.Linear(4, 3))
    pid = str(_ask(host, "propose", role="input", datasets=["train"], spec=module_to_spec(m),
                   optimizer={"name": "sgd", "lr": 0.1},
                   **{f"state/{k}": v for k, v in spec_state(m).items()})["segment"])
    host.approve(pid, channel=True)
    client = ChannelClient(ChannelTicket.from_response(_ask(host, "open_channel",
                                                            segments=[pid])), MO)
    entry = _Entry("", host, serving_lock(host))
    gate = Gate(host.runtimes[pid].module)

    def frame() -> object:
        try:
            return wire.decode(client.request(wire.encode(
                {"op": "forward", "segment": pid, "indices": torch.arange(4)})))
        except AccessError as exc:  # the channel closed (halted) before its answer came
            return exc

    got, halted = _datasite_halt_during(frame, host, entry, gate, pid)
    try:
        answer = got[0]
        if isinstance(answer, AccessError):
            assert "halted" in str(answer), answer
        else:
            _refused(answer, pid)
        assert wire.decode(halted[0]) == {"segment": pid, "status": "halted"}
        forward = [e for e in host.audit if e.op == "forward"]
        assert [e.outcome.split(":")[0] for e in forward] == ["ApprovalError"], forward
    finally:
        client.close()
        close_channels(host)
