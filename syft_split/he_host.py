"""The data owner's side of HE protection: ops of a segment approved with encryption.

At approval the data owner builds fresh CKKS keys for the run from the reviewed agreement (the
secret key never leaves); the ``forward`` op of such a segment releases only ciphertexts
(:mod:`syft_split.host.segments`). Ops: ``he_context`` (public context: no secret key, only the
needed Galois keys), ``he_output`` (masked decryption of the layer's output), ``he_grad``
(masked decryption of the weight gradient; the data owner backpropagates dL/dx and steps its
segment), ``he_costs`` (seconds and bytes so far, kept across restarts). After a restart an
encrypted segment continues with fresh keys (:meth:`HEOps.restore`). Imports :mod:`he_layers`
(TenSEAL) only when a segment with encryption is approved.

Levels A and B protect the data owner only against a *semi-honest* model owner: one that
deviates can send any ciphertext back for decryption (SECURITY.md). What this module enforces
regardless, through :class:`StepGate`: at most one ``he_output`` decryption per encrypted
forward and one ``he_grad`` per training step, in that order, bound to the current step (a
second, early, stale or discarded decryption is refused with :class:`ProtocolError`, state
intact; an evaluation forward between a training forward and its backward has its own output
budget); and the plaintext ``dL/dx`` passes the same guard as the plain path. A refused
``dL/dx``, or a gradient that cannot be applied (e.g. non-finite weight gradients), halts the
segment: its weights are untouched, but the decryption has happened (level B has moved its
share), so the step cannot be retried.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError, ProtocolError, ShapeError, ValidationError, WireError
from .host import Call, OpFamily, Runtime, op, register_family
from .host.guard import CIPHERTEXT, SCALAR
from .host.segments import apply_grad

__all__ = ["HEOps", "StepGate", "build_client"]


def _msg(req: dict[str, Any]) -> bytes:
    msg = req.get("msg")
    if not isinstance(msg, bytes):
        raise WireError(f"field 'msg' must be bytes, got {type(msg).__name__}")
    return msg


#: what a non-default security option of an agreement changes (said in the review)
_OPTION_RISK = {
    "share_bound": "level B hides the weight gradient dW = x^T delta from the model owner with "
                   "your share A, uniform in +-share_bound; a small bound (relative to lr * dW) "
                   "hides little: the model owner then learns dW, which reveals x",
    "flood_bits": "decryptions returned to the model owner carry noise of 2^-flood_bits; more "
                  "bits (relative to the encoding scale) hide less of the CKKS noise, which "
                  "depends on your secret key",
}


class StepGate:
    """The data owner's HE client with a decryption budget per step (see the module docstring).

    ``segments.forward`` starts a step through :meth:`encrypt_input`; :meth:`decrypt_output`
    and :meth:`decrypt_gradients` each run at most once per step, output first, gradients only
    after a training forward. An evaluation forward may run between a training forward and its
    backward: it has its own output budget and leaves the training step's as it is. Every other
    attribute is the wrapped client's. The counters are plain attributes: ``step`` (forwards
    started), ``train`` (a training step is in flight), its ``outputs`` and ``grads``
    decrypted, and ``eval_step`` (the client's id of an evaluation forward whose output is
    still to decrypt, 0: none). :meth:`cancel` (a discarded step) closes every budget."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.step = 0
        self.train = False
        self.train_step = 0  # the client's id of the training forward in flight
        self.outputs = 0
        self.grads = 0
        self.eval_step = 0

    def __getattr__(self, name: str) -> Any:  # keys, costs, weight_share, ...
        if name == "client":
            raise AttributeError(name)
        return getattr(self.client, name)

    def encrypt_input(self, x: torch.Tensor, *, need_grad: bool = True) -> bytes:
        msg: bytes = self.client.encrypt_input(x, need_grad=need_grad)  # refused: no change
        self.step += 1
        if need_grad:
            self.train, self.train_step, self.outputs, self.grads = True, self.client.step, 0, 0
        else:
            self.eval_step = self.client.step
        return msg

    def cancel(self) -> None:
        """The steps in flight were discarded: nothing of theirs is decrypted any more."""
        self.client.cancel()
        self.train, self.train_step, self.outputs, self.grads, self.eval_step = (False, 0, 0,
                                                                                0, 0)

    def _where(self) -> str:
        return f"encrypted step {self.step}"

    def decrypt_output(self, msg: bytes) -> bytes:
        from he_layers.wire import frame_header

        if not self.train and not self.eval_step:  # before reading anything of the message
            raise ProtocolError("output decryption without an encrypted forward in flight")
        step = frame_header(msg, "masked_output").get("step")
        if self.eval_step and step == self.eval_step:  # the evaluation forward's one output
            out: bytes = self.client.decrypt_output(msg)
            self.eval_step = 0
            return out
        if not self.train:
            raise ProtocolError("output decryption without an encrypted forward in flight")
        if step != self.train_step:
            raise ProtocolError(f"output decryption for step {step!r}: not the encrypted "
                                f"forward in flight (refused)")
        if self.outputs:
            raise ProtocolError(f"{self._where()}: its output was already decrypted once; a "
                                "second decryption is refused (one per forward)")
        out = self.client.decrypt_output(msg)
        self.outputs += 1
        return out

    def decrypt_gradients(self, msg: bytes) -> tuple[bytes, torch.Tensor]:
        if not self.train:
            raise ProtocolError("gradient decryption without an encrypted training forward")
        if not self.outputs:
            raise ProtocolError(f"{self._where()}: gradient decryption before the output's "
                                "(out of order)")
        if self.grads:
            raise ProtocolError(f"{self._where()}: its gradients were already decrypted once; a "
                                "second decryption is refused (one per step)")
        ret, dx = self.client.decrypt_gradients(msg)  # a refused message returns nothing
        self.grads += 1
        return ret, dx


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
        lines = [f"  leaves per step: activations ONLY AS CKKS CIPHERTEXTS (level "
                 f"{proposal.he.get('level')}; keys are made here at approval, the secret key "
                 "never leaves) and masked decryptions",
                 f"  encryption agreement: {proposal.he}",
                 "  HE PROTECTS YOU ONLY AGAINST A SEMI-HONEST MODEL OWNER (one that follows the "
                 "protocol): a model owner that deviates can send other ciphertexts for you to "
                 "decrypt, recover this run's secret key from a few of your answers (4 for a "
                 "32 x 128 -> 64 layer) and then read every ciphertext you sent: your "
                 "activations and, at level B, your weight share, as in plain split learning. "
                 "Your defences (noise, NoPeek, leakage watch) apply as without HE. "
                 "Enforced here: one output and one gradient decryption per step, in order; "
                 "dL/dx checked like the plain path. See SECURITY.md"]
        from he_layers import estimate_step_bytes

        try:
            b = estimate_step_bytes(proposal.he)
        except ConfigError as exc:
            return [*lines, f"  WARNING: the encryption agreement is not valid: {exc}"]
        from he_layers import CKKSParams, LayerSpec
        from he_layers.review import spec_from_agreement

        spec, params = spec_from_agreement(proposal.he)
        default_margin = CKKSParams.global_scale_bits - LayerSpec.flood_bits
        weaker = {"share_bound": spec.level == "B" and spec.share_bound < LayerSpec.share_bound,
                  "flood_bits": params.global_scale_bits - spec.flood_bits < default_margin}
        for name, weak in weaker.items():
            if weak:
                lines.append(f"  WARNING: security option {name}={getattr(spec, name)!r} is "
                             "weaker than the default: " + _OPTION_RISK[name])
        if spec.level == "B" and spec.lr is not None:
            lines.append(f"  level B masks the weight gradient the model owner receives within "
                         f"+-{2 * spec.share_bound / spec.lr:.3g} (2 share_bound / lr, lr="
                         f"{spec.lr:g}): a gradient much larger than that is poorly hidden")
        if spec.x_bound < LayerSpec.x_bound:
            lines.append(f"  WARNING: x_bound={spec.x_bound:g} is below the default "
                         f"{LayerSpec.x_bound:g}: a forward with an activation above it is "
                         "refused, and the refusal tells the model owner that one was")
        lines.append(f"  bytes leaving per training step: {b['bytes_up']} (of which "
                     f"{b['ciphertext_bytes_up']} ciphertext, {b['plain_bytes_up']} masked values), "
                     f"{b['bytes_up_eval']} per evaluation step; once per run: the public context "
                     f"{b['public_context_bytes']} bytes (plain split learning would send "
                     f"{b['plain_split_bytes_up']} bytes per step)")
        return lines

    def on_approve(self, rt: Runtime, options: dict[str, Any]) -> None:
        if rt.proposal.he is not None:  # fresh CKKS keys for this run
            rt.he = StepGate(build_client(rt.proposal.he))

    @op("he_context", roles=("input",), egress={"context": CIPHERTEXT})
    def he_context(self, call: Call) -> dict[str, Any]:
        return {"context": _client(call.rt).keys.public_context_bytes()}

    @op("he_output", roles=("input",), egress={"msg": CIPHERTEXT})
    def he_output(self, call: Call) -> dict[str, Any]:
        return {"msg": _client(call.rt).decrypt_output(_msg(call.req))}

    @op("he_grad", roles=("input",), mutates=True, egress={"msg": CIPHERTEXT})
    def he_grad(self, call: Call) -> dict[str, Any]:
        rt = call.rt
        client = _client(rt)
        assert rt is not None
        if rt.pending_output is None:
            raise ProtocolError(f"gradient for {rt.id} without a pending forward")
        ret, dx = client.decrypt_gradients(_msg(call.req))
        shape = rt.pending_output.shape
        try:
            if dx.numel() != shape.numel():
                raise ShapeError(f"dL/dx: expected {tuple(shape)}, got {tuple(dx.shape)}")
            grad = self.host.guard.grad_in(rt, dx.to(torch.float32).reshape(shape), "dL/dx")
        except ValidationError as exc:  # decrypted already: this step cannot be retried
            self.host.halt(rt.id, f"the model owner's encrypted gradient gave an invalid "
                                  f"dL/dx ({exc}); halted, nothing applied")
            raise
        try:
            apply_grad(rt, grad)
        except Exception as exc:  # e.g. non-finite weight gradients: decrypted already too
            self.host.halt(rt.id, f"the model owner's encrypted gradient could not be applied "
                                  f"({type(exc).__name__}: {exc}); halted, nothing applied")
            raise
        self.host.stepped(rt, grad)
        return {"msg": ret}

    @op("he_costs", roles=("input",), egress={"*": SCALAR})
    def he_costs(self, call: Call) -> dict[str, Any]:
        return {k: float(v) for k, v in _client(call.rt).costs.as_dict().items()}

    # --------------------------------------------------- persistence (host.store)
    def restore(self, state: Any) -> None:
        """The CKKS secret keys of a run are never written to disk. After a restart an
        encrypted segment gets *fresh* keys (its weights, steps and, at level B, its weight
        share come back from the state directory); the model owner sees a new public context
        in the next encrypted input and fetches it (a step cut by the restart is run again from
        its forward). A level-B segment whose share is not on disk is halted, and so is one
        whose saved encryption state cannot be loaded (whatever the error: the others are
        restored)."""
        for p in self.host.proposals("approved"):
            if p.he is None:
                continue
            rt = self.host.owned_runtime(p.id)
            saved, rt.he_saved = rt.he_saved, None
            if saved is not None and not isinstance(saved, dict):
                self.host.halt(p.id, f"the datasite restarted and this segment's saved "
                                     f"encryption state is not readable (a "
                                     f"{type(saved).__name__}): propose this segment again")
                continue
            if p.he.get("level") == "B" and "share" not in (saved or {}):
                self.host.halt(p.id, "the datasite restarted and this segment's level-B weight "
                                     "share is not on disk: propose this segment again")
                continue
            try:
                client = StepGate(build_client(p.he))
                if saved:
                    client.load_state(saved)
            except Exception as exc:  # this segment only
                self.host.halt(p.id, f"the datasite restarted and this segment's encryption "
                                     f"could not be rebuilt ({type(exc).__name__}: {exc}): "
                                     "propose this segment again")
                continue
            rt.he = client


def build_client(agreement: dict[str, Any]) -> Any:
    """Fresh keys for this run from the reviewed agreement (the secret key stays here)."""
    from he_layers import HEClient, KeyOwner

    from .he import agreed_layer

    spec, params = agreed_layer(agreement)
    return HEClient(KeyOwner(spec, params))
