"""Latency: the delay knob, and the two latency-tolerant schedules against local references.

Each schedule is an approximation of split learning; each is checked against a local
(single-process, unsplit) implementation of the SAME algorithm, within 1e-6, on the in-process
transport and through a transport with added delay (calls in flight, same numbers).
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from syft_split import OptimizerSpec, SplitPlan, SplitSession, Trainer
from syft_split.deploy import Deployment, inprocess
from syft_split.errors import (
    ApprovalError,
    AuthorizationError,
    ConfigError,
    ProtocolError,
    ShapeError,
    TransportError,
    ValidationError,
)
from syft_split.host import HostLimits
from syft_split.local_loss import LocalLoss
from syft_split.topology import RELEASED
from syft_split.transport.base import CallPolicy, Transport
from syft_split.transport.inprocess import InProcessTransport
from syft_split.transport.latency import DelayedTransport, submit_call

from .conftest import TEXT_REVIEW_S

N, B = 96, 16
OPT = OptimizerSpec("sgd", lr=0.05, momentum=0.9)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 1, 8, 8, generator=g), torch.randint(0, 10, (N,), generator=g)


def _models(seed: int = 0) -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(seed)
    bottom = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
    top = nn.Sequential(nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10))
    aux = nn.Linear(256, 10)
    return bottom, top, aux


def _sgd(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)


def _order(seed: int = 0, epochs: int = 1) -> list[torch.Tensor]:
    """The trainer's batch order for one data owner, over its first ``epochs`` epochs."""
    g = torch.Generator().manual_seed(seed)
    return [b for _ in range(epochs) for b in torch.randperm(N, generator=g).split(B)]


@pytest.fixture
def dep() -> Iterator[Deployment]:
    x, y = _data()
    d = inprocess({"h": {"train": (x, y), "test": (x[:32], y[:32])}},
                  limits=HostLimits(review_budget_s=TEXT_REVIEW_S))
    yield d
    d.close()


def _session(dep: Deployment, transport: Transport, *, local_loss: LocalLoss | None = None,
             labels: str = RELEASED) -> tuple[SplitSession, nn.Module, nn.Module]:
    bottom, top, _aux = _models()
    ref_bottom, ref_top = copy.deepcopy(bottom), copy.deepcopy(top)
    plan = SplitPlan.vanilla([bottom, top], "h", labels=labels, local_loss=local_loss)
    session = SplitSession(plan, transport, optimizer=OPT)
    options = {"local_loss": True} if local_loss is not None else {}
    dep.approve_all(session.propose(), **options)
    return session, ref_bottom, ref_top


# ---------------------------------------------------------------------- the delay knob
def test_delayed_transport_adds_the_delay_keeps_order_and_carries_calls_at_once(
        dep: Deployment) -> None:
    with pytest.raises(ConfigError, match="seconds"):
        DelayedTransport(dep.transport, -1)
    session, _, _ = _session(dep, dep.transport)
    pid = session.remote[("h", 0)].segment_id
    t = DelayedTransport(dep.transport, 0.2)
    t0 = time.perf_counter()
    t.call("h", "describe")
    assert time.perf_counter() - t0 >= 0.2
    t0 = time.perf_counter()
    futures = [submit_call(t, "h", "forward", segment=pid, indices=torch.arange(k), train=False)
               for k in range(1, 6)]
    shapes = [tuple(f.result()["activation"].shape) for f in futures]
    elapsed = time.perf_counter() - t0
    assert 0.2 <= elapsed < 0.8  # five calls one after the other would take >= 1.0 s
    assert shapes == [(k, 256) for k in range(1, 6)]
    host = dep.owners["h"]
    assert [e["shapes"]["indices"] for e in host.audit_log()[-5:]] == [[k] for k in range(1, 6)]
    with pytest.raises(ApprovalError, match="unknown"):
        submit_call(t, "h", "forward", segment="h/seg999", indices=torch.arange(2)).result()
    assert t.calls == 7 and len(t.traffic.records) == 14
    t.close()


# ------------------------------------------------------------------------- pipelined
def _reference_pipelined(bottom: nn.Module, top: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         batches: list[torch.Tensor]) -> None:
    """One epoch, locally: the forward of batch t+2 runs after the gradient of batch t, with
    the weights it used stashed (the gradient is exact for them, applied one step late)."""
    opt_b, opt_t = _sgd(bottom), _sgd(top)
    pending: deque[tuple[dict[str, torch.Tensor], torch.Tensor]] = deque()

    def forward(idx: torch.Tensor) -> torch.Tensor:
        params = {n: p.detach().clone().requires_grad_() for n, p in bottom.named_parameters()}
        out = torch.func.functional_call(bottom, params, (x[idx],))
        pending.append((params, out))
        return out.detach()

    def apply(grad: torch.Tensor) -> None:
        params, out = pending.popleft()
        out.backward(grad)
        for n, p in bottom.named_parameters():
            p.grad = params[n].grad
        opt_b.step()
        opt_b.zero_grad()

    acts = deque(forward(idx) for idx in batches[:2])
    for t, idx in enumerate(batches):
        a = acts.popleft().requires_grad_()
        opt_t.zero_grad()
        nn.functional.cross_entropy(top(a), y[idx]).backward()
        opt_t.step()
        assert a.grad is not None
        apply(a.grad)
        if t + 2 < len(batches):
            acts.append(forward(batches[t + 2]))


@pytest.mark.parametrize("delay", [0.0, 0.01])
def test_pipelined_training_equals_its_local_reference(dep: Deployment, delay: float) -> None:
    transport = DelayedTransport(dep.transport, delay) if delay else dep.transport
    session, ref_bottom, ref_top = _session(dep, transport)
    x, y = _data()
    trainer = Trainer(session, batch_size=B, progress=False, measure_leakage=False,
                      gradient_delay=1)
    m = trainer.train_epoch(1)
    assert m.count == N and trainer.report.steps == N // B
    _reference_pipelined(ref_bottom, ref_top, x, y, _order())
    pid = session.remote[("h", 0)].segment_id
    assert_close(dep.owners["h"].export_weights(pid), dict(ref_bottom.state_dict()),
                 rtol=1e-5, atol=1e-6)
    assert_close(dict(session.plan.nodes[1].module.state_dict()), dict(ref_top.state_dict()),
                 rtol=1e-5, atol=1e-6)
    forwards = [e for e in dep.owners["h"].audit_log() if e["op"] == "pipe_forward"]
    assert len(forwards) == N // B  # one data-owner entry per step
    assert trainer.evaluate()["accuracy"] >= 0.0  # evaluation after a pipelined epoch works


def test_pipelined_ops_hold_at_most_one_step_of_delay_and_refuse_cleanly(
        dep: Deployment) -> None:
    session, _, _ = _session(dep, dep.transport)
    t, pid = dep.transport, session.remote[("h", 0)].segment_id
    idx = torch.arange(8)
    t.call("h", "pipe_forward", segment=pid, seq=0, indices=idx)
    t.call("h", "pipe_forward", segment=pid, seq=1, indices=idx)
    before = dep.owners["h"].export_weights(pid)
    with pytest.raises(ProtocolError, match="delay bound is 1 step"):
        t.call("h", "pipe_forward", segment=pid, seq=2, indices=idx)
    with pytest.raises(ValidationError, match="seq"):
        t.call("h", "pipe_forward", segment=pid, seq=7, indices=idx, grad=torch.ones(8, 256))
    with pytest.raises(ShapeError):
        t.call("h", "pipe_forward", segment=pid, seq=2, indices=idx, grad=torch.ones(4, 256))
    with pytest.raises(ProtocolError, match="exact step pending"):
        t.call("h", "forward", segment=pid, indices=idx)  # an exact forward is allowed ...
        t.call("h", "pipe_forward", segment=pid, seq=2, indices=idx)  # ... but not mixed in
    t.call("h", "discard", segment=pid)
    assert_close(dep.owners["h"].export_weights(pid), before, rtol=0, atol=0)
    r = t.call("h", "pipe_forward", segment=pid, seq=2, indices=idx, grad=torch.ones(8, 256))
    assert r["pending"] == 2
    assert t.call("h", "pipe_discard", segment=pid)["discarded"] == 2
    with pytest.raises(ProtocolError, match="without a pending"):
        t.call("h", "pipe_backward", segment=pid, seq=0, grad=torch.ones(8, 256))


def test_pipelining_options_are_validated(dep: Deployment) -> None:
    session, _, _ = _session(dep, dep.transport)
    with pytest.raises(ConfigError, match="gradient_delay must be 0"):
        Trainer(session, gradient_delay=2)
    with pytest.raises(ConfigError, match="round_robin"):
        Trainer(session, gradient_delay=1, schedule="relay")
    u = SplitPlan.u_shaped([nn.Flatten(), nn.Linear(64, 16), nn.Linear(16, 10)], "h")
    with pytest.raises(ConfigError, match="no U-shape"):
        Trainer(SplitSession(u, dep.transport), gradient_delay=1)


# ------------------------------------------------------------------------ local loss
def _reference_local_loss(bottom: nn.Module, aux: nn.Module, top: nn.Module, x: torch.Tensor,
                          y: torch.Tensor, batches: list[torch.Tensor]) -> None:
    """One epoch, locally: bottom + auxiliary head step on the local loss; the top trains on
    the activation (computed before that step); nothing flows back into the bottom."""
    opt_b, opt_a, opt_t = _sgd(bottom), _sgd(aux), _sgd(top)
    for idx in batches:
        out = bottom(x[idx])
        opt_b.zero_grad()
        opt_a.zero_grad()
        nn.functional.cross_entropy(aux(out), y[idx]).backward()
        opt_b.step()
        opt_a.step()
        opt_t.zero_grad()
        nn.functional.cross_entropy(top(out.detach()), y[idx]).backward()
        opt_t.step()


@pytest.mark.parametrize("delay", [0.0, 0.01])
def test_local_loss_training_equals_its_local_reference(dep: Deployment, delay: float) -> None:
    transport = DelayedTransport(dep.transport, delay) if delay else dep.transport
    _, _, aux = _models()
    ref_aux = copy.deepcopy(aux)
    spec = LocalLoss(aux, batches_per_call=2, batches_ahead=3)
    x, y = _data()
    session, ref_bottom, ref_top = _session(dep, transport, local_loss=spec, labels="model_owner")
    trainer = Trainer(session, batch_size=B, progress=False, measure_leakage=False,
                      labels={"h": {"train": y, "test": y[:32]}})
    assert trainer.train_epoch(1).count == N
    _reference_local_loss(ref_bottom, ref_aux, ref_top, x, y, _order())
    pid = session.remote[("h", 0)].segment_id
    host = dep.owners["h"]
    assert_close(host.export_weights(pid), dict(ref_bottom.state_dict()), rtol=1e-5, atol=1e-6)
    head = host.families["local_loss"].heads[pid].module  # type: ignore[attr-defined]
    assert_close(list(head.state_dict().values()), list(ref_aux.state_dict().values()),
                 rtol=1e-5, atol=1e-6)  # the head travels as a spec: Sequential(Linear)
    assert_close(dict(session.plan.nodes[1].module.state_dict()), dict(ref_top.state_dict()),
                 rtol=1e-5, atol=1e-6)
    calls = [e for e in host.audit_log() if e["op"] == "local_forward"]
    assert [c["shapes"]["indices"] for c in calls] == [[16], [32], [32], [16]]  # 1, 2, 2, 1
    assert not any(e["op"] in ("backward", "forward") for e in host.audit_log())  # no gradient
    assert 0.0 <= trainer.evaluate()["accuracy"] <= 1.0


def test_local_loss_streams_across_epochs_in_fit_and_still_equals_the_reference(
        dep: Deployment) -> None:
    _, _, aux = _models()
    ref_aux = copy.deepcopy(aux)
    x, y = _data()
    session, ref_bottom, ref_top = _session(dep, DelayedTransport(dep.transport, 0.01),
                                            local_loss=LocalLoss(aux, batches_per_call=4))
    trainer = Trainer(session, batch_size=B, progress=False, measure_leakage=False)
    report = trainer.fit(3, verbose=False)
    assert report.steps == 3 * N // B
    host = dep.owners["h"]
    calls = [e for e in host.audit_log() if e["op"] in ("local_forward", "forward")]
    # epoch 2's first call left before epoch 1's evaluation (a forward without training)
    first_eval = next(i for i, c in enumerate(calls) if c["op"] == "forward")
    assert sum(c["shapes"]["indices"][0] for c in calls[:first_eval]) > N
    _reference_local_loss(ref_bottom, ref_aux, ref_top, x, y, _order(epochs=3))
    pid = session.remote[("h", 0)].segment_id
    assert_close(host.export_weights(pid), dict(ref_bottom.state_dict()), rtol=1e-5, atol=1e-6)
    assert_close(dict(session.plan.nodes[1].module.state_dict()), dict(ref_top.state_dict()),
                 rtol=1e-5, atol=1e-6)


def test_local_loss_is_reviewed_and_needs_explicit_approval(dep: Deployment) -> None:
    bottom, top, aux = _models()
    plan = SplitPlan.vanilla([bottom, top], "h", labels=RELEASED, local_loss=LocalLoss(aux))
    session = SplitSession(plan, dep.transport, optimizer=OPT)
    [pid] = session.propose()["h"]
    host = dep.owners["h"]
    text = host.review(pid)
    assert "LOCAL LOSS" in text and "Linear(in_features=256, out_features=10" in text
    assert "approve with local_loss=True" in text
    with pytest.raises(ConfigError, match="local_loss=True"):
        host.approve(pid)
    assert host.proposals("pending")[0].id == pid
    intruder = InProcessTransport([host], user="intruder@example.org")  # type: ignore[list-item]
    with pytest.raises(AuthorizationError, match="did not propose"):
        LocalLoss(aux).attach(intruder, "h", pid, OPT)
    host.approve(pid, local_loss=True)
    with pytest.raises(ApprovalError, match="pending proposal only"):
        LocalLoss(aux).attach(dep.transport, "h", pid, OPT)
    plain = SplitSession(SplitPlan.vanilla(list(_models()[:2]), "h"), dep.transport)
    [other] = plain.propose()["h"]
    with pytest.raises(ConfigError, match="no auxiliary head"):
        host.approve(other, local_loss=True)


def test_local_forward_refuses_bad_requests_and_changes_nothing(dep: Deployment) -> None:
    _, _, aux = _models()
    session, _, _ = _session(dep, dep.transport, local_loss=LocalLoss(aux))
    t, pid = dep.transport, session.remote[("h", 0)].segment_id
    host = dep.owners["h"]
    before = host.export_weights(pid)
    bad = [
        (ShapeError, {"indices": torch.arange(10), "sizes": [4, 4]}),
        (ValidationError, {"indices": torch.arange(65), "sizes": [1] * 65}),
        (ValidationError, {"indices": torch.arange(10), "sizes": [0, 10]}),
        (ValidationError, {"indices": torch.tensor([0, 96]), "sizes": [2]}),
    ]
    for error, fields in bad:
        with pytest.raises(error):
            t.call("h", "local_forward", segment=pid, **fields)
    assert_close(host.export_weights(pid), before, rtol=0, atol=0)
    plain = SplitSession(SplitPlan.vanilla(list(_models()[:2]), "h"), dep.transport)
    dep.approve_all(plain.propose())
    with pytest.raises(ProtocolError, match="not approved with a local loss"):
        t.call("h", "local_forward", segment=plain.remote[("h", 0)].segment_id,
               indices=torch.arange(4), sizes=[4])
    r = t.call("h", "local_forward", segment=pid, indices=torch.arange(8), sizes=[4, 4])
    assert tuple(r["activation"].shape) == (8, 256) and "labels" in r  # released labels


def test_local_loss_plans_are_validated() -> None:
    bottom, top, aux = _models()
    with pytest.raises(ConfigError, match="no U-shape"):
        SplitPlan.u_shaped([bottom, top, nn.Linear(10, 10)], "h", local_loss=LocalLoss(aux))
    with pytest.raises(ConfigError, match="batches_per_call"):
        SplitPlan.vanilla([bottom, top], "h", local_loss=LocalLoss(aux, batches_per_call=0))


@pytest.mark.parametrize("schedule", ["gradient_delay", "local_loss"])
def test_latency_tolerant_schedules_book_flops_and_memory(dep: Deployment, schedule: str) -> None:
    """Every applied step is in the ledger: with gradient_delay=1 the same FLOPs as exact
    steps; with local losses the data owner also trains its head, and the model owner computes
    no gradient for the cut activation (none goes back); the head with its own optimizer
    (Adam), the segment with the one it was proposed with."""
    from syft_split.ledger import step_cost

    bottom, top, aux = _models()
    local = schedule == "local_loss"
    adam = OptimizerSpec("adam", lr=1e-3)
    session, _, _ = _session(dep, dep.transport, local_loss=LocalLoss(
        aux, batches_per_call=2, optimizer=adam) if local else None)
    trainer = Trainer(session, batch_size=B, progress=False, measure_leakage=False, watch=False,
                      test_dataset=None, gradient_delay=0 if local else 1)
    report = trainer.fit(1, verbose=False)
    steps = N // B
    seg = step_cost(bottom, (1, 8, 8), B, optimizer=OPT)
    head = step_cost(aux, (256,), B, input_grad=True, optimizer=adam)
    mo = step_cost(top, (256,), B, input_grad=not local, optimizer=OPT)
    want_h = {"forward": steps * (seg.forward + local * head.forward),
              "backward": steps * (seg.backward + local * head.backward), "eval": 0}
    want_mo = {"forward": steps * mo.forward, "backward": steps * mo.backward, "eval": 0}
    assert report.flops_by_party == {"h": want_h, "model_owner": want_mo}
    assert report.peak_memory_by_party == {
        "h": seg.peak_bytes + local * head.peak_bytes, "model_owner": mo.peak_bytes}


def test_a_failed_pipelined_epoch_raises_its_error_and_the_next_starts_clean() -> None:
    """A data owner drops out mid-epoch and stays unreachable during the cleanup: the error
    raised is the original one (the failed cleanup noted on it), the other data owner's
    pending forwards are dropped all the same, and the next epoch runs from a clean start."""
    x, y = _data()
    dep = inprocess({p: {"train": (x, y), "test": (x[:32], y[:32])} for p in ("b", "a")})
    transport = dep.transport
    assert isinstance(transport, InProcessTransport)
    down, calls = [False], [0]
    request = transport.request

    def flaky(party: str, data: bytes) -> bytes:
        if party == "b":
            calls[0] += 1
            if down[0] or calls[0] == 8:
                down[0] = True
                raise TransportError("b: connection refused")
        return request(party, data)

    transport.request = flaky  # type: ignore[method-assign]
    transport.policy = CallPolicy(timeout=10, retries=0)
    bottom, top, _ = _models()
    session = SplitSession(SplitPlan.vanilla([bottom, top], ["b", "a"], labels=RELEASED),
                           transport, optimizer=OPT)
    dep.approve_all(session.propose())
    trainer = Trainer(session, batch_size=B, progress=False, measure_leakage=False,
                      watch=False, gradient_delay=1)
    try:
        with pytest.raises(TransportError, match="connection refused") as err:
            trainer.train_epoch(1)
        assert any("pipe_discard at b failed too" in n for n in err.value.__notes__)
        a = session.remote[("a", 0)].segment_id
        assert transport.call("a", "pipe_discard", segment=a)["discarded"] == 0
        down[0] = False  # b is back: its forwards are still pending there
        assert trainer.train_epoch(2).count == 2 * N
    finally:
        dep.close()


def test_a_dropped_transport_leaves_no_fallback_worker_behind() -> None:
    """submit_call's worker threads (one per transport and party) kept the last job, hence
    the transport, alive forever; a transport closed and dropped now takes them with it."""
    import gc
    import threading
    import weakref

    parties = ("leakcheck1", "leakcheck2")

    def workers() -> int:
        return sum(t.name in {f"syft-split-calls-{p}" for p in parties} and t.is_alive()
                   for t in threading.enumerate())

    x, y = _data()
    d = inprocess({p: {"train": (x, y), "test": (x[:8], y[:8])} for p in parties})
    for p in parties:
        assert "datasets" in submit_call(d.transport, p, "describe").result(timeout=30)
    assert workers() == 2
    ref = weakref.ref(d.transport)
    d.close()
    del d
    gc.collect()
    assert ref() is None
    deadline = time.monotonic() + 5
    while workers() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert workers() == 0


def test_closing_a_delayed_transport_fails_the_calls_in_flight(dep: Deployment) -> None:
    transport = DelayedTransport(dep.transport, 0.4)
    fut = submit_call(transport, "h", "describe")
    transport.close()
    with pytest.raises(TransportError, match="closed with the call in flight"):
        fut.result(timeout=5)
    # a call through Transport.call (retried when safe) is not sent again after the close
    transport = DelayedTransport(dep.transport, 0.4)
    transport.policy = CallPolicy(retries=3, backoff=0.0)
    answer: list[object] = []
    worker = threading.Thread(target=lambda: answer.append(_outcome(transport)))
    worker.start()
    time.sleep(0.1)
    transport.close()
    worker.join(5)
    assert isinstance(answer[0], TransportError)
    assert isinstance(_outcome(transport), TransportError)  # and none after it
    assert transport.retries <= 1


def _outcome(transport: Transport) -> object:
    try:
        return transport.call("h", "describe")
    except TransportError as exc:
        return exc


def test_the_local_loss_ledger_books_each_module_with_its_own_optimizer(dep: Deployment) -> None:
    """The data owner trains its segment with the optimizer it was proposed with (here SGD
    with momentum) and the head with LocalLoss.optimizer (Adam): the ledger took Adam for
    both, overstating the segment's optimizer state."""
    from syft_split.ledger import CostLedger, step_cost

    torch.manual_seed(0)
    bottom = nn.Sequential(nn.Flatten(), nn.Linear(64, 256))
    top, aux = nn.Linear(256, 10), nn.Linear(256, 10)
    adam = OptimizerSpec("adam", lr=1e-3)
    plan = SplitPlan.vanilla([bottom, top], "h", labels=RELEASED,
                             local_loss=LocalLoss(aux, optimizer=adam))
    session = SplitSession(plan, dep.transport, optimizer=OPT)
    ledger = CostLedger()
    ledger.session_step(session, "h", B, local_loss=True)
    want = (step_cost(bottom, (1, 8, 8), B, optimizer=OPT).peak_bytes
            + step_cost(aux, (256,), B, input_grad=True, optimizer=adam).peak_bytes)
    assert (step_cost(bottom, (1, 8, 8), B, optimizer=adam).peak_bytes
            != step_cost(bottom, (1, 8, 8), B, optimizer=OPT).peak_bytes)  # they differ here
    assert ledger.peak_memory_by_party()["h"] == want
