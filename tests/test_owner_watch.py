"""The data owner reads its live leakage watch (data-owner op ``watch``)."""

from __future__ import annotations

import json

import torch

from syft_split import HostLimits, OptimizerSpec, SplitPlan, SplitSession, split_model
from syft_split.deploy import inprocess
from syft_split.errors import LeakageHaltError
from syft_split.models import digits_cnn


def _session(bound: dict, toy_data) -> tuple:
    x, y = toy_data
    dep = inprocess({"h": {"train": (x, y), "test": (x, y)}}, limits=HostLimits(watch_every=2))
    plan = SplitPlan.vanilla(split_model(digits_cnn(channels=4, hidden=16), "pool1"), "h")
    session = SplitSession(plan, dep.transport, optimizer=OptimizerSpec("sgd", lr=0.1),
                           fuse=False)
    (pid,) = session.propose()["h"]
    dep.owners["h"].approve(pid, leakage_bound=bound)
    return dep, session, pid, y


def _steps(session, y, n: int) -> None:
    for step in range(n):
        idx = torch.arange(step * 8, step * 8 + 8)
        session.zero_grad()
        loss, _ = session.loss("h", idx, y[idx])
        loss.backward()
        session.step()


def test_owner_reads_bound_history_and_state(toy_data) -> None:
    dep, session, pid, y = _session({"inversion_ratio": 1e-6}, toy_data)
    _steps(session, y, 4)
    watch = dep.owners["h"].owner("watch", segment=pid)
    json.dumps(watch)  # JSON on the wire
    assert watch["bound"]["inversion_ratio"] == 1e-6
    assert [h["step"] for h in watch["history"]] == [0, 2, 4]  # approval, then every 2 steps
    assert all(0 < h["inversion_ratio"] for h in watch["history"])
    assert watch["halted"] is False and watch["reason"] is None


def test_owner_sees_why_the_watch_halted(toy_data) -> None:
    dep, session, pid, y = _session({"inversion_ratio": 10.0}, toy_data)  # any figure is below
    try:
        _steps(session, y, 3)
    except LeakageHaltError:
        pass
    watch = dep.owners["h"].owner("watch", segment=pid)
    assert watch["halted"] is True and "inversion ratio" in watch["reason"]
    assert watch["history"][-1]["halted"] == watch["reason"]


def test_the_model_owners_look_at_the_watch_records_nothing(toy_data) -> None:
    """The model owner's ``watch`` op measures on request; asking does not grow the history the
    data owner keeps (and saves with the segment)."""
    dep, session, pid, y = _session({"inversion_ratio": 1e-6}, toy_data)
    _steps(session, y, 2)
    before = dep.owners["h"].owner("watch", segment=pid)["history"]
    for _ in range(5):
        look = dep.transport.call("h", "watch", segment=pid)
        assert look["step"] == 2 and look["inversion_ratio"] > 0
    assert dep.owners["h"].owner("watch", segment=pid)["history"] == before


def test_the_model_owners_leakage_op_runs_within_the_owners_budget(toy_data, monkeypatch
                                                                   ) -> None:
    """The model owner asks for 120 s of attacks (the host is busy meanwhile); the data owner
    allows ``review_budget_s`` (1 s here): the suite gets 1 s, and less when asked for less."""
    import syft_split.leakage as leakage

    x, y = toy_data
    dep = inprocess({"h": {"train": (x, y), "test": (x, y)}},
                    limits=HostLimits(review_budget_s=1.0))
    plan = SplitPlan.vanilla(split_model(digits_cnn(channels=4, hidden=16), "pool1"), "h")
    (pid,) = SplitSession(plan, dep.transport).propose()["h"]
    dep.owners["h"].approve(pid)
    given: list[float] = []
    suite = leakage.leakage_suite

    def spy(*args, budget_s: float, **kwargs):
        given.append(budget_s)
        return suite(*args, budget_s=budget_s, **kwargs)

    monkeypatch.setattr(leakage, "leakage_suite", spy)
    out = dep.transport.call("h", "leakage", segment=pid, dataset="train", budget_s=120)
    assert given == [1.0] and 0 < out["seconds"] < 10
    dep.transport.call("h", "leakage", segment=pid, dataset="train", budget_s=0.5)
    assert given == [1.0, 0.5]
