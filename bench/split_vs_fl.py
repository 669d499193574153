"""Benchmark: split vs federated learning per client, the seed's table reproduced and extended.

Per client and per epoch of CIFAR-10 (50 000 training images dealt to K = 100 or 500 clients),
the bytes each client sends + receives (GB) and the FLOPs it computes (TFLOPs, forward +
backward, torch's FlopCounterMode via syft_split.ledger), for

- ``split_vanilla``: split learning, each client keeps its own segment;
- ``split_relay``: split learning with client weight sharing (Gupta & Raskar 2018: the segment
  passes from client to client through the model owner, once per client and epoch);
- ``splitfed_v1`` / ``splitfed_v2``: SplitFed (Thapa et al. 2022), client segments averaged
  after every round (one batch per client), v1 also averages per-client server copies;
- ``fedavg``: the whole model at every client, one local epoch per round, weighted average;
- ``sync_sgd``: large-batch synchronous SGD, one gradient of the whole model per batch,

for a ResNet-18 (cut after the stem, ``relu``) and a VGG-16 (cut after the first block,
``pool1``), CIFAR-sized synthetic tensors (3x32x32, no download), batch 50, SGD.

How the numbers are obtained (``source`` in the JSON):
- every method is RUN for real: two data owners on the in-process transport (the same host,
  guard, wire bytes and ledger as a PySyft datasite -- tests/pysyft/test_concurrent.py checks
  the ledger is identical over HTTP datasites), each holding 100 records = one client's share
  at K = 500. Bytes come from the transport's traffic log (training ops only), FLOPs from the
  run's ledger. K = 500 is that measurement, except SplitFed's secure-aggregation bytes: run
  with two members and extrapolated linearly to K - 1 peers (each client exchanges a masked
  share with every other); K = 100 (500 records per client) scales the
  measured per-batch and per-round costs by the number of batches (x5) and keeps per-epoch
  costs (relay hand-off, FedAvg round) -- exact, since every full batch costs the same;
- ``round_s_concurrent`` / ``round_s_sequential``: one SplitFed v1 round over 8 real HTTP
  datasites on loopback with 50 ms added per call (a minimal latency wrapper here), epochs
  alternating between the two schedules, batch 4 per data owner; also the same rounds on the
  in-process transport (no PySyft CPU) for reference. The model owner computes on the CPU.

Writes ``bench/results/split_vs_fl.json`` and ``bench/results/split_vs_fl.png``.
``--quick``: VGG-style model only, no datasites, written to ``split_vs_fl_quick.json``.
Timings on a shared 2-core machine are noisy: ratios are measured side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

from syft_split import OptimizerSpec, SplitPlan, SplitSession, Trainer, split_model  # noqa: E402
from syft_split.deploy import Deployment, inprocess  # noqa: E402
from syft_split.federated import FederatedTrainer  # noqa: E402
from syft_split.transport.base import Transport  # noqa: E402
from syft_split.transport.latency import DelayedTransport  # noqa: E402

CIFAR_TRAIN = 50_000
CLIENTS = (100, 500)
BATCH = 50
SHARE = CIFAR_TRAIN // max(CLIENTS)  # records per measured client = the share at K = 500
METHODS = ("split_vanilla", "split_relay", "splitfed_v1", "splitfed_v2", "fedavg", "sync_sgd")
SGD = OptimizerSpec("sgd", lr=0.01)
BATCH_OPS = {"forward", "backward", "fl_gradient"}
WEIGHT_OPS = {"export", "seal", "unseal", "secagg_round", "secagg_contribute",
              "secagg_aggregate", "fl_train"}

#: Vepakomma, Gupta, Swedish & Raskar 2018 (Tables 1-2), the figures the split-learning page
#: shows and Singh et al. 2019 build on; quoted, not re-derived (not re-verifiable offline).
PUBLISHED = {
    "source": "Vepakomma et al. 2018, 'Split learning for health', Tables 1-2 (as shown on "
              "splitlearning.github.io); quoted from the paper, not re-verified offline",
    "tflops_per_client_vgg_cifar10": {"100": {"sync_sgd": 29.4, "fedavg": 29.4, "split": 0.1548},
                                      "500": {"sync_sgd": 5.89, "fedavg": 5.89, "split": 0.03}},
    "gb_per_client_resnet_cifar100": {"100": {"sync_sgd": 13, "fedavg": 3, "split": 6},
                                      "500": {"sync_sgd": 14, "fedavg": 2.4, "split": 1.2}},
}


# ----------------------------------------------------------------------------- models
class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.short = (nn.Sequential() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                    nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), 11.2 M parameters."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        blocks, cin = [], 64
        for cout, stride in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1),
                             (512, 2), (512, 1)]:
            blocks.append(_Block(cin, cout, stride))
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.fc(self.flatten(self.pool(self.layers(x))))


def vgg16(classes: int = 10) -> nn.Sequential:
    """VGG-16 for 32x32 inputs (13 convolutions, one classifier layer), 14.7 M parameters."""
    layers: list[tuple[str, nn.Module]] = []
    cin, block, k = 3, 1, 1
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"]:
        if v == "M":
            layers.append((f"pool{block}", nn.MaxPool2d(2)))
            block, k = block + 1, 1
        else:
            layers += [(f"conv{block}_{k}", nn.Conv2d(cin, int(v), 3, padding=1)),
                       (f"relu{block}_{k}", nn.ReLU())]
            cin, k = int(v), k + 1
    layers += [("flatten", nn.Flatten()), ("fc", nn.Linear(512, classes))]
    return nn.Sequential(OrderedDict(layers))


def small_cnn() -> nn.Sequential:
    """A CIFAR-shaped CNN whose model-owner part costs almost nothing: round timings show the
    transport's concurrency without the model owner's compute."""
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(3, 8, 3, padding=1)), ("relu", nn.ReLU()), ("pool", nn.MaxPool2d(4)),
        ("flatten", nn.Flatten()), ("fc", nn.Linear(8 * 8 * 8, 10))]))


MODELS: dict[str, tuple[Any, str]] = {"resnet18": (ResNet18, "relu"), "vgg16": (vgg16, "pool1"),
                                      "small_cnn": (small_cnn, "pool"),
                                      # the client holds one convolution only (cut sensitivity)
                                      "vgg16_conv1": (vgg16, "relu1_1")}


def _data(parties: list[str], records: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {p: (torch.randn(records, 3, 32, 32, generator=g),
                torch.randint(0, 10, (records,), generator=g)) for p in parties}


def _deploy(data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Deployment:
    return inprocess({p: {"train": d} for p, d in data.items()},
                     max_request_bytes=512 * 1024 * 1024)


def _split_trainer(model_name: str, method: str, transport: Transport, dep: Deployment,
                   data: dict[str, Any], batch: int, max_workers: int | None = None) -> Trainer:
    make, cut = MODELS[model_name]
    torch.manual_seed(0)
    segments = split_model(make(), cut)
    schedule = {"split_vanilla": "round_robin", "split_relay": "relay"}.get(method, method)
    share = "none" if method == "split_vanilla" else "peer"
    plan = SplitPlan.vanilla(segments, list(data), share_weights=share, datasets=["train"],
                             max_batch=batch)
    session = SplitSession(plan, transport, optimizer=SGD)
    dep.approve_all(session.propose(), channel=True)  # datasites: steps over the direct channel
    if share == "peer":  # relay and SplitFed move weights only between trusting data owners
        dep.trust_each_other()
    return Trainer(session, batch_size=batch, progress=False, schedule=schedule,
                   test_dataset=None, measure_leakage=False, max_workers=max_workers,
                   labels={p: {"train": d[1]} for p, d in data.items()})


# ----------------------------------------------------------------------- measurement
def measure(model_name: str, method: str, share: int = SHARE, batch: int = BATCH) -> dict[str, Any]:
    """Run ``method`` for one epoch with two data owners of ``share`` records each; return
    one client's measured bytes (per batch op / weight op) and FLOPs (mean of the two)."""
    parties = ["a", "b"]
    data = _data(parties, share)
    dep = _deploy(data)
    t0 = time.perf_counter()
    if method in ("fedavg", "sync_sgd"):
        torch.manual_seed(0)
        fl = FederatedTrainer(MODELS[model_name][0](), dep.transport, parties,
                              algorithm=method, optimizer=SGD, batch_size=batch,
                              test_dataset=None)
        dep.approve_all(fl.propose())
        dep.transport.traffic.clear()
        report = fl.fit(1)
    else:
        trainer = _split_trainer(model_name, method, dep.transport, dep, data, batch)
        dep.transport.traffic.clear()
        report = trainer.fit(1, verbose=False)
    seconds = time.perf_counter() - t0
    records = dep.transport.traffic.snapshot()
    per_batch = per_weights = 0
    imports = 0
    for r in records:
        for p in parties:
            if p in (r.src, r.dst):
                if r.op in BATCH_OPS:
                    per_batch += r.nbytes
                elif r.op in WEIGHT_OPS:
                    per_weights += r.nbytes
        imports += int(r.op in ("import", "unseal") and r.dst in parties)
    batches = math.ceil(share / batch)
    flops = sum(report.training_tflops(p) for p in parties) * 1e12 / len(parties)
    return {"batch_bytes": per_batch / len(parties) / batches,
            "weight_bytes": per_weights / len(parties), "imports": imports,
            "flops_per_batch": flops / batches, "measured_batches": batches,
            "peak_memory_bytes": max(report.peak_memory_by_party.get(p, 0) for p in parties),
            "model_owner_tflops": report.training_tflops("model_owner"), "seconds": seconds}


#: SplitFed's secure-aggregation bytes are not run with K members (they are with 2)
SPLITFED_NOTE = ("; SplitFed's weight bytes: the measured two-member secure aggregation per "
                 "peer, extrapolated linearly to the {} other members")


def per_client_epoch(method: str, m: dict[str, Any], clients: int, batch: int = BATCH
                     ) -> tuple[float, float]:
    """(bytes, FLOPs) of one client for one epoch with ``clients`` clients."""
    batches = math.ceil(CIFAR_TRAIN // clients / batch)
    weights = m["weight_bytes"]
    if method in ("splitfed_v1", "splitfed_v2"):  # averaged after every round: per batch
        # secure aggregation: each client seals its masked weights for every other member
        # and receives theirs, so a round's bytes grow with the cohort (measured with 2)
        weights = weights / m["measured_batches"] * batches * (clients - 1)
    elif method == "split_relay":  # one hand-off (export at one, import at the next) per client
        weights = 2 * weights / max(m["imports"], 1)
    return m["batch_bytes"] * batches + weights, m["flops_per_batch"] * batches


# ------------------------------------------------------------------- rounds, timed
def time_rounds(model_name: str, dep: Deployment, data: dict[str, Any], batch: int,
                delay: float = 0.05) -> dict[str, float]:
    """SplitFed v1 over ``dep``'s data owners with ``delay`` per call: seconds per round,
    concurrent (one worker per data owner) and sequential, epochs alternating."""
    wan = DelayedTransport(dep.transport, delay)
    seq = _split_trainer(model_name, "splitfed_v1", wan, dep, data, batch, max_workers=1)
    con = _split_trainer(model_name, "splitfed_v1", wan, dep, data, batch,
                         max_workers=len(data))
    rounds = math.ceil(len(next(iter(data.values()))[1]) / batch)
    seq.train_epoch(1)  # warm up: channels open, first-call costs paid
    con.train_epoch(1)
    con._rounds.timings.clear()
    seq_s: list[float] = []
    for epoch in (2, 3):
        t0 = time.perf_counter()
        seq.train_epoch(epoch)
        seq_s.append((time.perf_counter() - t0) / rounds)
        con.train_epoch(epoch)
    timings = con._rounds.timings
    out = {"round_s_concurrent": statistics.mean(t.seconds for t in timings),
           "round_s_sequential": statistics.mean(seq_s),
           "round_model_owner_s": statistics.mean(t.model_owner_s for t in timings),
           "round_forward_s": statistics.mean(t.forward_s for t in timings),
           "round_backward_s": statistics.mean(t.backward_s for t in timings),
           "round_aggregate_s": statistics.mean(t.aggregate_s for t in timings)}
    out["ratio_concurrent_vs_sequential"] = out["round_s_concurrent"] / out["round_s_sequential"]
    # the model owner's own compute is the same work in both schedules (CPU here): without it
    mo = out["round_model_owner_s"]
    out["ratio_without_model_owner"] = ((out["round_s_concurrent"] - mo)
                                        / max(out["round_s_sequential"] - mo, 1e-9))
    wan.traffic.clear()
    return out


def plot(results: dict[str, Any], rounds: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4), gridspec_kw={"width_ratios": [3, 3, 2]})
    width = 0.8 / len(METHODS)
    for ax, key, title in ((axes[0], "client_gb", "GB per client per epoch"),
                           (axes[1], "client_tflops", "TFLOPs per client per epoch")):
        groups = [(m, k) for m in models for k in CLIENTS]
        for j, method in enumerate(METHODS):
            ys = [results[m][str(k)][key][method] for m, k in groups]
            ax.bar([i + (j - len(METHODS) / 2 + 0.5) * width for i in range(len(groups))], ys,
                   width=width, label=method)
        ax.set_xticks(range(len(groups)), [f"{m}\n{k} clients" for m, k in groups])
        ax.set_yscale("log")
        ax.set_title(title)
    axes[0].legend(fontsize=7, ncol=2)
    labels, conc, seq = [], [], []
    for m in rounds:
        for where, r in rounds[m].items():
            labels.append(f"{m}\n{where}")
            conc.append(r["round_s_concurrent"])
            seq.append(r["round_s_sequential"])
    xs = range(len(labels))
    axes[2].bar([x - 0.2 for x in xs], seq, width=0.4, label="sequential")
    axes[2].bar([x + 0.2 for x in xs], conc, width=0.4, label="concurrent")
    axes[2].set_xticks(list(xs), labels, fontsize=8)
    axes[2].set_title("SplitFed v1 round (s), 8 owners, +50 ms/call")
    axes[2].legend(fontsize=7)
    fig.suptitle("Split vs federated learning per client (CIFAR-10 scale, measured)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _launch_http(parties: list[str], records: int) -> tuple[Deployment, dict[str, Any]]:
    from syft_split.deploy import datasites

    data = _data(parties, records, seed=1)
    return datasites({p: {"train": d} for p, d in data.items()}, http=True,
                     name_prefix="bench-fl"), data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--datasites", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    models = ["vgg16"] if args.quick else ["resnet18", "vgg16"]
    results: dict[str, Any] = {}
    measured: dict[str, Any] = {}
    for name in models:
        measured[name] = {}
        for method in METHODS:
            measured[name][method] = measure(name, method)
            print(f"{name} {method}: {measured[name][method]}", flush=True)
        results[name] = {}
        for k in CLIENTS:
            gb, tf = {}, {}
            for method in METHODS:
                b, f = per_client_epoch(method, measured[name][method], k)
                gb[method], tf[method] = b / 1e9, f / 1e12
            results[name][str(k)] = {
                "client_gb": gb, "client_tflops": tf,
                "ratio_fl_vs_split_gb": gb["fedavg"] / gb["split_relay"],
                "ratio_fl_vs_split_tflops": tf["fedavg"] / tf["split_relay"],
                "records_per_client": CIFAR_TRAIN // k,
                "source": ("measured: two data owners holding one client's share"
                           if CIFAR_TRAIN // k == SHARE else
                           f"scaled from the measured per-batch/per-round costs "
                           f"(x{CIFAR_TRAIN // k // SHARE} batches)") + SPLITFED_NOTE.format(k - 1),
            }
    sensitivity: dict[str, Any] = {}
    if not args.quick:  # the same VGG-16 with only its first convolution at the client
        m = measure("vgg16_conv1", "split_relay")
        for k in CLIENTS:
            b, f = per_client_epoch("split_relay", m, k)
            ref = results["vgg16"][str(k)]
            sensitivity[str(k)] = {
                "client_gb_split_relay": b / 1e9, "client_tflops_split_relay": f / 1e12,
                "ratio_fl_vs_split_gb": ref["client_gb"]["fedavg"] / (b / 1e9),
                "ratio_fl_vs_split_tflops": ref["client_tflops"]["fedavg"] / (f / 1e12)}
        print(f"vgg16 cut after conv1_1: {sensitivity}", flush=True)
    comparison = {}
    for k in ("100", "500"):
        pub_tf = PUBLISHED["tflops_per_client_vgg_cifar10"][k]
        pub_gb = PUBLISHED["gb_per_client_resnet_cifar100"][k]
        comparison[k] = {
            "published_ratio_fl_vs_split_tflops_vgg": pub_tf["fedavg"] / pub_tf["split"],
            "published_ratio_fl_vs_split_gb_resnet": pub_gb["fedavg"] / pub_gb["split"],
            "published_ratio_sync_sgd_vs_fl_gb_resnet": pub_gb["sync_sgd"] / pub_gb["fedavg"]}
        for name in models:
            comparison[k][f"ratio_fl_vs_split_tflops_{name}"] = results[name][k]["ratio_fl_vs_split_tflops"]
            comparison[k][f"ratio_fl_vs_split_gb_{name}"] = results[name][k]["ratio_fl_vs_split_gb"]
        if sensitivity:
            comparison[k]["ratio_fl_vs_split_tflops_vgg16_conv1"] = sensitivity[k]["ratio_fl_vs_split_tflops"]
    rounds: dict[str, Any] = {}
    timed = [*models, "small_cnn"]
    for name in timed:
        parties = [f"site{i}" for i in range(args.datasites)]
        data = _data(parties, 8, seed=1)
        rounds[name] = {"inprocess": time_rounds(name, _deploy(data), data, batch=4)}
        print(f"{name} rounds in-process: {rounds[name]['inprocess']}", flush=True)
    if not args.quick:
        dep, data = _launch_http([f"site{i}" for i in range(args.datasites)], 8)
        try:
            for name in timed:
                rounds[name]["http"] = time_rounds(name, dep, data, batch=4)
                print(f"{name} rounds over HTTP: {rounds[name]['http']}", flush=True)
        finally:
            dep.close()
    for name in models:
        src = rounds[name].get("http", rounds[name]["inprocess"])
        for k in CLIENTS:
            results[name][str(k)]["round_s_concurrent"] = src["round_s_concurrent"]
            results[name][str(k)]["round_s_sequential"] = src["round_s_sequential"]
    out = {
        "about": {
            "what": "per client and epoch of CIFAR-10 (50 000 images over K clients), batch "
                    f"{BATCH}, SGD; split methods count the client segment only",
            "ratio_fl_vs_split": "fedavg / split_relay (split learning with client weight "
                                 "sharing, the seed's SplitNN setting)",
            "rounds": f"SplitFed v1, {args.datasites} data owners, batch 4 each, 50 ms added "
                      "per call; 'http' = real PySyft datasites on loopback, approved with the "
                      "direct channel (the round_s_* keys), 'inprocess' = same rounds without "
                      "PySyft; one warm-up epoch, then two epochs alternating; model owner on CPU",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared and loaded: "
                       "timings are noisy",
            "torch": torch.__version__, "threads": torch.get_num_threads(),
        },
        "published": PUBLISHED, "comparison": comparison, "cut_sensitivity_vgg16_conv1": sensitivity,
        "models": {n: {"parameters": sum(p.numel() for p in MODELS[n][0]().parameters()),
                       "client_parameters": sum(p.numel() for p in split_model(
                           MODELS[n][0](), MODELS[n][1])[0].parameters()),
                       "cut": MODELS[n][1]} for n in [*models, *(["vgg16_conv1"] if sensitivity else [])]},
        "results": results, "measured": measured, "rounds": rounds,
    }
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "split_vs_fl_quick" if args.quick else "split_vs_fl"
    (out_dir / f"{stem}.json").write_text(json.dumps(out, indent=2, sort_keys=True))
    plot(results, rounds, out_dir / f"{stem}.png")
    print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
