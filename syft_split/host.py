"""The data owner's side: datasets, proposals, one-time approval, segment runtimes, audit.

A :class:`DataOwnerHost` is transport-free. Its wire entry is :meth:`DataOwnerHost.handle`
(``caller``, request bytes) -> response bytes; the in-process transport calls it directly and
the PySyft plugin calls it from inside a datasite's API endpoint. Its owner-side API
(:meth:`review`, :meth:`approve`, :meth:`export_weights`, ...) is never reachable over the wire.

Ops a model owner may send:

=============  ==========================================================================
``describe``   public metadata of the host's datasets (sizes, feature shapes) — no values
``propose``    a segment spec + initial weights + optimizer + datasets + driver
``status``     whether a proposal is pending / approved / rejected
``forward``    run an approved segment on record indices (first segment) or on an incoming
               activation; may carry ``grad``, the gradient of the previous forward (fused)
``backward``   gradient for the pending forward; runs backward and an optimizer step here
``loss_step``  last segment + loss on labels held here (U-shaped); labels never leave
``discard``    drop a pending forward (e.g. the model owner's step failed)
``export``     the segment's weights, if released by the owner or approved for sharing
``import``     replace the weights (relay / SplitFed averaging), if approved for sharing
``seal``       the weights encrypted for a peer data owner the owner trusts (peer relay)
``unseal``     load weights sealed by a trusted peer
``leakage``    the data owner measures what its activations leak (scalars only)
=============  ==========================================================================

Weight sharing is part of what the data owner approves: ``share_weights`` is ``"none"``,
``"model_owner"`` (the model owner may read and replace the segment's weights, e.g. to average
them in SplitFed or relay them to the next client) or ``"peer"`` (weights move only between
data owners, encrypted with public-key authenticated encryption for a peer whose key the owner
pinned with :meth:`DataOwnerHost.trust_peer`; the model owner relays ciphertext it cannot read).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import wire
from .alignment import AlignmentOps
from .errors import (
    AccessError,
    ApprovalError,
    AuthorizationError,
    ConfigError,
    EgressError,
    ProtocolError,
    ShapeError,
    SyftSplitError,
    ValidationError,
    WireError,
)
from .he import HEHostOps
from .spec import OptimizerSpec, count_parameters, describe, module_from_spec

__all__ = ["DataOwnerHost", "Dataset", "Proposal", "AuditEntry", "LOSSES"]

#: losses a label-holding segment may compute (name -> function(logits, labels, reduction)).
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "bce_with_logits": F.binary_cross_entropy_with_logits,
}

_ROLES = ("input", "middle", "loss")
_SHARING = ("none", "model_owner", "peer")


@dataclass
class Dataset:
    """Private features (and optionally labels, record ids and a public mock) a data owner
    holds, by record index. ``mock`` is synthetic/public data of the same shape (PySyft's mock
    asset), used only for leakage measurement."""

    features: torch.Tensor
    labels: torch.Tensor | None = None
    ids: list[str | int] | None = None
    mock: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.features.dim() < 2 or self.features.shape[0] == 0:
            raise ConfigError(f"features must be (records, ...), got {tuple(self.features.shape)}")
        if self.labels is not None and self.labels.shape[0] != self.features.shape[0]:
            raise ConfigError(
                f"labels have {self.labels.shape[0]} records, features {self.features.shape[0]}"
            )
        if self.ids is not None and len(self.ids) != self.features.shape[0]:
            raise ConfigError(f"ids have {len(self.ids)} records, features {self.features.shape[0]}")
        if self.mock is not None and tuple(self.mock.shape[1:]) != tuple(self.features.shape[1:]):
            raise ConfigError(f"mock rows {tuple(self.mock.shape[1:])} differ from the features' "
                              f"{tuple(self.features.shape[1:])}")

    def public_metadata(self) -> dict[str, Any]:
        return {
            "records": int(self.features.shape[0]),
            "feature_shape": list(self.features.shape[1:]),
            "feature_dtype": str(self.features.dtype).removeprefix("torch."),
            "has_labels": self.labels is not None,
            "has_ids": self.ids is not None,
        }

    def subset(self, rows: torch.Tensor) -> Dataset:
        """The records at ``rows``, in that order."""
        ids = None if self.ids is None else [self.ids[int(r)] for r in rows]
        return Dataset(self.features[rows], None if self.labels is None else self.labels[rows],
                       ids, self.mock)


@dataclass
class Proposal:
    """A segment a model owner asked to run here, as the data owner reviews it."""

    id: str
    driver: str
    role: str
    spec: dict[str, Any]
    state: dict[str, torch.Tensor]
    optimizer: OptimizerSpec
    datasets: list[str]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    max_batch: int
    loss: str | None = None
    release_labels: bool = False
    share_weights: str = "none"
    defences: dict[str, float] = field(default_factory=dict)
    he: dict[str, Any] | None = None
    status: str = "pending"
    module: nn.Module | None = field(default=None, repr=False)


@dataclass(frozen=True)
class AuditEntry:
    """One call the host answered: who, which op, on what, how big, how long, outcome."""

    time: float
    caller: str
    op: str
    segment: str | None
    shapes: dict[str, list[int]]
    bytes_in: int
    bytes_out: int
    seconds: float
    outcome: str


@dataclass
class _Runtime:
    proposal: Proposal
    module: nn.Module
    optimizer: torch.optim.Optimizer | None
    pending_input: torch.Tensor | None = None
    pending_output: torch.Tensor | None = None
    pending_penalty: torch.Tensor | None = None
    steps: int = 0
    rng: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    last_penalty: float | None = None
    he: Any = None


class DataOwnerHost(AlignmentOps, HEHostOps):
    """Everything a data owner runs: see the module docstring for the ops it answers."""

    def __init__(
        self,
        name: str,
        datasets: dict[str, Dataset] | None = None,
        *,
        max_request_bytes: int = 64 * 1024 * 1024,
        max_batch: int = 4096,
    ) -> None:
        self.name = name
        self.datasets: dict[str, Dataset] = dict(datasets or {})
        self.max_request_bytes = max_request_bytes
        self.max_batch = max_batch
        self.audit: list[AuditEntry] = []
        self._proposals: dict[str, Proposal] = {}
        self._runtimes: dict[str, _Runtime] = {}
        self._released: set[str] = set()
        self._ids = itertools.count(1)
        self._box_key: Any = None
        self._peers: dict[str, bytes] = {}
        AlignmentOps.__init__(self)

    # ----------------------------------------------------------------- owner-side API
    def add_dataset(self, name: str, features: torch.Tensor, labels: torch.Tensor | None = None,
                    *, ids: list[str | int] | None = None,
                    mock: torch.Tensor | None = None) -> None:
        """Hold ``features`` (and ``labels``, record ``ids``) under ``name``; they never leave
        this host. ``mock`` is public look-alike data (leakage measurement only)."""
        self.datasets[name] = Dataset(features, labels, ids, mock)

    def proposals(self, status: str | None = None) -> list[Proposal]:
        return [p for p in self._proposals.values() if status is None or p.status == status]

    def review(self, proposal_id: str) -> str:
        """What the data owner reads before approving: layers, parameters, what leaves."""
        p = self._proposal(proposal_id)
        assert p.module is not None
        out_bytes = 4 * math.prod(p.output_shape)
        leaves = {
            "input": f"activations float32 (batch, {', '.join(map(str, p.output_shape))})",
            "middle": f"activations float32 (batch, {', '.join(map(str, p.output_shape))}) and "
                      f"the gradient w.r.t. its input (batch, {', '.join(map(str, p.input_shape))})",
            "loss": f"the gradient w.r.t. its input (batch, {', '.join(map(str, p.input_shape))})"
                    " and two status scalars (loss, correct count); labels and outputs stay here",
        }[p.role]
        if p.role == "loss":
            out_bytes = 4 * math.prod(p.input_shape)
        if p.he is not None:
            leaves = (f"activations ONLY AS CKKS CIPHERTEXTS (level {p.he['level']}; keys are "
                      "made here at approval, the secret key never leaves) and masked decryptions")
        lines = [
            f"Proposal {p.id} from {p.driver} (role: {p.role}, status: {p.status})",
            f"  reads datasets: {p.datasets}; input per record {p.input_shape}",
            "  layers:",
            *("    " + line for line in describe(p.module, p.input_shape)),
            f"  parameters: {count_parameters(p.module)}; optimizer: {p.optimizer!r}",
            f"  leaves per step: {leaves}",
            f"  bytes leaving per record: {out_bytes}; max batch {p.max_batch} "
            f"(<= {out_bytes * p.max_batch} bytes per step)",
        ]
        if p.role == "input":
            lines.extend(self._review_leakage(p))
        if p.loss:
            lines.append(f"  loss computed here: {p.loss}")
        if p.release_labels:
            lines.append("  ALSO RELEASES LABELS of each batch to the model owner")
        if p.he is not None:
            lines.append(f"  encryption agreement: {p.he}")
        for name, value in p.defences.items():
            lines.append(f"  defence here: {name}={value}")
        if p.share_weights == "model_owner":
            lines.append("  WEIGHTS SHARED: the model owner may read and replace this segment's "
                         "weights (relay / SplitFed averaging)")
        elif p.share_weights == "peer":
            lines.append("  weights move only to/from peers you trust (trust_peer), encrypted; "
                         "the model owner relays ciphertext")
        return "\n".join(lines)

    def _review_leakage(self, p: Proposal) -> list[str]:
        """Measured on the owner's own records: how much the proposed outputs reveal."""
        from .leakage import dcor_leakage

        assert p.module is not None
        x = self.datasets[p.datasets[0]].features[:128].to(torch.float32)
        was = p.module.training
        p.module.eval()
        with torch.no_grad():
            out = p.module(x)
        p.module.train(was)
        lines = [f"  measured on {x.shape[0]} of your records: distance correlation between "
                 f"your data and what would leave = {dcor_leakage(x, out):.3f} (1.0: a copy)"]
        if math.prod(p.output_shape) >= math.prod(p.input_shape):
            lines.append(f"  WARNING: {math.prod(p.output_shape)} values leave per record, at "
                         f"least the {math.prod(p.input_shape)} it has: such a segment can pass "
                         "your data through (e.g. identity weights)")
        return lines

    def approve(self, proposal_id: str) -> None:
        """Approve once: installs the segment's runtime; only the proposal's driver may use it."""
        p = self._proposal(proposal_id)
        if p.status != "pending":
            raise ApprovalError(f"proposal {proposal_id} is {p.status}, not pending")
        assert p.module is not None
        params = list(p.module.parameters())
        rt = _Runtime(p, p.module, p.optimizer.build(params) if params else None)
        if p.he is not None:  # fresh CKKS keys for this run; the secret key never leaves
            rt.he = self._he_build(p.he)
        self._runtimes[p.id] = rt
        p.status = "approved"

    def reject(self, proposal_id: str) -> None:
        p = self._proposal(proposal_id)
        p.status = "rejected"
        self._runtimes.pop(p.id, None)

    def release_weights(self, proposal_id: str) -> None:
        """Allow the driver to fetch this segment's weights (op ``export``) from now on."""
        self._proposal(proposal_id)
        self._released.add(proposal_id)

    def public_key(self) -> bytes:
        """This host's public key for peer weight exchange (give it to trusted peers)."""
        return bytes(self._keypair().public_key)

    def trust_peer(self, name: str, public_key: bytes) -> None:
        """Pin a peer data owner's public key: only pinned peers can send or receive weights."""
        if not isinstance(public_key, bytes) or len(public_key) != 32:
            raise ConfigError(f"a public key is 32 bytes, got {public_key!r:.40}")
        self._peers[name] = public_key

    def _keypair(self) -> Any:
        if self._box_key is None:
            from nacl.public import PrivateKey

            self._box_key = PrivateKey.generate()
        return self._box_key

    def export_weights(self, proposal_id: str) -> dict[str, torch.Tensor]:
        """The segment's current weights, for the data owner (never sent unless released)."""
        rt = self._runtime_for_owner(proposal_id)
        return {k: v.detach().clone() for k, v in rt.module.state_dict().items()}

    def optimizer_state(self, proposal_id: str) -> dict[str, Any]:
        opt = self._runtime_for_owner(proposal_id).optimizer
        return {} if opt is None else opt.state_dict()

    def audit_log(self) -> list[dict[str, Any]]:
        """Every call answered so far, as plain dicts (who, op, segment, shapes, bytes, time)."""
        return [dict(vars(e)) for e in self.audit]

    def _runtime_for_owner(self, proposal_id: str) -> _Runtime:
        rt = self._runtimes.get(proposal_id)
        if rt is None:
            raise ApprovalError(f"segment {proposal_id} is not approved on {self.name}")
        return rt

    def _proposal(self, proposal_id: str) -> Proposal:
        p = self._proposals.get(proposal_id)
        if p is None:
            raise ApprovalError(
                f"no proposal {proposal_id!r} on {self.name}; known: {sorted(self._proposals)}"
            )
        return p

    # ----------------------------------------------------------------------- wire entry
    def handle(self, caller: str, data: bytes) -> bytes:
        """Answer one request from ``caller``; errors come back as (class name, message)."""
        t0 = time.perf_counter()
        op, segment, shapes = "?", None, {}
        try:
            request = wire.decode(data, max_bytes=self.max_request_bytes)
            op = str(request.pop("op", "?"))
            segment = request.get("segment") if isinstance(request.get("segment"), str) else None
            shapes = {k: list(v.shape) for k, v in request.items() if isinstance(v, torch.Tensor)}
            handler = getattr(self, f"_op_{op}", None)
            if handler is None:
                raise ProtocolError(
                    f"unknown op {op!r}; known: {sorted(n[4:] for n in dir(self) if n.startswith('_op_'))}"
                )
            with torch.enable_grad():  # the caller's grad mode is not ours
                response = handler(caller, request)
            raw = wire.encode(response)
            outcome = "ok"
        except SyftSplitError as exc:
            raw = wire.encode({"error": type(exc).__name__, "message": str(exc)})
            outcome = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a bug or torch failure: report, never crash the host
            raw = wire.encode({"error": "RemoteError", "message": f"{type(exc).__name__}: {exc}"})
            outcome = f"RemoteError: {type(exc).__name__}: {exc}"
        self.audit.append(AuditEntry(time.time(), caller, op, segment, shapes, len(data),
                                     len(raw), time.perf_counter() - t0, outcome))
        return raw

    # ---------------------------------------------------------------------------- ops
    def _op_describe(self, caller: str, req: dict[str, Any]) -> dict[str, Any]:
        return {"host": self.name,
                "datasets": {k: d.public_metadata() for k, d in self.datasets.items()}}

    def _op_propose(self, caller: str, req: dict[str, Any]) -> dict[str, Any]:
        role = req.get("role")
        if role not in _ROLES:
            raise ConfigError(f"role must be one of {_ROLES}, got {role!r}")
        datasets = req.get("datasets")
        if role == "middle" and datasets == []:
            datasets = []  # a relay party runs a middle segment and reads no data
        elif not isinstance(datasets, list) or not datasets or not all(
            isinstance(d, str) and d in self.datasets for d in datasets
        ):
            raise ConfigError(
                f"datasets {datasets!r} must name datasets on {self.name}: {sorted(self.datasets)}"
            )
        module = module_from_spec(req.get("spec"))
        state = {k[6:]: v for k, v in req.items() if k.startswith("state/")}
        own = module.state_dict()
        if set(state) != set(own):
            raise ConfigError(f"weights {sorted(state)} do not match the spec's {sorted(own)}")
        for k, v in state.items():
            if v.shape != own[k].shape or v.dtype != own[k].dtype:
                raise ShapeError(f"weight {k}: expected {tuple(own[k].shape)} {own[k].dtype}, "
                                 f"got {tuple(v.shape)} {v.dtype}")
            wire.check_tensor(v, f"weight {k}", nonempty=False)
        module.load_state_dict(state)
        if role == "input":
            input_shape = tuple(self.datasets[datasets[0]].features.shape[1:])
            for d in datasets:
                if tuple(self.datasets[d].features.shape[1:]) != input_shape:
                    raise ConfigError(f"datasets {datasets} have different feature shapes")
        else:
            raw_shape = req.get("input_shape")
            if not isinstance(raw_shape, list) or not all(isinstance(s, int) and s > 0
                                                          for s in raw_shape):
                raise ConfigError(f"input_shape must be a list of positive ints, got {raw_shape!r}")
            input_shape = tuple(raw_shape)
        loss = req.get("loss")
        if role == "loss":
            if loss not in LOSSES:
                raise ConfigError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
            if any(self.datasets[d].labels is None for d in datasets):
                raise ConfigError(f"role 'loss' needs labels, and {datasets} has none on {self.name}")
        defences = req.get("defences", {})
        allowed = {"nopeek", "noise_sigma", "label_epsilon", "num_classes"}
        if not isinstance(defences, dict) or set(defences) - allowed or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            for v in defences.values()
        ):
            raise ConfigError(f"defences must map {sorted(allowed)} to numbers >= 0, "
                              f"got {defences!r}")
        if defences and role != "input":
            raise ConfigError("defences apply to a data owner's input segment only")
        if defences.get("label_epsilon", 0) > 0 and int(defences.get("num_classes", 0)) < 2:
            raise ConfigError("label_epsilon needs num_classes >= 2")
        share_weights = req.get("share_weights", "none")
        if share_weights not in _SHARING:
            raise ConfigError(f"share_weights must be one of {_SHARING}, got {share_weights!r}")
        release_labels = bool(req.get("release_labels", False))
        if release_labels and any(self.datasets[d].labels is None for d in datasets):
            raise ConfigError("release_labels asked for datasets without labels")
        try:
            with torch.no_grad():
                module.eval()
                out = module(torch.zeros((2, *input_shape)))
                module.train()
        except Exception as exc:
            raise ConfigError(f"segment does not accept input {input_shape}: {exc}") from exc
        he = req.get("he")
        if he is not None:
            if role != "input" or not isinstance(he, dict):
                raise ConfigError("encryption applies to a data owner's input segment only")
            d_in = math.prod(out.shape[1:])
            if he.get("d_in") != d_in:
                raise ShapeError(f"encrypted layer expects d_in={he.get('d_in')}, but this "
                                 f"segment outputs {tuple(out.shape[1:])} = {d_in} features")
        max_batch = req.get("max_batch", self.max_batch)
        if not isinstance(max_batch, int) or not 0 < max_batch <= self.max_batch:
            raise ConfigError(f"max_batch must be in 1..{self.max_batch}, got {max_batch!r}")
        pid = f"{self.name}/seg{next(self._ids)}"
        self._proposals[pid] = Proposal(
            id=pid, driver=caller, role=role, spec=req["spec"], state=state,
            optimizer=OptimizerSpec.from_json(req.get("optimizer")), datasets=datasets,
            input_shape=input_shape, output_shape=tuple(out.shape[1:]), max_batch=max_batch,
            loss=loss if role == "loss" else None, release_labels=release_labels, module=module,
            share_weights=share_weights, defences={k: float(v) for k, v in defences.items()},
            he=he,
        )
        return {"segment": pid, "status": "pending", "output_shape": list(out.shape[1:])}

    def _op_status(self, caller: str, req: dict[str, Any]) -> dict[str, Any]:
        p = self._proposal(str(req.get("segment")))
        if p.driver != caller:
            raise AuthorizationError(f"{caller} did not propose {p.id}")
        return {"segment": p.id, "status": p.status}

    def _runtime(self, caller: str, req: dict[str, Any], role: tuple[str, ...]) -> _Runtime:
        seg = req.get("segment")
        p = self._proposals.get(seg) if isinstance(seg, str) else None
        if p is None or p.status != "approved":
            state = "unknown" if p is None else p.status
            raise ApprovalError(f"segment {seg!r} is {state} on {self.name}: it cannot run")
        if caller != p.driver:
            raise AuthorizationError(
                f"{caller} may not drive {p.id}; the data owner approved {p.driver}"
            )
        if p.role not in role:
            raise ProtocolError(f"segment {p.id} has role {p.role!r}; this op needs {role}")
        return self._runtimes[p.id]

    def _dataset(self, rt: _Runtime, req: dict[str, Any]) -> Dataset:
        name = req.get("dataset", rt.proposal.datasets[0])
        if name not in rt.proposal.datasets:
            raise AccessError(f"segment {rt.proposal.id} was approved for {rt.proposal.datasets}, "
                              f"not {name!r}")
        return self.datasets[name]

    def _indices(self, rt: _Runtime, req: dict[str, Any], ds: Dataset) -> torch.Tensor:
        idx = wire.check_tensor(req.get("indices"), "indices", shape=(None,), dtype=torch.int64)
        if idx.shape[0] > rt.proposal.max_batch:
            raise ValidationError(f"indices: batch of {idx.shape[0]} exceeds the approved "
                                  f"max_batch {rt.proposal.max_batch}")
        n = ds.features.shape[0]
        if bool((idx < 0).any()) or bool((idx >= n).any()):
            raise ValidationError(f"indices must be in 0..{n - 1}")
        return idx

    def _activation_in(self, rt: _Runtime, req: dict[str, Any], name: str = "x") -> torch.Tensor:
        x = wire.check_tensor(req.get(name), name, shape=(None, *rt.proposal.input_shape),
                              dtype=torch.float32)
        if x.shape[0] > rt.proposal.max_batch:
            raise ValidationError(f"{name}: batch of {x.shape[0]} exceeds the approved "
                                  f"max_batch {rt.proposal.max_batch}")
        return x

    def _check_grad(self, rt: _Runtime, grad: Any) -> torch.Tensor:
        if rt.pending_output is None:
            raise ProtocolError(f"gradient for {rt.proposal.id} without a pending forward")
        return wire.check_tensor(grad, "grad", shape=tuple(rt.pending_output.shape),
                                 dtype=torch.float32)

    def _apply_grad(self, rt: _Runtime, grad: torch.Tensor) -> torch.Tensor | None:
        assert rt.pending_output is not None
        if rt.optimizer is not None:
            rt.optimizer.zero_grad(set_to_none=True)
        if rt.pending_penalty is not None:  # NoPeek: the data owner's own extra loss term
            torch.autograd.backward([rt.pending_output, rt.pending_penalty],
                                    [grad, torch.ones_like(rt.pending_penalty)])
        else:
            rt.pending_output.backward(grad)
        if rt.optimizer is not None:
            rt.optimizer.step()
            rt.optimizer.zero_grad(set_to_none=True)
        grad_in = rt.pending_input.grad if rt.pending_input is not None else None
        rt.pending_input = rt.pending_output = rt.pending_penalty = None
        rt.steps += 1
        return None if grad_in is None else grad_in.detach()

    def _egress(self, rt: _Runtime, out: torch.Tensor, batch: int,
                shape: tuple[int, ...] | None = None) -> torch.Tensor:
        want = (batch, *(shape if shape is not None else rt.proposal.output_shape))
        if tuple(out.shape) != want or out.dtype != torch.float32:
            raise EgressError(
                f"segment {rt.proposal.id} tried to release {tuple(out.shape)} {out.dtype}; "
                f"approved: {want} torch.float32"
            )
        return out.detach().contiguous()

    def _op_forward(self, caller: str, req: dict[str, Any]) -> dict[str, Any]:
        rt = self._runtime(caller, req, ("input", "middle"))
        train = bool(req.get("train", True))
        # validate everything before changing anything
        grad = self._check_grad(rt, req["grad"]) if "grad" in req else None
        if rt.proposal.role == "input":
            ds = self._dataset(rt, req)
            idx = self._indices(rt, req, ds)
            x = ds.features[idx].to(torch.float32)
        else:
            ds, idx = None, None
            x = self._activation_in(rt, req)
        if train and grad is None and rt.pending_output is not None:
            raise ProtocolError(f"segment {rt.proposal.id} has a forward pending its gradient; "
                                "send it (field 'grad') or 'discard' it first")
        if grad is not None:
            self._apply_grad(rt, grad)
        response: dict[str, Any] = {}
        if train:
            rt.module.train()
            if rt.proposal.role == "middle":
                x = x.requires_grad_()
            out = rt.module(x)
            rt.pending_input = x if rt.proposal.role == "middle" else None
            rt.pending_output = out
            nopeek = rt.proposal.defences.get("nopeek", 0.0)
            if nopeek > 0:
                from .defences import distance_correlation

                rt.pending_penalty = nopeek * distance_correlation(x, out)
                rt.last_penalty = float(rt.pending_penalty.detach())
        else:
            rt.module.eval()
            with torch.no_grad():
                out = rt.module(x)
            rt.module.train()
        if rt.he is not None:  # only ciphertexts of the approved output leave
            flat = self._egress(rt, out, x.shape[0]).flatten(1)
            response["he_input"] = rt.he.encrypt_input(flat, need_grad=train)
            return response
        sigma = rt.proposal.defences.get("noise_sigma", 0.0)
        if sigma > 0:
            from .defences import gaussian_noise

            out = gaussian_noise(out.detach(), sigma, rt.rng)
        response["activation"] = self._egress(rt, out, x.shape[0])
        if rt.proposal.release_labels and ds is not None and idx is not None:
            assert ds.labels is not None
            labels = ds.labels[idx].clone()
            eps = rt.proposal.defences.get("label_epsilon", 0.0)
            if eps > 0:
                from .defences import randomized_response

                classes = int(rt.proposal.defences["num_classes"])
                labels = randomized_response(labels, classes, eps, rt.rng)
            response["labels"] = labels
        return response

    def _op_backward(self, caller: str, req: dict[str, Any]) -> dict[str, Any]:
        rt = self._runtime(caller, req, ("input", "middle"))
        grad = self._check_grad(rt, req.get("grad"))
        batch_in = rt.pending_input.shape[0] if rt.pending_input is not None else 0
        grad_in = self._apply_grad(rt, grad)
        out: dict[str, Any] = {"steps": rt.steps}
        if grad_in is not None:
            out["grad_input"] = self._egress(rt, grad_in, batch_in, rt.proposal.input_shape)
        return out

    def _op_discard(self, caller: str, req: dict[str, Any]) -> dict[str, Any]:
        rt = self._runtime(caller, req, _ROLES)
        dropped = rt.pending_output is not None
        rt.pending_input = rt.pending_output = None
        return {"discarded": dropped}

    def _op_loss_step(self, caller: str, req: dict[str, Any]) -> dict[str, Any]:
        rt = self._runtime(caller, req, ("loss",))
        ds = self._dataset(rt, req)
        idx = self._indices(rt, req, ds)
        x = self._activation_in(rt, req)
        if x.shape[0] != idx.shape[0]:
            raise ShapeError(f"x has {x.shape[0]} rows but indices {idx.shape[0]}")
        train = bool(req.get("train", True))
        assert ds.labels is not None and rt.proposal.loss is not None
        y = ds.labels[idx]
        loss_fn = LOSSES[rt.proposal.loss]
        if train:
            rt.module.train()
            x = x.requires_grad_()
            logits = rt.module(x)
            loss = loss_fn(logits, y)
            loss.backward()
            if rt.optimizer is not None:
                rt.optimizer.step()
                rt.optimizer.zero_grad(set_to_none=True)
            rt.steps += 1
            assert x.grad is not None
            grad_in = self._egress(rt, x.grad, x.shape[0], rt.proposal.input_shape)
            loss_sum = float(loss.detach()) * x.shape[0]
        else:
            rt.module.eval()
            with torch.no_grad():
                logits = rt.module(x)
                loss_sum = float(loss_fn(logits, y, reduction="sum"))
            rt.module.train()
            grad_in = None
        correct = int((logits.argmax(1) == y).sum()) if logits.dim() == 2 and y.dim() == 1 else 0
        out: dict[str, Any] = {"loss_sum": loss_sum, "correct": correct, "count": int(x.shape[0])}
        if grad_in is not None:
            out["grad_input"] = grad_in
        return out

    def _op_export(self, caller: str, req: dict[str, Any]) -> dict[str, Any]:
        rt = self._runtime(caller, req, _ROLES)
        p = rt.proposal
        if p.id not in self._released and p.share_weights != "model_owner":
            raise AccessError(f"the data owner has not released the weights of {p.id}")
        return {f"state/{k}": v for k, v in self.export_weights(p.id).items()}

    def _new_state(self, rt: _Runtime, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        own = rt.module.state_dict()
        if set(state) != set(own):
            raise ShapeError(f"weights {sorted(state)} do not match the segment's {sorted(own)}")
        for k, v in state.items():
            wire.check_tensor(v, f"weight {k}", shape=tuple(own[k].shape), dtype=own[k].dtype,
                              nonempty=False)
        if rt.pending_output is not None:
            raise ProtocolError(f"segment {rt.proposal.id} has a pending forward; flush first")
        return state

    def _op_import(self, caller: str, req: dict[str, Any]) -> dict[str, Any]:
        rt = self._runtime(caller, req, _ROLES)
        if rt.proposal.share_weights != "model_owner":
            raise AccessError(f"{rt.proposal.id} was not approved for weight sharing with the "
                              "model owner")
        state = self._new_state(rt, {k[6:]: v for k, v in req.items() if k.startswith("state/")})
        rt.module.load_state_dict(state)
        return {"steps": rt.steps}

    def _op_seal(self, caller: str, req: dict[str, Any]) -> dict[str, Any]:
        from nacl.public import Box, PublicKey

        rt = self._runtime(caller, req, _ROLES)
        peer = req.get("peer")
        if rt.proposal.share_weights != "peer":
            raise AccessError(f"{rt.proposal.id} was not approved for peer weight sharing")
        if peer not in self._peers:
            raise AccessError(f"{peer!r} is not a peer {self.name} trusts; trusted: "
                              f"{sorted(self._peers)}")
        plain = wire.encode({f"state/{k}": v for k, v in self.export_weights(rt.proposal.id).items()})
        sealed = Box(self._keypair(), PublicKey(self._peers[peer])).encrypt(plain)
        return {"sealed": bytes(sealed), "sender": self.name}

    def _op_unseal(self, caller: str, req: dict[str, Any]) -> dict[str, Any]:
        from nacl.exceptions import CryptoError
        from nacl.public import Box, PublicKey

        rt = self._runtime(caller, req, _ROLES)
        sender = req.get("sender")
        if rt.proposal.share_weights != "peer":
            raise AccessError(f"{rt.proposal.id} was not approved for peer weight sharing")
        if sender not in self._peers:
            raise AccessError(f"{sender!r} is not a peer {self.name} trusts")
        sealed = req.get("sealed")
        if not isinstance(sealed, bytes):
            raise WireError("field 'sealed' must be bytes")
        try:
            plain = Box(self._keypair(), PublicKey(self._peers[sender])).decrypt(sealed)
        except CryptoError as exc:
            raise WireError(f"weights sealed by {sender!r} do not authenticate: {exc}") from exc
        msg = wire.decode(plain, max_bytes=self.max_request_bytes)
        state = self._new_state(rt, {k[6:]: v for k, v in msg.items() if k.startswith("state/")})
        rt.module.load_state_dict(state)
        return {"steps": rt.steps}

    def _op_leakage(self, caller: str, req: dict[str, Any]) -> dict[str, Any]:
        """Measure, here, what the segment's activations leak about a held-out batch: distance
        correlation, and a model-inversion attack trained on this dataset's mock data."""
        from .leakage import dcor_leakage, inversion_attack

        rt = self._runtime(caller, req, ("input",))
        ds = self._dataset(rt, req)
        n = req.get("records", 256)
        if not isinstance(n, int) or not 4 <= n <= rt.proposal.max_batch:
            raise ValidationError(f"records must be in 4..{rt.proposal.max_batch}, got {n!r}")
        raw = ds.features[:n].to(torch.float32)
        rt.module.eval()
        try:
            with torch.no_grad():
                act = rt.module(raw)
            out: dict[str, Any] = {"dcor": dcor_leakage(raw, act), "records": int(raw.shape[0])}
            if ds.mock is not None:
                attack = inversion_attack(rt.module, ds.mock.to(torch.float32), raw,
                                          epochs=int(req.get("epochs", 40)), seed=0)
                out.update({f"inversion_{k}": float(attack[k])
                            for k in ("mse", "baseline_mse", "ratio")})
        finally:
            rt.module.train()
        return out
