"""The model owner's handles on segments that run at a data owner, and autograd across parties.

:class:`RemoteSegment` speaks the host ops over a :class:`~syft_split.transport.base.Transport`.
Two ``torch.autograd.Function``\\ s stitch remote segments into the model owner's graph, so
``loss.backward()`` sends the cut-layer gradient to the data owner, which runs its own backward
and optimizer step there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .answers import MAX_ABS_VALUE, Answer
from .errors import ProtocolError, StateSaveError, SyftSplitError, TransportError
from .transport.base import Transport

__all__ = ["RemoteSegment", "ActivationPointer"]


class RemoteSegment:
    """A segment approved on ``party``'s host, identified by ``segment_id``.

    With ``fuse=True`` the gradient of a first ("input") segment is held back and sent with
    the next forward to that segment, and a loss segment's loss weight with its next
    ``loss_step`` (one call per step in steady state); call :meth:`flush` before reading
    results that depend on the data owner's weights.

    Exactly-once: every request that changes the segment carries the next step id
    (:attr:`next_step`). If its delivery is unknown (a timeout, a lost connection, a crash of
    either side) or the host applied it but could not save its state (StateSaveError), the
    request is kept (:attr:`unsettled`) and :meth:`settle` sends it again,
    under the same id, before anything else: the host answers from its record if it already
    applied it, and applies it otherwise. A held-back gradient thus lands exactly once, or the
    session raises (never drops it silently).

    Every answer is checked before it is used (:mod:`syft_split.answers`): tensors of the
    expected shape, float32, finite and at most ``max_abs_value`` in magnitude.
    """

    def __init__(self, transport: Transport, party: str, segment_id: str, role: str,
                 input_shape: tuple[int, ...], output_shape: tuple[int, ...], *,
                 fuse: bool = True, max_abs_value: float = MAX_ABS_VALUE) -> None:
        self.transport = transport
        self.party = party
        self.segment_id = segment_id
        self.role = role
        self.input_shape = input_shape
        self.output_shape = output_shape
        self.fuse = fuse and role in ("input", "loss")
        #: the bound on |value| of the tensors this segment's data owner answers with
        self.max_abs_value = max_abs_value
        self._held_grad: torch.Tensor | None = None
        self._held_scale: float | None = None
        self.last_labels: torch.Tensor | None = None
        self.last_metrics: dict[str, Any] = {}
        #: the id the next changing request carries (the host applies each id once)
        self.next_step = 1
        #: a gradient reached this segment through autograd since the last session step /
        #: zero_grad (the data owner steps on it): a second one would not accumulate
        self.awaiting_step = False
        self._inflight: dict[str, Any] | None = None

    def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        return self.transport.call(self.party, op, segment=self.segment_id, **fields)

    def _answer(self, op: str, response: dict[str, Any]) -> Answer:
        return Answer(self.party, op, response, bound=self.max_abs_value)

    # --------------------------------------------------------------- exactly-once
    @property
    def unsettled(self) -> dict[str, Any] | None:
        """The changing request whose delivery is unknown (op, step id), or None."""
        if self._inflight is None:
            return None
        return {"op": self._inflight["op"], "step": self._inflight["step"],
                "carries_gradient": "grad" in self._inflight["fields"]
                or "step_scale" in self._inflight["fields"]
                or "scale" in self._inflight["fields"]}

    def _mutate(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send a request that changes the segment, under the next step id."""
        self._prepare(op, fields)
        return self._send_inflight()

    def _prepare(self, op: str, fields: dict[str, Any]) -> None:
        """Fix the next changing request (``op``, ``fields``, the next step id) as the one in
        flight, not sent yet (it is in :meth:`state` from now on)."""
        try:
            self.settle()
        except BaseException:
            self._hold_again(fields)  # not sent: a gradient it carries is held again
            raise
        self._inflight = {"op": op, "fields": fields, "step": self.next_step}

    def _send_inflight(self) -> dict[str, Any]:
        inflight = self._inflight
        assert inflight is not None
        try:
            response = self._call(inflight["op"], step=inflight["step"], **inflight["fields"])
        except (TransportError, StateSaveError):
            # delivery unknown, or applied and recorded there but not yet saved: kept, and
            # sent again (same id) before the next changing request
            raise
        except SyftSplitError:
            self._inflight = None  # refused by the host: nothing applied, the id is unused
            self._hold_again(inflight["fields"])
            raise
        self._inflight = None
        self.next_step = inflight["step"] + 1
        return response

    def _hold_again(self, fields: dict[str, Any]) -> None:
        """A refused request's held-back gradient / loss weight is held again, not lost."""
        if not self.fuse:
            return
        if "grad" in fields and self._held_grad is None:
            self._held_grad = fields["grad"]
        for key in ("step_scale", "scale"):
            if key in fields and self._held_scale is None:
                self._held_scale = fields[key]

    def settle(self) -> bool:
        """Resolve a changing request whose delivery is unknown: send it again under its step
        id (applied now, or answered from the host's record if it was applied already); a
        forward or loss step it left pending is then discarded (its batch was abandoned).
        Returns True if there was one. Raises (and keeps it) if the party is still unreachable.
        """
        if self._inflight is None:
            return False
        op, fields = self._inflight["op"], self._inflight["fields"]
        self._send_inflight()
        if op in ("forward", "loss_step") and fields.get("train", True):
            self._inflight = {"op": "discard", "fields": {}, "step": self.next_step}
            self._send_inflight()
        return True

    def state(self) -> dict[str, Any]:
        """What the model owner must keep to re-attach to this segment (checkpoints)."""
        return {"party": self.party, "segment_id": self.segment_id, "role": self.role,
                "input_shape": list(self.input_shape), "output_shape": list(self.output_shape),
                "fuse": self.fuse, "next_step": self.next_step, "held_grad": self._held_grad,
                "held_scale": self._held_scale, "inflight": self._inflight}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state` (same segment)."""
        if state["segment_id"] != self.segment_id:
            raise ProtocolError(f"state of {state['segment_id']} loaded into {self.segment_id}")
        self.next_step = int(state["next_step"])
        self._held_grad = state.get("held_grad")
        scale = state.get("held_scale")
        self._held_scale = None if scale is None else float(scale)
        self._inflight = state.get("inflight")

    # ------------------------------------------------------------------------ ops
    def forward(self, *, indices: torch.Tensor | None = None, x: torch.Tensor | None = None,
                dataset: str | None = None, train: bool = True) -> torch.Tensor:
        """Run the segment remotely; return its activation (a plain tensor, no graph)."""
        fields: dict[str, Any] = {"train": train}
        if indices is not None:
            fields["indices"] = indices.to(torch.int64)
        if x is not None:
            fields["x"] = x.detach().to(torch.float32)
        if dataset is not None:
            fields["dataset"] = dataset
        if train:
            if self._held_grad is not None:  # travels inside the request from now on
                fields["grad"], self._held_grad = self._held_grad, None
            response = self._mutate("forward", **fields)
        else:
            response = self._call("forward", **fields)
        batch = int(indices.shape[0]) if indices is not None else int(x.shape[0])  # type: ignore[union-attr]
        act = self._answer("forward", response).tensor("activation", (batch, *self.output_shape))
        self.last_labels = response.get("labels")  # checked where the loss is known (session)
        return act

    def backward(self, grad: torch.Tensor) -> torch.Tensor | None:
        """Send the gradient w.r.t. the segment's output; return the gradient w.r.t. its input
        (middle segments) or ``None`` (first segments)."""
        grad = grad.detach().to(torch.float32).contiguous()
        if self.fuse:
            if self._held_grad is not None:
                raise ProtocolError(f"{self.segment_id}: a gradient is already held; "
                                    "flush() before a second backward")
            self._held_grad = grad
            return None
        response = self._mutate("backward", grad=grad)
        if self.role != "middle":
            return None
        return self._answer("backward", response).tensor(
            "grad_input", (int(grad.shape[0]), *self.input_shape))

    def flush(self) -> None:
        """Send a held-back gradient / loss weight now (end of epoch, before evaluation or
        export), after settling a request in flight: the data owner then has stepped."""
        self.settle()
        if self._held_grad is not None:
            grad, self._held_grad = self._held_grad, None
            self._mutate("backward", grad=grad)
        if self._held_scale is not None:
            scale, self._held_scale = self._held_scale, None
            self._mutate("backward", scale=scale)

    def discard(self) -> dict[str, bool]:
        """Forget the step on both sides (after a failed model-owner step). A request in
        flight is settled first (applied exactly once); returns what was dropped: the held
        gradient / loss weight (never sent) and the data owner's pending step."""
        self.settle()
        dropped = {"held_gradient": self._held_grad is not None,
                   "held_scale": self._held_scale is not None}
        self._held_grad = None
        self._held_scale = None
        dropped["pending"] = self._mutate("discard").get("discarded") is True
        return dropped

    def abandon(self) -> dict[str, bool]:
        """Drop the step under way after the model owner refused an answer of it (its
        data owner's, or another party's on the same batch): a gradient / loss weight held
        back from an *earlier* step (that step stands: the model owner stepped on it) is
        delivered first, unless this step's backward already reached the segment
        (``awaiting_step``: then what is held is this step's, and it is dropped); then the
        step pending at the data owner (the forward or loss step whose backward never comes)
        is discarded, so its next training request is taken. Returns what :meth:`discard`
        returns."""
        if not self.awaiting_step:
            self.flush()
        self.awaiting_step = False
        return self.discard()

    def loss_backward(self, scale: float) -> None:
        """The loss weight for the pending loss step: the data owner steps its segment with its
        gradients scaled by it (held back and sent with the next ``loss_step`` when fused)."""
        if self.fuse:
            if self._held_scale is not None:
                raise ProtocolError(f"{self.segment_id}: a loss weight is already held; "
                                    "flush() before a second backward")
            self._held_scale = scale
            return
        self._mutate("backward", scale=scale)

    def loss_step(self, x: torch.Tensor, indices: torch.Tensor, *, dataset: str | None = None,
                  train: bool = True) -> dict[str, Any]:
        """Last segment + loss at the data owner (U-shaped); returns loss_sum/correct/count
        and, in training, the gradient w.r.t. ``x`` (checked: :meth:`Answer.loss`)."""
        fields: dict[str, Any] = {"x": x.detach().to(torch.float32),
                                  "indices": indices.to(torch.int64), "train": train}
        if dataset is not None:
            fields["dataset"] = dataset
        if not train:
            response = self._call("loss_step", **fields)
        else:
            if self._held_scale is not None:
                fields["step_scale"], self._held_scale = self._held_scale, None
            response = self._mutate("loss_step", **fields)
        return self._answer("loss_step", response).loss(int(x.shape[0]), self.input_shape,
                                                        train=train)

    # ------------------------------------------------------------------- weights
    # The model owner never writes a data owner's weights: it may read them only if the data
    # owner released them, and it relays sealed weights between data owners it cannot read.
    def export(self) -> dict[str, torch.Tensor]:
        """The segment's weights, if the data owner released them (its own approval line)."""
        self.flush()
        response = self._call("export")
        return {k[6:]: v for k, v in response.items() if k.startswith("state/")}

    def seal_for(self, peer: str, to_segment: str) -> tuple[bytes, str]:
        """The weights sealed for segment ``to_segment`` of ``peer`` (a data owner this one
        trusts), with the next sequence number; returns (ciphertext, sender name)."""
        self.flush()
        response = self._call("seal", peer=peer, to_segment=to_segment)
        return response["sealed"], response["sender"]

    def unseal(self, sealed: bytes, sender: str, *,
               journal: Callable[[], None] | None = None) -> None:
        """Load weights ``sender`` sealed for this segment (once, in sequence order).

        ``journal()`` runs once the request is fixed (these bytes under the next step id, in
        :meth:`state`) and before it leaves: a checkpoint written then lets a new process send
        exactly this request again (:meth:`settle`). Sealing again would give other bytes (a
        new nonce and sequence number), which the data owner refuses under a step id it
        already applied. If ``journal`` raises, nothing is sent."""
        self.flush()
        self._prepare("unseal", {"sealed": sealed, "sender": sender})
        if journal is not None:
            try:
                journal()
            except BaseException:
                self._inflight = None  # not sent: the step id stays unused
                raise
        self._send_inflight()

    def secagg_round(self) -> int:
        """The last secure-aggregation round this segment contributed to (0: none)."""
        return self.secagg_status()["round"]

    def secagg_status(self) -> dict[str, int]:
        """``round`` (last contributed to), ``pending`` (in flight, 0: none) and ``aggregated``
        (last loaded) secure-aggregation rounds of this segment, and its data owner's
        ``min_cohort`` (``HostLimits``; 2 from a host that does not say)."""
        r = self._call("secagg_round")
        out = {k: int(r.get(k, 0)) for k in ("round", "pending", "aggregated")}
        return {**out, "min_cohort": int(r.get("min_cohort", 2))}

    def secagg_contribute(self, label: str, round: int, members: dict[str, str],
                          weights: dict[str, float]) -> dict[str, bytes]:
        """This segment's masked weights sealed for each other member (``members``: data owner
        -> its segment id; ``weights``: data owner -> averaging weight); by recipient."""
        self.flush()
        response = self._call("secagg_contribute", label=label, round=round, members=members,
                              weights=weights)
        return {k[7:]: v for k, v in response.items() if k.startswith("sealed/")}

    def secagg_aggregate(self, round: int, contributions: dict[str, bytes], *,
                         check: bool = False) -> None:
        """Hand over every other member's sealed contribution; the data owner checks each,
        sums them with its own and loads the average (``check``: only checks, loads nothing).
        A refusal because of one sender's contribution names it (the error's ``peer``)."""
        self._call("secagg_check" if check else "secagg_aggregate", round=round,
                   **{f"sealed/{sender}": sealed for sender, sealed in contributions.items()})


def _no_accumulation(seg: RemoteSegment, what: str) -> None:
    """Refuse a second training pass through ``seg`` before the step (see README)."""
    if seg.awaiting_step:
        raise ProtocolError(
            f"{what} reached {seg.party}'s segment {seg.segment_id}, which already received a "
            "gradient since the last session.step(): a data owner steps on every gradient it "
            "receives, so gradients do not accumulate across remote segments; call "
            "session.step() (or zero_grad()) after each backward")


class _RemoteForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, x: torch.Tensor | None, seg: RemoteSegment,
                indices: torch.Tensor | None, dataset: str | None) -> torch.Tensor:
        _no_accumulation(seg, "a training forward")
        ctx.seg = seg
        return seg.forward(indices=indices, x=x, dataset=dataset, train=True)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        _no_accumulation(ctx.seg, "a backward")
        grad_in = ctx.seg.backward(grads[0])
        ctx.seg.awaiting_step = True
        return None, grad_in, None, None, None


class _RemoteLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, seg: RemoteSegment, indices: torch.Tensor,
                dataset: str | None) -> torch.Tensor:
        _no_accumulation(seg, "a training loss step")
        response = seg.loss_step(x, indices, dataset=dataset, train=True)
        ctx.seg = seg
        ctx.grad_in = response["grad_input"]
        seg.last_metrics = response
        return torch.tensor(response["loss_sum"] / response["count"], dtype=torch.float32)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        _no_accumulation(ctx.seg, "a backward")
        ctx.seg.loss_backward(float(grads[0]))  # the task's loss weight: the data owner steps
        ctx.seg.awaiting_step = True
        return grads[0] * ctx.grad_in, None, None, None


class ActivationPointer:
    """A pointer to a cut-layer activation produced at a data owner.

    :meth:`resolve` (alias :meth:`get`) returns it as a tensor wired into the model owner's
    autograd graph: gradients that reach it are sent back to the data owner's segment.
    """

    def __init__(self, seg: RemoteSegment, indices: torch.Tensor | None,
                 x: torch.Tensor | None, dataset: str | None) -> None:
        self.party = seg.party
        self.segment_id = seg.segment_id
        self.shape = (int(indices.shape[0]) if indices is not None else int(x.shape[0]),  # type: ignore[union-attr]
                      *seg.output_shape)
        anchor = torch.zeros((), requires_grad=True)
        self._tensor: torch.Tensor = _RemoteForward.apply(anchor, x, seg, indices, dataset)

    def resolve(self) -> torch.Tensor:
        return self._tensor

    get = resolve

    def __repr__(self) -> str:
        return f"ActivationPointer(party={self.party!r}, segment={self.segment_id!r}, shape={self.shape})"


def remote_loss(x: torch.Tensor, seg: RemoteSegment, indices: torch.Tensor,
                dataset: str | None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Apply a remote label-holding segment; return (loss tensor wired to autograd, metrics)."""
    loss = _RemoteLoss.apply(x, seg, indices, dataset)
    return loss, dict(seg.last_metrics)
