"""The one exception hierarchy of syft-split.

::

    SyftSplitError
    ├── SplitError              cannot split a model there (lists the valid cut names)
    ├── ConfigError             a topology / plan / parameter set that cannot run
    ├── ValidationError         a value crossing a party boundary was refused
    │   ├── ShapeError          wrong shape (message says expected vs got)
    │   ├── DTypeError          wrong dtype
    │   ├── NonFiniteError      NaN or Inf in a tensor
    │   ├── EmptyBatchError     a batch with no rows
    │   └── PayloadTooLargeError  a message over the receiver's size limit
    ├── WireError               bytes that do not decode under the wire schema
    ├── ProtocolError           an op out of order (gradient without forward) or unknown
    │   └── CohortRefusedError  a data owner's HostLimits.min_cohort refused an averaging
    │                           cohort or a relay of its weights (a policy, not a failure;
    │                           also an AccessError)
    ├── AccessError             the caller may not do this
    │   ├── AuthorizationError  caller is not the approved model owner
    │   ├── ApprovalError       the segment was never approved / was rejected
    │   ├── EgressError         the segment tried to release something not approved
    │   └── LeakageHaltError    the data owner's leakage watch halted this segment (names the
    │                           figure past the bound, or the suspected training hijack)
    ├── TransportError          the transport failed (PySyft errors are wrapped here)
    │   └── CallTimeoutError    a party did not answer within the call's timeout
    ├── RemoteError             the peer failed with an error that has no mapping here
    ├── StateSaveError          the data owner ran the request but could not save its state
    └── HEError                 homomorphic-encryption failures (he_layers)
        ├── InsecureParametersError
        └── CiphertextError

Errors raised by a data owner's host travel back over the wire as (class name, message, and
``peer`` when set) and are re-raised on the model owner's side as the same class (see
:func:`error_from_wire`).
"""

from __future__ import annotations

__all__ = [
    "SyftSplitError",
    "SplitError",
    "ConfigError",
    "ValidationError",
    "ShapeError",
    "DTypeError",
    "NonFiniteError",
    "EmptyBatchError",
    "PayloadTooLargeError",
    "WireError",
    "ProtocolError",
    "CohortRefusedError",
    "AverageRefusedError",
    "AccessError",
    "AuthorizationError",
    "ApprovalError",
    "EgressError",
    "LeakageHaltError",
    "TransportError",
    "CallTimeoutError",
    "RemoteError",
    "StateSaveError",
    "HEError",
    "InsecureParametersError",
    "CiphertextError",
    "error_from_wire",
    "shown",
]


class SyftSplitError(Exception):
    """Base class of every error syft-split raises.

    ``peer``: another data owner the error is about, when it is one (a data owner refusing a
    peer's sealed contribution names the sender); it travels as the ``peer`` field of the
    error answer, never read out of the message."""

    peer: str | None = None


class SplitError(SyftSplitError):
    """A model cannot be split at the requested cut point(s)."""


class ConfigError(SyftSplitError):
    """A plan, topology or parameter set that cannot run; raised before any training."""


class ValidationError(SyftSplitError):
    """A value crossing a party boundary failed validation; receiver state is unchanged
    (``party``: the data owner whose answer the model owner refused, when it is one)."""

    party: str | None = None


class ShapeError(ValidationError):
    """A tensor has the wrong shape."""


class DTypeError(ValidationError):
    """A tensor has the wrong dtype."""


class NonFiniteError(ValidationError):
    """A tensor contains NaN or Inf."""


class EmptyBatchError(ValidationError):
    """A batch has no rows."""


class PayloadTooLargeError(ValidationError):
    """A message exceeds the receiver's size limit."""


class WireError(SyftSplitError):
    """Bytes that do not decode under the wire schema."""


class ProtocolError(SyftSplitError):
    """An operation out of order (e.g. a gradient without a pending forward) or unknown."""


class AccessError(SyftSplitError):
    """The caller is not allowed to do this."""


class AverageRefusedError(ValidationError):
    """A member of a secure-aggregation round refused the round's *average* (past its bound,
    not finite): no single sender is to blame (contributions are masked, nobody sees one), so
    the model owner leaves the round unaveraged instead of dropping anyone."""


class CohortRefusedError(ProtocolError, AccessError):
    """A data owner's ``HostLimits.min_cohort`` refused a secure-aggregation round (too few
    members, or an averaging weight under a tenth of the largest) or a relay of its weights to
    a single peer. Nothing was applied. It is the data owner's standing policy, not a failure:
    the model owner leaves that round unaveraged (or that copy unrelayed) and trains on with
    every data owner (:class:`~syft_split.schedules.SecureAverage`)."""


class AuthorizationError(AccessError):
    """The caller is not the user the data owner approved."""


class ApprovalError(AccessError):
    """The segment was not approved (or was rejected) by the data owner."""


class EgressError(AccessError):
    """A segment tried to release something other than the approved output."""


class LeakageHaltError(AccessError):
    """The data owner's leakage watch halted the segment: a measured figure passed the bound
    set at approval, or the hijack detector fired; the message names the figure."""


class TransportError(SyftSplitError):
    """The transport failed to deliver a message (``party``: whom it was for, when known;
    ``retry``: False when sending it again would fail the same way)."""

    party: str | None = None
    retry: bool = True


class CallTimeoutError(TransportError):
    """A party did not answer within the call's timeout (the message names party, op and
    seconds). Whether the party applied the request is unknown: a request carrying a step id
    is safe to send again (the party answers it from its record, never applies it twice)."""


class RemoteError(SyftSplitError):
    """The peer failed with an error that has no mapping in this hierarchy."""


class StateSaveError(SyftSplitError):
    """The data owner's host answered the request in memory but could not write its state
    directory (disk full, I/O error). Unlike other errors this one does NOT mean nothing was
    applied: the request ran, it is just not durable yet. A request with a step id is
    recorded: send it again (same step id) and the host tries to save everything first and
    answers it from its record (never applying it twice); the model owner's RemoteSegment keeps
    it in flight and does so (:meth:`~syft_split.remote.RemoteSegment.settle`). If the host
    restarts before a save succeeds, it comes back without the step and refuses the next one
    as a gap (re-attach). A request without a step id (``propose``, ``fl_train``, ...) is not
    recorded: sent again, it runs again (the message says which)."""


class HEError(SyftSplitError):
    """Homomorphic-encryption failure."""


class InsecureParametersError(HEError, ConfigError):
    """CKKS parameters below 128-bit security or with a scale too small."""


class CiphertextError(HEError, ValidationError):
    """Ciphertext bytes that do not deserialize, or belong to another context/shape."""


def _registry() -> dict[str, type[SyftSplitError]]:
    out: dict[str, type[SyftSplitError]] = {}
    stack: list[type[SyftSplitError]] = [SyftSplitError]
    while stack:
        cls = stack.pop()
        out[cls.__name__] = cls
        stack.extend(cls.__subclasses__())
    return out


#: a peer's error message is clipped to this many characters (it ends up in reports and in
#: the model owner's checkpoint)
MAX_MESSAGE_CHARS = 1000


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def shown(value: object, limit: int = 80) -> str:
    """A value a peer chose, as an error message shows it: its repr, clipped to ``limit``."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def error_from_wire(name: str, message: str) -> SyftSplitError:
    """Rebuild an error that a peer reported as ``(class name, message)``.

    Unknown names become :class:`RemoteError`; nothing is imported or evaluated. The message
    is clipped to :data:`MAX_MESSAGE_CHARS` characters (a peer's error text is not trusted).
    """
    message = _clip(message, MAX_MESSAGE_CHARS)
    cls = _registry().get(name)
    if cls is None:
        return RemoteError(f"{_clip(name, 100)}: {message}")
    return cls(message)
