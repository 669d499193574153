"""Concurrent SplitFed rounds: same weights as one data owner after the other, data owners of
unequal size, bounded concurrency, failures and stalls reported by name, thread-safe transports,
and the model owner's segments on another device."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from syft_split import ConfigError, OptimizerSpec, SplitPlan, SplitSession, Trainer, TransportError
from syft_split.deploy import inprocess
from syft_split.rounds import run_each
from syft_split.transport.base import Transport, TransportWrapper

SIZES = {"a": 20, "b": 9, "c": 13}  # unequal: b and c run out of batches before a


def _data(sizes: dict[str, int] = SIZES, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {p: (torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
            for p, n in sizes.items()}


def _model(bn: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4) if bn else nn.Identity(),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def _run(schedule: str, opt: OptimizerSpec, max_workers: int | None, *, bn: bool = False,
         transport_wrap=None, deadline: float | None = None, epochs: int = 2, dep_factory=inprocess):
    data = _data()
    dep = dep_factory({p: {"train": d} for p, d in data.items()})
    transport = transport_wrap(dep.transport) if transport_wrap else dep.transport
    model = _model(bn)
    plan = SplitPlan.vanilla([copy.deepcopy(model[:4]), copy.deepcopy(model[4:])], list(data),
                             share_weights="peer", datasets=["train"])
    session = SplitSession(plan, transport, optimizer=opt)
    dep.approve_all(session.propose())
    dep.trust_each_other()  # averaging is secure aggregation among the data owners
    trainer = Trainer(session, batch_size=8, progress=False, schedule=schedule, test_dataset=None,
                      labels={p: {"train": d[1]} for p, d in data.items()}, measure_leakage=False,
                      max_workers=max_workers, party_deadline_s=deadline)
    report = trainer.fit(epochs, verbose=False)
    owners = {p: dep.owners[p].export_weights(session.remote[(p, 0)].segment_id) for p in data}
    return owners, copy.deepcopy(session.local[1].state_dict()), report, trainer, dep


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("schedule", ["splitfed_v1", "splitfed_v2"])
@pytest.mark.parametrize("opt", [OptimizerSpec("sgd", lr=0.1, momentum=0.9),
                                 OptimizerSpec("adam", lr=1e-2)], ids=["sgd_momentum", "adam"])
def test_concurrent_rounds_equal_sequential(schedule, opt) -> None:
    seq_owners, seq_mo, seq_report, seq_tr, _ = _run(schedule, opt, 1, bn=True)
    con_owners, con_mo, con_report, con_tr, _ = _run(schedule, opt, 3, bn=True)
    assert seq_tr._rounds is None and con_tr._rounds is not None  # two different code paths
    for p in SIZES:
        assert _max_diff(seq_owners[p], con_owners[p]) <= 1e-6
    assert _max_diff(seq_mo, con_mo) <= 1e-6
    assert seq_report.steps == con_report.steps == 2 * sum(-(-n // 8) for n in SIZES.values())
    # the same messages (sizes equal up to the JSON digits of floats such as a batch's loss)
    for party, seq_bytes in seq_report.bytes_by_party.items():
        for way, n in seq_bytes.items():
            assert abs(con_report.bytes_by_party[party][way] - n) <= 1e-3 * n
    assert seq_report.flops_by_party == con_report.flops_by_party
    rounds = max(-(-n // 8) for n in SIZES.values())
    assert len(con_report.epochs[0].round_seconds) == rounds and not con_report.party_failures


@pytest.mark.parametrize("max_workers", [1, 2])
def test_unequal_sizes_v1_equals_large_batch_sgd_on_each_round(max_workers) -> None:
    """SplitFed v1 with plain SGD: each round equals one SGD step of the unsplit model on the
    union of the round's batches; a data owner without a batch counts with weight 0 and then
    holds the averaged client model like everybody else (this used to raise KeyError)."""
    sgd = OptimizerSpec("sgd", lr=0.1)
    owners, mo, *_ = _run("splitfed_v1", sgd, max_workers, epochs=1)
    data = _data()
    reference = _model()
    ref_opt = sgd.build(reference.parameters())
    gen = torch.Generator().manual_seed(0)  # the trainer's batch order (seed=0)
    perms = {p: torch.randperm(n, generator=gen).split(8) for p, n in SIZES.items()}
    for k in range(max(len(v) for v in perms.values())):
        xs = torch.cat([data[p][0][perms[p][k]] for p in SIZES if k < len(perms[p])])
        ys = torch.cat([data[p][1][perms[p][k]] for p in SIZES if k < len(perms[p])])
        ref_opt.zero_grad()
        F.cross_entropy(reference(xs), ys).backward()
        ref_opt.step()
    want = reference.state_dict()
    head = {k: want[k] for k in want if int(k.split(".")[0]) < 4}
    for p in SIZES:  # every client copy, including those that sat the last rounds out
        assert _max_diff({k: v for k, v in owners[p].items()},
                         {k: v for k, v in zip(owners[p], head.values())}) <= 1e-6
    tail = {k: want[k] for k in want if int(k.split(".")[0]) >= 4}
    assert max(float((x - y).abs().max()) for x, y in zip(mo.values(), tail.values())) <= 1e-6


class _Flaky(TransportWrapper):
    """Wraps a transport: party ``bad`` fails (or stalls until released) from its ``after``-th
    call on; every other call passes through."""

    def __init__(self, inner: Transport, bad: str, after: int, stall: bool = False) -> None:
        super().__init__(inner)
        self.bad, self.after, self.stall = bad, after, stall
        self.seen = 0
        self.release = threading.Event()

    def request(self, party: str, data: bytes) -> bytes:
        if party == self.bad:
            self.seen += 1
            if self.seen > self.after:
                if not self.stall:
                    raise TransportError(f"{party} is down")
                self.release.wait(30)
        return self.inner.request(party, data)


@pytest.mark.parametrize("stall", [False, True], ids=["dead", "stalled"])
def test_a_failing_party_is_named_and_the_others_keep_training(stall) -> None:
    made: list[_Flaky] = []

    def wrap(t: Transport) -> _Flaky:
        made.append(_Flaky(t, "c", after=8, stall=stall))  # within the rounds
        return made[0]

    t0 = time.perf_counter()
    owners, _, report, trainer, _ = _run("splitfed_v1", OptimizerSpec("sgd", lr=0.1), 3,
                                         transport_wrap=wrap, deadline=0.5 if stall else None)
    elapsed = time.perf_counter() - t0
    made[0].release.set()
    assert [f["party"] for f in report.party_failures] == ["c"]
    failure = report.party_failures[0]
    assert failure["error"].startswith("TransportError") and failure["phase"] in (
        "forward", "backward", "aggregate")
    if stall:
        assert "did not answer within 0.5 s" in failure["error"]
        assert elapsed < 15  # a stalled party cost one deadline, not the run
    # the others trained every batch of both epochs; a and b hold the same averaged model
    steps_ab = 2 * sum(-(-SIZES[p] // 8) for p in ("a", "b"))
    assert report.steps >= steps_ab and trainer._rounds.dropped.keys() == {"c"}
    assert _max_diff(owners["a"], owners["b"]) == 0.0
    assert _max_diff(owners["a"], owners["c"]) > 0  # c stopped at its last completed round


def test_run_each_bounds_calls_in_flight_and_reports_errors_by_key() -> None:
    lock, live, peak = threading.Lock(), [0], [0]

    def fn(key: str) -> str:
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.02)
        with lock:
            live[0] -= 1
        if key == "k3":
            raise ValueError("boom")
        return key.upper()

    results, errors = run_each([f"k{i}" for i in range(10)], fn, max_workers=3)
    assert peak[0] == 3
    assert results == {f"k{i}": f"K{i}" for i in range(10) if i != 3}
    assert list(errors) == ["k3"] and isinstance(errors["k3"], ValueError)
    with pytest.raises(ConfigError, match="max_workers"):
        run_each(["a"], fn, max_workers=0)


def test_run_each_deadline_does_not_wait_for_a_stalled_key() -> None:
    gate = threading.Event()

    def fn(key: str) -> str:
        if key == "slow":
            gate.wait(30)
        return key

    t0 = time.perf_counter()
    results, errors = run_each(["slow", "x", "y", "z"], fn, max_workers=1, deadline_s=0.3)
    assert time.perf_counter() - t0 < 5
    gate.set()
    assert results == {"x": "x", "y": "y", "z": "z"}
    assert "slow did not answer within 0.3 s" in str(errors["slow"])


def test_transport_counts_concurrent_calls_exactly() -> None:
    data = _data({f"p{i}": 4 for i in range(6)})
    dep = inprocess({p: {"train": d} for p, d in data.items()})
    t = dep.transport
    _, errors = run_each([f"p{i}" for i in range(6)],
                         lambda p: [t.call(p, "describe") for _ in range(20)], max_workers=6)
    assert not errors and t.calls == 120
    assert len(t.traffic.records) == 240
    by_party = t.traffic.bytes_by_party()
    assert sum(v["sent"] for k, v in by_party.items() if k != "model_owner") == \
        by_party["model_owner"]["received"]


def test_plans_that_cannot_run_concurrently_fall_back_or_refuse() -> None:
    data = _data({"a": 8, "b": 8})
    dep = inprocess({p: {"train": d} for p, d in data.items()})
    model = _model()
    plan = SplitPlan.u_shaped([model[:4], model[4:7], model[7:]], ["a", "b"],
                              share_weights="peer", datasets=["train"])
    session = SplitSession(plan, dep.transport)
    kw = dict(schedule="splitfed_v1", test_dataset=None, progress=False, measure_leakage=False)
    assert Trainer(session, **kw)._rounds is None  # default: sequential for this plan
    with pytest.raises(ConfigError, match="U-shaped"):
        Trainer(session, max_workers=4, **kw)


def test_session_to_device_keeps_training_identical() -> None:
    """``session.to(device)`` moves the model owner's segments and optimizer state; on the
    CPU the run is unchanged (CUDA is checked when a GPU is present)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    finals = []
    for device in devices:
        data = _data({"a": 16, "b": 16})
        dep = inprocess({p: {"train": d} for p, d in data.items()})
        model = _model()
        plan = SplitPlan.vanilla([model[:4], model[4:]], ["a", "b"], datasets=["train"])
        session = SplitSession(plan, dep.transport, optimizer=OptimizerSpec("adam", lr=1e-2))
        dep.approve_all(session.propose())
        assert session.to(device) is session and session.device.type == device
        assert next(session.local[1].parameters()).device.type == device
        Trainer(session, batch_size=8, progress=False, test_dataset=None, measure_leakage=False,
                labels={p: {"train": d[1]} for p, d in data.items()}).fit(1, verbose=False)
        state = session.optimizers[0].state
        assert all(v.device.type == device for s in state.values() for k, v in s.items()
                   if isinstance(v, torch.Tensor) and k != "step")
        finals.append({k: v.cpu() for k, v in session.local[1].state_dict().items()})
    assert all(_max_diff(finals[0], f) <= 1e-5 for f in finals[1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_session_to_cuda_matches_cpu_reference() -> None:  # pragma: no cover - no GPU in CI
    test_session_to_device_keeps_training_identical()
