"""The datasite's end of the direct data plane: one TLS 1.3 listener, many channels.

A :class:`ChannelServer` runs in the process that holds the data owner's host (a thread of an
embedded datasite, or of the uvicorn process of an HTTP datasite). It listens on one address;
the client names its channel in the TLS handshake (SNI) and the server answers with that
channel's own certificate. After the handshake the client presents the channel's key (made
fresh for the channel and handed to the approved user through PySyft); from then on every
request frame is answered by ``host.handle(channel.user, wire bytes)`` -- the same entry
point, validation, egress guard and audit entry as a call through the PySyft endpoint -- under
the same lock.

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
import hmac
import logging
import secrets
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import wire
from ..errors import (
    AccessError,
    AuthorizationError,
    PayloadTooLargeError,
    ProtocolError,
    SyftSplitError,
    WireError,
)
from . import tls
from .strangers import Refusals, Strangers
from .table import DATA_OPS, RESUMABLE, Channel, error_frame, trim_kept

__all__ = ["Channel", "ChannelServer", "DATA_OPS"]

_log = logging.getLogger(__name__)


class ChannelServer:
    """Listener + channel table of one host (see the module docstring).

    ``handle(user, data) -> bytes`` is the host's wire entry; ``lock`` serialises it with the
    PySyft endpoint; ``check(channel)`` returns a reason to close a channel (or None);
    ``audit(user, op, segment, nbytes, outcome)`` records a refusal in the host's audit log;
    ``data_ops`` are the ops answered over a channel (default :data:`DATA_OPS`); a hello waits
    at most ``hello_wait_s`` for a frame in flight on its channel (one per channel). A closed
    channel keeps the answer to its last frame only when it expired or was replaced, for
    ``closed_grace_s`` and within ``max_kept_bytes`` over all closed channels. Refused hellos
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
    (``strangers.dropped``), not audited one by one.
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
                 refusal_summary_s: float = 60.0) -> None:
        self._handle, self._lock, self._check, self._audit = handle, lock, check, audit
        self.data_ops, self.hello_wait_s = frozenset(data_ops), hello_wait_s
        self.closed_grace_s, self.max_kept_bytes = closed_grace_s, max_kept_bytes
        #: refused hellos of peers without the key: counted, audited once per interval
        self.refusals = Refusals(refusal_summary_s)
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
        if address is None or not self.strangers.admit(raw, address, self._slots):
            raw.close()
            return
        threading.Thread(target=self._serve, args=(raw,), daemon=True,
                         name="syft-split-channel-conn").start()

    def _sweep(self, now: float) -> None:
        self.strangers.shut_late(now)
        summaries = self.refusals.due(now)
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

    def _connection(self, raw: socket.socket) -> None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.settimeout(self.strangers.deadline_s)
        try:  # the handshake runs under the deadline: the sweep shuts the socket down
            conn = self._base.wrap_socket(raw, server_side=True,
                                          do_handshake_on_connect=False)
        except (OSError, ssl.SSLError) as exc:
            _log.debug("syft_split channel: wrapping failed: %s", exc)
            raw.close()
            return
        if not self.strangers.wrapped(raw, conn):  # evicted while wrap_socket() held raw
            conn.close()
            return
        try:
            conn.do_handshake()
            channel = next((c for c in list(self.channels.values())
                            if c.context is conn.context), None)
            if channel is None:
                return
            if not self._hello(conn, channel, raw):
                return
            conn.settimeout(None)
            self._frames(conn, channel)
        except (EOFError, OSError, ssl.SSLError) as exc:
            _log.debug("syft_split channel: connection ended: %s", exc)
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def _audit_summaries(self, summaries: list[tuple[str, str]]) -> None:
        for caller, outcome in summaries:
            self._audit(caller, "channel.hello", None, 0, outcome)

    def _refuse_stranger(self, conn: socket.socket, channel: Channel,
                         exc: SyftSplitError) -> None:
        """Refuse the hello of a peer without the key: counted, audited per interval."""
        channel.refused += 1
        try:
            address = str(conn.getpeername()[0])
        except OSError:
            address = "?"
        audit = self.refusals.note(channel.id, address, f"{type(exc).__name__}: {exc}",
                                   time.monotonic())
        if audit is not None:
            self._audit(audit[0], "channel.hello", None, 0, audit[1])
        tls.send_frame(conn, error_frame(exc))

    def _refuse(self, conn: socket.socket, channel: Channel, exc: SyftSplitError, *,
                op: str, segment: str | None = None, nbytes: int = 0,
                closed: str | None = None, extra: dict[str, Any] | None = None) -> None:
        channel.refused += 1
        self._audit(channel.user, op, segment, nbytes, f"{type(exc).__name__}: {exc}")
        tls.send_frame(conn, error_frame(exc, **({} if closed is None else {"closed": closed}),
                                    **(extra or {})))

    def _closed_error(self, channel: Channel) -> AccessError:
        return AccessError(f"channel {channel.id} is closed ({channel.closed_kind}): "
                           f"{channel.reason}")

    def _hello(self, conn: socket.socket, channel: Channel, raw: socket.socket) -> bool:
        """Check the hello; the connection is trusted (no stranger's deadline) as soon as its
        key and user are right, before it waits (up to ``hello_wait_s``) for a frame in flight."""
        try:
            body = tls.recv_frame(conn, 64 * 1024)
        except PayloadTooLargeError as exc:  # counted like any other bad hello
            self._refuse_stranger(conn, channel, exc)
            return False
        try:
            if body[:1] != tls.HELLO:
                raise ProtocolError("a channel starts with a hello frame")
            msg = wire.decode(body[1:], max_bytes=64 * 1024)
        except (ProtocolError, WireError) as exc:
            self._refuse_stranger(conn, channel, exc)
            return False
        key, user = msg.get("key"), msg.get("user")
        given = hashlib.sha256(key).digest() if isinstance(key, bytes) else b""
        if not hmac.compare_digest(given, channel.key_hash):
            self._refuse_stranger(conn, channel, AuthorizationError(
                f"wrong key for channel {channel.id}: refused"))
            return False
        if user != channel.user:
            self._refuse(conn, channel, AuthorizationError(
                f"channel {channel.id} belongs to {channel.user}, not {user!r}"),
                op="channel.hello")
            return False
        self.strangers.trust(raw)  # authenticated: waiting for a frame in flight is no stall
        with channel.cond:  # a frame in flight: wait for it, then say whether it ran
            idle, displaced = self._wait(conn, channel)
            running, is_open = channel.inflight, channel.state == "open"
            previous = None
            if idle and is_open:  # one live connection per channel
                previous, channel.conn = channel.conn, conn
                channel.last_used = time.monotonic()
            reply: dict[str, Any] = {"last_seq": channel.last_seq}
            if channel.last_response is not None and (
                    is_open or channel.closed_kind in RESUMABLE):
                reply["last_response"] = channel.last_response
        if displaced:  # a newer reconnect took its place, or its peer went away
            tls.send_frame(conn, error_frame(ProtocolError(
                f"a newer reconnect waits for frame {running} on channel {channel.id}")))
            return False
        if not idle:
            self._refuse(conn, channel, ProtocolError(
                f"frame {running} is still running on channel {channel.id}: reconnect later"),
                op="channel.hello")
            return False
        if not is_open:
            self._refuse(conn, channel, self._closed_error(channel), op="channel.hello",
                         closed=channel.closed_kind, extra=reply)
            return False
        if previous is not None:
            try:
                previous.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        tls.send_frame(conn, wire.encode({"ok": True, **reply}))
        return True

    def _wait(self, conn: socket.socket, channel: Channel) -> tuple[bool, bool]:
        """Under ``channel.cond``: wait for the frame in flight, as the channel's one waiting
        reconnect; (no frame in flight any more, gave up: replaced or peer gone)."""
        if not channel.inflight:
            return True, False
        older, channel.waiting = channel.waiting, conn
        if older is not None:
            channel.cond.notify_all()  # the older waiter gives up
        deadline = time.monotonic() + self.hello_wait_s
        while channel.inflight and channel.waiting is conn:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            channel.cond.wait(min(left, max(self.sweep_s, 0.05)))
            if channel.waiting is conn and _readable(conn):  # EOF (or bytes out of turn):
                channel.waiting = None                             # its peer does not wait
        displaced = channel.waiting is not conn
        if not displaced:
            channel.waiting = None
        return not channel.inflight, displaced

    def _frames(self, conn: socket.socket, channel: Channel) -> None:
        while True:
            try:
                body = tls.recv_frame(conn, self.max_frame_bytes)
            except PayloadTooLargeError as exc:
                self._refuse(conn, channel, exc, op="channel.frame")
                return
            if channel.conn is not conn:
                return  # replaced by a newer connection, or closed
            if body[:1] == tls.BYE:
                self.close(channel.id, "client", "closed by its user")
                return
            self._answer(conn, channel, body)

    def _answer(self, conn: socket.socket, channel: Channel, body: bytes) -> None:
        try:
            seq, data = tls.parse_request(body)
        except ValueError:
            self._refuse(conn, channel, ProtocolError("unknown frame kind"), op="channel.frame",
                         nbytes=len(body))
            return
        channel.last_used = time.monotonic()  # a frame arrived: the channel is in use
        op_name, segment = tls.peek(data)
        op, n = op_name or "?", len(data)
        why = None if channel.state != "open" else self._check(channel)
        if why is not None:
            self.close(channel.id, *why)
        if channel.state != "open":
            self._refuse(conn, channel, self._closed_error(channel), op=op, segment=segment,
                         nbytes=n, closed=channel.closed_kind)
            return
        problem, used_up = self._claim(conn, channel, seq, op, segment)
        if problem is None and not used_up:
            return  # the connection was replaced meanwhile: its client reconnected
        if problem is not None:
            self._refuse(conn, channel, problem, op=op, segment=segment, nbytes=n)
            return
        refusal: AccessError | ProtocolError | None = None
        raw = b""
        try:
            with self._lock:
                if channel.state != "open":  # closed while we waited for the host
                    refusal = self._closed_error(channel)
                elif seq != channel.last_seq + 1:  # cannot happen while the claim holds
                    refusal = ProtocolError(f"frame {seq} out of order on channel {channel.id}")
                else:
                    raw = self._handle(channel.user, data)
                    with channel.cond:  # a close meanwhile: kept only if resumable
                        channel.last_seq, channel.last_response = seq, raw
                        if channel.state != "open" and channel.closed_kind not in RESUMABLE:
                            channel.last_response = None
        finally:
            with channel.cond:
                channel.inflight = 0
                channel.last_used = time.monotonic()
                channel.cond.notify_all()
        if refusal is not None:
            self._refuse(conn, channel, refusal, op=op, segment=segment, nbytes=n,
                         closed=channel.closed_kind or None)
            return
        channel.frames += 1
        channel.bytes_in += len(body)
        channel.bytes_out += len(raw)
        tls.send_frame(conn, raw)

    def _claim(self, conn: socket.socket, channel: Channel, seq: int, op: str,
               segment: str | None) -> tuple[SyftSplitError | None, bool]:
        """Check frame ``seq`` and mark it in flight, in one step under the channel's lock:
        (refusal or None, whether the frame may run / is used up). (None, False): ``conn``
        is no longer the channel's connection (answer nothing)."""
        with channel.cond:
            if channel.conn is not conn:
                return None, False
            if channel.inflight:
                return ProtocolError(f"frame {seq} sent while frame {channel.inflight} runs on "
                                     f"channel {channel.id}: refused, nothing ran"), False
            if seq <= channel.last_seq:  # sequence refusals do not use up a sequence number
                return ProtocolError(
                    f"frame {seq} replayed on channel {channel.id} (last frame "
                    f"{channel.last_seq}): refused, nothing ran"), False
            if seq != channel.last_seq + 1:
                return ProtocolError(f"frame {seq} out of order on channel {channel.id}: "
                                     f"expected {channel.last_seq + 1}"), False
            problem: SyftSplitError | None = None
            if op not in self.data_ops:
                problem = ProtocolError(f"op {op!r} is not a data-plane op: send it through "
                                        "PySyft")
            elif segment not in channel.segments:
                problem = AccessError(f"channel {channel.id} is bound to "
                                      f"{list(channel.segments)}, not to segment {segment!r}: "
                                      "refused, nothing ran")
            if problem is not None:  # answered (with the refusal): the frame is used up
                channel.last_seq, channel.last_response = seq, error_frame(problem)
                return problem, True
            channel.inflight = seq
            return None, True


def _readable(sock: socket.socket) -> bool:
    """A waiting connection's peer closed it (or sent bytes before its answer)."""
    try:
        r, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(r)
