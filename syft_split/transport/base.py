"""The transport seam: the only thing that moves bytes between parties.

A :class:`Transport` delivers one request (bytes) from the model owner to a named party and
returns that party's response (bytes). Everything above it (encoding, errors, byte counting)
is shared, so the in-process and PySyft transports differ only in :meth:`Transport.request`.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from .. import wire
from ..errors import error_from_wire

__all__ = ["Transport", "TrafficLog", "TrafficRecord", "MODEL_OWNER"]

#: the name the model owner (driver) goes by in traffic logs.
MODEL_OWNER = "model_owner"


@dataclass(frozen=True)
class TrafficRecord:
    """One message on the wire: who sent it to whom, for which op, how big, which fields."""

    src: str
    dst: str
    op: str
    nbytes: int
    fields: tuple[str, ...]


@dataclass
class TrafficLog:
    """Every message a transport carried, and byte totals per party and direction.

    Safe to add to from several threads (concurrent calls to different parties)."""

    records: list[TrafficRecord] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, src: str, dst: str, op: str, nbytes: int, fields: tuple[str, ...]) -> None:
        with self._lock:
            self.records.append(TrafficRecord(src, dst, op, nbytes, fields))

    def snapshot(self) -> list[TrafficRecord]:
        """The records so far (a copy; safe while other threads add)."""
        with self._lock:
            return list(self.records)

    def bytes_by_party(self) -> dict[str, dict[str, int]]:
        """``{party: {"sent": n, "received": n}}`` over all records."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: {"sent": 0, "received": 0})
        for r in self.snapshot():
            out[r.src]["sent"] += r.nbytes
            out[r.dst]["received"] += r.nbytes
        return {k: dict(v) for k, v in out.items()}

    def bytes_by_direction(self) -> dict[str, int]:
        """``{"src->dst": n}`` over all records."""
        out: dict[str, int] = defaultdict(int)
        for r in self.snapshot():
            out[f"{r.src}->{r.dst}"] += r.nbytes
        return dict(out)

    def fields_sent_by(self, party: str) -> set[str]:
        """Names of every field ``party`` ever sent (e.g. to assert labels never left)."""
        return {f for r in self.snapshot() if r.src == party for f in r.fields}

    def clear(self) -> None:
        with self._lock:
            self.records.clear()


class Transport(ABC):
    """Moves requests from the model owner to data-owner hosts and returns their answers.

    Subclasses implement :meth:`request` only. :meth:`call` encodes, counts, decodes, and
    re-raises a host's error as the same :mod:`syft_split.errors` class.

    Calls to *different* parties may run concurrently from several threads (the counters and
    the traffic log are locked; :meth:`request` of the built-in transports serialises calls
    to the same party). ``seconds_in_transport`` sums every call's duration, so it can exceed
    wall time when calls overlap.
    """

    def __init__(self, *, max_response_bytes: int = wire.DEFAULT_MAX_BYTES) -> None:
        self.traffic = TrafficLog()
        self.max_response_bytes = max_response_bytes
        self.seconds_in_transport = 0.0
        self.calls = 0
        self._counter_lock = threading.Lock()

    @property
    @abstractmethod
    def user(self) -> str:
        """The identity this transport acts as (the model owner's e-mail)."""

    @abstractmethod
    def parties(self) -> list[str]:
        """Names of the data-owner parties reachable through this transport."""

    @abstractmethod
    def request(self, party: str, data: bytes) -> bytes:
        """Deliver ``data`` to ``party`` as :attr:`user` and return the response bytes."""

    def call(self, party: str, op: str, **fields: Any) -> dict[str, Any]:
        """Send ``op`` with ``fields`` to ``party``; return the decoded response fields."""
        data = wire.encode({"op": op, **fields})
        self.traffic.add(MODEL_OWNER, party, op, len(data), tuple(fields))
        t0 = time.perf_counter()
        raw = self.request(party, data)
        with self._counter_lock:
            self.seconds_in_transport += time.perf_counter() - t0
            self.calls += 1
        response = wire.decode(raw, max_bytes=self.max_response_bytes)
        self.traffic.add(party, MODEL_OWNER, op, len(raw), tuple(response))
        if "error" in response:
            raise error_from_wire(str(response.get("error")), str(response.get("message", "")))
        return response

    def close(self) -> None:
        """Release what the transport holds (servers it launched, connections)."""
