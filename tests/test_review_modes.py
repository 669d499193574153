"""A segment whose output depends on its mode (BatchNorm, Dropout) is measured as training
runs it too: the review and the watch report the worse of eval and train mode, and running
statistics a model owner could freeze are refused at proposal."""

from __future__ import annotations

import pytest
import torch

from syft_split import HostLimits, OptimizerSpec
from syft_split.deploy import inprocess
from syft_split.errors import ConfigError
from syft_split.leakage import leakage_suite
from syft_split.spec import module_from_spec, spec_state

D = 64


def _bn_spec(momentum: float | None) -> dict:
    return {"layers": [{"type": "BatchNorm1d", "args": {"num_features": D, "momentum": momentum}},
                       {"type": "ReLU", "args": {}}]}


def _propose(spec: dict, state: dict, max_batch: int = 32) -> tuple:
    torch.manual_seed(0)
    x = torch.rand(600, D)
    dep = inprocess({"h": {"train": (x, torch.randint(0, 2, (600,)))}},
                    limits=HostLimits(review_budget_s=3.0))
    r = dep.transport.call("h", "propose", role="input", spec=spec, datasets=["train"],
                           max_batch=max_batch, optimizer=OptimizerSpec("sgd").to_json(),
                           **{f"state/{k}": v for k, v in state.items()})
    return dep, dep.owners["h"], r["segment"], x


def _eval_blind_state(momentum: float | None) -> dict:
    """Eval mode: x - 1000 + 10 < 0, the ReLU outputs zeros. Train mode: x̂ + 10 > 0, every
    input value leaves up to a per-batch affine map."""
    st = spec_state(module_from_spec(_bn_spec(momentum)))
    st["0.bias"] = torch.full((D,), 10.0)
    st["0.running_mean"] = torch.full((D,), 1000.0)
    return st


def test_review_and_watch_measure_what_training_releases() -> None:
    dep, host, seg, x = _propose(_bn_spec(0.1), _eval_blind_state(0.1), max_batch=32)
    module = host.proposals_by_id[seg].module
    review = host.review(seg)
    assert f"WARNING: {D} of your {D} input values leave as exact copies" in review
    assert "measured both ways" in review and "BatchNorm1d" in review
    assert "WARNING: your records can be reconstructed" in review
    suite = host.families["leakage"].suite(host.proposals_by_id[seg])
    assert suite["worst"]["ratio"] < 0.1 and suite["worst"]["attack"].endswith("_train")
    assert suite["modes"]["eval"]["copied_inputs"] == 0  # eval mode alone shows nothing
    assert suite["modes"]["train_batch"] == 32
    # the real segment is left as proposed: running statistics and mode
    assert bool((module.get_submodule("0").running_mean == 1000.0).all()) and module.training
    host.approve(seg)
    watch = host.runtimes[seg].extra["watch"]
    assert watch.history[0]["inversion_ratio"] < 0.1  # the watch's baseline too
    assert watch.history[0]["train_mode"]["inversion_ratio"] < 0.1
    # what a training forward really releases: every feature a per-batch affine copy
    out = dep.transport.call("h", "forward", segment=seg, dataset="train",
                             indices=torch.arange(32))
    z, xb = out["activation"], x[:32]
    corr = ((z - z.mean(0)) * (xb - xb.mean(0))).sum(0) / (
        (z - z.mean(0)).norm(dim=0) * (xb - xb.mean(0)).norm(dim=0))
    assert float(corr.min()) > 0.9999


def test_dropout_segment_is_measured_in_both_modes_and_others_once() -> None:
    torch.manual_seed(0)
    mock, held = torch.rand(100, 8), torch.rand(40, 8)
    drop = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5))
    r = leakage_suite(drop, mock, held, budget_s=1.0, max_batch=16)
    assert r["modes"]["layers"] == ["Dropout"] and "linear_train" in r["attacks"]
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    r = leakage_suite(plain, mock, held, budget_s=1.0)
    assert "modes" not in r and not any(k.endswith("_train") for k in r["attacks"])


@pytest.mark.parametrize("momentum, tracked, words", [
    (0.0, 0, "momentum 0.0"),
    (None, 2**62, "num_batches_tracked 4611686018427387904"),
    (None, -1, "num_batches_tracked -1"),
    (1e-12, 0, "momentum 1e-12"),  # as good as frozen (found in review)
    (None, 10**7, "momentum None .* num_batches_tracked 10000000"),
])
def test_frozen_running_statistics_are_refused(momentum: float | None, tracked: int,
                                               words: str) -> None:
    st = _eval_blind_state(momentum)
    st["0.num_batches_tracked"] = torch.tensor(tracked)
    with pytest.raises(ConfigError, match=words):
        _propose(_bn_spec(momentum), st)


def test_running_statistics_that_follow_the_data_are_accepted() -> None:
    for momentum, tracked in ((0.1, 10**6), (1e-3, 0), (None, 999)):
        st = spec_state(module_from_spec(_bn_spec(momentum)))
        st["0.num_batches_tracked"] = torch.tensor(tracked)
        _, host, pid, _ = _propose(_bn_spec(momentum), st)
        assert host.proposal(pid).status == "pending"


def test_a_watch_that_cannot_be_built_refuses_a_leakage_bound_and_is_audited() -> None:
    """A BatchNorm segment proposed with max_batch=2: its train-mode view meets a lone row and
    the watch cannot be built. Approving with a leakage_bound installed no watch at all (the
    bound silently unenforced); now it is refused, and without one the segment runs
    unwatched with an audit entry that says so."""
    spec = _bn_spec(0.1)
    g = torch.Generator().manual_seed(0)
    dep = inprocess({"h": {"train": (torch.rand(101, D, generator=g),
                                     torch.randint(0, 2, (101,), generator=g))}})
    host = dep.owners["h"]
    pid = dep.transport.call("h", "propose", role="input", spec=spec, datasets=["train"],
                             max_batch=2, optimizer=OptimizerSpec("sgd").to_json(),
                             **{f"state/{k}": v for k, v in spec_state(
                                 module_from_spec(spec)).items()})["segment"]
    with pytest.raises(ConfigError, match="leakage_bound could not be enforced"):
        host.approve(pid, leakage_bound={"inversion_ratio": 0.5})
    assert host.proposal(pid).status == "pending" and pid not in host.runtimes
    host.approve(pid)
    assert "watch" not in host.runtimes[pid].extra
    assert any(e.op == "approve" and e.segment == pid and "runs unwatched" in e.outcome
               for e in host.audit)
