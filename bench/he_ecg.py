"""Benchmark: an HE-protected epoch of an ECG-shaped 1-D CNN vs HESplitNet's published figure.

HESplitNet ("Split Without a Leak", khoaguin/HESplitNet) trains a 1-D CNN on MIT-BIH heart
beats (187 samples, 5 classes): the client runs Conv1d(1, 16, 7, padding=3) -> LeakyReLU ->
MaxPool1d(2) -> Conv1d(16, 8, 5, padding=2) -> LeakyReLU -> MaxPool1d(2), the server one
Linear (8 * 46 = 368 inputs for 187-sample beats -> 5) on CKKS ciphertexts. The paper
reports 987 s per training epoch of 13 245 records (batch 4, GTX 1070 Ti GPU): 74.5 s per
1 000 training records.

Here: the same layer sizes on synthetic beats (no download: Gaussian P/QRS/T waves with
class-specific morphology, timing jitter, baseline wander and noise, min-max scaled to
[0, 1] like the preprocessed MIT-BIH set; noisy enough that the plain model reaches ~85-87%
after three epochs, near the paper's 87.9% plaintext accuracy), split at the flatten, the model owner's
Linear(368, 5) protected at level A (syft_split.he.protect), batch 4, Adam(1e-3) for every
layer, in-process transport, one process, one torch thread. The same plan in plain, from
the same initial weights and batch order, gives the accuracy baseline. Seconds per 1 000
training records = training-epoch wall time (no evaluation) / training records * 1 000.

Run: ``python bench/he_ecg.py [--train N] [--epochs E] [--quick]``; writes
``bench/results/he_ecg.json`` and merges its headline keys into ``he_layer.json``
(``--quick``: 200/100 records, one epoch, ``he_ecg_quick.json`` only).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from syft_split import OptimizerSpec, SplitPlan, SplitSession, Trainer  # noqa: E402
from syft_split.deploy import inprocess  # noqa: E402
from syft_split.he import protect  # noqa: E402

HESPLITNET_EPOCH_S = 987.0
HESPLITNET_TRAIN_RECORDS = 13245
LENGTH, CLASSES = 187, 5


def ecg_beats(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic heart beats (n, 1, 187) in [0, 1] and labels 0..4 (N, S, V, F, Q)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, LENGTH)
    y = rng.integers(0, CLASSES, n)

    def bump(center: np.ndarray, width: np.ndarray, amp: np.ndarray) -> np.ndarray:
        return amp[:, None] * np.exp(-0.5 * ((t[None, :] - center[:, None]) / width[:, None]) ** 2)

    jit = rng.normal(0.0, 0.04, n)
    r_at = 0.30 + jit - 0.07 * (y == 1) + rng.normal(0.0, 0.01, n) * (y == 3)
    qrs = np.where(y == 2, 0.035, np.where(y == 3, 0.022, np.where(y == 4, 0.03, 0.012)))
    qrs = qrs * rng.uniform(0.8, 1.25, n)
    p_amp = np.where((y == 2) | (y == 4), 0.0, np.where(y == 1, 0.05, 0.12))
    t_amp = np.where(y == 2, -0.3, np.where(y == 3, -0.05, 0.25)) * rng.uniform(0.7, 1.3, n)
    amp = rng.uniform(0.7, 1.3, n)
    x = (bump(r_at - 0.15, np.full(n, 0.025), p_amp * amp)
         + bump(r_at - 0.02, qrs, -0.15 * amp)
         + bump(r_at, qrs, amp)
         + bump(r_at + 0.025, qrs, -0.2 * amp)
         + bump(r_at + 0.25 + 0.03 * (y == 2), np.full(n, 0.05), t_amp * amp))
    x += (y == 4)[:, None] * bump(r_at - 0.06, np.full(n, 0.004), np.full(n, 0.8))
    x += 0.08 * np.sin(2 * np.pi * (rng.uniform(0.2, 1.0, n)[:, None] * t[None, :]
                                    + rng.uniform(0, 1, n)[:, None]))
    x += rng.normal(0.0, 0.12, x.shape)
    x = (x - x.min(axis=1, keepdims=True)) / np.ptp(x, axis=1, keepdims=True)
    return torch.from_numpy(x[:, None].astype(np.float32)), torch.from_numpy(y.astype(np.int64))


def ecg_segments() -> list[nn.Module]:
    """HESplitNet's layer sizes: the data owner's two convolutions, the model owner's Linear."""
    client = nn.Sequential(
        nn.Conv1d(1, 16, kernel_size=7, padding=3), nn.LeakyReLU(), nn.MaxPool1d(2),
        nn.Conv1d(16, 8, kernel_size=5, padding=2), nn.LeakyReLU(), nn.MaxPool1d(2),
        nn.Flatten())
    return [client, nn.Sequential(nn.Linear(8 * 46, CLASSES))]


def _run(protected: bool, data: dict[str, Any], epochs: int, batch: int, lr: float,
         seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    plan = SplitPlan.vanilla(copy.deepcopy(data["segments"]), "h")
    if protected:
        plan = protect(plan, level="A", batch_size=batch)
    dep = inprocess(data["parties"])
    session = SplitSession(plan, dep.transport, optimizer=OptimizerSpec("adam", lr=lr))
    dep.approve_all(session.propose())
    trainer = Trainer(session, batch_size=batch, progress=False, measure_leakage=False,
                      labels={"h": data["labels"]}, seed=seed)
    epoch_s, accs = [], []
    out: dict[str, Any] = {"epoch_s": epoch_s, "accuracy": accs}
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        trainer.train_epoch(epoch)
        epoch_s.append(time.perf_counter() - t0)
        if protected and epoch == epochs:  # the last step is a training step here
            assert session.he is not None
            out["he"] = session.he.costs()
        accs.append(trainer.evaluate()["accuracy"])
    return out


def bench_ecg(n_train: int = 2000, n_test: int = 1000, epochs: int = 3, batch: int = 4,
              lr: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """Plain and protected runs from the same weights; the headline numbers as a flat dict."""
    torch.set_num_threads(1)
    x_tr, y_tr = ecg_beats(n_train, seed)
    x_te, y_te = ecg_beats(n_test, seed + 1)
    torch.manual_seed(seed)
    data = {"segments": ecg_segments(),
            "parties": {"h": {"train": (x_tr, y_tr), "test": (x_te, y_te)}},
            "labels": {"train": y_tr, "test": y_te}}
    plain = _run(False, data, epochs, batch, lr, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        he = _run(True, data, epochs, batch, lr, seed)
    costs = he["he"]
    steps = costs["model_owner.h.steps"]
    per_1000 = statistics.mean(he["epoch_s"]) / n_train * 1000
    paper = HESPLITNET_EPOCH_S / HESPLITNET_TRAIN_RECORDS * 1000
    out = {
        "he_epoch_s_per_1000_ecg": per_1000,
        "plain_epoch_s_per_1000_ecg": statistics.mean(plain["epoch_s"]) / n_train * 1000,
        "hesplitnet_epoch_s": HESPLITNET_EPOCH_S,
        "hesplitnet_train_records": float(HESPLITNET_TRAIN_RECORDS),
        "hesplitnet_s_per_1000": paper,
        "speedup_vs_hesplitnet_per_1000": paper / per_1000,
        "ecg_train_records": float(n_train),
        "ecg_test_records": float(n_test),
        "ecg_epochs": float(epochs),
        "ecg_batch_size": float(batch),
        "he_accuracy_ecg": he["accuracy"][-1],
        "plain_accuracy_ecg": plain["accuracy"][-1],
        "he_accuracy_delta_ecg": 100.0 * abs(he["accuracy"][-1] - plain["accuracy"][-1]),
        "ratio_protected_vs_plain_epoch_ecg": statistics.mean(he["epoch_s"])
        / statistics.mean(plain["epoch_s"]),
        "keyswitches_per_step_ecg": costs["model_owner.h.last_rotations"],
        "keyswitches_min_per_step_ecg": costs["model_owner.h.last_keyswitches_min"],
        "bytes_up_per_step_ecg": costs["h.last_bytes_sent"],
        "bytes_down_per_step_ecg": costs["h.last_bytes_received"],
        "he_server_s_per_step_ecg": costs["model_owner.h.server_s"] / steps,
        "he_server_ser_s_per_step_ecg": costs["model_owner.h.ser_s"] / steps,
        "he_client_enc_s_per_step_ecg": costs["h.enc_s"] / steps,
        "he_client_dec_s_per_step_ecg": costs["h.dec_s"] / steps,
        "he_client_ser_s_per_step_ecg": costs["h.ser_s"] / steps,
    }
    for k, v in zip(("he", "plain"), (he, plain), strict=True):
        for e, (s, a) in enumerate(zip(v["epoch_s"], v["accuracy"], strict=True), 1):
            out[f"{k}_epoch{e}_s_ecg"] = s
            out[f"{k}_epoch{e}_accuracy_ecg"] = a
    return out


def merge_into(path: Path, values: dict[str, float]) -> None:
    """Update a flat JSON results file with ``values`` (other keys are kept)."""
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(values)
    path.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=2000, help="training records")
    ap.add_argument("--test", type=int, default=1000, help="test records")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--quick", action="store_true",
                    help="200/100 records, one epoch, to he_ecg_quick.json only")
    args = ap.parse_args()
    if args.quick:
        args.train, args.test, args.epochs = 200, 100, 1
    out = bench_ecg(args.train, args.test, args.epochs)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    name = "he_ecg_quick.json" if args.quick else "he_ecg.json"
    (results / name).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    if not args.quick:
        merge_into(results / "he_layer.json",
                   {k: v for k, v in out.items() if "epoch" not in k or "per_1000" in k})
    print(json.dumps(out, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
