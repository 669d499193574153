"""A malicious data owner in SplitFed rounds is charged with its own bad answers: its NaN or
float64 activation, or a contribution to secure aggregation it leaves out or corrupts for an
honest member, drops it, not the honest members whose refusals follow; they train on exactly
as if it had failed in transit (concurrent rounds and rounds one call at a time)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from syft_split import (
    OptimizerSpec,
    SplitPlan,
    SplitSession,
    Trainer,
    TransportError,
    ValidationError,
    WireError,
    wire,
)
from syft_split.deploy import inprocess
from syft_split.rounds import SplitFedRounds
from syft_split.schedules import contribution_faults
from syft_split.transport.base import Transport, TransportWrapper

PARTIES = ["m", "a", "b"]  # m, the malicious one, first: its step comes before the others'


class _Malicious(TransportWrapper):
    """Party ``bad``'s answers to ``op`` are decoded and rewritten by ``fn`` (the data owner
    answers what it likes); ``down``: that call fails in transit instead (the reference)."""

    def __init__(self, inner: Transport, op: str, fn: Callable[[dict[str, Any]], Any] | None,
                 bad: str = "m") -> None:
        super().__init__(inner)
        self.op, self.fn, self.bad = op, fn, bad
        self.hits = 0

    def request(self, party: str, data: bytes) -> bytes:
        if party != self.bad or wire.decode(data).get("op") != self.op:
            return self.inner.request(party, data)
        self.hits += 1
        if self.fn is None:
            raise TransportError(f"{party} is down")
        return wire.encode(self.fn(wire.decode(self.inner.request(party, data))))


def _run(schedule: str, op: str, fn: Callable[[dict[str, Any]], Any] | None, *,
         workers: int = 3) -> tuple[dict[str, Any], Trainer, _Malicious]:
    """One epoch (two rounds) of 3 data owners, m's answers to ``op`` rewritten by ``fn``
    (None: m fails there in transit); ``workers=1``: the rounds' calls one at a time. Returns
    the honest data owners' and the model owner's weights, the trainer and the wrapper."""
    g = torch.Generator().manual_seed(0)
    data = {p: (torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g))
            for p in PARTIES}
    dep = inprocess({p: {"train": d} for p, d in data.items()})
    transport = _Malicious(dep.transport, op, fn)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    plan = SplitPlan.vanilla([copy.deepcopy(model[:2]), copy.deepcopy(model[2:])], PARTIES,
                             datasets=["train"], share_weights="peer")
    session = SplitSession(plan, transport, optimizer=OptimizerSpec("sgd", lr=0.1, momentum=0.9))
    dep.approve_all(session.propose())
    dep.trust_each_other()
    trainer = Trainer(session, batch_size=8, progress=False, test_dataset=None,
                      measure_leakage=False, watch=False, schedule=schedule, max_workers=3,
                      labels={p: {"train": d[1]} for p, d in data.items()})
    if workers != 3:
        trainer._rounds = SplitFedRounds(trainer, max_workers=workers)
    trainer.fit(1, verbose=False)
    weights = {p: dep.owners[p].export_weights(session.remote[(p, 0)].segment_id)
               for p in ("a", "b")}
    weights["model_owner"] = copy.deepcopy(session.local[1].state_dict())
    return weights, trainer, transport


def _assert_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    for who, state in want.items():
        for k, v in state.items():
            assert torch.isfinite(got[who][k]).all(), (who, k)
            assert float((got[who][k] - v).abs().max()) <= 1e-6, (who, k)


def _failures(trainer: Trainer) -> list[tuple[str, str]]:
    return [(f["party"], f["phase"]) for f in trainer.report.party_failures]


ACTIVATIONS = {
    "nan": lambda r: {**r, "activation": torch.full_like(r["activation"], float("nan"))},
    "inf": lambda r: {**r, "activation": r["activation"].clone().index_fill_(0, torch.tensor([0]),
                                                                              float("inf"))},
    "float64": lambda r: {**r, "activation": r["activation"].double()},
    "past_bound": lambda r: {**r, "activation": r["activation"] * 0 + 3e7},
}


def _cases(attacks: list[str], more: list[tuple[str, str, int]]) -> list[Any]:
    """Every attack on concurrent v2 rounds, and ``more`` (attack, schedule, workers)."""
    return [pytest.param(a, s, w, id=f"{a}-{s}-{'concurrent' if w == 3 else 'one_at_a_time'}")
            for a, s, w in [(a, "splitfed_v2", 3) for a in attacks] + more]


_references: dict[tuple[str, str, int], dict[str, Any]] = {}


def _reference(schedule: str, op: str, workers: int) -> dict[str, Any]:
    """The weights of a run in which m fails ``op`` in transit (computed once)."""
    key = (schedule, op, workers)
    if key not in _references:
        _references[key] = _run(schedule, op, None, workers=workers)[0]
    return _references[key]


@pytest.mark.parametrize("attack,schedule,workers", _cases(list(ACTIVATIONS), [
    ("nan", "splitfed_v1", 3), ("float64", "splitfed_v1", 3), ("nan", "splitfed_v2", 1),
    ("float64", "splitfed_v1", 1)]))
def test_a_bad_activation_drops_only_its_sender(attack: str, schedule: str, workers: int
                                                ) -> None:
    """m's activation is refused with its forward answer (before the model owner's step): m
    alone is dropped, and the others' weights (and the model owner's) are those of a run in
    which m's forward failed."""
    want = _reference(schedule, "forward", workers)
    got, trainer, transport = _run(schedule, "forward", ACTIVATIONS[attack], workers=workers)
    assert transport.hits == 1  # m answered once, then was left out
    assert _failures(trainer) == [("m", "forward")]
    assert trainer.report.steps == 4  # a and b, two rounds each
    _assert_equal(got, want)


def _omit(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k != "sealed/a"}


def _garbage(r: dict[str, Any]) -> dict[str, Any]:
    return {**r, "sealed/a": b"\x00" * len(r["sealed/a"])}


CONTRIBUTIONS = {
    "omitted": _omit,
    "garbage": _garbage,
    "short": lambda r: {**r, "sealed/a": r["sealed/a"][:-8]},
    "not_bytes": lambda r: {**r, "sealed/a": "x"},
    "extra": lambda r: {**r, "sealed/m": r["sealed/a"]},
}


@pytest.mark.parametrize("attack,schedule,workers", _cases(
    [a for a in CONTRIBUTIONS if a != "garbage"], [("omitted", "splitfed_v1", 1)]))
def test_a_bad_contribution_drops_its_sender(attack: str, schedule: str, workers: int) -> None:
    """m leaves out, pads or mislabels the contribution it seals for a: the model owner refuses
    the answer before relaying anything, m is dropped, the round runs again without it, and a
    and b end exactly as when m failed to contribute in transit."""
    want = _reference(schedule, "secagg_contribute", workers)
    got, trainer, transport = _run(schedule, "secagg_contribute", CONTRIBUTIONS[attack],
                                   workers=workers)
    assert transport.hits == 1
    assert _failures(trainer) == [("m", "aggregate")]
    assert trainer.report.steps == 5  # m's one step, then a and b
    _assert_equal(got, want)
    for k, v in got["a"].items():  # averaged: a and b hold the same weights
        assert float((v - got["b"][k]).abs().max()) <= 1e-6


@pytest.mark.parametrize("schedule,workers", [("splitfed_v2", 3), ("splitfed_v1", 3),
                                              ("splitfed_v2", 1)])
def test_a_contribution_refused_while_checking_leaves_the_round_unaveraged(
        schedule: str, workers: int) -> None:
    """m seals garbage for a: a refuses it while checking, naming m. By then every member has
    computed the round's average, so the round is not run again (a second average without one
    member would show that member's weights); with one accuser of two others the model owner
    cannot tell who lies, so m and a both leave; b trains on, every batch."""
    _, trainer, transport = _run(schedule, "secagg_contribute", CONTRIBUTIONS["garbage"],
                                 workers=workers)
    assert transport.hits == 1
    assert sorted(_failures(trainer)) == [("a", "aggregate"), ("m", "aggregate")]
    assert [e["round"] for e in trainer.report.not_averaged] == [0]
    assert "not run again" in trainer.report.not_averaged[0]["reason"]
    assert trainer.report.steps == 4  # m and a once, b twice


@pytest.mark.parametrize("attack", ["omitted", "garbage"])
def test_one_data_owner_after_the_other_stops_naming_the_sender(attack: str) -> None:
    """The sequential schedule (max_workers=1) drops nobody: it stops, with an error that
    names m (structured: ``peer`` when a refused m's contribution) and nothing loaded."""
    with pytest.raises((ValidationError, WireError)) as info:
        _run_sequential(CONTRIBUTIONS[attack])
    exc = info.value
    if attack == "omitted":
        assert isinstance(exc, ValidationError) and "m's contribution" in str(exc)
    else:
        assert isinstance(exc, WireError) and exc.peer == "m"


def _run_sequential(fn: Callable[[dict[str, Any]], Any]) -> None:
    g = torch.Generator().manual_seed(0)
    data = {p: (torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g))
            for p in PARTIES}
    dep = inprocess({p: {"train": d} for p, d in data.items()})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    plan = SplitPlan.vanilla([copy.deepcopy(model[:2]), copy.deepcopy(model[2:])], PARTIES,
                             datasets=["train"], share_weights="peer")
    session = SplitSession(plan, _Malicious(dep.transport, "secagg_contribute", fn),
                           optimizer=OptimizerSpec("sgd", lr=0.1))
    dep.approve_all(session.propose())
    dep.trust_each_other()
    trainer = Trainer(session, batch_size=8, progress=False, test_dataset=None,
                      measure_leakage=False, watch=False, schedule="splitfed_v2", max_workers=1,
                      labels={p: {"train": d[1]} for p, d in data.items()})
    try:
        trainer.fit(1, verbose=False)
    finally:  # stopped in the first round's averaging: no data owner loaded anything
        assert all(session.remote[(p, 0)].secagg_status()["aggregated"] == 0 for p in PARTIES)


def test_contribution_faults_name_the_sender() -> None:
    blob = b"x" * 100
    ok = {"a": {"b": blob, "c": blob}, "b": {"a": blob, "c": blob}, "c": {"a": blob, "b": blob}}
    assert contribution_faults(ok, 1) == {}
    # names of other lengths: the same contribution up to the names' lengths
    names = {"a": {"bb": blob + b"x", "c": blob}, "bb": {"a": blob + b"x", "c": blob + b"x"},
             "c": {"a": blob, "bb": blob + b"x"}}
    assert contribution_faults(names, 1) == {}
    cases = {
        "missing": {**ok, "a": {"b": blob}},
        "extra": {**ok, "a": {"a": blob, "b": blob, "c": blob}},
        "not bytes": {**ok, "a": {"b": blob, "c": "x"}},
        "empty": {**ok, "a": {"b": blob, "c": b""}},
        "two lengths": {**ok, "a": {"b": blob, "c": blob + b"x"}},
        "not the majority's": {**ok, "a": {"b": blob * 2, "c": blob * 2}},
    }
    for why, sealed in cases.items():
        assert list(contribution_faults(sealed, 1)) == ["a"], why
    # two members of two lengths: no majority, the recipients decide (they name the sender)
    assert contribution_faults({"a": {"b": blob}, "b": {"a": blob * 2}}, 1) == {}
