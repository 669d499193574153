"""Benchmark: training over a long round trip (50 ms added per call) with three schedules.

One data owner ("hospital") holds scikit-learn's digits (train/test split of
``syft_split.datasets.digits_parties``) on a real PySyft datasite (a uvicorn HTTP server on
loopback: the data owner computes in its own process, as it would on its own machine). It
approves each proposed segment with a direct channel (``channel=True``); the model owner's
transport is wrapped in :class:`~syft_split.transport.latency.DelayedTransport` so that EVERY
call costs 50 ms more (25 ms each way; calls in flight overlap, as on a real link).

The model is the demo's CNN (``digits_cnn``, cut after ``pool1``), batch 32, Adam lr 3e-3,
``--epochs`` epochs (default 20), seeds 0, 1, 2. Schedules:

- ``local``: the unsplit model in this process (no network): the reference time and accuracy.
- ``exact``: exact split learning, one call per step (fused gradient + next forward).
- ``one_step_delay``: pipelined, two calls in flight, gradients applied one step late
  (``Trainer(gradient_delay=1)``).
- ``local_loss``: the data owner trains its segment with a linear auxiliary head on its labels
  (``SplitPlan(local_loss=LocalLoss(...))``), up to 16 batches per call, up to 64 batches
  requested ahead, no
  gradient back.

Epochs run back to back as in ``Trainer.fit`` (the local-loss calls of the next epoch may
start before an epoch ends); the test set is evaluated after each of the last 3 epochs only.
Reported: ``epoch_s_<schedule>`` (median training time of epochs 2..E-3: steady state, no
evaluation in between), ``ratio_<schedule>_vs_local`` (goal for the best one <= 1.5),
``test_accuracy_<schedule>`` (mean over seeds of the mean test accuracy of the last 3 epochs) and
``accuracy_gap_points_<schedule>_vs_exact`` (goal: within 1 point), ``calls_per_epoch_*``.
Timings on a shared 2-core machine are noisy: all schedules run in one process, one after the
other, and the ratios are what to read. Writes ``bench/results/latency.json``; ``--quick``:
6 epochs, one seed, ``bench/results/latency_quick.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

from syft_split import OptimizerSpec, SplitPlan, SplitSession, Trainer, split_model  # noqa: E402
from syft_split.datasets import digits_parties  # noqa: E402
from syft_split.local_loss import LocalLoss  # noqa: E402
from syft_split.models import digits_cnn  # noqa: E402
from syft_split.topology import RELEASED  # noqa: E402
from syft_split.transport.latency import DelayedTransport  # noqa: E402

PARTY = "hospital"
BATCH = 32
LR = 3e-3
DELAY = 0.05
SCHEDULES = ("exact", "one_step_delay", "local_loss")
EVAL_LAST = 3  # test accuracy after each of the last epochs (mean reported)


def timed(times: list[float]) -> list[float]:
    """Epochs 2 .. E - EVAL_LAST: steady state, and no evaluation before or between them."""
    return times[1:len(times) - EVAL_LAST] or times

def local_run(data: Any, epochs: int, seed: int) -> tuple[list[float], list[float]]:
    """The unsplit model, same batches, optimizer and evaluation as the trainer."""
    torch.manual_seed(seed)
    model = digits_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(seed)
    times, accs = [], []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        for idx in torch.randperm(len(data.x_train), generator=g).split(BATCH):
            opt.zero_grad()
            nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
        times.append(time.perf_counter() - t0)
        if epoch > epochs - EVAL_LAST:
            model.eval()
            with torch.no_grad():
                accs.append(float((model(data.x_test).argmax(1) == data.y_test).float().mean()))
            model.train()
    return times, accs


def split_run(dep: Any, schedule: str, epochs: int, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    segments = split_model(digits_cnn(), cuts=["pool1"])
    local_loss = (LocalLoss(nn.Sequential(nn.Flatten(), nn.Linear(256, 10)))
                  if schedule == "local_loss" else None)
    plan = SplitPlan.vanilla(segments, PARTY, labels=RELEASED, local_loss=local_loss)
    transport = DelayedTransport(dep.transport, DELAY)
    session = SplitSession(plan, transport, optimizer=OptimizerSpec("adam", lr=LR))
    options = {"channel": True, **({"local_loss": True} if local_loss is not None else {})}
    dep.approve_all(session.propose(), **options)
    trainer = Trainer(session, batch_size=BATCH, seed=seed, progress=False,
                      measure_leakage=False, gradient_delay=int(schedule == "one_step_delay"))
    times, accs, calls = [], [], []
    direct0 = dep.transport.router.direct_calls
    for epoch in range(1, epochs + 1):
        c0 = transport.calls
        trainer.epochs_remaining = epochs - epoch  # as in Trainer.fit
        t0 = time.perf_counter()
        trainer.train_epoch(epoch)
        times.append(time.perf_counter() - t0)
        calls.append(transport.calls - c0)
        if epoch > epochs - EVAL_LAST:
            accs.append(trainer.evaluate()["accuracy"])
    direct = dep.transport.router.direct_calls - direct0
    dep.transport.router.close()  # this run's channel: the data owner frees it at once
    return {"times": times, "accs": accs, "calls": calls, "direct": direct,
            "total_calls": transport.calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epochs, seeds = (6, [0]) if args.quick else (args.epochs, [0, 1, 2])

    from syft_split.transport.pysyft import deployment

    [data] = digits_parties(1, seed=0)
    level = logging.getLogger().level
    dep = deployment({PARTY: {"train": (data.x_train, data.y_train),
                              "test": (data.x_test, data.y_test)}},
                     http=True, name_prefix="bench-latency")
    logging.getLogger().setLevel(level)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in ("local", *SCHEDULES)}
    try:
        for seed in seeds:
            t, a = local_run(data, epochs, seed)
            runs["local"].append({"times": t, "accs": a, "calls": [0], "direct": 0,
                                  "total_calls": 0})
            for schedule in SCHEDULES:
                r = split_run(dep, schedule, epochs, seed)
                runs[schedule].append(r)
                print(f"seed {seed} {schedule}: epoch {statistics.median(timed(r['times'])):.3f}"
                      f" s, last acc {r['accs'][-1]:.4f}", flush=True)
    finally:
        dep.close()

    out: dict[str, Any] = {"delay_s_per_call": DELAY, "batch_size": BATCH, "epochs": epochs,
                           "seeds": len(seeds), "train_records": len(data.x_train),
                           "test_records": len(data.x_test), "lr": LR,
                           "torch_threads": args.threads}
    for name, rs in runs.items():
        out[f"epoch_s_{name}"] = statistics.median(t for r in rs for t in timed(r["times"]))
        last = [statistics.mean(r["accs"][-3:]) for r in rs]
        out[f"test_accuracy_{name}"] = statistics.mean(last)
        for seed, acc in zip(seeds, last):
            out[f"test_accuracy_{name}_seed{seed}"] = acc
        if name != "local":
            out[f"calls_per_epoch_{name}"] = statistics.median(c for r in rs for c in r["calls"])
            out[f"direct_share_{name}"] = sum(r["direct"] for r in rs) / sum(
                r["total_calls"] for r in rs)
            out[f"ratio_{name}_vs_local"] = out[f"epoch_s_{name}"] / out["epoch_s_local"]
            out[f"accuracy_gap_points_{name}_vs_exact"] = 100 * (
                out[f"test_accuracy_{name}"] - out["test_accuracy_exact"]) if name != "exact" \
                else 0.0
    best = min(SCHEDULES, key=lambda s: out[f"ratio_{s}_vs_local"])
    out["best_schedule"] = best
    out["best_ratio_vs_local"] = out[f"ratio_{best}_vs_local"]
    out = {k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}
    path = ROOT / "bench" / "results" / ("latency_quick.json" if args.quick else "latency.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(json.dumps(out, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
