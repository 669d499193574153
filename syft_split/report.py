"""The per-run ledger: config, per-epoch metrics, steps, wall time, bytes, FLOPs and peak memory
per party (see :mod:`syft_split.ledger`), parties that failed a round; JSON + PNG."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunReport", "EpochRecord"]


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    test_loss: float | None
    test_accuracy: float | None
    steps: int
    seconds: float
    bytes_by_party: dict[str, dict[str, int]]
    #: each data owner's live leakage watch at the end of the epoch (figures, or halted)
    watch: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: cumulative FLOPs per party so far: {"forward", "backward", "eval"} (syft_split.ledger)
    flops_by_party: dict[str, dict[str, int]] = field(default_factory=dict)
    #: seconds of each concurrent round of this epoch (SplitFed with max_workers > 1)
    round_seconds: list[float] = field(default_factory=list)


@dataclass
class RunReport:
    """Everything one run measured. :meth:`save` writes ``report.json`` and ``report.png``."""

    config: dict[str, Any]
    epochs: list[EpochRecord] = field(default_factory=list)
    steps: int = 0
    wall_time_s: float = 0.0
    transport_calls: int = 0
    bytes_by_party: dict[str, dict[str, int]] = field(default_factory=dict)
    bytes_by_direction: dict[str, int] = field(default_factory=dict)
    #: FLOPs per party over the run: {"forward", "backward", "eval"} (syft_split.ledger)
    flops_by_party: dict[str, dict[str, int]] = field(default_factory=dict)
    #: peak tensor bytes of one training step per party (syft_split.ledger)
    peak_memory_by_party: dict[str, int] = field(default_factory=dict)
    #: data owners that failed a round and were dropped: {"party", "round", "phase", "error"}
    party_failures: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)

    @property
    def final_test_accuracy(self) -> float | None:
        return self.epochs[-1].test_accuracy if self.epochs else None

    def training_tflops(self, party: str) -> float:
        """Forward + backward TFLOPs ``party`` spent training in this run."""
        row = self.flops_by_party.get(party, {})
        return (row.get("forward", 0) + row.get("backward", 0)) / 1e12

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
