"""The model owner's side of SplitFed averaging: FedAvg of state dicts (:func:`weighted_mean`)
and SplitFed v1's per-data-owner copies of the model owner's segments (:class:`ServerCopies`).
The data owners' segments are averaged by secure aggregation (:mod:`syft_split.schedules`)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from .errors import ConfigError
from .session import SplitSession

__all__ = ["ServerCopies", "weighted_mean"]


def weighted_mean(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]
                  ) -> dict[str, torch.Tensor]:
    """FedAvg of state dicts: floating tensors weighted by ``weights``; others (e.g.
    BatchNorm's ``num_batches_tracked``) from the first state."""
    total = float(sum(weights))
    if not states or total <= 0:
        raise ConfigError(f"weighted_mean needs states and a positive total weight, got {total}")
    out: dict[str, torch.Tensor] = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            acc = torch.zeros_like(v)
            for s, w in zip(states, weights):
                if w:  # weight 0 adds nothing (not even a copy's NaN: 0 * NaN is NaN)
                    acc += s[k] * (w / total)
            out[k] = acc
        else:
            out[k] = v.clone()
    return out


class ServerCopies:
    """Per-data-owner copies of the model owner's segments (SplitFed v1)."""

    def __init__(self, session: SplitSession, sources: Sequence[str]) -> None:
        self.session = session
        self.states: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
            s: self._snapshot() for s in sources
        }

    def _snapshot(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        mods = [copy.deepcopy(m.state_dict()) for m in self.session.local.values()]
        return mods, [copy.deepcopy(o.state_dict()) for o in self.session.optimizers]

    def use(self, source: str) -> None:
        """Load ``source``'s copy into the session's segments and optimizers."""
        mods, opt = self.states[source]
        for m, state in zip(self.session.local.values(), mods):
            m.load_state_dict(state)
        for o, state in zip(self.session.optimizers, opt):
            o.load_state_dict(state)

    def save(self, source: str) -> None:
        """Keep the session's segments and optimizers as ``source``'s copy."""
        self.states[source] = self._snapshot()

    def average(self, weights: dict[str, float], keep: Sequence[str] = ()) -> None:
        """Every copy becomes the weighted average; a source missing from ``weights`` (it had
        no batch this round) counts with weight 0 and also continues from the average, unless
        it is in ``keep`` (its data owner's segment was not relayed the average: its copy stays
        with it)."""
        sources = list(self.states)
        per_module = [
            weighted_mean([self.states[s][0][k] for s in sources], [weights.get(s, 0.0) for s in sources])
            for k in range(len(self.session.local))
        ]
        for s in sources:
            if s not in keep:
                self.states[s] = ([copy.deepcopy(m) for m in per_module], self.states[s][1])
        self.use(sources[0])
