"""The trees a data owner's state files hold (:mod:`syft_split.host.store`): proposals,
segments and audit entries to and from JSON data, tensors and bytes (:mod:`syft_split.persist`),
and reading one state file with an error that names it. A segment's tree is checked against
its proposal as it is read (:func:`runtime_from`): what does not fit raises at the restore,
never at the segment's next step.

Imports point one way: :mod:`~syft_split.host.store` (and its parts
:mod:`~syft_split.host.state_restore`, :mod:`~syft_split.host.audit_files`) use this module,
never the reverse.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import persist
from ..errors import ShapeError, SyftSplitError, WireError
from ..spec import OptimizerSpec, module_from_spec
from .records import AuditEntry, Proposal, Runtime, StepRecord

if TYPE_CHECKING:
    from .dispatch import OpFamily

__all__ = ["FORMAT", "audit_json", "id_number", "initial_runtime", "initial_weights", "load_file",
           "plain", "proposal_from", "proposal_tree", "runtime_from", "runtime_tree"]

#: version of the state directory's layout (host.sspl and the segment files)
FORMAT = 1


def load_file(path: Path) -> Any:
    """A state file, or an error naming it (a damaged file: truncated, overwritten)."""
    try:
        return persist.load(path)
    except (SyftSplitError, ValueError, KeyError) as exc:
        raise WireError(f"state file {path} is damaged and cannot be restored "
                        f"({type(exc).__name__}: {exc}); put back a copy from a backup, or "
                        "move the state directory aside to start without it") from exc


def id_number(pid: str) -> int:
    """The number an id ends with, whatever its kind (``a/seg3``: 3, ``a/fl12``: 12): the
    counter goes on after the highest one of every kind, so no id is handed out twice."""
    tail = re.search(r"(\d+)$", pid)
    return int(tail.group(1)) if tail else 0


def proposal_tree(p: Proposal, has_runtime: bool, saves: int = 0) -> dict[str, Any]:
    """A proposal as ``host.sspl`` keeps it (``has_runtime``: approved once, a segment file
    written ``saves`` times). Its initial weights only until its segment's own file holds
    weights (a pending proposal keeps them, an approved or halted one drops them at its first
    save): host.sspl is rewritten whole at every save, and they are not needed again
    (:func:`initial_weights`)."""
    state = {} if has_runtime and saves > 0 else dict(p.state)
    return {
        "id": p.id, "driver": p.driver, "role": p.role, "spec": p.spec, "state": state,
        "optimizer": p.optimizer.to_json(), "datasets": list(p.datasets),
        "input_shape": list(p.input_shape), "output_shape": list(p.output_shape),
        "max_batch": p.max_batch, "loss": p.loss, "release_labels": p.release_labels,
        "share_weights": p.share_weights, "defences": dict(p.defences), "he": p.he,
        "status": p.status, "reason": p.reason, "halted_by": p.halted_by, "runtime": has_runtime,
        "spec_digest": p.spec_digest, "token": p.token, "request_digest": p.request_digest,
        "saves": saves,
    }


def proposal_from(raw: dict[str, Any]) -> Proposal:
    """A proposal as saved; a rejected one without its spec and weights (also when an older
    file still holds them: they are dropped on the next save)."""
    rejected = raw["status"] == "rejected"
    module = None if rejected else module_from_spec(raw["spec"])
    state = dict(raw["state"])
    if module is not None and (state or not raw.get("runtime")):
        module.load_state_dict(state)  # (a pending one always keeps its weights)
        if raw["status"] == "pending":  # one copy, the module's, as at propose (load_weights)
            state = dict(module.state_dict())
    elif module is not None:  # its segment's file holds its weights (runtime_from)
        initial_weights(module, {})
    p = Proposal(
        id=raw["id"], driver=raw["driver"], role=raw["role"], spec=raw["spec"],
        state=state, optimizer=OptimizerSpec.from_json(raw["optimizer"]),
        datasets=list(raw["datasets"]), input_shape=tuple(raw["input_shape"]),
        output_shape=tuple(raw["output_shape"]), max_batch=int(raw["max_batch"]),
        loss=raw.get("loss"), release_labels=bool(raw.get("release_labels")),
        share_weights=str(raw.get("share_weights", "none")),
        defences=dict(raw.get("defences") or {}), he=raw.get("he"),
        status=str(raw["status"]), reason=str(raw.get("reason", "")),
        halted_by=str(raw.get("halted_by", "")), module=module,
        spec_digest=str(raw.get("spec_digest", "")), token=str(raw.get("token", "")),
        request_digest=str(raw.get("request_digest", "")),
    )
    if rejected:
        p.forget()
    return p


def initial_weights(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a proposal's initial weights ``state`` into ``module``; none kept (a segment whose
    own file holds its weights: host.sspl drops them, :func:`proposal_tree`): every weight
    and buffer zero, so a segment whose file cannot be restored (halted) holds no weights
    at all, never a half-loaded mix or a random draw."""
    if state:
        module.load_state_dict(state)
        return
    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            tensor.zero_()


def initial_runtime(p: Proposal) -> Runtime:
    """Segment ``p`` as approved: its initial weights (put back: a file that failed to load
    may have changed some; zeros if host.sspl no longer holds them, :func:`initial_weights`)
    and a new optimizer."""
    assert p.module is not None
    initial_weights(p.module, p.state)
    params = list(p.module.parameters())
    return Runtime(p, p.module, p.optimizer.build(params) if params else None)


def runtime_from(p: Proposal, snap: Any, label_key: str) -> tuple[Runtime, dict[str, Any], int]:
    """Segment ``p`` as its file's tree ``snap`` left it (fresh release noise, the host's
    ``label_key``), what the families kept with it, and how many times the file had been
    written. Raises if ``snap`` does not fit ``p`` (weights, optimizer state or a held-back
    gradient of other shapes, a field missing or of the wrong kind): nothing that would fail
    only at the segment's next step is let through."""
    if not isinstance(snap, dict):
        raise WireError(f"expected a segment's state (a dict), got {type(snap).__name__}")
    rt = initial_runtime(p)
    found = int(snap.get("saves", 0))
    rt.module.load_state_dict(snap["weights"])
    if rt.optimizer is not None and snap.get("optimizer") is not None:
        rt.optimizer.load_state_dict(snap["optimizer"])
        _check_optimizer(rt)
    rt.steps = int(snap["steps"])
    if rt.steps < 0:
        raise ValueError(f"expected a step count >= 0, got {rt.steps}")
    rt.torch_rng = snap["torch_rng"]
    want = torch.Generator().get_state()
    if (not isinstance(rt.torch_rng, torch.Tensor) or rt.torch_rng.dtype != want.dtype
            or rt.torch_rng.shape != want.shape):
        raise ShapeError(f"torch_rng: expected a {want.dtype} tensor of {tuple(want.shape)}")
    rt.records = [StepRecord(int(r["step"]), str(r["op"]), str(r["digest"]),
                             _bytes(r["response"])) for r in snap.get("records", [])]
    rt.extra.update(snap.get("extra") or {})
    rt.fresh_secrets(label_key)  # the release noise not replayed
    rt.he_saved = snap.get("he")
    grads = snap.get("loss_grads")
    if grads is not None:  # a loss step waiting for its weight
        for name, param in rt.module.named_parameters():
            if name in grads:
                if grads[name].shape != param.shape:
                    raise ShapeError(f"loss_grads[{name!r}]: expected {tuple(param.shape)}, "
                                     f"got {tuple(grads[name].shape)}")
                param.grad = grads[name].clone()
        rt.pending_loss_grads = True
    if snap.get("pending") is not None and p.he is None:
        rt.pending_source = snap["pending"]  # re-run once every dataset is back
    return rt, dict(snap.get("families") or {}), found


def _check_optimizer(rt: Runtime) -> None:
    """Optimizer state of other shapes than the parameters (loaded without a check by torch:
    the next step would fail) is refused."""
    assert rt.optimizer is not None
    for group in rt.optimizer.param_groups:
        for param in group["params"]:
            for key, value in rt.optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                    raise ShapeError(f"optimizer state {key!r}: expected {tuple(param.shape)}, "
                                     f"got {tuple(value.shape)}")


def _bytes(value: Any) -> bytes:
    """``value`` if it is bytes (``bytes(5)`` would make five zero bytes of a damaged int)."""
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    return value


def plain(value: Any) -> bool:
    """Whether ``value`` is a JSON scalar that round-trips (a finite float, not NaN)."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    return isinstance(value, float) and math.isfinite(value)


def runtime_tree(rt: Runtime, families: Mapping[str, OpFamily]) -> dict[str, Any]:
    """A segment's file: its weights, optimizer, steps, records, and what ``families`` keep
    with its steps (``OpFamily.segment_state``)."""
    grads = None
    if rt.pending_loss_grads:
        grads = {n: p.grad for n, p in rt.module.named_parameters() if p.grad is not None}
    return {
        "id": rt.id,
        "steps": rt.steps,
        "weights": rt.module.state_dict(),
        "optimizer": rt.optimizer.state_dict() if rt.optimizer is not None else None,
        "rng": rt.rng.get_state(),
        "torch_rng": rt.torch_rng,
        "records": [{"step": r.step, "op": r.op, "digest": r.digest, "response": r.response}
                    for r in rt.records],
        "pending": rt.pending_source if rt.pending_output is not None else None,
        "loss_grads": grads,
        "extra": {k: v for k, v in rt.extra.items() if plain(v)},
        # HE: the cost meter and (level B) the weight share, for fresh keys after a restart;
        # never a key
        "he": rt.he.state() if rt.he is not None else None,
        # what the families keep per segment (e.g. the leakage watch), matching these steps
        "families": {name: st for name, fam in families.items()
                     if (st := fam.segment_state(rt)) is not None},
    }


def audit_json(entry: AuditEntry) -> dict[str, Any]:
    """One line of audit.jsonl (a non-finite time or duration written as 0.0)."""
    out = asdict(entry)
    for k in ("time", "seconds"):
        if not math.isfinite(out[k]):
            out[k] = 0.0
    return out
