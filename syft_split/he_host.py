"""The data owner's side of HE protection: ops of a segment approved with encryption.

At approval the data owner builds fresh CKKS keys for the run from the reviewed agreement (the
secret key never leaves); the ``forward`` op of such a segment releases only ciphertexts
(:mod:`syft_split.host.segments`). Ops: ``he_context`` (public context: no secret key, only the
needed Galois keys), ``he_output`` (masked decryption of the layer's output), ``he_grad``
(masked decryption of the weight gradient; the data owner backpropagates dL/dx and steps its
segment), ``he_costs`` (seconds and bytes so far). Imports :mod:`he_layers` (TenSEAL) only
when a segment with encryption is approved.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError, ProtocolError
from .host import Call, OpFamily, Runtime, op, register_family
from .host.guard import CIPHERTEXT, SCALAR
from .host.segments import apply_grad

__all__ = ["HEOps"]


def _msg(req: dict[str, Any]) -> bytes:
    msg = req.get("msg")
    if not isinstance(msg, bytes):
        raise ConfigError("field 'msg' must be bytes")
    return msg


def _client(rt: Runtime | None) -> Any:
    if rt is None or rt.he is None:
        raise ProtocolError("this segment was not approved with encryption")
    return rt.he


@register_family
class HEOps(OpFamily):
    """Encryption ops of the data owner (see the module docstring)."""

    name = "he"

    def review_lines(self, proposal: Any) -> list[str]:
        if proposal.he is None:
            return []
        return [f"  leaves per step: activations ONLY AS CKKS CIPHERTEXTS (level "
                f"{proposal.he.get('level')}; keys are made here at approval, the secret key "
                "never leaves) and masked decryptions",
                f"  encryption agreement: {proposal.he}"]

    def on_approve(self, rt: Runtime, options: dict[str, Any]) -> None:
        if rt.proposal.he is not None:  # fresh CKKS keys for this run
            rt.he = build_client(rt.proposal.he)

    @op("he_context", roles=("input",), egress={"context": CIPHERTEXT})
    def he_context(self, call: Call) -> dict[str, Any]:
        return {"context": _client(call.rt).keys.public_context_bytes()}

    @op("he_output", roles=("input",), egress={"msg": CIPHERTEXT})
    def he_output(self, call: Call) -> dict[str, Any]:
        return {"msg": _client(call.rt).decrypt_output(_msg(call.req))}

    @op("he_grad", roles=("input",), egress={"msg": CIPHERTEXT})
    def he_grad(self, call: Call) -> dict[str, Any]:
        rt = call.rt
        client = _client(rt)
        assert rt is not None
        if rt.pending_output is None:
            raise ProtocolError(f"gradient for {rt.id} without a pending forward")
        ret, dx = client.decrypt_gradients(_msg(call.req))
        grad = self.host.guard.grad_in(rt, dx.to(torch.float32).reshape(rt.pending_output.shape))
        apply_grad(rt, grad)
        return {"msg": ret}

    @op("he_costs", roles=("input",), egress={"*": SCALAR})
    def he_costs(self, call: Call) -> dict[str, Any]:
        return {k: float(v) for k, v in _client(call.rt).costs.as_dict().items()}

    # --------------------------------------------------- persistence (host.store)
    def restore(self, state: Any) -> None:
        """The CKKS secret keys of a run are never written to disk: after a restart an
        encrypted segment cannot decrypt its model owner's ciphertexts, so it is halted; the
        model owner proposes it again (fresh keys at the new approval)."""
        for p in self.host.proposals("approved"):
            if p.he is not None:
                self.host.halt(p.id, "the datasite restarted and encryption keys are not "
                                     "kept across restarts: propose this segment again")


def build_client(agreement: dict[str, Any]) -> Any:
    """Fresh keys for this run from the reviewed agreement (the secret key stays here)."""
    from he_layers import CKKSParams, HEClient, KeyOwner, LayerSpec

    try:
        spec = LayerSpec(batch_size=agreement["batch_size"], d_in=agreement["d_in"],
                         d_out=agreement["d_out"], level=agreement["level"],
                         lr=agreement["lr"], bias=agreement["bias"],
                         **agreement.get("options", {}))
        params = CKKSParams(**agreement.get("params", {}))
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"bad encryption agreement {agreement}: {exc}") from exc
    return HEClient(KeyOwner(spec, params))
