"""The unauthenticated connections of a channel listener: deadline and caps.

A connection is a *stranger* until its hello presented a channel's key and user. Strangers get
one total deadline for the TLS handshake and the hello (a peer trickling bytes gets no more time
than a silent one), and their number is capped in all and per peer address, so that strangers
cannot hold the connection slots authenticated clients reconnect through.

A cap that is full does not refuse the newcomer: the oldest stranger is shut down to make room
(the oldest from the newcomer's address if that address is at its cap, else the oldest of
all), so idle connections held open (and renewed) by a few addresses cannot shut a reconnecting
client out. What holds: a client whose handshake and hello complete before
``max_total`` (from its own address: ``max_per_address``) newer connections arrive is
served; a peer opening connections faster than that can still keep it out (the model owner's
router then falls back to PySyft). A newcomer is refused only when no connection slot is free
(the server is full of authenticated connections).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

__all__ = ["Strangers"]


@dataclass
class _Entry:
    key: int  # id() of the raw socket accepted
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
        #: strangers shut down to make room under a cap ("evicted"), newcomers closed at
        #: accept for want of a connection slot ("limit"), strangers shut down at their
        #: deadline ("deadline")
        self.dropped = {"evicted": 0, "limit": 0, "deadline": 0}

    def admit(self, raw: socket.socket, address: str, slot: threading.Semaphore) -> bool:
        """Register ``raw`` if a ``slot`` is free (taken then), shutting down the oldest
        stranger of a full cap first (see the module docstring); else count it as dropped and
        return False."""
        evict: list[socket.socket] = []
        with self._lock:
            ok = slot.acquire(blocking=False)
            if ok:
                same = [e for e in self._entries.values() if e.address == address]
                if len(same) >= self.max_per_address:
                    evict.append(self._evict(same))
                if len(self._entries) >= self.max_total:
                    evict.append(self._evict(list(self._entries.values())))
                self._entries[id(raw)] = _Entry(id(raw), raw, address,
                                                time.monotonic() + self.deadline_s)
            else:
                self.dropped["limit"] += 1
        for sock in evict:
            _shut(sock)
        return ok

    def _evict(self, entries: list[_Entry]) -> socket.socket:
        """Forget the oldest of ``entries`` (it no longer counts); its socket, to shut down."""
        oldest = min(entries, key=lambda e: e.deadline)
        del self._entries[oldest.key]
        self.dropped["evicted"] += 1
        return oldest.sock

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
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:  # the plain socket call: also on a TLS socket, from another thread
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass
