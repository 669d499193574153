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
Local shuffling is reproducible: round ``r`` shuffles with ``torch.Generator().manual_seed(
seed + r)`` at every data owner. The model owner sees every data owner's weights or gradients
(that is FedAvg without secure aggregation; the data owner's review says so).

>>> fl = FederatedTrainer(model, dep.transport, ["a", "b"], algorithm="fedavg")   # doctest: +SKIP
>>> dep.approve_all(fl.propose()); report = fl.fit(5)                           # doctest: +SKIP
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import ConfigError, TransportError
from .ledger import CostLedger
from .report import EpochRecord, RunReport, RunTraffic
from .rounds import PartyFailure, run_each
from .schedules import weighted_mean
from .spec import OptimizerSpec, module_from_spec, module_to_spec, spec_state
from .transport.base import Transport

__all__ = ["ALGORITHMS", "FederatedTrainer", "weighted_mean"]

ALGORITHMS = ("fedavg", "sync_sgd")


def _declarable(model: nn.Module) -> nn.Module:
    """``model`` in a form a spec can declare (a Sequential as is, others traced by fx)."""
    if isinstance(model, (nn.Sequential, fx.GraphModule)):
        return model
    return fx.symbolic_trace(model)


class FederatedTrainer:
    """Train ``model`` by FedAvg or large-batch synchronous SGD over ``data_owners`` reached
    through ``transport`` (see the module docstring). ``model`` must be declarable as a spec
    (standard layers; residual graphs through ``torch.fx``)."""

    def __init__(self, model: nn.Module, transport: Transport, data_owners: Sequence[str], *,
                 algorithm: str = "fedavg", optimizer: OptimizerSpec | None = None,
                 loss: str = "cross_entropy", local_epochs: int = 1, batch_size: int = 32,
                 train_dataset: str = "train", test_dataset: str | None = "test",
                 seed: int = 0, max_workers: int | None = None,
                 party_deadline_s: float | None = None) -> None:
        if algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if not data_owners:
            raise ConfigError("FederatedTrainer needs at least one data owner")
        missing = [d for d in data_owners if d not in transport.parties()]
        if missing:
            raise ConfigError(f"parties {missing} are not reachable through the transport; "
                              f"connected: {transport.parties()}")
        for name, value in (("local_epochs", local_epochs), ("batch_size", batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
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
        declared = _declarable(model)
        self.spec = module_to_spec(declared)
        #: the global model, as every data owner rebuilds it from the spec
        self.module = module_from_spec(self.spec)
        self.module.load_state_dict(spec_state(declared))
        self.optimizer = self.optimizer_spec.build(self.module.parameters())
        self.segments: dict[str, str] = {}
        self.records: dict[str, int] = {}
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
            meta = self.transport.call(party, "describe")["datasets"]
            self.records[party] = int(meta[self.train_dataset]["records"])
            self.input_shape = tuple(meta[self.train_dataset]["feature_shape"])
            r = self.transport.call(party, "fl_propose", spec=self.spec, datasets=datasets,
                                    optimizer=self.optimizer_spec.to_json(), loss=self.loss,
                                    max_batch=max(self.batch_size, 1), **state)
            self.segments[party] = str(r["segment"])
            out[party] = [self.segments[party]]
        return out

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

        def train(p: str) -> dict[str, Any]:
            return self.transport.call(p, "fl_train", segment=self.segments[p],
                                       dataset=self.train_dataset, epochs=self.local_epochs,
                                       batch_size=self.batch_size, seed=seed, **state)

        results = self._each("fl_train", self.data_owners, train)
        parties = list(results)
        states = [{k[6:]: v for k, v in results[p].items() if k.startswith("state/")}
                  for p in parties]
        self.module.load_state_dict(weighted_mean(states, [results[p]["records"] for p in parties]))
        for p in parties:
            n, b = int(results[p]["records"]), self.batch_size
            self._book(p, b, times=(n // b) * self.local_epochs)
            if n % b:
                self._book(p, n % b, times=self.local_epochs)
        self.rounds_run += 1
        return {p: {k: v for k, v in results[p].items() if not k.startswith("state/")}
                for p in parties}

    def sync_sgd_step(self, batches: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
        """One synchronous step: the gradient at every data owner on its batch (record
        indices), averaged by batch size, then the model owner's optimizer step."""
        state = self._state_fields()

        def grad(p: str) -> dict[str, Any]:
            return self.transport.call(p, "fl_gradient", segment=self.segments[p],
                                       dataset=self.train_dataset,
                                       indices=batches[p].to(torch.int64), **state)

        results = self._each("fl_gradient", list(batches), grad)
        parties = list(results)
        counts = [float(results[p]["count"]) for p in parties]
        grads = weighted_mean([{k[5:]: v for k, v in results[p].items() if k.startswith("grad/")}
                               for p in parties], counts)
        self.optimizer.zero_grad(set_to_none=True)
        for name, param in self.module.named_parameters():
            param.grad = grads[name].clone()
        self.optimizer.step()
        buffers = [{k[7:]: v for k, v in results[p].items() if k.startswith("buffer/")}
                   for p in parties]
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
            return self.transport.call(p, "fl_evaluate", segment=self.segments[p],
                                       dataset=dataset, **state)

        results = self._each("fl_evaluate", self.data_owners, ev)
        for p, r in results.items():
            cost = self.ledger.cost(self.module, self.input_shape, int(r["count"]),
                                    input_grad=False, optimizer=None)
            self.ledger.add(p, cost, train=False)
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
