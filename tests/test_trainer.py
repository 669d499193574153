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
                "--leakage-budget", "4"])
    out = capsys.readouterr().out.strip().splitlines()
    assert acc >= 0.90
    assert out[-1].startswith("test_accuracy=") and " report=" in out[-1]
    report = out[-1].split("report=")[1]
    assert json.loads(open(report).read())["epochs"][-1]["test_accuracy"] == pytest.approx(acc,
                                                                                         abs=1e-4)
