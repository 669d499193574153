"""The model owner's end of the direct data plane.

:class:`ChannelClient` is one channel: it connects over TLS 1.3 to the address the datasite
gave through PySyft -- only when that address is the datasite's host, or one the model owner
allowed for that party (:mod:`.address`; else refused before any connection) --, trusts only
the certificate that came with it (and checks its SHA-256 fingerprint), presents the channel
key, and then sends request frames with increasing sequence numbers. A lost connection is
re-established with the same key; the server says which frame it answered last (after waiting
for one still running), so a frame is never run twice and a lost answer is recovered.

:class:`ChannelRouter` is what a transport uses: given the control plane (a function that
delivers a request through PySyft), it opens a channel for a segment the first time an op on
that segment is sent, sends that segment's ops over it from then on, and falls back to the
control plane for segments whose data owner did not allow a channel. A channel that expired
(idle) or was replaced is re-opened transparently (a frame is resent on the new channel only
when the datasite showed it did not run); one the data owner closed (or whose segment was
halted) raises, and that segment's ops go through PySyft afterwards. A channel that could not be
opened for any other reason (the datasite unreachable or restarting, its cap on channels
reached, a lost connect, a ticket naming an address not trusted for that party) is tried again
later, after a backoff doubling from ``retry_s`` up to ``max_retry_s``; its ops go through PySyft
meanwhile. :class:`DirectTransport` wraps any transport the same way.
"""

from __future__ import annotations

import hmac
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import wire
from ..errors import (
    AccessError,
    ApprovalError,
    AuthorizationError,
    ProtocolError,
    SyftSplitError,
    TransportError,
    ValidationError,
    error_from_wire,
)
from ..transport.base import Transport, TransportWrapper
from . import address, tls
from .table import DATA_OPS, RESUMABLE

__all__ = ["ChannelTicket", "ChannelClient", "ChannelRouter", "DirectTransport"]

_log = logging.getLogger(__name__)

#: closes by the data owner: that segment's ops go through PySyft for the router's life
DECLINED = ("owner", "halted")

#: seconds an open may take from resolving the ticket's host to the answer to its hello (the
#: channel server's own deadline for a handshake and hello); one that takes longer is a failed
#: open
OPEN_DEADLINE_S = 10.0


@dataclass(frozen=True)
class ChannelTicket:
    """What ``open_channel`` returned through PySyft: where, which certificate, which key."""

    channel: str
    host: str
    port: int
    certificate: bytes
    fingerprint: bytes
    key: bytes
    idle_timeout: float
    segments: tuple[str, ...]

    @classmethod
    def from_response(cls, r: dict[str, Any]) -> ChannelTicket:
        try:
            ticket = cls(str(r["channel"]), str(r["host"]), int(r["port"]),
                         bytes(r["certificate"]), bytes(r["fingerprint"]), bytes(r["key"]),
                         float(r["idle_timeout"]), tuple(str(s) for s in r["segments"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"open_channel answered {sorted(r)}: {exc}") from exc
        if not hmac.compare_digest(tls.fingerprint(ticket.certificate), ticket.fingerprint):
            raise TransportError(f"channel {ticket.channel}: the certificate does not match its "
                                 "fingerprint")
        return ticket


def _readable(sock: socket.socket) -> bool:
    """Data or EOF waiting on an idle connection: the server closed it."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        r, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(r)


class ChannelClient:
    """One direct channel, as ``user`` (see the module docstring). ``hosts``: the hosts the
    ticket's address may be at (names or addresses, any port; see :func:`.address.vetted`)."""

    def __init__(self, ticket: ChannelTicket, user: str, *, timeout: float = 600.0,
                 max_response_bytes: int = wire.DEFAULT_MAX_BYTES,
                 hosts: Sequence[str] = ("localhost",)) -> None:
        self.ticket = ticket
        self.hosts = tuple(hosts)
        #: where the ticket's address resolved to, once checked (reconnects resolve nothing)
        self.addresses: list[address.Address] | None = None
        self.user = user
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self.seq = 0
        self.last_used = time.monotonic()
        #: why the server refused this channel ("owner", "expired", ...), once it has
        self.closed_kind = ""
        #: the last request failed and its frame surely did not run at the datasite (it was
        #: not sent, or the server's hello showed it had not run): it may be sent again
        self.unsent = False
        #: the server's refusal of the last hello (its fields: closed, last_seq, ...)
        self.refusal: dict[str, Any] = {}
        self._sock: ssl.SSLSocket | None = None
        self._lock = threading.Lock()
        self._context = tls.client_context(ticket.certificate)

    @property
    def channel(self) -> str:
        return self.ticket.channel

    def connect(self, deadline: float | None = None) -> dict[str, Any]:
        """Address check, TLS handshake, pin check and hello; returns the server's hello reply.
        With ``deadline`` (seconds), all of it (resolving the ticket's host, TCP connect,
        handshake, hello and its answer) must be done within that time, else
        :class:`TransportError`; without, the lookup, connect and handshake wait up to 30 s and
        the answer up to :attr:`timeout` (a reconnect's hello waits for a frame still running).
        A ticket naming an address not of :attr:`hosts` is refused (:class:`TransportError`)
        before any connection is attempted."""
        self._disconnect()
        t = self.ticket
        end = None if deadline is None else time.monotonic() + deadline

        def left(cap: float) -> float:
            if end is None:
                return cap
            if time.monotonic() >= end:
                raise TimeoutError("timed out")
            return min(cap, end - time.monotonic())

        def why(exc: BaseException) -> str:
            late = end is not None and isinstance(exc, TimeoutError)
            return f"not open within {deadline:g} s ({exc})" if late else str(exc)

        raw: socket.socket | None = None
        try:
            if self.addresses is None:
                self.addresses = address.vetted(t.host, t.port, self.hosts,
                                                lambda: left(min(self.timeout, 30.0)))
            raw = address.connect(self.addresses, lambda: left(min(self.timeout, 30.0)))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(left(min(self.timeout, 30.0)))  # for the whole handshake
            sock = self._context.wrap_socket(raw, server_hostname=t.channel)
        except TransportError as exc:  # the address is not the datasite's: nothing connected
            raise TransportError(f"channel {t.channel}: {exc}") from None
        except ssl.SSLCertVerificationError as exc:
            raise TransportError(f"channel {t.channel} at {t.host:.100}:{t.port} did not present "
                                 f"the certificate the datasite sent through PySyft: {exc}"
                                 ) from exc
        except (OSError, ssl.SSLError) as exc:
            if raw is not None:
                raw.close()
            raise TransportError(f"cannot reach channel {t.channel} at {t.host:.100}:{t.port}: "
                                 f"{why(exc)}") from exc
        peer = sock.getpeercert(binary_form=True) or b""
        if not hmac.compare_digest(tls.fingerprint(peer), t.fingerprint):
            sock.close()
            raise TransportError(f"channel {t.channel}: certificate fingerprint differs from the "
                                 "one pinned through PySyft")
        try:
            sock.settimeout(left(self.timeout))
            tls.send_frame(sock, tls.HELLO + wire.encode({"key": t.key, "user": self.user}))
            reply = wire.decode(tls.recv_frame(sock, self.max_response_bytes, end),
                                max_bytes=self.max_response_bytes)
            sock.settimeout(self.timeout)
        except (EOFError, OSError) as exc:
            sock.close()
            raise TransportError(f"channel {t.channel}: hello failed: {why(exc)}") from exc
        if "error" in reply:
            sock.close()
            self.refusal = reply
            self.closed_kind = str(reply.get("closed", ""))
            raise error_from_wire(str(reply["error"]), str(reply.get("message", "")))
        self._sock = sock
        self.last_used = time.monotonic()
        return reply

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def request(self, data: bytes) -> bytes:
        """Send one request (wire bytes) and return the answer (wire bytes)."""
        with self._lock:
            self.unsent = True
            if self._sock is None or _readable(self._sock):
                self._resume(None)
            self.seq += 1
            seq = self.seq
            self.unsent = False
            try:
                return self._exchange(seq, data)
            except (EOFError, OSError) as exc:
                _log.debug("syft_split channel %s: connection lost (%s); resuming", self.channel,
                           exc)
            answered = self._resume(seq)
            if answered is not None:
                return answered
            try:
                return self._exchange(seq, data)
            except (EOFError, OSError) as exc:
                self._disconnect()
                raise TransportError(f"channel {self.channel}: connection lost twice: {exc}"
                                     ) from exc

    def _resume(self, seq: int | None) -> bytes | None:
        """Reconnect. With ``seq`` (a frame whose answer did not arrive): its answer if the
        server ran it, else None (resend it). The server answers a hello once a frame still
        running is done, so a frame it is running is never sent again. When the channel was
        closed meanwhile, :attr:`unsent` says whether the frame ran."""
        try:
            reply = self.connect()
        except SyftSplitError:
            last = self.refusal.get("last_seq")
            if seq is not None and isinstance(last, int):
                answer = self.refusal.get("last_response")
                if last == seq and isinstance(answer, bytes):
                    return bytes(answer)  # it ran before the channel closed: its answer
                self.unsent = last < seq
            raise
        last = int(reply.get("last_seq", 0))
        if seq is None:
            self.seq = max(self.seq, last)
            return None
        if last == seq and isinstance(reply.get("last_response"), bytes):
            return bytes(reply["last_response"])
        if last == seq:
            raise TransportError(f"channel {self.channel}: frame {seq} ran at the data owner, "
                                 "which no longer keeps its answer (it keeps answers for "
                                 "reconnects within a byte budget): its outcome is unknown "
                                 "here; send it again (through PySyft or a new channel)")
        if last != seq - 1:
            raise TransportError(f"channel {self.channel}: frame {seq} was sent, the data owner "
                                 f"answered up to {last}; its answer is lost")
        return None

    def _exchange(self, seq: int, data: bytes) -> bytes:
        assert self._sock is not None
        tls.send_frame(self._sock, tls.request_body(seq, data))
        raw = tls.recv_frame(self._sock, self.max_response_bytes)
        self.last_used = time.monotonic()
        return raw

    def send_frame(self, seq: int, data: bytes) -> bytes:
        """Send request frame ``seq`` as given (no retry): for tests of replay protection."""
        with self._lock:
            if self._sock is None:
                self.connect()
            return self._exchange(seq, data)

    def idle_for(self) -> float:
        return time.monotonic() - self.last_used

    def close(self) -> None:
        """Say goodbye (the server closes the channel) and drop the connection."""
        with self._lock:
            if self._sock is not None:
                try:
                    tls.send_frame(self._sock, tls.BYE)
                except OSError:
                    pass
            self._disconnect()


class ChannelRouter:
    """Direct channels of one transport, opened on demand (see the module docstring).

    ``control(party, data) -> bytes`` delivers a request through the control plane (PySyft);
    ``user_on(party)`` is the identity the transport has there; an open that failed is tried
    again after ``retry_s`` seconds, doubling with each failure up to ``max_retry_s``; an open
    must resolve the ticket's host, connect, finish its handshake and have its hello answered
    within ``open_deadline_s``. A ticket's address must be ``home(party)`` (the host the
    transport reaches that party's datasite at; default ``localhost``) or
    ``channel_hosts[party]`` (a data-plane host the model owner allows that party besides), by
    name or by an address such a name resolves to (any port); another is a failed open, refused
    before any connection (:mod:`.address`).
    No network I/O happens under the router's lock: a channel opens under its (party, segment)'s
    own lock, so a datasite slow to answer (or hanging) delays only the steps on that segment.
    """

    def __init__(self, control: Callable[[str, bytes], bytes], user_on: Callable[[str], str], *,
                 timeout: float = 600.0, max_response_bytes: int = wire.DEFAULT_MAX_BYTES,
                 retry_s: float = 2.0, max_retry_s: float = 300.0,
                 open_deadline_s: float = OPEN_DEADLINE_S,
                 home: Callable[[str], str] = lambda party: "localhost",
                 channel_hosts: Mapping[str, str] | None = None) -> None:
        self._control = control
        self._user_on = user_on
        self._home = home
        #: ``{party: host}``: a data-plane host allowed for that party besides its datasite's
        self.channel_hosts = address.channel_hosts(channel_hosts)
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self.clients: dict[tuple[str, str], ChannelClient] = {}
        #: segments whose data owner did not allow a channel, or closed it (their ops go
        #: through PySyft)
        self.declined: dict[tuple[str, str], str] = {}
        #: segments whose channel failed to open: (when to try again, failures so far, why);
        #: their ops go through PySyft until then
        self.failed: dict[tuple[str, str], tuple[float, int, str]] = {}
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self.open_deadline_s = open_deadline_s
        self.direct_calls = 0
        #: seconds each channel took to open (PySyft call + TLS handshake + hello)
        self.open_seconds: list[float] = []
        self._lock = threading.RLock()  # the tables above; never held over network I/O
        self._opening: dict[tuple[str, str], threading.Lock] = {}

    def route(self, party: str, data: bytes) -> bytes | None:
        """The answer over a direct channel, or None: send it through the control plane."""
        op, segment = tls.peek(data)
        if op is None or segment is None or op not in DATA_OPS:
            return None
        key = (party, segment)
        client = self._channel(key)
        if client is None:
            return None
        try:
            raw = client.request(data)
        except SyftSplitError:
            self._forget(key, client)
            if client.closed_kind in RESUMABLE:  # the server kept its answer, or it never ran
                if not client.unsent:  # it may have run (its answer is lost): never resend
                    raise
                fresh = self._channel(key)  # it did not run: reopen, resend
                if fresh is None:
                    return None
                raw = fresh.request(data)
            else:
                with self._lock:  # the data owner closed it: PySyft from now on
                    if client.closed_kind in DECLINED:
                        self.declined[key] = f"channel closed ({client.closed_kind})"
                    elif client.closed_kind:  # shut down (e.g. a restart): open one later
                        self._failure(key, f"channel closed ({client.closed_kind})")
                raise
        with self._lock:  # routes to several parties run at once
            self.direct_calls += 1
        return raw

    def _channel(self, key: tuple[str, str]) -> ChannelClient | None:
        """``key``'s channel, opened if need be (one per segment, even with calls from several
        threads); None: through the control plane."""
        with self._lock:
            if self._skipped(key):
                return None
            client = self._usable(key)
            if client is not None:
                return client
            opening = self._opening.setdefault(key, threading.Lock())
        with opening:  # others wait here for this segment only, at most one open's time
            with self._lock:  # it was opened while we waited, or that open failed
                if self._skipped(key):
                    return None
                client = self._usable(key)
                if client is not None:
                    return client
            return self._open(*key)

    def _skipped(self, key: tuple[str, str]) -> bool:
        return key in self.declined or time.monotonic() < self.failed.get(key, (0.0,))[0]

    def _usable(self, key: tuple[str, str]) -> ChannelClient | None:
        client = self.clients.get(key)
        if client is not None and client.idle_for() > 0.8 * client.ticket.idle_timeout:
            self._forget(key, client)  # about to expire at the datasite: open a fresh one
            return None
        return client

    def open(self, party: str, segments: list[str]) -> ChannelClient:
        """Ask ``party`` (through the control plane) for a channel bound to ``segments``."""
        t0 = time.perf_counter()
        user = self._user_on(party)  # first: a lookup that fails leaves no channel open there
        hosts = (self._home(party), *(h for h in [self.channel_hosts.get(party)] if h))
        raw = self._control(party, wire.encode({"op": "open_channel", "segments": segments}))
        response = wire.decode(raw, max_bytes=self.max_response_bytes)
        if "error" in response:
            raise error_from_wire(str(response["error"]), str(response.get("message", "")))
        client = ChannelClient(ChannelTicket.from_response(response), user, hosts=hosts,
                               timeout=self.timeout, max_response_bytes=self.max_response_bytes)
        client.connect(self.open_deadline_s)
        with self._lock:
            self.open_seconds.append(time.perf_counter() - t0)
            for s in client.ticket.segments:
                self.failed.pop((party, s), None)
                old = self.clients.pop((party, s), None)
                if old is not None and old is not client:
                    old._disconnect()
                self.clients[(party, s)] = client
        return client

    def _open(self, party: str, segment: str) -> ChannelClient | None:
        try:
            return self.open(party, [segment])
        except (ApprovalError, AuthorizationError):
            return None  # not (yet) approved, or not ours: the control plane says so
        except AccessError as exc:  # the data owner did not allow one: not asked again
            with self._lock:
                self.declined[(party, segment)] = str(exc)
            _log.info("syft_split: no direct channel for %s on %s: %s", segment, party, exc)
            return None
        except (ProtocolError, TransportError, ValidationError) as exc:
            # a datasite without channels, unreachable, or at its cap: PySyft, and later again
            self._failure((party, segment), str(exc))
            return None
        except Exception as exc:  # e.g. the transport's own-principal lookup failed: a channel
            self._failure((party, segment), f"{type(exc).__name__}: {exc}")  # is an
            return None  # optimisation, the step goes through PySyft

    def _failure(self, key: tuple[str, str], why: str) -> None:
        with self._lock:
            failures = self.failed.get(key, (0.0, 0, ""))[1] + 1
            wait = min(self.max_retry_s, self.retry_s * 2 ** min(failures - 1, 30))
            self.failed[key] = (time.monotonic() + wait, failures, why)
        _log.info("syft_split: no direct channel for %s on %s (again in %g s): %s", key[1],
                  key[0], wait, why)

    def _forget(self, key: tuple[str, str], client: ChannelClient) -> None:
        """Drop ``client`` as ``key``'s channel (not one opened since in its place)."""
        with self._lock:
            if self.clients.get(key) is client:
                del self.clients[key]
            if client in self.clients.values():
                return
        client._disconnect()

    def channels(self) -> dict[tuple[str, str], str]:
        """``{(party, segment): channel id}`` of the open channels."""
        return {k: c.channel for k, c in self.clients.items()}

    def close(self) -> None:
        """Close every channel (the datasites free them at once)."""
        with self._lock:
            clients = list({id(c): c for c in self.clients.values()}.values())
            self.clients.clear()
        for client in clients:
            client.close()


class DirectTransport(TransportWrapper):
    """Any transport, with segment ops over direct channels when the data owner allows them
    (``inner`` stays the control plane). :class:`~syft_split.transport.pysyft.PySyftTransport`
    does the same by itself (``direct=True``). A channel connects only to the host ``inner``
    reaches the party at (:meth:`~syft_split.transport.base.Transport.datasite_host`) or to
    ``channel_hosts[party]``."""

    def __init__(self, inner: Transport, *, timeout: float = 600.0,
                 channel_hosts: Mapping[str, str] | None = None) -> None:
        super().__init__(inner)
        self.router = ChannelRouter(inner.request, lambda party: inner.user, timeout=timeout,
                                    max_response_bytes=inner.max_response_bytes,
                                    home=inner.datasite_host, channel_hosts=channel_hosts)

    def request(self, party: str, data: bytes) -> bytes:
        raw = self.router.route(party, data)
        return self.inner.request(party, data) if raw is None else raw

    def close(self) -> None:
        self.router.close()
        self.inner.close()
