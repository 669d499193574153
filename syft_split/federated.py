"""Federated baselines on the same datasites, transport and ledger as split learning.

:class:`FederatedTrainer` trains a whole model at every data owner (op family
:mod:`syft_split.host.federated`, role ``local``), so split and federated learning are compared
on equal terms -- the same wire format, the same byte counts, the same FLOP counter:

- ``"fedavg"`` (McMahan et al. 2017): each round every data owner starts from the global
  weights, trains ``local_epochs`` epochs over its records (``batch_size``, the approved
  optimizer, fresh each round) and returns its weights; the model owner averages them,
  weighted by record counts;
- ``"sync_sgd"`` (large-batch synchronous SGD): each step every data owner returns the gradient
  of the global weights on its next batch; the model owner averages the gradients (weighted by
  batch size: the gradient of the union batch) and steps its optimizer.

Data owners run concurrently (:func:`syft_split.rounds.run_each`: ``max_workers``,
``party_deadline_s``; a failing data owner is dropped and named in ``report.party_failures``).
A data owner's answer is its word: before anything is averaged the model owner checks it
(:class:`~syft_split.answers.Answer`, as split-learning answers are), and an answer that fails
is that data owner's failure (dropped, named; nothing of it is used):
weights and gradients must be exactly the model's keys, shapes and dtypes, finite and within
``max_abs_value``; record counts must be the ones ``describe`` gave at :meth:`propose` (FedAvg
weights each data owner by that count, never by one it reports) or the batch sent; correct
counts lie in ``[0, count]``, loss sums are finite and >= 0; an integer buffer
(``num_batches_tracked``) lies in ``[0, MAX_COUNT]``.
Local shuffling is reproducible: round ``r`` shuffles with ``torch.Generator().manual_seed(
seed + r)`` at every data owner. The model owner sees every data owner's weights or gradients
(that is FedAvg without secure aggregation; the data owner's review says so).

>>> fl = FederatedTrainer(model, dep.transport, ["a", "b"], algorithm="fedavg")   # doctest: +SKIP
>>> dep.approve_all(fl.propose()); report = fl.fit(5)                           # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .answers import MAX_ABS_VALUE, MAX_COUNT, Answer
from .contract import check_describe
from .errors import ConfigError, TransportError
from .ledger import CostLedger
from .report import EpochRecord, RunReport, RunTraffic
from .rounds import PartyFailure, run_each
from .schedules import weighted_mean
from .spec import OptimizerSpec, module_from_spec, module_to_spec, spec_state
from .topology import MAX_FEATURE_BYTES
from .transport.base import Transport

__all__ = ["ALGORITHMS", "MAX_ABS_VALUE", "MAX_COUNT", "FederatedTrainer", "weighted_mean"]

ALGORITHMS = ("fedavg", "sync_sgd")
# re-exported from .answers: MAX_ABS_VALUE, the default bound on the magnitude of a weight or
# gradient a data owner returns (the host's own default); MAX_COUNT, the range [0, MAX_COUNT]
# of an integer buffer (num_batches_tracked) it returns: every host refuses to load others


def _declarable(model: nn.Module) -> nn.Module:
    """``model`` in a form a spec can declare (a Sequential as is, others traced by fx)."""
    if isinstance(model, (nn.Sequential, fx.GraphModule)):
        return model
    return fx.symbolic_trace(model)


def _figures(answer: Answer, count_key: str, count: int, why: str) -> dict[str, Any]:
    """The figures of a local run's answer: ``count_key`` is ``count`` (``why``: whose count
    it is), ``correct`` in ``[0, count]``, ``loss_sum`` finite and >= 0 (every loss here is)."""
    return {count_key: answer.count(count_key, count, count, why),
            "correct": answer.count("correct", 0, count),
            "loss_sum": answer.scalar("loss_sum", low=0.0)}


class FederatedTrainer:
    """Train ``model`` by FedAvg or large-batch synchronous SGD over ``data_owners`` reached
    through ``transport`` (see the module docstring). ``model`` must be declarable as a spec
    (standard layers; residual graphs through ``torch.fx``). ``max_abs_value``: the largest
    magnitude of a weight, buffer or gradient a data owner may return; ``max_feature_bytes``:
    the largest features of ``batch_size`` records (float32) a data owner may declare (the
    cost ledger runs the model on a batch of them here). ``averaging_weights``: FedAvg's
    weight of each data owner (default: the record count its ``describe`` gave, which is that
    data owner's own claim: one that declares 10^12 records replaces the global model; give
    equal weights, or counts you know otherwise, not to rely on it)."""

    def __init__(self, model: nn.Module, transport: Transport, data_owners: Sequence[str], *,
                 algorithm: str = "fedavg", optimizer: OptimizerSpec | None = None,
                 loss: str = "cross_entropy", local_epochs: int = 1, batch_size: int = 32,
                 train_dataset: str = "train", test_dataset: str | None = "test",
                 seed: int = 0, max_workers: int | None = None,
                 party_deadline_s: float | None = None, max_abs_value: float = MAX_ABS_VALUE,
                 max_feature_bytes: int = MAX_FEATURE_BYTES,
                 averaging_weights: Mapping[str, float] | None = None) -> None:
        if algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if not data_owners:
            raise ConfigError("FederatedTrainer needs at least one data owner")
        missing = [d for d in data_owners if d not in transport.parties()]
        if missing:
            raise ConfigError(f"parties {missing} are not reachable through the transport; "
                              f"connected: {transport.parties()}")
        for name, value in (("local_epochs", local_epochs), ("batch_size", batch_size),
                            ("max_feature_bytes", max_feature_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(max_abs_value, bool) or not isinstance(max_abs_value, (int, float)) \
                or not 0 < max_abs_value < float("inf"):
            raise ConfigError(f"max_abs_value must be a finite number > 0, got {max_abs_value!r}")
        if averaging_weights is not None and (
                set(averaging_weights) != set(data_owners) or not all(
                    isinstance(w, (int, float)) and not isinstance(w, bool)
                    and 0 < w < float("inf") for w in averaging_weights.values())):
            raise ConfigError("averaging_weights must give every data owner a finite weight "
                              f"> 0, got {averaging_weights!r:.200}")
        #: FedAvg's weights (None: each data owner's described record count, its own claim)
        self.averaging_weights = None if averaging_weights is None else {
            str(k): float(v) for k, v in averaging_weights.items()}
        self.algorithm = algorithm
        self.transport = transport
        self.data_owners = list(data_owners)
        self.optimizer_spec = optimizer or OptimizerSpec("sgd", lr=0.01)
        self.loss = loss
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.train_dataset = train_dataset
        self.test_dataset = test_dataset
        self.seed = seed
        self.max_workers = max_workers or min(32, len(self.data_owners))
        self.deadline_s = party_deadline_s
        self.max_abs_value = float(max_abs_value)
        self.max_feature_bytes = max_feature_bytes
        declared = _declarable(model)
        self.spec = module_to_spec(declared)
        #: the global model, as every data owner rebuilds it from the spec
        self.module = module_from_spec(self.spec)
        self.module.load_state_dict(spec_state(declared))
        self.optimizer = self.optimizer_spec.build(self.module.parameters())
        self.segments: dict[str, str] = {}
        #: each data owner's train records, as its ``describe`` said at :meth:`propose`
        self.records: dict[str, int] = {}
        #: each data owner's records per dataset, as its ``describe`` said
        self.sizes: dict[str, dict[str, int]] = {}
        self.input_shape: tuple[int, ...] = ()
        self.dropped: dict[str, PartyFailure] = {}
        self.rounds_run = 0
        self.ledger = CostLedger()
        #: this run's share of the transport's traffic log (made by the first fit)
        self.traffic: RunTraffic | None = None
        self.generator = torch.Generator().manual_seed(seed)
        self.report = RunReport(config={
            "algorithm": algorithm, "data_owners": self.data_owners,
            "optimizer": self.optimizer_spec.to_json(), "loss": loss,
            "local_epochs": local_epochs, "batch_size": batch_size, "seed": seed,
            "transport": type(transport).__name__, "max_workers": self.max_workers,
        })

    # ------------------------------------------------------------------ set-up
    def propose(self) -> dict[str, list[str]]:
        """Propose the whole model to every data owner (each reviews and approves once)."""
        datasets = [self.train_dataset] + ([self.test_dataset] if self.test_dataset else [])
        state = {f"state/{k}": v for k, v in self.module.state_dict().items()}
        out: dict[str, list[str]] = {}
        for party in self.data_owners:
            self._describe(party)
            r = self.transport.call(party, "fl_propose", spec=self.spec, datasets=datasets,
                                    optimizer=self.optimizer_spec.to_json(), loss=self.loss,
                                    max_batch=max(self.batch_size, 1), **state)
            self.segments[party] = Answer(party, "fl_propose", r).segment_id()
            out[party] = [self.segments[party]]
        return out

    def _describe(self, party: str) -> None:
        """Read ``party``'s record counts and feature shape from its ``describe`` answer,
        checked (:func:`~syft_split.contract.check_describe`; the features of ``batch_size``
        records within ``max_feature_bytes``); raises :class:`ConfigError` naming the party."""
        answer = self.transport.call(party, "describe")
        if not isinstance(answer, dict) or "datasets" not in answer:
            raise ConfigError(f"{party}: its describe answer has no 'datasets' field")
        meta = check_describe(party, answer)
        train = meta.get(self.train_dataset)
        if train is None:
            raise ConfigError(f"{party}: no dataset {self.train_dataset!r} (it has {sorted(meta)})")
        shape = tuple(train["feature_shape"])
        nbytes = math.prod(shape) * self.batch_size * 4
        if nbytes > self.max_feature_bytes:
            raise ConfigError(f"{party}: dataset {self.train_dataset!r} has features {shape} per "
                              f"record: {self.batch_size} records of them are {nbytes} bytes "
                              f"(float32), more than max_feature_bytes={self.max_feature_bytes}")
        self.sizes[party] = {name: m["records"] for name, m in meta.items()}
        self.records[party] = train["records"]
        self.input_shape = shape

    def _state_fields(self) -> dict[str, torch.Tensor]:
        return {f"state/{k}": v.detach() for k, v in self.module.state_dict().items()}

    def _each(self, phase: str, keys: Sequence[str], fn: Any) -> dict[str, Any]:
        results, errors = run_each([k for k in keys if k not in self.dropped], fn,
                                   max_workers=self.max_workers, deadline_s=self.deadline_s)
        for party, exc in errors.items():
            failure = PartyFailure(party, self.rounds_run, phase, f"{type(exc).__name__}: {exc}")
            self.dropped[party] = failure
            self.report.party_failures.append(asdict(failure))
        if keys and not results:
            raise TransportError(f"every data owner failed {phase} in round {self.rounds_run}: "
                                 + "; ".join(f"{p}: {e}" for p, e in errors.items()))
        return results

    def _book(self, party: str, batch: int, *, times: int = 1, optimizer: bool = True) -> None:
        cost = self.ledger.cost(self.module, self.input_shape, batch, input_grad=False,
                                optimizer=self.optimizer_spec if optimizer else None)
        self.ledger.add(party, cost, times=times)

    # ------------------------------------------------------------------ rounds
    def fedavg_round(self) -> dict[str, dict[str, Any]]:
        """One FedAvg round; returns each data owner's response scalars."""
        state = self._state_fields()
        seed = self.seed + self.rounds_run
        own = {k[6:]: v for k, v in state.items()}

        def train(p: str) -> dict[str, Any]:
            r = self.transport.call(p, "fl_train", segment=self.segments[p],
                                    dataset=self.train_dataset, epochs=self.local_epochs,
                                    batch_size=self.batch_size, seed=seed, **state)
            n = self.records[p]  # the count describe gave: the weight, whatever the answer says
            a = Answer(p, "fl_train", r, bound=self.max_abs_value)
            return {"steps": a.count("steps", 0, n * self.local_epochs),
                    **_figures(a, "records", n, f" (the records of {self.train_dataset!r} its "
                               "describe gave)"),
                    "state": a.tensors("state/", own)}

        results = self._each("fl_train", self.data_owners, train)
        parties = list(results)
        given = self.averaging_weights
        self.module.load_state_dict(weighted_mean(
            [results[p]["state"] for p in parties],
            [self.records[p] if given is None else given[p] for p in parties]))
        for p in parties:
            n, b = self.records[p], self.batch_size
            self._book(p, b, times=(n // b) * self.local_epochs)
            if n % b:
                self._book(p, n % b, times=self.local_epochs)
        self.rounds_run += 1
        return {p: {k: v for k, v in results[p].items() if not k.startswith("state")}
                for p in parties}

    def sync_sgd_step(self, batches: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
        """One synchronous step: the gradient at every data owner on its batch (record
        indices), averaged by batch size, then the model owner's optimizer step."""
        state = self._state_fields()

        params = {k: v.detach() for k, v in self.module.named_parameters()}
        own_buffers = {k: v.detach() for k, v in self.module.named_buffers()}

        def grad(p: str) -> dict[str, Any]:
            r = self.transport.call(p, "fl_gradient", segment=self.segments[p],
                                    dataset=self.train_dataset,
                                    indices=batches[p].to(torch.int64), **state)
            a = Answer(p, "fl_gradient", r, bound=self.max_abs_value)
            return {**_figures(a, "count", int(batches[p].numel()), " (the records sent)"),
                    "grad": a.tensors("grad/", params), "buffer": a.tensors("buffer/", own_buffers)}

        results = self._each("fl_gradient", list(batches), grad)
        parties = list(results)
        counts = [float(results[p]["count"]) for p in parties]
        grads = weighted_mean([results[p]["grad"] for p in parties], counts)
        self.optimizer.zero_grad(set_to_none=True)
        for name, param in self.module.named_parameters():
            param.grad = grads[name].clone()
        self.optimizer.step()
        buffers = [results[p]["buffer"] for p in parties]
        if buffers[0]:
            merged = weighted_mean(buffers, counts)
            self.module.load_state_dict({**self.module.state_dict(), **merged})
        for p in parties:
            self._book(p, int(results[p]["count"]), optimizer=False)
        self.rounds_run += 1
        return {p: {k: results[p][k] for k in ("count", "loss_sum", "correct")} for p in parties}

    def _sync_epoch(self) -> list[dict[str, dict[str, Any]]]:
        perms = {p: torch.randperm(self.records[p], generator=self.generator).split(self.batch_size)
                 for p in self.data_owners}
        steps = max(len(b) for b in perms.values())
        out = []
        for k in range(steps):
            batch = {p: b[k] for p, b in perms.items() if k < len(b) and p not in self.dropped}
            if batch:
                out.append(self.sync_sgd_step(batch))
        return out

    def evaluate(self, dataset: str | None = None) -> dict[str, float]:
        """Loss and accuracy of the global model over every data owner's ``dataset``."""
        dataset = dataset or self.test_dataset or self.train_dataset
        state = self._state_fields()

        def ev(p: str) -> dict[str, Any]:
            r = self.transport.call(p, "fl_evaluate", segment=self.segments[p],
                                    dataset=dataset, **state)
            a = Answer(p, "fl_evaluate", r)
            known = self.sizes.get(p, {}).get(dataset)
            if known is None:  # a dataset its describe did not list: any count, consistent
                known = a.count("count", 0, 2**62)
            return _figures(a, "count", known, f" (the records of {dataset!r} its describe "
                            "gave)")

        results = self._each("fl_evaluate", self.data_owners, ev)
        for p, r in results.items():  # in batches, as the data owner ran them: a count of
            n, b = r["count"], self.batch_size  # its choosing allocates nothing here
            for batch, times in ((b, n // b), (n % b, 1)):
                if batch and times:
                    cost = self.ledger.cost(self.module, self.input_shape, batch,
                                            input_grad=False, optimizer=None)
                    self.ledger.add(p, cost, train=False, times=times)
        n = sum(int(r["count"]) for r in results.values())
        return {"loss": sum(float(r["loss_sum"]) for r in results.values()) / max(n, 1),
                "accuracy": sum(int(r["correct"]) for r in results.values()) / max(n, 1)}

    def fit(self, rounds: int, *, verbose: bool = False) -> RunReport:
        """``rounds`` FedAvg rounds (each ``local_epochs`` local epochs), or ``rounds`` epochs of
        synchronous SGD; evaluates after each; returns the run report (one record per round)."""
        t_run = time.perf_counter()
        if self.traffic is None:  # this run's bytes: from its first fit on (not the setup)
            self.traffic = RunTraffic(self.transport.traffic)
        traffic = self.traffic
        for r in range(1, rounds + 1):
            t0 = time.perf_counter()
            if self.algorithm == "fedavg":
                parts = [self.fedavg_round()]
                loss_n = [(v["loss_sum"], v["correct"], v["records"]) for v in parts[0].values()]
                self.report.steps += sum(int(v["steps"]) for v in parts[0].values())
            else:
                parts = self._sync_epoch()
                loss_n = [(v["loss_sum"], v["correct"], v["count"]) for s in parts for v in s.values()]
                self.report.steps += len(parts)
            n = sum(int(c) for _, _, c in loss_n)
            test = self.evaluate() if self.test_dataset else None
            rec = EpochRecord(
                epoch=r, train_loss=sum(float(x) for x, _, _ in loss_n) / max(n, 1),
                train_accuracy=sum(int(c) for _, c, _ in loss_n) / max(n, 1),
                test_loss=test["loss"] if test else None,
                test_accuracy=test["accuracy"] if test else None,
                steps=self.report.steps, seconds=time.perf_counter() - t0,
                bytes_by_party=traffic.figures()["bytes_by_party"],
                flops_by_party=self.ledger.flops_by_party(),
            )
            self.report.epochs.append(rec)
            if verbose:
                print(f"round {r}: train loss {rec.train_loss:.4f} acc {rec.train_accuracy:.4f}"
                      + (f" | test acc {rec.test_accuracy:.4f}" if test else "")
                      + f" | {rec.seconds:.1f}s", flush=True)
        self.report.wall_time_s += time.perf_counter() - t_run
        traffic.book(self.report)
        self.report.flops_by_party = self.ledger.flops_by_party()
        self.report.peak_memory_by_party = self.ledger.peak_memory_by_party()
        return self.report

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The global model's weights (keys as the data owners' rebuilt model has them)."""
        return copy.deepcopy(self.module.state_dict())
