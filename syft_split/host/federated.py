"""Federated baselines at the data owner: the whole model trained here (FedAvg), or one
gradient of it per step (large-batch synchronous SGD), on the same host, guard and audit as
split learning -- so the two are compared on equal terms.

Model-owner ops, on a proposal of role ``local`` ("the whole model, trained locally")::

    fl_propose    a whole model (declared spec + initial weights), its optimizer, the datasets
                  (with labels here) and the loss; reviewed and approved like any proposal
    fl_train      start from the weights sent, train ``epochs`` local epochs over every record
                  of the dataset (``batch_size``, shuffled by ``seed``, a fresh optimizer each
                  call; at most ``HostLimits.max_local_records`` records in all), return the
                  weights after local training and the record count
    fl_gradient   the gradient of the mean loss of the weights sent on the given records (and
                  BatchNorm statistics after that batch)
    fl_evaluate   loss and correct counts of the weights sent on a dataset, in batches
                  (counted by ``max_records_per_minute``: every record, like ``fl_train``)

What leaves is declared per op with a guard rule: weights and gradients of exactly the approved
model's shapes (finite, bounded), and scalars. THE MODEL'S WEIGHTS (or gradients) LEAVE AFTER
EVERY ROUND: they carry information about the training records (gradient-inversion attacks
recover images from them); the review says so. Labels and records never leave as fields, but
with weights of its choosing (a unit only one record activates) the model owner makes one update
or gradient carry one record and its label exactly, whatever the batch: the review says so too.
``HostLimits.min_local_batch`` is the fewest distinct records one gradient or local step may
cover (an index repeated counts once; ``fl_train``'s batches are a permutation's slices).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError, EgressError, ValidationError
from ..losses import LOSSES, count_correct
from ..spec import OptimizerSpec, count_parameters, module_from_spec
from .admission import check_size, dry_run, load_weights
from .dispatch import OpFamily, op, register_family
from .guard import JSON, SCALAR, TEXT, Call, Guard
from .records import Dataset, Proposal, Runtime

__all__ = ["FederatedOps", "LOCAL", "LOCAL_WEIGHTS", "LOCAL_GRADIENT"]

#: the proposal role of a whole model trained at the data owner
LOCAL = "local"


def _like(name: str, value: Any, call: Call, guard: Guard, own: torch.Tensor | None) -> None:
    seg = f" of {call.rt.id}" if call.rt is not None else ""
    if call.rt is None or call.rt.proposal.role != LOCAL:
        raise EgressError(f"op {call.op!r}{seg} tried to release {name!r}: only a model "
                          "approved for local training releases weights or gradients")
    if own is None:
        raise EgressError(f"op {call.op!r}{seg} tried to release {name!r}: not a tensor of "
                          "the approved model")
    if not isinstance(value, torch.Tensor) or value.shape != own.shape or value.dtype != own.dtype:
        got = (f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor)
               else type(value).__name__)
        raise EgressError(f"op {call.op!r}{seg} tried to release {name!r} as {got}; approved: "
                          f"{tuple(own.shape)} {own.dtype}")
    if value.is_floating_point() and value.numel():
        if not bool(torch.isfinite(value).all()):
            raise EgressError(f"op {call.op!r}{seg}: {name!r} has non-finite values")
        if float(value.abs().max()) > guard.limits.max_abs_value:
            raise EgressError(f"op {call.op!r}{seg}: {name!r} exceeds the approved magnitude "
                              f"{guard.limits.max_abs_value:g}")


def LOCAL_WEIGHTS(name: str, value: Any, call: Call, guard: Guard) -> None:
    """A weight or buffer of the approved model (``state/<key>`` or ``buffer/<key>``), after
    local training: exactly its shape and dtype, finite, bounded."""
    rt = call.rt
    own = rt.module.state_dict().get(name.split("/", 1)[1]) if rt is not None else None
    _like(name, value, call, guard, own)


def LOCAL_GRADIENT(name: str, value: Any, call: Call, guard: Guard) -> None:
    """The gradient of one parameter of the approved model (``grad/<name>``)."""
    rt = call.rt
    own = dict(rt.module.named_parameters()).get(name[5:]) if rt is not None else None
    _like(name, value, call, guard, None if own is None else own.detach())


def _int(req: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = req.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValidationError(f"{key} must be an int in {lo}..{hi}, got {value!r}")
    return value


@register_family
class FederatedOps(OpFamily):
    """Local training of a whole model (see the module docstring)."""

    name = "federated"

    def review_lines(self, proposal: Proposal) -> list[str]:
        if proposal.role != LOCAL:
            return []
        assert proposal.module is not None
        n = count_parameters(proposal.module)
        least = self.host.limits.min_local_batch
        cap = self.host.limits.max_local_records
        big = {d: int(self.host.datasets[d].features.shape[0]) for d in proposal.datasets
               if d in self.host.datasets and int(self.host.datasets[d].features.shape[0]) > cap}
        return [
            "  FEDERATED: the WHOLE MODEL trains here on your records (local epochs per round, "
            "or one gradient per step); the model owner sends the weights to start from, any "
            "weights it likes, every call",
            f"  THE MODEL'S WEIGHTS LEAVE AFTER LOCAL TRAINING, every round ({n} parameters, "
            f"{4 * n} bytes), or its gradient every step: they carry information about your "
            "training records (gradient-inversion attacks reconstruct inputs from them)",
            "  AN UPDATE OR GRADIENT CAN BE A RECORD: with weights chosen for it (a unit only "
            "one record activates), one update gives that record's features and label "
            "exactly, whatever the batch; "
            + ("a gradient may be of ONE record (HostLimits.min_local_batch=1: no minimum)"
               if least <= 1 else
               f"each gradient and local step covers at least {least} records "
               "(HostLimits.min_local_batch)"),
            "  also leaving: the number of records trained on, loss sums and correct counts "
            "(every call is counted by max_records_per_minute)",
            f"  one fl_train call trains on at most {self.host.limits.max_local_records} "
            "records (epochs x records; HostLimits.max_local_records): your console's ops "
            "wait behind a running call at most that long",
        ] + [f"  NOTE: dataset {d!r} has {n} records, more than that: fl_train is refused on "
             "it (fl_gradient and fl_evaluate still run); raise "
             f"HostLimits.max_local_records to at least {n} to allow local epochs"
             for d, n in big.items()]

    # --------------------------------------------------------------- model-owner ops
    @op("fl_propose", mutates=True, egress={"segment": TEXT, "status": TEXT, "output_shape": JSON})
    def fl_propose(self, call: Call) -> dict[str, Any]:
        proposals: Any = self.host.families["proposals"]  # the same per-user caps apply
        proposals.admit(call.caller)
        p = self._parse(call.caller, call.req)
        self.host.add_proposal(p)
        return {"segment": p.id, "status": "pending", "output_shape": list(p.output_shape)}

    def _parse(self, caller: str, req: dict[str, Any]) -> Proposal:

        host, limits = self.host, self.host.limits
        datasets = req.get("datasets")
        if not isinstance(datasets, list) or not datasets or not all(
                isinstance(d, str) and d in host.datasets for d in datasets):
            raise ConfigError(f"datasets {datasets!r} must name datasets on {host.name}: "
                              f"{sorted(host.datasets)}")
        if any(host.datasets[d].labels is None for d in datasets):
            raise ConfigError(f"local training needs labels, and {datasets} has none on {host.name}")
        input_shape = tuple(host.datasets[datasets[0]].features.shape[1:])
        if any(tuple(host.datasets[d].features.shape[1:]) != input_shape for d in datasets):
            raise ConfigError(f"datasets {datasets} have different feature shapes")
        loss = req.get("loss", "cross_entropy")
        if loss not in LOSSES:
            raise ConfigError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
        max_batch = _int(req, "max_batch", limits.max_batch, 1, limits.max_batch)
        check_size(req.get("spec"), limits, "the proposed segment", input_shape=input_shape,
                   max_batch=max_batch)
        state = {k[6:]: v for k, v in req.items() if k.startswith("state/")}
        self.host.families["proposals"].check_pending_bytes(  # type: ignore[attr-defined]
            caller, state, spec=req.get("spec"))
        module = module_from_spec(req.get("spec"))
        load_weights(module, state, limits.max_abs_value, "the model")
        out = dry_run(module, input_shape, "the model", loss=loss,
                      labels=[host.datasets[d].labels for d in datasets])
        return Proposal(
            id=host.new_proposal_id("fl"), driver=caller, role=LOCAL, spec=req["spec"],
            state=state, optimizer=OptimizerSpec.from_json(req.get("optimizer")),
            datasets=datasets, input_shape=input_shape, output_shape=tuple(out.shape[1:]),
            max_batch=max_batch, loss=loss, module=module,
        )

    def _start(self, call: Call) -> tuple[Runtime, Dataset]:
        """Load the weights the request carries; return (runtime, dataset)."""
        rt = call.rt
        assert rt is not None
        ds = self.host.dataset(rt, call.req)
        state = {k[6:]: v for k, v in call.req.items() if k.startswith("state/")}
        load_weights(rt.module, state, self.host.limits.max_abs_value, "the model")
        return rt, ds

    @op("fl_train", roles=(LOCAL,),
        egress={"state/*": LOCAL_WEIGHTS, "records": SCALAR, "steps": SCALAR,
                "loss_sum": SCALAR, "correct": SCALAR})
    def fl_train(self, call: Call) -> dict[str, Any]:
        assert call.rt is not None
        limit = call.rt.proposal.max_batch
        epochs = _int(call.req, "epochs", 1, 1, 100)
        least = self.host.limits.min_local_batch
        batch = _int(call.req, "batch_size", max(min(32, limit), least), least, limit)
        seed = _int(call.req, "seed", 0, 0, 2**62)
        records = epochs * int(self.host.dataset(call.rt, call.req).features.shape[0])
        cap = self.host.limits.max_local_records
        if records > cap:  # before anything is loaded: one call's compute is bounded
            hint = ("ask for fewer epochs per call" if records // epochs <= cap else
                    "the dataset alone is larger, so no call can train on it: the data owner "
                    "would have to raise HostLimits.max_local_records to at least "
                    f"{records // epochs} (fl_gradient and fl_evaluate still run)")
            raise ConfigError(f"{call.rt.id}: {epochs} epochs over the dataset's records are "
                              f"{records} records; this data owner trains at most {cap} per "
                              f"fl_train call (HostLimits.max_local_records): {hint}")
        rt, ds = self._start(call)
        if int(ds.features.shape[0]) < least:
            raise ValidationError(f"{rt.id}: the dataset has fewer records than the data "
                                  f"owner's minimum batch {least}")
        self.host.guard.admit(rt, int(ds.features.shape[0]))  # weights trained on every record
        params = list(rt.module.parameters())
        opt = rt.proposal.optimizer.build(params) if params else None
        loss_fn = LOSSES[str(rt.proposal.loss)]
        g = torch.Generator().manual_seed(seed)
        n = int(ds.features.shape[0])
        loss_sum, correct, steps = 0.0, 0, 0
        rt.module.train()
        for _ in range(epochs):
            loss_sum, correct = 0.0, 0  # figures of the last local epoch
            for idx in _batches(torch.randperm(n, generator=g), batch, least):
                self.host.guard.still_open(call)  # a halt asked now stops it here
                x, y = ds.features[idx].to(torch.float32), _labels(ds)[idx]
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
                logits = rt.module(x)
                loss = loss_fn(logits, y)
                if not bool(torch.isfinite(loss)):
                    raise ValidationError(f"{rt.id}: local training diverged (loss {loss.item()})")
                loss.backward()
                if opt is not None:
                    opt.step()
                steps += 1
                loss_sum += float(loss.detach()) * int(idx.shape[0])
                correct += count_correct(logits, y)
        rt.steps += steps
        out: dict[str, Any] = {f"state/{k}": v.detach().clone()
                               for k, v in rt.module.state_dict().items()}
        out.update(records=n, steps=steps, loss_sum=loss_sum, correct=correct)
        return out

    @op("fl_gradient", roles=(LOCAL,),
        egress={"grad/*": LOCAL_GRADIENT, "buffer/*": LOCAL_WEIGHTS, "count": SCALAR,
                "loss_sum": SCALAR, "correct": SCALAR})
    def fl_gradient(self, call: Call) -> dict[str, Any]:
        rt, ds = self._start(call)
        idx = self.host.guard.indices(rt, call.req, ds)
        least = self.host.limits.min_local_batch
        distinct = int(torch.unique(idx).numel())  # one record's index repeated is one record
        if distinct < least:
            raise ValidationError(f"{rt.id}: a gradient of {distinct} distinct records; the "
                                  f"data owner's minimum batch is {least}")
        self.host.guard.admit(rt, int(idx.shape[0]))
        rt.module.train()
        rt.module.zero_grad(set_to_none=True)
        logits = rt.module(ds.features[idx].to(torch.float32))
        y = _labels(ds)[idx]
        loss = LOSSES[str(rt.proposal.loss)](logits, y)
        loss.backward()
        out: dict[str, Any] = {f"grad/{k}": (p.grad if p.grad is not None
                                             else torch.zeros_like(p)).detach().clone()
                               for k, p in rt.module.named_parameters()}
        out.update({f"buffer/{k}": b.detach().clone() for k, b in rt.module.named_buffers()})
        rt.module.zero_grad(set_to_none=True)
        rt.steps += 1
        out.update(count=int(idx.shape[0]), loss_sum=float(loss.detach()) * int(idx.shape[0]),
                   correct=count_correct(logits, y))
        return out

    @op("fl_evaluate", roles=(LOCAL,), egress={"loss_sum": SCALAR, "correct": SCALAR,
                                                 "count": SCALAR})
    def fl_evaluate(self, call: Call) -> dict[str, Any]:
        rt, ds = self._start(call)
        n = int(ds.features.shape[0])
        self.host.guard.admit(rt, n)  # figures of every record, under weights of the caller's
        loss_fn = LOSSES[str(rt.proposal.loss)]
        loss_sum, correct = 0.0, 0
        rt.module.eval()
        try:
            with torch.no_grad():
                for idx in torch.arange(n).split(rt.proposal.max_batch):
                    self.host.guard.still_open(call)
                    logits = rt.module(ds.features[idx].to(torch.float32))
                    loss_sum += float(loss_fn(logits, _labels(ds)[idx], reduction="sum"))
                    correct += count_correct(logits, _labels(ds)[idx])
        finally:
            rt.module.train()
        return {"loss_sum": loss_sum, "correct": correct, "count": n}


def _batches(perm: torch.Tensor, batch: int, least: int) -> list[torch.Tensor]:
    """``perm`` in batches of ``batch``; a last batch under ``least`` records joins the one
    before it (``least`` <= ``batch`` and <= the record count)."""
    parts = list(perm.split(batch))
    if len(parts) > 1 and parts[-1].shape[0] < least:
        parts[-2:] = [torch.cat(parts[-2:])]
    return parts


def _labels(ds: Dataset) -> torch.Tensor:
    if ds.labels is None:  # refused at proposal already
        raise ConfigError("local training needs labels")
    return ds.labels
