"""The data contract: every problem listed with what to change, before any proposal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from syft_split import SplitPlan, SplitSession, contract, split_model
from syft_split.deploy import inprocess
from syft_split.errors import ConfigError
from syft_split.models import digits_cnn
from syft_split.topology import RELEASED


def _digits_plan(**kwargs) -> SplitPlan:
    return SplitPlan.vanilla(split_model(digits_cnn(channels=4, hidden=16), "pool1"),
                             "hospital_a", **kwargs)


def _x(n: int = 20, shape: tuple[int, ...] = (1, 8, 8)) -> torch.Tensor:
    return torch.rand(n, *shape)


def _y(n: int = 20) -> torch.Tensor:
    return torch.randint(0, 10, (n,))


def test_fitting_datasite_has_no_problems_and_trains() -> None:
    plan = _digits_plan(labels=RELEASED)
    dep = inprocess({"hospital_a": {"train": (_x(), _y()), "test": (_x(8), _y(8))}})
    assert contract.check_datasite(plan, dep.owners["hospital_a"]) == []
    assert contract.check_parties(plan, dep.transport) == []
    SplitSession(plan, dep.transport).propose()  # the same data passes the session's hook


def test_missing_test_dataset_says_what_is_expected() -> None:
    """The README's old example: only "train" installed."""
    plan = _digits_plan()
    dep = inprocess({"hospital_a": {"train": (_x(), _y())}})
    [problem] = contract.check_datasite(plan, dep.owners["hospital_a"])
    assert "no dataset 'test' (it has ['train'])" in problem
    assert "datasets=['train']" in problem and "test_dataset=None" in problem
    with pytest.raises(ConfigError) as err:
        SplitSession(plan, dep.transport).propose()
    text = str(err.value)
    assert "no dataset 'test'" in text and "Data contract of this plan" in text
    assert "shape (1, H, W)" in text
    assert dep.owners["hospital_a"].proposals() == []  # nothing was proposed anywhere


def test_every_problem_is_listed_at_once() -> None:
    plan = _digits_plan(labels=RELEASED)
    dep = inprocess({"hospital_a": {"train": (_x(shape=(3, 8, 8)), None),
                                    "test": (_x(shape=(64,)), _y())}})
    problems = contract.check_parties(plan, dep.transport)
    text = "\n".join(problems)
    assert "'train' has no labels" in text and "labels=RELEASED" in text
    assert "features (3, 8, 8) float32" in text and "expected (1, H, W)" in text
    assert "features (64,) float32" in text
    assert "different feature shapes" in text
    assert len(problems) == 4


def test_contract_text_per_topology() -> None:
    released = contract.explain(_digits_plan(labels=RELEASED))
    assert "released to the model owner" in released and "(1, H, W)" in released
    assert '"train": (features, labels), "test": (features, labels)' in released
    mo = contract.explain(_digits_plan())
    assert "not needed here" in mo
    u = SplitPlan.u_shaped(split_model(digits_cnn(channels=4, hidden=16), ["pool1", "relu3"]),
                           "h")
    assert "the data owner computes the loss" in contract.explain(u)
    mlp = SplitPlan.vanilla([nn.Sequential(nn.Linear(30, 8), nn.ReLU()), nn.Linear(8, 2)], "bank")
    assert "shape (30,)" in contract.explain(mlp)
    dep = inprocess({"bank": {"train": (torch.randint(0, 5, (10, 30)), _y(10)),
                              "test": (torch.rand(10, 30), _y(10))}})
    [problem] = contract.check_datasite(mlp, dep.owners["bank"])
    assert "'train' has int64 features" in problem and "float32" in problem


def test_vertical_plan_needs_ids_then_alignment() -> None:
    encoders = {p: nn.Sequential(nn.Linear(4, 2)) for p in ("bank", "shop")}
    plan = SplitPlan.vertical(encoders, nn.Linear(4, 2), datasets=["train@aligned"])
    ids = [f"p{i}" for i in range(10)]
    dep = inprocess({"bank": {"train": (torch.rand(10, 4), None, ids)},
                     "shop": {"train": (torch.rand(10, 4), None)}})
    problems = contract.check_parties(plan, dep.transport)
    assert any("bank: no dataset 'train@aligned' yet" in p and "align_records" in p
               and "has no record ids" not in p for p in problems)
    assert any(p.startswith("shop: no dataset 'train@aligned' yet") and "has no record ids" in p
               for p in problems)
    assert "record ids" in contract.explain(plan)
    meta = {"shop": {"datasets": {"train@aligned": {"records": 10, "feature_shape": [4],
                                                    "feature_dtype": "float32",
                                                    "has_labels": False, "has_ids": True}}},
            "bank": {"train@aligned": {"records": 10, "feature_shape": [5],
                                       "feature_dtype": "float32", "has_labels": False,
                                       "has_ids": True}}}
    [problem] = contract.check(plan, meta)
    assert problem.startswith("bank: dataset 'train@aligned' has features (5,)")
    meta["bank"]["train@aligned"].update(feature_shape=[4], records=9)
    [problem] = contract.check(plan, meta)
    assert "different numbers of records per party" in problem
    # pre-aligned datasets (no ids, aligned out of band) fit a vertical plan
    pre = SplitPlan.vertical(encoders, nn.Linear(4, 2))
    dep = inprocess({p: {"train": (torch.rand(10, 4), None), "test": (torch.rand(5, 4), None)}
                     for p in ("bank", "shop")})
    assert contract.check_parties(pre, dep.transport) == []


def test_check_datasite_needs_to_know_the_party() -> None:
    plan = SplitPlan.vanilla(split_model(digits_cnn(channels=4, hidden=16), "pool1"), ["a", "b"])
    with pytest.raises(ConfigError, match=r"pass party= one of \['a', 'b'\]"):
        contract.check_datasite(plan, {"host": "c", "datasets": {}})
    assert contract.check_datasite(plan, {"datasets": {}}, party="b")[0].startswith("b: no dataset")
    with pytest.raises(ConfigError, match="expected a DatasiteConsole"):
        contract.check_datasite(plan, 42)
