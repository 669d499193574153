"""The per-run ledger: config, per-epoch metrics, steps, wall time, bytes, FLOPs and peak memory
per party (see :mod:`syft_split.ledger`), parties that failed a round; JSON + PNG.

Bytes are this run's only: :class:`RunTraffic` takes the records a transport's traffic log
(which lives as long as the transport) gained since the run's first ``fit``. Setup before it
(``describe``, ``propose`` with the initial weights, approvals) is not in the report; the
measuring and querying calls (:data:`MEASUREMENT_OPS`: the live leakage watch, the leakage
measurement after training, HE cost figures, segment status) are booked apart, in
``measurement_bytes_by_party``, not in ``bytes_by_party``.

Every byte figure counts payloads -- the wire-format message (:mod:`syft_split.wire`) of each
request and answer the transport's ``call`` carried, once per attempt -- not bytes on the
network: PySyft's own serialization and HTTP, the direct channel's ``open_channel`` control
calls, frame headers and TLS records are not counted, and a channel frame sent again after a
reconnect counts once.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .transport.base import MODEL_OWNER, TrafficLog, TrafficRecord

__all__ = ["RunReport", "EpochRecord", "RunTraffic", "MEASUREMENT_OPS", "MAX_NOT_AVERAGED",
           "MAX_UNREACHABLE", "MAX_ERROR_CHARS"]

#: ops that measure or query rather than train: booked in ``measurement_bytes_by_party``
MEASUREMENT_OPS = frozenset({"leakage", "watch", "he_costs", "status"})
#: rounds ``RunReport.not_averaged`` keeps (the newest)
MAX_NOT_AVERAGED = 1000
#: the skips ``extra["unreachable"]`` keeps (the latest), and the characters of each error
MAX_UNREACHABLE = 100
MAX_ERROR_CHARS = 1000


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    test_loss: float | None
    test_accuracy: float | None
    steps: int
    #: seconds of this epoch (training, evaluation and the watch)
    seconds: float
    #: cumulative bytes of this run so far, like ``steps`` and ``flops_by_party`` (not this
    #: epoch's alone): the report's ``bytes_by_party`` at the end of this epoch
    bytes_by_party: dict[str, dict[str, int]]
    #: each data owner's live leakage watch at the end of the epoch (figures, or halted)
    watch: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: cumulative FLOPs per party so far: {"forward", "backward", "eval"} (syft_split.ledger)
    flops_by_party: dict[str, dict[str, int]] = field(default_factory=dict)
    #: seconds of each concurrent round of this epoch (SplitFed with max_workers > 1)
    round_seconds: list[float] = field(default_factory=list)


@dataclass
class RunReport:
    """Everything one run measured. :meth:`save` writes ``report.json`` and ``report.png``.

    Byte figures are this run's payload bytes (see the module docstring): wire-format
    requests and answers, not bytes on the network (no PySyft serialization or HTTP, no channel
    control calls, frame headers or TLS; a frame resent after a reconnect counts once), and not
    the setup before ``fit``. A trainer's report covers all its ``fit`` calls."""

    config: dict[str, Any]
    epochs: list[EpochRecord] = field(default_factory=list)
    steps: int = 0
    wall_time_s: float = 0.0
    #: calls answered in this run's training and evaluation (measurement calls not included)
    transport_calls: int = 0
    #: payload bytes of this run's training and evaluation: {party: {"sent", "received"}}
    bytes_by_party: dict[str, dict[str, int]] = field(default_factory=dict)
    #: the same bytes per direction: {"src->dst": n}
    bytes_by_direction: dict[str, int] = field(default_factory=dict)
    #: payload bytes of this run's measuring calls (MEASUREMENT_OPS), apart from the above
    measurement_bytes_by_party: dict[str, dict[str, int]] = field(default_factory=dict)
    #: every op of this run: {op: {"calls", "request_bytes", "answer_bytes"}}
    bytes_by_op: dict[str, dict[str, int]] = field(default_factory=dict)
    #: FLOPs per party over the run: {"forward", "backward", "eval"} (syft_split.ledger)
    flops_by_party: dict[str, dict[str, int]] = field(default_factory=dict)
    #: peak tensor bytes of one training step per party (syft_split.ledger)
    peak_memory_by_party: dict[str, int] = field(default_factory=dict)
    #: data owners that failed a round and were dropped: {"party", "round", "phase", "error"}
    party_failures: list[dict[str, Any]] = field(default_factory=list)
    #: SplitFed rounds in which data owners kept their own weights instead of the average (not
    #: a failure: a member's HostLimits.min_cohort refused the cohort, or no member relays):
    #: {"epoch", "round" (of the epoch, from 0), "kept" (data owners), "reason"}; the newest
    #: MAX_NOT_AVERAGED (it is in every checkpoint: a run whose every round a cohort refuses
    #: made each save 2.1 MB and 183 ms after 10 000 rounds)
    not_averaged: list[dict[str, Any]] = field(default_factory=list)
    #: entries of ``not_averaged`` dropped to keep its newest MAX_NOT_AVERAGED
    not_averaged_dropped: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)

    @property
    def final_test_accuracy(self) -> float | None:
        return self.epochs[-1].test_accuracy if self.epochs else None

    def training_tflops(self, party: str) -> float:
        """Forward + backward TFLOPs ``party`` spent training in this run."""
        row = self.flops_by_party.get(party, {})
        return (row.get("forward", 0) + row.get("backward", 0)) / 1e12

    def note_unreachable(self, party: str, epoch: int | None, batch: int | None,
                         exc: BaseException, *, reason: str = "unreachable") -> None:
        """Record that ``party`` was skipped after ``exc`` in ``extra["unreachable"]`` (saved
        with every checkpoint): the latest :data:`MAX_UNREACHABLE` skips, each error text
        clipped to :data:`MAX_ERROR_CHARS` characters (a data owner chooses its text).
        ``reason``: ``"unreachable"`` (a timeout, a lost connection) or ``"refused"`` (the
        model owner refused its answer; the error names the op and the field)."""
        error = f"{type(exc).__name__}: {exc}"
        if len(error) > MAX_ERROR_CHARS:
            error = f"{error[:MAX_ERROR_CHARS]}... ({len(error) - MAX_ERROR_CHARS} more characters)"
        kept = self.extra.setdefault("unreachable", [])
        kept.append({"party": party, "epoch": epoch, "batch": batch, "reason": reason,
                     "error": error})
        del kept[:-MAX_UNREACHABLE]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, run_dir: str | Path) -> Path:
        """Write ``report.json`` and ``report.png`` into ``run_dir``; return the JSON path."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "report.json"
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True))
        self.plot(run_dir / "report.png")
        return path

    def plot(self, path: str | Path) -> None:
        """Loss/accuracy curves per epoch, bytes sent/received and training GFLOPs per party."""
        # a Figure without pyplot: no backend switch (a notebook's inline plots keep working)
        from matplotlib.figure import Figure

        panels = 5 if self.flops_by_party else 4
        fig = Figure(figsize=(4.4 * panels, 3.6))
        axes: Any = fig.subplots(1, panels)
        ep = [e.epoch for e in self.epochs]
        axes[0].plot(ep, [e.train_loss for e in self.epochs], "o-", label="train")
        if any(e.test_loss is not None for e in self.epochs):
            axes[0].plot(ep, [e.test_loss for e in self.epochs], "s--", label="test")
        axes[0].set(title="loss", xlabel="epoch")
        axes[0].legend()
        axes[1].plot(ep, [e.train_accuracy for e in self.epochs], "o-", label="train")
        if any(e.test_accuracy is not None for e in self.epochs):
            axes[1].plot(ep, [e.test_accuracy for e in self.epochs], "s--", label="test")
        axes[1].set(title="accuracy", xlabel="epoch", ylim=(0, 1.02))
        axes[1].legend()
        parties = sorted(self.bytes_by_party)
        sent = [self.bytes_by_party[p]["sent"] / 1e6 for p in parties]
        recv = [self.bytes_by_party[p]["received"] / 1e6 for p in parties]
        xs = range(len(parties))
        axes[2].bar([x - 0.2 for x in xs], sent, width=0.4, label="sent")
        axes[2].bar([x + 0.2 for x in xs], recv, width=0.4, label="received")
        axes[2].set_xticks(list(xs), parties, rotation=15)
        axes[2].set(title="MB per party")
        axes[2].legend()
        watched = sorted({p for e in self.epochs for p, w in e.watch.items()
                          if "inversion_ratio" in w})
        for party in watched:
            pts = [(e.epoch, e.watch[party]["inversion_ratio"]) for e in self.epochs
                   if "inversion_ratio" in e.watch.get(party, {})]
            axes[3].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=party)
        axes[3].set(title="leakage watch: inversion ratio\n(lower = more leakage)",
                    xlabel="epoch")
        if watched:
            axes[3].legend()
        if self.flops_by_party:
            names = sorted(self.flops_by_party)
            gflops = [self.training_tflops(p) * 1e3 for p in names]
            axes[4].bar(range(len(names)), gflops)
            axes[4].set_xticks(list(range(len(names))), names, rotation=15)
            axes[4].set(title="training GFLOPs per party")
        fig.tight_layout()
        fig.savefig(path, dpi=90)


def _add_bytes(into: dict[str, dict[str, int]], more: dict[str, dict[str, int]]) -> None:
    for key, row in more.items():
        mine = into.setdefault(key, {})
        for k, n in row.items():
            mine[k] = mine.get(k, 0) + int(n)


class RunTraffic:
    """One run's share of a transport's :class:`~syft_split.transport.base.TrafficLog`: the
    records added since this object was made, plus figures carried over from a process that
    crashed before a resume (:attr:`carried`, the saved report's figures). Each record is
    summed once (a checkpoint asks for the figures after every step)."""

    def __init__(self, log: TrafficLog) -> None:
        self.log = log
        self._seen = log.size()
        self._lock = threading.Lock()
        #: figures of the run before this process (a resumed run): same keys as figures()
        self.carried: dict[str, Any] = {}
        self._by_party: dict[str, dict[str, int]] = {}
        self._measured: dict[str, dict[str, int]] = {}
        self._by_direction: dict[str, int] = {}
        self._by_op: dict[str, dict[str, int]] = {}
        self._calls = 0

    def resume(self, carried: dict[str, Any]) -> None:
        """Go on from a checkpoint's figures (``carried``): what this object counted so far
        is dropped (a resume in the same process replays the steps after the checkpoint,
        whose traffic it had counted already)."""
        with self._lock:
            self._seen = self.log.size()
            self._by_party, self._measured, self._by_direction, self._by_op = {}, {}, {}, {}
            self._calls = 0
            self.carried = dict(carried)

    def _take(self, records: list[TrafficRecord]) -> None:
        for r in records:
            answer = r.dst == MODEL_OWNER
            op = self._by_op.setdefault(r.op, {"calls": 0, "request_bytes": 0,
                                               "answer_bytes": 0})
            op["answer_bytes" if answer else "request_bytes"] += r.nbytes
            op["calls"] += int(answer)
            measured = r.op in MEASUREMENT_OPS
            _add_bytes(self._measured if measured else self._by_party,
                       {r.src: {"sent": r.nbytes, "received": 0},
                        r.dst: {"sent": 0, "received": r.nbytes}})
            if not measured:
                key = f"{r.src}->{r.dst}"
                self._by_direction[key] = self._by_direction.get(key, 0) + r.nbytes
                self._calls += int(answer)

    def figures(self) -> dict[str, Any]:
        """``bytes_by_party``, ``bytes_by_direction``, ``transport_calls`` (training and
        evaluation), ``measurement_bytes_by_party`` and ``bytes_by_op`` of this run."""
        with self._lock:
            new = self.log.since(self._seen)
            self._seen += len(new)
            self._take(new)
            out: dict[str, Any] = copy.deepcopy({
                "bytes_by_party": self._by_party, "bytes_by_direction": self._by_direction,
                "transport_calls": self._calls, "measurement_bytes_by_party": self._measured,
                "bytes_by_op": self._by_op})
        carried = self.carried
        if carried:
            for key in ("bytes_by_party", "measurement_bytes_by_party", "bytes_by_op"):
                _add_bytes(out[key], carried.get(key, {}))
            for k, n in carried.get("bytes_by_direction", {}).items():
                out["bytes_by_direction"][k] = out["bytes_by_direction"].get(k, 0) + int(n)
            out["transport_calls"] += int(carried.get("transport_calls", 0))
        return out

    def book(self, report: RunReport) -> None:
        """Write this run's figures into ``report``."""
        for key, value in self.figures().items():
            setattr(report, key, value)
