"""Op families: how the host's ops are declared, and the registry the host builds its table from.

An :class:`OpFamily` groups related ops (segments, weights, alignment, HE, ...). A method
decorated with :func:`op` answers a model-owner op; it declares the roles of segment it applies
to (the host then resolves and authorises the runtime before calling it) and the fields its
response may carry, each with a guard rule (:mod:`syft_split.host.guard`). A method decorated
with :func:`owner_op` answers a data-owner (console) op and is never reachable by a model
owner. An op declared ``mutates=True`` changes what the host keeps (a segment's weights or
pending step, or the host's proposals): a host with a state directory saves it after the op.
Families register themselves with :func:`register_family` from their own modules, so the host
imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..errors import ConfigError
from .guard import Rule

if TYPE_CHECKING:
    from collections.abc import Iterator
    from threading import Lock

    import torch

    from .guard import Guard
    from .records import AuditEntry, Dataset, HostLimits, Proposal, Runtime


class Host(Protocol):
    """What an op family may use of the host it serves (:class:`~.core.DataOwnerHost`)."""

    name: str
    datasets: dict[str, Dataset]
    limits: HostLimits
    guard: Guard
    audit: list[AuditEntry]
    audit_first: int
    audit_lock: Lock
    proposals_by_id: dict[str, Proposal]
    runtimes: dict[str, Runtime]
    families: dict[str, OpFamily]
    ids: Iterator[int]
    label_key: str
    names: dict[str, str]

    def proposal(self, proposal_id: str) -> Proposal: ...
    def new_proposal_id(self, kind: str) -> str: ...
    def add_proposal(self, p: Proposal) -> None: ...
    def proposals(self, status: str | None = None) -> list[Proposal]: ...
    def runtime(self, caller: str, req: Mapping[str, Any], roles: tuple[str, ...]) -> Runtime: ...
    def owned_runtime(self, proposal_id: str) -> Runtime: ...
    def dataset(self, rt: Runtime, req: Mapping[str, Any]) -> Dataset: ...
    def halt(self, proposal_id: str, reason: str = ..., *, by: str = "owner") -> None: ...
    def record(self, entry: AuditEntry) -> None: ...
    def who(self, caller: str) -> str: ...
    def stepped(self, rt: Runtime, grad: Any) -> None: ...
    def handle(self, caller: str, data: bytes) -> bytes: ...
    def export_weights(self, proposal_id: str) -> dict[str, torch.Tensor]: ...

__all__ = ["Host", "OpFamily", "OpSpec", "op", "owner_op", "register_family", "registered_families"]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class OpSpec:
    """An op's declaration: its name, the segment roles it runs on (None: no segment), and the
    response fields it may release."""

    name: str
    roles: tuple[str, ...] | None
    egress: Mapping[str, Rule] = field(default_factory=dict)
    owner: bool = False
    mutates: bool = False
    #: set from its family's ``host_state``: a mutating op also changes what the family keeps
    family_state: bool = False
    #: the op reads ``train``: with ``train=False`` it evaluates and changes nothing (not
    #: saved). Every other op ignores ``train``: a mutating one is saved whatever it says
    evaluates: bool = False


def op(name: str, *, roles: tuple[str, ...] | None = None,
       egress: Mapping[str, Rule] | None = None, mutates: bool = False,
       evaluates: bool = False) -> Callable[[F], F]:
    """Declare a model-owner op answered by the decorated ``method(self, call) -> dict``
    (``mutates``: it changes state the host persists; ``evaluates``: it reads ``train`` and a
    call with ``train=False`` changes nothing, so it is not saved)."""
    def deco(fn: F) -> F:
        fn._op_spec = OpSpec(name, roles, dict(egress or {}),  # type: ignore[attr-defined]
                             mutates=mutates, evaluates=evaluates)
        return fn
    return deco


def owner_op(name: str, *, mutates: bool = True) -> Callable[[F], F]:
    """Declare a data-owner op answered by ``method(self, **fields) -> dict`` (JSON/tensors);
    ``mutates=False`` for ops that only read (a host with a state directory saves after the
    others)."""
    def deco(fn: F) -> F:
        fn._op_spec = OpSpec(name, None, {}, owner=True,  # type: ignore[attr-defined]
                             mutates=mutates)
        return fn
    return deco


class OpFamily:
    """A group of ops of one host; subclasses set :attr:`name` and decorate methods."""

    name = "family"
    #: the family keeps state of its own (``state()``) that its mutating ops change: a host with
    #: a state directory then saves it after each of them, not only the segment's file
    host_state = False

    def __init__(self, host: Host) -> None:
        self.host = host

    def ops(self) -> list[tuple[OpSpec, Callable[..., Any]]]:
        """(declaration, bound method) of every op this family answers."""
        out = []
        for attr in dir(type(self)):
            spec = getattr(getattr(type(self), attr), "_op_spec", None)
            if isinstance(spec, OpSpec):
                out.append((spec, getattr(self, attr)))
        return out

    # hooks the proposal family calls on every family
    def review_lines(self, proposal: Proposal) -> list[str]:
        """Lines this family adds to the review of ``proposal`` (override)."""
        return []

    def on_approve(self, rt: Runtime, options: dict[str, Any]) -> None:
        """Set up what this family needs for a newly approved segment (override); ``options``
        are the data owner's approval options this family understands (it pops them)."""

    def pending_bytes(self, proposal: Proposal) -> int:
        """Bytes of weights this family keeps (and saves) for pending ``proposal``: counted
        against ``HostLimits.max_pending_bytes`` with its own weights (override)."""
        return 0

    def on_reject(self, proposal: Proposal) -> None:
        """Forget what this family keeps for ``proposal``, just rejected (override)."""

    def after_step(self, rt: Runtime, grad: Any) -> None:
        """Called after every optimizer step of an input or middle segment, with the
        validated gradient the model owner sent for it (override)."""

    def after_load(self, rt: Runtime) -> None:
        """Called after weights from peer data owners were loaded into ``rt``, before the op
        answers (override); raising refuses them: the segment's own weights are put back."""

    def stops(self, op: str, fields: Mapping[str, Any]) -> list[tuple[str, str]]:
        """The approved segments data-owner op ``op`` (with ``fields``) of this family will
        halt, with the reason, worked out without the serving lock (an op in progress may be
        changing the host): their gate closes before the op waits for that lock (override;
        never raise: a bad request is the op's to refuse)."""
        return []

    def state(self) -> dict[str, Any]:
        """What this family must keep across a restart: JSON data, tensors and bytes
        (:func:`syft_split.persist.pack`); saved with the host's proposals (override)."""
        return {}

    def segment_state(self, rt: Runtime) -> dict[str, Any] | None:
        """What this family keeps for segment ``rt`` that changes with its steps (e.g. the
        leakage watch): saved in the segment's file with its steps, so the two always match
        (override; None: nothing)."""
        return None

    def restore_segment(self, rt: Runtime, state: dict[str, Any] | None) -> None:
        """Put back what :meth:`segment_state` returned: after a restart, once every family's
        :meth:`restore` ran (``state`` as read from the segment's file, None if it holds
        nothing of this family), and when a refused answer undoes a step (override)."""

    def restore(self, state: Mapping[str, Any]) -> None:
        """Load what :meth:`state` returned, after the host's datasets, proposals and segments
        are back; what it kept per segment comes next, through :meth:`restore_segment`
        (override)."""


_FAMILIES: list[type[OpFamily]] = []


def register_family(cls: type[OpFamily]) -> type[OpFamily]:
    """Make every host built from now on answer ``cls``'s ops (use as a class decorator)."""
    for i, other in enumerate(_FAMILIES):
        if other.name == cls.name:
            if (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ConfigError(f"an op family named {cls.name!r} is already registered "
                                  f"({other.__module__}.{other.__qualname__})")
            _FAMILIES[i] = cls  # the same class, re-imported
            return cls
    _FAMILIES.append(cls)
    return cls


def registered_families() -> list[type[OpFamily]]:
    return list(_FAMILIES)
