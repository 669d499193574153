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
``secagg_*``           secure aggregation among peers (:mod:`.aggregation`)
=====================  =====================================================================

Data-owner ops: ``release_weights``, ``export_weights``, ``public_key``, ``trust_peer``.
"""

from __future__ import annotations

from typing import Any

from .. import wire
from ..errors import AccessError, CohortRefusedError, ConfigError, ProtocolError
from .aggregation import AggregationOps
from .dispatch import Host, op, owner_op, register_family
from .guard import SCALAR, SEALED, TEXT, WEIGHTS, Call
from .peers import _text, fingerprint
from .records import ROLES, Runtime

__all__ = ["WeightOps", "fingerprint"]


def _releasable(rt: Runtime) -> None:
    """Refuse releasing a segment that loads peers' weights: its weights are theirs too (with
    averaging weights of the model owner's choice, another member's exact weights)."""
    if rt.proposal.share_weights == "peer":
        raise ConfigError(f"{rt.id} shares weights with peer data owners: its weights hold "
                          "theirs (relayed or averaged), so they are never released to the "
                          "model owner")


@register_family
class WeightOps(AggregationOps):
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
        super().__init__(host)  # keys and peers (.peers), aggregation rounds (.aggregation)
        #: relay: last sequence number sealed by each of our segments
        self.relay_sent: dict[str, int] = {}
        #: relay: last sequence number loaded, per "our segment<peer/their segment"
        self.relay_seen: dict[str, int] = {}

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
            raise CohortRefusedError(f"{self.host.name} never relays its weights to a single "
                                     "peer (HostLimits.min_cohort="
                                     f"{self.host.limits.min_cohort}); they are only averaged")
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
