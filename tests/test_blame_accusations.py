"""Secure aggregation when a member lies about its peers or poisons the average: the model owner
cannot tell who lies, so a member accused by a majority of the others leaves alone and
otherwise the accused and its accusers leave; a round refused while checking is never run
again; an average a member refuses leaves the round unaveraged and nobody out; checking
contributions saves nothing at the data owners."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from syft_split import ConfigError, OptimizerSpec, SplitPlan, SplitSession, Trainer, wire
from syft_split.deploy import Deployment, inprocess
from syft_split.host import DataOwnerHost, Dataset
from syft_split.host.store import HostStore
from syft_split.transport.inprocess import InProcessTransport

from .test_blame import _Malicious

PARTIES = ["m", "a", "b", "c"]


def _data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {p: (torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g))
            for p in PARTIES}


def _fit(dep: Any, transport: Any, data: dict[str, Any]) -> Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    plan = SplitPlan.vanilla([copy.deepcopy(model[:2]), copy.deepcopy(model[2:])], list(data),
                             datasets=["train"], share_weights="peer")
    session = SplitSession(plan, transport, optimizer=OptimizerSpec("sgd", lr=0.1))
    dep.approve_all(session.propose())
    dep.trust_each_other()
    trainer = Trainer(session, batch_size=8, progress=False, test_dataset=None,
                      measure_leakage=False, watch=False, schedule="splitfed_v2", max_workers=4,
                      labels={p: {"train": d[1]} for p, d in data.items()})
    trainer.fit(2, verbose=False)
    return trainer


def _accuse(request: dict[str, Any]) -> Any:
    """m refuses the first other member's contribution in every check (an honest peer)."""
    peers = sorted(k[7:] for k in request if k.startswith("sealed/"))
    return {"error": "ProtocolError", "message": f"the contribution of {peers[0]!r} is bad",
            "peer": peers[0]}


class _Accuser(_Malicious):
    def request(self, party: str, data: bytes) -> bytes:
        req = wire.decode(data)
        if party != self.bad or req.get("op") != self.op:
            return self.inner.request(party, data)
        self.hits += 1
        return wire.encode(_accuse(req))


def test_a_member_accusing_a_peer_leaves_with_it() -> None:
    """m named a, then b, then c: each was dropped in turn and m trained on alone (review R9).
    A lone accusation (no majority of the others) drops the accuser with the accused, and the
    round, whose average every member has computed, is not run again: b and c train on."""
    data = _data()
    dep = inprocess({p: {"train": d} for p, d in data.items()})
    trainer = _fit(dep, _Accuser(dep.transport, "secagg_check", None), data)
    assert sorted((f["party"], f["phase"]) for f in trainer.report.party_failures) == [
        ("a", "aggregate"), ("m", "aggregate")]
    steps = {p: dep.owners[p].runtimes[trainer.session.remote[(p, 0)].segment_id].steps
             for p in ("b", "c")}
    assert steps == {"b": 4, "c": 4}  # both epochs, every batch
    assert [e["round"] for e in trainer.report.not_averaged] == [0]


def test_two_colluders_corrupting_in_turn_leave_every_honest_member() -> None:
    """n seals garbage for every honest member, then m does (review R10): each honest member
    truthfully refuses both. Each is accused by a majority, so n and then m leave alone; a, b
    and c train on (a one-accusation-per-run rule had dropped them all)."""
    data = _data()
    dep = inprocess({p: {"train": d} for p, d in {**data, "n": data["m"]}.items()})
    calls = {"n": 0, "m": 0}

    class _Colluders(_Malicious):
        def request(self, party: str, raw: bytes) -> bytes:
            answer = self.inner.request(party, raw)
            if party not in calls or wire.decode(raw).get("op") != "secagg_contribute":
                return answer
            calls[party] += 1
            if (party, calls[party]) not in (("n", 1), ("m", 2)):  # n first, m the round after
                return answer
            out = dict(wire.decode(answer))
            return wire.encode({k: b"\x00" * len(v) if k.startswith("sealed/") and
                                k[7:] not in calls else v for k, v in out.items()})

    trainer = _fit(dep, _Colluders(dep.transport, "", None), {**data, "n": data["m"]})
    assert sorted(f["party"] for f in trainer.report.party_failures) == ["m", "n"]
    assert len(trainer.report.not_averaged) == 2


def test_a_poisoned_average_is_not_averaged_and_nobody_is_dropped() -> None:
    """m seals its weights x1e8: every honest member refuses the *average* (no peer to name)
    and was dropped for it, m alone left (review R9). Now the round is not averaged
    (AverageRefusedError, in report.not_averaged) and everyone trains on."""
    data = _data()
    dep = inprocess({p: {"train": d} for p, d in data.items()})
    m = dep.owners["m"]
    honest = m.handle

    def handle(caller: str, raw: bytes) -> bytes:
        req = wire.decode(raw)
        if req.get("op") != "secagg_contribute":
            return honest(caller, raw)
        params = list(m.runtimes[req["segment"]].module.parameters())
        with torch.no_grad():
            for w in params:
                w.mul_(1e8)
        try:
            return honest(caller, raw)
        finally:
            with torch.no_grad():
                for w in params:
                    w.mul_(1e-8)

    m.handle = handle  # type: ignore[method-assign]
    trainer = _fit(dep, dep.transport, data)
    assert trainer.report.party_failures == []
    reasons = [e["reason"] for e in trainer.report.not_averaged]
    assert reasons and all("AverageRefusedError" in r for r in reasons)
    for p in PARTIES:  # nothing of the poisoned average was loaded anywhere
        w = dep.owners[p].export_weights(trainer.session.remote[(p, 0)].segment_id)
        assert all(float(v.abs().max()) < 1e3 for v in w.values())


def test_checking_contributions_saves_nothing(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The check phase changes nothing at a data owner: it wrote its segment file and
    host.sspl at every call, whatever checkpoint_every said (review R9)."""
    data = _data()
    hosts = [DataOwnerHost(p, {"train": Dataset(*d)}, state_dir=tmp_path / p,
                           checkpoint_every=1000) for p, d in data.items()]
    dep = Deployment(InProcessTransport(hosts, user="model-owner@example.org"),
                     {h.name: h for h in hosts})
    saves: Counter[str] = Counter()
    current = {"op": ""}
    for name in ("save_runtime", "save_host"):
        real = getattr(HostStore, name)

        def counted(self: HostStore, *args: Any, _real: Any = real, **kwargs: Any) -> None:
            saves[current["op"]] += 1
            _real(self, *args, **kwargs)

        monkeypatch.setattr(HostStore, name, counted)
    for host in hosts:
        real_handle = host.handle

        def handle(caller: str, raw: bytes, _real: Any = real_handle) -> bytes:
            current["op"] = str(wire.decode(raw).get("op"))
            return bytes(_real(caller, raw))

        host.handle = handle  # type: ignore[method-assign]
    trainer = _fit(dep, dep.transport, data)
    assert trainer.report.not_averaged == [] and trainer.report.party_failures == []
    assert saves["secagg_aggregate"] > 0 and saves["secagg_check"] == 0


def test_the_model_owners_own_error_stops_the_run_and_blames_no_data_owner() -> None:
    """Labels the model owner lacks for one data owner dropped that data owner, and the run
    finished without it (review R9): the model owner's own errors are raised as they are."""
    data = _data()
    dep = inprocess({p: {"train": d} for p, d in data.items()})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    plan = SplitPlan.vanilla([copy.deepcopy(model[:2]), copy.deepcopy(model[2:])], PARTIES,
                             datasets=["train"], share_weights="peer")
    session = SplitSession(plan, dep.transport, optimizer=OptimizerSpec("sgd", lr=0.1))
    dep.approve_all(session.propose())
    dep.trust_each_other()
    labels = {p: {"train": d[1]} for p, d in data.items() if p != "c"}
    trainer = Trainer(session, batch_size=8, progress=False, test_dataset=None,
                      measure_leakage=False, watch=False, schedule="splitfed_v2", max_workers=4,
                      labels=labels)
    with pytest.raises(ConfigError, match="labels"):
        trainer.fit(1, verbose=False)
    assert trainer.report.party_failures == []


def test_the_model_owners_own_nan_weights_stop_the_run_and_blame_no_data_owner() -> None:
    """A non-finite loss is charged to the data owner whose activation it came from, unless
    the model owner's own weights are not finite: then the run stops, nobody dropped."""
    data = _data()
    dep = inprocess({p: {"train": d} for p, d in data.items()})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    plan = SplitPlan.vanilla([copy.deepcopy(model[:2]), copy.deepcopy(model[2:])], PARTIES,
                             datasets=["train"], share_weights="peer")
    session = SplitSession(plan, dep.transport, optimizer=OptimizerSpec("sgd", lr=0.1))
    dep.approve_all(session.propose())
    dep.trust_each_other()
    trainer = Trainer(session, batch_size=8, progress=False, test_dataset=None,
                      measure_leakage=False, watch=False, schedule="splitfed_v2", max_workers=4,
                      labels={p: {"train": d[1]} for p, d in data.items()})
    with pytest.raises(FloatingPointError, match="model owner's weights"):
        trainer.fit(1, verbose=False)
    assert trainer.report.party_failures == []
