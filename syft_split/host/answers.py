"""What a model owner is answered besides a fresh result: errors (clipped; a non-library
failure as its type only) and, for a step it sent again, the recorded answer.

Exactly-once steps: a request may carry ``step`` (an int >= 1; a model owner numbers the
changing requests of each segment 1, 2, 3, ...). The host remembers the last steps each segment
applied with their responses; one of them sent again (a retry after a lost response, a model
owner resuming from its checkpoint) is answered from its record and never applied twice. An
older step is refused, and so is a gap (a step after one the host does not have: it lost
applied steps, restored from an older snapshot; :meth:`SplitSession.attach` resynchronises).
"""

from __future__ import annotations

from typing import Any

from .. import wire
from ..errors import ProtocolError
from .records import AUDIT_TEXT, Runtime, clip

__all__ = ["ERROR_TEXT", "error_answer", "opaque", "step_id", "recorded_answer"]

#: the longest error message answered (messages quote what the caller sent: a caller's long
#: string, doubled by repr, must not make the answer too large to encode)
ERROR_TEXT = 16_000


def error_answer(name: str, message: str, peer: str | None = None) -> bytes:
    """The wire answer of an error: its class name and its message, clipped, and the peer
    data owner it names (:attr:`~syft_split.errors.SyftSplitError.peer`), if any."""
    out = {"error": name, "message": clip(message, ERROR_TEXT)}
    if peer is not None:
        out["peer"] = peer  # a member id of the round (at most 256 characters)
    return wire.encode(out)


def opaque(exc: Exception, op: str, host: str) -> str:
    """What a model owner reads of an unexpected (non-``SyftSplitError``) failure: its type
    and where to look, never its text."""
    return (f"{type(exc).__name__} while answering op {clip(op, AUDIT_TEXT)!r} on {host}; "
            "see the data owner's audit log (the details stay there: they may be computed "
            "from its records)")


def step_id(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < 2**53:
        raise ProtocolError(f"step must be an int in 1..2**53, got {value!r}")
    return value


def recorded_answer(rt: Runtime | None, step: int | None, op: str, digest: str) -> bytes | None:
    """The recorded response if ``step`` was already applied; None if it is the next one."""
    if step is None:
        return None
    if rt is None:
        raise ProtocolError(f"op {op!r} does not take a step id (no segment)")
    last = rt.last_step
    if step == last + 1:
        return None
    if step > last:
        raise ProtocolError(
            f"step {step} of {rt.id} follows step {step - 1}, but the last step it applied is "
            f"{last}: steps {last + 1}..{step - 1} were lost (restored from an older snapshot); "
            "nothing applied. Re-attach (SplitSession.attach) to continue after step "
            f"{last}")
    rec = next((r for r in rt.records if r.step == step), None)
    if rec is None:
        raise ProtocolError(f"step {step} of {rt.id} is older than the steps it remembers "
                            f"({rt.records[0].step}..{last}); nothing applied")
    if (rec.op, rec.digest) != (op, digest):
        raise ProtocolError(f"step {step} of {rt.id} was applied as a different request "
                            f"(op {rec.op!r}); nothing applied")
    return rec.response
