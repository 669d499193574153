"""The cost ledger: FLOPs per party from torch's FlopCounterMode, peak memory per party, in
every run report next to bytes (identical over HTTP datasites: tests/pysyft/test_concurrent.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from syft_split import OptimizerSpec, SplitPlan, SplitSession, Trainer
from syft_split.deploy import inprocess
from syft_split.ledger import CostLedger, step_cost


def test_flops_of_a_linear_layer_match_the_matmul_count() -> None:
    # a (B x 64) @ (64 x 10) product is 2*B*64*10 FLOPs; backward: weight grad (+ input grad)
    cost = step_cost(nn.Linear(64, 10), (64,), 32)
    assert cost.forward == 2 * 32 * 64 * 10
    assert cost.backward == 2 * 32 * 64 * 10  # weight gradient only (a first segment)
    with_input = step_cost(nn.Linear(64, 10), (64,), 32, input_grad=True)
    assert with_input.backward == 2 * cost.backward


def test_peak_memory_matches_pytorchs_own_tracker() -> None:
    from torch.distributed._tools.mem_tracker import MemTracker

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 16 * 16, 10))
    spec = OptimizerSpec("adam", lr=1e-3)
    cost = step_cost(model, (3, 16, 16), 16, optimizer=spec)
    m = copy.deepcopy(model)
    opt = spec.build(m.parameters())
    x = torch.zeros(16, 3, 16, 16)
    tracker = MemTracker()
    tracker.track_external(m, opt)
    with tracker:
        out = m(x)
        out.backward(torch.ones_like(out))
        opt.step()
    theirs = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    assert cost.peak_bytes == theirs + x.numel() * 4  # ours also counts the input batch
    params = sum(p.numel() for p in model.parameters()) * 4
    assert cost.peak_bytes > 3 * params  # weights, gradients and Adam's two moments


def _parties(n: int = 40):
    g = torch.Generator().manual_seed(0)
    return {p: {"train": (torch.randn(n, 1, 8, 8, generator=g),
                          torch.randint(0, 10, (n,), generator=g))} for p in ("a", "b")}


def _fit(dep, parties) -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(64, 10))
    segs = [copy.deepcopy(model[:4]), copy.deepcopy(model[4:])]
    plan = SplitPlan.vanilla(segs, list(parties), datasets=["train"])
    session = SplitSession(plan, dep.transport, optimizer=OptimizerSpec("sgd", lr=0.1))
    dep.approve_all(session.propose())
    report = Trainer(session, batch_size=16, progress=False, test_dataset=None,
                     measure_leakage=False,
                     labels={p: {"train": d["train"][1]} for p, d in parties.items()}).fit(1, verbose=False)
    return report, segs


def test_run_report_books_each_partys_flops_and_memory(tmp_path) -> None:
    parties = _parties()
    report, segs = _fit(inprocess(parties), parties)
    # each data owner ran its segment on batches of 16, 16, 8: counted independently here
    counter = FlopCounterMode(display=False)
    want_fwd = want_bwd = 0
    for b in (16, 16, 8):
        m = copy.deepcopy(segs[0])
        with counter:
            out = m(torch.zeros(b, 1, 8, 8))
        want_fwd += counter.get_total_flops()
        with counter:
            out.backward(torch.ones_like(out))
        want_bwd += counter.get_total_flops()
    for p in ("a", "b"):
        assert report.flops_by_party[p] == {"forward": want_fwd, "backward": want_bwd, "eval": 0}
        assert report.peak_memory_by_party[p] > 0
    mo = report.flops_by_party["model_owner"]
    assert mo["forward"] == 2 * 2 * 40 * 64 * 10 and mo["backward"] == 2 * mo["forward"]
    assert report.epochs[-1].flops_by_party == report.flops_by_party
    assert report.training_tflops("a") == (want_fwd + want_bwd) / 1e12
    saved = json.loads(report.save(tmp_path / "run").read_text())
    assert saved["flops_by_party"]["a"]["forward"] == want_fwd
    assert saved["peak_memory_by_party"]["model_owner"] > 0


def test_ledger_caches_one_count_per_batch_size() -> None:
    ledger = CostLedger()
    module = nn.Linear(8, 4)
    first = ledger.cost(module, (8,), 5, input_grad=False, optimizer=None)
    assert ledger.cost(module, (8,), 5, input_grad=False, optimizer=None) is first
    ledger.add("x", first, times=3)
    ledger.add("x", first, train=False)
    assert ledger.flops_by_party()["x"] == {"forward": 3 * first.forward,
                                            "backward": 3 * first.backward,
                                            "eval": first.forward}


def test_counting_a_step_leaves_the_global_random_stream_alone() -> None:
    # a dropout in the counted copy draws from torch's RNG: the count must not shift the
    # caller's stream (a resumed run counts again, right after restoring the RNG state)
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5))
    torch.manual_seed(0)
    want = torch.rand(4)
    torch.manual_seed(0)
    step_cost(model, (8,), 4)
    assert torch.equal(torch.rand(4), want)


def _conv_macs(batch: int, conv: nn.Conv2d | nn.Conv1d, size: list[int]) -> int:
    """Multiply-adds of ``conv``'s forward pass, counted by hand."""
    out = 1
    for n, k, s, p, d in zip(size, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                             strict=True):
        out *= (n + 2 * int(p) - d * (k - 1) - 1) // s + 1
    kernel = 1
    for k in conv.kernel_size:
        kernel *= k
    return batch * conv.out_channels * out * (conv.in_channels // conv.groups) * kernel


@pytest.mark.parametrize("conv, size", [
    (nn.Conv2d(8, 8, 3, groups=8, padding=1), [16, 16]),  # depthwise
    (nn.Conv2d(8, 16, 3, stride=2, dilation=2, groups=4), [31, 31]),
    (nn.Conv1d(4, 8, 5, stride=2, padding=1, dilation=2, groups=2), [50]),
    (nn.Conv2d(3, 16, 3, padding=1), [32, 32]),
])
def test_grouped_convolutions_count_their_own_multiply_adds(conv: nn.Module,
                                                           size: list[int]) -> None:
    # the weight gradient costs what the forward does (torch's formula counts it as if the
    # convolution were dense: groups times too many); the input gradient as much again
    assert isinstance(conv, nn.Conv1d | nn.Conv2d)
    flops = 2 * _conv_macs(8, conv, size)
    cost = step_cost(conv, (conv.in_channels, *size), 8, memory=False)
    assert (cost.forward, cost.backward) == (flops, flops)
    assert step_cost(conv, (conv.in_channels, *size), 8, input_grad=True,
                     memory=False).backward == 2 * flops


class _SelfAttention(nn.Module):
    def __init__(self, embed: int, heads: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(embed, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # need_weights=False: the fused attention kernel (on CPU: flash attention for CPU)
        return self.mha(x, x, x, need_weights=False)[0]


def test_an_attention_segment_counts_its_attention_products() -> None:
    b, t, e, heads = 4, 10, 16, 2
    cost = step_cost(_SelfAttention(e, heads), (t, e), b, memory=False)
    projections = 2 * b * t * e * 3 * e + 2 * b * t * e * e  # q, k, v in; out
    scores = 2 * b * t * t * e  # Q K^T over all heads (and as much for the weights times V)
    assert cost.forward == projections + 2 * scores
    # backward: weight gradients of the projections, the input gradient of the output
    # projection (the segment's input needs none), attention: recomputed scores + 4 products
    assert cost.backward == projections + 2 * b * t * e * e + 5 * scores
    ledger = CostLedger(memory=False)
    ledger.add("lab", cost)
    assert ledger.training_flops("lab") == cost.forward + cost.backward


def test_run_traffic_keeps_its_place_when_the_log_is_cleared() -> None:
    """A traffic log cleared between two reads (e.g. by a test between two fits): the run's
    figures go on with what is added after it (they lost every record up to the log's old
    length: 2000 bytes instead of 3500 here)."""
    from syft_split.report import RunTraffic
    from syft_split.transport.base import MODEL_OWNER, TrafficLog

    log = TrafficLog()
    for _ in range(10):  # before the run: not its traffic
        log.add(MODEL_OWNER, "a", "forward", 100, ())
    run = RunTraffic(log)
    for _ in range(5):
        log.add(MODEL_OWNER, "a", "forward", 100, ())
    assert run.figures()["bytes_by_party"]["a"]["received"] == 500
    log.clear()
    for _ in range(30):
        log.add(MODEL_OWNER, "a", "forward", 100, ())
    assert run.figures()["bytes_by_party"]["a"]["received"] == 3500
    assert log.size() == 45 and len(log.since(40)) == 5
