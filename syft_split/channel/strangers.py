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

Every TLS handshake costs the listener CPU (~0.6 ms; one peer made it do 840 a second, half a
core): :class:`Arrivals` lets each peer address (an IPv6 peer: its /64) start at most a burst
of ``per_minute`` connections and then ``per_minute`` a minute; a connection over that is
closed at accept, before any TLS, counted and reported as one summary entry per interval.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Arrivals", "Refusals", "Strangers", "peer_key"]


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


def peer_key(address: str) -> str:
    """The unit a rate is kept for: an IPv4 address, an IPv6 address's /64 (one host usually
    holds a whole /64), an IPv4 peer seen as an IPv4-mapped IPv6 address as itself."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Arrivals:
    """New connections per peer address (thread safe): a token bucket of ``per_minute``
    tokens per address, refilled at ``per_minute`` a minute; a connection without a token is
    refused (:meth:`allow` says False), counted, and reported by :meth:`due` as one summary
    per ``interval_s``. At most ``max_addresses`` buckets are kept (full ones are forgotten;
    past that, the least recently used)."""

    def __init__(self, per_minute: int, interval_s: float, max_addresses: int = 16_384) -> None:
        self.per_minute, self.interval_s = per_minute, interval_s
        self.max_addresses = max_addresses
        #: connections refused over the rate since the start
        self.refused = 0
        self._buckets: dict[str, tuple[float, float]] = {}  # key: (tokens, when)
        self._count = 0  # refused since the last summary
        self._by: Counter[str] = Counter()
        self._reported = self._cleaned = float("-inf")
        self._lock = threading.Lock()

    def allow(self, address: str, now: float) -> bool:
        """Take a token for a new connection from ``address``; False: over its rate."""
        key, cap = peer_key(address), float(self.per_minute)
        with self._lock:
            tokens, when = self._buckets.pop(key, (cap, now))
            tokens = min(cap, tokens + (now - when) * cap / 60.0)
            ok = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if ok else tokens, now)  # most recent last
            if len(self._buckets) > self.max_addresses:
                del self._buckets[next(iter(self._buckets))]
            if not ok:
                self.refused += 1
                self._count += 1
                if len(self._by) < 16 or key in self._by:
                    self._by[key] += 1
            return ok

    def tracked(self) -> int:
        with self._lock:
            return len(self._buckets)

    def due(self, now: float) -> list[tuple[str, str]]:
        """The summary (caller, outcome) of the connections refused since the last one, at
        most one per ``interval_s`` (the first at once); forgets buckets that refilled."""
        with self._lock:
            cap = float(self.per_minute)
            if now - self._cleaned >= 5.0:  # not at every sweep: up to max_addresses buckets
                self._cleaned = now
                for key, (tokens, when) in list(self._buckets.items()):
                    if tokens + (now - when) * cap / 60.0 >= cap:
                        del self._buckets[key]
            if not self._count or now - self._reported < self.interval_s:
                return []
            since = "" if self._reported == float("-inf") else \
                f" in {now - self._reported:.0f} s"
            by = ", ".join(f"{k}: {n}" for k, n in self._by.most_common())
            outcome = (f"AccessError: {self._count} connections closed at accept{since}, over "
                       f"{self.per_minute} a minute per address ({by}"
                       f"{' and more' if len(self._by) >= 16 else ''})")
            self._count, self._by, self._reported = 0, Counter(), now
        return [("unauthenticated peers", outcome)]


def _shut(sock: socket.socket) -> None:
    try:  # the plain socket call: also on a TLS socket, from another thread
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass
