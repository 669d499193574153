"""The datasite's end of the direct data plane: one TLS 1.3 listener, many channels.

A :class:`ChannelServer` runs in the process that holds the data owner's host (a thread of an
embedded datasite, or of the uvicorn process of an HTTP datasite). It listens on one address;
the client names its channel in the TLS handshake (SNI) and the server answers with that
channel's own certificate. After the handshake the client presents the channel's key (made
fresh for the channel and handed to the approved user through PySyft); from then on every
request frame is answered by ``host.handle(channel.user, wire bytes)`` -- the same entry
point, validation, egress guard and audit entry as a call through the PySyft endpoint -- under
the same lock. How one connection is served (handshake, hello, frames) is in
:mod:`.connection`.

Refused without running anything (and audited; refused hellos of peers without the key are
counted and audited once per interval, :class:`~.strangers.Refusals`): a wrong key, a replayed
or out-of-order frame (sequence numbers are per channel and strictly increasing), a frame for a
segment the channel is not bound to, an op that is not a data-plane op (propose, status,
psi_*, ...: those go through PySyft), and any frame on a closed channel. A frame runs at most
once: it is marked in flight on its channel while the host runs it, a second frame (or a resent
copy) is refused meanwhile, and a hello (a reconnect) waits for it before reporting the last frame answered
(one waiting hello per channel: a newer one replaces it; one whose peer went away stops).
A closed channel answers hellos (to say whether its last frame ran) for ``closed_grace_s``
only; then its name is unknown to the listener. What it keeps is in :mod:`.table`.
A channel closes when the data owner closes it, when it is idle longer than its timeout (never
with a frame in flight), when ``check`` says so (the family closes channels whose segments are
halted, rejected or no longer allowed), or when the client says goodbye.
"""

from __future__ import annotations

import hashlib
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from . import tls
from .connection import Connections
from .strangers import Arrivals, Refusals, Strangers
from .table import DATA_OPS, RESUMABLE, Channel, trim_kept

__all__ = ["Channel", "ChannelServer", "DATA_OPS"]


class ChannelServer(Connections):
    """Listener + channel table of one host (see the module docstring).

    ``handle(user, data) -> bytes`` is the host's wire entry; ``lock`` serialises it with the
    PySyft endpoint; ``check(channel)`` returns a reason to close a channel (or None);
    ``audit(user, op, segment, nbytes, outcome)`` records a refusal in the host's audit log;
    ``data_ops`` are the ops answered over a channel (default :data:`DATA_OPS`); a hello waits
    at most ``hello_wait_s`` for a frame in flight on its channel (one per channel). A channel
    keeps the answer to its last frame within ``max_kept_bytes`` over all channels, open and
    closed (the oldest answers dropped first); a closed one only when it expired or was
    replaced, for ``closed_grace_s``. Refused hellos
    of peers without the key are audited once per ``refusal_summary_s`` per channel.

    A connection is *unauthenticated* until its hello presented the channel's key and user: it
    gets ``auth_deadline_s`` in total for the TLS handshake and the hello (a peer trickling
    bytes does not get more), at most ``max_unauthenticated`` of them are served at once
    (default: half of ``max_connections``, so strangers cannot take the slots authenticated
    clients reconnect through) and at most ``max_per_address`` from one address. A newcomer
    over either cap is served and the oldest stranger (of its address, or of all) is shut down
    instead, so idle connections cannot shut a reconnecting client out; one that authenticates
    before that many newer connections arrive gets through (see :mod:`.strangers`). A
    newcomer is closed at accept only when no connection slot is free. Both are counted
    (``strangers.dropped``), not audited one by one. One peer address (IPv6: its /64) starts
    at most ``max_handshakes_per_minute`` connections a minute (a burst of as many, then that
    rate); more are closed at accept, before any TLS handshake, counted (``arrivals``) and
    audited as one summary entry per ``refusal_summary_s``.
    """

    def __init__(self, handle: Callable[[str, bytes], bytes], lock: Any, *,
                 check: Callable[[Channel], tuple[str, str] | None],
                 audit: Callable[[str, str, str | None, int, str], None],
                 bind: str = "127.0.0.1", port: int = 0, advertise: str | None = None,
                 max_frame_bytes: int = 64 * 1024 * 1024, sweep_s: float = 0.25,
                 max_connections: int = 64, data_ops: frozenset[str] = DATA_OPS,
                 hello_wait_s: float = 3600.0, auth_deadline_s: float = 10.0,
                 max_unauthenticated: int | None = None, max_per_address: int = 8,
                 closed_grace_s: float = 300.0, max_kept_bytes: int = 64 * 1024 * 1024,
                 refusal_summary_s: float = 60.0, max_handshakes_per_minute: int = 120) -> None:
        self._handle, self._lock, self._check, self._audit = handle, lock, check, audit
        self.data_ops, self.hello_wait_s = frozenset(data_ops), hello_wait_s
        self.closed_grace_s, self.max_kept_bytes = closed_grace_s, max_kept_bytes
        #: refused hellos of peers without the key: counted, audited once per interval
        self.refusals = Refusals(refusal_summary_s)
        #: new connections per peer address: over the rate, closed before any TLS handshake
        self.arrivals = Arrivals(max_handshakes_per_minute, refusal_summary_s)
        #: connections served at once (authenticated or not); more are dropped at accept
        self._slots = threading.BoundedSemaphore(max_connections)
        self.strangers = Strangers(auth_deadline_s, max_connections // 2 if max_unauthenticated
                                   is None else max_unauthenticated, max_per_address)
        self.max_frame_bytes = max_frame_bytes
        self.sweep_s = sweep_s
        self.channels: dict[str, Channel] = {}
        self._table_lock = threading.Lock()
        self._base = tls._tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        self._base.sni_callback = self._select
        self._sock = socket.create_server((bind, port))
        self._sock.settimeout(sweep_s)
        self.address = (advertise or bind, int(self._sock.getsockname()[1]))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="syft-split-channels",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ channel table
    def open(self, user: str, segments: tuple[str, ...], idle_timeout: float
             ) -> tuple[Channel, bytes]:
        """A new channel for ``user`` bound to ``segments``; returns it and its key (the only
        copy of the key: the server keeps its hash). An open channel of the same user and
        segments is closed ("replaced")."""
        der, pem, key_pem = tls.make_certificate(f"syft-split channel for {user}")
        key = secrets.token_bytes(32)
        channel = Channel(id=f"ch-{secrets.token_hex(8)}", user=user, segments=segments,
                          key_hash=hashlib.sha256(key).digest(), certificate=der,
                          context=tls.server_context(pem, key_pem), idle_timeout=idle_timeout)
        for old in self.live():
            if old.user == user and set(old.segments) == set(segments):
                self.close(old.id, "replaced", "replaced by a new channel for the same segments")
        with self._table_lock:
            self.channels[channel.id] = channel
            self._prune()
        return channel, key

    def live(self) -> list[Channel]:
        return [c for c in list(self.channels.values()) if c.state == "open"]

    def close(self, channel_id: str, kind: str, reason: str) -> bool:
        """Close a channel now (its connection is shut down); False if it was not open."""
        channel = self.channels.get(channel_id)
        if channel is None or channel.state != "open":
            return False
        # last_seq stays: a client whose frame was in flight learns from its hello whether
        # that frame ran; its answer only for an expired or replaced channel (see .table)
        with channel.cond:
            channel.state, channel.closed_kind, channel.reason = "closed", kind, reason
            channel.closed_at = time.monotonic()
            if kind not in RESUMABLE:
                channel.last_response = None
        self._drop(channel)
        self._trim()
        return True

    def _trim(self) -> None:
        trim_kept(list(self.channels.values()), time.monotonic(), self.closed_grace_s,
                  self.max_kept_bytes)

    def _drop(self, channel: Channel) -> None:
        conn, channel.conn = channel.conn, None
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _prune(self, keep: int = 256) -> None:
        closed = [c for c in self.channels.values() if c.state != "open"]
        for c in closed[: max(0, len(closed) - keep)]:
            del self.channels[c.id]

    def shutdown(self, reason: str = "the data owner's host shut down") -> None:
        """Close every channel and stop listening."""
        for channel in self.live():
            self.close(channel.id, "shutdown", reason)
        self._stop.set()
        self._thread.join(timeout=2)
        try:
            self._sock.close()
        except OSError:
            pass

    # ---------------------------------------------------------------------- listening
    def _select(self, sslsock: Any, server_name: str | None, _ctx: ssl.SSLContext) -> Any:
        channel = self.channels.get(server_name or "")
        if channel is None or (channel.state != "open" and
                               time.monotonic() - channel.closed_at > self.closed_grace_s):
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sslsock.context = channel.context
        return None

    def _accept_loop(self) -> None:
        last_sweep = 0.0
        while not self._stop.is_set():
            try:
                raw, _ = self._sock.accept()
            except TimeoutError:
                raw = None
            except OSError:
                if self._stop.is_set():
                    return
                raw = None
            if raw is not None:
                self._admit(raw)
            now = time.monotonic()
            if now - last_sweep >= self.sweep_s:
                last_sweep = now
                self._sweep(now)

    def _admit(self, raw: socket.socket) -> None:
        """Serve a new connection, or close it when a limit is reached."""
        try:
            address = raw.getpeername()[0]
        except OSError:
            address = None
        if address is None or not self.arrivals.allow(address, time.monotonic()) or \
                not self.strangers.admit(raw, address, self._slots):
            raw.close()
            return
        threading.Thread(target=self._serve, args=(raw,), daemon=True,
                         name="syft-split-channel-conn").start()

    def _sweep(self, now: float) -> None:
        self.strangers.shut_late(now)
        summaries = [(caller, "channel.hello", outcome)
                     for caller, outcome in self.refusals.due(now)]
        summaries += [(caller, "channel.connect", outcome)
                      for caller, outcome in self.arrivals.due(now)]
        if summaries:  # not from this thread: the audit takes the host's lock
            threading.Thread(target=self._audit_summaries, args=(summaries,), daemon=True,
                             name="syft-split-channel-audit").start()
        self._trim()
        for channel in self.live():
            with channel.cond:  # a frame in flight is not idleness: never expired mid-frame
                idle = not channel.inflight and now - channel.last_used > channel.idle_timeout
            if idle:
                self.close(channel.id, "expired",
                           f"closed after {channel.idle_timeout:g} s without a frame")
                continue
            why = self._check(channel)
            if why is not None:
                self.close(channel.id, *why)

    # ------------------------------------------------------------------- connections
    def _serve(self, raw: socket.socket) -> None:
        try:
            self._connection(raw)
        finally:
            self.strangers.trust(raw)
            self._slots.release()

    def _audit_summaries(self, summaries: list[tuple[str, str, str]]) -> None:
        for caller, op, outcome in summaries:
            self._audit(caller, op, None, 0, outcome)

