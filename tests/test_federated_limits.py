"""The data owner's limits on a locally trained (FedAvg) model, found in review: evaluating
weights of the model owner's choice is counted by the record rate cap (it was an unlimited
oracle), what the review says leaves, and the data owner's minimum batch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from syft_split import ConfigError, EgressError, HostLimits, OptimizerSpec, ValidationError
from syft_split.deploy import inprocess
from syft_split.federated import FederatedTrainer

J = 5  # the feature the model owner's chosen weights read


def _local(**limits):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g)
    dep = inprocess({"a": {"train": (x, y), "test": (x, y)}}, limits=HostLimits(**limits))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
    fl = FederatedTrainer(model, dep.transport, ["a"], optimizer=OptimizerSpec("sgd", lr=0.1),
                          batch_size=40)
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


def test_the_review_says_an_update_can_be_a_record() -> None:
    """One fl_train (within the cap) with weights that let one record through returns that
    record: the review no longer says records stay here, nor that the model owner can never
    write the weights (it sends them every call), and names the minimum batch."""
    dep, _, seg, x, _ = _local()
    review = dep.owners["a"].review(seg)
    assert "AN UPDATE OR GRADIENT CAN BE A RECORD" in review
    assert "a gradient may be of ONE record" in review
    assert "stay here" not in review and "never write" not in review
    xs = x.flatten(1)[:, J].sort().values
    sent = _probe(float(xs[-1] + xs[-2]) / 2)
    sent["state/3.weight"][0, 0] = 10.0
    dep.owners["a"].approve(seg)
    out = dep.transport.call("a", "fl_train", segment=seg, dataset="train", batch_size=40,
                             **sent)
    d_w = out["state/1.weight"][0] - sent["state/1.weight"][0]
    d_b = out["state/1.bias"][0] - sent["state/1.bias"][0]
    top = int(x.flatten(1)[:, J].argmax())
    assert float((d_w / d_b - x.flatten(1)[top]).abs().max()) < 1e-4  # what the review says
    strict, *_ = _local(min_local_batch=8)
    (other,) = FederatedTrainer(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), strict.transport,
                                ["a"]).propose()["a"]
    assert "covers at least 8 records" in strict.owners["a"].review(other)


def test_the_data_owners_minimum_batch_for_local_training() -> None:
    """``HostLimits.min_local_batch``: fl_gradient of fewer records is refused (one record's
    gradient gives it and its label exactly), fl_train's batch_size too, and a short last
    batch of an epoch joins the one before it."""
    with pytest.raises(ConfigError, match="min_local_batch"):
        HostLimits(min_local_batch=0)
    dep, fl, seg, *_ = _local(min_local_batch=8)
    dep.owners["a"].approve(seg)
    t = dep.transport
    state = {f"state/{k}": v for k, v in fl.module.state_dict().items()}
    for n in (1, 7):
        with pytest.raises(ValidationError, match="minimum batch is 8"):
            t.call("a", "fl_gradient", segment=seg, indices=torch.arange(n), **state)
    assert t.call("a", "fl_gradient", segment=seg, indices=torch.arange(8), **state)["count"] == 8
    # one record's index repeated is one record (its exact gradient): refused too
    for idx in (torch.full((8,), 3), torch.tensor([0, 1, 2, 3, 4, 5, 6, 6])):
        with pytest.raises(ValidationError, match=r"(7|1) distinct records"):
            t.call("a", "fl_gradient", segment=seg, indices=idx, **state)
    with pytest.raises(ValidationError, match="batch_size must be an int in 8"):
        t.call("a", "fl_train", segment=seg, batch_size=4, **state)
    out = t.call("a", "fl_train", segment=seg, batch_size=12, **state)  # 12, 12, 12 + 4
    assert (out["records"], out["steps"]) == (40, 3)
    out = t.call("a", "fl_train", segment=seg, batch_size=16, **state)  # 16, 16, 8: kept
    assert (out["records"], out["steps"]) == (40, 3)
    plain, _, seg1, *_ = _local()
    plain.owners["a"].approve(seg1)
    out = plain.transport.call("a", "fl_train", segment=seg1, batch_size=12, **state)
    assert out["steps"] == 4  # no minimum: the last batch of 4 is a step of its own


def test_one_fl_train_call_trains_on_at_most_max_local_records() -> None:
    """``HostLimits.max_local_records`` bounds what one ``fl_train`` call computes (epochs x
    records): 100 epochs at batch 1 held the host, and the data owner's console, for as long
    as the model owner liked. Refused before anything is loaded; fewer epochs per call run."""
    with pytest.raises(ConfigError, match="max_local_records"):
        HostLimits(max_local_records=0)
    dep, _, seg, *_ = _local(max_local_records=100)  # 40 records
    dep.owners["a"].approve(seg)
    host, t = dep.owners["a"], dep.transport
    assert "at most 100 records" in host.review(seg)
    before = {k: v.clone() for k, v in host.export_weights(seg).items()}
    state = {f"state/{k}": torch.ones_like(v) for k, v in before.items()}
    with pytest.raises(ConfigError, match=r"120 records; .* at most 100 .*max_local_records"):
        t.call("a", "fl_train", segment=seg, epochs=3, batch_size=1, **state)
    after = host.export_weights(seg)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing loaded
    assert host.runtimes[seg].steps == 0
    out = t.call("a", "fl_train", segment=seg, epochs=2, batch_size=1, **state)
    assert (out["records"], out["steps"]) == (40, 80)


def test_a_dataset_larger_than_max_local_records_is_said_at_review_and_refusal() -> None:
    """A dataset with more records than ``max_local_records`` can never run ``fl_train``, even at
    one epoch: the review says so before approval, and the refusal says that fewer epochs
    cannot help (it used to advise them) while fl_gradient still runs."""
    dep, _, seg, *_ = _local(max_local_records=30)  # 40 records
    host, t = dep.owners["a"], dep.transport
    review = host.review(seg)
    assert "dataset 'train' has 40 records" in review and "at least 40" in review
    ok, _, seg_ok, *_ = _local(max_local_records=40)
    assert "NOTE: dataset" not in ok.owners["a"].review(seg_ok)  # control: it fits
    host.approve(seg)
    state = {f"state/{k}": v.clone() for k, v in host.export_weights(seg).items()}
    with pytest.raises(ConfigError, match=r"no call can train on it: .* at least 40") as err:
        t.call("a", "fl_train", segment=seg, epochs=1, **state)
    assert "fewer epochs" not in str(err.value)
    out = t.call("a", "fl_gradient", segment=seg, indices=torch.arange(8), **state)
    assert out["count"] == 8
