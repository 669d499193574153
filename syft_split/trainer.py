"""High-level training over a :class:`~syft_split.session.SplitSession`: ``fit``/``evaluate``."""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import ConfigError
from .report import EpochRecord, RunReport
from .schedules import SCHEDULES, SecureAverage, ServerCopies, relay_weights
from .session import SplitSession, StepMetrics

__all__ = ["Trainer"]


class Trainer:
    """Train a split model round-robin over the plan's data owners, with a progress bar.

    ``labels`` (only when the model owner holds them) maps source -> dataset -> label tensor
    (or task name -> label tensor, for multi-task plans), aligned with that source's records.
    ``schedule`` is one of :data:`~syft_split.schedules.SCHEDULES` (see that module);
    Relay and SplitFed move the data owners' weights only between them (plans with
    ``share_weights="peer"``); ``relay_via`` must be ``"peer"`` for the relay schedule.
    For long round trips (approximations, see their modules): ``gradient_delay=1`` pipelines
    steps with gradients applied one step late (:mod:`syft_split.pipeline`); a plan with
    ``local_loss`` trains each data owner's segment with its own auxiliary head, many batches
    per call (:mod:`syft_split.local_loss`).
    """

    def __init__(self, session: SplitSession, *, batch_size: int = 64,
                 train_dataset: str = "train", test_dataset: str | None = "test",
                 labels: dict[str, dict[str, Any]] | None = None, seed: int = 0,
                 progress: bool = True, config: dict[str, Any] | None = None,
                 schedule: str = "round_robin", relay_via: str = "peer",
                 measure_leakage: bool = True, leakage_budget_s: float | None = None,
                 watch: bool = True, gradient_delay: int = 0) -> None:
        if schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        from .pipeline import check_latency_options

        check_latency_options(session, schedule, gradient_delay)
        #: 1: pipelined steps, gradients applied one step late (:mod:`syft_split.pipeline`)
        self.gradient_delay = gradient_delay
        if relay_via not in ("model_owner", "peer"):
            raise ConfigError(f"relay_via must be 'peer', got {relay_via!r}")
        if schedule == "relay" and relay_via != "peer":
            raise ConfigError("relay_via='model_owner' is gone: the model owner never writes a "
                              "data owner's weights; relay with relay_via='peer'")
        if schedule != "round_robin" and session.plan.share_weights != "peer":
            raise ConfigError(f"schedule {schedule!r} moves the data owners' weights between "
                              "them: the plan needs share_weights='peer' (and trust_peer on "
                              f"each data owner), got {session.plan.share_weights!r}")
        self.measure_leakage = measure_leakage
        self.leakage_budget_s = leakage_budget_s
        self.watch = watch
        self.schedule = schedule
        self.relay_via = relay_via
        self._server_copies: ServerCopies | None = None
        self._average = SecureAverage(session)
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
            "defences": dict(session.plan.defences),
            "share_weights": session.plan.share_weights,
            "encrypted": None if session.plan.encrypted is None
            else session.plan.encrypted.agreement(),
            **(config or {}),
        })

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
            self._average(list(round_sizes), list(round_sizes.values()))
            if self._server_copies is not None:
                self._server_copies.average(round_sizes)
            round_sizes.clear()

    def train_epoch(self, epoch: int = 0) -> StepMetrics:
        """One pass over every source's training records, in the schedule's order."""
        if self.gradient_delay or self.session.plan.local_loss is not None:
            from .pipeline import latency_epoch

            return latency_epoch(self, epoch)
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
            self.epochs_remaining = epochs - epoch  # a local-loss stream may start the next
            train = self.train_epoch(epoch)
            test = self.evaluate() if self.test_dataset else None
            rec = EpochRecord(
                epoch=epoch, train_loss=train.loss,
                train_accuracy=train.correct / max(train.count, 1),
                test_loss=test["loss"] if test else None,
                test_accuracy=test["accuracy"] if test else None,
                steps=self.report.steps, seconds=time.perf_counter() - t0,
                bytes_by_party=traffic.bytes_by_party(),
                watch=self.session.watch_status() if self.watch else {},
            )
            self.report.epochs.append(rec)
            if verbose:
                msg = (f"epoch {epoch}: train loss {rec.train_loss:.4f} "
                       f"acc {rec.train_accuracy:.4f}")
                if test:
                    msg += f" | test loss {test['loss']:.4f} acc {test['accuracy']:.4f}"
                print(msg + f" | {rec.seconds:.1f}s", flush=True)
                for party, w in rec.watch.items():
                    print(f"  watch at {party}: " + _watch_text(w), flush=True)
        if self.session.he is not None:
            self.report.extra["he"] = self.session.he.costs()
        if self.measure_leakage and self.session.he is None:
            leak = self.session.measure_leakage(self.test_dataset or self.train_dataset,
                                                budget_s=self.leakage_budget_s)
            self.report.extra["leakage"] = leak
            if verbose:
                for party, values in leak.items():
                    print(f"leakage at {party}: " + ", ".join(f"{k}={v:.4g}"
                                                              for k, v in values.items()))
        self.report.wall_time_s += time.perf_counter() - t_run
        self.report.transport_calls = self.session.transport.calls
        self.report.bytes_by_party = traffic.bytes_by_party()
        self.report.bytes_by_direction = traffic.bytes_by_direction()
        return self.report


def _watch_text(w: dict[str, Any]) -> str:
    if w.get("halted"):
        return f"HALTED: {w.get('reason', '')}"
    if "inversion_ratio" not in w:
        return "no watch on this segment"
    parts = [f"inversion ratio {w['inversion_ratio']:.4f}"]
    for k in ("ssim", "dcor", "label_alignment"):
        if k in w:
            parts.append(f"{k.replace('_', ' ')} {w[k]:.3f}")
    return ", ".join(parts) + f" (step {w.get('step')})"
