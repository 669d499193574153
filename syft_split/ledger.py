"""The cost ledger: FLOPs (forward, backward) and peak tensor memory per party, next to bytes.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` with torch's formulas: it
counts matrix multiplications, convolutions and attention (2 FLOPs per multiply-add) and leaves
out element-wise ops, pooling, normalisation and losses. Ours on top: a grouped convolution's
weight gradient (torch's counts it as a dense one's, ``groups`` times too many), and the CPU
flash-attention kernel behind ``scaled_dot_product_attention`` (forward and backward), which
torch's table lacks, counted with torch's own attention formulas.
Peak memory is the largest number of tensor bytes alive during one training step -- parameters,
buffers, the input batch, activations saved for backward, gradients, optimizer state and
temporaries -- tracked storage by storage while the step runs (not the process's RSS, which
would include PySyft and Python).

Where a count comes from: the model owner knows every segment's architecture (it proposed
them) and every batch shape, so :class:`CostLedger` counts each party's share of a step on an
*identical copy* of that party's segment, at the model owner, once per distinct batch size
(FLOPs and memory do not depend on the weights' values). Nothing is asked of the data owners.
HE-protected layers are not counted here; their cost is in the run report's ``he`` section.

>>> cost = step_cost(nn.Linear(64, 10), (64,), batch=32)   # doctest: +SKIP
>>> ledger.add("hospital", cost)                             # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .flops import flop_formulas
from .spec import OptimizerSpec

if TYPE_CHECKING:
    from .session import SplitSession

__all__ = ["StepCost", "step_cost", "CostLedger"]


@dataclass(frozen=True)
class StepCost:
    """One training step of one segment: FLOPs of its forward and backward pass, and the peak
    tensor bytes alive during the step (0 when memory was not measured)."""

    forward: int
    backward: int
    peak_bytes: int = 0


class _PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storage alive while the mode is on: every op's outputs are tracked
    by storage (views share theirs) until the storage is freed."""

    def __init__(self, alive: Iterable[torch.Tensor]) -> None:
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.live: dict[int, tuple[Any, int]] = {}
        self.peak = 0
        for t in alive:
            self._track(t)
        self._update()

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ref = self._ref(storage)
        if ref.cdata not in self.live:
            self.live[ref.cdata] = (ref, storage.nbytes())

    def _update(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        self._update()
        return out


def step_cost(module: nn.Module, input_shape: tuple[int, ...], batch: int, *,
              input_grad: bool = False, optimizer: OptimizerSpec | None = None,
              memory: bool = True) -> StepCost:
    """FLOPs and peak memory of one training step of ``module`` on a batch of ``batch`` records
    of ``input_shape``, on an identical copy (``module`` itself is not touched).

    ``input_grad``: the step also computes the gradient w.r.t. the input (every segment but a
    data owner's first one). ``optimizer``: the step ends with this optimizer's update (its
    state counts towards memory)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(module).train()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = optimizer.build(params) if optimizer is not None and params else None
    device = next((p.device for p in m.parameters()), torch.device("cpu"))
    x = torch.zeros((batch, *input_shape), device=device, requires_grad=input_grad)
    counter = FlopCounterMode(display=False, custom_mapping=flop_formulas())
    tracker = _PeakMemory([x, *m.parameters(), *m.buffers()]) if memory else None
    # the copy runs real kernels (dropout draws from the global RNG): leave the caller's
    # random stream as it was, or a resumed run (empty cache) would draw differently
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        if tracker is not None:
            tracker.__enter__()
        try:
            with counter:
                out = m(x)
            forward = int(counter.get_total_flops())
            backward = 0
            if out.requires_grad:
                with counter:
                    out.backward(torch.ones_like(out))
                backward = int(counter.get_total_flops())
            if opt is not None:
                opt.step()
        finally:
            if tracker is not None:
                tracker.__exit__(None, None, None)
    return StepCost(forward, backward, tracker.peak if tracker is not None else 0)


class CostLedger:
    """FLOPs and peak memory per party over a run (what :class:`~syft_split.report.RunReport`
    records next to bytes).

    ``flops_by_party()`` is ``{party: {"forward": n, "backward": n, "eval": n}}`` (``eval``:
    forward passes of evaluation); ``peak_memory_by_party()`` is ``{party: bytes}``, the
    largest one-step peak seen (a party holding several segments: the sum of theirs, an upper
    bound). Safe to call from several threads.
    """

    def __init__(self, *, memory: bool = True) -> None:
        import threading

        self.memory = memory
        self._flops: dict[str, dict[str, int]] = {}
        self._peak: dict[str, int] = {}
        self._cache: dict[tuple[Any, ...], StepCost] = {}
        self._shapes: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        self._lock = threading.RLock()

    def add(self, party: str, cost: StepCost, *, train: bool = True, times: int = 1) -> None:
        """Book ``times`` steps of ``cost`` to ``party`` (``train=False``: forward only)."""
        with self._lock:
            row = self._flops.setdefault(party, {"forward": 0, "backward": 0, "eval": 0})
            if train:
                row["forward"] += cost.forward * times
                row["backward"] += cost.backward * times
                self._peak[party] = max(self._peak.get(party, 0), cost.peak_bytes)
            else:
                row["eval"] += cost.forward * times

    def cost(self, module: nn.Module, input_shape: tuple[int, ...], batch: int, *,
             input_grad: bool, optimizer: OptimizerSpec | None) -> StepCost:
        """:func:`step_cost`, computed once per (module, shape, batch, ...) and cached."""
        key = (id(module), tuple(input_shape), batch, input_grad,
               None if optimizer is None else repr(optimizer))
        with self._lock:
            hit = self._cache.get(key)
            if hit is None:
                hit = step_cost(module, input_shape, batch, input_grad=input_grad,
                                optimizer=optimizer, memory=self.memory)
                self._cache[key] = hit
            return hit

    def session_step(self, session: SplitSession, source: str, batch: int, *,
                     train: bool = True, local_loss: bool = False) -> None:
        """Book one step of ``batch`` records from ``source`` to every party that ran a segment
        of it (data owners, relays, the model owner), counted on identical copies here.

        ``local_loss``: a step of the local-loss schedule (:mod:`syft_split.local_loss`): the
        data owner also trains the plan's auxiliary head on its segment's output, and the
        model owner's segments read the cut activation without sending a gradient back."""
        spec = session.plan.local_loss if local_loss else None
        with self._lock:
            shapes = self._shapes.get(source)
            if shapes is None:
                shapes = self._shapes[source] = session._shapes(source)
            per_party: dict[str, list[StepCost]] = {}
            for i, node in enumerate(session.plan.nodes):
                optimizer = node.optimizer or session.optimizer_spec  # as proposed
                # no input gradient for a first segment, nor at a cut no gradient goes back
                grad_in = bool(node.inputs) and not (spec is not None and set(node.inputs) == {0})
                cost = self.cost(node.module, shapes[i][0], batch, input_grad=grad_in,
                                 optimizer=optimizer)
                per_party.setdefault(session._host(source, i), []).append(cost)
            if spec is not None:  # the auxiliary head, trained through into the segment
                per_party.setdefault(session._host(source, 0), []).append(self.cost(
                    spec.head, shapes[0][1], batch, input_grad=True,
                    optimizer=spec.optimizer or session.optimizer_spec))  # as attached
            for party, costs in per_party.items():
                total = StepCost(sum(c.forward for c in costs), sum(c.backward for c in costs),
                                 sum(c.peak_bytes for c in costs))
                self.add(party, total, train=train)

    def totals(self) -> dict[str, Any]:
        """What a checkpoint keeps: ``{"flops": flops_by_party(), "peak": peak_memory...}``."""
        return {"flops": self.flops_by_party(), "peak": self.peak_memory_by_party()}

    def load_totals(self, totals: dict[str, Any]) -> None:
        """Set this ledger's totals to a checkpoint's :meth:`totals` (a resumed run: what it
        counted since, in this process or one that crashed, is counted again as the steps
        after the checkpoint run again)."""
        with self._lock:
            self._flops = {party: {"forward": 0, "backward": 0, "eval": 0,
                                   **{k: int(n) for k, n in row.items()}}
                           for party, row in totals.get("flops", {}).items()}
            self._peak = {party: int(n) for party, n in totals.get("peak", {}).items()}

    def flops_by_party(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {p: dict(row) for p, row in self._flops.items()}

    def peak_memory_by_party(self) -> dict[str, int]:
        with self._lock:
            return dict(self._peak)

    def training_flops(self, party: str) -> int:
        """Forward + backward FLOPs of ``party``'s training so far."""
        row = self.flops_by_party().get(party, {})
        return int(row.get("forward", 0) + row.get("backward", 0))
