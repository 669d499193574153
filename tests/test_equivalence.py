"""Split training is the same computation as local training (vanilla and U-shaped)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest
import torch
import torch.nn.functional as F

from syft_split import DATA_OWNER, OptimizerSpec, SplitPlan, SplitSession, split_model
from syft_split.deploy import Deployment
from syft_split.models import digits_cnn

from .conftest import DEPLOY_KINDS, HTTP_KINDS, deployed, toy_tensors

OPTIMIZERS = {
    "sgd_momentum": OptimizerSpec("sgd", lr=0.05, momentum=0.9),
    "adam": OptimizerSpec("adam", lr=1e-2),
}
CASES = [
    ("vanilla", ["pool1"]),
    ("vanilla", ["pool1", "relu3"]),
    ("vanilla_released_labels", ["pool1"]),
    ("u_shaped", ["pool1", "relu3"]),
    ("multi_hop", ["pool1", "pool2"]),
]


def split_weights(session: SplitSession, dep, party: str) -> list[torch.Tensor]:
    """All parameters in forward order, read where they live (data owner via its console)."""
    session.flush()
    out: list[torch.Tensor] = []
    for i in range(len(session.plan.segments)):
        host = session._host(party, i)
        if (host, i) in session.remote:
            state = dep.owners[host].export_weights(session.remote[(host, i)].segment_id)
        else:
            state = session.local[i].state_dict()
        out.extend(state.values())
    return out


@pytest.fixture(scope="module")
def sites() -> Iterator[Callable[[str], Deployment]]:
    """``sites(kind)``: one clinic + lab deployment per kind for the whole module (each run
    proposes its own segments), on the conftest ``toy_tensors``."""
    made: dict[str, Deployment] = {}
    with ExitStack() as stack:

        def get(kind: str) -> Deployment:
            if kind not in made:
                x, y = toy_tensors()
                made[kind] = stack.enter_context(deployed(
                    kind, {"clinic": {"train": (x, y), "test": (x[:8], y[:8])}, "lab": {}}))
            return made[kind]

        yield get


@pytest.mark.parametrize("where", DEPLOY_KINDS)
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("kind, cuts", CASES)
def test_split_training_equals_unsplit(sites, where, kind, cuts, opt_name) -> None:
    x, y = toy_tensors()
    torch.manual_seed(1)
    model = digits_cnn(channels=4, hidden=16)
    reference = copy.deepcopy(model)
    opt = OPTIMIZERS[opt_name]
    ref_opt = opt.build(reference.parameters())

    dep = sites(where)
    segments = split_model(model, cuts)
    if kind == "u_shaped":
        plan = SplitPlan.u_shaped(segments, "clinic")
    elif kind == "multi_hop":  # clinic -> lab -> model owner
        plan = SplitPlan.multi_hop(segments, "clinic", hops=["lab"])
    elif kind == "vanilla_released_labels":
        plan = SplitPlan.vanilla(segments, "clinic", labels=DATA_OWNER)
    else:
        plan = SplitPlan.vanilla(segments, "clinic")
    session = SplitSession(plan, dep.transport, optimizer=opt)
    dep.approve_all(session.propose())

    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        idx = torch.randperm(len(y), generator=g)[:24]
        ref_opt.zero_grad()
        ref_loss = F.cross_entropy(reference(x[idx]), y[idx])
        ref_loss.backward()
        ref_opt.step()

        session.zero_grad()
        labels = y[idx] if kind in ("vanilla", "multi_hop") else None
        loss, metrics = session.loss("clinic", idx, labels)
        loss.backward()
        session.step()
        assert metrics.count == 24
        assert abs(float(loss.detach()) - float(ref_loss.detach())) < 1e-6

    got = split_weights(session, dep, "clinic")
    want = list(reference.state_dict().values())
    assert [t.shape for t in got] == [t.shape for t in want]
    moved = max(float((a - b).abs().max()) for a, b in zip(want, model.state_dict().values()))
    assert moved > 1e-3  # training really changed the weights
    diff = max(float((a - b).abs().max()) for a, b in zip(got, want))
    assert diff <= 1e-6


def test_loss_backward_reaches_the_data_owner(make_deployment, toy_data) -> None:
    """Low-level API: activation pointer -> model owner layers -> loss.backward()."""
    x, y = toy_data
    dep = make_deployment({"clinic": {"train": (x, y), "test": (x, y)}})
    plan = SplitPlan.vanilla(split_model(digits_cnn(channels=4, hidden=16), "pool1"), "clinic")
    session = SplitSession(plan, dep.transport, optimizer=OptimizerSpec("sgd", lr=0.5),
                           fuse=False)
    (pid,) = session.propose()["clinic"]
    dep.approve_all({"clinic": [pid]})
    before = dep.owners["clinic"].export_weights(pid)
    idx = torch.arange(16)
    pointer = session.send_forward("clinic", idx)
    assert pointer.shape == (16, 4, 4, 4)
    act = pointer.resolve()
    assert act.requires_grad
    out = session.local[1](act)
    F.cross_entropy(out, y[idx]).backward()  # sends dL/d(act) to the clinic, which steps
    after = dep.owners["clinic"].export_weights(pid)
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("where", HTTP_KINDS)
@pytest.mark.parametrize("kind, cuts", [("vanilla", ["pool1"]), ("u_shaped", ["pool1", "relu3"])])
def test_same_final_weights_on_every_transport(sites, where, kind, cuts) -> None:
    """The same seeded run ends with the same weights in process, on embedded datasites and
    on HTTP datasites (each compared with the unsplit reference)."""
    test_split_training_equals_unsplit(sites, where, kind, cuts, "adam")
