"""High-level training over a :class:`~syft_split.session.SplitSession`: ``fit``/``evaluate``."""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import ConfigError
from .ledger import CostLedger
from .report import EpochRecord, RunReport
from .schedules import SCHEDULES, ServerCopies, average_segments, relay_weights
from .session import SplitSession, StepMetrics

__all__ = ["Trainer"]


class Trainer:
    """Train a split model round-robin over the plan's data owners, with a progress bar.

    ``labels`` (only when the model owner holds them) maps source -> dataset -> label tensor
    (or task name -> label tensor, for multi-task plans), aligned with that source's records.
    ``schedule`` is one of :data:`~syft_split.schedules.SCHEDULES` (see that module);
    ``relay_via`` is ``"model_owner"`` or ``"peer"`` for the relay schedule.

    SplitFed rounds run every data owner of a round concurrently (:mod:`syft_split.rounds`):
    ``max_workers`` bounds the calls in flight (``None``: one per data owner, up to 32, when the
    plan allows it; ``1``: one data owner after the other), ``party_deadline_s`` is each data
    owner's time per phase of a round before it is dropped and reported
    (``report.party_failures``). Every report counts FLOPs and peak memory per party
    (:mod:`syft_split.ledger`) next to bytes.
    """

    def __init__(self, session: SplitSession, *, batch_size: int = 64,
                 train_dataset: str = "train", test_dataset: str | None = "test",
                 labels: dict[str, dict[str, Any]] | None = None, seed: int = 0,
                 progress: bool = True, config: dict[str, Any] | None = None,
                 schedule: str = "round_robin", relay_via: str = "model_owner",
                 measure_leakage: bool = True, max_workers: int | None = None,
                 party_deadline_s: float | None = None) -> None:
        if schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if relay_via not in ("model_owner", "peer"):
            raise ConfigError(f"relay_via must be 'model_owner' or 'peer', got {relay_via!r}")
        self.measure_leakage = measure_leakage
        self.schedule = schedule
        self.relay_via = relay_via
        self._server_copies: ServerCopies | None = None
        self._relay_last: str | None = None
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
            "schedule": schedule,
            **(config or {}),
        })
        self.ledger = CostLedger()
        self._rounds = self._concurrent_rounds(max_workers, party_deadline_s)

    def _concurrent_rounds(self, max_workers: int | None, deadline_s: float | None) -> Any:
        from .rounds import SplitFedRounds, unsupported

        if self.schedule not in ("splitfed_v1", "splitfed_v2") or max_workers == 1:
            return None
        if max_workers is None:
            if unsupported(self.session):
                return None
            max_workers = min(32, max(1, len(self.session.plan.sources)))
        self.report.config["max_workers"] = max_workers
        return SplitFedRounds(self, max_workers=max_workers, deadline_s=deadline_s)

    def _label(self, source: str, dataset: str, idx: torch.Tensor) -> Any:
        y = self.labels.get(source, {}).get(dataset)
        if isinstance(y, dict):
            return {task: t[idx] for task, t in y.items()}
        return None if y is None else y[idx]

    def _batches(self) -> list[list[tuple[str, torch.Tensor]]]:
        """Rounds of batches: round k holds batch k of every source that has one."""
        per_party = []
        for party in self.session.plan.sources:
            n = self.session.records(party, self.train_dataset)
            perm = torch.randperm(n, generator=self.generator)
            per_party.append([(party, b) for b in perm.split(self.batch_size)])
        return [[batches[i] for batches in per_party if i < len(batches)]
                for i in range(max(len(b) for b in per_party))]

    def _order(self, rounds: list[list[tuple[str, torch.Tensor]]]
               ) -> list[tuple[str, torch.Tensor, bool]]:
        """(source, batch, last of its round) in the order the schedule runs them."""
        if self.schedule == "relay":  # every source's whole pass, one source after the other
            flat = [b for r in rounds for b in r]
            return [(p, idx, False) for src in self.session.plan.sources
                    for p, idx in flat if p == src]
        return [(p, idx, k == len(r) - 1) for r in rounds for k, (p, idx) in enumerate(r)]

    def _before(self, party: str) -> None:
        if self.schedule == "relay" and self._relay_last not in (None, party):
            assert self._relay_last is not None
            relay_weights(self.session, self._relay_last, party, via=self.relay_via)
        if self.schedule == "splitfed_v1":
            if self._server_copies is None:
                self._server_copies = ServerCopies(self.session, self.session.plan.sources)
            self._server_copies.use(party)
        self._relay_last = party

    def _after(self, party: str, idx: torch.Tensor, end_of_round: bool,
               round_sizes: dict[str, float]) -> None:
        round_sizes[party] = float(idx.shape[0])
        if self.schedule == "splitfed_v1":
            assert self._server_copies is not None
            self._server_copies.save(party)
        if end_of_round and self.schedule in ("splitfed_v1", "splitfed_v2"):
            self.session.flush()
            # a data owner without a batch this round counts with weight 0 (gets the average)
            sources = self.session.plan.sources
            average_segments(self.session, sources, [round_sizes.get(p, 0.0) for p in sources])
            if self._server_copies is not None:
                self._server_copies.average(round_sizes)
            round_sizes.clear()

    def train_epoch(self, epoch: int = 0) -> StepMetrics:
        """One pass over every source's training records, in the schedule's order."""
        if self._rounds is not None:
            return self._rounds.train_epoch(epoch)  # type: ignore[no-any-return]
        s = self.session
        loss_sum, correct, count = 0.0, 0, 0
        bar = tqdm(self._order(self._batches()), desc=f"epoch {epoch}",
                   disable=not self.progress, leave=False)
        round_sizes: dict[str, float] = {}
        for party, idx, end_of_round in bar:
            self._before(party)
            s.zero_grad()
            loss, m = s.loss(party, idx, self._label(party, self.train_dataset, idx),
                             dataset=self.train_dataset)
            loss.backward()
            s.step()
            self.ledger.session_step(s, party, int(idx.shape[0]))
            self._after(party, idx, end_of_round, round_sizes)
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
            for idx in torch.arange(n).split(min(batch_size, s.plan.max_batch)):
                m = s.evaluate_batch(party, idx, self._label(party, dataset, idx),
                                     dataset=dataset)
                self.ledger.session_step(s, party, int(idx.shape[0]), train=False)
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
                flops_by_party=self.ledger.flops_by_party(),
                round_seconds=list(getattr(self._rounds, "epoch_round_seconds", [])),
            )
            self.report.epochs.append(rec)
            if verbose:
                msg = (f"epoch {epoch}: train loss {rec.train_loss:.4f} "
                       f"acc {rec.train_accuracy:.4f}")
                if test:
                    msg += f" | test loss {test['loss']:.4f} acc {test['accuracy']:.4f}"
                print(msg + f" | {rec.seconds:.1f}s", flush=True)
        if self.session.he is not None:
            self.report.extra["he"] = self.session.he.costs()
        if self.measure_leakage and self.session.he is None:
            leak = self.session.measure_leakage(self.test_dataset or self.train_dataset)
            self.report.extra["leakage"] = leak
            if verbose:
                for party, values in leak.items():
                    print(f"leakage at {party}: " + ", ".join(f"{k}={v:.4g}"
                                                              for k, v in values.items()))
        self.report.wall_time_s += time.perf_counter() - t_run
        self.report.transport_calls = self.session.transport.calls
        self.report.bytes_by_party = traffic.bytes_by_party()
        self.report.bytes_by_direction = traffic.bytes_by_direction()
        self.report.flops_by_party = self.ledger.flops_by_party()
        self.report.peak_memory_by_party = self.ledger.peak_memory_by_party()
        return self.report
