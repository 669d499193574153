"""The model owner's side of an HE-protected plan: :class:`HEState` runs the encrypted layer's
protocol with each data owner (see :mod:`syft_split.he` for the plan, ``he_layers/README.md``
for the protocol) and hooks it into autograd (:func:`encrypted_forward`).

Durability: every gradient message carries the segment's step id, so the data owner applies
it once. A data owner that restarts comes back with fresh keys (and, at level B, its share):
the next encrypted input names a new public context, which this side fetches, and a step the
restart cut is run again from its forward. A model owner that checkpoints
(``Trainer.fit(checkpoint_dir=...)``) keeps a *journal* of the step in flight before
its gradient message leaves (the message and its request digest, the masks needed to read the
answer, z and the records): a new process that finds the data owner applied that very request
(its record of the step: op and digest) takes the answer from the data owner's record instead
of running the step again; a journal whose request was not applied is removed.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast
from urllib.parse import quote

import torch

from . import persist, wire
from .errors import HEError, ProtocolError, StateSaveError, TransportError
from .he import EncryptedLayer, agreed_layer

if TYPE_CHECKING:
    from .remote import RemoteSegment
    from .spec import OptimizerSpec
    from .topology import SplitPlan
    from .transport.base import Transport

__all__ = ["HEState", "encrypted_forward"]


class _Session(Protocol):
    """What the encrypted layer needs of the model owner's session."""

    plan: SplitPlan
    optimizer_spec: OptimizerSpec
    transport: Transport

    def _seg(self, source: str, i: int) -> RemoteSegment: ...


class HEState:
    """The model owner's encrypted layer: one HEServer per data owner (each has its own keys),
    kept on one set of weights.

    Level A: before every forward the servers load the current parameters of
    ``enc.module`` (trained by the segment's optimizer), and every backward accumulates
    dW and db into their ``.grad``. Level B: the servers' shares follow the agreed SGD.

    Each gradient message carries the segment's next step id, so the data owner applies it
    once: a message sent again after a lost answer (even across a restart) is answered from the
    data owner's record. A data owner that restarts comes back with fresh keys (level B: and
    its share): an encrypted input bound to another public context makes this side fetch the
    new one (``rekeys``), and a step the restart cut before its gradient was applied is run
    again from its forward (same records, same weights), under the same step id. An encrypted
    forward whose call failed (a restart, a lost answer) is run again once, after a training
    forward it left pending there is discarded. An evaluation forward may run between a
    training forward and its backward.
    """

    def __init__(self, session: _Session, enc: EncryptedLayer) -> None:
        self.session = session
        self.enc = enc
        self.servers: dict[str, Any] = {}
        self.round_trips: dict[str, int] = {}
        self.rekeys: dict[str, int] = {}
        #: where a model owner that checkpoints keeps the step in flight (``Trainer.fit``)
        self.journal: Path | None = None
        self._last: dict[str, tuple[torch.Tensor, str | None]] = {}  # last training forward
        self._z: dict[str, torch.Tensor] = {}  # and its output
        self._taken: dict[str, dict[str, Any]] = {}  # steps an earlier process left applied
        self._settled: set[str] = set()  # sources this process has settled (journal)
        self._journaled: dict[str, int] = {}  # the step of each source's journal on disk
        self._velocity: dict[str, Any] = {}  # level B: from a checkpoint, for the next server
        bias = getattr(enc.module, "bias", None)
        self.weight = cast(torch.Tensor, enc.module.weight).detach().clone().double()
        self.bias = None if bias is None else bias.detach().clone().double()
        self.optimizer_replaced = self._check_optimizer()

    def _check_optimizer(self) -> bool:
        """Level B: warn when the segment's optimizer is not the agreed SGD."""
        if self.enc.level != "B":
            return False
        node_opt = self.session.plan.nodes[self.enc.node].optimizer
        spec = node_opt if node_opt is not None else self.session.optimizer_spec
        agreed = self.enc.optimizer
        same = spec.name == "sgd" and all(
            math.isclose(float(cast(float, spec.hyper.get(k, 0.0))), float(agreed[k]))
            for k in ("lr", "momentum", "weight_decay")) and not spec.hyper.get("nesterov")
        if not same:
            warnings.warn(
                f"level B: the encrypted layer trains with SGD(lr={agreed['lr']}, momentum="
                f"{agreed['momentum']}, weight_decay={agreed['weight_decay']}), not with this "
                f"segment's optimizer {spec.to_json()}", UserWarning, stacklevel=3)
        return not same

    def _call(self, source: str, op: str, **fields: Any) -> dict[str, Any]:
        seg = self.session._seg(source, 0)
        self.round_trips[source] = self.round_trips.get(source, 0) + 1
        out: dict[str, Any] = self.session.transport.call(seg.party, op, segment=seg.segment_id,
                                                          **fields)
        return out

    def _connect(self, source: str) -> bool:
        """(Re)build ``source``'s server on the public context its data owner holds now;
        True if that context is new (first use, or fresh keys after a restart)."""
        from he_layers import HEServer, ServerContext

        raw = self._call(source, "he_context")["context"]
        ctx = ServerContext.from_bytes(raw)  # refuses a context holding a secret key
        self._check_agreed(source, ctx)
        old = self.servers.get(source)
        if old is not None and old.context.context_id == ctx.context_id:
            return False
        server = self.servers[source] = HEServer(ctx, self.weight, self.bias)
        # level B's velocity goes on: from the old server (fresh keys) or from a checkpoint
        server.load_velocity(old.velocity_state() if old is not None
                             else self._velocity.pop(source, None))
        if old is not None:  # and the cost meter of the run
            self.rekeys[source] = self.rekeys.get(source, 0) + 1
            server.costs = old.costs
        return True

    def _check_agreed(self, source: str, ctx: Any) -> None:
        """Refuse a public context whose layer spec or CKKS parameters are not the agreement
        this model owner proposed: the data owner builds its keys, and so the masks the model
        owner adds, from what its context says (``mask_bits=0`` let it read W)."""
        spec, params = agreed_layer(self.enc.agreement())
        got = json.loads(json.dumps({"spec": ctx.spec.to_dict(), "params": ctx.params.to_dict()}))
        want = json.loads(json.dumps({"spec": spec.to_dict(), "params": params.to_dict()}))
        diff = {f"{part}.{k}": (got[part].get(k), v) for part in want
                for k, v in want[part].items() if got[part].get(k) != v}
        diff.update({f"{part}.{k}": (v, None) for part in got for k, v in got[part].items()
                     if k not in want[part]})
        if diff:
            raise HEError(f"{source}'s public context is not the encryption agreement this "
                          "model owner proposed (field: (context, agreed)): "
                          f"{dict(sorted(diff.items()))!r:.600}; refused, nothing was sent")

    def state(self) -> dict[str, Any]:
        """What a model-owner checkpoint keeps of the encrypted layer: at level B the share
        W_s, its bias and each server's SGD velocity (level A: the segment holds W)."""
        if self.enc.level == "A":
            return {}
        velocity = {s: server.velocity_state() for s, server in self.servers.items()}
        velocity.update({s: v for s, v in self._velocity.items() if s not in velocity})
        return {"weight": self.weight, "bias": self.bias, "velocity": velocity}

    def load_state(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`state` returned (before the first step of a new process, or of
        this one resuming from its checkpoint: each data owner is settled again at its next
        use, see :meth:`_settle`)."""
        self._settled.clear()
        self._taken.clear()
        if not state:
            return
        self.weight = state["weight"].double()
        self.bias = None if state.get("bias") is None else state["bias"].double()
        self._velocity = dict(state.get("velocity") or {})

    def _journal_path(self, source: str) -> Path:
        assert self.journal is not None
        return self.journal / f"he_step_{quote(source, safe='')}.sspl"

    def _settle(self, source: str) -> None:
        """Before the first use of ``source`` by a model owner that checkpoints (again after a
        checkpoint is loaded, or a gradient message's fate was left unknown). The data owner
        may have applied steps after the segment's next step id (e.g. an earlier process died
        before its next checkpoint): if the last one is the very gradient request the journal
        holds (op and request digest), its answer is taken from the data owner's record;
        steps that discarded a forward are passed over. A journal not taken is stale (its step
        completed, or its request was never applied) and is removed, then a forward left
        pending there is discarded.

        Raises:
            ProtocolError: the data owner applied a gradient message after the checkpoint that
                the journal does not hold (or no longer remembers that step): it cannot be
                accounted for without applying a step twice. Nothing changed.
            TransportError: settled at the next use of ``source``.
        """
        seg = self.session._seg(source, 0)
        seg.settle()  # a request of the checkpoint whose delivery was unknown, first
        info = self._call(source, "status")
        last, nxt = int(info["last_step"]), seg.next_step
        recent = {int(r[0]): (str(r[1]), str(r[2])) for r in info.get("recent") or []}
        path = self._journal_path(source)
        j = persist.load(path) if path.exists() else None
        if (j is not None and nxt <= int(j["step"]) == last
                and recent.get(last) == ("he_grad", j.get("digest"))):
            self._passed(source, recent, nxt, last)
            seg.next_step = last
            self._taken[source] = j
            self._journaled[source] = last
            return
        self._passed(source, recent, nxt, last + 1)
        if j is not None:
            path.unlink()
        self._journaled.pop(source, None)
        seg.next_step = max(nxt, last + 1)
        if info.get("pending"):
            seg.discard()

    @staticmethod
    def _passed(source: str, recent: dict[int, tuple[str, str]], lo: int, hi: int) -> None:
        """Steps ``lo``..``hi - 1`` an earlier process had the data owner apply after the
        checkpoint may be passed over: none of them applied a gradient message."""
        for step in range(lo, hi):
            op = recent.get(step, ("", ""))[0]
            if op in ("", "he_grad"):
                what = "a gradient message the journal does not hold" if op else (
                    "a request it no longer remembers")
                raise ProtocolError(
                    f"{source}: step {step} was applied at the data owner after the checkpoint "
                    f"as {what}: the run cannot resume exactly from this checkpoint")

    def server(self, source: str) -> Any:
        if source not in self.servers:
            self._connect(source)
        if self.journal is not None and source not in self._settled:
            self._settle(source)  # if it raises, it runs again at the next use
            self._settled.add(source)
        server = self.servers[source]
        if self.enc.level == "A":
            module = self.enc.module
            bias = getattr(module, "bias", None)
            server.set_parameters(weight=cast(torch.Tensor, module.weight).detach(),
                                  bias=None if bias is None else bias.detach())
        return server

    def forward(self, source: str, indices: torch.Tensor, dataset: str | None,
                train: bool, *, again: bool = True) -> torch.Tensor:
        server = self.server(source)
        taken = self._taken.get(source) if train else None
        if taken is not None and not torch.equal(taken["indices"], indices.to(torch.int64)):
            self._close(source, taken)  # that batch was skipped here
            taken = None
        if taken is not None:  # applied there: its answer is in the data owner's record
            server.expect_gradients(taken["pending"])
            self._last[source], self._z[source] = (indices, dataset), taken["z"]
            return cast(torch.Tensor, taken["z"])
        fields: dict[str, Any] = {"indices": indices.to(torch.int64), "train": train}
        if dataset is not None:
            fields["dataset"] = dataset
        try:
            msg = self._call(source, "forward", **fields)["he_input"]
            if not server.is_current(msg) and self._connect(source):  # restarted: fresh keys
                server = self.server(source)
            back = self._call(source, "he_output", msg=server.forward(msg))["msg"]
        except (ProtocolError, HEError, TransportError):
            if not again or not self._cut(source, train):
                raise
            return self.forward(source, indices, dataset, train, again=False)
        z = cast(torch.Tensor, server.receive_output(back)).to(torch.float32)
        if train:
            self._last[source], self._z[source] = (indices, dataset), z
        return z

    def _close(self, source: str, taken: dict[str, Any]) -> None:
        """The step the journal holds ran on other records than the batch this process trains
        now (the trainer skipped that batch, e.g. its data owner was unreachable when this
        process settled): the data owner applied it, so its answer is taken from the record
        and, at level B, applied to the share W_s (W_s + A must follow the data owner's share,
        which moved with it); at level A that batch's gradient is dropped with the batch."""
        warnings.warn(f"{source}: the encrypted step {int(taken['step'])} the journal holds was "
                      "applied by the data owner but its batch was skipped here; its answer is "
                      "taken from the data owner's record" + (
                          " and applied to the encrypted layer" if self.enc.level == "B"
                          else ", its gradient dropped"), UserWarning, stacklevel=4)
        server = self.servers[source]
        server.expect_gradients(taken["pending"])
        step = int(taken["step"])
        back = cast(bytes, self._call(source, "he_grad", msg=taken["msg"], step=step)["msg"])
        self._taken.pop(source, None)
        self.session._seg(source, 0).next_step = step + 1
        server.receive_gradients(back)
        if self.enc.level == "B":
            server.apply_sgd()
            self.weight, self.bias = server.weight, server.bias

    def _cut(self, source: str, train: bool) -> bool:
        """After an encrypted forward failed: whether a restart or a lost answer cut it (then
        the data owner is ready for it again: the new public context fetched, a training
        forward left pending there discarded; an evaluation forward leaves a training step
        pending there as it is). Both calls are safe to repeat, so they wait out a restart."""
        fresh = self._connect(source)
        if train and self._call(source, "status").get("pending"):
            self.session._seg(source, 0).discard()
            return True
        return fresh

    def _send_grad(self, source: str, delta: torch.Tensor, step: int) -> bytes:
        """Send this step's gradient message under ``step``, journaled first if this model
        owner checkpoints. A journal of ``step`` whose request the data owner applied (its
        answer was lost) is never overwritten: ProtocolError (a new process resuming from the
        checkpoint takes that answer)."""
        seg = self.session._seg(source, 0)
        if (self.journal is not None and self._journaled.get(source) == step
                and int(self._call(source, "status")["last_step"]) >= step):
            raise ProtocolError(
                f"{source}: step {step} was applied at the data owner as the gradient message "
                f"kept in {self._journal_path(source)}, whose answer was lost; it is kept: "
                "resume from the checkpoint (fit(resume=True)), which takes that answer")
        msg = self.servers[source].backward(delta.detach().double())
        if self.journal is not None:  # before it leaves: a new process may need its answer
            # the digest of the very request the transport sends (Transport.call encodes
            # {"op": op, **fields}): the data owner's record of the step names it
            digest = hashlib.sha256(wire.encode({"op": "he_grad", "segment": seg.segment_id,
                                                 "msg": msg, "step": step})).hexdigest()
            self.journal.mkdir(parents=True, exist_ok=True)
            persist.save(self._journal_path(source), {
                "step": step, "msg": msg, "digest": digest,
                "pending": self.servers[source].grad_state(), "z": self._z[source],
                "indices": self._last[source][0].to(torch.int64)})
            self._journaled[source] = step
        return cast(bytes, self._call(source, "he_grad", msg=msg, step=step)["msg"])

    def _grad(self, source: str, delta: torch.Tensor) -> bytes:
        """The data owner's answer to this step's gradient message (under the segment's next
        step id); if a restart cut the step before the gradient was applied, the step again
        from its forward with the new keys."""
        seg = self.session._seg(source, 0)
        step = seg.next_step
        taken = self._taken.get(source)
        try:
            if taken is not None:  # the very message an earlier process sent: from the record
                back = cast(bytes, self._call(source, "he_grad", msg=taken["msg"],
                                              step=step)["msg"])
                del self._taken[source]
            else:
                try:
                    back = self._send_grad(source, delta, step)
                except (ProtocolError, HEError):
                    if (not self._connect(source)
                            or int(self._call(source, "status")["last_step"]) >= step):
                        raise  # not a restart, or applied already as another message: no redo
                    self.forward(source, *self._last[source], train=True, again=False)
                    back = self._send_grad(source, delta, step)
        except (TransportError, StateSaveError):
            # applied there or not (or applied and recorded, not yet saved): the journal
            # settles it at the next use
            self._settled.discard(source)
            raise
        seg.next_step = step + 1
        return back

    def backward(self, source: str, delta: torch.Tensor) -> None:
        back = self._grad(source, delta)
        server = self.servers[source]
        gw, gb = server.receive_gradients(back)
        if self.enc.level == "A":
            module = self.enc.module
            for param, grad in ((module.weight, gw), (getattr(module, "bias", None), gb)):
                if param is None or grad is None:
                    continue
                p = cast(torch.Tensor, param)
                g = grad.to(p.dtype).reshape(p.shape)
                p.grad = g if p.grad is None else p.grad + g
        else:
            server.apply_sgd()
        self.weight, self.bias = server.weight, server.bias

    def costs(self) -> dict[str, float]:
        """HE cost of the run per data owner (totals and ``last_`` step): seconds in
        encryption, (de)serialization, model-owner compute and decryption; ciphertext bytes
        and messages each way; round trips; key switches (rotations) beside the minimum the
        packing needs, multiplications, encodings, rescales."""
        out: dict[str, float] = {}
        for source, server in self.servers.items():
            client = self._call(source, "he_costs")
            for k, v in client.items():
                out[f"{source}.{k}"] = float(v)
            for k, v in server.costs.as_dict().items():
                out[f"model_owner.{source}.{k}"] = float(v)
            out[f"model_owner.{source}.round_trips"] = float(self.round_trips.get(source, 0))
            out[f"model_owner.{source}.rekeys"] = float(self.rekeys.get(source, 0))
        out["optimizer_replaced"] = float(self.optimizer_replaced)
        return out


class _HEBoundary(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, state: HEState, source: str,
                indices: torch.Tensor, dataset: str | None) -> torch.Tensor:
        ctx.state, ctx.source = state, source
        return state.forward(source, indices, dataset, train=True)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        ctx.state.backward(ctx.source, grads[0])
        return None, None, None, None, None


def encrypted_forward(state: HEState, source: str, indices: torch.Tensor,
                      dataset: str | None) -> torch.Tensor:
    """z = x W + b for ``source``'s records, wired to autograd (backward runs the protocol)."""
    anchor = torch.zeros((), requires_grad=True)
    out: torch.Tensor = _HEBoundary.apply(anchor, state, source, indices, dataset)
    return out
