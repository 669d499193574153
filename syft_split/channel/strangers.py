"""The unauthenticated connections of a channel listener: deadline and caps.

A connection is a *stranger* until its hello presented a channel's key. Strangers get one
total deadline for the TLS handshake and the hello (a peer trickling bytes gets no more time
than a silent one), and their number is capped in all and per peer address, so that strangers
cannot hold the connection slots authenticated clients reconnect through.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

__all__ = ["Strangers"]


@dataclass
class _Entry:
    sock: socket.socket
    address: str
    deadline: float
    late: bool = False


class Strangers:
    """Bookkeeping of unauthenticated connections (thread safe).

    Args:
        deadline_s: total time a stranger has to authenticate.
        max_total: strangers served at once.
        max_per_address: strangers served at once from one peer address.
    """

    def __init__(self, deadline_s: float, max_total: int, max_per_address: int) -> None:
        self.deadline_s, self.max_total = deadline_s, max(1, max_total)
        self.max_per_address = max(1, max_per_address)
        self._entries: dict[int, _Entry] = {}
        self._lock = threading.Lock()
        #: connections closed at accept (over a cap) or shut down at their deadline
        self.dropped = {"limit": 0, "deadline": 0}

    def admit(self, raw: socket.socket, address: str, slot: threading.Semaphore) -> bool:
        """Register ``raw`` if under the caps and a ``slot`` is free (taken then); else count
        it as dropped and return False."""
        with self._lock:
            same = sum(1 for e in self._entries.values() if e.address == address)
            ok = (len(self._entries) < self.max_total and same < self.max_per_address
                  and slot.acquire(blocking=False))
            if ok:
                self._entries[id(raw)] = _Entry(raw, address,
                                                time.monotonic() + self.deadline_s)
            else:
                self.dropped["limit"] += 1
        return ok

    def wrapped(self, raw: socket.socket, conn: socket.socket) -> None:
        """``raw`` now lives on as the TLS socket ``conn`` (same descriptor)."""
        with self._lock:
            entry = self._entries.get(id(raw))
            if entry is not None:
                entry.sock = conn

    def trust(self, raw: socket.socket) -> None:
        """``raw``'s connection authenticated (or ended): it is no stranger any more."""
        with self._lock:
            self._entries.pop(id(raw), None)

    def count(self) -> int:
        with self._lock:
            return len(self._entries)

    def shut_late(self, now: float) -> None:
        """Shut down every stranger past its deadline (its thread then ends and calls
        :meth:`trust`); repeated until it does."""
        with self._lock:
            late = [e for e in self._entries.values() if e.deadline <= now]
            for e in late:
                if not e.late:
                    e.late = True
                    self.dropped["deadline"] += 1
            socks = [e.sock for e in late]
        for sock in socks:
            try:  # the plain socket call: also on a TLS socket, from another thread
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
