"""The channel table's records: one :class:`Channel` per channel a datasite opened, and what
is kept of it once closed.

A channel keeps the answer to its last frame, so that a client whose answer was lost (its
connection dropped) gets it on its next hello. Once closed, it keeps it only when it closed in
a way its client resumes from (:data:`RESUMABLE`: it expired idle or was replaced), for the
server's grace period; every other close drops it at once. Over all channels, open and closed,
the kept answers stay within the server's byte budget, the oldest answers dropped first
(:func:`trim_kept`), so a model owner's large answers cannot make the host hold more than that
budget however many channels it has. A client whose answer was dropped learns only that its
frame ran (its outcome is unknown to it: it sends it again, through PySyft or a new channel).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .. import wire
from ..errors import SyftSplitError
from . import tls

__all__ = ["Channel", "DATA_OPS", "RESUMABLE", "error_frame", "trim_kept"]

#: the data-plane ops: the only ones answered over a channel (every other op goes through
#: PySyft). They are the host's ops that run on a segment (declared with ``roles``); a host
#: passes its own list (:class:`ChannelServer` ``data_ops``), tests check that the two agree.
DATA_OPS = frozenset({
    "forward", "backward", "discard", "loss_step",                        # segments
    "local_forward", "pipe_forward", "pipe_backward", "pipe_discard",     # latency
    "export", "seal", "unseal",                                           # weights
    "secagg_round", "secagg_contribute", "secagg_check", "secagg_aggregate",  # secure agg.
    "fl_train", "fl_gradient", "fl_evaluate",                             # federated
    "he_context", "he_output", "he_grad", "he_costs",                     # HE
    "watch", "leakage",                                                   # leakage watch
})

#: a channel whose answer to a frame in flight is kept for a reconnect even once closed
RESUMABLE = ("expired", "replaced")


@dataclass
class Channel:
    """One channel: who may use it, for which segments, and how it has been used."""

    id: str
    user: str
    segments: tuple[str, ...]
    key_hash: bytes
    certificate: bytes
    context: ssl.SSLContext = field(repr=False)
    idle_timeout: float
    opened: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    state: str = "open"
    #: why it closed: "owner", "halted", "expired", "client", "replaced", "shutdown"
    closed_kind: str = ""
    reason: str = ""
    last_seq: int = 0
    #: the answer to frame last_seq, within the server's byte budget (:func:`trim_kept`);
    #: once closed, kept only for a RESUMABLE close and within the server's grace
    last_response: bytes | None = field(default=None, repr=False)
    #: when last_response was made (time.monotonic()): the oldest answers are dropped first
    answered_at: float = 0.0
    #: when it closed (time.monotonic(); 0: open)
    closed_at: float = 0.0
    #: sequence number of the frame the host is running now (0: none)
    inflight: int = 0
    #: guards last_seq / last_response / inflight / conn between connection threads
    cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    frames: int = 0
    refused: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    conn: socket.socket | None = field(default=None, repr=False)
    #: the one reconnect (a hello with the right key) waiting for the frame in flight
    waiting: socket.socket | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> bytes:
        return tls.fingerprint(self.certificate)

    def info(self) -> dict[str, Any]:
        """What the data owner's console lists (JSON)."""
        return {"channel": self.id, "user": self.user, "segments": list(self.segments),
                "state": self.state, "closed": self.closed_kind, "reason": self.reason,
                "opened": self.opened, "idle_s": round(time.monotonic() - self.last_used, 3),
                "running": self.inflight, "frames": self.frames, "refused": self.refused,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "fingerprint": self.fingerprint.hex()}


def error_frame(exc: SyftSplitError, **extra: Any) -> bytes:
    return wire.encode({"error": type(exc).__name__, "message": str(exc), **extra})


def trim_kept(channels: Iterable[Channel], now: float, grace_s: float, max_bytes: int) -> int:
    """Drop the answers ``channels`` keep: every one of a channel closed more than ``grace_s``
    ago and, newest answer first, every one past ``max_bytes`` in total (open and closed
    channels alike). Returns the bytes kept."""
    channels = list(channels)
    total = sum(len(c.last_response or b"") for c in channels)  # the usual case: nothing to drop
    if total <= max_bytes and not any(c.last_response is not None and c.state != "open" and
                                      now - c.closed_at > grace_s for c in channels):
        return total
    kept = 0
    for c in sorted(channels, key=lambda c: -c.answered_at):
        if c.last_response is None:
            continue
        with c.cond:
            if c.last_response is None:
                continue
            late = c.state != "open" and now - c.closed_at > grace_s
            if late or kept + len(c.last_response) > max_bytes:
                c.last_response = None
            else:
                kept += len(c.last_response)
    return kept
