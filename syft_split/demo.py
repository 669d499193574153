"""The main job: two hospitals hold parts of scikit-learn's digits; a model owner trains a
split CNN over both. Ends with ``test_accuracy=<float> report=<path>``.

    python -m syft_split.demo                      # embedded PySyft datasites (default)
    python -m syft_split.demo --transport http     # datasites as HTTP servers on loopback
    python -m syft_split.demo --transport inprocess
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from .datasets import digits_parties
from .host import DataOwnerHost
from .models import digits_cnn
from .session import SplitSession
from .spec import OptimizerSpec
from .split import split_model
from .topology import DATA_OWNER, SplitPlan
from .trainer import Trainer
from .transport.inprocess import InProcessTransport

__all__ = ["main"]

HOSPITALS = ("hospital_a", "hospital_b")


def _inprocess(parties: list) -> tuple[InProcessTransport, dict[str, DataOwnerHost]]:
    hosts = {}
    for name, data in zip(HOSPITALS, parties):
        host = DataOwnerHost(name)
        host.add_dataset("train", data.x_train, data.y_train)
        host.add_dataset("test", data.x_test, data.y_test)
        hosts[name] = host
    return InProcessTransport(list(hosts.values())), hosts


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=["inprocess"], default="inprocess")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs-dir", default="runs")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    parties = digits_parties(len(HOSPITALS), seed=args.seed)
    transport, hosts = _inprocess(parties)
    segments = split_model(digits_cnn(), cuts=["pool1"])
    plan = SplitPlan.vanilla(segments, list(HOSPITALS), labels=DATA_OWNER)
    session = SplitSession(plan, transport, optimizer=OptimizerSpec("adam", lr=args.lr))
    proposals = session.propose()
    for party, ids in proposals.items():  # each data owner reads the review and approves once
        for pid in ids:
            print(hosts[party].review(pid))
            hosts[party].approve(pid)
    trainer = Trainer(session, batch_size=args.batch_size, seed=args.seed,
                      progress=os.environ.get("CI") != "true",
                      config={"job": "demo", "transport": args.transport, "epochs": args.epochs})
    report = trainer.fit(args.epochs)
    run_dir = Path(args.runs_dir) / time.strftime("demo-%Y%m%d-%H%M%S")
    path = report.save(run_dir)
    transport.close()
    acc = report.final_test_accuracy or 0.0
    print(f"test_accuracy={acc:.4f} report={path}")
    return acc


if __name__ == "__main__":
    main()
