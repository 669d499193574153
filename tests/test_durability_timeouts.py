"""Every call is bounded: a stalled party raises CallTimeoutError naming it within the timeout,
safe requests are retried, and training goes on with the other parties."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from syft_split import (
    DataOwnerHost,
    InProcessTransport,
    OptimizerSpec,
    SplitPlan,
    SplitSession,
    Trainer,
    split_model,
)
from syft_split.errors import CallTimeoutError, ConfigError, TransportError
from syft_split.models import digits_cnn
from syft_split.transport.base import CallPolicy
from syft_split.transport.latency import DelayedTransport, submit_call

from .test_durability import DATA


class StallingHost(DataOwnerHost):
    """A data owner whose process can be paused (like SIGSTOP): calls wait until resumed."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.running = threading.Event()
        self.running.set()
        self.calls = 0

    def handle(self, caller: str, data: bytes) -> bytes:
        self.running.wait()
        self.calls += 1
        return super().handle(caller, data)


def _hosts() -> dict[str, StallingHost]:
    hosts = {p: StallingHost(p) for p in ("a", "b")}
    for p, host in hosts.items():
        for ds, (x, y) in DATA[p].items():
            host.add_dataset(ds, x, y)
    return hosts


def test_policy_is_validated() -> None:
    with pytest.raises(ConfigError, match="timeout"):
        CallPolicy(timeout=0)
    with pytest.raises(ConfigError, match="retries"):
        CallPolicy(retries=-1)
    with pytest.raises(ConfigError, match="op_timeouts"):
        CallPolicy(op_timeouts={"leakage": float("inf")})


def test_stalled_party_times_out_by_name_and_safe_calls_are_retried() -> None:
    hosts = _hosts()
    t = InProcessTransport(list(hosts.values()), policy=CallPolicy(timeout=0.3, retries=0))
    hosts["b"].running.clear()
    try:
        t0 = time.perf_counter()
        with pytest.raises(CallTimeoutError, match=r"b did not answer op 'describe' within 0.3 s") as err:
            t.call("b", "describe")
        assert time.perf_counter() - t0 < 0.3 + 1.0
        assert err.value.party == "b" and isinstance(err.value, TransportError)
        assert t.call("a", "describe")["host"] == "a"  # the other party answers meanwhile

        t.policy = CallPolicy(timeout=0.2, retries=2, backoff=0.05)
        t0 = time.perf_counter()
        with pytest.raises(CallTimeoutError):
            t.call("b", "status", segment="b/seg1")  # read-only: 3 attempts
        assert t.retries == 2 and 0.6 <= time.perf_counter() - t0 < 0.6 + 1.0
        with pytest.raises(CallTimeoutError):
            t.call("b", "propose", role="input")  # changes state, no step id: never repeated
        assert t.retries == 2
    finally:
        hosts["b"].running.set()


def test_training_goes_on_without_a_stalled_party() -> None:
    """Party b stalls for the whole first epoch: its first call times out (named), its batches
    are skipped and reported, party a and the model owner train exactly as a run over a
    alone would; once b is back it is settled (its timed-out request applied once) and trains."""
    hosts = _hosts()
    t = InProcessTransport(list(hosts.values()), policy=CallPolicy(timeout=0.4, retries=0))

    def make(parties: list[str], transport: InProcessTransport) -> SplitSession:
        torch.manual_seed(1)
        plan = SplitPlan.vanilla(split_model(digits_cnn(channels=4, hidden=16), ["pool1"]),
                                 parties)
        return SplitSession(plan, transport, optimizer=OptimizerSpec("sgd", lr=0.1))

    session = make(["a", "b"], t)
    for party, ids in session.propose().items():
        hosts[party].approve(ids[0])
    labels = {p: {ds: y for ds, (_x, y) in DATA[p].items()} for p in ("a", "b")}
    trainer = Trainer(session, batch_size=16, labels=labels, progress=False,
                      measure_leakage=False, on_unreachable="skip")
    hosts["b"].running.clear()
    t0 = time.perf_counter()
    report = trainer.fit(1, verbose=False)
    assert time.perf_counter() - t0 < 0.4 + 1.0 + 3.0  # one timeout, not one per batch
    [event] = report.extra["unreachable"]
    assert event["party"] == "b" and "CallTimeoutError" in event["error"]
    assert report.steps == 3  # a's three batches

    # a alone, uninterrupted: the same weights at a and at the model owner
    solo_hosts = _hosts()
    solo = make(["a"], InProcessTransport([solo_hosts["a"]]))
    solo_hosts["a"].approve(solo.propose()["a"][0])
    Trainer(solo, batch_size=16, labels={"a": labels["a"]}, progress=False,
            measure_leakage=False).fit(1, verbose=False)
    got = hosts["a"].export_weights(session.remote[("a", 0)].segment_id)
    want = solo_hosts["a"].export_weights(solo.remote[("a", 0)].segment_id)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(p, q) for p, q in zip(session.local[1].parameters(),
                                                  solo.local[1].parameters()))

    seg_b = session.remote[("b", 0)]
    assert seg_b.unsettled == {"op": "forward", "step": 1, "carries_gradient": False}
    hosts["b"].running.set()  # b resumes: the timed-out forward runs now, once
    report = trainer.fit(1, verbose=False)
    assert report.extra["unreachable"] == [event]  # nothing new
    info = t.call("b", "status", segment=seg_b.segment_id)
    assert info["steps"] == 3 and not info["pending"] and seg_b.unsettled is None
    assert [e.outcome for e in hosts["b"].audit if e.op == "forward"][:2] == [
        "ok", "ok (step 1 answered from the record)"]


def test_a_call_in_flight_is_bounded_by_the_policy_timeout_too() -> None:
    """``submit_call`` (pipelined steps) times out like ``Transport.call``, on a plain transport
    and over a DelayedTransport link."""
    for wrap in (lambda t: t, lambda t: DelayedTransport(t, 0.02)):
        hosts = _hosts()
        t = wrap(InProcessTransport(list(hosts.values()),
                                    policy=CallPolicy(timeout=0.3, retries=0)))
        t.policy = CallPolicy(timeout=0.3, retries=0)
        hosts["b"].running.clear()
        try:
            t0 = time.perf_counter()
            fut = submit_call(t, "b", "describe")
            with pytest.raises(CallTimeoutError, match="b did not answer op 'describe'"):
                fut.result(timeout=10)
            assert time.perf_counter() - t0 < 0.3 + 1.0
            assert submit_call(t, "a", "describe").result(timeout=10)["host"] == "a"
        finally:
            hosts["b"].running.set()
            t.close()


class _Damaging(InProcessTransport):
    """Damages the answer to the ``bad``-th request in transit (after the host applied it)."""

    bad: int | None = None
    n = 0

    def request(self, party: str, data: bytes) -> bytes:
        raw = super().request(party, data)
        self.n += 1
        return raw[:-7] if self.n == self.bad else raw


def test_an_unreadable_answer_leaves_the_step_unsettled_not_refused() -> None:
    """The host applied the step; the model owner could not read its answer. That is a
    transport failure (fate unknown): the step is settled under its id, applied once, and
    training goes on, instead of the id being reused and every later step refused. (Without
    retries: with them the transport sends the step again at once, test below.)"""
    from syft_split.transport.base import decode_response

    with pytest.raises(TransportError, match="cannot be read") as err:
        decode_response(b"\x00" * 16, "a", "forward", 1 << 20)
    assert err.value.party == "a"

    hosts = _hosts()
    t = _Damaging(list(hosts.values()), policy=CallPolicy(retries=0))
    torch.manual_seed(1)
    session = SplitSession(SplitPlan.vanilla(split_model(digits_cnn(channels=4, hidden=16),
                                                         ["pool1"]), ["a"]),
                           t, optimizer=OptimizerSpec("sgd", lr=0.1))
    hosts["a"].approve(session.propose()["a"][0])
    _x, y = DATA["a"]["train"]
    seg = session.remote[("a", 0)]

    def step(i: int) -> None:
        idx = torch.arange(8 * i, 8 * i + 8) % len(y)
        session.zero_grad()
        loss, _ = session.loss("a", idx, y[idx])
        loss.backward()
        session.step()

    step(0)
    step(1)
    t.bad = t.n + 1  # the next forward (carrying step 1's gradient) is applied, its answer lost
    with pytest.raises(TransportError, match="cannot be read"):
        step(2)
    assert session.unsettled() == {seg.segment_id: {"op": "forward", "step": seg.next_step,
                                             "carries_gradient": True}}
    for i in (3, 4):
        step(i)
    session.flush()
    status = t.call("a", "status", segment=seg.segment_id)
    assert session.unsettled() == {} and status["last_step"] == seg.next_step - 1
    # gradients of steps 0, 1, 3, 4 applied once each (step 2's batch was abandoned)
    assert status["steps"] == 4


def test_an_unreadable_answer_is_logged_and_a_safe_request_sent_again() -> None:
    """An answer that cannot be read was received: its bytes are in the traffic log. A
    request safe to repeat (read-only ``status``, a step with its id) is sent again, like
    after any transport failure; the host answers the step from its record."""
    hosts = _hosts()
    t = _Damaging(list(hosts.values()), policy=CallPolicy(retries=2, backoff=0.0))
    torch.manual_seed(1)
    session = SplitSession(SplitPlan.vanilla(split_model(digits_cnn(channels=4, hidden=16),
                                                         ["pool1"]), ["a"]),
                           t, optimizer=OptimizerSpec("sgd", lr=0.1))
    hosts["a"].approve(session.propose()["a"][0])
    seg = session.remote[("a", 0)]
    t.traffic.clear()
    calls = t.calls
    t.bad = t.n + 1
    assert t.call("a", "status", segment=seg.segment_id)["status"] == "approved"
    answers = [r for r in t.traffic.snapshot() if r.src == "a"]
    assert len(answers) == 2 and answers[0].nbytes > 0 and answers[0].fields == ()
    assert t.retries == 1 and t.calls == calls + 2  # both answers arrived

    _x, y = DATA["a"]["train"]
    for i in range(3):
        if i == 2:
            t.bad = t.n + 1  # this step's answer is lost: sent again, answered from the record
        session.zero_grad()
        loss, _ = session.loss("a", torch.arange(8 * i, 8 * i + 8), y[8 * i:8 * i + 8])
        loss.backward()
        session.step()
    session.flush()
    assert t.retries == 2 and session.unsettled() == {}
    status = t.call("a", "status", segment=seg.segment_id)
    assert status["steps"] == 3 and status["last_step"] == seg.next_step - 1


def test_concurrent_calls_keep_their_own_timeout() -> None:
    """PySyftTransport's HTTP posts read the timeout of the call made on *their* thread (two
    data owners called at once must not swap or drop each other's timeout)."""
    from syft_split.transport.pysyft import PySyftTransport

    class _Client:  # stands for a logged-in client; only the timeout bookkeeping runs here
        logged_in_user = "mo@example.org"

    t = PySyftTransport({"a": _Client(), "b": _Client()}, direct=False)
    t._bounded = {"a": True, "b": True}  # as for HTTP datasites
    posted: dict[str, float | None] = {}
    a_done = threading.Event()

    def request(party: str, data: bytes) -> bytes:
        if party == "b":
            a_done.wait(5)  # b posts after a's call has ended
        posted[party] = t._call_timeout()
        return b""

    t.request = request  # type: ignore[method-assign]
    th = threading.Thread(target=t.request_within, args=("b", b"", 600.0, "leakage"))
    th.start()
    t.request_within("a", b"", 120.0, "forward")
    a_done.set()
    th.join(10)
    assert posted == {"a": 120.0, "b": 600.0}


def test_an_answer_too_large_is_not_asked_for_again() -> None:
    """An answer over max_response_bytes comes back the same every time: a repeatable
    request (an evaluation forward) is not sent again (it ran 4 times, 4 answers booked)."""
    from syft_split import deploy

    x, y = torch.randn(64, 32), torch.randint(0, 2, (64,))
    dep = deploy.inprocess({"a": {"train": (x, y)}})
    t = dep.transport
    t.policy = CallPolicy(retries=3, backoff=0.0)
    plan = SplitPlan.vanilla([nn.Sequential(nn.Linear(32, 512)), nn.Linear(512, 2)], "a",
                             datasets=["train"])
    session = SplitSession(plan, t, optimizer=OptimizerSpec("sgd", lr=0.1))
    dep.approve_all(session.propose())
    t.max_response_bytes = 50_000  # an evaluation forward of 64 x 512 floats is ~131 kB
    with pytest.raises(TransportError, match="PayloadTooLargeError"), torch.no_grad():
        session.forward("a", torch.arange(64))
    assert t.retries == 0
    assert sum(e["op"] == "forward" for e in dep.owners["a"].audit_log()) == 1
