"""Every call is bounded: a stalled party raises CallTimeoutError naming it within the timeout,
safe requests are retried, and training goes on with the other parties."""

from __future__ import annotations

import threading
import time

import pytest
import torch

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
