"""Segment steps: forward, backward, the loss at the data owner (U-shaped), discard.

================  ==========================================================================
``forward``       run an approved input/middle segment on record indices (input) or on an
                  incoming activation (middle); may carry ``grad``, the gradient of the
                  previous forward (fused: one call per step)
``backward``      the gradient for the pending forward (input/middle), or the loss weight
                  ``scale`` for a loss segment's pending step; runs the optimizer step here
``loss_step``     last segment + loss on labels held here (U-shaped); labels never leave. In
                  training it returns the gradient w.r.t. its input and keeps its own step
                  pending until the model owner sends the loss weight (``backward``, or fused
                  as ``step_scale`` on the next ``loss_step``)
``discard``       drop the pending step (e.g. the model owner's step failed); nothing applied
================  ==========================================================================

Weights change only in ``backward`` (or its fused form): a forward or a loss alone never
steps. Every incoming tensor passes the host's guard first, so a refused request changes
nothing. Training calls may carry a step id (exactly-once, see :mod:`.core`).

A segment's own forwards draw dropout masks from its own RNG stream (``Runtime.torch_rng``),
and a pending forward remembers what it ran on (``Runtime.pending_source``): a restarted host
re-runs it (:func:`rerun_pending`) and gets the very same pending step back.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import (
    ApprovalError,
    LeakageHaltError,
    NonFiniteError,
    ProtocolError,
    ShapeError,
    ValidationError,
)
from ..losses import LOSSES
from .dispatch import OpFamily, op, register_family
from .guard import ACTIVATION, CIPHERTEXT, GRAD_INPUT, LABELS, SCALAR, Call
from .records import LABEL_KEY, ROLES, Dataset, Runtime

__all__ = ["SegmentOps", "apply_grad", "rerun_pending", "undo_point", "segment_rng",
           "optimizer_step", "release", "nopeek_penalty"]


def optimizer_step(rt: Runtime, extra: Sequence[tuple[nn.Module,
                                                    torch.optim.Optimizer | None]] = ()) -> None:
    """The optimizer step on gradients already in the parameters (of the segment, and of the
    ``extra`` modules trained with it, e.g. a local-loss head); refused, nothing applied, if
    any of them is non-finite."""
    pairs = [(rt.module, rt.optimizer), *extra]
    grads = [p.grad for m, _ in pairs for p in m.parameters() if p.grad is not None]
    # one check for all: a norm is finite iff every entry is (and not astronomically large)
    if grads and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
        for _, opt in pairs:
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        raise NonFiniteError(f"{rt.id}: the gradient makes this segment's weight gradients "
                             "non-finite; nothing applied")
    for _, opt in pairs:
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    rt.steps += 1


def release(rt: Runtime, out: torch.Tensor, ds: Dataset | None, idx: torch.Tensor | None,
            dataset: str | None = None) -> dict[str, torch.Tensor]:
    """What leaves for a batch: the output (with the approved Gaussian noise, drawn afresh on
    every release), and the labels only if the proposal releases them (with the approved
    randomized response, drawn once per record: ``dataset`` names the records)."""
    sigma = rt.proposal.defences.get("noise_sigma", 0.0)
    out = out.detach()
    if sigma > 0:
        from ..defences import gaussian_noise

        out = gaussian_noise(out, sigma, rt.rng)
    response = {"activation": out.contiguous()}
    if rt.proposal.release_labels and ds is not None and idx is not None:
        assert ds.labels is not None
        labels = ds.labels[idx].clone()
        eps = rt.proposal.defences.get("label_epsilon", 0.0)
        if eps > 0:
            from ..defences import fixed_randomized_response

            key = rt.extra[LABEL_KEY]  # the host's, set at approval (or restore)
            name = dataset if dataset is not None else rt.proposal.datasets[0]
            labels = fixed_randomized_response(
                labels, ds.record_names(name, idx),
                int(rt.proposal.defences["num_classes"]), eps, bytes.fromhex(key))
        response["labels"] = labels
    return response


def nopeek_penalty(rt: Runtime, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
    """The data owner's own NoPeek term (distance correlation), if the proposal asks for one."""
    nopeek = rt.proposal.defences.get("nopeek", 0.0)
    if nopeek <= 0:
        return None
    from ..defences import distance_correlation

    penalty = nopeek * distance_correlation(x, out)
    rt.last_penalty = float(penalty.detach())
    return penalty


@contextmanager
def segment_rng(rt: Runtime, start: torch.Tensor | None = None) -> Iterator[None]:
    """Run torch ops on the segment's own RNG stream (from ``start`` if given); the stream
    continues where they leave it. The process-wide stream is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rt.torch_rng if start is None else start)
        yield
        rt.torch_rng = torch.get_rng_state()


def rerun_pending(host: Any, rt: Runtime, source: dict[str, Any]) -> None:
    """Rebuild a pending forward after a restart (or an undone step) from what it ran on
    (``source``: ``dataset`` and ``indices``, or ``x``; ``rng``: the segment's RNG state before
    it ran). The weights are those the forward left (its buffers, e.g. BatchNorm's running
    statistics, already updated): the re-run does not update them again."""
    if "indices" in source:
        named = {"dataset": source["dataset"]} if source.get("dataset") is not None else {}
        x = host.dataset(rt, named).features[source["indices"]].to(torch.float32)
    else:
        x = source["x"]
    after = rt.torch_rng
    buffers = {n: b.detach().clone() for n, b in rt.module.named_buffers()}
    SegmentOps._run(rt, x, True, rng=source["rng"])
    for name, value in buffers.items():  # running statistics were updated by the first run
        parent, _, leaf = name.rpartition(".")  # new tensors: the graph keeps the ones it saw
        setattr(rt.module.get_submodule(parent), leaf, value)
    rt.pending_source = source
    rt.torch_rng = after


def undo_point(host: Any, rt: Runtime) -> Callable[[], None]:
    """Everything applying a held-back step changes, kept before it is applied: weights and
    buffers, optimizer state, step counter, RNG streams, the pending step (re-run from what it
    ran on, as after a restart) and what the families keep with the segment (the leakage
    watch). The returned function puts it all back: a fused forward or loss step whose answer
    is refused then leaves the segment as it was. A segment halted meanwhile stays as the halt
    left it (the step applied, nothing more runs on it)."""
    weights = {k: v.detach().clone() for k, v in rt.module.state_dict().items()}
    opt = copy.deepcopy(rt.optimizer.state_dict()) if rt.optimizer is not None else None
    steps, torch_rng, rng, penalty = rt.steps, rt.torch_rng, rt.rng.get_state(), rt.last_penalty
    source, loss_grads = rt.pending_source, rt.pending_loss_grads
    grads = {n: p.grad.detach().clone() for n, p in rt.module.named_parameters()
             if loss_grads and p.grad is not None}
    kept = {name: st for name, fam in host.families.items()
            if (st := fam.segment_state(rt)) is not None}

    def undo() -> None:
        if rt.proposal.status != "approved":
            return
        rt.clear_pending()
        with torch.no_grad():
            rt.module.load_state_dict(weights)
        if rt.optimizer is not None and opt is not None:
            rt.optimizer.load_state_dict(opt)
        rt.steps, rt.last_penalty = steps, penalty
        rt.rng.set_state(rng)
        if source is not None:  # the forward that waited for the gradient waits again
            rerun_pending(host, rt, source)
        rt.torch_rng = torch_rng
        for name, param in rt.module.named_parameters():
            if name in grads:
                param.grad = grads[name]
        rt.pending_loss_grads = loss_grads
        for name, st in kept.items():
            host.families[name].restore_segment(rt, st)

    return undo


#: an evaluation call changes nothing (it is not saved): a held-back step rides a training call
_EVAL_CARRIES_NO_STEP = ("an evaluation call (train=False) carries no step: field {!r} refused "
                         "for {}; send it with a training call or 'backward'")

#: an encrypted segment steps only through ``he_grad`` (one decryption per step, in order)
_HE_GRAD_ONLY = ("{} runs with encryption: its gradient arrives only through 'he_grad', once "
                 "per step; a plain gradient is refused (nothing applied)")


def apply_grad(rt: Runtime, grad: torch.Tensor) -> torch.Tensor | None:
    """Backward of the pending forward with ``grad`` (already validated), then the step;
    returns the gradient w.r.t. the segment's input (middle segments) or None."""
    assert rt.pending_output is not None
    if rt.optimizer is not None:
        rt.optimizer.zero_grad(set_to_none=True)
    output, penalty, x = rt.pending_output, rt.pending_penalty, rt.pending_input
    rt.pending_input = rt.pending_output = rt.pending_penalty = None
    rt.pending_source = None
    if penalty is not None:  # NoPeek: the data owner's own extra loss term
        torch.autograd.backward([output, penalty], [grad, torch.ones_like(penalty)])
    else:
        output.backward(grad)
    optimizer_step(rt)
    grad_in = x.grad if x is not None else None
    return None if grad_in is None else grad_in.detach()


def _still_approved(rt: Runtime) -> None:
    """After a fused step: if it made the leakage watch halt the segment, nothing more leaves
    (the step stays applied, as the halt found it)."""
    p = rt.proposal
    if p.status != "approved":
        cls = LeakageHaltError if p.halted_by == "watch" else ApprovalError
        raise cls(f"segment {p.id} is {p.status} ({p.reason}): the step this request carried "
                  "was applied, and no output leaves")


def _scale(value: Any, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValidationError(f"{name}: expected a finite number, got {value!r}")
    if abs(value) > 1e6:
        raise ValidationError(f"{name}: {value} is out of range (|scale| <= 1e6)")
    return float(value)


def _apply_loss_step(rt: Runtime, scale: float) -> None:
    """The loss segment's pending step, its gradients scaled by the task's loss weight."""
    if not rt.pending_loss_grads:
        raise ProtocolError(f"loss weight for {rt.id} without a pending loss step")
    rt.pending_loss_grads = False
    rt.pending_output = None
    for p in rt.module.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)
    optimizer_step(rt)


@register_family
class SegmentOps(OpFamily):
    """Forward, backward, loss and discard of approved segments (see the module docstring)."""

    name = "segments"

    @op("forward", roles=("input", "middle"), mutates=True, evaluates=True,
        egress={"activation": ACTIVATION, "labels": LABELS, "he_input": CIPHERTEXT})
    def forward(self, call: Call) -> dict[str, Any]:
        rt, req, guard = call.rt, call.req, self.host.guard
        assert rt is not None
        train = bool(req.get("train", True))
        # validate everything before changing anything
        if rt.he is not None and "grad" in req:
            raise ProtocolError(_HE_GRAD_ONLY.format(rt.id))
        if not train and "grad" in req:
            raise ProtocolError(_EVAL_CARRIES_NO_STEP.format("grad", rt.id))
        grad = guard.grad_in(rt, req["grad"]) if "grad" in req else None
        ds = idx = None
        if rt.proposal.role == "input":
            ds = self.host.dataset(rt, req)
            idx = guard.indices(rt, req, ds)
            x = ds.features[idx].to(torch.float32)
        else:
            x = guard.activation_in(rt, req)
        if train and grad is None and rt.pending_output is not None:
            raise ProtocolError(f"segment {rt.id} has a forward pending its gradient; "
                                "send it (field 'grad') or 'discard' it first")
        guard.admit(rt, int(x.shape[0]))
        if grad is not None:  # the previous forward's step, fused: undone if this is refused
            call.undo = undo_point(self.host, rt)
            apply_grad(rt, grad)
            self.host.stepped(rt, grad)
            _still_approved(rt)
        call.rows = int(x.shape[0])
        start = rt.torch_rng
        try:
            out = self._run(rt, x, train)
            if train:
                rt.pending_source = ({"dataset": req.get("dataset"), "indices": idx,
                                      "rng": start}
                                     if idx is not None else {"x": x.detach(), "rng": start})
            response: dict[str, Any] = {}
            if rt.he is not None:  # only ciphertexts of the approved output leave, with the
                # release's defences applied first, as on the plain path: a malicious model owner
                # can decrypt them (SECURITY.md), so the noise must be in what it decrypts
                released = release(rt, out, None, None)["activation"]
                response["he_input"] = rt.he.encrypt_input(released.flatten(1), need_grad=train)
                return response
            response.update(release(rt, out, ds, idx, req.get("dataset")))
        except Exception:  # refused (NoPeek on one record, label noise, |x| > x_bound, ...):
            if train:  # nothing of it stays pending (no gradient may land on it), its dropout
                rt.clear_pending()  # draws undone
                rt.torch_rng = start
            raise
        if train and "labels" in response:  # what this step's gradient answers to (the watch)
            rt.extra["pending_labels"] = response["labels"]
        return response

    @staticmethod
    def _run(rt: Runtime, x: torch.Tensor, train: bool,
             rng: torch.Tensor | None = None) -> torch.Tensor:
        if not train:
            rt.module.eval()
            try:
                with torch.no_grad():
                    return rt.module(x)
            finally:
                rt.module.train()
        rt.module.train()
        if rt.proposal.role == "middle":
            x = x.requires_grad_()
        with segment_rng(rt, rng):
            out = rt.module(x)
        rt.pending_input = x if rt.proposal.role == "middle" else None
        rt.pending_output = out
        rt.pending_penalty = nopeek_penalty(rt, x, out)
        return out

    @op("backward", roles=ROLES, mutates=True,
        egress={"steps": SCALAR, "grad_input": GRAD_INPUT})
    def backward(self, call: Call) -> dict[str, Any]:
        rt = call.rt
        assert rt is not None
        if rt.proposal.role == "loss":
            _apply_loss_step(rt, _scale(call.req.get("scale", 1.0), "scale"))
            return {"steps": rt.steps}
        if rt.he is not None:
            raise ProtocolError(_HE_GRAD_ONLY.format(rt.id))
        grad = self.host.guard.grad_in(rt, call.req.get("grad"))
        assert rt.pending_output is not None
        call.rows = int(rt.pending_output.shape[0])
        # what runs after the step (the families' hooks, the egress guard) may fail: the step
        # is then undone, as the model owner is told it was refused
        call.undo = undo_point(self.host, rt)
        grad_in = apply_grad(rt, grad)
        self.host.stepped(rt, grad)
        out: dict[str, Any] = {"steps": rt.steps}
        if grad_in is not None:
            out["grad_input"] = grad_in
        return out

    @op("discard", roles=ROLES, mutates=True, egress={"discarded": SCALAR})
    def discard(self, call: Call) -> dict[str, Any]:
        rt = call.rt
        assert rt is not None
        dropped = rt.pending_output is not None or rt.pending_loss_grads
        rt.clear_pending()
        call.unchanged = not dropped  # nothing was pending: nothing to save
        return {"discarded": dropped}

    @op("loss_step", roles=("loss",), mutates=True, evaluates=True,
        egress={"loss_sum": SCALAR, "correct": SCALAR, "count": SCALAR, "grad_input": GRAD_INPUT})
    def loss_step(self, call: Call) -> dict[str, Any]:
        rt, req, guard = call.rt, call.req, self.host.guard
        assert rt is not None and rt.proposal.loss is not None
        train = bool(req.get("train", True))
        if not train and "step_scale" in req:
            raise ProtocolError(_EVAL_CARRIES_NO_STEP.format("step_scale", rt.id))
        scale = _scale(req["step_scale"], "step_scale") if "step_scale" in req else None
        ds = self.host.dataset(rt, req)
        idx = guard.indices(rt, req, ds)
        x = guard.activation_in(rt, req)
        if x.shape[0] != idx.shape[0]:
            raise ShapeError(f"x has {x.shape[0]} rows but indices {idx.shape[0]}")
        if scale is not None and not rt.pending_loss_grads:
            raise ProtocolError(f"step_scale for {rt.id} without a pending loss step")
        if train and scale is None and rt.pending_loss_grads:
            raise ProtocolError(f"segment {rt.id} has a loss step pending its weight; send it "
                                "(field 'step_scale' or op 'backward') or 'discard' it first")
        guard.admit(rt, int(x.shape[0]))  # its input gradient carries these records' labels
        if scale is not None:  # the previous loss step, fused: undone if this is refused
            call.undo = undo_point(self.host, rt)
            _apply_loss_step(rt, scale)
        call.rows = int(x.shape[0])
        assert ds.labels is not None
        y = ds.labels[idx]
        loss_fn = LOSSES[rt.proposal.loss]
        grad_in = None
        if train:
            rt.module.train()
            x = x.requires_grad_()
            if rt.optimizer is not None:
                rt.optimizer.zero_grad(set_to_none=True)
            with segment_rng(rt):
                logits = rt.module(x)
            loss = loss_fn(logits, y)
            loss.backward()  # parameter gradients wait for the model owner's loss weight
            rt.pending_loss_grads = True
            assert x.grad is not None
            grad_in = x.grad.detach()
            loss_sum = float(loss.detach()) * x.shape[0]
        else:
            rt.module.eval()
            with torch.no_grad():
                logits = rt.module(x)
                loss_sum = float(loss_fn(logits, y, reduction="sum"))
            rt.module.train()
        correct = int((logits.argmax(1) == y).sum()) if logits.dim() == 2 and y.dim() == 1 else 0
        out: dict[str, Any] = {"loss_sum": loss_sum, "correct": correct, "count": int(x.shape[0])}
        if grad_in is not None:
            out["grad_input"] = grad_in
        return out
