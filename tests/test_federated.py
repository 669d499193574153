"""Federated baselines on the same host, guard and ledger: FedAvg equals local SGD (one client)
and the weighted average of local runs (several); synchronous SGD equals large-batch SGD on
the union; the review says the model's weights leave; only declared values leave."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from syft_split import (
    AuthorizationError,
    EgressError,
    HostLimits,
    OptimizerSpec,
    ProtocolError,
    ShapeError,
    SplitPlan,
    SplitSession,
)
from syft_split.deploy import inprocess
from syft_split.federated import FederatedTrainer
from syft_split.models import digits_cnn
from syft_split.spec import module_to_spec, spec_state

SGD = OptimizerSpec("sgd", lr=0.1)
SIZES = {"a": 40, "b": 24}


def _data(sizes=SIZES):
    g = torch.Generator().manual_seed(0)
    return {p: (torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
            for p, n in sizes.items()}


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64, 10))


def _local_sgd(model, x, y, *, epochs: int, batch: int, seed: int, opt=SGD):
    m = copy.deepcopy(model)
    optim = opt.build(m.parameters())
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch):
            optim.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
            optim.step()
    return list(m.state_dict().values())


def _diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _trainer(dep, parties, **kw) -> FederatedTrainer:
    fl = FederatedTrainer(_model(), dep.transport, parties, **kw)
    dep.approve_all(fl.propose())
    return fl


def test_fedavg_one_client_one_epoch_equals_local_sgd() -> None:
    data = _data({"a": 40})
    dep = inprocess({"a": {"train": data["a"], "test": data["a"]}})
    fl = _trainer(dep, ["a"], optimizer=SGD, batch_size=8, seed=5)
    fl.fit(1)
    want = _local_sgd(_model(), *data["a"], epochs=1, batch=8, seed=5)
    assert _diff(fl.state_dict().values(), want) <= 1e-6


def test_fedavg_clients_equal_the_weighted_average_of_local_runs() -> None:
    data = _data()  # (over HTTP datasites: tests/pysyft/test_concurrent.py)
    dep = inprocess({p: {"train": d, "test": d} for p, d in data.items()})
    fl = _trainer(dep, list(data), optimizer=SGD, batch_size=8, local_epochs=2)
    report = fl.fit(2)
    model = _model()
    for r in range(2):  # round r shuffles with seed + r at every data owner
        runs = {p: _local_sgd(model, *data[p], epochs=2, batch=8, seed=r) for p in data}
        avg = [(40 * a + 24 * b) / 64 for a, b in zip(runs["a"], runs["b"])]
        model.load_state_dict(dict(zip(model.state_dict(), avg)))
    assert _diff(fl.state_dict().values(), model.state_dict().values()) <= 1e-6
    # per party: forward+backward of the whole model on every local batch (40 = 5x8, 24 = 3x8)
    for p, n in SIZES.items():
        steps = 2 * 2 * (n // 8)
        assert report.flops_by_party[p]["forward"] == steps * fl.ledger.cost(
            fl.module, (1, 8, 8), 8, input_grad=False, optimizer=SGD).forward
    # what each data owner sent: the weights after local training and scalars, nothing else
    for p in data:
        sent = dep.transport.traffic.fields_sent_by(p)
        assert {f for f in sent if not f.startswith("state/")} <= {
            "host", "datasets", "segment", "status", "output_shape", "records", "steps",
            "loss_sum", "correct", "count"}


def test_sync_sgd_equals_large_batch_sgd_on_the_union() -> None:
    data = _data()
    dep = inprocess({p: {"train": d, "test": d} for p, d in data.items()})
    adam = OptimizerSpec("adam", lr=1e-2)
    fl = _trainer(dep, list(data), algorithm="sync_sgd", optimizer=adam, batch_size=8, seed=3)
    report = fl.fit(1)
    ref = _model()
    opt = adam.build(ref.parameters())
    gen = torch.Generator().manual_seed(3)
    perms = {p: torch.randperm(n, generator=gen).split(8) for p, n in SIZES.items()}
    for k in range(max(len(v) for v in perms.values())):
        xs = torch.cat([data[p][0][perms[p][k]] for p in perms if k < len(perms[p])])
        ys = torch.cat([data[p][1][perms[p][k]] for p in perms if k < len(perms[p])])
        opt.zero_grad()
        F.cross_entropy(ref(xs), ys).backward()
        opt.step()
    assert _diff(fl.state_dict().values(), ref.state_dict().values()) <= 1e-6
    assert report.steps == 5 and report.epochs[0].test_accuracy is not None


def test_fedavg_learns_digits() -> None:
    from syft_split.datasets import digits_parties

    parts = digits_parties(2, seed=0)
    dep = inprocess({p: {"train": (d.x_train, d.y_train), "test": (d.x_test, d.y_test)}
                     for p, d in zip("ab", parts)})
    torch.manual_seed(0)
    fl = FederatedTrainer(digits_cnn(8, 32), dep.transport, ["a", "b"], batch_size=32,
                          local_epochs=2, optimizer=OptimizerSpec("adam", lr=1e-2))
    dep.approve_all(fl.propose())
    report = fl.fit(3)
    assert report.final_test_accuracy is not None and report.final_test_accuracy >= 0.9


def test_review_says_the_weights_leave_and_the_guard_holds() -> None:
    data = _data()
    dep = inprocess({p: {"train": d, "test": d} for p, d in data.items()})
    fl = FederatedTrainer(_model(), dep.transport, ["a", "b"], optimizer=SGD)
    ids = fl.propose()
    review = dep.owners["a"].review(ids["a"][0])
    assert "WEIGHTS LEAVE AFTER LOCAL TRAINING" in review and "690 parameters" in review
    t = dep.transport
    seg = ids["a"][0]
    state = {f"state/{k}": v for k, v in fl.module.state_dict().items()}
    with pytest.raises(Exception, match="pending"):  # not approved yet: nothing runs
        t.call("a", "fl_train", segment=seg, **state)
    dep.approve_all(ids)
    host = dep.owners["a"]
    before = host.export_weights(seg)
    bad = dict(state, **{"state/4.weight": torch.zeros(10, 63)})
    with pytest.raises(ShapeError):
        t.call("a", "fl_train", segment=seg, **bad)
    assert all(torch.equal(before[k], v) for k, v in host.export_weights(seg).items())
    # a split segment's ops do not run on a whole local model, and vice versa
    with pytest.raises(ProtocolError, match="role 'local'"):
        t.call("a", "forward", segment=seg, indices=torch.arange(4))
    plan = SplitPlan.vanilla([_model()[:4], _model()[4:]], ["a"], datasets=["train"])
    session = SplitSession(plan, t)
    split_ids = session.propose()
    dep.approve_all(split_ids)
    with pytest.raises(ProtocolError, match="role 'input'"):
        t.call("a", "fl_train", segment=split_ids["a"][0], **state)
    # another user cannot drive the approved model
    from syft_split import InProcessTransport

    intruder = InProcessTransport([host], user="intruder@example.org")  # type: ignore[list-item]
    with pytest.raises(AuthorizationError):
        intruder.call("a", "fl_train", segment=seg, **state)
    # egress: only the approved model's weights leave, checked by the guard's rule
    from syft_split.errors import EgressError
    from syft_split.host.federated import LOCAL_WEIGHTS
    from syft_split.host.guard import Call

    call = Call("m", "fl_train", {}, rt=host.runtimes[seg])
    LOCAL_WEIGHTS("state/4.bias", torch.zeros(10), call, host.guard)
    for name, value in (("state/4.bias", torch.zeros(11)), ("state/extra", torch.zeros(10)),
                        ("state/4.bias", torch.full((10,), float("nan")))):
        with pytest.raises(EgressError):
            LOCAL_WEIGHTS(name, value, call, host.guard)


def test_the_record_rate_cap_holds_for_federated_ops_too() -> None:
    """``max_records_per_minute`` counts the records behind whatever leaves: a split forward's
    activations, a federated gradient (its batch) and locally trained weights (every record)."""
    data = _data()
    dep = inprocess({p: {"train": d, "test": d} for p, d in data.items()},
                    limits=HostLimits(max_records_per_minute=60))
    fl = FederatedTrainer(_model(), dep.transport, ["a"], optimizer=SGD)
    (seg,) = fl.propose()["a"]
    dep.owners["a"].approve(seg)
    t = dep.transport
    state = {f"state/{k}": v for k, v in fl.module.state_dict().items()}
    assert t.call("a", "fl_train", segment=seg, **state)["records"] == 40  # 40 of 60
    t.call("a", "fl_gradient", segment=seg, indices=torch.arange(16), **state)  # 56 of 60
    with pytest.raises(EgressError, match="would release 64 records in a minute"):
        t.call("a", "fl_gradient", segment=seg, indices=torch.arange(8), **state)
    with pytest.raises(EgressError, match="would release 96 records"):
        t.call("a", "fl_train", segment=seg, **state)
    t.call("a", "fl_gradient", segment=seg, indices=torch.arange(4), **state)  # 60: at the cap
    # split learning's forward on the same host is capped the same way (its own segment)
    plan = SplitPlan.vanilla([copy.deepcopy(_model()[:4]), copy.deepcopy(_model()[4:])], ["a"],
                             datasets=["train"])
    session = SplitSession(plan, t)
    dep.approve_all(session.propose())
    split = session.remote[("a", 0)].segment_id
    t.call("a", "forward", segment=split, indices=torch.arange(40), dataset="train", train=False)
    with pytest.raises(EgressError, match="would release 80 records"):
        t.call("a", "forward", segment=split, indices=torch.arange(40), dataset="train",
               train=False)


def test_a_restarted_host_never_hands_out_an_id_in_use(tmp_path) -> None:
    """Ids of every kind (``seg<n>``, ``fl<n>``) share one counter that goes on after a
    restart: another user's proposal after a restart never gets (and replaces) the id of an
    approved federated model, and a colliding id is refused."""
    from syft_split import DataOwnerHost, InProcessTransport
    from syft_split.host.records import Proposal

    x, y = _data()["a"]

    def start() -> DataOwnerHost:
        host = DataOwnerHost("a", state_dir=tmp_path / "a")
        host.add_dataset("train", x, y)
        host.restore_state()
        return host

    def fl_propose(t) -> str:
        return t.call("a", "fl_propose", spec=module_to_spec(_model()), datasets=["train"],
                      optimizer={"name": "sgd", "lr": 0.1}, loss="cross_entropy",
                      **state)["segment"]

    state = {f"state/{k}": v for k, v in spec_state(_model()).items()}
    host = start()
    alice = InProcessTransport([host], user="alice@example.org")
    plan = SplitPlan.vanilla([_model()[:4], _model()[4:]], ["a"], datasets=["train"])
    (seg,) = SplitSession(plan, alice).propose()["a"]
    fl = fl_propose(alice)
    assert (seg, fl) == ("a/seg1", "a/fl2")
    host.approve(fl)
    host.close()

    back = start()
    mallory = InProcessTransport([back], user="mallory@example.org")
    new = fl_propose(mallory)
    assert new not in (seg, fl)
    p = back.proposal(fl)
    assert (p.status, p.driver) == ("approved", "alice@example.org")
    alice = InProcessTransport([back], user="alice@example.org")
    out = alice.call("a", "fl_evaluate", segment=fl, **state)
    assert out["count"] == len(y)
    with pytest.raises(ProtocolError, match="already in use"):
        back.add_proposal(Proposal(id=fl, driver="mallory@example.org", role="local",
                                   spec={}, state={}, optimizer=SGD, datasets=["train"],
                                   input_shape=(1, 8, 8), output_shape=(10,), max_batch=8))
    assert back.proposal(fl).driver == "alice@example.org"


def test_the_report_counts_this_runs_bytes_not_the_setup_or_an_earlier_run() -> None:
    from syft_split.transport.base import MODEL_OWNER

    data = _data()
    dep = inprocess({p: {"train": d, "test": d} for p, d in data.items()})
    reports = []
    for _ in range(2):  # two identical runs on one deployment
        fl = _trainer(dep, list(data), optimizer=SGD, batch_size=8, seed=5)
        start = len(dep.transport.traffic.snapshot())  # after fl_propose
        reports.append(fl.fit(1))
    one, two = reports
    assert two.bytes_by_party == one.bytes_by_party and two.transport_calls == one.transport_calls
    ours = dep.transport.traffic.snapshot()[start:]
    assert "fl_propose" not in {r.op for r in ours} and "fl_propose" not in two.bytes_by_op
    for party in data:
        assert two.bytes_by_party[party]["sent"] == sum(r.nbytes for r in ours if r.src == party)
    assert two.transport_calls == sum(1 for r in ours if r.dst == MODEL_OWNER)
    assert two.epochs[-1].bytes_by_party == two.bytes_by_party
