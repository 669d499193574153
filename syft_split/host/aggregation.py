"""Secure aggregation among peer data owners (:mod:`syft_split.secagg`), the ops of
:class:`~syft_split.host.weights.WeightOps` that average a segment with its peers' copies.

=====================  =====================================================================
``secagg_round``       the last secure-aggregation round this segment took part in
``secagg_contribute``  this segment's weights, fixed point, weighted, pairwise masked
                       (:mod:`syft_split.secagg`) and sealed once per other member
``secagg_aggregate``   every other member's sealed contribution for the pending round: each is
                       authenticated and checked (member, round, cohort, weights, segment
                       fingerprint); the masks cancel in the sum and the average is loaded
                       (a refusal names the peer at fault)
``secagg_check``       what ``secagg_aggregate`` checks, loading and saving nothing (asked of
                       every member first: a refused contribution aborts the round before
                       anyone loads; a refused average leaves it unaveraged)
=====================  =====================================================================
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import secagg, wire
from ..errors import (
    AccessError,
    AverageRefusedError,
    CohortRefusedError,
    ProtocolError,
    ShapeError,
    SyftSplitError,
    ValidationError,
)
from .dispatch import Host, op
from .guard import SCALAR, SEALED, Call
from .peers import PeerFamily, _positive_int, _text, fingerprint
from .records import ROLES, Runtime

__all__ = ["AggregationOps"]

_MAX_MEMBERS = 64
_MAX_WEIGHT = 1e12  # averaging weights are record counts


def _pending_round(pending: dict[str, Any] | None) -> int | None:
    """The round number of a round in flight (None: none)."""
    return None if pending is None else int(pending["descriptor"]["round"])


class AggregationOps(PeerFamily):
    """The secure-aggregation ops (see the module docstring) and the rounds they keep: the last
    round each segment contributed to, the round in flight (``pending``, with this data
    owner's own masked contribution) and the last round loaded (``done``); they persist with
    the host (:meth:`~syft_split.host.weights.WeightOps.state`)."""

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        #: secure aggregation: last round each of our segments contributed to
        self.rounds: dict[str, int] = {}
        #: secure aggregation: the round each segment contributed to and has not summed yet
        self.pending: dict[str, dict[str, Any]] = {}
        #: the last round each segment loaded (a repeated aggregate of it is answered, not redone)
        self.aggregated: dict[str, int] = {}
        #: that round's descriptor and own masked contribution (served again to finish it)
        self.done: dict[str, dict[str, Any]] = {}

    # --------------------------------------------------------- secure aggregation
    @op("secagg_round", roles=ROLES, mutates=True,
        egress={"round": SCALAR, "pending": SCALAR, "aggregated": SCALAR, "min_cohort": SCALAR})
    def secagg_round(self, call: Call) -> dict[str, Any]:
        """The last round contributed to, the round in flight (0: none) and the last round
        loaded, so that a new model-owner process can finish an interrupted round; and this
        data owner's ``HostLimits.min_cohort``, so that the model owner starts no round (and
        asks for no relay) that it would refuse."""
        assert call.rt is not None
        pending = self.pending.get(call.rt.id)
        return {"round": self.rounds.get(call.rt.id, 0),
                "pending": 0 if pending is None else int(pending["descriptor"]["round"]),
                "aggregated": self.aggregated.get(call.rt.id, 0),
                "min_cohort": self.host.limits.min_cohort}

    def _descriptor(self, rt: Runtime, req: dict[str, Any]) -> dict[str, Any]:
        """The round as the model owner describes it, checked against what this host knows."""
        if rt.proposal.share_weights != "peer":
            raise AccessError(f"{rt.id} was not approved for peer weight sharing")
        label = _text(req.get("label"), "label")
        rnd = _positive_int(req.get("round"), "round")
        last = self.rounds.get(rt.id, 0)
        pending = self.pending.get(rt.id)
        repeat = (pending is not None and pending["descriptor"]["round"] == rnd == last) or (
            rt.id in self.done and self.done[rt.id]["descriptor"]["round"] == rnd == last)
        if rnd <= last and not repeat:
            raise ProtocolError(f"round {rnd} of {rt.id} is not after its last round {last}: "
                                "masks are never reused")
        members, weights = req.get("members"), req.get("weights")
        if (not isinstance(members, dict) or not 2 <= len(members) <= _MAX_MEMBERS
                or not all(isinstance(v, str) for v in members.values())):
            raise ProtocolError(f"members must map 2..{_MAX_MEMBERS} data owners to segment ids, "
                                f"got {members!r:.200}")
        for peer, segment in members.items():  # persisted with the round: bounded
            _text(segment, f"members[{peer!r:.60}] (a segment id)")
        if members.get(self.host.name) != rt.id:
            raise ProtocolError(f"members {members} do not list {self.host.name} as {rt.id}")
        for peer in members:
            if peer != self.host.name:
                self._trusted(rt, peer)
        if (not isinstance(weights, dict) or set(weights) != set(members) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool)
                and 0 < w <= _MAX_WEIGHT for w in weights.values())):
            raise ProtocolError(f"weights must give every member a number in (0, "
                                f"{_MAX_WEIGHT:g}] (a member of weight 0 contributes nothing: "
                                "the 'average' would be a copy of the others'; leave it out of "
                                f"the round), got {weights!r:.200}")
        self._cohort_rule(members, weights)
        return {"v": 1, "label": label, "round": rnd, "members": members, "weights": weights,
                "fingerprint": fingerprint(rt)}

    def _cohort_rule(self, members: dict[str, str], weights: dict[str, Any]) -> None:
        """``HostLimits.min_cohort`` (:func:`syft_split.secagg.cohort_rule`), checked before
        anything is kept or masked; refused with :class:`CohortRefusedError` (a policy)."""
        why = secagg.cohort_rule(len(members), list(weights.values()),
                                 self.host.limits.min_cohort)
        if why is not None:
            raise CohortRefusedError(f"{self.host.name} {why}; this round has {len(members)} "
                                     f"members, weights {weights!r:.200}")

    @op("secagg_contribute", roles=ROLES, mutates=True, egress={"sealed/*": SEALED, "round": SCALAR})
    def secagg_contribute(self, call: Call) -> dict[str, Any]:
        rt = call.rt
        assert rt is not None
        desc = self._descriptor(rt, call.req)
        if rt.pending_output is not None or rt.pending_loss_grads:
            raise ProtocolError(f"segment {rt.id} has a pending step; flush first")
        me, members, weights = self.host.name, desc["members"], desc["weights"]
        peers = sorted(p for p in members if p != me)
        done = self.done.get(rt.id)
        if _pending_round(self.pending.get(rt.id)) != desc["round"] and done is not None and (
                done["descriptor"]["round"] == desc["round"]):
            # a round this data owner loaded, asked again by a model owner finishing it for the
            # members that did not: the same contribution, for exactly the same description
            if secagg.canonical(done["descriptor"]) != secagg.canonical(desc):
                raise ProtocolError(f"round {desc['round']} of {rt.id} was contributed to "
                                    "with another description")
            return self._sealed(desc, np.frombuffer(done["own"], dtype=np.uint64), peers)
        pending = self.pending.get(rt.id)
        if pending is not None and pending["descriptor"]["round"] == desc["round"]:
            # the same round asked again (its answer was lost): the same contribution, if the
            # model owner describes the round exactly as before and nothing trained since
            if (secagg.canonical(pending["descriptor"]) != secagg.canonical(desc)
                    or pending["steps"] != rt.steps):
                raise ProtocolError(f"round {desc['round']} of {rt.id} was contributed to "
                                    "with another description or other weights")
            masked = np.frombuffer(pending["own"], dtype=np.uint64)
        else:
            state = rt.module.state_dict()
            keys = [k for k, v in state.items() if v.is_floating_point()]
            fraction = float(weights[me]) / float(sum(weights.values()))
            q = secagg.encode(secagg.flatten(state, keys), fraction, len(members))
            masked = secagg.mask(q, me, {p: bytes(self._box(p).shared_key()) for p in peers},
                                 secagg.canonical(desc))
        out = self._sealed(desc, masked, peers)
        self.rounds[rt.id] = desc["round"]  # from now on these masks are spent
        self.pending[rt.id] = {"descriptor": desc, "own": masked.tobytes(), "steps": rt.steps}
        return out

    def _sealed(self, desc: dict[str, Any], masked: np.ndarray, peers: list[str]
                ) -> dict[str, Any]:
        """This data owner's masked contribution, sealed for each other member."""
        out: dict[str, Any] = {"round": desc["round"]}
        for p in peers:
            plain = wire.encode({"kind": "secagg", "sender": self.host.name, "recipient": p,
                                 "descriptor": desc, "masked": masked.tobytes()})
            out[f"sealed/{p}"] = bytes(self._box(p).encrypt(plain))
        return out

    @op("secagg_check", roles=ROLES, egress={"round": SCALAR, "steps": SCALAR})
    def secagg_check(self, call: Call) -> dict[str, Any]:
        """What ``secagg_aggregate`` checks (every contribution, the average's bound), loading
        and saving nothing: the model owner asks every member this first, so that a refused
        contribution aborts the round before anyone has loaded it. A refusal because of one
        peer's contribution names it in the answer's ``peer`` field (the error's ``peer``
        attribute); a refused average is an :class:`AverageRefusedError`."""
        return self._aggregate(call, check=True)

    @op("secagg_aggregate", roles=ROLES, mutates=True, egress={"round": SCALAR, "steps": SCALAR})
    def secagg_aggregate(self, call: Call) -> dict[str, Any]:
        """Check every other member's sealed contribution, sum them with this data owner's
        own and load the average (refusals as :meth:`secagg_check`'s)."""
        return self._aggregate(call, check=False)

    def _aggregate(self, call: Call, *, check: bool) -> dict[str, Any]:
        rt = call.rt
        assert rt is not None
        pending = self.pending.get(rt.id)
        rnd = call.req.get("round")
        if pending is None and self.aggregated.get(rt.id) == rnd:  # done; its answer was lost
            return {"round": rnd, "steps": rt.steps}
        if pending is None or pending["descriptor"]["round"] != rnd:
            have = None if pending is None else pending["descriptor"]["round"]
            raise ProtocolError(f"no pending aggregation round {rnd!r} for {rt.id} (pending: "
                                f"{have})")
        desc, me = pending["descriptor"], self.host.name
        expected = sorted(p for p in desc["members"] if p != me)
        got = sorted(k[7:] for k in call.req if k.startswith("sealed/"))
        if got != expected:
            raise ProtocolError(f"round {rnd} of {rt.id} needs one contribution from each of "
                                f"{expected}, got {got}; without every member the round "
                                "aborts (nothing loaded)")
        if rt.steps != pending["steps"]:
            raise ProtocolError(f"{rt.id} trained since contributing to round {rnd}")
        own = np.frombuffer(pending["own"], dtype=np.uint64)
        parts = [own]
        for peer in expected:
            try:
                parts.append(self._contribution(rt, peer, call.req[f"sealed/{peer}"], desc,
                                                len(pending["own"])))
            except SyftSplitError as exc:
                exc.peer = peer  # the sender, for the model owner (a field of the answer)
                raise
        average = secagg.decode(secagg.total(parts))
        state = rt.module.state_dict()
        keys = [k for k, v in state.items() if v.is_floating_point()]
        new = {**{k: v.clone() for k, v in state.items()},
               **secagg.unflatten(average, state, keys)}
        try:
            checked = self._check_loadable(rt, new)
        except ValidationError as exc:  # the average's: nobody's contribution in particular
            raise AverageRefusedError(f"the average of round {rnd} cannot be loaded into "
                                      f"{rt.id}: {exc}") from exc
        if check:
            return {"round": rnd, "steps": rt.steps}
        self._load(rt, checked)
        del self.pending[rt.id]
        self.aggregated[rt.id] = rnd
        self.done[rt.id] = {"descriptor": desc, "own": pending["own"]}
        return {"round": rnd, "steps": rt.steps}

    def _contribution(self, rt: Runtime, peer: str, sealed: Any, desc: dict[str, Any],
                      size: int) -> np.ndarray:
        """``peer``'s masked contribution to the round ``desc``, opened and checked."""
        rnd = desc["round"]
        msg = self._open(self._trusted(rt, peer), sealed, f"contribution to round {rnd}")
        if (msg.get("kind"), msg.get("sender"), msg.get("recipient")) != (
                "secagg", peer, self.host.name) or not isinstance(msg.get("descriptor"), dict) or (
                secagg.canonical(msg["descriptor"]) != secagg.canonical(desc)):
            raise ProtocolError(f"the contribution of {peer!r} is not for round {rnd} of "
                                f"{rt.id} as this data owner contributed to it")
        masked = msg.get("masked")
        if not isinstance(masked, bytes) or len(masked) != size:
            raise ShapeError(f"the contribution of {peer!r} has the wrong size")
        return np.frombuffer(masked, dtype=np.uint64)
