"""Multi-client schedules: relay (via the model owner or peer-to-peer) and SplitFed v1/v2."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from syft_split import (
    MODEL_OWNER,
    AccessError,
    ConfigError,
    OptimizerSpec,
    ProtocolError,
    SplitPlan,
    SplitSession,
    Trainer,
)
from syft_split.datasets import digits_parties
from syft_split.host import HostLimits
from syft_split.schedules import relay_weights

from .conftest import TEXT_REVIEW_S

SGD = OptimizerSpec("sgd", lr=0.1)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def _two_clients(make_deployment, limit: int = 120):
    a, b = digits_parties(2, limit=limit, test_fraction=0.25)
    dep = make_deployment({"a": {"train": (a.x_train, a.y_train), "test": (a.x_test, a.y_test)},
                           "b": {"train": (b.x_train, b.y_train), "test": (b.x_test, b.y_test)}},
                          limits=HostLimits(review_budget_s=TEXT_REVIEW_S))
    return a, b, dep


def _segments(model: nn.Sequential) -> list[nn.Module]:
    return [copy.deepcopy(model[:4]), copy.deepcopy(model[4:])]


def test_relay_equals_training_one_model_on_the_sequence(make_deployment) -> None:
    a, b, dep = _two_clients(make_deployment)
    model = _model()
    reference = copy.deepcopy(model)
    ref_opt = SGD.build(reference.parameters())
    plan = SplitPlan.vanilla(_segments(model), ["a", "b"], share_weights="peer")
    session = SplitSession(plan, dep.transport, optimizer=SGD)
    proposals = session.propose()
    review = dep.owners["a"].review(proposals["a"][0])
    assert "trust_peer" in review and "cannot write any" in review
    dep.approve_all(proposals)
    dep.trust_each_other()

    sequence = [("a", a, torch.arange(0, 16)), ("a", a, torch.arange(16, 32)),
                ("b", b, torch.arange(0, 16)), ("b", b, torch.arange(16, 32)),
                ("a", a, torch.arange(32, 44))]
    last = None
    for party, data, idx in sequence:
        if last is not None and last != party:
            relay_weights(session, last, party)
        last = party
        ref_opt.zero_grad()
        F.cross_entropy(reference(data.x_train[idx]), data.y_train[idx]).backward()
        ref_opt.step()
        session.zero_grad()
        loss, _ = session.loss(party, idx, data.y_train[idx])
        loss.backward()
        session.step()
    session.flush()
    got = list(dep.owners["a"].export_weights(session.remote[("a", 0)].segment_id).values())
    got += list(session.local[1].state_dict().values())
    want = list(reference.state_dict().values())
    assert max(float((x - y).abs().max()) for x, y in zip(got, want)) <= 1e-6
    # the model owner relayed ciphertext only, and cannot read or write the weights
    for party in ("a", "b"):
        fields = dep.transport.traffic.fields_sent_by(party)
        assert "sealed" in fields and not any(f.startswith("state/") for f in fields)
    with pytest.raises(AccessError, match="never exported"):  # it holds b's weights too
        session.remote[("a", 0)].export()
    with pytest.raises(AccessError, match="not a peer"):
        session.remote[("a", 0)].seal_for(MODEL_OWNER, session.remote[("b", 0)].segment_id)


def test_relay_without_approval_is_refused(make_deployment) -> None:
    _, _, dep = _two_clients(make_deployment, limit=40)
    session = SplitSession(SplitPlan.vanilla(_segments(_model()), ["a", "b"]), dep.transport)
    dep.approve_all(session.propose())
    with pytest.raises(ConfigError, match="share_weights='none'"):
        relay_weights(session, "a", "b")
    with pytest.raises(ConfigError, match="never writes"):
        relay_weights(session, "a", "b", via="model_owner")
    with pytest.raises(AccessError, match="not released"):
        session.remote[("a", 0)].export()
    with pytest.raises(ProtocolError, match="unknown op 'import'"):
        dep.transport.call("a", "import", segment=session.remote[("a", 0)].segment_id)
    for schedule in ("relay", "splitfed_v1", "splitfed_v2"):
        with pytest.raises(ConfigError, match="share_weights='peer'"):
            Trainer(session, schedule=schedule)


def test_splitfed_v1_round_equals_one_sgd_step_on_the_union(make_deployment) -> None:
    a, b = digits_parties(2, limit=48, test_fraction=0.25)  # 18 training records each
    dep = make_deployment({"a": {"train": (a.x_train, a.y_train), "test": (a.x_test, a.y_test)},
                           "b": {"train": (b.x_train, b.y_train), "test": (b.x_test, b.y_test)}})
    model = _model()
    reference = copy.deepcopy(model)
    ref_opt = SGD.build(reference.parameters())
    x = torch.cat([a.x_train, b.x_train])
    y = torch.cat([a.y_train, b.y_train])
    for _ in range(2):  # two rounds = two full-batch steps on the union
        ref_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        ref_opt.step()

    plan = SplitPlan.vanilla(_segments(model), ["a", "b"], share_weights="peer")
    session = SplitSession(plan, dep.transport, optimizer=SGD)
    dep.approve_all(session.propose())
    dep.trust_each_other()
    trainer = Trainer(session, batch_size=len(a.y_train), progress=False, schedule="splitfed_v1",
                      measure_leakage=False, labels={"a": {"train": a.y_train, "test": a.y_test},
                              "b": {"train": b.y_train, "test": b.y_test}})
    trainer.fit(2, verbose=False)
    want = list(reference.state_dict().values())
    for party in ("a", "b"):
        got = list(dep.owners[party].export_weights(session.remote[(party, 0)].segment_id)
                   .values()) + list(session.local[1].state_dict().values())
        assert max(float((p - q).abs().max()) for p, q in zip(got, want)) <= 1e-6
    # averaged by secure aggregation: the data owners sent sealed contributions, no weights
    for party in ("a", "b"):
        fields = dep.transport.traffic.fields_sent_by(party)
        assert any(f.startswith("sealed/") for f in fields)
        assert not any(f.startswith("state/") for f in fields)


@pytest.mark.parametrize("schedule", ["splitfed_v2", "relay"])
def test_shared_client_schedules_learn(make_deployment, schedule) -> None:
    a, b, dep = _two_clients(make_deployment, limit=None)
    plan = SplitPlan.vanilla(_segments(_model()), ["a", "b"], share_weights="peer")
    session = SplitSession(plan, dep.transport, optimizer=OptimizerSpec("adam", lr=1e-2))
    dep.approve_all(session.propose(), channel=True)  # datasites: steps over the direct channel
    dep.trust_each_other()
    report = Trainer(session, batch_size=32, progress=False, schedule=schedule,
                     measure_leakage=False, labels={"a": {"train": a.y_train, "test": a.y_test},
                             "b": {"train": b.y_train, "test": b.y_test}}).fit(3, verbose=False)
    assert report.final_test_accuracy is not None and report.final_test_accuracy >= 0.85
    if schedule == "splitfed_v2":  # averaged at the end of every round: one client model
        wa = dep.owners["a"].export_weights(session.remote[("a", 0)].segment_id)
        wb = dep.owners["b"].export_weights(session.remote[("b", 0)].segment_id)
        assert all(torch.allclose(wa[k], wb[k], atol=1e-7) for k in wa)
