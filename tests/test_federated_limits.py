"""The data owner's limits on a locally trained (FedAvg) model, found in review: evaluating
weights of the model owner's choice is counted by the record rate cap (it was an unlimited
oracle), and what the review says leaves."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from syft_split import EgressError, HostLimits, OptimizerSpec
from syft_split.deploy import inprocess
from syft_split.federated import FederatedTrainer

J = 5  # the feature the model owner's chosen weights read


def _local(**limits):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g)
    dep = inprocess({"a": {"train": (x, y), "test": (x, y)}}, limits=HostLimits(**limits))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
    fl = FederatedTrainer(model, dep.transport, ["a"], optimizer=OptimizerSpec("sgd", lr=0.1))
    (seg,) = fl.propose()["a"]
    return dep, fl, seg, x, y


def _probe(threshold: float) -> dict[str, torch.Tensor]:
    """Weights whose loss tells whether any record's feature J is above ``threshold``."""
    w1, b1, w2 = torch.zeros(8, 64), torch.zeros(8), torch.zeros(10, 8)
    w1[0, J], b1[0], w2[0, 0] = 1.0, -threshold, 1000.0
    return {"state/1.weight": w1, "state/1.bias": b1, "state/3.weight": w2,
            "state/3.bias": torch.zeros(10)}


def test_fl_evaluate_is_counted_by_the_record_rate_cap() -> None:
    """Each fl_evaluate gives figures of every record under weights the model owner chose: a
    binary search over ~40 calls read one record's feature. Now each call counts all 40
    records against 60 a minute: the second is refused, and so is training after it."""
    dep, fl, seg, x, _ = _local(max_records_per_minute=60)
    dep.owners["a"].approve(seg)
    t = dep.transport
    lo, hi, answered = -10.0, 10.0, 0
    with pytest.raises(EgressError, match="would release 80 records in a minute"):
        for _ in range(40):
            mid = (lo + hi) / 2
            out = t.call("a", "fl_evaluate", segment=seg, dataset="train", **_probe(mid))
            answered += 1
            lo, hi = (mid, hi) if abs(out["loss_sum"] - 40 * math.log(10)) > 1e-3 else (lo, mid)
    assert answered == 1 and hi - lo == 10.0  # one bit of the 40 the search needed
    assert abs(hi - float(x.flatten(1)[:, J].max())) > 1e-3
    state = {f"state/{k}": v for k, v in fl.module.state_dict().items()}
    with pytest.raises(EgressError, match="would release 80 records"):
        t.call("a", "fl_train", segment=seg, **state)
