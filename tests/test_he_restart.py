"""A data owner restarting under HE protection (real CKKS, in process): it continues with
fresh keys (level B: and its weight share) and ends where an uninterrupted run ends; a step the
restart cut is run again from its forward; a gradient applied just before the restart is
answered from the data owner's record, never applied twice."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from syft_split import (
    DataOwnerHost,
    HostLimits,
    InProcessTransport,
    OptimizerSpec,
    SplitPlan,
    SplitSession,
    Trainer,
    persist,
    split_model,
)
from syft_split.errors import ApprovalError, ShapeError, ValidationError
from syft_split.he import protect
from syft_split.topology import MODEL_OWNER

from .conftest import ChaosTransport, Crash

pytestmark = [pytest.mark.he]

B = 16


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 12, generator=g), torch.randint(0, 3, (64,), generator=g)


X, Y = _data()


def _host(state_dir: Path) -> DataOwnerHost:
    """The data owner as it (re)starts: its dataset, then whatever its directory holds."""
    host = DataOwnerHost("h", state_dir=state_dir)
    host.add_dataset("train", X, Y)
    host.add_dataset("test", X[:16], Y[:16])
    host.restore_state()
    return host


def _plan(level: str = "A", seed: int = 3) -> tuple[SplitPlan, OptimizerSpec]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(),                  # data owner
                          nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))  # model owner
    plan = SplitPlan.vanilla(split_model(model, "1"), "h")
    if level == "B":  # SGD with momentum everywhere: the agreed optimizer, no second warning
        with pytest.warns(UserWarning, match="trains with SGD"):
            plan = protect(plan, level="B", lr=0.05, batch_size=B, momentum=0.5)
        return plan, OptimizerSpec("sgd", lr=0.05, momentum=0.5)
    return protect(plan, level="A", batch_size=B), OptimizerSpec("sgd", lr=0.1)


def _session(t: InProcessTransport, host: DataOwnerHost, level: str = "A") -> SplitSession:
    plan, opt = _plan(level)
    session = SplitSession(plan, t, optimizer=opt)
    for pid in session.propose()["h"]:
        host.approve(pid)
    return session


def _step(session: SplitSession, i: int, between: Callable[[], Any] | None = None) -> None:
    idx = torch.arange(B) + B * (i % 4)
    session.zero_grad()
    loss, _ = session.loss("h", idx, Y[idx])
    if between is not None:
        between()  # e.g. the data owner restarts after the forward, before the backward
    loss.backward()
    session.step()


def _weights(session: SplitSession, host: DataOwnerHost) -> list[torch.Tensor]:
    """The data owner's segment, the encrypted layer's true weight W_s + A and bias, and the
    model owner's upper layers."""
    (pid,) = [p.id for p in host.proposals("approved")]
    owner = host.export_weights(pid)
    he = session.he
    assert he is not None and he.bias is not None
    share = host.owned_runtime(pid).he.weight_share
    (top,) = [n.module for n in session.plan.nodes if n.owner == MODEL_OWNER]
    enc = {id(p) for p in he.enc.module.parameters()}
    rest = [p.detach().clone() for p in top.parameters() if id(p) not in enc]
    return [*owner.values(), he.weight + share.to(he.weight.dtype), he.bias, *rest]


def _restart(t: InProcessTransport, state_dir: Path) -> DataOwnerHost:
    back = _host(state_dir)  # a crash: only the state directory survives
    t.add_host(back, replace=True)
    return back


@pytest.mark.parametrize("level", ["A", "B"])
def test_restarts_continue_like_an_uninterrupted_run(tmp_path: Path, level: str) -> None:
    """Level B also puts its weight share (and its momentum part) back under the new keys."""
    ref_host = _host(tmp_path / "ref")
    ref = _session(InProcessTransport([ref_host]), ref_host, level)
    for i in range(6):
        _step(ref, i)

    host = _host(tmp_path / "h")
    t = InProcessTransport([host])
    session = _session(t, host, level)
    for i in range(2):
        _step(session, i)
    host = _restart(t, tmp_path / "h")  # between steps
    _step(session, 2)
    box: dict[str, DataOwnerHost] = {}
    _step(session, 3, lambda: box.setdefault("h", _restart(t, tmp_path / "h")))  # mid-step
    host = box["h"]
    for i in range(4, 6):
        _step(session, i)

    he = session.he
    assert he is not None and he.rekeys == {"h": 2}
    (pid,) = [p.id for p in host.proposals("approved")]
    assert t.call("h", "status", segment=pid)["steps"] == 6  # each step applied once
    for got, want in zip(_weights(session, host), _weights(ref, ref_host), strict=True):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    costs, ref_costs = he.costs(), ref.he.costs()
    assert costs["model_owner.h.rekeys"] == 2
    assert costs["model_owner.h.steps"] == 7  # one meter across the restarts: 6 + 1 run again
    # the data owner's meter goes on across its restarts too (its file keeps the totals)
    assert costs["h.steps"] == ref_costs["h.steps"] + 1
    assert costs["h.bytes_sent"] >= ref_costs["h.bytes_sent"]


def test_a_gradient_applied_before_the_restart_is_answered_not_applied_again(
        tmp_path: Path) -> None:
    ref_host = _host(tmp_path / "ref")
    ref = _session(InProcessTransport([ref_host]), ref_host)
    for i in range(3):
        _step(ref, i)

    host = _host(tmp_path / "h")
    t = InProcessTransport([host])
    session = _session(t, host)
    _step(session, 0)
    call = t.call
    replies: list[Any] = []

    def lose_answer(party: str, op: str, **fields: Any) -> Any:
        """he_grad reaches the data owner, which applies it and restarts before answering;
        the same request is sent again (as a transport retry does) to the restarted one."""
        if op != "he_grad":
            return call(party, op, **fields)
        replies.append(call(party, op, **fields))
        box["h"] = _restart(t, tmp_path / "h")
        t.call = call  # type: ignore[method-assign]
        replies.append(call(party, op, **fields))
        return replies[-1]

    box: dict[str, DataOwnerHost] = {}
    t.call = lose_answer  # type: ignore[method-assign]
    _step(session, 1)
    assert replies[0] == replies[1]  # answered from the record: the same masked values
    audit = [e for e in box["h"].audit_log() if e["op"] == "he_grad"]
    assert "answered from the record" in audit[-1]["outcome"]
    _step(session, 2)
    he = session.he
    assert he is not None and he.rekeys == {"h": 1}
    (pid,) = session.segment_ids().values()
    assert t.call("h", "status", segment=pid)["steps"] == 3  # each gradient applied once
    for got, want in zip(_weights(session, box["h"]), _weights(ref, ref_host), strict=True):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_level_b_without_its_share_on_disk_comes_back_halted(tmp_path: Path) -> None:
    host = _host(tmp_path / "h")
    t = InProcessTransport([host])
    session = _session(t, host, level="B")
    _step(session, 0)
    (pid,) = session.segment_ids().values()
    assert host.store is not None
    path = host.store.segment_path(pid)
    tree = persist.load(path)
    tree["he"] = None  # e.g. written by an older version
    persist.save(path, tree)
    back = _restart(t, tmp_path / "h")
    (p,) = back.proposals("halted")
    assert "weight share is not on disk" in p.reason
    with pytest.raises(ApprovalError, match="halted"):
        _step(session, 1)


def test_a_bad_share_on_disk_is_refused() -> None:
    from he_layers import CKKSParams, HEClient, KeyOwner, LayerSpec

    client = HEClient(KeyOwner(LayerSpec(batch_size=4, d_in=3, d_out=2, level="B", lr=0.1),
                               CKKSParams()))
    good = client.state()
    with pytest.raises(ShapeError, match="share"):
        client.load_state({**good, "share": torch.zeros(2, 3, dtype=torch.float64)})
    with pytest.raises(ShapeError, match="momentum"):
        client.load_state({**good, "momentum": torch.full((3, 2), float("nan"))})
    client.load_state({**good, "costs": {"steps": 5, "total": {"enc_s": 1.5}}})
    assert client.costs.steps == 5 and client.costs.total["enc_s"] == 1.5
    for bad in ({"steps": -1, "total": {}}, {"steps": 1, "total": {"enc_s": float("nan")}},
                {"steps": 1, "total": {"not_a_cost": 1.0}}):
        with pytest.raises(ValidationError, match="cost meter"):
            client.load_state({**good, "costs": bad})
    assert client.costs.steps == 5 and client.costs.total["enc_s"] == 1.5  # nothing loaded


def _applied_once_like(t: ChaosTransport, session: SplitSession, host: DataOwnerHost,
                       want: list[torch.Tensor]) -> None:
    """Four gradients applied once each (one of them answered from the data owner's record),
    weights within 1e-5 of the uninterrupted run's ``want``."""
    (pid,) = session.segment_ids().values()
    assert t.call("h", "status", segment=pid)["steps"] == 4
    audit = [e for e in host.audit_log() if e["op"] == "he_grad"]
    assert sum("answered from the record" in e["outcome"] for e in audit) == 1
    assert all(e["outcome"].startswith("ok") for e in audit)
    for got, w in zip(_weights(session, host), want, strict=True):
        assert torch.allclose(got, w, atol=1e-5), (got - w).abs().max()


def _fit(session: SplitSession, **kw: Any) -> Any:
    trainer = Trainer(session, batch_size=B, seed=0, progress=False, measure_leakage=False,
                      labels={"h": {"train": Y, "test": Y[:16]}})
    return trainer.fit(1, verbose=False, **kw)


@pytest.mark.parametrize("level, op, both", [
    ("A", "forward", False), ("A", "he_output", False), ("A", "he_grad", False),
    ("B", "forward", False), ("B", "he_grad", False), ("A", "he_grad", True),
    ("B", "he_grad", True)])
def test_model_owner_resumes_a_protected_run_from_its_checkpoint(tmp_path: Path, level: str,
                                                                  op: str, both: bool) -> None:
    """The model owner's process dies right after a data owner answered (a forward left
    pending there; or an encrypted gradient applied there, whose answer only the data owner's
    record still holds). A new process with other initial weights resumes from the checkpoint
    (level B: with its share W_s and velocity) and the journal of the step in flight: each
    step is applied once and the run ends where an uninterrupted one does (CKKS noise apart).
    ``both``: the data owner restarts too (fresh keys): the recorded answer, made under the old
    keys, is still read."""
    ref_host = _host(tmp_path / "ref")
    ref = _session(InProcessTransport([ref_host]), ref_host, level)
    _fit(ref)

    t = ChaosTransport(lambda _: _host(tmp_path / "h"), ["h"], {(op, 3): "model_owner"})
    session = _session(t, t.host("h"), level)
    crashed = 0
    while True:
        try:
            report = _fit(session, checkpoint_dir=tmp_path / "mo", resume=True)
            break
        except Crash:
            crashed += 1  # a new process: new session, other initial weights, no proposals
            if both:
                t.restart("h")
            plan, opt = _plan(level, seed=99)
            session = SplitSession(plan, t, optimizer=opt)
    host = t.host("h")
    assert crashed == 1 and report.extra["resumed"] == 1
    (pid,) = session.segment_ids().values()
    assert t.call("h", "status", segment=pid)["steps"] == 4  # each gradient applied once
    for got, want in zip(_weights(session, host), _weights(ref, ref_host), strict=True):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    if op == "he_grad":  # answered from the record, not run again
        audit = [e for e in host.audit_log() if e["op"] == "he_grad"]
        assert sum("answered from the record" in e["outcome"] for e in audit) == 1


@pytest.mark.parametrize("op", ["forward", "he_output", "he_grad"])
@pytest.mark.parametrize("mode", ["before", "after"])
def test_a_call_lost_to_a_restart_is_recovered(tmp_path: Path, op: str, mode: str) -> None:
    """The data owner restarts around one call of a step (before it arrives, or after it was
    applied with its answer lost): the encrypted forward is run again (a forward left pending
    is discarded), the gradient is sent again under its step id; every step applied once."""
    ref_host = _host(tmp_path / "ref")
    ref = _session(InProcessTransport([ref_host]), ref_host)
    for i in range(6):
        _step(ref, i)
    t = ChaosTransport(lambda _: _host(tmp_path / "h"), ["h"], {(op, 3): mode})
    session = _session(t, t.host("h"))
    for i in range(6):
        _step(session, i)
    assert t.restarts == 1 and not t.crashes  # the restart happened
    host = t.host("h")
    (pid,) = session.segment_ids().values()
    assert t.call("h", "status", segment=pid)["steps"] == 6
    for got, want in zip(_weights(session, host), _weights(ref, ref_host), strict=True):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()



def test_a_halt_on_a_refused_gradient_survives_a_crash(tmp_path: Path) -> None:
    """The data owner halts an encrypted segment whose decrypted dL/dx is out of bounds (the
    decryption happened: the step cannot be retried). The halt is on disk at once: after a
    crash the segment is still halted, and the halt is in audit.jsonl."""
    from he_layers import HEServer, ServerContext

    def start() -> DataOwnerHost:
        host = DataOwnerHost("h", state_dir=tmp_path / "h", limits=HostLimits(max_abs_value=50.0))
        host.add_dataset("train", X, Y)
        host.add_dataset("test", X[:16], Y[:16])
        host.restore_state()
        return host

    host = start()
    t = InProcessTransport([host])
    plan, opt = _plan("A")
    (pid,) = SplitSession(plan, t, optimizer=opt).propose()["h"]
    host.approve(pid)
    ctx = ServerContext.from_bytes(t.call("h", "he_context", segment=pid)["context"])
    server = HEServer(ctx, torch.randn(8, 16, dtype=torch.float64) * 0.3,
                      torch.zeros(8, dtype=torch.float64))
    msg = t.call("h", "forward", segment=pid, indices=torch.arange(B), step=1)["he_input"]
    z = server.receive_output(t.call("h", "he_output", segment=pid,
                                     msg=server.forward(msg))["msg"])
    with pytest.raises(ValidationError, match="bound 50"):  # dL/dx ~ 200 |W| > 50
        t.call("h", "he_grad", segment=pid, msg=server.backward(torch.full_like(z, 200.0)),
               step=2)
    assert host.proposal(pid).status == "halted"

    back = start()  # a crash: only the directory survives
    p = back.proposal(pid)
    assert p.status == "halted" and "invalid dL/dx" in p.reason
    lines = (tmp_path / "h" / "audit.jsonl").read_text().splitlines()
    assert [e["segment"] for e in map(json.loads, lines) if e["op"] == "halt"] == [pid]
    t.add_host(back, replace=True)
    with pytest.raises(ApprovalError, match="halted"):
        t.call("h", "forward", segment=pid, indices=torch.arange(B), step=3)
