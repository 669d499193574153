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

Their refused hellos are not audited one by one (a peer without any key could otherwise fill
the audit log, each entry taken under the host's lock): :class:`Refusals` reports the first
refusal on a channel at once and counts the following ones, reported as one summary entry per
interval.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Refusals", "Strangers"]


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

    def wrapped(self, raw: socket.socket, conn: socket.socket) -> bool:
        """``raw`` now lives on as the TLS socket ``conn`` (same descriptor). False: it was
        evicted meanwhile (its shutdown may have missed the detached ``raw``): the caller
        closes ``conn``."""
        with self._lock:
            entry = self._entries.get(id(raw))
            if entry is not None:
                entry.sock = conn
            return entry is not None

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


@dataclass
class _Tally:
    since: float  # when this channel's last entry was reported
    count: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    addresses: set[str] = field(default_factory=set)


class Refusals:
    """Refused hellos of unauthenticated peers, per channel (thread safe): the first one
    after a quiet ``interval_s`` is reported at once, later ones are counted and reported as
    one summary once ``interval_s`` has passed (by the next refusal or by :meth:`due`)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.total = 0
        self._tallies: dict[str, _Tally] = {}
        self._lock = threading.Lock()

    def note(self, channel: str, address: str, outcome: str, now: float
             ) -> tuple[str, str] | None:
        """Count one refusal (``outcome``: "ErrorClass: message"); (caller, outcome) to audit
        now, or None (counted, reported later)."""
        with self._lock:
            self.total += 1
            tally = self._tallies.get(channel)
            if tally is None or (tally.count == 0 and now - tally.since >= self.interval_s):
                self._tallies[channel] = _Tally(now)
                return f"unauthenticated peer {address} on {channel}", outcome
            tally.count += 1
            tally.kinds[outcome.split(":")[0]] += 1
            if len(tally.addresses) < 16:
                tally.addresses.add(address)
            return self._summary(channel, tally, now) if now - tally.since >= self.interval_s \
                else None

    def due(self, now: float) -> list[tuple[str, str]]:
        """(caller, outcome) of every summary whose interval ended; forgets quiet channels."""
        out = []
        with self._lock:
            for channel, tally in list(self._tallies.items()):
                if now - tally.since < self.interval_s:
                    continue
                if tally.count:
                    out.append(self._summary(channel, tally, now))
                else:
                    del self._tallies[channel]
        return out

    def _summary(self, channel: str, tally: _Tally, now: float) -> tuple[str, str]:
        kinds = ", ".join(f"{k}: {n}" for k, n in tally.kinds.most_common())
        outcome = (f"{tally.kinds.most_common(1)[0][0]}: {tally.count} more hellos refused in "
                   f"{now - tally.since:.0f} s ({kinds}) from {sorted(tally.addresses)}"
                   f"{' and more' if len(tally.addresses) >= 16 else ''}")
        self._tallies[channel] = _Tally(now)
        return f"unauthenticated peers on {channel}", outcome


def _shut(sock: socket.socket) -> None:
    try:  # the plain socket call: also on a TLS socket, from another thread
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass
