"""Proposals: what a model owner asks to run, checked cheaply; what the data owner approves.

Model-owner ops: ``describe`` (public metadata of the datasets), ``propose`` (a declared segment
spec + initial weights + optimizer + datasets), ``status``. Data-owner ops: ``describe``,
``proposals``, ``review``, ``approve``, ``reject``, ``halt``.

A proposal is refused before any module is built when its caller proposes too often, has
too many pending or too many bytes of weights and specs pending, or when its spec's JSON, its
weights or declared layers exceed the host's :class:`~syft_split.host.records.HostLimits`.
A pending proposal keeps one copy of its weights (its module's; copied at approval, when
training starts). A rejected proposal keeps its
id, driver, shapes, status and spec digest; its spec and initial weights are dropped.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from typing import Any

import torch

from .. import wire
from ..errors import ApprovalError, ConfigError, ProtocolError, ShapeError, ValidationError
from ..losses import LOSSES
from ..spec import OptimizerSpec, module_from_spec
from .admission import check_size, dry_run, load_weights
from .dispatch import Host, OpFamily, op, owner_op, register_family
from .guard import JSON, SCALAR, TEXT, Call, in_window
from .records import ROLES, SHARING, Proposal, Runtime, spec_bytes, state_bytes
from .review import review_text

__all__ = ["ProposalOps", "DEFENCES"]

#: defences a data owner may be asked to apply on its side (see syft_split.defences)
DEFENCES = ("nopeek", "noise_sigma", "label_epsilon", "num_classes")


@register_family
class ProposalOps(OpFamily):
    """Proposals, review and approval (see the module docstring)."""

    name = "proposals"

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self._recent: dict[str, deque[float]] = {}
        #: attempts :meth:`admit` counted (in this process): a changed count says the rate
        #: windows changed and are to be saved, even when the attempt was then refused
        self.charged = 0

    # --------------------------------------------------------------- model-owner ops
    @op("describe", egress={"host": TEXT, "datasets": JSON})
    def describe(self, call: Call | None = None) -> dict[str, Any]:
        return {"host": self.host.name,
                "datasets": {k: d.public_metadata() for k, d in self.host.datasets.items()}}

    @op("status", egress={"segment": TEXT, "status": TEXT, "reason": TEXT, "steps": SCALAR,
                          "last_step": SCALAR, "pending": SCALAR, "recent": JSON})
    def status(self, call: Call) -> dict[str, Any]:
        """Approval status; for a segment that runs, its optimizer steps, the last step id it
        applied (a re-attaching model owner continues after it), whether a step is pending and
        the steps it remembers as ``[step id, op, request digest]`` (a resuming model owner
        tells from them which of its requests were applied)."""
        p = self.host.proposal(str(call.req.get("segment")))
        if p.driver != call.caller:
            from ..errors import AuthorizationError

            raise AuthorizationError(f"{call.caller} did not propose {p.id}")
        out: dict[str, Any] = {"segment": p.id, "status": p.status}
        if p.reason:
            out["reason"] = p.reason[:256]
        rt = self.host.runtimes.get(p.id)
        if rt is not None:
            out["steps"] = rt.steps
            out["last_step"] = rt.last_step
            out["pending"] = rt.pending_output is not None or rt.pending_loss_grads
            out["recent"] = [[r.step, r.op, r.digest] for r in rt.records]
        return out

    @op("propose", mutates=True, egress={"segment": TEXT, "status": TEXT, "output_shape": JSON})
    def propose(self, call: Call) -> dict[str, Any]:
        """A new proposal, pending review. With ``token`` (16-64 hex digits, the model owner's
        choice) the request may be sent again: a proposal this caller made with that token is
        answered (its current status), not made twice."""
        token = _token(call.req.get("token"))
        digest = _request_digest(call.req) if token else ""
        earlier = self._by_token(call.caller, token, digest)
        if earlier is None:
            self.admit(call.caller)  # counted before any work: a refused proposal costs a slot
            earlier = self._parse(call.caller, call.req)
            earlier.token, earlier.request_digest = token, digest
            self.host.add_proposal(earlier)
        return {"segment": earlier.id, "status": earlier.status,
                "output_shape": list(earlier.output_shape)}

    def _by_token(self, caller: str, token: str, digest: str) -> Proposal | None:
        """``caller``'s proposal made with ``token`` (None: none, or no token); refused if it
        was made from another request (a token names one request: spec, weights, datasets,
        options, everything but the token)."""
        if not token:
            return None
        p = next((p for p in self.host.proposals_by_id.values()
                  if p.driver == caller and p.token == token), None)
        if p is not None and p.request_digest != digest:
            raise ProtocolError(f"token {token} was used for proposal {p.id}, with another "
                                "request: a resent proposal must be the same request")
        return p

    def admit(self, caller: str, *, new: bool = True) -> None:
        """Per-user rate and pending caps, before anything of the request is looked at; the
        attempt counts toward the rate whether or not it is then accepted (building and
        dry-running a proposed module is the work the cap bounds). ``new=False`` (an addition
        to a pending proposal, e.g. an auxiliary head): the rate cap only."""
        limits = self.host.limits
        now = time.time()  # wall clock: the window is saved and goes on after a restart
        recent = deque(t for t in self._recent.get(caller, ()) if in_window(t, now))
        self._recent[caller] = recent
        if len(recent) >= limits.max_proposals_per_minute:
            raise ValidationError(f"{caller} proposed {len(recent)} segments in the last minute; "
                                  f"this data owner accepts {limits.max_proposals_per_minute}")
        pending = sum(1 for p in self.host.proposals_by_id.values()
                      if p.driver == caller and p.status == "pending")
        if new and pending >= limits.max_pending:
            raise ValidationError(f"{caller} has {pending} proposals pending review; this data "
                                  f"owner accepts {limits.max_pending}")
        recent.append(now)
        self.charged += 1

    def state(self) -> dict[str, Any]:
        """The proposal-rate windows (wall-clock times of the last minute's attempts) and the
        segments whose halt the data owner asked for (the guard's closed gates)."""
        now = time.time()
        recent = {user: [t for t in times if in_window(t, now)]
                  for user, times in self._recent.items()}
        return {"recent": {user: times for user, times in recent.items() if times},
                "halts": self.host.guard.stops()}

    def restore(self, state: Any) -> None:
        saved = state.get("recent") if isinstance(state, dict) else None
        for user, times in (saved or {}).items():
            self._recent[str(user)] = deque(float(t) for t in times)
        halts = state.get("halts") if isinstance(state, dict) else None
        for segment, reason in (halts if isinstance(halts, dict) else {}).items():
            self.host.guard.stop(str(segment), str(reason))  # a restart keeps them closed

    def stops(self, op: str, fields: Any) -> list[tuple[str, str]]:
        """``halt`` and ``reject`` of an approved segment close its gate at once."""
        segment = fields.get("segment")
        p = self.host.proposals_by_id.get(segment) if isinstance(segment, str) else None
        if op not in ("halt", "reject") or p is None or p.status != "approved":
            return []
        default = "halted by the data owner" if op == "halt" else "rejected by the data owner"
        return [(p.id, str(fields.get("reason", default)))]

    def segment_state(self, rt: Runtime) -> dict[str, Any] | None:
        """The segment's records-per-minute window (``HostLimits.max_records_per_minute``),
        saved with its steps."""
        window = self.host.guard.window(rt.id)
        return None if window is None else {"released": window}

    def restore_segment(self, rt: Runtime, state: dict[str, Any] | None) -> None:
        if state is not None:
            self.host.guard.restore_window(rt.id, state.get("released"))

    def check_pending_bytes(self, caller: str, state: dict[str, Any], *, spec: Any = None,
                            freed: int = 0) -> None:
        """Refuse weights (and a ``spec``) that would take ``caller``'s pending proposals past
        ``HostLimits.max_pending_bytes`` (the host keeps them, and saves them, until the data
        owner decides): their own weights and spec JSON and what families keep for them
        (e.g. a local loss's auxiliary head), less ``freed`` (what the new ones replace)."""
        cap = self.host.limits.max_pending_bytes
        families = list(self.host.families.values())
        held = sum(state_bytes(p.state) + spec_bytes(p.spec)
                   + sum(f.pending_bytes(p) for f in families)
                   for p in self.host.proposals_by_id.values()
                   if p.driver == caller and p.status == "pending") - freed
        new = state_bytes(state) + spec_bytes(spec)
        if held + new > cap:
            raise ValidationError(f"{caller}'s pending proposals hold {held} bytes of weights "
                                  f"and specs; these {new} more exceed the {cap} this data owner "
                                  "accepts until it decides (HostLimits.max_pending_bytes)")

    def _parse(self, caller: str, req: dict[str, Any]) -> Proposal:
        host, limits = self.host, self.host.limits
        role = req.get("role")
        if role not in ROLES:
            raise ConfigError(f"role must be one of {ROLES}, got {role!r}")
        datasets = req.get("datasets")
        if role == "middle" and datasets == []:
            datasets = []  # a relay party runs a middle segment and reads no data
        elif not isinstance(datasets, list) or not datasets or not all(
            isinstance(d, str) and d in host.datasets for d in datasets
        ):
            raise ConfigError(
                f"datasets {datasets!r} must name datasets on {host.name}: {sorted(host.datasets)}"
            )
        state = {k[6:]: v for k, v in req.items() if k.startswith("state/")}
        n_params = sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor))
        if n_params > limits.max_parameters:
            raise ConfigError(f"the proposed weights hold {n_params} values; this data owner "
                              f"accepts at most {limits.max_parameters}")
        self.check_pending_bytes(caller, state, spec=req.get("spec"))
        if role == "input":
            input_shape = tuple(host.datasets[datasets[0]].features.shape[1:])
            for d in datasets:
                if tuple(host.datasets[d].features.shape[1:]) != input_shape:
                    raise ConfigError(f"datasets {datasets} have different feature shapes")
        else:
            raw_shape = req.get("input_shape")
            if not isinstance(raw_shape, list) or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 < s <= limits.max_width
                for s in raw_shape
            ):
                raise ConfigError(f"input_shape must be a list of ints in 1..{limits.max_width}, "
                                  f"got {raw_shape!r}")
            input_shape = tuple(raw_shape)
        max_batch = req.get("max_batch", limits.max_batch)
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or not (
                0 < max_batch <= limits.max_batch):
            raise ConfigError(f"max_batch must be in 1..{limits.max_batch}, got {max_batch!r}")
        check_size(req.get("spec"), limits, "the proposed segment", input_shape=input_shape,
                   max_batch=max_batch)
        module = module_from_spec(req.get("spec"))
        load_weights(module, state, limits.max_abs_value, "the spec")
        loss = req.get("loss")
        if role == "loss":
            if loss not in LOSSES:
                raise ConfigError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
            if any(host.datasets[d].labels is None for d in datasets):
                raise ConfigError(f"role 'loss' needs labels, and {datasets} has none on {host.name}")
        defences = _defences(req.get("defences", {}), role)
        if defences.get("label_epsilon", 0) > 0:  # every label must be one of the classes
            for d in datasets:
                labels = host.datasets[d].labels
                if labels is not None and labels.numel() and not (
                        0 <= int(labels.min()) and int(labels.max()) < defences["num_classes"]):
                    raise ConfigError(f"label_epsilon with num_classes="
                                      f"{int(defences['num_classes'])}: dataset {d!r} holds "
                                      "labels outside [0, num_classes)")
        share_weights = req.get("share_weights", "none")
        if share_weights not in SHARING:
            raise ConfigError(f"share_weights must be one of {SHARING}, got {share_weights!r}")
        release_labels = req.get("release_labels", False)
        if not isinstance(release_labels, bool):
            raise ConfigError(f"release_labels must be a bool, got {release_labels!r}")
        if release_labels and (role != "input"
                               or any(host.datasets[d].labels is None for d in datasets)):
            raise ConfigError("release_labels needs an input segment on datasets with labels")
        out = dry_run(module, input_shape, "the loss segment" if role == "loss" else "segment",
                      loss=loss if role == "loss" else None,
                      labels=[host.datasets[d].labels for d in datasets])
        he = req.get("he")
        if he is not None:
            if role != "input" or not isinstance(he, dict):
                raise ConfigError("encryption applies to a data owner's input segment only")
            d_in = math.prod(out.shape[1:])
            if he.get("d_in") != d_in:
                raise ShapeError(f"encrypted layer expects d_in={he.get('d_in')}, but this "
                                 f"segment outputs {tuple(out.shape[1:])} = {d_in} features")
            _bound_agreement(he, max_batch, limits)
        return Proposal(
            id=host.new_proposal_id("seg"), driver=caller, role=role, spec=req["spec"],
            state=state, optimizer=OptimizerSpec.from_json(req.get("optimizer")),
            datasets=datasets, input_shape=input_shape, output_shape=tuple(out.shape[1:]),
            max_batch=max_batch, loss=loss if role == "loss" else None,
            release_labels=release_labels, module=module, share_weights=share_weights,
            defences=defences, he=he,
        )

    # ----------------------------------------------------------------- data-owner ops
    @owner_op("describe", mutates=False)
    def owner_describe(self) -> dict[str, Any]:
        return self.describe()

    @owner_op("proposals", mutates=False)
    def owner_proposals(self, status: str | None = None) -> dict[str, Any]:
        return {"proposals": [
            {"id": p.id, "driver": p.driver, "role": p.role, "status": p.status,
             "datasets": p.datasets, "input_shape": list(p.input_shape),
             "output_shape": list(p.output_shape), "max_batch": p.max_batch}
            for p in self.host.proposals(status if isinstance(status, str) else None)
        ]}

    @owner_op("review", mutates=False)
    def owner_review(self, segment: str) -> dict[str, Any]:
        p = self.host.proposal(segment)
        if p.module is None:
            raise ApprovalError(f"proposal {segment} is {p.status}: its spec and weights are no "
                                f"longer kept (spec sha256 {p.spec_digest or '?'})")
        extra = [line for fam in self.host.families.values() for line in fam.review_lines(p)]
        return {"text": review_text(self.host, p, extra)}

    @owner_op("approve")
    def owner_approve(self, segment: str, **options: Any) -> dict[str, Any]:
        p = self.host.proposal(segment)
        if p.status != "pending":
            raise ApprovalError(f"proposal {segment} is {p.status}, not pending")
        assert p.module is not None
        params = list(p.module.parameters())
        rt = Runtime(p, p.module, p.optimizer.build(params) if params else None)
        # the pending proposal shared its module's tensors (load_weights): training changes
        # those, and p.state stays the initial weights
        initial = {k: v.clone() for k, v in p.state.items()}
        rt.fresh_secrets(self.host.label_key)
        opts = dict(options)
        for family in self.host.families.values():
            family.on_approve(rt, opts)
        if opts:
            raise ConfigError(f"unknown approval options {sorted(opts)}")
        self.host.runtimes[p.id] = rt
        p.state, p.status = initial, "approved"
        return {"segment": p.id, "status": "approved"}

    @owner_op("reject")
    def owner_reject(self, segment: str, reason: str = "rejected by the data owner"
                     ) -> dict[str, Any]:
        p = self.host.proposal(segment)
        p.status = "rejected"
        p.reason = p.reason or str(reason)  # a halted segment keeps why it was halted
        p.forget()  # kept until the end, restored on every restart: not its weights
        self.host.runtimes.pop(p.id, None)
        for family in self.host.families.values():
            family.on_reject(p)
        return {"segment": p.id, "status": "rejected"}

    @owner_op("halt")
    def owner_halt(self, segment: str, reason: str = "halted by the data owner") -> dict[str, Any]:
        self.host.halt(segment, str(reason))
        return {"segment": segment, "status": "halted"}


def _defences(defences: Any, role: str) -> dict[str, float]:
    if not isinstance(defences, dict) or set(defences) - set(DEFENCES) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        for v in defences.values()
    ):
        raise ConfigError(f"defences must map {sorted(DEFENCES)} to numbers >= 0, got {defences!r}")
    if defences and role != "input":
        raise ConfigError("defences apply to a data owner's input segment only")
    if defences.get("label_epsilon", 0) > 0 and int(defences.get("num_classes", 0)) < 2:
        raise ConfigError("label_epsilon needs num_classes >= 2")
    return {k: float(v) for k, v in defences.items()}


#: the largest CKKS ring an agreement may ask for (keys and contexts grow with it)
MAX_POLY_MODULUS_DEGREE = 16384


def _bound_agreement(he: dict[str, Any], max_batch: int, limits: Any) -> None:
    """An encryption agreement within the host's limits before anything is built from it: its
    batch within the segment's ``max_batch``, its ring at most 2^14, and the matrices the data
    owner's review, keys and steps handle (rows x d_in, d_in x d_out, rows x d_out) within
    ``max_parameters`` elements each (an agreement is what the model owner chooses); its
    security options no weaker than the host's floors (``HostLimits.he_min_share_bound``,
    ``he_min_flood_margin``)."""
    from he_layers.review import spec_from_agreement

    spec, params = spec_from_agreement(he)
    if spec.batch_size > max_batch:
        raise ConfigError(f"the encrypted layer's batch_size {spec.batch_size} exceeds this "
                          f"segment's max_batch {max_batch}")
    if params.poly_modulus_degree > MAX_POLY_MODULUS_DEGREE:
        raise ConfigError(f"poly_modulus_degree {params.poly_modulus_degree}: this data owner "
                          f"accepts at most {MAX_POLY_MODULUS_DEGREE}")
    if spec.level == "B" and spec.share_bound < limits.he_min_share_bound:
        raise ConfigError(f"share_bound {spec.share_bound:g}: this data owner needs level B's "
                          f"share in at least +-{limits.he_min_share_bound:g} (a small share "
                          "hides little of the weight gradient, which reveals the inputs)")
    if spec.level == "B" and spec.lr is not None and (
            spec.share_bound / spec.lr < limits.he_min_grad_mask):
        raise ConfigError(f"share_bound / lr = {spec.share_bound / spec.lr:.3g}: level B hides "
                          "the weight gradient under the share's change divided by lr, and "
                          f"this data owner needs at least {limits.he_min_grad_mask:g} (a "
                          "larger lr shows the model owner the weight gradient, which reveals "
                          "the inputs)")
    margin = params.global_scale_bits - spec.flood_bits
    if margin < limits.he_min_flood_margin:
        raise ConfigError(f"flood_bits {spec.flood_bits} at scale 2^{params.global_scale_bits}: "
                          f"the flooding noise lies {margin} bits above the encoding unit; this "
                          f"data owner needs at least {limits.he_min_flood_margin} (less noise "
                          "hides less of the CKKS noise, which depends on the secret key)")
    for what, n in (("rows x d_in", spec.rows * spec.mat_in),
                    ("d_in x d_out", spec.mat_in * spec.mat_out),
                    ("rows x d_out", spec.rows * spec.mat_out)):
        if n > limits.max_parameters:
            raise ConfigError(f"the encrypted layer's {what} is {n} elements; this data owner "
                              f"accepts at most {limits.max_parameters}")
    from he_layers import estimate_step_bytes

    b = estimate_step_bytes(he)  # a step that cannot cross the wire is refused now, not at
    for what, n, cap in (("leave", b["bytes_up"], wire.DEFAULT_MAX_BYTES),  # every forward
                         ("arrive", b["bytes_down"], limits.max_request_bytes)):
        if n > cap:
            raise ConfigError(f"a training step of the encrypted layer would {what} as {n} "
                              f"bytes; this data owner's messages take at most {cap}")


def _token(value: Any) -> str:
    """A propose request's token: absent, or 16-64 lowercase hex digits."""
    if value is None:
        return ""
    if not isinstance(value, str) or not 16 <= len(value) <= 64 or not all(
            c in "0123456789abcdef" for c in value):
        raise ProtocolError("token must be 16-64 lowercase hex digits")
    return value


def _request_digest(req: dict[str, Any]) -> str:
    """The sha256 of a propose request's fields but its token (in a fixed order)."""
    return hashlib.sha256(wire.encode({k: req[k] for k in sorted(req) if k != "token"})
                          ).hexdigest()
