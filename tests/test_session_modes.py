"""Evaluation, inference and module modes: the split behaves like the unsplit model."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from syft_split import (
    ConfigError,
    OptimizerSpec,
    ProtocolError,
    SplitPlan,
    SplitSession,
    split_model,
)

from .conftest import toy_tensors

OPT = OptimizerSpec("sgd", lr=0.5)


def bn_model() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 4, 3, padding=1)), ("bn1", nn.BatchNorm2d(4)),
        ("pool1", nn.MaxPool2d(2)), ("flatten", nn.Flatten()), ("fc1", nn.Linear(64, 16)),
        ("drop", nn.Dropout(0.5)), ("fc2", nn.Linear(16, 10))]))


def session_for(make_deployment, model: nn.Module) -> tuple[SplitSession, object]:
    x, y = toy_tensors()
    dep = make_deployment({"clinic": {"train": (x, y), "test": (x, y)}})
    session = SplitSession(SplitPlan.vanilla(split_model(model, ["pool1"]), "clinic"),
                           dep.transport, optimizer=OPT)
    dep.approve_all(session.propose())
    return session, dep


def train_step(session: SplitSession, ref: nn.Module, ref_opt: torch.optim.Optimizer,
               idx: torch.Tensor,
               data: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """One step of the unsplit ``ref`` and of ``session`` on the same records."""
    x, y = data if data is not None else toy_tensors()
    ref_opt.zero_grad()
    F.cross_entropy(ref(x[idx]), y[idx]).backward()
    ref_opt.step()
    session.zero_grad()
    loss, _ = session.loss("clinic", idx, y[idx])
    loss.backward()
    session.step()


def test_evaluate_batch_scores_the_current_weights(make_deployment) -> None:
    model = bn_model()
    model.drop.p = 0.0  # nothing random: the training step is compared exactly
    ref = copy.deepcopy(model)
    ref_opt = OPT.build(ref.parameters())
    session, _ = session_for(make_deployment, model)
    train_step(session, ref, ref_opt, torch.arange(32))  # its gradient is held (fused)
    x, y = toy_tensors()
    ev = torch.arange(32, 96)
    ref.eval()
    with torch.no_grad():
        want = float(F.cross_entropy(ref(x[ev]), y[ev]))
    assert session.evaluate_batch("clinic", ev, y[ev]).loss == want


def test_evaluate_batch_gives_each_submodule_its_mode_back(make_deployment) -> None:
    session, _ = session_for(make_deployment, bn_model())
    head = session.local[1]
    head.drop.eval()  # a submodule in its own mode: given back as it was
    _, y = toy_tensors()
    session.evaluate_batch("clinic", torch.arange(8), y[:8])
    assert head.training and not head.drop.training and head.fc1.training
    head.eval()
    session.evaluate_batch("clinic", torch.arange(8), y[:8])
    assert not any(m.training for m in head.modules())


@pytest.mark.parametrize("call", ["forward", "loss"])
def test_forward_under_no_grad_is_inference_at_the_data_owner(make_deployment,
                                                              call: str) -> None:
    """``with torch.no_grad(): session.forward(...)`` (or ``session.loss``, the validation
    idiom) between training steps: the data owner runs in evaluation mode (its BatchNorm
    statistics stay), and training then continues exactly like the unsplit model's."""
    model = bn_model()
    model.drop.p = 0.0
    ref = copy.deepcopy(model)
    ref_opt = OPT.build(ref.parameters())
    session, dep = session_for(make_deployment, model)
    train_step(session, ref, ref_opt, torch.arange(16))
    x, _ = toy_tensors()
    ref.eval()
    for m in session.local.values():
        m.eval()
    _, y = toy_tensors()
    with torch.no_grad():
        want = ref(x[16:32])
        if call == "forward":
            got = session.forward("clinic", torch.arange(16, 32))
        else:
            want = F.cross_entropy(want, y[16:32])
            got, _ = session.loss("clinic", torch.arange(16, 32), y[16:32])
    assert torch.equal(got, want)
    ref.train()
    for m in session.local.values():
        m.train()
    train_step(session, ref, ref_opt, torch.arange(32, 48))
    assert_equal_weights(session, dep, ref)


def assert_equal_weights(session: SplitSession, dep: object, ref: nn.Module) -> None:
    session.flush()
    seg = session.remote[("clinic", 0)]
    remote = dep.owners["clinic"].export_weights(seg.segment_id)  # type: ignore[attr-defined]
    for k, v in ref.state_dict().items():
        if k.startswith(("conv1.", "bn1.")):
            assert torch.equal(remote[k.replace("conv1.", "0.").replace("bn1.", "1.")], v), k
    assert all(torch.equal(session.local[1].state_dict()[k], v)
               for k, v in ref.state_dict().items() if k.startswith(("fc1.", "fc2.")))


@pytest.mark.parametrize("fuse", [True, False])
def test_gradient_accumulation_across_a_remote_segment_is_refused(make_deployment,
                                                                  fuse: bool) -> None:
    """Two micro-batch backward()s before one step would train differently from the unsplit
    model (the data owner steps on each gradient): refused; one backward per step is exact."""
    model = bn_model()
    model.drop.p = 0.0
    ref = copy.deepcopy(model)
    ref_opt = OPT.build(ref.parameters())
    x, y = toy_tensors()
    dep = make_deployment({"clinic": {"train": (x, y), "test": (x, y)}})
    session = SplitSession(SplitPlan.vanilla(split_model(model, ["pool1"]), "clinic"),
                           dep.transport, optimizer=OPT, fuse=fuse)
    dep.approve_all(session.propose())
    for k in range(3):  # the ordinary loop: forward, backward, step
        train_step(session, ref, ref_opt, torch.arange(16 * k, 16 * k + 16))
    assert_equal_weights(session, dep, ref)
    session.zero_grad()
    loss, _ = session.loss("clinic", torch.arange(16), y[:16])
    (loss / 2).backward()
    with pytest.raises(ProtocolError, match="do not accumulate across remote segments"):
        session.loss("clinic", torch.arange(16, 32), y[16:32])
    session.zero_grad()  # the model owner drops its half; the data owner stepped on its own
    session.discard()
    session.flush()
    assert session.remote[("clinic", 0)].unsettled is None


def test_a_frozen_layer_at_the_model_owner_trains_like_the_unsplit_model(
        make_deployment) -> None:
    """Fine-tuning with a frozen BatchNorm (``model.train(); model.bn.eval()``) in the model
    owner's segment: the split trains exactly like the unsplit model (the BatchNorm ran in
    training mode after the split, and propose() reset it too)."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([
        ("fc0", nn.Linear(16, 8)), ("act0", nn.ReLU()), ("fc1", nn.Linear(8, 8)),
        ("bn", nn.BatchNorm1d(8)), ("act", nn.ReLU()), ("fc2", nn.Linear(8, 10))]))
    model.train()
    model.bn.eval()
    ref = copy.deepcopy(model)
    ref_opt = OPT.build(ref.parameters())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 16, generator=g), torch.randint(0, 10, (96,), generator=g)
    dep = make_deployment({"clinic": {"train": (x, y), "test": (x, y)}})
    session = SplitSession(SplitPlan.vanilla(split_model(model, ["act0"]), "clinic"),
                           dep.transport, optimizer=OPT)
    dep.approve_all(session.propose())
    for k in range(3):
        train_step(session, ref, ref_opt, torch.arange(32 * k, 32 * k + 32), (x, y))
    head = session.local[1]
    assert not head.bn.training and head.training
    assert all(torch.equal(head.state_dict()[k], v)
               for k, v in ref.state_dict().items() if not k.startswith("fc0."))


def test_a_remote_segment_in_mixed_modes_is_refused() -> None:
    model = nn.Sequential(OrderedDict([("fc0", nn.Linear(4, 4)), ("bn", nn.BatchNorm1d(4)),
                                       ("act0", nn.ReLU()), ("fc1", nn.Linear(4, 2))]))
    model.bn.eval()
    with pytest.raises(ConfigError, match=r"another training mode than the segment \(bn\)"):
        SplitPlan.vanilla(split_model(model, ["act0"]), "clinic")


def test_a_remote_segment_in_eval_mode_with_batch_statistics_is_refused() -> None:
    """The host trains a segment in train(): one given wholly in eval() with a BatchNorm
    would use batch statistics there and train apart from the unsplit model (it was
    accepted); split_model's segment takes its layers' mode when they agree, so a frozen
    trunk is named as such, not as 'mixed modes'."""
    model = nn.Sequential(OrderedDict([("trunk", nn.Sequential(nn.Linear(4, 4),
                                                               nn.BatchNorm1d(4))),
                                       ("act0", nn.ReLU()), ("fc1", nn.Linear(4, 2))]))
    model.train()
    model.trunk.eval()
    segments = split_model(model, ["trunk"])
    assert not segments[0].training and segments[1].training
    with pytest.raises(ConfigError, match=r"is in eval\(\) and holds BatchNorm1d"):
        SplitPlan.vanilla(segments, "clinic")
    plain = nn.Sequential(OrderedDict([("fc0", nn.Linear(4, 4)), ("act0", nn.ReLU()),
                                       ("fc1", nn.Linear(4, 2))]))
    plain.eval()  # no mode-dependent layer: the mode changes nothing, accepted
    SplitPlan.vanilla(split_model(plain, ["act0"]), "clinic")
