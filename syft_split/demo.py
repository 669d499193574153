"""The main job: two hospitals hold parts of scikit-learn's digits; a model owner trains a
split CNN over both. Ends with ``test_accuracy=<float> report=<path>``.

    python -m syft_split.demo                       # embedded PySyft datasites (default)
    python -m syft_split.demo --transport http      # datasites as HTTP servers on loopback
    python -m syft_split.demo --transport inprocess # no PySyft: the in-process transport
    python -m syft_split.demo --connect hospital_a=http://localhost:8081 \\
        --connect hospital_b=http://localhost:8082 --email me@lab.org --password ...
                                                    # existing datasites: the data owners
                                                    # installed the endpoint and approve there
    python -m syft_split.demo --no-channel          # the data owners allow PySyft calls only

On datasites the data owners approve with a direct channel (``channel=True``) unless
``--no-channel``: PySyft negotiates it, steps travel over TLS 1.3 to each datasite. The demo
prints the time per training step and how many calls went over the direct channels.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .datasets import digits_parties
from .deploy import Deployment, datasites, inprocess
from .errors import ApprovalError
from .host import HostLimits
from .models import digits_cnn
from .session import SplitSession
from .spec import OptimizerSpec
from .split import split_model
from .topology import RELEASED, SplitPlan
from .trainer import Trainer

__all__ = ["main"]

HOSPITALS = ("hospital_a", "hospital_b")


def _parties(seed: int) -> dict[str, dict[str, tuple]]:
    data = digits_parties(len(HOSPITALS), seed=seed, mock_records=200)
    return {name: {"train": (d.x_train, d.y_train, None, d.mock),
                   "test": (d.x_test, d.y_test, None, d.mock)}
            for name, d in zip(HOSPITALS, data)}


def _wait_for_approval(session: SplitSession, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            session.require_approved()
            return
        except ApprovalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def _time_training(trainer: Trainer) -> list[float]:
    """Seconds of each ``trainer.train_epoch`` (evaluation excluded), appended as they run."""
    seconds: list[float] = []
    train_epoch = trainer.train_epoch

    def timed(epoch: int = 0, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return train_epoch(epoch, **kwargs)
        finally:
            seconds.append(time.perf_counter() - t0)

    trainer.train_epoch = timed  # type: ignore[method-assign,assignment]
    return seconds


def _step_time(seconds: list[float], steps: int) -> str:
    per_epoch = steps / max(len(seconds), 1)
    if len(seconds) < 2:
        return f"{1000 * sum(seconds) / max(steps, 1):.1f} ms over {steps} steps"
    steady = 1000 * sum(seconds[1:]) / (per_epoch * (len(seconds) - 1))
    later = f"epochs 2-{len(seconds)}" if len(seconds) > 2 else "epoch 2"
    return f"{steady:.1f} ms ({later}; epoch 1, which also sets up: {seconds[0]:.1f} s)"


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--transport", choices=["datasite", "http", "inprocess"],
                        default="datasite")
    parser.add_argument("--connect", action="append", default=[], metavar="PARTY=URL",
                        help="use an existing datasite (repeat per hospital)")
    parser.add_argument("--email", default="model-owner@example.org")
    parser.add_argument("--password", default="")
    parser.add_argument("--approval-timeout", type=float, default=600.0)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--leakage-budget", type=float, default=20.0,
                        help="seconds each data owner's attack suite may spend at the end")
    parser.add_argument("--no-channel", action="store_true",
                        help="data owners approve without a direct channel (PySyft only)")
    parser.add_argument("--verbose", action="store_true",
                        help="show what PySyft and uvicorn print (default: in a log file per "
                             "datasite, syft_split.logs.log_path)")
    args = parser.parse_args(argv)
    if args.verbose:
        from .logs import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    remote_approval = bool(args.connect)
    if args.connect:
        from .transport.pysyft import connect

        urls = dict(item.split("=", 1) for item in args.connect)
        dep = Deployment(connect(urls, args.email, args.password), {})
        hospitals = list(urls)
        mode = "connect"
    else:
        parties = _parties(args.seed)
        if args.transport == "inprocess":
            dep = inprocess(parties, limits=HostLimits(review_budget_s=args.leakage_budget))
        else:
            print(f"launching {len(parties)} PySyft datasites "
                  f"({'HTTP on loopback' if args.transport == 'http' else 'embedded'})...",
                  flush=True)
            dep = datasites(parties, http=args.transport == "http")
        hospitals = list(HOSPITALS)
        mode = args.transport
    with dep:
        segments = split_model(digits_cnn(), cuts=["pool1"])
        plan = SplitPlan.vanilla(segments, hospitals, labels=RELEASED)
        session = SplitSession(plan, dep.transport, optimizer=OptimizerSpec("adam", lr=args.lr))
        proposals = session.propose()
        if remote_approval:
            print(f"proposed {proposals}; waiting for the data owners to approve...", flush=True)
            _wait_for_approval(session, args.approval_timeout)
        else:
            # each data owner reads its review and approves (with a direct channel, by default),
            # and sets its leakage watch to halt if the watch's inversion ratio halves
            dep.approve_all(proposals, show=True, channel=not args.no_channel,
                            leakage_bound={"relative": 0.5})
        trainer = Trainer(session, batch_size=args.batch_size, seed=args.seed,
                          progress=sys.stderr.isatty() and os.environ.get("CI") != "true",
                          leakage_budget_s=args.leakage_budget,
                          config={"job": "demo", "mode": mode, "epochs": args.epochs})
        train_s = _time_training(trainer)
        report = trainer.fit(args.epochs)
        router = getattr(dep.transport, "router", None)
        direct = (f"; {router.direct_calls} of {dep.transport.calls} calls over direct channels"
                  if router is not None and getattr(dep.transport, "direct", False) else "")
        print(f"per-step time: {_step_time(train_s, report.steps)}{direct}", flush=True)
        run_dir = Path(args.runs_dir) / time.strftime(f"demo-{mode}-%Y%m%d-%H%M%S")
        path = report.save(run_dir)
    acc = report.final_test_accuracy or 0.0
    print(f"test_accuracy={acc:.4f} report={path}")
    return acc


if __name__ == "__main__":
    main()
