"""Labels must not reach a malicious model owner through error messages or refusals.

A loss computed at the data owner (U-shaped loss segment, local-loss auxiliary head, a locally
trained federated model) on a head with fewer outputs than classes fails with torch's
``IndexError: Target <label> is out of bounds.``: the message is the record's label. The host
refuses such heads at proposal, and no unexpected exception's text leaves (only its type).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from syft_split import OptimizerSpec, wire
from syft_split.host.core import DataOwnerHost
from syft_split.host.records import Dataset, HostLimits
from syft_split.spec import module_to_spec, spec_state

SGD = OptimizerSpec("sgd", lr=0.1).to_json()
N, K = 32, 10


def call(host: DataOwnerHost, op: str, **f: Any) -> dict[str, Any]:
    return wire.decode(host.handle("mo", wire.encode({"op": op, **f})))


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {f"state/{k}": v for k, v in spec_state(m).items()}


def _host() -> tuple[DataOwnerHost, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    host = DataOwnerHost("do", limits=HostLimits(max_records_per_minute=10_000))
    y = torch.randint(0, K, (N,), generator=g)
    y[0] = K - 1  # the largest class is present
    host.add_dataset("train", torch.randn(N, 8, generator=g), y)
    return host, y


def _propose_loss(host: DataOwnerHost, head: nn.Module) -> dict[str, Any]:
    return call(host, "propose", role="loss", spec=module_to_spec(head), datasets=["train"],
                optimizer=SGD, input_shape=[12], loss="cross_entropy", **_state(head))


@pytest.mark.parametrize("width", [1, K - 1])
def test_a_cross_entropy_head_narrower_than_the_classes_is_refused(width: int) -> None:
    host, _ = _host()
    r = _propose_loss(host, nn.Linear(12, width))
    assert r.get("error") == "ConfigError", r
    assert "as many outputs as its datasets have classes" in r["message"]
    assert host.proposals() == []
    # the auxiliary head of a local loss, and a locally trained (federated) model
    seg = nn.Linear(8, 4)
    sid = call(host, "propose", role="input", spec=module_to_spec(seg), datasets=["train"],
               optimizer=SGD, **_state(seg))["segment"]
    aux = nn.Linear(4, width)
    r = call(host, "propose_local_loss", segment=sid, spec=module_to_spec(aux),
             loss="cross_entropy", optimizer=SGD, **_state(aux))
    assert r.get("error") == "ConfigError", r
    assert "as many outputs" in r["message"]
    model = nn.Linear(8, width)
    r = call(host, "fl_propose", spec=module_to_spec(model), datasets=["train"],
             optimizer=SGD, loss="cross_entropy", **_state(model))
    assert r.get("error") == "ConfigError", r
    assert "as many outputs" in r["message"]
    # wide enough: accepted
    assert "error" not in _propose_loss(host, nn.Linear(12, K))
    assert "error" not in call(host, "propose_local_loss", segment=sid,
                               spec=module_to_spec(nn.Linear(4, K)), loss="cross_entropy",
                               optimizer=SGD, **_state(nn.Linear(4, K)))


def test_an_unexpected_errors_text_stays_in_the_audit_log() -> None:
    """The reviewer's attack (one-logit loss head, one record per call: 64/64 labels read
    from the error messages) cannot be proposed any more; an error the host did not foresee
    (here: the data owner later adds a class the approved head has no output for) still
    leaves as its type only, its text kept in the data owner's audit entry."""
    host, y = _host()
    head = nn.Linear(12, K)
    pid = _propose_loss(host, head)["segment"]
    host.approve(pid)
    y2 = y.clone()
    y2[5] = 37
    host.datasets["train"] = Dataset(host.datasets["train"].features, y2)
    r = call(host, "loss_step", segment=pid, x=torch.zeros(1, 12), indices=torch.tensor([5]),
             train=False)
    assert r["error"] == "RemoteError"
    assert "IndexError" in r["message"] and "audit log" in r["message"]
    assert "37" not in r["message"] and "Target" not in r["message"]
    assert "Target 37 is out of bounds" in host.audit[-1].outcome
    # the same record with a valid label answers
    r = call(host, "loss_step", segment=pid, x=torch.zeros(1, 12), indices=torch.tensor([4]),
             train=False)
    assert "error" not in r and r["count"] == 1
