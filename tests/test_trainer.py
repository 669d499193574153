"""High-level training: digits reach high accuracy; every run writes a JSON + PNG report."""

from __future__ import annotations

import json

import pytest
import torch

from syft_split import OptimizerSpec, SplitPlan, SplitSession, Trainer, split_model
from syft_split.datasets import digits_parties
from syft_split.models import digits_cnn


@pytest.mark.parametrize("topology", ["vanilla", "u_shaped"])
def test_fit_on_digits_and_report(make_deployment, tmp_path, topology: str) -> None:
    (data,) = digits_parties(1, seed=0)
    dep = make_deployment({"h": {"train": (data.x_train, data.y_train),
                                 "test": (data.x_test, data.y_test)}})
    torch.manual_seed(0)
    if topology == "vanilla":
        plan = SplitPlan.vanilla(split_model(digits_cnn(), "pool1"), "h")
        labels = {"h": {"train": data.y_train, "test": data.y_test}}
    else:
        plan = SplitPlan.u_shaped(split_model(digits_cnn(), ["pool1", "relu3"]), "h")
        labels = None
    session = SplitSession(plan, dep.transport, optimizer=OptimizerSpec("adam", lr=1e-2))
    dep.approve_all(session.propose(), channel=True)  # datasites: steps over the channel
    trainer = Trainer(session, batch_size=32, labels=labels, progress=False,
                      leakage_budget_s=2.0)
    report = trainer.fit(3, verbose=False)

    assert report.final_test_accuracy is not None and report.final_test_accuracy >= 0.9
    assert report.epochs[-1].train_loss < report.epochs[0].train_loss
    steps_per_epoch = -(-len(data.y_train) // 32)
    assert report.steps == 3 * steps_per_epoch
    # one transport call per training step in steady state (backward fused into next forward)
    per_epoch_calls = report.transport_calls / 3
    # flush + eval batches + the leakage watch (+ the loss segment's calls)
    extra = 4 if topology == "vanilla" else 4 + steps_per_epoch
    assert per_epoch_calls <= steps_per_epoch * (1 if topology == "vanilla" else 2) + extra

    path = report.save(tmp_path / "run")
    saved = json.loads(path.read_text())
    assert saved["config"]["plan"]["labels"] == ("model_owner" if topology == "vanilla"
                                                 else "data_owner")
    assert saved["steps"] == report.steps and len(saved["epochs"]) == 3
    assert saved["config"]["defences"] == {} and saved["config"]["share_weights"] == "none"
    watch = saved["epochs"][-1]["watch"]["h"]  # the live leakage watch, per epoch
    assert 0 < watch["inversion_ratio"] < 2 and watch["step"] == report.steps
    assert 0 <= saved["extra"]["leakage"]["h"]["inversion_ratio"] < 1  # the suite's worst case
    by_party = saved["bytes_by_party"]
    assert by_party["h"]["sent"] > 0 and by_party["model_owner"]["sent"] > 0
    assert by_party["h"]["sent"] == by_party["model_owner"]["received"]
    png = (tmp_path / "run" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_u_shaped_labels_and_outputs_never_leave(make_deployment) -> None:
    (data,) = digits_parties(1, seed=1, limit=300)
    dep = make_deployment({"h": {"train": (data.x_train, data.y_train),
                                 "test": (data.x_test, data.y_test)}})
    plan = SplitPlan.u_shaped(split_model(digits_cnn(8, 16), ["pool1", "relu3"]), "h")
    session = SplitSession(plan, dep.transport)
    dep.approve_all(session.propose())
    Trainer(session, batch_size=50, progress=False, leakage_budget_s=2.0).fit(1, verbose=False)
    sent_by_owner = {f for r in dep.transport.traffic.records
                     if r.src == "h" and r.op not in ("leakage", "watch") for f in r.fields}
    assert "labels" not in sent_by_owner
    assert sent_by_owner <= {"activation", "grad_input", "loss_sum", "correct", "count",
                             "segment", "status", "output_shape", "host", "datasets", "steps",
                             "discarded"}
    for rec in dep.transport.traffic.records:  # the leakage figures are scalars, no labels
        if rec.src == "h" and rec.op in ("leakage", "watch"):
            assert "labels" not in rec.fields and "activation" not in rec.fields
    for rec in dep.transport.traffic.records:
        if rec.src == "h" and rec.op == "loss_step":
            assert "activation" not in rec.fields  # the logits stay at the data owner


def test_demo_inprocess_reaches_090(tmp_path, capsys) -> None:
    from syft_split.demo import main

    acc = main(["--transport", "inprocess", "--epochs", "5", "--runs-dir", str(tmp_path),
                "--leakage-budget", "1"])  # the suite's figures are not checked here
    out = capsys.readouterr().out.strip().splitlines()
    assert acc >= 0.90
    assert out[-1].startswith("test_accuracy=") and " report=" in out[-1]
    report = out[-1].split("report=")[1]
    assert json.loads(open(report).read())["epochs"][-1]["test_accuracy"] == pytest.approx(acc,
                                                                                         abs=1e-4)


def _small_run(dep, parties, measure: bool) -> tuple[Trainer, int]:
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(64, 10))
    plan = SplitPlan.vanilla([model[:4], model[4:]], list(parties), datasets=["train", "test"])
    session = SplitSession(plan, dep.transport, optimizer=OptimizerSpec("sgd", lr=0.1))
    dep.approve_all(session.propose())
    start = len(dep.transport.traffic.snapshot())  # after the setup
    trainer = Trainer(session, batch_size=16, progress=False, measure_leakage=measure,
                      leakage_budget_s=2.0, watch=measure,
                      labels={p: {ds: y for ds, (_x, y) in d.items()} for p, d in parties.items()})
    trainer.fit(1, verbose=False)
    return trainer, start


def test_report_counts_this_runs_training_bytes_only() -> None:
    """A second run on the same deployment reports its own bytes (not both runs'); the setup
    before fit is not in the report; the leakage watch and measurement are booked apart."""
    from syft_split.deploy import inprocess
    from syft_split.transport.base import MODEL_OWNER

    g = torch.Generator().manual_seed(0)
    parties = {p: {"train": (torch.rand(64, 1, 8, 8, generator=g),
                             torch.randint(0, 10, (64,), generator=g)),
                   "test": (torch.rand(16, 1, 8, 8, generator=g),
                            torch.randint(0, 10, (16,), generator=g))} for p in ("a", "b")}
    dep = inprocess(parties)
    first, _ = _small_run(dep, parties, measure=False)
    second, start = _small_run(dep, parties, measure=True)
    one, two = first.report, second.report
    assert two.bytes_by_party == one.bytes_by_party  # the same training, the same bytes
    assert two.transport_calls == one.transport_calls
    ours = dep.transport.traffic.snapshot()[start:]  # what the second fit sent, counted here
    train = [r for r in ours if r.op not in ("watch", "leakage")]
    assert {r.op for r in train} <= {"forward", "backward"}  # no describe / propose
    for party in parties:
        assert two.bytes_by_party[party]["sent"] == sum(r.nbytes for r in train if r.src == party)
        assert two.bytes_by_direction[f"{MODEL_OWNER}->{party}"] == sum(
            r.nbytes for r in train if r.dst == party)
        measured = sum(r.nbytes for r in ours if r.src == party and r.op in ("watch", "leakage"))
        assert measured > 0 and two.measurement_bytes_by_party[party]["sent"] == measured
    assert two.transport_calls == sum(1 for r in train if r.dst == MODEL_OWNER)
    assert two.bytes_by_op["leakage"]["calls"] == 2 and "propose" not in two.bytes_by_op
    # an epoch's record holds the run's bytes so far (one epoch here: the run's)
    assert two.epochs[-1].bytes_by_party == two.bytes_by_party
