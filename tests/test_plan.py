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


class Custom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_plan_collects_every_problem_at_once() -> None:
    segs = split_model(digits_cnn(), "pool1")
    with pytest.raises(ConfigError) as err:
        SplitPlan(segs, [MODEL_OWNER, "somebody"], [], labels="nowhere", loss="hinge")
    msg = str(err.value)
    for part in ("first segment must be a data owner", "relay party", "data_owners",
                 "labels must be at", "loss must be one of"):
        assert part in msg


def test_custom_layers_cannot_be_placed_on_a_data_owner() -> None:
    with pytest.raises(ConfigError, match="Custom"):
        SplitPlan.vanilla([nn.Sequential(Custom()), nn.Linear(4, 2)], "a")


def test_u_shaped_needs_labels_at_data_owner_and_release_is_refused() -> None:
    segs = split_model(digits_cnn(), ["pool1", "relu3"])
    with pytest.raises(ConfigError, match="labels must be too"):
        SplitPlan(segs, [DATA_OWNER, MODEL_OWNER, DATA_OWNER], ["a"], labels=MODEL_OWNER)


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
