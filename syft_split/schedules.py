"""Multi-client schedules: how data owners' copies of a segment relate over training.

- ``round_robin``: batches interleave over data owners; each keeps its own segment weights.
- ``relay`` (Gupta & Raskar 2018): data owners train in turn on all their batches; the segment's
  weights pass to the next one through the model owner or peer-to-peer (sealed, the model owner
  relays ciphertext).
- ``splitfed_v1`` (Thapa et al. 2022): each round every data owner trains one batch "in
  parallel" against its own copy of the model owner's segments; after the round the data
  owners' segments and the server copies are averaged (FedAvg, weighted by batch size).
- ``splitfed_v2``: as v1 but the model owner processes the data owners one after the other on
  a single copy of its segments; only the data owners' segments are averaged.

The model owner plays the SplitFed "fed server" here, so it sees the data owners' segment
weights while averaging (``share_weights="model_owner"``); use ``"peer"`` relay when it
must not.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from .errors import ConfigError
from .session import SplitSession

__all__ = ["SCHEDULES", "relay_weights", "average_segments", "input_nodes"]

SCHEDULES = ("round_robin", "relay", "splitfed_v1", "splitfed_v2")


def input_nodes(session: SplitSession) -> list[int]:
    """Nodes every data owner runs a copy of (the ones whose weights are shared)."""
    from .topology import DATA_OWNER

    return [i for i, n in enumerate(session.plan.nodes) if n.owner == DATA_OWNER]


def _require_sharing(session: SplitSession, via: str) -> None:
    if session.plan.share_weights != via:
        raise ConfigError(f"this schedule moves client weights via {via!r}, but the plan was "
                          f"approved with share_weights={session.plan.share_weights!r}")


def relay_weights(session: SplitSession, src: str, dst: str, *, via: str = "model_owner") -> None:
    """Copy every shared segment's weights from data owner ``src`` to ``dst``."""
    _require_sharing(session, via)
    for i in input_nodes(session):
        a, b = session._seg(src, i), session._seg(dst, i)
        if via == "peer":
            sealed, sender = a.seal_for(dst)
            b.unseal(sealed, sender)
        else:
            b.load(a.export())


def _mean(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]
          ) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    out: dict[str, torch.Tensor] = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            acc = torch.zeros_like(v)
            for s, w in zip(states, weights):
                acc += s[k] * (w / total)
            out[k] = acc
        else:
            out[k] = v.clone()  # e.g. BatchNorm's num_batches_tracked
    return out


def average_segments(session: SplitSession, sources: Sequence[str],
                     weights: Sequence[float]) -> None:
    """FedAvg the data owners' copies of every shared segment (model owner as fed server)."""
    _require_sharing(session, "model_owner")
    for i in input_nodes(session):
        segs = [session._seg(s, i) for s in sources]
        avg = _mean([seg.export() for seg in segs], weights)
        for seg in segs:
            seg.load(avg)


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
        mods, opt = self.states[source]
        for m, state in zip(self.session.local.values(), mods):
            m.load_state_dict(state)
        for o, state in zip(self.session.optimizers, opt):
            o.load_state_dict(state)

    def save(self, source: str) -> None:
        self.states[source] = self._snapshot()

    def average(self, weights: dict[str, float]) -> None:
        """Every copy becomes the weighted average; a source missing from ``weights`` (it had
        no batch this round) counts with weight 0 and also continues from the average."""
        sources = list(self.states)
        per_module = [
            _mean([self.states[s][0][k] for s in sources], [weights.get(s, 0.0) for s in sources])
            for k in range(len(self.session.local))
        ]
        for s in sources:
            self.states[s] = ([copy.deepcopy(m) for m in per_module], self.states[s][1])
        self.use(sources[0])
