"""Peer data owners: this data owner's key pair, the peers it trusts, and how weights from
them are opened and loaded (the base of :class:`~syft_split.host.weights.WeightOps`).

Weights come in only from a peer whose public key this data owner pinned (``trust_peer``),
sealed and authenticated with PyNaCl's ``Box`` (X25519 + XSalsa20-Poly1305), and are checked
(keys, shapes, dtypes, finite, within ``HostLimits.max_abs_value``) and measured by every
family (the leakage watch) before they stay.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from .. import secagg, wire
from ..errors import AccessError, LeakageHaltError, ProtocolError, WireError
from .admission import check_weights
from .dispatch import Host, OpFamily
from .records import Runtime

__all__ = ["PeerFamily", "fingerprint"]

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


class PeerFamily(OpFamily):
    """Keys, trusted peers and checked loading, shared by relay and secure aggregation."""

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self.secret_key: bytes | None = None
        self.peers: dict[str, bytes] = {}

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
