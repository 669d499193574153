"""Many data owners at once, over four real HTTP datasites with 50 ms added per call.

A concurrent SplitFed v1 round costs about one data owner's round trip, not four: it takes at
most 1.5x the slowest single data owner's share of a sequential round plus the model owner's
own compute, and ends with the same weights as the sequential schedule (<= 1e-6). FedAvg runs
through the same datasites and equals the weighted average of local runs.

The four datasites are launched once for the module (uvicorn processes on loopback).
"""

from __future__ import annotations

import copy
import statistics
import threading
import time
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from syft_split import OptimizerSpec, SplitPlan, SplitSession, Trainer
from syft_split.deploy import Deployment, datasites, inprocess
from syft_split.federated import FederatedTrainer
from syft_split.transport.base import Transport
from syft_split.transport.latency import DelayedTransport

pytestmark = [pytest.mark.pysyft, pytest.mark.slow]

PARTIES = [f"site{i}" for i in range(4)]
RECORDS, BATCH = 8, 8  # one round per epoch
LATENCY_S = 0.05


class Latency(DelayedTransport):
    """50 ms added to every call (a WAN round trip), with each call's span logged."""

    def __init__(self, inner: Transport, delay: float) -> None:
        super().__init__(inner, delay)
        self.spans: list[tuple[str, float, float]] = []
        self._span_lock = threading.Lock()

    def request(self, party: str, data: bytes) -> bytes:
        t0 = time.perf_counter()
        raw = super().request(party, data)
        with self._span_lock:
            self.spans.append((party, t0, time.perf_counter()))
        return raw

    def busy(self, party: str, start: float, end: float) -> float:
        """Seconds ``party``'s calls took between ``start`` and ``end``."""
        return sum(t1 - t0 for p, t0, t1 in self.spans if p == party and start <= t0 < end)


def _data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {p: (torch.randn(RECORDS, 1, 8, 8, generator=g),
                torch.randint(0, 10, (RECORDS,), generator=g)) for p in PARTIES}


@pytest.fixture(scope="module")
def sites() -> Any:
    data = _data()
    dep = datasites({p: {"train": d, "test": d} for p, d in data.items()}, http=True,
                    name_prefix="t-conc")
    try:
        yield dep, data
    finally:
        dep.close()


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def _splitfed(dep: Deployment, data: dict, transport: Transport, max_workers: int
              ) -> tuple[SplitSession, Trainer]:
    model = _model()
    plan = SplitPlan.vanilla([copy.deepcopy(model[:4]), copy.deepcopy(model[4:])], PARTIES,
                             share_weights="peer", datasets=["train"])
    session = SplitSession(plan, transport, optimizer=OptimizerSpec("sgd", lr=0.1, momentum=0.9))
    dep.approve_all(session.propose(), channel=True)  # steps and averaging: the direct channel
    dep.trust_each_other()
    trainer = Trainer(session, batch_size=BATCH, progress=False, schedule="splitfed_v1",
                      test_dataset=None, measure_leakage=False, max_workers=max_workers,
                      labels={p: {"train": d[1]} for p, d in data.items()})
    return session, trainer


def test_splitfed_v1_round_costs_the_slowest_data_owner_not_the_sum(sites) -> None:
    """The round's data-owner calls overlap: a concurrent round takes at most 1.5x the slowest
    single data owner's share of a sequential round (its own calls, measured in the same test,
    epochs alternating) plus the model owner's compute -- were they one after the other, it
    would take the sum (~4x) -- and ends with the sequential schedule's weights. The data owners
    allowed the direct channel, so a call costs its datasite ~2-3 ms of CPU and the 50 ms of
    latency dominate (over PySyft itself each call costs ~0.1-0.2 s of CPU: four datasites on
    two cores would be CPU-bound whatever the schedule)."""
    dep, data = sites
    wan, wan_con = Latency(dep.transport, LATENCY_S), Latency(dep.transport, LATENCY_S)
    seq_session, seq = _splitfed(dep, data, wan, max_workers=1)
    con_session, con = _splitfed(dep, data, wan_con, max_workers=4)
    rounds = RECORDS // BATCH
    seq.train_epoch(1)  # warm up: channels open, first-call costs paid
    con.train_epoch(1)
    con._rounds.timings.clear()
    single: dict[str, list[float]] = {p: [] for p in PARTIES}
    seq_round: list[float] = []
    in_round: list[float] = []
    for epoch in (2, 3, 4):  # alternate, so both see the same machine load
        t0 = time.perf_counter()
        seq.train_epoch(epoch)
        t1 = time.perf_counter()
        seq_round.append((t1 - t0) / rounds)
        for p in PARTIES:  # a data owner's share of a sequential round: its own calls
            single[p].append(wan.busy(p, t0, t1) / rounds)
        t0 = time.perf_counter()
        con.train_epoch(epoch)
        in_round.append(max(wan_con.busy(p, t0, time.perf_counter()) for p in PARTIES) / rounds)

    timings = con._rounds.timings
    assert len(timings) == 3 * rounds and all(t.parties == 4 for t in timings)
    round_s = statistics.median(t.seconds for t in timings)
    model_owner_s = statistics.median(t.model_owner_s for t in timings)
    slowest_in_round = statistics.median(in_round)
    slowest_single = max(statistics.median(v) for v in single.values())
    seq_s = statistics.median(seq_round)
    print(f"\nround: concurrent {round_s:.3f}s, sequential {seq_s:.3f}s; slowest data owner "
          f"{slowest_in_round:.3f}s in the concurrent round, {slowest_single:.3f}s alone; "
          f"model owner {model_owner_s:.3f}s")
    assert round_s <= 1.5 * slowest_single + model_owner_s
    assert round_s < 0.5 * seq_s

    # the same weights as one data owner after the other
    for p in PARTIES:
        a = dep.owners[p].export_weights(seq_session.remote[(p, 0)].segment_id)
        b = dep.owners[p].export_weights(con_session.remote[(p, 0)].segment_id)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    for x, y in zip(seq_session.local[1].state_dict().values(),
                    con_session.local[1].state_dict().values()):
        assert float((x - y).abs().max()) <= 1e-6
    assert not con.report.party_failures

    # one ledger: the same bytes and FLOPs per party concurrently, sequentially, and for the
    # same run on the in-process transport
    ref_dep = inprocess({p: {"train": d, "test": d} for p, d in data.items()})
    _, ref = _splitfed(ref_dep, data, ref_dep.transport, max_workers=1)
    for epoch in (1, 2, 3, 4):
        ref.train_epoch(epoch)
    want = ref_dep.transport.traffic.bytes_by_party()
    assert wan.traffic.bytes_by_party() == wan_con.traffic.bytes_by_party() == want
    assert seq.ledger.flops_by_party() == con.ledger.flops_by_party() == ref.ledger.flops_by_party()


def test_fedavg_over_the_same_datasites_equals_local_runs(sites) -> None:
    dep, data = sites
    wan = Latency(dep.transport, LATENCY_S)
    sgd = OptimizerSpec("sgd", lr=0.1)
    fl = FederatedTrainer(_model(), wan, PARTIES, optimizer=sgd, batch_size=BATCH, seed=7)
    dep.approve_all(fl.propose())
    report = fl.fit(1)
    runs = []
    for p in PARTIES:
        m = _model()
        opt = sgd.build(m.parameters())
        gen = torch.Generator().manual_seed(7)
        x, y = data[p]
        for idx in torch.randperm(RECORDS, generator=gen).split(BATCH):
            opt.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()
        runs.append(list(m.state_dict().values()))
    want = [sum(ws) / len(ws) for ws in zip(*runs)]
    got = list(fl.state_dict().values())
    assert max(float((a - b).abs().max()) for a, b in zip(got, want)) <= 1e-6
    n_params = sum(p.numel() for p in fl.module.parameters())
    for p in PARTIES:  # each data owner received the weights twice (train, evaluate), sent once
        assert report.bytes_by_party[p]["sent"] >= 4 * n_params
        assert report.flops_by_party[p]["forward"] > 0
