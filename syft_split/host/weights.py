"""Segment weights: what the data owner releases, and how weights move between data owners.

No model owner ever writes a segment's weights: there is no import op. Weights come in only
from a peer data owner whose public key this data owner pinned (``trust_peer``), sealed and
authenticated with PyNaCl's ``Box`` (X25519 + XSalsa20-Poly1305), and bound to this segment
and a fresh sequence or round number so the model owner, which relays them, can neither
forge, redirect nor replay them.

Model-owner ops:

=====================  =====================================================================
``export``             the weights, only after the data owner released them on their own
                       line (``approve(..., release_weights=True)`` or ``release_weights``)
``seal`` / ``unseal``  relay: the weights sealed for one trusted peer's named segment, with a
                       sequence number; the peer loads them once, in order
``secagg_round``       the last secure-aggregation round this segment took part in
``secagg_contribute``  this segment's weights, fixed point, weighted, pairwise masked
                       (:mod:`syft_split.secagg`) and sealed once per other member
``secagg_aggregate``   every other member's sealed contribution for the pending round: each is
                       authenticated and checked (member, round, cohort, weights, segment
                       fingerprint); the masks cancel in the sum and the average is loaded
=====================  =====================================================================

Data-owner ops: ``release_weights``, ``export_weights``, ``public_key``, ``trust_peer``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from .. import secagg, wire
from ..errors import (
    AccessError,
    ConfigError,
    LeakageHaltError,
    ProtocolError,
    ShapeError,
    WireError,
)
from .admission import check_weights
from .dispatch import Host, OpFamily, op, owner_op, register_family
from .guard import SCALAR, SEALED, TEXT, WEIGHTS, Call
from .records import ROLES, Runtime

__all__ = ["WeightOps", "fingerprint"]

_MAX_MEMBERS = 64
_MAX_WEIGHT = 1e12  # averaging weights are record counts
_MAX_TEXT = 256  # labels, segment ids: persisted with a round (the host's state is capped)


def fingerprint(rt: Runtime) -> str:
    """What two data owners' copies of one segment must share: its role, spec, input shape
    (an input segment's: its datasets' feature shape) and weight layout. An input segment's
    weights never leave; loaded into a middle or loss segment, whose inputs the model owner
    chooses, they would be read back (a forward of the identity; found in review). A middle
    or loss segment's own weights are readable that way anyway, so its copies may be shared
    among segments of its role."""
    p = rt.proposal
    layout = [[k, list(v.shape), str(v.dtype)] for k, v in rt.module.state_dict().items()]
    return hashlib.sha256(secagg.canonical({
        "role": p.role, "input_shape": list(p.input_shape), "spec": p.spec, "state": layout})
    ).hexdigest()


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ProtocolError(f"{name} must be a positive int, got {value!r}")
    return value


def _text(value: Any, name: str) -> str:
    """A short string the model owner (or a peer) chose, which may be persisted: at most
    ``_MAX_TEXT`` characters."""
    if not isinstance(value, str) or not value or len(value) > _MAX_TEXT:
        raise ProtocolError(f"{name} must be a non-empty string of at most {_MAX_TEXT} "
                            f"characters, got {type(value).__name__} {value!r:.60}")
    return value


def _releasable(rt: Runtime) -> None:
    """Refuse releasing a segment that loads peers' weights: its weights are theirs too (with
    averaging weights of the model owner's choice, another member's exact weights)."""
    if rt.proposal.share_weights == "peer":
        raise ConfigError(f"{rt.id} shares weights with peer data owners: its weights hold "
                          "theirs (relayed or averaged), so they are never released to the "
                          "model owner")


def _pending_round(pending: dict[str, Any] | None) -> int | None:
    """The round number of a round in flight (None: none)."""
    return None if pending is None else int(pending["descriptor"]["round"])


@register_family
class WeightOps(OpFamily):
    """Weight export, peer relay and secure aggregation (see the module docstring).

    State lives in plain attributes (bytes, str, int) for :meth:`state`: the X25519 secret
    key, pinned peer keys, relay sequence numbers, the last aggregation round per segment.
    The round in flight (``pending``) and the last round loaded (``done``, with this data
    owner's own masked contribution) persist with the host: a repeated contribute or aggregate
    is answered as before, and a model owner that died while members were loading finishes
    that round (members that loaded it serve their contribution again to those that did not;
    the same bytes, already sent once, sealed for the same members)."""

    name = "weights"
    host_state = True  # relay and round counters (replay protection) persist with the host

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.secret_key: bytes | None = None
        self.peers: dict[str, bytes] = {}
        #: relay: last sequence number sealed by each of our segments
        self.relay_sent: dict[str, int] = {}
        #: relay: last sequence number loaded, per "our segment<peer/their segment"
        self.relay_seen: dict[str, int] = {}
        #: secure aggregation: last round each of our segments contributed to
        self.rounds: dict[str, int] = {}
        #: secure aggregation: the round each segment contributed to and has not summed yet
        self.pending: dict[str, dict[str, Any]] = {}
        #: the last round each segment loaded (a repeated aggregate of it is answered, not redone)
        self.aggregated: dict[str, int] = {}
        #: that round's descriptor and own masked contribution (served again to finish it)
        self.done: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------- family hooks
    def review_lines(self, proposal: Any) -> list[str]:
        lines = []
        if proposal.share_weights == "peer":
            lines.append("  weights move only between you and data owners you trust "
                         "(trust_peer): relayed sealed and authenticated, or securely "
                         "averaged (pairwise masks); the model owner relays ciphertext, learns "
                         "no weights and cannot write any")
        if proposal.share_weights == "model_owner":
            lines.append("  REQUESTS WEIGHT EXPORT: the model owner asks to read this "
                         "segment's trained weights. Weights REVEAL TRAINING DATA (one chosen "
                         "gradient then an export recovers a record almost exactly). Not "
                         "granted by approving: grant it on its own with approve(id, "
                         "release_weights=True) or release_weights(id)")
        elif proposal.share_weights == "peer":
            lines.append("  the model owner can never read these weights: they hold your "
                         "peers' weights too, so release_weights is refused for this segment")
        elif proposal.role != "local":  # a local model starts from the model owner's weights
            lines.append("  weights stay here; the model owner can never write them, and reads "
                         "them only if you call release_weights(id), which reveals training "
                         "data")
        return lines

    def on_approve(self, rt: Runtime, options: dict[str, Any]) -> None:
        release = options.pop("release_weights", False)
        if not isinstance(release, bool):
            raise ConfigError(f"release_weights must be a bool, got {release!r}")
        if release:
            _releasable(rt)
            rt.extra["weights_released"] = True

    def state(self) -> dict[str, Any]:
        """JSON: keys as hex, counters, and the round in flight per segment (its descriptor and
        this data owner's own masked contribution), so a restarted data owner answers a
        repeated contribute or aggregate of that round exactly as before."""
        return {"secret_key": None if self.secret_key is None else self.secret_key.hex(),
                "peers": {k: v.hex() for k, v in self.peers.items()},
                "relay_sent": dict(self.relay_sent), "relay_seen": dict(self.relay_seen),
                "rounds": dict(self.rounds), "aggregated": dict(self.aggregated),
                "pending": {k: {"descriptor": v["descriptor"], "own": v["own"].hex(),
                                "steps": v["steps"]} for k, v in self.pending.items()},
                "done": {k: {"descriptor": v["descriptor"], "own": v["own"].hex()}
                         for k, v in self.done.items()}}

    def restore(self, state: Any) -> None:
        key = state.get("secret_key")
        self.secret_key = None if key is None else bytes.fromhex(key)
        self.peers = {k: bytes.fromhex(v) for k, v in state.get("peers", {}).items()}
        self.relay_sent = {k: int(v) for k, v in state.get("relay_sent", {}).items()}
        self.relay_seen = {k: int(v) for k, v in state.get("relay_seen", {}).items()}
        self.rounds = {k: int(v) for k, v in state.get("rounds", {}).items()}
        self.aggregated = {k: int(v) for k, v in state.get("aggregated", {}).items()}
        self.pending = {k: {"descriptor": v["descriptor"], "own": bytes.fromhex(v["own"]),
                            "steps": int(v["steps"])}
                        for k, v in state.get("pending", {}).items()}
        self.done = {k: {"descriptor": v["descriptor"], "own": bytes.fromhex(v["own"])}
                     for k, v in state.get("done", {}).items()}

    # ----------------------------------------------------------------------- crypto
    def keypair(self) -> Any:
        from nacl.public import PrivateKey

        if self.secret_key is None:
            self.secret_key = bytes(PrivateKey.generate())
        return PrivateKey(self.secret_key)

    def _box(self, peer: str) -> Any:
        from nacl.public import Box, PublicKey

        return Box(self.keypair(), PublicKey(self.peers[peer]))

    def _trusted(self, rt: Runtime, peer: Any) -> str:
        if rt.proposal.share_weights != "peer":
            raise AccessError(f"{rt.id} was not approved for peer weight sharing")
        if not isinstance(peer, str) or peer not in self.peers:
            raise AccessError(f"{peer!r} is not a peer {self.host.name} trusts; trusted: "
                              f"{sorted(self.peers)}")
        return peer

    def _open(self, peer: str, sealed: Any, what: str) -> dict[str, Any]:
        """Decrypt and authenticate ``sealed`` from ``peer`` (a trusted peer's key)."""
        from nacl.exceptions import CryptoError

        if not isinstance(sealed, bytes):
            raise WireError(f"{what} must be bytes, got {type(sealed).__name__}")
        try:
            plain = self._box(peer).decrypt(sealed)
        except CryptoError as exc:
            raise WireError(f"{what} from {peer!r} does not authenticate under its pinned key: "
                            f"{exc}") from exc
        return wire.decode(plain, max_bytes=self.host.limits.max_request_bytes)

    def _check_loadable(self, rt: Runtime, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Weights from peers, before anything changes: the segment's keys, shapes and dtypes,
        finite and within the data owner's bound (``HostLimits.max_abs_value``), like every
        value the guard lets in; and no step pending."""
        check_weights(rt.module, state, self.host.limits.max_abs_value, f"segment {rt.id}")
        if rt.pending_output is not None or rt.pending_loss_grads:
            raise ProtocolError(f"segment {rt.id} has a pending step; flush first")
        return state

    def _load(self, rt: Runtime, state: dict[str, torch.Tensor]) -> None:
        """Load weights from peers (checked already), then let every family look at them (the
        leakage watch measures them now). Refused by the watch: the segment's own weights are
        put back and it is halted, as the watch halts on a step."""
        own = {k: v.detach().clone() for k, v in rt.module.state_dict().items()}
        rt.module.load_state_dict(state)
        try:
            for family in self.host.families.values():
                family.after_load(rt)
        except Exception as exc:
            rt.module.load_state_dict(own)
            if isinstance(exc, LeakageHaltError):
                self.host.halt(rt.id, str(exc), by="watch")
            raise

    # ----------------------------------------------------------------------- export
    @op("export", roles=ROLES, egress={"state/*": WEIGHTS})
    def export(self, call: Call) -> dict[str, Any]:
        rt = call.rt
        assert rt is not None
        if rt.proposal.share_weights == "peer":  # even if released before this was refused
            raise AccessError(f"{rt.id} holds peer data owners' weights: never exported")
        if not rt.extra.get("weights_released"):
            raise AccessError(f"the data owner has not released the weights of {rt.id} "
                              "(weights reveal training data; releasing them is a separate "
                              "approval)")
        return {f"state/{k}": v for k, v in self.host.export_weights(rt.id).items()}

    # ------------------------------------------------------------------------ relay
    @op("seal", roles=ROLES, mutates=True, egress={"sealed": SEALED, "sender": TEXT})
    def seal(self, call: Call) -> dict[str, Any]:
        rt = call.rt
        assert rt is not None
        peer = self._trusted(rt, call.req.get("peer"))
        to_segment = _text(call.req.get("to_segment"), "to_segment")
        if self.host.limits.min_cohort >= 3:
            raise AccessError(f"{self.host.name} never relays its weights to a single peer "
                              f"(HostLimits.min_cohort={self.host.limits.min_cohort}); they "
                              "are only averaged")
        if rt.pending_output is not None or rt.pending_loss_grads:
            raise ProtocolError(f"segment {rt.id} has a pending step; flush first")
        seq = self.relay_sent.get(rt.id, 0) + 1
        plain = wire.encode({
            "kind": "relay", "sender": self.host.name, "from_segment": rt.id,
            "recipient": peer, "to_segment": to_segment, "seq": seq,
            "fingerprint": fingerprint(rt),
            **{f"state/{k}": v for k, v in self.host.export_weights(rt.id).items()},
        })
        sealed = bytes(self._box(peer).encrypt(plain))
        self.relay_sent[rt.id] = seq
        return {"sealed": sealed, "sender": self.host.name}

    @op("unseal", roles=ROLES, mutates=True, egress={"steps": SCALAR})
    def unseal(self, call: Call) -> dict[str, Any]:
        rt = call.rt
        assert rt is not None
        sender = self._trusted(rt, call.req.get("sender"))
        msg = self._open(sender, call.req.get("sealed"), "sealed weights")
        seen_key = f"{rt.id}<{sender}/{_text(msg.get('from_segment'), 'from_segment')}"
        expect = {"kind": "relay", "sender": sender, "recipient": self.host.name,
                  "to_segment": rt.id, "fingerprint": fingerprint(rt)}
        wrong = {k: msg.get(k) for k, v in expect.items() if msg.get(k) != v}
        if wrong:
            raise ProtocolError(f"sealed weights from {sender!r} are not for {rt.id}: "
                                f"{wrong} (expected {expect})")
        seq = msg.get("seq")
        last = self.relay_seen.get(seen_key, 0)
        if not isinstance(seq, int) or isinstance(seq, bool) or seq <= last:
            raise ProtocolError(f"sealed weights from {sender!r} carry sequence number {seq!r}; "
                                f"{rt.id} already loaded {last}: a replay is refused")
        state = self._check_loadable(rt, {k[6:]: v for k, v in msg.items()
                                          if k.startswith("state/")})
        self._load(rt, state)
        self.relay_seen[seen_key] = seq
        return {"steps": rt.steps}

    # --------------------------------------------------------- secure aggregation
    @op("secagg_round", roles=ROLES, mutates=True,
        egress={"round": SCALAR, "pending": SCALAR, "aggregated": SCALAR})
    def secagg_round(self, call: Call) -> dict[str, Any]:
        """The last round contributed to, the round in flight (0: none) and the last round
        loaded, so that a new model-owner process can finish an interrupted round."""
        assert call.rt is not None
        pending = self.pending.get(call.rt.id)
        return {"round": self.rounds.get(call.rt.id, 0),
                "pending": 0 if pending is None else int(pending["descriptor"]["round"]),
                "aggregated": self.aggregated.get(call.rt.id, 0)}

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
        """``HostLimits.min_cohort``: from 3 members, no single peer may read this data owner's
        weights out of the average (each weight at least a tenth of the largest)."""
        least = self.host.limits.min_cohort
        if len(members) < least:
            raise ProtocolError(f"{self.host.name} averages only in cohorts of at least {least} "
                                f"members (HostLimits.min_cohort), got {len(members)}")
        if least >= 3 and min(weights.values()) * 10 < max(weights.values()):
            raise ProtocolError(f"{self.host.name} needs every member's averaging weight to be "
                                "at least a tenth of the largest (HostLimits.min_cohort="
                                f"{least}: no single peer reads its weights), got "
                                f"{weights!r:.200}")

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

    @op("secagg_aggregate", roles=ROLES, mutates=True, egress={"round": SCALAR, "steps": SCALAR})
    def secagg_aggregate(self, call: Call) -> dict[str, Any]:
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
            msg = self._open(self._trusted(rt, peer), call.req[f"sealed/{peer}"],
                             f"contribution to round {rnd}")
            if (msg.get("kind"), msg.get("sender"), msg.get("recipient")) != (
                    "secagg", peer, me) or not isinstance(msg.get("descriptor"), dict) or (
                    secagg.canonical(msg["descriptor"]) != secagg.canonical(desc)):
                raise ProtocolError(f"the contribution of {peer!r} is not for round {rnd} of "
                                    f"{rt.id} as this data owner contributed to it")
            masked = msg.get("masked")
            if not isinstance(masked, bytes) or len(masked) != len(pending["own"]):
                raise ShapeError(f"the contribution of {peer!r} has the wrong size")
            parts.append(np.frombuffer(masked, dtype=np.uint64))
        average = secagg.decode(secagg.total(parts))
        state = rt.module.state_dict()
        keys = [k for k, v in state.items() if v.is_floating_point()]
        new = {**{k: v.clone() for k, v in state.items()},
               **secagg.unflatten(average, state, keys)}
        self._load(rt, self._check_loadable(rt, new))
        del self.pending[rt.id]
        self.aggregated[rt.id] = rnd
        self.done[rt.id] = {"descriptor": desc, "own": pending["own"]}
        return {"round": rnd, "steps": rt.steps}

    # ----------------------------------------------------------------- data-owner ops
    @owner_op("release_weights")
    def owner_release(self, segment: str) -> dict[str, Any]:
        rt = self.host.owned_runtime(segment)
        _releasable(rt)
        rt.extra["weights_released"] = True
        return {"segment": segment, "released": True}

    @owner_op("export_weights", mutates=False)
    def owner_export(self, segment: str) -> dict[str, Any]:
        return {f"state/{k}": v for k, v in self.host.export_weights(segment).items()}

    @owner_op("public_key")
    def owner_public_key(self) -> dict[str, Any]:
        return {"key": bytes(self.keypair().public_key)}

    @owner_op("trust_peer")
    def owner_trust_peer(self, name: str, key: bytes) -> dict[str, Any]:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a peer needs a name, got {name!r}")
        if name == self.host.name:
            raise ConfigError(f"{name!r} is this data owner itself")
        if not isinstance(key, bytes) or len(key) != 32:
            raise ConfigError(f"a public key is 32 bytes, got {key!r:.40}")
        self.peers[name] = key
        return {"trusted": name}
