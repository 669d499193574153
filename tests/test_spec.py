"""Declared specs: both forms checked to the argument type, measured without building, and a
graph segment reviewed, approved and trained at a data owner like any chain."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from syft_split import ConfigError, OptimizerSpec, SplitPlan, SplitSession, split_model
from syft_split.deploy import inprocess
from syft_split.models import digits_cnn
from syft_split.spec import (
    LAYER_ARGS,
    GraphSegment,
    count_parameters,
    describe,
    load_spec_state,
    module_from_spec,
    module_to_spec,
    spec_size,
    spec_state,
)


def _graph(*nodes: dict[str, Any], output: str | None = None) -> dict[str, Any]:
    return {"input": "x", "nodes": list(nodes), "output": output or nodes[-1]["name"]}


def _node(name: str, op: str, inputs: list[str], **args: Any) -> dict[str, Any]:
    return {"name": name, "op": op, "args": args, "inputs": inputs}


def test_chain_spec_format_is_unchanged() -> None:
    """The chain form is on the wire: the same JSON and state keys as before graph specs."""
    seg = split_model(digits_cnn(4, 8), "pool1")[0]
    assert module_to_spec(seg) == {"layers": [
        {"type": "Conv2d", "args": {"in_channels": 1, "out_channels": 4, "kernel_size": [3, 3],
                                    "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1],
                                    "groups": 1, "bias": True, "padding_mode": "zeros"}},
        {"type": "ReLU", "args": {}},
        {"type": "MaxPool2d", "args": {"kernel_size": 2, "stride": 2, "padding": 0,
                                       "dilation": 1, "ceil_mode": False}},
    ]}
    assert list(spec_state(seg)) == ["0.weight", "0.bias"]
    old = {"layers": [{"type": "Linear", "args": {"in_features": 4, "out_features": 2}},
                      {"type": "ReLU"}]}  # arguments left out take torch's defaults
    assert isinstance(module_from_spec(old), nn.Sequential)
    assert spec_size(old).parameters == 10


BAD_ARGS = [
    ("Linear", {"in_features": 4.0, "out_features": 2}, "in_features=4.0 (float) must be an int >= 1"),
    ("Linear", {"in_features": True, "out_features": 2}, "in_features=True (bool)"),
    ("Linear", {"in_features": "4", "out_features": 2}, "in_features='4' (str)"),
    ("Linear", {"in_features": 0, "out_features": 2}, "in_features=0"),
    ("Linear", {"in_features": 4, "out_features": 2, "bias": 1}, "bias=1 (int) must be a bool"),
    ("Linear", {"out_features": 2}, "missing arguments ['in_features']"),
    ("Linear", {"in_features": 4, "out_features": 2, "device": "cuda"}, "arguments ['device'] not allowed"),
    ("Conv2d", {"in_channels": 1, "out_channels": 2, "kernel_size": [3]}, "kernel_size=[3]"),
    ("Conv2d", {"in_channels": 1, "out_channels": 2, "kernel_size": [3, 3.0]}, "a list of 2 ints"),
    ("Conv2d", {"in_channels": 1, "out_channels": 2, "kernel_size": 3, "padding_mode": "mirror"},
     "padding_mode='mirror'"),
    ("Dropout", {"p": 1.5}, "p=1.5 (float) must be a number in [0, 1]"),
    ("BatchNorm1d", {"num_features": 4, "momentum": "fast"}, "momentum='fast'"),
    ("GELU", {"approximate": "fast"}, "approximate='fast'"),
    ("LayerNorm", {"normalized_shape": []}, "normalized_shape=[]"),
]


@pytest.mark.parametrize("kind, args, fragment", BAD_ARGS)
def test_mistyped_layer_arguments_are_refused(kind: str, args: dict[str, Any], fragment: str) -> None:
    chain = {"layers": [{"type": kind, "args": args}]}
    graph = _graph({"name": "layer", "op": kind, "args": args, "inputs": ["x"]})
    for spec, where in ((chain, f"layer 0 ({kind})"), (graph, f"node 0 ('layer') ({kind})")):
        for check in (module_from_spec, spec_size):
            with pytest.raises(ConfigError) as err:
                check(spec)
            assert fragment in str(err.value) and where in str(err.value)


BAD_GRAPHS = [
    (_graph(_node("e", "erf", ["x"])), "op 'erf' is not allowed"),
    (_graph(_node("a", "relu", ["b"]), _node("b", "relu", ["a"])), "inputs ['b'] are not the input"),
    (_graph(_node("a", "relu", ["x"]), _node("a", "relu", ["a"])), "name 'a' is already used"),
    (_graph(_node("forward", "ReLU", ["x"])), "a layer's name is not a torch.nn.Module attribute"),
    (_graph(_node("a.b", "relu", ["x"])), "a name is an identifier"),
    (_graph({**_node("a", "relu", ["x"]), "code": "import os"}), "keys ['code'] not allowed"),
    ({**_graph(_node("a", "relu", ["x"])), "imports": []}, "keys ['imports'] not allowed"),
    (_graph(_node("a", "relu", ["x"]), {"name": "b", "op": "relu", "shares": "a", "inputs": ["a"]}),
     "must name an earlier layer node"),
    (_graph({"name": "a", "op": "Linear", "args": {"in_features": 2, "out_features": 2},
             "inputs": ["x"]},
            {"name": "b", "shares": "a", "args": {"in_features": 3}, "inputs": ["a"]}),
     "repeats no args"),
    (_graph(_node("a", "add", ["x", "x"], other=1.0)), "two inputs, or one input and a number"),
    (_graph(_node("a", "add", ["x"])), "two inputs, or one input and a number"),
    (_graph(_node("a", "getitem", ["x"], index=0)), "getitem reads a tuple or a shape"),
    (_graph(_node("a", "relu", ["x"]), _node("v", "view", ["x"], shape=["a", -1])),
     "shape entry 'a' must be an int or an earlier node holding an int"),
    (_graph(_node("s", "size", ["x"], dim=0), _node("r", "relu", ["s"])), "reads tensors"),
    (_graph(_node("s", "size", ["x"], dim=0)), "output 's' must name a node holding a tensor"),
    (_graph(_node("c", "cat", [])), "takes 1 to 256 inputs, got 0"),
    (_graph({"name": "l", "op": "Linear", "args": {"in_features": 2, "out_features": 2},
             "inputs": ["x", "x"]}), "takes 1 inputs, got 2"),
    (_graph(_node("m", "softmax", ["x"])), "missing arguments ['dim']"),
    (_graph(_node("c", "cat", ["x"], dim=1.0)), "dim=1.0 (float) must be an int"),
    (_graph(*[_node(f"n{i}", "relu", [f"n{i - 1}" if i else "x"]) for i in range(4097)]),
     "expected 1 to 4096"),
    ({"layers": [{"type": "MultiheadAttention", "args": {"embed_dim": 4, "num_heads": 2}}]},
     "declare it in a graph spec"),
    ({"graph": []}, "a 'layers' list (a chain) or a 'nodes' list (a graph)"),
    # a chain is checked to the key as a graph is, and a spec is one form or the other
    ({"layers": [{"type": "Identity", "shares": "x"}]}, "layer 0: keys ['shares'] not allowed"),
    ({"layers": [{"type": "ReLU", "args": {}, "note": "ignored"}]}, "keys ['note'] not allowed"),
    ({"layers": [{"type": "ReLU"}], "comment": "anything"}, "chain spec: keys ['comment'] not"),
    ({"layers": [{"type": "Identity"}], **_graph(_node("a", "relu", ["x"]))},
     "declares both 'layers' (a chain) and 'nodes' (a graph)"),
    # what the review lists is what runs: no node the output bypasses
    (_graph(_node("fc", "Linear", ["x"], in_features=4, out_features=2),
            _node("h", "relu", ["fc"]), output="x"), "output 'x' must name a node holding a "
                                                    "tensor (not the input)"),
    (_graph(_node("fc", "Linear", ["x"], in_features=4, out_features=2),
            _node("n", "size", ["x"], dim=0), _node("h", "relu", ["x"])),
     "nodes ['fc', 'n'] do not reach the output 'h'"),
]


@pytest.mark.parametrize("spec, fragment", BAD_GRAPHS)
def test_malformed_graph_specs_are_refused(spec: dict[str, Any], fragment: str) -> None:
    for check in (module_from_spec, spec_size):
        with pytest.raises(ConfigError) as err:
            check(spec)
        assert fragment in str(err.value)


def _every_layer() -> list[tuple[str, dict[str, Any], tuple[int, ...]]]:
    """Each declared layer type with non-default arguments, and an input it accepts."""
    return [
        ("Linear", {"in_features": 6, "out_features": 5, "bias": False}, (6,)),
        ("Conv1d", {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "groups": 2,
                    "padding": "same"}, (4, 9)),
        ("Conv2d", {"in_channels": 2, "out_channels": 3, "kernel_size": [3, 2], "stride": 2,
                    "padding_mode": "reflect", "padding": 1}, (2, 7, 6)),
        ("MaxPool1d", {"kernel_size": 3, "stride": 2, "ceil_mode": True}, (2, 9)),
        ("MaxPool2d", {"kernel_size": [2, 3], "padding": 1, "dilation": 1}, (2, 6, 6)),
        ("AvgPool1d", {"kernel_size": 2, "count_include_pad": False, "padding": 1}, (2, 7)),
        ("AvgPool2d", {"kernel_size": 2, "stride": [1, 2]}, (2, 6, 6)),
        ("AdaptiveAvgPool1d", {"output_size": 3}, (2, 7)),
        ("AdaptiveAvgPool2d", {"output_size": [2, 3]}, (2, 7, 7)),
        ("BatchNorm1d", {"num_features": 5, "momentum": None}, (5,)),
        ("BatchNorm2d", {"num_features": 3, "affine": False}, (3, 4, 4)),
        ("LayerNorm", {"normalized_shape": [3, 4], "bias": False}, (3, 4)),
        ("Dropout", {"p": 0.25}, (6,)),
        ("Flatten", {"start_dim": 1, "end_dim": -1}, (2, 3, 4)),
        ("Unflatten", {"dim": 1, "unflattened_size": [2, -1]}, (6,)),
        ("ReLU", {}, (6,)),
        ("LeakyReLU", {"negative_slope": 0.2}, (6,)),
        ("ELU", {"alpha": 0.5}, (6,)),
        ("GELU", {"approximate": "tanh"}, (6,)),
        ("Tanh", {}, (6,)),
        ("Sigmoid", {}, (6,)),
        ("Softmax", {"dim": -1}, (6,)),
        ("Identity", {}, (6,)),
        ("MultiheadAttention", {"embed_dim": 6, "num_heads": 3, "kdim": 4, "vdim": 5,
                                "add_bias_kv": True, "batch_first": True}, (3, 6)),
    ]


@pytest.mark.parametrize("kind, args, shape", _every_layer(), ids=[k for k, _, _ in _every_layer()])
def test_spec_size_counts_exactly_what_is_built(kind: str, args: dict[str, Any],
                                               shape: tuple[int, ...]) -> None:
    if kind == "MultiheadAttention":  # query, key and value of their own widths
        spec = _graph(_node("k", "Linear", ["x"], in_features=6, out_features=4),
                      _node("v", "Linear", ["x"], in_features=6, out_features=5),
                      {"name": "a", "op": kind, "args": args, "inputs": ["x", "k", "v"]},
                      _node("o", "getitem", ["a"], index=0))
        specs = [spec]
    else:
        specs = [{"layers": [{"type": kind, "args": args}]},
                 _graph({"name": "layer", "op": kind, "args": args, "inputs": ["x"]})]
    for spec in specs:
        module = module_from_spec(json.loads(json.dumps(spec))).eval()
        size = spec_size(spec, shape)
        out = module(torch.randn(2, *shape))
        assert size.parameters == count_parameters(module)
        assert size.buffers == sum(b.numel() for b in module.buffers())
        assert size.output_shape == tuple(out.shape[1:])
        assert size.layers == len(spec.get("nodes", spec.get("layers", [])))


def test_every_layer_type_is_covered() -> None:
    assert {k for k, _, _ in _every_layer()} == set(LAYER_ARGS)


def test_spec_size_builds_nothing() -> None:
    """A trillion parameters are counted from the JSON (building them would need 4 TB)."""
    huge = {"layers": [{"type": "Linear", "args": {"in_features": 10**6, "out_features": 10**6}}]}
    size = spec_size(huge, (10**6,))
    assert size.parameters == 10**12 + 10**6
    assert size.max_width == 10**6 and size.activations == 10**6
    # a forward's multiply-adds per record, from shapes alone (and the input, one per value)
    assert 2 * 10**12 <= size.flops <= 2 * 10**12 + 10**6


def test_spec_size_sees_activation_blowups() -> None:
    """Zero-parameter specs whose activations explode are measured, or refused, by shape."""
    doubling = [_node("n0", "cat", ["x", "x"], dim=1)]
    doubling += [_node(f"n{i}", "cat", [f"n{i - 1}", f"n{i - 1}"], dim=1) for i in range(1, 30)]
    size = spec_size(_graph(*doubling), (4,))  # the last cat's input and output, alive at once
    assert size.parameters == 0 and size.activations == 2 * 2**30 + 4 * 2**30
    doubling += [_node(f"n{i}", "cat", [f"n{i - 1}", f"n{i - 1}"], dim=1) for i in range(30, 70)]
    with pytest.raises(ConfigError, match=r"node 'n\d+' \(cat\) does not accept its input"):
        spec_size(_graph(*doubling), (4,))
    padded = {"layers": [{"type": "Conv2d", "args": {"in_channels": 1, "out_channels": 1,
                                                     "kernel_size": 1, "padding": 50_000}}]}
    assert spec_size(padded).parameters == 2
    assert spec_size(padded, (1, 8, 8)).activations == 100_008**2
    with pytest.raises(ConfigError, match=r"layer 0 \(Linear\) does not accept its input"):
        spec_size({"layers": [{"type": "Linear", "args": {"in_features": 5, "out_features": 2}}]},
                  (4,))


def test_a_graph_is_sized_by_the_values_alive_at_once() -> None:
    """A chain of cheap nodes keeps two values alive (each is dropped after its last reader),
    however long; values that all wait for a final node add up."""
    chain = [_node("n0", "add", ["x"], other=1.0)]
    chain += [_node(f"n{i}", "add", [f"n{i - 1}"], other=1.0) for i in range(1, 120)]
    assert spec_size(_graph(*chain), (1000,)).activations == 2 * 1000
    fan = [_node(f"n{i}", "add", ["x"], other=float(i)) for i in range(50)]
    fan.append(_node("all", "cat", [f"n{i}" for i in range(50)], dim=1))
    # the 50 parts and their concatenation (the input is gone by then)
    assert spec_size(_graph(*fan), (1000,)).activations == 2 * 50 * 1000
    out = module_from_spec(_graph(*fan))(torch.ones(2, 1000))
    assert torch.equal(out[:, 1000 * 7:1000 * 8], torch.full((2, 1000), 8.0))


def test_graph_segment_runs_exactly_the_declared_nodes() -> None:
    spec = _graph(
        _node("fc", "Linear", ["x"], in_features=4, out_features=4),
        _node("relu", "relu", ["fc"]),
        {"name": "fc_1", "op": "Linear", "shares": "fc", "inputs": ["relu"]},
        _node("add", "add", ["fc_1", "x"]),
        _node("half", "mul", ["add"], other=0.5),
        _node("cat", "cat", ["half", "x"], dim=1),
        _node("n", "size", ["x"], dim=0),
        _node("out", "view", ["cat"], shape=["n", 2, -1]),
    )
    module = module_from_spec(spec)
    assert isinstance(module, GraphSegment)
    assert list(module.state_dict()) == ["layers.fc.weight", "layers.fc.bias"]
    x = torch.randn(3, 4)
    w, b = module.layers["fc"].weight, module.layers["fc"].bias
    want = torch.cat([(F.linear(torch.relu(F.linear(x, w, b)), w, b) + x) * 0.5, x], 1)
    assert torch.equal(module(x), want.view(3, 2, -1))
    assert describe(module, (4,)) == [
        "input x: (4,)",
        "fc = Linear(in_features=4, out_features=4)(x) -> (4,)  [20 params]",
        "relu = relu(fc) -> (4,)",
        "fc_1 = fc(relu) -> (4,)  [same layer as fc]",
        "add = add(fc_1, x) -> (4,)",
        "half = mul(add, other=0.5) -> (4,)",
        "cat = cat(half, x, dim=1) -> (8,)",
        "n = size(x, dim=0) -> 1",
        "out = view(cat, shape=['n', 2, -1]) -> (2, 4)",
        "output: out",
    ]
    assert spec_size(spec).parameters == 20  # the shared layer counts once


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.block, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = h + torch.relu(self.block(h))
        return self.out(h)


def test_spec_state_round_trips_into_the_model_owners_segment() -> None:
    torch.manual_seed(0)
    seg = split_model(Residual(), "add")[0]
    rebuilt = module_from_spec(module_to_spec(seg))
    state = spec_state(seg)
    assert list(state) == list(rebuilt.state_dict())
    changed = {k: v + 1 for k, v in state.items()}
    load_spec_state(seg, changed)
    assert all(torch.equal(spec_state(seg)[k], changed[k]) for k in changed)
    with pytest.raises(ConfigError, match="do not match"):
        load_spec_state(seg, {"layers.inp.weight": state["layers.inp.weight"]})


class MyLinear(nn.Linear):
    pass


@pytest.mark.parametrize("layer, fragment", [
    (nn.AvgPool2d(2, divisor_override=3), "divisor_override=3"),
    (nn.MaxPool2d(2, return_indices=True), "return_indices=True"),
    (nn.Linear(2, 2).double(), "weight weight (2, 2) torch.float64"),
    (MyLinear(2, 2), "test_spec.MyLinear) has no declared form"),
    (nn.Softmax(), "dim=None (NoneType) must be an int"),
    (nn.Bilinear(2, 2, 2), "torch.nn.modules.linear.Bilinear) has no declared form"),
])
def test_layers_the_spec_would_rebuild_differently_are_refused(layer: nn.Module,
                                                               fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        module_to_spec(nn.Sequential(layer))
    assert fragment in str(err.value)


def test_layer_with_a_forward_hook_is_refused() -> None:
    layer = nn.Linear(2, 2)
    layer.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(ConfigError, match="forward hooks"):
        module_to_spec(layer)


def test_graph_segment_trains_at_the_data_owner_like_the_unsplit_model() -> None:
    """A residual segment is proposed as a graph, reviewed node by node, approved and trained
    at the data owner; the weights end where local training puts them (1e-6)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(1)
    model = Residual()
    reference = copy.deepcopy(model)
    opt = OptimizerSpec("sgd", lr=0.1, momentum=0.9)
    ref_opt = opt.build(reference.parameters())
    dep = inprocess({"clinic": {"train": (x, y), "test": (x, y)}})
    plan = SplitPlan.vanilla(split_model(model, "add"), "clinic")
    session = SplitSession(plan, dep.transport, optimizer=opt)
    (pid,) = session.propose()["clinic"]
    review = dep.owners["clinic"].review(pid)
    assert "add = add(tanh, relu) -> (8,)" in review
    assert "block = Linear(in_features=8, out_features=8, bias=True)(tanh) -> (8,)  [72 params]" in review
    dep.approve_all({"clinic": [pid]})
    for step in range(4):
        idx = torch.arange(16 * step, 16 * step + 16)
        ref_opt.zero_grad()
        F.cross_entropy(reference(x[idx]), y[idx]).backward()
        ref_opt.step()
        session.zero_grad()
        loss, _ = session.loss("clinic", idx, y[idx])
        loss.backward()
        session.step()
    session.flush()
    remote = dep.owners["clinic"].export_weights(pid)
    local = split_model(reference, "add")[0]
    assert sorted(remote) == sorted(spec_state(local))
    assert max(float((remote[k] - v).abs().max()) for k, v in spec_state(local).items()) <= 1e-6
    moved = zip(reference.state_dict().values(), model.state_dict().values())
    assert max(float((a - b).abs().max()) for a, b in moved) > 1e-3  # training did move them


def test_host_refuses_a_mistyped_spec() -> None:
    x = torch.randn(8, 4)
    dep = inprocess({"h": {"train": (x, None)}})
    bad = {"layers": [{"type": "Linear", "args": {"in_features": 4.0, "out_features": 2}}]}
    with pytest.raises(ConfigError, match=r"in_features=4.0 \(float\) must be an int"):
        dep.transport.call("h", "propose", role="input", spec=bad, datasets=["train"],
                           optimizer={"name": "sgd"})
    assert dep.owners["h"].proposals() == []


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_scores_count_towards_the_activations(batch_first: bool) -> None:
    """MultiheadAttention materialises batch x heads x L x S scores (and their softmax) that
    are no node's value: they are counted while it runs, so many heads cost what they take."""
    length, embed, heads = 16, 32, 32
    # (batch, L, E), or transposed to (L, batch, E)
    seq = [] if batch_first else [_node("t", "transpose", ["x"], dim0=0, dim1=1)]
    spec = _graph(*seq, {"name": "att", "op": "MultiheadAttention", "inputs": ["x"] * 3 if
                         batch_first else ["t"] * 3, "args": {"embed_dim": embed, "num_heads": heads,
                                                              "batch_first": batch_first}},
                  _node("o", "getitem", ["att"], index=0))
    size = spec_size(spec, (length, embed))
    # its input, output, head-averaged weights (L x L), and 2 x heads x L x L per record
    assert size.activations == 2 * length * embed + length**2 + 2 * heads * length**2


def test_a_value_growing_faster_than_the_batch_is_refused() -> None:
    """An outer product across the batch, (B*D)^2, reshaped back to (B, 8): measured at one
    batch size and scaled linearly it looks like 8.5 MiB at 4096 records, but takes 16 GiB.
    Shapes are propagated at several batch sizes and such a value is refused by name."""
    quadratic = _graph(_node("s", "size", ["x"], dim=0),
                       _node("col", "reshape", ["x"], shape=[-1, 1]),
                       _node("row", "reshape", ["x"], shape=[1, -1]),
                       _node("m", "add", ["col", "row"]),
                       _node("r", "mean", ["m"], dim=1),
                       _node("o", "reshape", ["r"], shape=["s", -1]),
                       _node("fc", "Linear", ["o"], in_features=16, out_features=8))
    with pytest.raises(ConfigError, match=r"node 'm' \(add\): its value holds 256 elements for "
                                          r"1 record\(s\) and 1024 for 2: not proportional"):
        spec_size(quadratic, (16,))
    # a value that does not grow with the batch (mixing records) is refused too
    pooled = _graph(_node("m", "mean", ["x"], dim=0, keepdim=True), _node("o", "add", ["x", "m"]))
    with pytest.raises(ConfigError, match=r"node 'm' \(mean\).*not proportional"):
        spec_size(pooled, (16,))
    # the batch read from the input's size, as exported graphs do, is proportional
    flat = _graph(_node("s", "size", ["x"], dim=0), _node("o", "reshape", ["x"], shape=["s", -1]))
    assert spec_size(flat, (4, 4), max_batch=4096).activations == 2 * 16  # input and output


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) + x


def test_tied_or_frozen_weights_are_refused_not_silently_changed() -> None:
    """A spec rebuilds every layer with its own weights, all trained at the data owner: two
    layers holding one tensor would be untied and a frozen layer trained, so both refuse."""
    from torch import fx

    chain = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 4, bias=False))
    chain[2].weight = chain[0].weight
    graph = _Residual()
    graph.b.weight = graph.a.weight
    norms = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm1d(4))
    norms[1].running_mean = norms[0].running_mean
    tied = [(chain, r"layer 2 \(Linear\)'s weight is the same tensor as layer 0 \(Linear\)'s weight"),
            (fx.symbolic_trace(graph), r"node 'b' \(Linear\)'s weight is the same tensor as "
                                       r"node 'a' \(Linear\)'s weight"),
            (norms, r"layer 1 \(BatchNorm1d\)'s running_mean is the same tensor")]
    for module, message in tied:
        with pytest.raises(ConfigError, match=message + ".*cannot tie weights"):
            module_to_spec(module)
    frozen = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    frozen[0].requires_grad_(False)
    segment = module_from_spec(_graph(_node("fc", "Linear", ["x"], in_features=4, out_features=2)))
    segment.layers["fc"].bias.requires_grad_(False)
    traced = fx.symbolic_trace(_Residual())
    traced.b.weight.requires_grad_(False)
    for module, label in ((frozen, r"layer 0 \(Linear\)'s weight"), (segment, r"node 'fc' \(Linear\)'s bias"),
                          (traced, r"node 'b' \(Linear\)'s weight")):
        with pytest.raises(ConfigError, match=label + r" is frozen \(requires_grad=False\).*keep "
                                                      "the frozen layer at the model owner"):
            module_to_spec(module)
    # the same layer called twice shares its weights as declared (a graph's "shares")
    twice = _Residual()
    twice.b = twice.a
    nodes = module_to_spec(fx.symbolic_trace(twice))["nodes"]
    assert [n.get("shares") for n in nodes if n["op"] == "Linear"] == [None, "a"]


def test_a_training_forward_is_sized_by_every_value_it_keeps() -> None:
    """Without grad a chain holds one value at a time; a training forward keeps every layer's
    output until the gradient returns. ``training`` counts them all (an alias once)."""
    deep = {"layers": [{"type": "Tanh"} for _ in range(200)]}
    size = spec_size(deep, (4096,))
    assert size.activations == 4096 and size.training == 201 * 4096
    graph = _graph({"name": "att", "op": "MultiheadAttention", "inputs": ["x", "x", "x"],
                    "args": {"embed_dim": 8, "num_heads": 2, "batch_first": True}},
                   _node("o", "getitem", ["att"], index=0), _node("r", "relu", ["o"]))
    # input, the attention's output and weights, its scores, relu (the getitem names the output)
    assert spec_size(graph, (5, 8)).training == 40 + 40 + 25 + 2 * 2 * 25 + 40


def test_what_max_pooling_and_attention_dropout_keep_is_counted() -> None:
    """Measured against what autograd saves: a max pool also keeps its int64 indices (the
    estimate was 2.9x under for a chain of pools) and attention with dropout its mask and
    dropped weights (1.8x under)."""
    def saved_per_record(spec: dict, shape: tuple[int, ...]) -> float:
        m = module_from_spec(spec).train()
        x = torch.randn(4, *shape, requires_grad=True)
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = m(x)
        return (sum(seen.values()) + y.numel() * y.element_size()) / 4 / 4

    pools = {"layers": [{"type": "MaxPool2d", "args": {"kernel_size": 1, "stride": 1}}] * 20}
    attention = _graph({"name": "att", "op": "MultiheadAttention", "inputs": ["x", "x", "x"],
                        "args": {"embed_dim": 64, "num_heads": 8, "batch_first": True,
                                 "dropout": 0.1}, "call": {"need_weights": False}},
                       _node("o", "getitem", ["att"], index=0))
    for spec, shape in ((pools, (16, 32, 32)), (attention, (64, 64))):
        assert spec_size(spec, shape, max_batch=4).training >= saved_per_record(spec, shape)
