"""A data owner's ``HostLimits.min_cohort`` with uneven datasets: late SplitFed rounds have too
few data owners with a batch (or one batch under a tenth of the largest), and no member may
relay its weights. Such a round is not averaged, or its average not relayed: a policy, not a
failure. Every data owner trains every batch, the report names the rounds and why, and the
weights equal a plain reference that skips exactly those averagings (also after a resume)."""

from __future__ import annotations

import copy
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from syft_split import (
    AccessError,
    CohortRefusedError,
    DataOwnerHost,
    InProcessTransport,
    OptimizerSpec,
    ProtocolError,
    SplitPlan,
    SplitSession,
    Trainer,
)
from syft_split.deploy import inprocess
from syft_split.host import HostLimits
from syft_split.report import RunReport
from syft_split.rounds import run_each
from syft_split.schedules import SecureAverage, weighted_mean

from .conftest import ChaosTransport, Crash

#: 5, 4, 3 and 1 batches of 16: round 0 has all four, round 1 three (d has none), round 2 a
#: batch of 1 record next to two of 16, round 3 two data owners, round 4 one
SIZES = {"a": 80, "b": 64, "c": 33, "d": 16}
BATCH = 16
SGD = OptimizerSpec("sgd", lr=0.1)
#: every host at min_cohort 3, or b at 2 (b then relays the average to those without a batch)
COHORTS = {"all3": {"a": 3, "b": 3, "c": 3, "d": 3}, "b2": {"a": 3, "b": 2, "c": 3, "d": 3}}


def _data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {p: (torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
            for p, n in SIZES.items()}


DATA = _data()


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def _plan(seed: int = 0) -> SplitPlan:
    model = _model(seed)  # another seed: a new model-owner process's other initial weights
    return SplitPlan.vanilla([copy.deepcopy(model[:3]), copy.deepcopy(model[3:])], list(SIZES),
                             share_weights="peer", datasets=["train"])


def _trainer(session: SplitSession, schedule: str, max_workers: int | None) -> Trainer:
    return Trainer(session, batch_size=BATCH, progress=False, schedule=schedule,
                   test_dataset=None, labels={p: {"train": d[1]} for p, d in DATA.items()},
                   measure_leakage=False, max_workers=max_workers)


def _setup(transport: InProcessTransport, host) -> SplitSession:
    session = SplitSession(_plan(), transport, optimizer=SGD)
    for party, ids in session.propose().items():
        for pid in ids:
            host(party).approve(pid)
    for a in SIZES:
        for b in SIZES:
            if a != b:
                host(a).trust_peer(b, host(b).public_key())
    return session


# ----------------------------------------------------------------------- the reference
def _refused(members: list[str], w: dict[str, float], least: dict[str, int]) -> str | None:
    """The host's rule, written out: the marker of the refusal the report must name."""
    ws = [w[m] for m in members]
    for m in members:
        if len(members) < least[m]:
            return f"{m} averages only in cohorts of at least {least[m]} members"
        if least[m] >= 3 and min(ws) * 10 < max(ws):
            return f"{m} needs every averaging weight to be at least a tenth of the largest"
    return None


def _reference(schedule: str, least: dict[str, int], epochs: int):
    """Plain torch: each data owner's head (and, v1, its tail copy) takes an SGD step on its
    batch; after each round the members' copies are averaged unless a member's min_cohort
    refuses the cohort, and those without a batch take the average unless no member relays.
    Returns (heads, tails by data owner, expected report entries)."""
    model = _model()
    heads = {p: copy.deepcopy(model[:3]) for p in SIZES}
    shared = copy.deepcopy(model[3:])
    tails = {p: copy.deepcopy(shared) if schedule == "splitfed_v1" else shared for p in SIZES}
    gen = torch.Generator().manual_seed(0)  # the trainer's batch order (seed=0)
    expected = []
    for epoch in range(1, epochs + 1):
        perms = {p: torch.randperm(n, generator=gen).split(BATCH) for p, n in SIZES.items()}
        for k in range(max(len(v) for v in perms.values())):
            batch = {p: perms[p][k] for p in SIZES if k < len(perms[p])}
            for p, idx in batch.items():
                x, y = DATA[p][0][idx], DATA[p][1][idx]
                params = [*heads[p].parameters(), *tails[p].parameters()]
                grads = torch.autograd.grad(F.cross_entropy(tails[p](heads[p](x)), y), params)
                with torch.no_grad():
                    for q, g in zip(params, grads):
                        q -= 0.1 * g
            members, w = list(batch), {p: float(len(i)) for p, i in batch.items()}
            why = _refused(members, w, least) if len(members) > 1 else None
            if why is not None:  # every data owner keeps its own weights this round
                expected.append((epoch, k, sorted(SIZES), why))
                continue
            zero = [p for p in SIZES if p not in batch]
            kept = zero if not any(least[m] < 3 for m in members) else []
            if kept:
                expected.append((epoch, k, kept, "not relayed the average: no member relays"))
            head = weighted_mean([heads[m].state_dict() for m in members], [w[m] for m in members])
            tail = weighted_mean([tails[m].state_dict() for m in members], [w[m] for m in members])
            for p in SIZES:
                if p not in kept:
                    heads[p].load_state_dict(head)
                    if schedule == "splitfed_v1":
                        tails[p].load_state_dict(tail)
    return heads, tails, expected


def _max_diff(got, want: nn.Module) -> float:
    values = list(got.values()) if isinstance(got, dict) else got
    return max(float((a - b).abs().max()) for a, b in zip(values, want.state_dict().values(),
                                                          strict=True))


def _check(trainer: Trainer, session: SplitSession, host, schedule: str, least: dict[str, int],
           epochs: int) -> None:
    """The run equals the reference: weights, steps at every data owner, the report."""
    report = trainer.report
    heads, tails, expected = _reference(schedule, least, epochs)
    assert not report.party_failures and not trainer.unavailable()
    batches = {p: -(-n // BATCH) for p, n in SIZES.items()}
    assert report.steps == epochs * sum(batches.values())
    session.flush()
    for p in SIZES:
        sid = session.remote[(p, 0)].segment_id
        assert host(p).runtimes[sid].steps == epochs * batches[p]  # every batch, every epoch
        assert _max_diff(host(p).export_weights(sid), heads[p]) <= 1e-5, p
    got = [(e["epoch"], e["round"], e["kept"]) for e in report.not_averaged]
    assert got == [(e, k, kept) for e, k, kept, _ in expected]
    for entry, (*_, why) in zip(report.not_averaged, expected):
        assert why in entry["reason"], (entry, why)
    if schedule == "splitfed_v1":
        copies = trainer._rounds.copies if trainer._rounds is not None else trainer._server_copies
        for p in SIZES:
            assert _max_diff(copies.states[p][0][0], tails[p]) <= 1e-5, p
    else:
        assert _max_diff(session.local[1].state_dict(), tails["a"]) <= 1e-5


# ---------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("schedule, max_workers, cohort", [
    ("splitfed_v1", None, "all3"), ("splitfed_v1", 1, "all3"), ("splitfed_v1", None, "b2"),
    ("splitfed_v1", 1, "b2"), ("splitfed_v2", None, "all3")])
def test_rounds_a_min_cohort_refuses_are_not_averaged_and_nobody_is_dropped(
        schedule: str, max_workers: int | None, cohort: str) -> None:
    """Four data owners of 80, 64, 33 and 16 records at min_cohort 3: round 2 (a batch of 1
    next to two of 16) and round 3 (two members) are not averaged, d gets no average in
    round 1 nor anyone in round 4 unless a member at min_cohort 2 relays; every data owner
    trains all its batches of both epochs (a and b used to be dropped as failed)."""
    least = COHORTS[cohort]
    dep = inprocess({p: {"train": d} for p, d in DATA.items()})
    for p, n in least.items():
        dep.owners[p].limits = replace(dep.owners[p].limits, min_cohort=n)
    session = _setup(dep.transport, dep.owners.__getitem__)
    trainer = _trainer(session, schedule, max_workers)
    assert (trainer._rounds is None) == (max_workers == 1)  # both code paths
    trainer.fit(2, verbose=False)
    _check(trainer, session, dep.owners.__getitem__, schedule, least, 2)
    if cohort == "all3":  # nothing was left out on the model owner's say-so alone
        assert {e["round"] for e in trainer.report.not_averaged} == {1, 2, 3, 4}


def _host(name: str, state_dir: Path) -> DataOwnerHost:
    host = DataOwnerHost(name, state_dir=state_dir / name, limits=HostLimits(min_cohort=3))
    host.add_dataset("train", *DATA[name])
    host.restore_state()
    return host


def test_a_resumed_run_skips_the_same_averagings(tmp_path: Path) -> None:
    """Checkpointed SplitFed v1 at min_cohort 3: the model owner's process dies three times
    (at random calls); each new one resumes and the run ends as the reference, with the same
    rounds reported not averaged, once each."""
    hosts = {p: _host(p, tmp_path / "probe") for p in SIZES}
    probe = InProcessTransport(list(hosts.values()))
    session = _setup(probe, hosts.__getitem__)
    setup = probe.calls
    _trainer(session, "splitfed_v1", 1).fit(2, verbose=False)
    rng = random.Random("cohort")
    crashes = rng.sample(range(setup + 1, probe.calls + 1), 3)
    t = ChaosTransport(lambda p: _host(p, tmp_path / "owners"), SIZES,
                       {n: "model_owner" for n in crashes})
    session, crashed = _setup(t, t.host), 0
    while True:
        try:
            trainer = _trainer(session, "splitfed_v1", None)
            trainer.fit(2, verbose=False, checkpoint_dir=tmp_path / "mo", resume=True)
            break
        except Crash:
            crashed += 1  # a new process: new session, other initial weights, no segments
            session = SplitSession(_plan(seed=crashed), t, optimizer=SGD)
    assert crashed == 3 and trainer.report.extra["resumed"] >= 1
    _check(trainer, session, t.host, "splitfed_v1", COHORTS["all3"], 2)


@pytest.mark.parametrize("each", [None, "concurrent"])
def test_a_refusal_the_model_owner_did_not_foresee_abandons_the_round(three_peers, each) -> None:
    """A data owner raises its min_cohort after the model owner read it: the round it refuses
    is abandoned before anyone loads (nothing changes anywhere, no failure); so is a relay its
    policy now refuses. The next round, allowed again, runs under fresh round numbers."""
    dep, session, segs = three_peers
    names = list(segs)
    run = None if each is None else (lambda keys, fn: run_each(keys, fn, max_workers=3))
    avg = SecureAverage(session)
    assert avg(names, [1.0, 1.0, 1.0], each=run) == {} and avg.last.not_averaged is None
    assert avg.min_cohort == {n: 2 for n in names}
    host_a = dep.owners["a"]
    host_a.limits = replace(host_a.limits, min_cohort=4)
    assert segs["a"].secagg_status()["min_cohort"] == 4
    session.zero_grad()  # the copies differ again
    loss, _ = session.loss("b", torch.arange(8), torch.zeros(8, dtype=torch.long),
                           dataset="train")
    loss.backward()
    session.flush()
    before = {n: dep.owners[n].export_weights(s.segment_id) for n, s in segs.items()}
    assert avg(names, [1.0, 2.0, 1.0], each=run) == {}
    assert "CohortRefusedError" in avg.last.not_averaged and "at least 4" in avg.last.not_averaged
    assert avg.last.record()["kept"] == names
    for n, s in segs.items():
        now = dep.owners[n].export_weights(s.segment_id)
        assert all(torch.equal(now[k], before[n][k]) for k in now), n
    # a relay a's policy now refuses (a single member): b and c keep theirs, no failure
    host_a.limits = replace(host_a.limits, min_cohort=3)
    assert avg(names, [1.0, 0.0, 0.0], each=run) == {}
    assert sorted(avg.last.not_relayed) == ["b", "c"] and "never relays" in avg.last.not_relayed["b"]
    host_a.limits = replace(host_a.limits, min_cohort=2)
    assert avg(names, [1.0, 2.0, 1.0], each=run) == {} and avg.last.not_averaged is None
    after = {n: dep.owners[n].export_weights(s.segment_id) for n, s in segs.items()}
    want = weighted_mean([before[n] for n in names], [1.0, 2.0, 1.0])
    for n in names:
        assert max(float((after[n][k] - want[k]).abs().max()) for k in want) <= 1e-6


def test_the_refusal_is_its_own_error_class_and_refused_before_anything_is_kept(
        three_peers) -> None:
    """The host's rule is unchanged; its refusal is a CohortRefusedError (still a
    ProtocolError, and for seal still an AccessError), raised before a round number is spent."""
    dep, _, segs = three_peers
    host_a = dep.owners["a"]
    host_a.limits = replace(host_a.limits, min_cohort=3)
    t = dep.transport
    with pytest.raises(CohortRefusedError, match="at least 3 members") as info:
        t.call("a", "secagg_contribute", segment=segs["a"].segment_id, label="node0", round=1,
               members={n: segs[n].segment_id for n in ("a", "b")}, weights={"a": 1, "b": 1})
    assert isinstance(info.value, ProtocolError)
    with pytest.raises(CohortRefusedError, match="never relays") as relay:
        t.call("a", "seal", segment=segs["a"].segment_id, peer="b",
               to_segment=segs["b"].segment_id)
    assert isinstance(relay.value, AccessError)
    assert segs["a"].secagg_status() == {"round": 0, "pending": 0, "aggregated": 0,
                                         "min_cohort": 3}


def test_the_report_keeps_the_newest_rounds_not_averaged(monkeypatch: pytest.MonkeyPatch) -> None:
    """``report.not_averaged`` is in every checkpoint: it keeps the newest MAX_NOT_AVERAGED
    rounds and counts the others (it grew with every refused round: 10 000 made each save
    2.1 MB and 183 ms)."""
    import syft_split.trainer as trainer_module

    def run() -> RunReport:
        dep = inprocess({p: {"train": d} for p, d in DATA.items()})
        for p, n in COHORTS["all3"].items():
            dep.owners[p].limits = replace(dep.owners[p].limits, min_cohort=n)
        trainer = _trainer(_setup(dep.transport, dep.owners.__getitem__), "splitfed_v2", None)
        trainer.fit(2, verbose=False)
        return trainer.report

    full = run()
    assert len(full.not_averaged) > 3 and full.not_averaged_dropped == 0
    monkeypatch.setattr(trainer_module, "MAX_NOT_AVERAGED", 3)
    short = run()
    assert short.not_averaged == full.not_averaged[-3:]
    assert short.not_averaged_dropped == len(full.not_averaged) - 3
