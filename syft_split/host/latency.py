"""Ops of the latency-tolerant schedules: local losses at the data owner, pipelined steps.

**Local loss** (Han, Mu & Chen 2021, "Accelerating federated learning with split learning on
locally generated losses"). The model owner attaches an *auxiliary head* to a pending input
proposal (model-owner op ``propose_local_loss``: a declared spec, weights, a loss; at most
:data:`MAX_HEADS_PER_PROPOSAL` per proposal, replacements included); the review
shows it, and the data owner approves with ``local_loss=True``. Op ``local_forward`` then runs
up to 64 batches in one call: for each batch the segment's output goes through the auxiliary
head, the loss on the labels held here trains segment and head here, and the output (computed
before that step) leaves through the guard. No gradient ever comes back. Labels and the head's
outputs stay here (unless the proposal releases labels); two status scalars leave per call.

**Pipelined** (a gradient delay of at most one step). Op ``pipe_forward`` (``seq``, ``indices``,
optionally ``grad`` for the OLDEST pending forward) keeps up to two forwards pending, each with
its own copy of the weights it used (weight stashing), so the gradient of a forward is exact
for the weights that produced it and is applied to the current weights one step later.
``pipe_backward`` delivers a gradient without a new forward; ``pipe_discard`` drops the
pending forwards. Same values leave as in exact training.

Both keep the data owner's guard: indices and gradients are checked before anything runs, and
a refused call changes nothing (a ``local_forward`` that fails half way restores the weights).

**State.** ``pipe_forward``, ``pipe_backward`` and ``local_forward`` change the segment: a host
with a state directory saves it after each of them, before answering. An approved auxiliary
head (its spec, loss, optimizer, weights and optimizer state) is saved in the segment's file
with the segment's weights (``LocalLossOps.segment_state``) and rebuilt
after a restart, so ``local_forward`` goes on with the same head; a head proposed but not yet
approved is kept with the host's proposals. Not kept across a restart: the pending pipelined
forwards (their stashed weights); after one the model owner starts the pipeline again at
``seq`` 0 and the gradients of those forwards are dropped. These requests carry **no step
ids**, so exactly-once is not guaranteed across a crash: a call whose answer was lost may or
may not have been applied (it is never answered from a record, and never sent again by the
transport), and a model owner cannot resume such a run from a checkpoint (the trainer refuses
``checkpoint_dir`` with them). Exact steps (``forward``/``backward``) have step ids and are
applied exactly once.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import wire
from ..errors import (
    ApprovalError,
    AuthorizationError,
    ConfigError,
    NonFiniteError,
    ProtocolError,
    ShapeError,
    SyftSplitError,
    ValidationError,
)
from ..losses import LOSSES
from ..spec import OptimizerSpec, count_parameters, describe, module_from_spec
from .admission import check_size, dry_run, load_weights
from .dispatch import OpFamily, op, register_family
from .guard import ACTIVATION, LABELS, SCALAR, TEXT, Call
from .records import Dataset, Proposal, Runtime, spec_bytes, state_bytes
from .review import record_rate
from .segments import nopeek_penalty, optimizer_step, release

__all__ = ["LocalLossOps", "PipelineOps", "MAX_BATCHES_PER_CALL", "MAX_DELAY",
           "MAX_HEADS_PER_PROPOSAL"]

#: batches one ``local_forward`` may carry.
MAX_BATCHES_PER_CALL = 64
#: auxiliary heads one pending proposal may be sent (the first and its replacements: each is
#: built, loaded and dry-run under the host's lock, and counts toward the proposal rate only)
MAX_HEADS_PER_PROPOSAL = 8
#: the largest gradient delay (in steps) ``pipe_forward`` allows.
MAX_DELAY = 1


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValidationError(f"{name} must be an int in {lo}..{hi}, got {value!r:.60}")
    return value


def _plain_input(rt: Runtime, what: str) -> None:
    if rt.proposal.he is not None:
        raise ProtocolError(f"{rt.id} releases ciphertexts only; {what} needs a plain segment")
    if rt.pending_output is not None or rt.pending_loss_grads:
        raise ProtocolError(f"segment {rt.id} has an exact step pending; send its gradient or "
                            "'discard' it first")


# ------------------------------------------------------------------------- local loss
@dataclass
class AuxHead:
    """An auxiliary head attached to a proposal, as reviewed (``spec``: its declared spec;
    ``optim``: built when the proposal is approved)."""

    module: nn.Module
    loss: str
    optimizer: OptimizerSpec
    spec: dict[str, Any]
    optim: torch.optim.Optimizer | None = None

    def state(self) -> dict[str, Any]:
        """Spec, loss, optimizer, current weights and optimizer state (saved with the segment)."""
        return {"spec": self.spec, "loss": self.loss, "optimizer": self.optimizer.to_json(),
                "weights": self.module.state_dict(),
                "optim": None if self.optim is None else self.optim.state_dict()}

    @classmethod
    def from_state(cls, raw: Any, *, approved: bool) -> AuxHead:
        """The head :meth:`state` described (with its optimizer when ``approved``); raises
        (ConfigError, KeyError, RuntimeError, ...) if it cannot be rebuilt exactly."""
        if not isinstance(raw, dict) or raw.get("loss") not in LOSSES:
            raise ConfigError(f"not a saved auxiliary head: {raw!r:.80}")
        module = module_from_spec(raw["spec"])
        module.load_state_dict(raw["weights"])  # strict: every tensor, right shapes
        head = cls(module, str(raw["loss"]), OptimizerSpec.from_json(raw["optimizer"]),
                   raw["spec"])
        params = list(module.parameters())
        if approved and params:
            head.optim = head.optimizer.build(params)
            if raw.get("optim") is not None:
                head.optim.load_state_dict(raw["optim"])
        return head


#: what a saved head that cannot be rebuilt may raise (a damaged state file)
_REBUILD_ERRORS = (SyftSplitError, KeyError, TypeError, ValueError, RuntimeError)


@register_family
class LocalLossOps(OpFamily):
    """Auxiliary heads and ``local_forward`` (see the module docstring)."""

    name = "local_loss"

    def __init__(self, host: Any) -> None:
        super().__init__(host)
        self.heads: dict[str, AuxHead] = {}
        #: heads proposed so far per pending proposal (refused past MAX_HEADS_PER_PROPOSAL)
        self.proposed: dict[str, int] = {}

    def review_lines(self, proposal: Proposal) -> list[str]:
        head = self.heads.get(proposal.id)
        if head is None:
            return []
        return [
            "  LOCAL LOSS: an auxiliary head, trained HERE on your labels, trains this segment "
            "instead of gradients from the model owner (none come back):",
            *("    " + line for line in describe(head.module, proposal.output_shape)),
            f"    auxiliary parameters: {count_parameters(head.module)}; loss {head.loss}; "
            f"optimizer {head.optimizer!r}",
            f"    per call up to {MAX_BATCHES_PER_CALL} batches' activations leave at once, with "
            "two status scalars (auxiliary loss, correct count); the head's outputs stay here",
            "    LABELS CAN BE READ: the model owner chose this head and its weights; a malicious "
            "one reads the labels of a call's records from the auxiliary loss and correct count "
            "(about a dozen per call); " + record_rate(self.host.limits.max_records_per_minute),
            "    approve with local_loss=True to allow it",
        ]

    def pending_bytes(self, proposal: Proposal) -> int:
        """The auxiliary head's weights and spec JSON (kept and saved with the pending
        proposal)."""
        head = self.heads.get(proposal.id)
        return 0 if head is None else state_bytes(head.module.state_dict()) + spec_bytes(head.spec)

    def on_reject(self, proposal: Proposal) -> None:
        self.heads.pop(proposal.id, None)
        self.proposed.pop(proposal.id, None)

    def on_approve(self, rt: Runtime, options: dict[str, Any]) -> None:
        allow = options.pop("local_loss", None)
        self.proposed.pop(rt.id, None)
        head = self.heads.get(rt.id)
        if head is None:
            if allow is not None:
                raise ConfigError(f"no auxiliary head (local loss) was proposed for {rt.id}")
            return
        if allow is not True:
            raise ConfigError(f"{rt.id} carries an auxiliary head (local loss): read its review "
                              "and approve with local_loss=True, or reject it")
        params = list(head.module.parameters())
        head.optim = head.optimizer.build(params) if params else None
        rt.extra[self.name] = head  # saved with the segment from now on (segment_state)

    def state(self) -> dict[str, Any]:
        """The heads of proposals still pending (an approved head is saved with its segment)
        and how many heads each of them was sent."""
        pending = {p.id for p in self.host.proposals_by_id.values() if p.status == "pending"}
        return {"pending": {pid: head.state() for pid, head in self.heads.items()
                            if pid in pending},
                "proposed": {pid: n for pid, n in self.proposed.items() if pid in pending}}

    def restore(self, state: Any) -> None:
        """Rebuild the heads of pending proposals (an approved segment's head comes back with
        its segment: :meth:`restore_segment`). A head that cannot be rebuilt halts its
        proposal, with the reason."""
        saved = dict(state.get("pending") or {}) if isinstance(state, dict) else {}
        counts = state.get("proposed") if isinstance(state, dict) else None
        for pid, n in (counts if isinstance(counts, dict) else {}).items():
            if isinstance(n, int) and not isinstance(n, bool):
                self.proposed[str(pid)] = n
        for pid, raw in saved.items():
            p = self.host.proposals_by_id.get(pid)
            if p is not None and p.status == "pending":
                self._rebuild(pid, raw, None)

    def segment_state(self, rt: Runtime) -> dict[str, Any] | None:
        """The approved head (spec, loss, optimizer, weights, optimizer state), saved in the
        segment's file with the segment's weights."""
        head = rt.extra.get(self.name)
        return head.state() if isinstance(head, AuxHead) else None

    def restore_segment(self, rt: Runtime, state: dict[str, Any] | None) -> None:
        """Rebuild the segment's head as last saved (after a restart, or when a refused answer
        undoes a step); a head that cannot be rebuilt halts the segment, with the reason."""
        if state is not None:
            self._rebuild(rt.id, state, rt)

    def _rebuild(self, pid: str, raw: Any, rt: Runtime | None) -> None:
        try:
            head = AuxHead.from_state(raw, approved=rt is not None)
        except _REBUILD_ERRORS as exc:
            self.host.halt(pid, f"the datasite restarted and this segment's auxiliary head "
                                f"(local loss) could not be rebuilt ({exc}): propose this "
                                "segment again")
            return
        self.heads[pid] = head
        if rt is not None:
            rt.extra[self.name] = head

    @op("propose_local_loss", mutates=True, egress={"segment": TEXT, "aux_parameters": SCALAR})
    def propose_local_loss(self, call: Call) -> dict[str, Any]:
        req, host = call.req, self.host
        p = host.proposal(str(req.get("segment")))
        if p.driver != call.caller:
            raise AuthorizationError(f"{call.caller} did not propose {p.id}")
        if p.status != "pending":
            raise ApprovalError(f"{p.id} is {p.status}: an auxiliary head joins a pending "
                                "proposal only")
        if p.role != "input" or p.he is not None:
            raise ConfigError("a local loss trains a plain input segment (no encryption)")
        if any(host.datasets[d].labels is None for d in p.datasets):
            raise ConfigError(f"a local loss needs labels here; {p.datasets} has none")
        loss = req.get("loss")
        if loss not in LOSSES:
            raise ConfigError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
        proposals: Any = host.families["proposals"]
        proposals.admit(call.caller, new=False)  # the same per-user rate as proposals
        sent = self.proposed.get(p.id, 0)
        if sent >= MAX_HEADS_PER_PROPOSAL:
            raise ValidationError(f"{p.id} was sent {sent} auxiliary heads; this data owner "
                                  f"accepts {MAX_HEADS_PER_PROPOSAL} per proposal (propose the "
                                  "segment again for another)")
        self.proposed[p.id] = sent + 1  # counted before any work, like a proposal
        spec, limits = req.get("spec"), host.limits
        check_size(spec, limits, "the auxiliary head", input_shape=p.output_shape,
                   max_batch=p.max_batch)
        module = module_from_spec(spec)
        state = {k[6:]: v for k, v in req.items() if k.startswith("state/")}
        old = self.heads.get(p.id)  # a head proposed again replaces the one before
        proposals.check_pending_bytes(call.caller, state, spec=spec,
                                      freed=0 if old is None else self.pending_bytes(p))
        load_weights(module, state, limits.max_abs_value, "the head")
        dry_run(module, p.output_shape, "the auxiliary head", loss=str(loss),
                labels=[host.datasets[d].labels for d in p.datasets])
        assert isinstance(spec, dict)  # module_from_spec accepts only a spec object
        self.heads[p.id] = AuxHead(module, str(loss), OptimizerSpec.from_json(req.get("optimizer")),
                                   spec)
        return {"segment": p.id, "aux_parameters": count_parameters(module)}

    @op("local_forward", roles=("input",), mutates=True,
        egress={"activation": ACTIVATION, "labels": LABELS, "aux_loss": SCALAR,
                "aux_correct": SCALAR})
    def local_forward(self, call: Call) -> dict[str, Any]:
        """Train on up to 64 batches with the auxiliary head; release their activations. Saved
        (segment and head) before answering; no step id: not exactly-once across a crash."""
        rt, req, guard = call.rt, call.req, self.host.guard
        assert rt is not None
        head = rt.extra.get(self.name)
        if not isinstance(head, AuxHead):
            raise ProtocolError(f"{rt.id} was not approved with a local loss")
        _plain_input(rt, "a local loss")
        ds = self.host.dataset(rt, req)
        idx = wire.check_tensor(req.get("indices"), "indices", shape=(None,), dtype=torch.int64)
        sizes = req.get("sizes")
        if not isinstance(sizes, list) or not 1 <= len(sizes) <= MAX_BATCHES_PER_CALL:
            raise ValidationError(f"sizes must list 1..{MAX_BATCHES_PER_CALL} batch sizes, got "
                                  f"{sizes!r:.80}")
        sizes = [_int(n, "a batch size", 1, rt.proposal.max_batch) for n in sizes]
        if sum(sizes) != idx.shape[0]:
            raise ShapeError(f"sizes add up to {sum(sizes)} but indices hold {idx.shape[0]}")
        chunks = list(idx.split(sizes))
        for chunk in chunks:
            guard.indices(rt, {"indices": chunk}, ds)
        guard.admit(rt, int(idx.shape[0]))
        saved = _snapshot(rt, head)
        try:
            out = self._train(rt, head, ds, chunks, req.get("dataset"))
        except BaseException:
            _restore(rt, head, saved)
            raise
        call.rows = int(idx.shape[0])
        return out

    def _train(self, rt: Runtime, head: AuxHead, ds: Dataset, chunks: list[torch.Tensor],
               dataset: str | None) -> dict[str, Any]:
        assert ds.labels is not None
        loss_fn = LOSSES[head.loss]
        parts: list[dict[str, torch.Tensor]] = []
        predicted: list[torch.Tensor] = []
        loss_sum = torch.zeros(())
        rt.module.train()
        head.module.train()
        for chunk in chunks:
            x, y = ds.features[chunk].to(torch.float32), ds.labels[chunk]
            out = rt.module(x)
            logits = head.module(out)
            loss = loss_fn(logits, y)
            penalty = nopeek_penalty(rt, x, out)
            for opt in (rt.optimizer, head.optim):
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            (loss if penalty is None else loss + penalty).backward()
            optimizer_step(rt, [(head.module, head.optim)])
            self.host.stepped(rt, None)  # the leakage watch re-measures locally trained weights
            parts.append(release(rt, out, ds, chunk, dataset))
            loss_sum += loss.detach() * int(chunk.shape[0])
            if logits.dim() == 2 and y.dim() == 1:
                predicted.append(logits.detach())
        n = sum(int(c.shape[0]) for c in chunks)
        response: dict[str, Any] = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        aux_loss = float(loss_sum) / n
        labels = ds.labels[torch.cat(chunks)]
        correct = int((torch.cat(predicted).argmax(1) == labels).sum()) if predicted else 0
        if not math.isfinite(aux_loss):
            raise NonFiniteError(f"{rt.id}: the auxiliary loss is not finite")
        response.update(aux_loss=aux_loss, aux_correct=correct)
        return response


def _snapshot(rt: Runtime, head: AuxHead) -> list[Any]:
    return [copy.deepcopy(x.state_dict()) if x is not None else None
            for x in (rt.module, rt.optimizer, head.module, head.optim)] + [rt.steps]


def _restore(rt: Runtime, head: AuxHead, saved: list[Any]) -> None:
    for x, state in zip((rt.module, rt.optimizer, head.module, head.optim), saved):
        if x is not None and state is not None:
            x.load_state_dict(state)
    rt.steps = saved[-1]


# -------------------------------------------------------------------------- pipelined
@dataclass
class _Pending:
    params: dict[str, torch.Tensor]
    output: torch.Tensor
    penalty: torch.Tensor | None
    labels: torch.Tensor | None = None  # as released with this forward (the leakage watch)


@dataclass
class _Pipe:
    pending: deque[_Pending] = field(default_factory=deque)
    next_seq: int = 0


def _seq(pipe: _Pipe, value: Any) -> None:
    """Refuse a ``seq`` other than the next one (ValidationError)."""
    try:
        _int(value, "seq", pipe.next_seq, pipe.next_seq)
    except ValidationError as exc:
        if pipe.pending:
            raise
        raise ValidationError(f"{exc}: no pipelined forward is pending here (pending forwards "
                              "are not kept across a restart of the data owner); start again "
                              "with seq 0") from None


@register_family
class PipelineOps(OpFamily):
    """``pipe_forward``, ``pipe_backward``, ``pipe_discard`` (see the module docstring)."""

    name = "pipeline"

    def review_lines(self, proposal: Proposal) -> list[str]:
        if proposal.role != "input" or proposal.he is not None:
            return []
        return [f"  the model owner may pipeline steps: at most {MAX_DELAY + 1} forwards pending, "
                f"each gradient applied at most {MAX_DELAY} step late (same values leave)"]

    def _pipe(self, rt: Runtime) -> _Pipe:
        pipe = rt.extra.get(self.name)
        if not isinstance(pipe, _Pipe):
            pipe = rt.extra[self.name] = _Pipe()
        return pipe

    def _grad(self, rt: Runtime, pipe: _Pipe, value: Any) -> torch.Tensor:
        if not pipe.pending:
            raise ProtocolError(f"gradient for {rt.id} without a pending pipelined forward")
        shape = tuple(pipe.pending[0].output.shape)
        g = wire.check_tensor(value, "grad", shape=shape, dtype=torch.float32)
        self.host.guard.bounded(g, "grad")
        return g

    def _apply(self, rt: Runtime, pipe: _Pipe, grad: torch.Tensor) -> None:
        item = pipe.pending[0]
        if item.penalty is not None:
            torch.autograd.backward([item.output, item.penalty],
                                    [grad, torch.ones_like(item.penalty)])
        else:
            item.output.backward(grad)
        if rt.optimizer is not None:
            rt.optimizer.zero_grad(set_to_none=True)
        for name, p in rt.module.named_parameters():
            g = item.params[name].grad
            p.grad = None if g is None else g.detach().clone()
        pipe.pending.popleft()
        optimizer_step(rt)
        rt.extra["pending_labels"] = item.labels
        self.host.stepped(rt, grad)

    @op("pipe_forward", roles=("input",), mutates=True,
        egress={"activation": ACTIVATION, "labels": LABELS, "pending": SCALAR})
    def pipe_forward(self, call: Call) -> dict[str, Any]:
        """Apply the oldest pending forward's gradient (if sent), then a new forward. Saved
        before answering; no step id: not exactly-once across a crash."""
        rt, req, guard = call.rt, call.req, self.host.guard
        assert rt is not None
        _plain_input(rt, "pipelining")
        pipe = self._pipe(rt)
        seq = req.get("seq")
        restart = seq == 0 and not pipe.pending
        if not restart:
            _seq(pipe, seq)
        grad = self._grad(rt, pipe, req["grad"]) if "grad" in req else None
        ds = self.host.dataset(rt, req)
        idx = guard.indices(rt, req, ds)
        if len(pipe.pending) - (grad is not None) > MAX_DELAY:
            raise ProtocolError(f"{rt.id} holds {len(pipe.pending)} pipelined forwards; the delay "
                                f"bound is {MAX_DELAY} step: send the oldest one's gradient")
        guard.admit(rt, int(idx.shape[0]))
        if grad is not None:
            self._apply(rt, pipe, grad)
        x = ds.features[idx].to(torch.float32)
        rt.module.train()
        params = {n: p.detach().clone().requires_grad_(True)
                  for n, p in rt.module.named_parameters()}
        out = torch.func.functional_call(rt.module, params, (x,))
        released = release(rt, out, ds, idx, req.get("dataset"))
        pipe.pending.append(_Pending(params, out, nopeek_penalty(rt, x, out), released.get("labels")))
        pipe.next_seq = (0 if restart else pipe.next_seq) + 1
        call.rows = int(idx.shape[0])
        return {**released, "pending": len(pipe.pending)}

    @op("pipe_backward", roles=("input",), mutates=True, egress={"steps": SCALAR, "pending": SCALAR})
    def pipe_backward(self, call: Call) -> dict[str, Any]:
        """Apply the oldest pending forward's gradient. Saved before answering; no step id:
        not exactly-once across a crash."""
        rt = call.rt
        assert rt is not None
        pipe = self._pipe(rt)
        _seq(pipe, call.req.get("seq"))
        grad = self._grad(rt, pipe, call.req.get("grad"))
        self._apply(rt, pipe, grad)
        pipe.next_seq += 1
        return {"steps": rt.steps, "pending": len(pipe.pending)}

    @op("pipe_discard", roles=("input",), egress={"discarded": SCALAR})
    def pipe_discard(self, call: Call) -> dict[str, Any]:
        rt = call.rt
        assert rt is not None
        pipe = self._pipe(rt)
        dropped = len(pipe.pending)
        pipe.pending.clear()
        pipe.next_seq = 0
        return {"discarded": dropped}
