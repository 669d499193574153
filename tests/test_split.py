"""Splitting: composed segments equal the original model exactly; bad cuts explain themselves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from syft_split import ConfigError, SplitError, SplitPlan, compose, cut_points, split_model
from syft_split.models import digits_cnn


class NamedCNN(nn.Module):
    """A module with named children and functional ops in forward (split via torch.fx)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.pool2 = nn.MaxPool2d(2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.pool2(torch.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.c(self.b(h) + h)


@pytest.mark.parametrize(
    "make, cuts, shape",
    [
        (digits_cnn, ["pool1"], (7, 1, 8, 8)),
        (digits_cnn, ["pool1", "relu3"], (7, 1, 8, 8)),
        (NamedCNN, ["pool1"], (5, 1, 8, 8)),
        (NamedCNN, ["pool1", "pool2"], (5, 1, 8, 8)),
        (Residual, ["a"], (3, 4)),
    ],
)
def test_composed_segments_equal_original_exactly(make, cuts, shape) -> None:
    torch.manual_seed(0)
    model = make()
    segments = split_model(model, cuts)
    assert len(segments) == len(cuts) + 1
    for _ in range(3):
        x = torch.randn(shape)
        assert torch.equal(compose(segments)(x), model(x))


def test_segments_are_copies_of_the_weights() -> None:
    model = digits_cnn()
    first = split_model(model, "pool1")[0]
    with torch.no_grad():
        first[0].weight.add_(1.0)
    assert not torch.equal(first[0].weight, model.conv1.weight)


def test_fx_segments_become_plain_sequentials() -> None:
    segments = split_model(NamedCNN(), ["pool1"])
    assert all(isinstance(s, nn.Sequential) for s in segments)
    assert [type(m).__name__ for m in segments[0]] == ["Conv2d", "ReLU", "MaxPool2d"]


def test_cut_points_lists_layers() -> None:
    assert cut_points(digits_cnn())[:3] == ["conv1", "relu1", "pool1"]
    assert "fc2" not in cut_points(digits_cnn())  # the last layer is not a cut
    assert cut_points(NamedCNN()) == ["conv1", "relu", "pool1", "conv2", "relu_1", "pool2",
                                      "flatten"]


@pytest.mark.parametrize(
    "make, cut, reason",
    [
        (digits_cnn, "pool9", "no such layer"),
        (digits_cnn, "fc2", "last layer"),
        (NamedCNN, "conv3", "no such layer"),
        (Residual, "b", "skip connection"),
    ],
)
def test_bad_cut_lists_valid_names(make, cut, reason) -> None:
    model = make()
    with pytest.raises(SplitError) as err:
        split_model(model, cut)
    assert reason in str(err.value)
    for name in cut_points(model):
        assert repr(name) in str(err.value)


def test_cuts_out_of_order_rejected() -> None:
    with pytest.raises(SplitError, match="forward order"):
        split_model(digits_cnn(), ["pool2", "pool1"])
    with pytest.raises(SplitError, match="forward order"):
        split_model(NamedCNN(), ["pool2", "pool1"])


class ReusedAct(nn.Module):
    """One nn.ReLU called twice: each call is its own cut point."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def test_each_call_of_a_reused_module_has_its_own_cut_name() -> None:
    model = ReusedAct()
    assert cut_points(model) == ["fc1", "act#1", "fc2", "act#2"]
    with pytest.raises(SplitError) as err:
        split_model(model, "act")
    assert "module 'act' is called 2 times; name the call: ['act#1', 'act#2']" in str(err.value)
    x = torch.randn(5, 4)
    first, second = split_model(model, "act#2")
    assert [type(m).__name__ for m in first] == ["Linear", "ReLU", "Linear", "ReLU"]
    assert torch.equal(second(first(x)), model(x))
    # the fx name of a call names it too
    assert torch.equal(split_model(model, "act_1")[0](x), first(x))


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([self.a(x), self.b(x)], 1))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


class FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.dropout(self.a(x), 0.5, training=self.training))


@pytest.mark.parametrize("make, cut, fragment", [
    (Residual, "b", "values ['a', 'b'] cross it: a skip connection ('a' jumps over the cut"),
    (Branches, "a", "values ['x', 'a'] cross it: parallel branches ('x' is still read after "
                    "the cut by 'b', beside 'a')"),
    (Branches, "b", "values ['a', 'b'] cross it: parallel branches"),
    (Tied, "fc#1", "the weights 'fc.weight' are used on both sides of it (by 'fc#1' and "
                   "'fc#2'); split copies would train apart"),
])
def test_invalid_cuts_say_what_crosses(make, cut, fragment) -> None:
    model = make()
    with pytest.raises(SplitError) as err:
        split_model(model, cut)
    assert fragment in str(err.value)
    assert cut not in cut_points(model)


def test_weights_shared_inside_a_segment_stay_shared() -> None:
    torch.manual_seed(0)
    model = Tied()
    first, _ = split_model(model, "fc#2")
    calls = [n for n in first.graph.nodes if n.op == "call_module"]
    assert [str(n.target) for n in calls] == ["fc", "fc"]  # one layer, called twice
    assert len(list(first.parameters())) == 2  # one weight and one bias, not two copies
    x = torch.randn(3, 4)
    assert torch.equal(first(x), model.fc(torch.tanh(model.fc(x))))


def test_sequential_reusing_a_module_is_split_whole() -> None:
    act = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 8), act, nn.Linear(8, 8), act, nn.Linear(8, 2))
    assert cut_points(model) == ["0", "1", "2", "3"]
    x = torch.randn(3, 4)
    for cut in cut_points(model):
        assert torch.equal(compose(split_model(model, cut))(x), model(x))
    lin = nn.Linear(4, 4)
    tied = nn.Sequential(lin, nn.Tanh(), lin, nn.Linear(4, 2))
    assert cut_points(tied) == ["2"]
    with pytest.raises(SplitError, match="layers '0' and '2' share weights across it"):
        split_model(tied, "1")


def test_functional_dropout_frozen_at_trace_time_is_refused() -> None:
    with pytest.raises(SplitError, match=r"node 'dropout' calls torch\.nn\.functional\.dropout "
                                         "with training=True frozen"):
        cut_points(FunctionalDropout())


class Erf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(torch.special.erf(self.a(x))))


def test_placement_error_names_segment_party_node_and_op() -> None:
    segments = split_model(Erf(), ["a", "special_erf"])
    with pytest.raises(ConfigError) as err:
        SplitPlan.multi_hop(segments, "clinic", hops=["relay"])
    assert ("segment 1 (seg1) cannot be placed on party 'relay': node 'special_erf' calls "
            "torch.special.erf, which has no declared form; allowed: layers [") in str(err.value)
    with pytest.raises(ConfigError, match="cannot be placed on data owners 'a', 'b': node "):
        SplitPlan.vanilla(split_model(Erf(), "special_erf"), ["a", "b"])


@pytest.mark.parametrize("sequential", [True, False])
def test_split_keeps_each_layers_training_mode(sequential: bool) -> None:
    """A frozen layer (``model.train(); model.bn.eval()``) stays frozen in its segment."""
    torch.manual_seed(0)
    layers = [("fc0", nn.Linear(4, 8)), ("act0", nn.ReLU()), ("fc1", nn.Linear(8, 8)),
              ("bn", nn.BatchNorm1d(8)), ("fc2", nn.Linear(8, 2))]
    if sequential:
        from collections import OrderedDict

        model: nn.Module = nn.Sequential(OrderedDict(layers))
    else:
        model = _Frozen(dict(layers))
    model.train()
    model.bn.eval()  # type: ignore[union-attr]
    cut = "act0" if sequential else "relu"
    segments = split_model(model, cut)
    assert model.training and not model.bn.training  # type: ignore[union-attr]
    assert not any(k.startswith("_syft") for m in model.modules() for k in vars(m))
    assert segments[0].training and segments[1].training
    frozen = [name for s in segments for name, m in s.named_modules() if not m.training]
    assert len(frozen) == 1 and frozen[0].endswith("bn")
    x = torch.randn(6, 4)
    assert torch.equal(compose(segments)(x), model(x))
    model.eval()
    assert not any(m.training for s in split_model(model, cut) for m in s.modules())


class _Frozen(nn.Module):
    def __init__(self, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc0(x))
        return self.fc2(self.bn(self.fc1(h)) + 1)


class _BranchesOnTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if self.training:
            h = h * 0.9  # a train-only rescaling: one branch would be frozen by the trace
        return self.b(h)


def test_a_forward_branching_on_training_is_refused() -> None:
    model = _BranchesOnTraining()
    model.eval()
    model.b.train()
    with pytest.raises(SplitError, match=r"branches on self\.training"):
        split_model(model, "a")
    assert not model.training and not model.a.training and model.b.training  # given back
