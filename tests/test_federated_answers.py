"""A malicious data owner against the model owner's federated baselines: every answer it sends
(weights, gradients, counts, evaluation figures, describe) is checked before anything is
averaged; a bad answer drops that data owner (named in the report), never a raw exception,
never averaged in. FedAvg weights by the record counts describe gave, not by reported ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from syft_split import ConfigError, ValidationError
from syft_split.deploy import inprocess
from syft_split.federated import MAX_ABS_VALUE, FederatedTrainer
from syft_split.host import HostLimits

from .conftest import RewriteAnswers

N = {"a": 32, "m": 16}


def _data(party: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(sorted(N).index(party))
    return {name: (torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g))
            for name, n in (("train", N[party]), ("test", 12))}


def _model(bn: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8) if bn else nn.Identity(), nn.ReLU(),
                         nn.Linear(8, 4))


def _trainer(parties, op: str = "", craft=None, *, bn: bool = False,
             algorithm: str = "fedavg", **kwargs) -> FederatedTrainer:
    """A trainer over ``parties``; "m" answers ``op`` as ``craft(answer)`` says."""
    dep = inprocess({p: _data(p) for p in parties})
    transport = dep.transport
    if craft is not None:
        transport = RewriteAnswers(dep.transport, "m", op, lambda req, answer: craft(answer))
    fl = FederatedTrainer(_model(bn), transport, parties, batch_size=8, algorithm=algorithm,
                          **kwargs)
    dep.approve_all(fl.propose())
    return fl


def _set(key: str, value):
    return lambda r: {**r, key: value}


def _tensor(key: str, fn):
    return lambda r: {**r, key: fn(r[key])}


def _without(key: str):
    return lambda r: {k: v for k, v in r.items() if k != key}


def _replacement(r):
    """Every weight 7 and a count that would make it the whole average."""
    state = {k: torch.full_like(v, 7.0) for k, v in r.items()
             if k.startswith("state/") and v.is_floating_point()}
    return {**r, **state, "records": 10**12}


def _same(x: FederatedTrainer, y: FederatedTrainer) -> bool:
    a, b = x.state_dict(), y.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _dropped(fl: FederatedTrainer, phase: str, field: str, cls: str) -> str:
    """m, and only m, was dropped at ``phase`` by a ``cls`` refusing its answer's ``field``."""
    [failure] = fl.report.party_failures
    assert failure["party"] == "m" and failure["phase"] == phase and "m" in fl.dropped
    assert failure["error"].startswith(f"{cls}: m's answer to {phase!r} has a bad field "
                                       f"{field!r}: "), failure["error"]
    return failure["error"]


TRAIN = {
    "records 10**12, weights 7": (_replacement, "records", "ValidationError"),
    "records -31.999": (_set("records", -31.999), "records", "ValidationError"),
    "records 'x'": (_set("records", "x"), "records", "ValidationError"),
    "records 17 (describe: 16)": (_set("records", 17), "records", "ValidationError"),
    "records True": (_set("records", True), "records", "ValidationError"),
    "steps -1": (_set("steps", -1), "steps", "ValidationError"),
    "correct 17 of 16": (_set("correct", 17), "correct", "ValidationError"),
    "loss_sum -1": (_set("loss_sum", -1.0), "loss_sum", "ValidationError"),
    "a state key missing": (_without("state/0.weight"), "state/*", "ValidationError"),
    "an extra state key": (_set("state/extra", torch.zeros(2)), "state/*", "ValidationError"),
    "a weight of another shape": (_tensor("state/0.weight", lambda v: v[:1]),
                                  "state/0.weight", "ShapeError"),
    "a float64 weight": (_tensor("state/0.weight", lambda v: v.double()),
                         "state/0.weight", "DTypeError"),
    "a NaN weight": (_tensor("state/0.weight", lambda v: torch.full_like(v, float("nan"))),
                     "state/0.weight", "NonFiniteError"),
    "a 3e38 weight": (_tensor("state/0.weight", lambda v: torch.full_like(v, 3e38)),
                      "state/0.weight", "ValidationError"),
    # every data owner's host refuses these when the first answer's is sent on next round
    "num_batches_tracked 10**8": (_tensor("state/1.num_batches_tracked",
                                          lambda v: torch.full_like(v, 10**8)),
                                  "state/1.num_batches_tracked", "ValidationError"),
    "num_batches_tracked -1": (_tensor("state/1.num_batches_tracked",
                                       lambda v: torch.full_like(v, -1)),
                               "state/1.num_batches_tracked", "ValidationError"),
}


@pytest.mark.parametrize(("craft", "field", "cls"), list(TRAIN.values()), ids=list(TRAIN))
def test_a_bad_fl_train_answer_drops_its_party_and_is_never_averaged(craft, field, cls) -> None:
    fl = _trainer(["m", "a"], "fl_train", craft, bn=True)  # m's answer would come first
    answers = fl.fedavg_round()
    assert list(answers) == ["a"]
    _dropped(fl, "fl_train", field, cls)
    only_a = _trainer(["a"], bn=True)
    only_a.fedavg_round()
    assert _same(fl, only_a)  # the global model is a's alone: nothing of m's answer in it
    fl.fedavg_round()  # m stays out; the run goes on
    assert len(fl.report.party_failures) == 1


def test_in_bound_weights_with_the_honest_count_are_averaged_by_that_count() -> None:
    """The control: weights of m's choosing within the bounds, with its true count, are
    averaged in (poisoning within the bounds is accepted), weighted by describe's counts."""
    fl = _trainer(["a", "m"], "fl_train", lambda r: {
        **r, **{k: torch.full_like(v, 0.5) for k, v in r.items()
                if k.startswith("state/") and v.is_floating_point()}})
    fl.fedavg_round()
    assert fl.records == {"a": 32, "m": 16} and not fl.dropped
    only_a = _trainer(["a"])
    only_a.fedavg_round()
    for k, v in fl.state_dict().items():  # a's weights x 32/48 + m's 0.5 x 16/48
        assert torch.allclose(v, only_a.state_dict()[k] * (2 / 3) + 0.5 / 3, atol=1e-6)


def test_a_described_count_is_the_data_owners_claim_unless_weights_are_given() -> None:
    """FedAvg's default weight is the count a data owner's describe gave, its own claim: one
    that describes 10**12 records and trains on them (it says) replaces the global model (R8).
    With ``averaging_weights`` the model owner does not rely on it: equal weights halve it."""
    def lying(**kwargs) -> FederatedTrainer:
        dep = inprocess({p: _data(p) for p in ("a", "m")})

        def describe(req, answer):
            answer["datasets"]["train"]["records"] = 10**12
            return answer

        t = RewriteAnswers(dep.transport, "m", "describe", describe)
        t = RewriteAnswers(t, "m", "fl_train", lambda req, answer: _replacement(answer))
        fl = FederatedTrainer(_model(), t, ["a", "m"], batch_size=8, **kwargs)
        dep.approve_all(fl.propose())
        fl.fedavg_round()
        assert not fl.dropped and fl.records["m"] == 10**12
        return fl

    replaced = lying()
    assert all(torch.allclose(v, torch.full_like(v, 7.0)) for v in replaced.state_dict().values())
    equal = lying(averaging_weights={"a": 1.0, "m": 1.0})
    only_a = _trainer(["a"])
    only_a.fedavg_round()
    for k, v in equal.state_dict().items():
        assert torch.allclose(v, (only_a.state_dict()[k] + 7.0) / 2, atol=1e-6)
    with pytest.raises(ConfigError, match="averaging_weights"):
        _trainer(["a", "m"], averaging_weights={"a": 1.0})
    with pytest.raises(ConfigError, match="averaging_weights"):
        _trainer(["a", "m"], averaging_weights={"a": 1.0, "m": float("nan")})


def _batch() -> dict[str, torch.Tensor]:
    return {p: torch.arange(8) for p in N}


GRADIENT = {
    "count 9 (sent: 8)": (_set("count", 9), "count", "ValidationError"),
    "count 10**12": (_set("count", 10**12), "count", "ValidationError"),
    "correct 9": (_set("correct", 9), "correct", "ValidationError"),
    "loss_sum -5": (_set("loss_sum", -5.0), "loss_sum", "ValidationError"),
    "a gradient missing": (_without("grad/0.weight"), "grad/*", "ValidationError"),
    "a gradient of another shape": (_tensor("grad/0.weight", lambda v: v.flatten()),
                                    "grad/0.weight", "ShapeError"),
    "a 3e38 gradient": (_tensor("grad/3.bias", lambda v: torch.full_like(v, 3e38)),
                        "grad/3.bias", "ValidationError"),
    "an Inf gradient": (_tensor("grad/3.bias", lambda v: torch.full_like(v, float("inf"))),
                        "grad/3.bias", "NonFiniteError"),
    "a buffer missing": (_without("buffer/1.running_mean"), "buffer/*", "ValidationError"),
    "an int32 buffer": (_tensor("buffer/1.num_batches_tracked", lambda v: v.int()),
                        "buffer/1.num_batches_tracked", "DTypeError"),
    "a NaN buffer": (_tensor("buffer/1.running_var", lambda v: torch.full_like(v, float("nan"))),
                     "buffer/1.running_var", "NonFiniteError"),
}


@pytest.mark.parametrize(("craft", "field", "cls"), list(GRADIENT.values()), ids=list(GRADIENT))
def test_a_bad_fl_gradient_answer_drops_its_party(craft, field, cls) -> None:
    fl = _trainer(["a", "m"], "fl_gradient", craft, bn=True, algorithm="sync_sgd")
    assert list(fl.sync_sgd_step(_batch())) == ["a"]
    _dropped(fl, "fl_gradient", field, cls)
    only_a = _trainer(["a"], bn=True, algorithm="sync_sgd")
    only_a.sync_sgd_step({"a": torch.arange(8)})
    assert _same(fl, only_a)


EVALUATE = {
    "count 10**6 (describe: 12)": (_set("count", 10**6), "count", "ValidationError"),
    "correct 13 of 12": (_set("correct", 13), "correct", "ValidationError"),
    "correct -1": (_set("correct", -1), "correct", "ValidationError"),
    "loss_sum -100": (_set("loss_sum", -100.0), "loss_sum", "ValidationError"),
    "loss_sum 'x'": (_set("loss_sum", "x"), "loss_sum", "ValidationError"),
}


@pytest.mark.parametrize(("craft", "field", "cls"), list(EVALUATE.values()), ids=list(EVALUATE))
def test_bad_evaluation_figures_drop_their_party(craft, field, cls) -> None:
    fl = _trainer(["a", "m"], "fl_evaluate", craft)
    figures = fl.evaluate()
    _dropped(fl, "fl_evaluate", field, cls)
    assert figures == _trainer(["a"]).evaluate()  # a's figures alone
    assert 0 <= figures["accuracy"] <= 1


@pytest.mark.parametrize("segment", [None, 7, "", "x" * 257, "a\nb"])
def test_a_bad_proposed_segment_id_refuses_the_proposal_naming_its_party(segment) -> None:
    """The segment id an fl_propose answer gives is checked like a split-learning one (a
    string of 1 to 256 printable characters), before it is kept or sent anywhere."""
    with pytest.raises(ValidationError) as caught:
        _trainer(["a", "m"], "fl_propose", _set("segment", segment))
    assert caught.value.party == "m"
    assert str(caught.value).startswith("m's answer to 'fl_propose' has a bad field 'segment'")


def test_a_malformed_describe_or_oversized_features_refuse_the_proposal() -> None:
    with pytest.raises(ConfigError, match=r"^m: its describe answer, datasets\['train'\]\.records"):
        _trainer(["a", "m"], "describe", lambda r: {
            **r, "datasets": {**r["datasets"], "train": {**r["datasets"]["train"],
                                                         "records": "many"}}})
    with pytest.raises(ConfigError, match=r"^m: its describe answer has no 'datasets' field"):
        _trainer(["a", "m"], "describe", lambda r: {"host": "m"})
    with pytest.raises(ConfigError, match=r"features \(16,\) per record: 8 records of them are "
                                          r"512 bytes \(float32\), more than max_feature_bytes=511"):
        _trainer(["a"], max_feature_bytes=511)
    assert MAX_ABS_VALUE == HostLimits().max_abs_value  # the host's own default bound


def test_evaluation_is_booked_in_batches_whatever_count_a_data_owner_describes() -> None:
    """The ledger counts an evaluation on identical copies here: batch by batch (as the data
    owner runs it), not on one batch of every record (a described count of 10**8 would
    allocate 10**8 records)."""
    fl = _trainer(["a"])
    batches: list[int] = []
    cost = fl.ledger.cost
    fl.ledger.cost = lambda module, shape, batch, **kw: (batches.append(batch),  # type: ignore
                                                         cost(module, shape, batch, **kw))[1]
    fl.evaluate()  # 12 test records, batch_size 8
    assert sorted(batches) == [4, 8]
    per_record = cost(fl.module, fl.input_shape, 1, input_grad=False, optimizer=None).forward
    assert fl.ledger.flops_by_party()["a"]["eval"] == 12 * per_record
