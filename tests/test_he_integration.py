"""HE protection of a split model, end to end over the transport (real CKKS, no mocks)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from syft_split import ConfigError, OptimizerSpec, SplitPlan, SplitSession, Trainer, split_model
from syft_split.datasets import digits_parties
from syft_split.deploy import Deployment, inprocess
from syft_split.he import explain, protect
from syft_split.topology import DATA_OWNER, MODEL_OWNER, Node, Task

from .conftest import HTTP_KINDS, deployed

pytestmark = [pytest.mark.he, pytest.mark.slow]

HE_LR = 0.05
REST = OptimizerSpec("adam", lr=1e-2)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(),      # data owner
                         nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))  # model owner


def _data():
    (d,) = digits_parties(1)
    return d, {"h": {"train": (d.x_train, d.y_train), "test": (d.x_test, d.y_test)}}


def _fit(dep, plan, d, epochs: int = 5):
    session = SplitSession(plan, dep.transport, optimizer=REST)
    dep.approve_all(session.propose())
    trainer = Trainer(session, batch_size=32, progress=False, measure_leakage=False,
                      labels={"h": {"train": d.y_train, "test": d.y_test}})
    return trainer.fit(epochs, verbose=False), session


def _baseline_plan(model: nn.Sequential, level: str) -> SplitPlan:
    """The same computation in plain. Level A: the encrypted layer trains with the segment's
    optimizer like every other layer, so the baseline is the plain split. Level B: the
    encrypted layer follows the agreed SGD at the HE learning rate, the rest the session's."""
    m = copy.deepcopy(model)
    opt = None if level == "A" else OptimizerSpec("sgd", lr=HE_LR)
    nodes = [Node(m[:3], DATA_OWNER), Node(m[3], MODEL_OWNER, (0,), optimizer=opt),
             Node(m[4:], MODEL_OWNER, (1,))]
    return SplitPlan(nodes, [Task(2)], ["h"], max_batch=32)


def _protect(plan: SplitPlan, level: str, **kw: object) -> SplitPlan:
    if level == "B":
        with pytest.warns(UserWarning, match="trains with SGD"):
            return protect(plan, level=level, lr=HE_LR, batch_size=32, **kw)  # type: ignore[arg-type]
    return protect(plan, level=level, batch_size=32, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("level", ["A", "B"])
def test_he_training_matches_plain_training(level: str) -> None:
    """In process (the full accuracy runs are long); see the datasite test below."""
    d, parties = _data()
    model = _model()
    plain_report, _ = _fit(inprocess(parties), _baseline_plan(model, level), d)
    plan = _protect(SplitPlan.vanilla(split_model(copy.deepcopy(model), "2"), "h"), level)
    dep = inprocess(parties)
    if level == "B":  # the session's Adam is not the agreed SGD: said again, and reported
        with pytest.warns(UserWarning, match="not with this segment's optimizer"):
            he_report, _ = _fit(dep, plan, d)
    else:
        he_report, _ = _fit(dep, plan, d)
    assert plain_report.final_test_accuracy is not None and he_report.final_test_accuracy
    assert plain_report.final_test_accuracy >= 0.85
    assert abs(he_report.final_test_accuracy - plain_report.final_test_accuracy) <= 0.005
    # the cost of HE is in the run report, with its per-step breakdown
    he = he_report.extra["he"]
    assert he["h.enc_s"] > 0 and he["model_owner.h.server_s"] > 0 and he["h.ser_s"] > 0
    assert he["h.bytes_sent"] > 100_000
    assert he["model_owner.h.last_rotations"] >= he["model_owner.h.last_keyswitches_min"] > 0
    assert he["model_owner.h.round_trips"] >= 2 * he["model_owner.h.steps"]  # 3 when training
    assert he["optimizer_replaced"] == (1.0 if level == "B" else 0.0)
    # the data owner sent ciphertexts and masked values only: never a plaintext activation
    sent = dep.transport.traffic.fields_sent_by("h")
    assert "activation" not in sent and "he_input" in sent
    watch = {"step", "inversion_ratio", "ssim", "dcor", "label_alignment", "seconds", "halted",
             "watch_seconds"}  # the leakage watch's scalar figures, as for a plain segment
    assert sent <= {"he_input", "msg", "context", "segment", "status", "output_shape", "host",
                    "datasets", "h.enc_s", "steps", "last_step", "pending",
                    } | {k.removeprefix("h.") for k in he} | watch  # status: step counters


def test_demo_model_protected_as_is_trains_to_plain_accuracy() -> None:
    """The demo's own cut (pool1): the model owner's Conv2d(16, 32, 3) on 16x4x4 runs
    encrypted, level A, Adam everywhere; test accuracy stays with the plain split's. Two
    epochs of the full digits set (449 test records; on a 160-record test set Adam turns
    the CKKS noise into a few points of chance).

    One run cannot show 0.5 points: fresh keys and masks give every protected run its own
    ~1e-9 noise, and training amplifies it into a spread of about a point either way.
    Measured (plain is deterministic): 2 epochs, plain 0.900, protected 0.895 / 0.906 /
    0.909; 4 epochs, plain 0.967, protected 0.971 / 0.964 / 0.955. So one run must stay
    within 2 points below plain (and 3 either way); the mean over runs is at plain or
    above."""
    from syft_split.models import digits_cnn

    (d,) = digits_parties(1)
    parties = {"h": {"train": (d.x_train, d.y_train), "test": (d.x_test, d.y_test)}}
    torch.manual_seed(0)
    model = digits_cnn()
    accs = []
    for protected in (False, True):
        plan = SplitPlan.vanilla(split_model(copy.deepcopy(model), "pool1"), "h")
        if protected:
            plan = protect(plan, batch_size=32, input_shape=(16, 4, 4))
            assert isinstance(plan.encrypted.module, nn.Conv2d)
        report, _ = _fit(inprocess(parties), plan, d, epochs=2)
        accs.append(report.final_test_accuracy)
    assert accs[0] is not None and accs[1] is not None and accs[0] >= 0.85
    assert accs[1] >= accs[0] - 0.02
    assert abs(accs[1] - accs[0]) <= 0.03
    he = report.extra["he"]
    assert he["model_owner.h.last_multiplications"] > 0 and he["h.last_ser_s"] > 0


@pytest.fixture(scope="module", params=HTTP_KINDS)
def short_run_sites(request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any, Deployment]]:
    """160 digits records (the party, its datasets) on each deployment kind, launched once for
    both levels (each test proposes its own segment)."""
    (d,) = digits_parties(1, limit=160)
    parties = {"h": {"train": (d.x_train, d.y_train), "test": (d.x_test, d.y_test)}}
    with deployed(request.param, parties) as dep:
        yield d, parties, dep


@pytest.mark.parametrize("level", ["A", "B"])
def test_he_over_datasites_gives_the_in_process_result(short_run_sites, level) -> None:
    """A short HE run through real datasites: the same losses as in process (masks differ
    per run, but they cancel exactly up to the 2^-30 rounding), ciphertexts only."""
    d, parties, shared = short_run_sites
    losses = []
    for dep in (inprocess(parties), shared):
        plan = _protect(SplitPlan.vanilla(split_model(_model(), "2"), "h"), level)
        session = SplitSession(plan, dep.transport, optimizer=OptimizerSpec("sgd", lr=HE_LR))
        dep.approve_all(session.propose())
        run = []
        for idx in torch.arange(96).split(32):
            session.zero_grad()
            loss, _ = session.loss("h", idx, d.y_train[idx])
            loss.backward()
            session.step()
            run.append(float(loss.detach()))
        losses.append(run)
        assert "activation" not in dep.transport.traffic.fields_sent_by("h")
    assert losses[0][-1] != losses[0][0]
    assert max(abs(a - b) for a, b in zip(*losses)) < 1e-4


def test_public_context_on_the_wire_has_no_secret_key(make_deployment) -> None:
    from he_layers import ServerContext

    _, parties = _data()
    dep = make_deployment(parties)
    plan = protect(SplitPlan.vanilla(split_model(_model(), "2"), "h"), lr=HE_LR, batch_size=32)
    session = SplitSession(plan, dep.transport, optimizer=REST)
    dep.approve_all(session.propose())
    seg = session.remote[("h", 0)]
    raw = dep.transport.call("h", "he_context", segment=seg.segment_id)["context"]
    ctx = ServerContext.from_bytes(raw)
    assert not ctx.is_private()
    assert len(raw) < 8_000_000  # only the rotation keys the packing needs


def test_level_b_model_owner_holds_only_a_share() -> None:
    from he_layers import combine_shares

    d, parties = _data()
    model = _model()
    _, plain_session = _fit(inprocess(parties), _baseline_plan(model, "B"), d, epochs=1)
    true_w = plain_session.local[1].weight.detach().double()
    dep = inprocess(parties)
    plan = _protect(SplitPlan.vanilla(split_model(copy.deepcopy(model), "2"), "h"), "B")
    with pytest.warns(UserWarning):
        _, session = _fit(dep, plan, d, epochs=1)
    assert session.he is not None
    server_share = session.he.weight
    client_share = dep.owners["h"].runtimes[session.remote[("h", 0)].segment_id].he.weight_share
    assert float((server_share.double() - true_w).abs().max()) > 0.1   # W_s is not W
    combined = combine_shares(server_share, client_share)
    assert float((combined - true_w).abs().max()) < 1e-4               # W_s + A is
    agreement = plan.encrypted.agreement()
    assert agreement["optimizer"]["name"] == "sgd" and "replaces" in agreement["optimizer"]


def test_protect_explains_what_cannot_be_protected() -> None:
    lstm_first = SplitPlan.vanilla(
        [nn.Sequential(nn.Conv2d(1, 4, 3)), nn.Sequential(nn.LSTM(4, 4))], "h")
    problems = explain(lstm_first)
    assert any("LSTM" in p for p in problems) and any("nn.Conv1d or nn.Conv2d first" in p
                                                      for p in problems)
    conv_first = SplitPlan.vanilla(
        [nn.Sequential(nn.Conv2d(1, 4, 3)), nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten())], "h")
    assert any("input_shape=(C, H, W)" in p for p in explain(conv_first))
    assert any("expects input_shape (C=4" in p for p in explain(conv_first, input_shape=(3, 6, 6)))
    assert explain(conv_first, input_shape=(4, 6, 6)) == []
    grouped = SplitPlan.vanilla(
        [nn.Sequential(nn.Conv1d(1, 4, 3)), nn.Sequential(nn.Conv1d(4, 4, 3, groups=2))], "h")
    assert any("groups=2" in p for p in explain(grouped, input_shape=(4, 20)))
    two = SplitPlan.vanilla(split_model(_model(), "2"), ["a", "b"])
    with pytest.raises(ConfigError, match="level B shares the weight with one data owner"):
        protect(two, level="B")
    with pytest.raises(ConfigError, match="level must be"):
        protect(two, level="C")
    with pytest.raises(ConfigError, match="level-B agreement"):
        protect(two, level="A", momentum=0.9)


def test_explain_checks_the_options_protect_gets() -> None:
    """Smaller parameters need matching options: explain() judges the options given."""
    plan = SplitPlan.vanilla(split_model(_model(), "2"), "h")
    small = {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": (43, 25, 41),
             "global_scale_bits": 25}
    assert any("flood_bits" in p for p in explain(plan, batch_size=8, params=small))
    assert explain(plan, batch_size=8, params=small, flood_bits=21) == []
    assert any("mask_bits" in p for p in explain(plan, batch_size=8, params=small,
                                                  flood_bits=21, mask_bits=16))
    protected = protect(plan, batch_size=8, params=small, flood_bits=21)
    assert protected.encrypted.options["flood_bits"] == 21
