"""Figures for notebooks: a run's curves and bytes (model owner), the audit and the leakage
watch (data owner). Each function returns a matplotlib ``Figure`` made with pyplot, so
``plt.show()`` (or the figure as a cell's last value) shows it inline; nothing here changes
the matplotlib backend. Imports matplotlib on first call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .report import RunReport

__all__ = ["report_figure", "audit_figure", "watch_figure"]


def report_figure(report: RunReport) -> Figure:
    """Loss and accuracy per epoch (train, test), MB sent/received per party, and each data
    owner's live leakage watch (inversion ratio per epoch) when the run had one."""
    import matplotlib.pyplot as plt

    epochs = report.epochs
    watched = sorted({p for e in epochs for p, w in e.watch.items() if "inversion_ratio" in w})
    fig, axes = plt.subplots(1, 4 if watched else 3, figsize=(16 if watched else 12.5, 3.4))
    ep = [e.epoch for e in epochs]
    axes[0].plot(ep, [e.train_loss for e in epochs], "o-", label="train")
    axes[1].plot(ep, [e.train_accuracy for e in epochs], "o-", label="train")
    if any(e.test_loss is not None for e in epochs):
        axes[0].plot(ep, [e.test_loss for e in epochs], "s--", label="test")
        axes[1].plot(ep, [e.test_accuracy for e in epochs], "s--", label="test")
    axes[0].set(title="loss", xlabel="epoch")
    axes[1].set(title="accuracy", xlabel="epoch", ylim=(0, 1.02))
    for ax in axes[:2]:
        ax.legend()
    parties = sorted(report.bytes_by_party)
    xs = list(range(len(parties)))
    axes[2].bar([x - 0.2 for x in xs], [report.bytes_by_party[p]["sent"] / 1e6 for p in parties],
                width=0.4, label="sent")
    axes[2].bar([x + 0.2 for x in xs],
                [report.bytes_by_party[p]["received"] / 1e6 for p in parties],
                width=0.4, label="received")
    axes[2].set_xticks(xs, parties, rotation=15)
    axes[2].set(title="MB per party")
    axes[2].legend()
    for party in watched:
        pts = [(e.epoch, e.watch[party]["inversion_ratio"]) for e in epochs
               if "inversion_ratio" in e.watch.get(party, {})]
        axes[3].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=party)
    if watched:
        axes[3].set(title="leakage watch: inversion ratio\n(lower = more leakage)",
                    xlabel="epoch")
        axes[3].legend()
    fig.tight_layout()
    return fig


def audit_figure(entries: Sequence[Mapping[str, Any]]) -> Figure:
    """The data owner's audit log: calls and MB received/sent per op (who asked what)."""
    import matplotlib.pyplot as plt

    ops: dict[str, list[float]] = {}
    for e in entries:
        row = ops.setdefault(str(e.get("op", "?")), [0, 0.0, 0.0])
        row[0] += 1
        row[1] += float(e.get("bytes_in", 0) or 0) / 1e6
        row[2] += float(e.get("bytes_out", 0) or 0) / 1e6
    names = sorted(ops)
    xs = list(range(len(names)))
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
    axes[0].bar(xs, [ops[n][0] for n in names])
    axes[0].set(title="calls per op")
    axes[1].bar([x - 0.2 for x in xs], [ops[n][1] for n in names], width=0.4, label="in")
    axes[1].bar([x + 0.2 for x in xs], [ops[n][2] for n in names], width=0.4, label="out")
    axes[1].set(title="MB in / out per op")
    axes[1].legend()
    for ax in axes:
        ax.set_xticks(xs, names, rotation=30, ha="right")
    fig.tight_layout()
    return fig


def watch_figure(watch: Mapping[str, Any]) -> Figure:
    """One segment's live leakage watch (``DatasiteConsole.watch``): inversion ratio, SSIM
    and dCor by step, with the bound it halts at."""
    import matplotlib.pyplot as plt

    history = [h for h in watch.get("history", []) if "inversion_ratio" in h]
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    axes[0].plot(steps, [h["inversion_ratio"] for h in history], "o-", label="inversion ratio")
    bound = (watch.get("bound") or {}).get("inversion_ratio")
    if bound is not None:
        axes[0].axhline(bound, color="red", linestyle="--", label=f"halts below {bound:.3g}")
    axes[0].set(title="inversion ratio (lower = more leakage)", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [h.get("ssim") for h in history], "o-", label="SSIM")
    axes[1].plot(steps, [h.get("dcor") for h in history], "s--", label="dCor (bias-corrected)")
    axes[1].set(title="similarity of reconstructions / activations", xlabel="step",
                ylim=(0, 1.02))
    axes[1].legend()
    if watch.get("halted"):
        fig.suptitle(f"HALTED: {watch.get('reason')}", color="red", fontsize=9)
    fig.tight_layout()
    return fig
