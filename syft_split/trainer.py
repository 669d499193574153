"""High-level training over a :class:`~syft_split.session.SplitSession`: ``fit``/``evaluate``."""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from .report import EpochRecord, RunReport
from .session import SplitSession, StepMetrics

__all__ = ["Trainer"]


class Trainer:
    """Train a split model round-robin over the plan's data owners, with a progress bar.

    ``labels`` (only when the model owner holds them) maps source -> dataset -> label tensor
    (or task name -> label tensor, for multi-task plans), aligned with that source's records.
    """

    def __init__(self, session: SplitSession, *, batch_size: int = 64,
                 train_dataset: str = "train", test_dataset: str | None = "test",
                 labels: dict[str, dict[str, Any]] | None = None, seed: int = 0,
                 progress: bool = True, config: dict[str, Any] | None = None) -> None:
        self.session = session
        self.batch_size = batch_size
        self.train_dataset = train_dataset
        self.test_dataset = test_dataset
        self.labels = labels or {}
        self.generator = torch.Generator().manual_seed(seed)
        self.progress = progress
        transport = session.transport
        self.report = RunReport(config={
            "plan": {"owners": session.plan.owners, "data_owners": session.plan.data_owners,
                     "labels": session.plan.label_location,
                     "tasks": [vars(t) for t in session.plan.tasks]},
            "optimizer": session.optimizer_spec.to_json(),
            "batch_size": batch_size, "seed": seed, "transport": type(transport).__name__,
            **(config or {}),
        })

    def _label(self, source: str, dataset: str, idx: torch.Tensor) -> Any:
        y = self.labels.get(source, {}).get(dataset)
        if isinstance(y, dict):
            return {task: t[idx] for task, t in y.items()}
        return None if y is None else y[idx]

    def _schedule(self) -> list[tuple[str, torch.Tensor]]:
        per_party = []
        for party in self.session.plan.sources:
            n = self.session.records(party, self.train_dataset)
            perm = torch.randperm(n, generator=self.generator)
            per_party.append([(party, b) for b in perm.split(self.batch_size)])
        out: list[tuple[str, torch.Tensor]] = []
        for i in range(max(len(b) for b in per_party)):
            out.extend(batches[i] for batches in per_party if i < len(batches))
        return out

    def train_epoch(self, epoch: int = 0) -> StepMetrics:
        """One pass over every data owner's training records."""
        s = self.session
        loss_sum, correct, count = 0.0, 0, 0
        bar = tqdm(self._schedule(), desc=f"epoch {epoch}", disable=not self.progress,
                   leave=False)
        for party, idx in bar:
            s.zero_grad()
            loss, m = s.loss(party, idx, self._label(party, self.train_dataset, idx),
                             dataset=self.train_dataset)
            loss.backward()
            s.step()
            self.report.steps += 1
            loss_sum += m.loss * m.count
            correct += m.correct
            count += m.count
            bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct / count:.3f}")
        s.flush()
        return StepMetrics(loss_sum / max(count, 1), correct, count)

    def evaluate(self, dataset: str | None = None, batch_size: int = 512) -> dict[str, float]:
        """Loss and accuracy over every data owner's ``dataset`` (no gradient bookkeeping)."""
        dataset = dataset or self.test_dataset or self.train_dataset
        s = self.session
        s.flush()
        loss_sum, correct, count = 0.0, 0, 0
        for party in s.plan.sources:
            n = s.records(party, dataset)
            for idx in torch.arange(n).split(batch_size):
                m = s.evaluate_batch(party, idx, self._label(party, dataset, idx),
                                     dataset=dataset)
                loss_sum += m.loss * m.count
                correct += m.correct
                count += m.count
        return {"loss": loss_sum / count, "accuracy": correct / count}

    def fit(self, epochs: int, *, verbose: bool = True) -> RunReport:
        """Train ``epochs`` epochs, evaluating after each; return the run report."""
        t_run = time.perf_counter()
        traffic = self.session.transport.traffic
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            train = self.train_epoch(epoch)
            test = self.evaluate() if self.test_dataset else None
            rec = EpochRecord(
                epoch=epoch, train_loss=train.loss,
                train_accuracy=train.correct / max(train.count, 1),
                test_loss=test["loss"] if test else None,
                test_accuracy=test["accuracy"] if test else None,
                steps=self.report.steps, seconds=time.perf_counter() - t0,
                bytes_by_party=traffic.bytes_by_party(),
            )
            self.report.epochs.append(rec)
            if verbose:
                msg = (f"epoch {epoch}: train loss {rec.train_loss:.4f} "
                       f"acc {rec.train_accuracy:.4f}")
                if test:
                    msg += f" | test loss {test['loss']:.4f} acc {test['accuracy']:.4f}"
                print(msg + f" | {rec.seconds:.1f}s", flush=True)
        self.report.wall_time_s += time.perf_counter() - t_run
        self.report.transport_calls = self.session.transport.calls
        self.report.bytes_by_party = traffic.bytes_by_party()
        self.report.bytes_by_direction = traffic.bytes_by_direction()
        return self.report
