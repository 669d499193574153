"""The data contract: every problem listed with what to change, before any proposal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from syft_split import HostLimits, SplitPlan, SplitSession, contract, split_model
from syft_split.deploy import inprocess
from syft_split.errors import ConfigError
from syft_split.models import digits_cnn
from syft_split.topology import RELEASED

from .conftest import RewriteAnswers


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


def _set(field: str, value):
    """A describe answer of the data owner's choosing: ``train``'s ``field`` set to ``value``."""
    def fn(req: dict, answer: dict) -> dict:
        answer["datasets"]["train"][field] = value
        return answer
    return fn


MALFORMED = [("feature_shape", ["x"]), ("feature_shape", 7), ("feature_shape", [1] * 9),
             ("feature_shape", [1, 0, 8]), ("feature_shape", [True, 8, 8]),
             ("records", "many"), ("records", -1), ("records", 2.5),
             ("feature_dtype", 3), ("has_labels", "yes")]


@pytest.mark.parametrize(("field", "value"), MALFORMED, ids=[f"{f}={v!r}" for f, v in MALFORMED])
def test_a_malformed_describe_answer_is_a_config_error_naming_party_and_field(field, value) -> None:
    plan = _digits_plan(datasets=["train"])
    dep = inprocess({"hospital_a": {"train": (_x(), _y())}})
    lying = RewriteAnswers(dep.transport, "hospital_a", "describe", _set(field, value))
    with pytest.raises(ConfigError, match=rf"^hospital_a: .*datasets\['train'\]\.{field} is "):
        SplitSession(plan, lying).propose()
    with pytest.raises(ConfigError, match=rf"datasets\['train'\]\.{field} is "):
        contract.check_parties(plan, lying)
    assert lying.rewritten == 2 and dep.owners["hospital_a"].proposals() == []


def test_a_describe_answer_of_the_wrong_form_is_a_config_error() -> None:
    plan = _digits_plan(datasets=["train"])
    for answer, says in (({"datasets": [1, 2]}, "has datasets = [1, 2]"),
                         ({"datasets": {"train": 5}}, "datasets['train'] is 5"),
                         ({"datasets": {"train": {"feature_shape": [1, 8, 8]}}},
                          "records is None")):
        with pytest.raises(ConfigError, match=r"^hospital_a: its describe answer") as err:
            contract.check(plan, {"hospital_a": answer})
        assert says in str(err.value)


def test_a_describe_answer_without_datasets_is_a_config_error_in_the_session() -> None:
    """The session read ``describe``'s ``datasets`` unchecked: an answer without it was a raw
    KeyError."""
    plan = _digits_plan(datasets=["train"])
    dep = inprocess({"hospital_a": {"train": (_x(), _y())}})
    lying = RewriteAnswers(dep.transport, "hospital_a", "describe", lambda req, a: {"x": 1})
    with pytest.raises(ConfigError, match=r"^hospital_a: its describe answer"):
        SplitSession(plan, lying).propose()
    assert dep.owners["hospital_a"].proposals() == []


def test_features_past_the_bound_are_a_problem_before_any_dry_run() -> None:
    """A data owner declares huge records: the model owner allocates nothing for them (it
    dry-ran its segment on zeros of that shape: (1, 6000, 6000) took 24 s and 5 GB)."""
    runs: list[tuple[int, ...]] = []
    seg = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(4), nn.Flatten())  # any H x W
    seg.register_forward_pre_hook(lambda m, args: runs.append(tuple(args[0].shape)))

    def plan(**kwargs) -> SplitPlan:
        return SplitPlan.vanilla([seg, nn.Linear(32, 4)], "hospital_a", datasets=["train"],
                                 **kwargs)

    dep = inprocess({"hospital_a": {"train": (_x(), _y())}})
    lying = RewriteAnswers(dep.transport, "hospital_a", "describe",
                           _set("feature_shape", [1, 2000, 2000]))
    with pytest.raises(ConfigError) as err:
        SplitSession(plan(), lying).propose()
    assert "features (1, 2000, 2000) per record" in str(err.value)
    assert "max_feature_bytes" in str(err.value) and "16384000000 bytes" in str(err.value)
    [problem] = contract.check_parties(plan(), lying)
    assert "max_feature_bytes" in problem
    assert runs == [] and dep.owners["hospital_a"].proposals() == []
    # the bound is the plan's: 1024 records of (1, 8, 8) are 262 144 bytes
    assert contract.check_parties(plan(max_feature_bytes=262_144), dep.transport) == []
    [problem] = contract.check_parties(plan(max_feature_bytes=262_143), dep.transport)
    assert "262144 bytes (float32), more than the model owner's bound 262143" in problem
    assert plan().max_feature_bytes == HostLimits().max_activation_bytes  # the host's default
    with pytest.raises(ConfigError, match="max_feature_bytes must be a positive int"):
        plan(max_feature_bytes=0)
