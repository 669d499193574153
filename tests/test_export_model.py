"""session.export_model(): the trained model in one nn.Module, equal to local training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from syft_split import OptimizerSpec, SplitPlan, SplitSession, split_model
from syft_split.errors import AccessError, ConfigError
from syft_split.models import digits_cnn


def _train(session: SplitSession, reference: nn.Module, ref_opt: torch.optim.Optimizer,
           x: torch.Tensor, y: torch.Tensor, party: str, *, labels: bool = True) -> None:
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        idx = torch.randperm(len(y), generator=g)[:24]
        ref_opt.zero_grad()
        F.cross_entropy(reference(x[idx]), y[idx]).backward()
        ref_opt.step()
        session.zero_grad()
        loss, _ = session.loss(party, idx, y[idx] if labels else None)
        loss.backward()
        session.step()


def test_exported_model_equals_local_training(make_deployment, toy_data) -> None:
    """Vanilla, in process and on an embedded datasite (op ``export`` through PySyft)."""
    _exported_equals_local(make_deployment, toy_data, "vanilla")


def test_exported_u_shaped_model_equals_local_training(toy_data) -> None:
    """U-shaped: the data owner releases both its segments (head and tail)."""
    from syft_split.deploy import inprocess

    _exported_equals_local(inprocess, toy_data, "u_shaped")


def _exported_equals_local(make_deployment, toy_data, kind: str) -> None:
    x, y = toy_data
    torch.manual_seed(1)
    model = digits_cnn(channels=4, hidden=16)
    reference = copy.deepcopy(model)
    opt = OptimizerSpec("sgd", lr=0.1, momentum=0.9)
    dep = make_deployment({"clinic": {"train": (x, y), "test": (x[:8], y[:8])}})
    if kind == "u_shaped":
        plan = SplitPlan.u_shaped(split_model(model, ["pool1", "relu3"]), "clinic")
    else:
        plan = SplitPlan.vanilla(split_model(model, "pool1"), "clinic")
    session = SplitSession(plan, dep.transport, optimizer=opt)
    proposals = session.propose()
    for pid in proposals["clinic"]:
        dep.owners["clinic"].approve(pid, release_weights=True)
    _train(session, reference, opt.build(reference.parameters()), x, y, "clinic",
           labels=kind == "vanilla")

    exported = session.export_model()
    assert isinstance(exported, nn.Sequential)
    got = dict(exported.named_parameters())
    want = list(reference.parameters())
    assert [p.shape for p in got.values()] == [p.shape for p in want]
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(want, model.parameters()))
    assert moved > 1e-3  # training changed the weights
    assert max(float((a - b).detach().abs().max()) for a, b in zip(got.values(), want)) <= 1e-6
    with torch.no_grad():
        assert torch.allclose(exported(x[:16]), reference(x[:16]), atol=1e-5)
    # the export is a copy: training on never writes into it
    before = {k: v.clone() for k, v in exported.state_dict().items()}
    _train(session, reference, opt.build(reference.parameters()), x, y, "clinic",
           labels=kind == "vanilla")
    assert all(torch.equal(before[k], v) for k, v in exported.state_dict().items())


def test_export_needs_the_data_owner_to_release(toy_data) -> None:
    from syft_split.deploy import inprocess

    x, y = toy_data
    dep = inprocess({"clinic": {"train": (x, y), "test": (x, y)}})
    plan = SplitPlan.vanilla(split_model(digits_cnn(channels=4, hidden=16), "pool1"), "clinic")
    session = SplitSession(plan, dep.transport)
    (pid,) = session.propose()["clinic"]
    dep.owners["clinic"].approve(pid)
    with pytest.raises(AccessError, match="not released"):
        session.export_model()
    dep.owners["clinic"].release_weights(pid)
    exported = session.export_model()
    state = dep.owners["clinic"].export_weights(pid)
    assert torch.equal(exported[0][0].weight, state["0.weight"])


def test_export_refuses_what_it_cannot_compose(toy_data) -> None:
    from syft_split.deploy import inprocess

    x, y = toy_data
    dep = inprocess({"a": {"train": (x, y), "test": (x, y)}, "b": {"train": (x, y), "test": (x, y)}})
    plan = SplitPlan.vanilla(split_model(digits_cnn(channels=4, hidden=16), "pool1"), ["a", "b"])
    session = SplitSession(plan, dep.transport)
    for party, ids in session.propose().items():
        for pid in ids:
            dep.owners[party].approve(pid, release_weights=True)
    with pytest.raises(ConfigError, match=r"pass source= one of \['a', 'b'\]"):
        session.export_model()
    assert isinstance(session.export_model("b"), nn.Sequential)

    trunk = [nn.Sequential(nn.Flatten(), nn.Linear(64, 8)), nn.Sequential(nn.ReLU())]
    multi = SplitPlan.multi_task(trunk, {"d": nn.Linear(8, 10), "p": nn.Linear(8, 2)}, "a")
    with pytest.raises(ConfigError, match="chain plans"):
        SplitSession(multi, dep.transport).export_model()
