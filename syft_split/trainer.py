"""High-level training over a :class:`~syft_split.session.SplitSession`: ``fit``/``evaluate``.

Durability: ``fit(checkpoint_dir=...)`` saves the model owner's side after every step
(:mod:`syft_split.checkpoint`) and ``fit(resume=True)`` continues from it in a new process.
Only exact steps are checkpointed: with ``gradient_delay=1`` or a ``local_loss`` plan the data
owners' requests carry no step ids, so ``fit`` refuses ``checkpoint_dir`` (a resume would apply
part of an epoch twice).
With ``on_unreachable="skip"`` (round-robin schedule) a data owner that times out or cannot
be reached, or whose answer the model owner refuses (:mod:`syft_split.answers`: a NaN or
out-of-bound activation, bad labels or counts), loses its batches for the rest of the epoch
while the others train on; what was skipped, and why, is listed in
``report.extra["unreachable"]``. A refused step is dropped on both sides (no model-owner
step; the data owner's pending step discarded), also under ``"raise"``, which then raises.
"""

from __future__ import annotations

import functools
import time
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import skips
from .checkpoint import SPLITFED_RELAYS, Checkpoint, Position
from .errors import ConfigError, TransportError, ValidationError
from .ledger import CostLedger
from .report import MAX_NOT_AVERAGED, EpochRecord, RunReport, RunTraffic
from .schedules import SCHEDULES, AverageOutcome, SecureAverage, ServerCopies, relay_weights
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

    SplitFed rounds run every data owner of a round concurrently (:mod:`syft_split.rounds`):
    ``max_workers`` bounds the calls in flight (``None``: one per data owner, up to 32, when the
    plan allows it; ``1``: one data owner after the other), ``party_deadline_s`` is each data
    owner's time per phase of a round before it is dropped and reported
    (``report.party_failures``). A round whose cohort a data owner's ``HostLimits.min_cohort``
    refuses is not averaged (``report.not_averaged``): a policy, never a failure. Every report
    counts FLOPs and peak memory per party (:mod:`syft_split.ledger`) next to bytes.
    """

    def __init__(self, session: SplitSession, *, batch_size: int = 64,
                 train_dataset: str = "train", test_dataset: str | None = "test",
                 labels: dict[str, dict[str, Any]] | None = None, seed: int = 0,
                 progress: bool = True, config: dict[str, Any] | None = None,
                 schedule: str = "round_robin", relay_via: str = "peer",
                 measure_leakage: bool = True, leakage_budget_s: float | None = None,
                 watch: bool = True, gradient_delay: int = 0,
                 on_unreachable: str = "raise", max_workers: int | None = None,
                 party_deadline_s: float | None = None) -> None:
        if schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        from .pipeline import check_latency_options

        check_latency_options(session, schedule, gradient_delay)
        #: 1: pipelined steps, gradients applied one step late (:mod:`syft_split.pipeline`)
        self.gradient_delay = gradient_delay
        if on_unreachable not in ("raise", "skip"):
            raise ConfigError(f"on_unreachable must be 'raise' or 'skip', got {on_unreachable!r}")
        if on_unreachable == "skip" and schedule != "round_robin":
            raise ConfigError(f"on_unreachable='skip' needs the round_robin schedule; "
                              f"{schedule!r} cannot go on without a party")
        self.on_unreachable = on_unreachable
        #: parties skipped for the rest of the current epoch (on_unreachable="skip")
        self.down: set[str] = set()
        self._checkpoint: Checkpoint | None = None
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
        #: (epoch, round of the epoch) of the step running (one data owner after the other)
        self._round_at: tuple[int | None, int] = (None, 0)
        #: the relay under way: {"from", "to", "sealed": [[node, step id of its unseal], ...]}
        self._relay: dict[str, Any] | None = None
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
        self.ledger = CostLedger()
        #: this run's share of the transport's traffic log (made by the first fit)
        self.traffic: RunTraffic | None = None
        self._fit_started: float | None = None
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

    def fit_seconds(self) -> float:
        """Seconds of the fit running now (0 outside fit): not yet in ``report.wall_time_s``."""
        started = self._fit_started
        return 0.0 if started is None else time.perf_counter() - started

    def unavailable(self) -> set[str]:
        """Data owners this run goes on without: unreachable this epoch (``on_unreachable``)
        or dropped from concurrent rounds after a failure."""
        dropped = set(self._rounds.dropped) if self._rounds is not None else set()
        return set(self.down) | dropped

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
            self._relay_to(self._relay_last, party)
        if self.schedule == "splitfed_v1":
            if self._server_copies is None:
                self._server_copies = ServerCopies(self.session, self.session.plan.sources)
            self._server_copies.use(party)
        self._relay_last = party

    def _relay_to(self, src: str, dst: str) -> None:
        """Relay the shared segments from ``src`` to ``dst``. With a checkpoint, each node's
        sealed weights are written to it (in the ``unseal`` request under its step id) before
        they are sent: a process resumed there sends exactly those bytes again and seals only
        the nodes not sealed yet, so the run goes on as if it had not stopped."""
        relay = self._relay
        if relay is None or (relay["from"], relay["to"]) != (src, dst):
            relay = self._relay = {"from": src, "to": dst, "sealed": []}

        def journal(node: int, step: int) -> None:
            before = self._relay
            assert before is not None
            self._relay = {**before, "sealed": [*before["sealed"], [node, step]]}
            if self._checkpoint is not None:
                try:
                    self._checkpoint.journal(self)
                except BaseException:
                    self._relay = before  # nothing sent
                    raise

        relay_weights(self.session, src, dst, via=self.relay_via, journal=journal,
                      sealed_before={int(n): int(k) for n, k in relay["sealed"]})
        self._relay = None

    def _after(self, party: str, idx: torch.Tensor, end_of_round: bool,
               round_sizes: dict[str, float]) -> None:
        round_sizes[party] = float(idx.shape[0])
        if self.schedule == "splitfed_v1":
            assert self._server_copies is not None
            self._server_copies.save(party)
        if end_of_round and self.schedule in ("splitfed_v1", "splitfed_v2"):
            self.session.flush()
            # a data owner without a batch this round has weight 0 (is relayed the average)
            sources = self.session.plan.sources
            self._average(sources, [round_sizes.get(p, 0.0) for p in sources],
                          journal=None if self._checkpoint is None else functools.partial(
                              self._checkpoint.note, SPLITFED_RELAYS))
            outcome = self._average.last
            if self._server_copies is not None and outcome.not_averaged is None:
                self._server_copies.average(round_sizes, keep=list(outcome.not_relayed))
            self.note_averaging(outcome, *self._round_at)
            round_sizes.clear()

    def note_averaging(self, outcome: AverageOutcome, epoch: int | None, round: int) -> None:
        """Put a round's averaging in the run report if some data owners kept their own
        weights (``report.not_averaged``: a member's ``HostLimits.min_cohort`` refused the
        cohort, or no member relays); with v1 their server copies stay with them too."""
        entry = outcome.record()
        if entry is not None:
            kept = self.report.not_averaged
            kept.append({"epoch": epoch, "round": round, **entry})
            if len(kept) > MAX_NOT_AVERAGED:
                del kept[0]
                self.report.not_averaged_dropped += 1

    def train_epoch(self, epoch: int = 0, *, position: Position | None = None) -> StepMetrics:
        """One pass over every source's training records, in the schedule's order
        (``position``: continue a checkpointed epoch from where it stopped)."""
        if self.session.plan.local_loss is not None:  # latency-tolerant schedules
            from .local_loss import local_loss_epoch

            return local_loss_epoch(self, epoch)
        if self.gradient_delay:
            from .pipeline import pipelined_epoch

            return pipelined_epoch(self, epoch)
        if self._rounds is not None:
            return self._rounds.train_epoch(epoch)  # type: ignore[no-any-return]
        if position is not None:
            self.generator.set_state(position["gen"])
        start_gen = self.generator.get_state()
        order = self._order(self._batches())
        done = int(position["done"]) if position is not None else 0
        loss_sum, correct, count = position["sums"] if position is not None else (0.0, 0, 0)
        round_sizes: dict[str, float] = dict(position["round_sizes"]) if position else {}
        self.down = set()
        rounds_before = [0, *accumulate(int(end) for _, _, end in order)]
        bar = tqdm(order[done:], desc=f"epoch {epoch}", disable=not self.progress, leave=False)
        for k, (party, idx, end_of_round) in enumerate(bar, start=done):
            self._round_at = (epoch, rounds_before[k])  # for the report (note_averaging)
            if party not in self.down:
                try:
                    m = self._train_step(party, idx, end_of_round, round_sizes)
                    loss_sum += m.loss * m.count
                    correct += m.correct
                    count += m.count
                    bar.set_postfix(loss=f"{loss_sum / max(count, 1):.3f}",
                                    acc=f"{correct / max(count, 1):.3f}")
                except TransportError as exc:
                    skips.unreachable(self, exc, party, epoch, k)
                except ValidationError as exc:
                    skips.refused(self, exc, party, epoch, k)
            if self._checkpoint is not None:
                self._checkpoint.save(self, Position(
                    epoch=epoch, done=k + 1, gen=start_gen, sums=[loss_sum, correct, count],
                    round_sizes=round_sizes))
        skips.flush(self)
        return StepMetrics(loss_sum / max(count, 1), int(correct), int(count))

    def _train_step(self, party: str, idx: torch.Tensor, end_of_round: bool,
                    round_sizes: dict[str, float]) -> StepMetrics:
        s = self.session
        self._before(party)
        s.zero_grad()
        buffers = [(b, b.detach().clone()) for mod in s.local.values() for b in mod.buffers()]
        try:
            loss, m = s.loss(party, idx, self._label(party, self.train_dataset, idx),
                             dataset=self.train_dataset)
            loss.backward()
        except ValidationError:  # a refused answer: the statistics the forward moved go back
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            raise
        s.step()
        self.ledger.session_step(s, party, int(idx.shape[0]))
        self._after(party, idx, end_of_round, round_sizes)
        self.report.steps += 1
        return m

    def evaluate(self, dataset: str | None = None, batch_size: int = 512) -> dict[str, float]:
        """Loss and accuracy over every data owner's ``dataset`` (no gradient bookkeeping);
        under ``on_unreachable="skip"`` one unreachable, or whose answer is refused, is left
        out of the figures and reported."""
        dataset = dataset or self.test_dataset or self.train_dataset
        s = self.session
        skips.flush(self)
        loss_sum, correct, count = 0.0, 0, 0
        for party in s.plan.sources:
            if party in self.unavailable():
                continue
            try:
                n = s.records(party, dataset)
                for idx in torch.arange(n).split(min(batch_size, s.plan.max_batch)):
                    m = s.evaluate_batch(party, idx, self._label(party, dataset, idx),
                                         dataset=dataset)
                    self.ledger.session_step(s, party, int(idx.shape[0]), train=False)
                    loss_sum += m.loss * m.count
                    correct += m.correct
                    count += m.count
            except TransportError as exc:
                skips.unreachable(self, exc, party, -1, -1)
            except ValidationError as exc:
                skips.refused(self, exc, party, -1, -1)
        if count == 0:
            return {"loss": float("nan"), "accuracy": float("nan")}
        return {"loss": loss_sum / count, "accuracy": correct / count}

    def fit(self, epochs: int, *, verbose: bool = True, checkpoint_dir: str | Path | None = None,
            resume: bool = False) -> RunReport:
        """Train ``epochs`` epochs, evaluating after each; return the run report.

        ``checkpoint_dir``: save the model owner's side there after every step (see
        :mod:`syft_split.checkpoint`); ``resume=True``: first continue from the checkpoint in
        it, if there is one (re-attaching a fresh session to the approved segments by id).
        Exact steps only: with ``gradient_delay=1`` or a ``local_loss`` plan both are refused
        (ConfigError), as those requests carry no step ids and a resume would apply part of an
        epoch twice at the data owners."""
        if checkpoint_dir is not None or resume:
            _check_durable(self)
        t_run = self._fit_started = time.perf_counter()
        if self.traffic is None:  # this run's bytes: from its first fit on (not the setup)
            self.traffic = RunTraffic(self.session.transport.traffic)
        traffic = self.traffic
        if checkpoint_dir is not None and self.session.he is not None:
            self.session.he.journal = Path(checkpoint_dir)  # the encrypted step in flight
        self._checkpoint = Checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
        if self._checkpoint is not None and self._rounds is not None:
            # checkpoints are taken per step: run the rounds one data owner after the other
            # (the same computation, see syft_split.rounds)
            self._rounds = None
            self.report.config["max_workers"] = 1
        position: Position | None = None
        if resume:
            if self._checkpoint is None:
                raise ConfigError("resume=True needs checkpoint_dir")
            tree = self._checkpoint.load()
            if tree is not None:
                position = self._checkpoint.restore(self, tree)
                self.report.extra["resumed"] = int(self.report.extra.get("resumed", 0)) + 1
        if self._checkpoint is not None and position is None:  # the segment ids, at once
            if self.schedule in ("splitfed_v1", "splitfed_v2") and self._average.round is None:
                self._average.start(self.session.plan.sources)  # the rounds so far, checkpointed
            self._checkpoint.save(self, Position(epoch=1, done=0, gen=self.generator.get_state(),
                                                 sums=[0.0, 0, 0], round_sizes={}))
        first = int(position["epoch"]) if position is not None else 1
        for epoch in range(first, epochs + 1):
            t0 = time.perf_counter()
            self.epochs_remaining = epochs - epoch  # a local-loss stream may start the next
            train = self.train_epoch(epoch, position=position if epoch == first else None)
            test = self.evaluate() if self.test_dataset else None
            rec = EpochRecord(
                epoch=epoch, train_loss=train.loss,
                train_accuracy=train.correct / max(train.count, 1),
                test_loss=test["loss"] if test else None,
                test_accuracy=test["accuracy"] if test else None,
                steps=self.report.steps, seconds=time.perf_counter() - t0,
                bytes_by_party=traffic.figures()["bytes_by_party"],
                watch=self.session.watch_status(skip=self.unavailable()) if self.watch else {},
                flops_by_party=self.ledger.flops_by_party(),
                round_seconds=list(getattr(self._rounds, "epoch_round_seconds", [])),
            )
            self.report.epochs.append(rec)
            if self._checkpoint is not None:  # the next epoch starts here
                self._checkpoint.save(self, Position(epoch=epoch + 1, done=0,
                                                     gen=self.generator.get_state(),
                                                     sums=[0.0, 0, 0], round_sizes={}))
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
                                                budget_s=self.leakage_budget_s,
                                                skip=self.unavailable())
            self.report.extra["leakage"] = leak
            if verbose:
                for party, values in leak.items():
                    print(f"leakage at {party}: " + ", ".join(f"{k}={v:.4g}"
                                                              for k, v in values.items()))
        self.report.wall_time_s += time.perf_counter() - t_run
        self._fit_started = None
        traffic.book(self.report)
        self.report.flops_by_party = self.ledger.flops_by_party()
        self.report.peak_memory_by_party = self.ledger.peak_memory_by_party()
        return self.report


def _check_durable(trainer: Trainer) -> None:
    """Refuse checkpoints for the latency-tolerant schedules (see :meth:`Trainer.fit`)."""
    what = ("gradient_delay=1 (pipelined steps)" if trainer.gradient_delay
            else "a local_loss plan" if trainer.session.plan.local_loss is not None else None)
    if what is not None:
        raise ConfigError(
            f"fit(checkpoint_dir=..., resume=...) cannot be used with {what}: its data-owner "
            "requests carry no step ids, so resuming after a crash would apply part of an "
            "epoch twice. Checkpoint with exact steps (gradient_delay=0 and a plan without "
            "local_loss), or train without checkpoint_dir")


def _watch_text(w: dict[str, Any]) -> str:
    if w.get("halted"):
        return f"HALTED: {w.get('reason', '')}"
    if "inversion_ratio" not in w:
        return "no watch on this segment"
    parts = [f"inversion ratio {w['inversion_ratio']:.4f}"]
    for k in ("ssim", "dcor", "label_alignment"):
        if k in w:
            name = "dCor (bias-corrected)" if k == "dcor" else k.replace("_", " ")
            parts.append(f"{name} {w[k]:.3f}")
    return ", ".join(parts) + f" (step {w.get('step')})"
