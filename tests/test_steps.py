"""Weights change only when the model owner steps: a loss or forward alone never trains, and a
U-shaped tail trains on its task's weighted loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from syft_split import OptimizerSpec, SplitPlan, SplitSession, split_model
from syft_split.errors import ProtocolError
from syft_split.models import digits_cnn


def _u_shaped(dep_factory, toy_data, weight: float = 1.0, fuse: bool = True):
    x, y = toy_data
    torch.manual_seed(3)
    model = digits_cnn(channels=4, hidden=16)
    dep = dep_factory({"clinic": {"train": (x, y), "test": (x[:8], y[:8])}})
    plan = SplitPlan.u_shaped(split_model(model, ["pool1", "relu3"]), "clinic")
    plan.tasks[0].weight = weight
    session = SplitSession(plan, dep.transport, optimizer=OptimizerSpec("sgd", lr=0.1),
                           fuse=fuse)
    dep.approve_all(session.propose())
    return model, dep, session


def _owner_weights(dep, session) -> list[torch.Tensor]:
    out = []
    for (host, _i), seg in sorted(session.remote.items(), key=lambda kv: kv[0][1]):
        out.extend(dep.owners[host].export_weights(seg.segment_id).values())
    return out


@pytest.mark.parametrize("fuse", [True, False])
def test_loss_then_discard_changes_nothing(make_deployment, toy_data, fuse) -> None:
    _, dep, session = _u_shaped(make_deployment, toy_data, fuse=fuse)
    before = _owner_weights(dep, session)
    loss, _ = session.loss("clinic", torch.arange(16))
    session.discard()
    after = _owner_weights(dep, session)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    # and training goes on after the discard
    loss, _ = session.loss("clinic", torch.arange(16))
    loss.backward()
    session.step()
    session.flush()
    assert any(not torch.equal(a, b) for a, b in zip(before, _owner_weights(dep, session)))


def test_loss_step_alone_never_trains_the_tail(make_deployment, toy_data) -> None:
    _, dep, session = _u_shaped(make_deployment, toy_data)
    before = _owner_weights(dep, session)
    session.loss("clinic", torch.arange(16))  # no backward, no step
    assert all(torch.equal(a, b) for a, b in zip(before, _owner_weights(dep, session)))
    with pytest.raises(ProtocolError, match="pending"):
        session.loss("clinic", torch.arange(16))  # the step in flight must be resolved first


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_u_shaped_tail_trains_on_the_weighted_loss(make_deployment, toy_data, weight) -> None:
    x, y = toy_data
    model, dep, session = _u_shaped(make_deployment, toy_data, weight=weight)
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        idx = torch.randperm(len(y), generator=g)[:24]
        ref_opt.zero_grad()
        (weight * F.cross_entropy(reference(x[idx]), y[idx])).backward()
        ref_opt.step()
        session.zero_grad()
        loss, _ = session.loss("clinic", idx)
        loss.backward()
        session.step()
    session.flush()
    got = []
    for i in range(len(session.plan.segments)):
        if ("clinic", i) in session.remote:
            got.extend(dep.owners["clinic"].export_weights(session.remote[("clinic", i)].segment_id).values())
        else:
            got.extend(session.local[i].state_dict().values())
    want = list(reference.state_dict().values())
    assert max(float((a - b).abs().max()) for a, b in zip(got, want)) <= 1e-6
