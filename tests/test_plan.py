"""Bad plans fail with one clear error before anything is sent."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from syft_split import (
    DATA_OWNER,
    MODEL_OWNER,
    ApprovalError,
    AuthorizationError,
    ConfigError,
    InProcessTransport,
    OptimizerSpec,
    SplitPlan,
    SplitSession,
    split_model,
)
from syft_split.deploy import inprocess
from syft_split.models import digits_cnn
from syft_split.topology import RELEASED, Node, Task


class Custom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_plan_collects_every_problem_at_once() -> None:
    segs = split_model(digits_cnn(), "pool1")
    with pytest.raises(ConfigError) as err:
        SplitPlan.chain(segs, [MODEL_OWNER, "somebody"], [], labels="nowhere", loss="hinge")
    msg = str(err.value)
    for part in ("belongs to the model owner, who has none", "labels must be at",
                 "loss must be one of"):
        assert part in msg


def test_custom_layers_cannot_be_placed_on_a_data_owner() -> None:
    with pytest.raises(ConfigError, match="Custom"):
        SplitPlan.vanilla([nn.Sequential(Custom()), nn.Linear(4, 2)], "a")


def test_u_shaped_needs_labels_at_data_owner_and_release_is_refused() -> None:
    segs = split_model(digits_cnn(), ["pool1", "relu3"])
    with pytest.raises(ConfigError, match="so the labels must be there too"):
        SplitPlan.chain(segs, [DATA_OWNER, MODEL_OWNER, DATA_OWNER], ["a"], labels=MODEL_OWNER)
    with pytest.raises(ConfigError, match="need the output segment there too"):
        SplitPlan.chain(segs, [DATA_OWNER, MODEL_OWNER, MODEL_OWNER], ["a"], labels=DATA_OWNER)


def test_unknown_party_and_optimizer_errors() -> None:
    plan = SplitPlan.vanilla(split_model(digits_cnn(), "pool1"), "nobody")
    with pytest.raises(ConfigError, match="not reachable"):
        SplitSession(plan, InProcessTransport([]))
    with pytest.raises(ConfigError, match="does not take"):
        OptimizerSpec("sgd", betas=(0.9, 0.99))
    with pytest.raises(ConfigError, match="not supported"):
        OptimizerSpec("lbfgs")


def test_approval_and_driver_are_enforced() -> None:
    x, y = torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,))
    dep = inprocess({"a": {"train": (x, y), "test": (x, y)}})
    plan = SplitPlan.vanilla(split_model(digits_cnn(4, 8), "pool1"), "a")
    session = SplitSession(plan, dep.transport)
    (pid,) = session.propose()["a"]
    assert session.status() == {pid: "pending"}
    with pytest.raises(ApprovalError, match="pending"):
        session.loss("a", torch.arange(4), y[:4])
    review = dep.owners["a"].review(pid)
    assert "Conv2d" in review and "leaves per step" in review and "model-owner@" in review
    dep.owners["a"].approve(pid)
    intruder = InProcessTransport([dep.owners["a"]], user="mallory@example.org")  # type: ignore[list-item]
    with pytest.raises(AuthorizationError, match="mallory"):
        intruder.call("a", "forward", segment=pid, indices=torch.arange(3))
    loss, _ = session.loss("a", torch.arange(4), y[:4])
    loss.backward()
    audit = dep.owners["a"].audit_log()
    assert [e["op"] for e in audit][:2] == ["describe", "propose"]
    assert any(e["caller"] == "mallory@example.org" and "Authorization" in e["outcome"]
               for e in audit)


def test_segment_without_an_owner() -> None:
    segs = split_model(digits_cnn(), "pool1")
    with pytest.raises(ConfigError, match=r"segment 1 .* has no owner"):
        SplitPlan.chain(segs, [DATA_OWNER, ""], "a")


def test_labels_at_two_parties_in_a_vertical_plan() -> None:
    enc = {"bank": nn.Linear(3, 4), "shop": nn.Linear(2, 4)}
    with pytest.raises(ConfigError, match="in a vertical plan the model owner holds the labels"):
        plan = SplitPlan.vertical(enc, nn.Linear(8, 2))
        SplitPlan(plan.nodes, [Task(2, labels=RELEASED)])


def test_merge_shapes_that_do_not_meet_fail_before_training() -> None:
    enc = {"bank": nn.Linear(3, 4), "shop": nn.Linear(2, 5)}
    plan = SplitPlan.vertical(enc, nn.Linear(8, 2), merge="sum")
    x = torch.zeros(6, 3)
    dep = inprocess({"bank": {"train": (x, None), "test": (x, None)},
                     "shop": {"train": (x[:, :2], None), "test": (x[:, :2], None)}})
    session = SplitSession(plan, dep.transport)
    with pytest.raises(ConfigError, match="cannot merge"):
        session.propose()
    assert all(not dep.owners[p].proposals() for p in ("bank", "shop"))  # nothing was sent


def test_mixing_data_owner_placeholder_and_vertical_parties() -> None:
    nodes = [Node(nn.Linear(2, 2), DATA_OWNER), Node(nn.Linear(2, 2), "bank"),
             Node(nn.Linear(4, 2), MODEL_OWNER, (0, 1))]
    with pytest.raises(ConfigError, match="not both"):
        SplitPlan(nodes, [Task(2)], ["a"])


def test_unused_output_and_task_on_inner_segment() -> None:
    nodes = [Node(nn.Linear(2, 2), DATA_OWNER), Node(nn.Linear(2, 2), MODEL_OWNER, (0,)),
             Node(nn.Linear(2, 2), MODEL_OWNER, (0,))]
    with pytest.raises(ConfigError) as err:
        SplitPlan(nodes, [Task(2), Task(0, name="aux")], ["a"])
    assert "used by nothing" in str(err.value) and "feeds other segments" in str(err.value)


def test_a_tensor_shared_between_model_owner_and_remote_segments_is_refused() -> None:
    shared = nn.Linear(4, 4)
    with pytest.raises(ConfigError, match=r"shares '0\.weight' with model-owner segment 1"):
        SplitPlan.vanilla([nn.Sequential(shared, nn.ReLU()), nn.Sequential(shared)], "h")


def test_a_parameter_under_two_optimizers_is_refused() -> None:
    shared = nn.Linear(4, 4)
    trunk = nn.Sequential(nn.Linear(4, 4))
    plan = SplitPlan.multi_task([trunk], {"a": nn.Sequential(shared, nn.Linear(4, 2)),
                                          "b": nn.Sequential(shared, nn.Linear(4, 2))}, "h")
    plan.nodes[2].optimizer = OptimizerSpec("adam", lr=1e-3)
    dep = inprocess({"h": {"train": (torch.randn(4, 4), None)}})
    with pytest.raises(ConfigError, match="share a parameter under two optimizers"):
        SplitSession(plan, dep.transport)
