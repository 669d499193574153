"""Durable training in process: data owners restart from their state directories, model owners
from their checkpoints, every step is applied exactly once, and the run ends with the very
weights of an uninterrupted run."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from syft_split import (
    DataOwnerHost,
    InProcessTransport,
    OptimizerSpec,
    RunReport,
    SplitPlan,
    SplitSession,
    Trainer,
    split_model,
    wire,
)
from syft_split.errors import ApprovalError, ProtocolError
from syft_split.models import digits_cnn
from syft_split.spec import module_to_spec, spec_state

from .conftest import FAST, ChaosTransport

KINDS = ["vanilla", "u_shaped", "multi_hop", "splitfed_v1"]
#: kind -> the trainer's schedule (the plan shares client weights with the model owner)
SCHEDULE = {"splitfed_v1": "splitfed_v1", "relay": "relay"}


def _datasets() -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 10, (96,), generator=g)
    return {"a": {"train": (x[:40], y[:40]), "test": (x[80:88], y[80:88])},
            "b": {"train": (x[40:80], y[40:80]), "test": (x[88:], y[88:])}}


DATA = _datasets()


def _host(name: str, state_dir: Path | None) -> DataOwnerHost:
    """A data owner as it (re)starts: its datasets, then whatever its state directory holds."""
    host = DataOwnerHost(name, state_dir=None if state_dir is None else state_dir / name)
    for ds, (x, y) in DATA.get(name, {}).items():
        host.add_dataset(ds, x, y)
    host.restore_state()
    return host


def _plan(kind: str, seed: int = 1) -> SplitPlan:
    torch.manual_seed(seed)
    model = digits_cnn(channels=4, hidden=16)
    if kind == "u_shaped":
        return SplitPlan.u_shaped(split_model(model, ["pool1", "relu3"]), ["a", "b"])
    if kind == "multi_hop":
        return SplitPlan.multi_hop(split_model(model, ["pool1", "pool2"]), ["a", "b"], hops=["lab"])
    if kind == "dropout":  # the model owner's segment draws from the global torch RNG
        layers = list(model.named_children())
        model = nn.Sequential(OrderedDict([*layers[:-1], ("drop", nn.Dropout(0.3)),
                                           layers[-1]]))
    share = "peer" if kind in SCHEDULE else "none"
    return SplitPlan.vanilla(split_model(model, ["pool1"]), ["a", "b"], share_weights=share)


def _one(seed: int = 1) -> SplitPlan:
    torch.manual_seed(seed)
    return SplitPlan.vanilla(split_model(digits_cnn(channels=4, hidden=16), ["pool1"]), "a")


def _parties(kind: str) -> list[str]:
    return ["a", "b", "lab"] if kind == "multi_hop" else ["a", "b"]


def _labels(kind: str) -> dict[str, dict[str, torch.Tensor]] | None:
    if kind == "u_shaped":
        return None
    return {p: {ds: y for ds, (_x, y) in DATA[p].items()} for p in ("a", "b")}


def _chaos(kind: str, state_dir: Path, crashes: dict[int | tuple[str, int], str]
           ) -> ChaosTransport:
    """This module's data owners, crashing at ``crashes`` (see conftest's ChaosTransport)."""
    return ChaosTransport(lambda p: _host(p, state_dir), _parties(kind), crashes)


def _start(kind: str, transport: InProcessTransport, hosts: Callable[[str], DataOwnerHost],
           seed: int = 1, fuse: bool = True) -> SplitSession:
    session = SplitSession(_plan(kind, seed), transport, optimizer=OptimizerSpec("adam", lr=1e-2),
                           fuse=fuse)
    for party, ids in session.propose().items():
        for pid in ids:
            hosts(party).approve(pid)
    if kind in SCHEDULE:  # weights move only between data owners that pinned each other's keys
        hosts("a").trust_peer("b", hosts("b").public_key())
        hosts("b").trust_peer("a", hosts("a").public_key())
    return session


def _trainer(session: SplitSession, kind: str) -> Trainer:
    return Trainer(session, batch_size=16, labels=_labels(kind), seed=0, progress=False,
                   measure_leakage=False, schedule=SCHEDULE.get(kind, "round_robin"))


def _weights(session: SplitSession, host: Callable[[str], DataOwnerHost]) -> list[torch.Tensor]:
    session.flush()
    out = [t for m in session.local.values() for t in m.state_dict().values()]
    for (party, _i), seg in sorted(session.remote.items()):
        out.extend(host(party).export_weights(seg.segment_id).values())
    return out


def _reference(kind: str, epochs: int, fuse: bool = True
               ) -> tuple[list[torch.Tensor], RunReport, range]:
    """The uninterrupted run: final weights, its report, and its training calls."""
    hosts = {p: _host(p, None) for p in _parties(kind)}
    t = InProcessTransport(list(hosts.values()))
    session = _start(kind, t, hosts.__getitem__, fuse=fuse)
    setup = t.calls
    report = _trainer(session, kind).fit(epochs, verbose=False)
    calls = range(setup + 1, t.calls + 1)
    return _weights(session, hosts.__getitem__), report, calls


@pytest.mark.parametrize("kind", KINDS)
def test_data_owner_crashes_change_nothing(tmp_path: Path, kind: str) -> None:
    """Data owners crash before requests arrive and after applying them (response lost) at
    random calls; they restart from their state directories, the transport retries under the
    same step ids, and the run ends bit-for-bit where the uninterrupted one does."""
    want, want_report, calls = _reference(kind, 2)
    want_losses = [e.train_loss for e in want_report.epochs]
    rng = random.Random(kind)
    crashes = {n: rng.choice(["before", "after"]) for n in sorted(rng.sample(calls, 8))}
    # a crash adds one request (its retry): later crash points shift with it
    crashes = {n + k: mode for k, (n, mode) in enumerate(crashes.items())}
    t = _chaos(kind, tmp_path, dict(crashes))
    session = _start(kind, t, t.host)
    report = _trainer(session, kind).fit(2, verbose=False)
    assert t.restarts == len(crashes) and not t.crashes  # every crash happened
    got = _weights(session, t.host)
    assert all(torch.equal(a, b) for a, b in zip(got, want)), "weights differ after crashes"
    assert [e.train_loss for e in report.epochs] == want_losses
    # no step applied twice: each data owner stepped once per delivered gradient
    fresh = InProcessTransport([_host(p, tmp_path) for p in _parties(kind)])
    for (party, _i), seg in session.remote.items():
        info = fresh.call(party, "status", segment=seg.segment_id)
        assert info["status"] == "approved"
        assert info["last_step"] == seg.next_step - 1 and not info["pending"]


def test_a_retried_step_is_answered_from_the_record(tmp_path: Path) -> None:
    host = _host("a", tmp_path)
    t = InProcessTransport([host])
    session = SplitSession(_one(), t, optimizer=OptimizerSpec("sgd", lr=0.1), fuse=False)
    (pid,) = session.propose()["a"]
    host.approve(pid)
    idx = torch.arange(8)

    def request(step: int, **fields: object) -> bytes:
        return wire.encode({"op": "forward", "segment": pid, "step": step, **fields})

    first = host.handle(t.user, request(1, indices=idx))
    again = host.handle(t.user, request(1, indices=idx))  # the response was lost: retry
    assert again == first
    rt = host.runtimes[pid]
    grad = torch.ones(8, 4, 4, 4)
    back = wire.encode({"op": "backward", "segment": pid, "step": 2, "grad": grad})
    assert "error" not in wire.decode(host.handle(t.user, back))
    assert rt.steps == 1
    assert host.handle(t.user, back) == host.handle(t.user, back)  # replayed, not re-applied
    assert rt.steps == 1
    assert host.handle(t.user, request(1, indices=idx)) == first  # still remembered
    other = wire.decode(host.handle(t.user, wire.encode(
        {"op": "backward", "segment": pid, "step": 2, "grad": 2 * grad})))
    assert other["error"] == "ProtocolError" and "different request" in other["message"]
    gap = wire.decode(host.handle(t.user, request(4, indices=idx)))
    assert gap["error"] == "ProtocolError" and "steps 3..3 were lost" in gap["message"]
    assert rt.steps == 1 and rt.pending_output is None
    outcomes = [e.outcome for e in host.audit if e.op in ("forward", "backward")]
    assert sum("answered from the record" in o for o in outcomes) == 4


def test_restart_keeps_proposals_approvals_peers_and_audit(tmp_path: Path) -> None:
    host = _host("a", tmp_path)
    t = InProcessTransport([host])
    session = SplitSession(_one(), t, optimizer=OptimizerSpec("sgd", lr=0.1))
    (approved,) = session.propose()["a"]
    host.approve(approved)
    pending = SplitSession(_one(2), t).propose()["a"][0]
    host.trust_peer("b", bytes(range(32)))
    key = host.public_key()
    host.release_weights(approved)
    trainer = _trainer(session, "vanilla")
    trainer.labels = {"a": {ds: y for ds, (_x, y) in DATA["a"].items()}}
    trainer.train_epoch()
    weights = host.export_weights(approved)
    log = host.audit_log()

    back = _host("a", tmp_path)  # the crashed process is gone; a new one reads the directory
    assert {p.id: p.status for p in back.proposals()} == {approved: "approved", pending: "pending"}
    assert all(torch.equal(weights[k], v) for k, v in back.export_weights(approved).items())
    assert back.public_key() == key
    assert back.families["weights"].peers == {"b": bytes(range(32))}  # type: ignore[attr-defined]
    assert [e["op"] for e in back.audit_log()[: len(log)]] == [e["op"] for e in log]
    t.add_host(back, replace=True)
    assert set(session.remote[("a", 0)].export()) == set(weights)  # released: still released
    back.approve(pending)  # a proposal made before the restart can still be approved
    with pytest.raises(ApprovalError):
        back.approve(approved)


def test_attach_without_checkpoint_continues_after_the_last_applied_step(tmp_path: Path) -> None:
    """A new process re-attaches by id: it continues after the data owner's last step id, and a
    step left pending there (its gradient died with the old process) is discarded, and says so."""
    host = _host("a", tmp_path)
    t = InProcessTransport([host])
    old = SplitSession(_one(), t, optimizer=OptimizerSpec("sgd", lr=0.1))
    host.approve(old.propose()["a"][0])
    for _ in range(2):
        old.zero_grad()
        loss, _m = old.loss("a", torch.arange(8), DATA["a"]["train"][1][:8])
        loss.backward()  # the second gradient stays held at the old process: it dies with it
        old.step()
    ids = old.segment_ids()
    new = SplitSession(_one(2), t)
    with pytest.raises(ProtocolError, match="propose"):
        new.loss("a", torch.arange(8), DATA["a"]["train"][1][:8])
    info = new.attach(ids)
    [(key, view)] = info.items()
    assert key == "a:0" and view["status"] == "approved" and view["steps"] == 1
    assert view["discarded"]["pending"] is True
    seg = new.remote[("a", 0)]
    assert seg.next_step == view["last_step"] + 2  # the discard took a step id too
    loss, _m = new.loss("a", torch.arange(8), DATA["a"]["train"][1][:8])
    loss.backward()
    new.flush()
    assert t.call("a", "status", segment=seg.segment_id)["steps"] == 2


def test_alignment_permissions_and_aligned_rows_survive_restart(tmp_path: Path) -> None:
    from syft_split.alignment import align_records

    x = torch.randn(12, 3)
    ids = [f"p{i}" for i in range(12)]
    host = DataOwnerHost("a", state_dir=tmp_path / "a")
    host.add_dataset("people", x, ids=ids)
    host.allow_alignment("people", "model-owner@example.org")
    t = InProcessTransport([host])
    rows = align_records(t, ["a"], "people", ["p9", "p2", "p5", "zz"])
    assert rows.tolist() == [1, 2, 0]  # the model owner's rows, in id order p2, p5, p9
    aligned = host.datasets["people@aligned"].features

    back = DataOwnerHost("a", state_dir=tmp_path / "a")
    back.add_dataset("people", x, ids=ids)
    assert back.restore_state()
    assert torch.equal(back.datasets["people@aligned"].features, aligned)
    assert back.datasets["people@aligned"].ids == ["p2", "p5", "p9"]
    assert ("people", "model-owner@example.org") in back.families["alignment"]._allowed  # type: ignore[attr-defined]


def _people(state_dir: Path) -> Callable[[], DataOwnerHost]:
    """A data owner "a" with 12 records ``people`` (ids p0..p11), as it (re)starts."""
    x, ids = torch.randn(12, 3), [f"p{i}" for i in range(12)]

    def start() -> DataOwnerHost:
        host = DataOwnerHost("a", state_dir=state_dir / "a")
        host.add_dataset("people", x, ids=ids)
        host.restore_state()
        return host

    return start


def test_a_pending_forward_on_aligned_rows_comes_back(tmp_path: Path) -> None:
    """A forward left pending on an aligned dataset is re-run after a crash once the aligned
    rows are back (restoring used to fail: the re-run came before the families' state)."""
    from syft_split.alignment import align_records

    start = _people(tmp_path)
    host = start()
    host.allow_alignment("people", "model-owner@example.org")
    t = InProcessTransport([host])
    align_records(t, ["a"], "people", ["p9", "p2", "p5"])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    plan = SplitPlan.vanilla(split_model(model, "1"), "a", datasets=["people@aligned"])
    session = SplitSession(plan, t)
    (pid,) = session.propose()["a"]
    host.approve(pid)
    out = t.call("a", "forward", segment=pid, indices=torch.arange(3),
                 dataset="people@aligned", step=1)["activation"]

    back = start()  # crashed: no clean shutdown
    t.add_host(back, replace=True)
    assert t.call("a", "status", segment=pid)["pending"]
    assert torch.equal(back.owned_runtime(pid).pending_output.detach(), out)
    t.call("a", "backward", segment=pid, grad=torch.ones(3, 4), step=2)
    assert t.call("a", "status", segment=pid)["steps"] == 1


def test_a_host_that_lost_steps_says_so(tmp_path: Path) -> None:
    """With ``checkpoint_every=3`` a crash can lose applied steps: the host refuses the next
    step (naming the lost ones) instead of training on silently; re-attaching continues."""
    def start() -> DataOwnerHost:
        host = DataOwnerHost("a", state_dir=tmp_path / "a", checkpoint_every=3)
        for ds, (x, y) in DATA["a"].items():
            host.add_dataset(ds, x, y)
        host.restore_state()
        return host

    t = InProcessTransport([start()], policy=FAST)
    session = SplitSession(_one(), t, optimizer=OptimizerSpec("sgd", lr=0.1))
    t._hosts["a"].approve(session.propose()["a"][0])
    y = DATA["a"]["train"][1]

    def step() -> None:
        session.zero_grad()
        loss, _m = session.loss("a", torch.arange(8), y[:8])
        loss.backward()
        session.step()

    for _ in range(4):  # the host saved after its 3rd change, not after the 4th
        step()
    t.add_host(start(), replace=True)  # crash: only the directory survives
    with pytest.raises(ProtocolError, match=r"steps 4\.\.4 were lost"):
        step()
    info = session.attach(session.segment_ids())
    assert info["a:0"]["last_step"] == 3 and info["a:0"]["discarded"]["pending"] is True
    step()
    session.flush()
    assert t.call("a", "status", segment=session.remote[("a", 0)].segment_id)["steps"] == 3


def test_level_b_encrypted_segments_come_back_halted(tmp_path: Path) -> None:
    """A level-B segment whose weight share is not in its file (here: no client was ever
    built) is restored halted (propose it again), never running without its share. With the
    share on disk it continues under fresh keys: tests/test_he_restart.py."""
    host = _host("a", tmp_path)
    t = InProcessTransport([host])
    session = SplitSession(_one(), t)
    (pid,) = session.propose()["a"]
    host.approve(pid)
    host.proposal(pid).he = {"level": "B"}  # as if approved with encryption (no keys built here)
    host.save_state()
    back = _host("a", tmp_path)
    p = back.proposal(pid)
    assert p.status == "halted" and "propose this segment again" in p.reason
    t.add_host(back, replace=True)
    with pytest.raises(ApprovalError, match="halted"):
        session.loss("a", torch.arange(4), DATA["a"]["train"][1][:4])


def test_a_pending_forward_rebuilt_after_a_restart_keeps_batchnorm_statistics(
        tmp_path: Path) -> None:
    """Re-running a pending forward after a restart does not update BatchNorm's running
    statistics a second time: they are those the forward left."""
    def start() -> DataOwnerHost:
        return _host("a", tmp_path)

    host = start()
    t = InProcessTransport([host])
    torch.manual_seed(0)
    seg = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.BatchNorm1d(6), nn.ReLU())
    pid = t.call("a", "propose", role="input", spec=module_to_spec(seg), datasets=["train"],
                 optimizer={"name": "sgd", "lr": 0.1},
                 **{f"state/{k}": v for k, v in spec_state(seg).items()})["segment"]
    host.approve(pid)
    t.call("a", "forward", segment=pid, indices=torch.arange(8), step=1)
    stats = {k: v.clone() for k, v in host.export_weights(pid).items() if "running" in k}
    back = start()
    assert back.runtimes[pid].pending_output is not None
    got = back.export_weights(pid)
    assert all(torch.equal(got[k], v) for k, v in stats.items())


def test_an_evaluation_call_carries_no_step(tmp_path: Path) -> None:
    """Evaluation calls are not saved, so a held-back step riding one would be lost in a
    crash: ``grad`` on an eval forward and ``step_scale`` on an eval loss step are refused,
    nothing applied."""
    host = _host("a", tmp_path)
    t = InProcessTransport([host])
    session = SplitSession(_one(), t, optimizer=OptimizerSpec("sgd", lr=0.1))
    (pid,) = session.propose()["a"]
    host.approve(pid)
    out = t.call("a", "forward", segment=pid, indices=torch.arange(8), step=1)["activation"]
    with pytest.raises(ProtocolError, match="carries no step"):
        t.call("a", "forward", segment=pid, indices=torch.arange(8), train=False,
               grad=torch.ones_like(out))
    assert t.call("a", "status", segment=pid)["steps"] == 0
    t.call("a", "backward", segment=pid, grad=torch.ones_like(out), step=2)
    assert t.call("a", "status", segment=pid)["steps"] == 1
