"""Segment weights: what the data owner releases, and how weights move between data owners.

Model-owner ops: ``export`` (the weights, only if the data owner released them or approved
``share_weights="model_owner"``), ``import`` (replace them; ``share_weights="model_owner"``),
``seal`` (the weights encrypted and authenticated for a peer data owner this one trusts;
the model owner relays ciphertext it cannot read) and ``unseal`` (load weights a trusted peer
sealed). Data-owner ops: ``release_weights``, ``export_weights``, ``public_key``, ``trust_peer``.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import wire
from ..errors import AccessError, ConfigError, ProtocolError, ShapeError, WireError
from .dispatch import OpFamily, op, owner_op, register_family
from .guard import SCALAR, SEALED, TEXT, WEIGHTS, Call
from .records import ROLES, Runtime

__all__ = ["WeightOps"]


@register_family
class WeightOps(OpFamily):
    """Weight export, import and peer sealing (see the module docstring)."""

    name = "weights"

    def __init__(self, host: Any) -> None:
        super().__init__(host)
        self._box_key: Any = None
        self.peers: dict[str, bytes] = {}

    def review_lines(self, proposal: Any) -> list[str]:
        if proposal.share_weights == "model_owner":
            return ["  WEIGHTS SHARED: the model owner may read and replace this segment's "
                    "weights (relay / SplitFed averaging)"]
        if proposal.share_weights == "peer":
            return ["  weights move only to/from peers you trust (trust_peer), encrypted; "
                    "the model owner relays ciphertext"]
        return []

    def keypair(self) -> Any:
        if self._box_key is None:
            from nacl.public import PrivateKey

            self._box_key = PrivateKey.generate()
        return self._box_key

    # --------------------------------------------------------------- model-owner ops
    @op("export", roles=ROLES, egress={"state/*": WEIGHTS})
    def export(self, call: Call) -> dict[str, Any]:
        rt = call.rt
        assert rt is not None
        if not rt.extra.get("weights_released") and rt.proposal.share_weights != "model_owner":
            raise AccessError(f"the data owner has not released the weights of {rt.id}")
        return {f"state/{k}": v for k, v in self.host.export_weights(rt.id).items()}

    def _new_state(self, rt: Runtime, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        own = rt.module.state_dict()
        if set(state) != set(own):
            raise ShapeError(f"weights {sorted(state)} do not match the segment's {sorted(own)}")
        for k, v in state.items():
            wire.check_tensor(v, f"weight {k}", shape=tuple(own[k].shape), dtype=own[k].dtype,
                              nonempty=False)
        if rt.pending_output is not None or rt.pending_loss_grads:
            raise ProtocolError(f"segment {rt.id} has a pending step; flush first")
        return state

    @op("import", roles=ROLES, mutates=True, egress={"steps": SCALAR})
    def import_(self, call: Call) -> dict[str, Any]:
        rt = call.rt
        assert rt is not None
        if rt.proposal.share_weights != "model_owner":
            raise AccessError(f"{rt.id} was not approved for weight sharing with the model owner")
        state = self._new_state(rt, {k[6:]: v for k, v in call.req.items()
                                     if k.startswith("state/")})
        rt.module.load_state_dict(state)
        return {"steps": rt.steps}

    def _peer(self, rt: Runtime, peer: Any) -> bytes:
        if rt.proposal.share_weights != "peer":
            raise AccessError(f"{rt.id} was not approved for peer weight sharing")
        if peer not in self.peers:
            raise AccessError(f"{peer!r} is not a peer {self.host.name} trusts; trusted: "
                              f"{sorted(self.peers)}")
        return self.peers[peer]

    @op("seal", roles=ROLES, egress={"sealed": SEALED, "sender": TEXT})
    def seal(self, call: Call) -> dict[str, Any]:
        from nacl.public import Box, PublicKey

        rt = call.rt
        assert rt is not None
        key = self._peer(rt, call.req.get("peer"))
        plain = wire.encode({f"state/{k}": v for k, v in self.host.export_weights(rt.id).items()})
        sealed = Box(self.keypair(), PublicKey(key)).encrypt(plain)
        return {"sealed": bytes(sealed), "sender": self.host.name}

    @op("unseal", roles=ROLES, mutates=True, egress={"steps": SCALAR})
    def unseal(self, call: Call) -> dict[str, Any]:
        from nacl.exceptions import CryptoError
        from nacl.public import Box, PublicKey

        rt = call.rt
        assert rt is not None
        sender = call.req.get("sender")
        key = self._peer(rt, sender)
        sealed = call.req.get("sealed")
        if not isinstance(sealed, bytes):
            raise WireError("field 'sealed' must be bytes")
        try:
            plain = Box(self.keypair(), PublicKey(key)).decrypt(sealed)
        except CryptoError as exc:
            raise WireError(f"weights sealed by {sender!r} do not authenticate: {exc}") from exc
        msg = wire.decode(plain, max_bytes=self.host.limits.max_request_bytes)
        state = self._new_state(rt, {k[6:]: v for k, v in msg.items() if k.startswith("state/")})
        rt.module.load_state_dict(state)
        return {"steps": rt.steps}

    # ----------------------------------------------------------------- data-owner ops
    @owner_op("release_weights")
    def owner_release(self, segment: str) -> dict[str, Any]:
        self.host.owned_runtime(segment).extra["weights_released"] = True
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
        if not isinstance(key, bytes) or len(key) != 32:
            raise ConfigError(f"a public key is 32 bytes, got {key!r:.40}")
        self.peers[name] = key
        return {"trusted": name}

    # --------------------------------------------------- persistence (host.store)
    def state(self) -> dict[str, Any]:
        """The sealing key (secret: the state directory is the data owner's) and the pinned
        peers' public keys."""
        key = None if self._box_key is None else bytes(self._box_key)
        return {"box_key": key, "peers": dict(self.peers)}

    def restore(self, state: Any) -> None:
        from nacl.public import PrivateKey

        if state.get("box_key") is not None:
            self._box_key = PrivateKey(bytes(state["box_key"]))
        self.peers = {str(k): bytes(v) for k, v in (state.get("peers") or {}).items()}
