"""One connection of a channel listener: its TLS handshake, its hello, then its frames.

:class:`Connections` is the part of :class:`~.server.ChannelServer` that serves one accepted
connection (the server's listener thread starts one thread per connection): it finds the
channel the handshake named, checks the hello (the key, the user; a reconnect waits for a
frame in flight and learns the last frame answered), then answers request frames in order
through the host's ``handle``, refusing (and auditing) what may not run. The channel table,
the listener and the sweep are in :mod:`.server`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import select
import socket
import ssl
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
from .table import RESUMABLE, Channel, error_frame

__all__ = ["Connections"]

_log = logging.getLogger(__name__)


class Connections:
    """How a :class:`~.server.ChannelServer` serves one connection (see the module
    docstring); the attributes below are the server's."""

    _handle: Callable[[str, bytes], bytes]
    _lock: Any
    _check: Callable[[Channel], tuple[str, str] | None]
    _audit: Callable[[str, str, str | None, int, str], None]
    _base: ssl.SSLContext
    data_ops: frozenset[str]
    hello_wait_s: float
    sweep_s: float
    max_frame_bytes: int
    strangers: Strangers
    refusals: Refusals
    channels: dict[str, Channel]

    def close(self, channel_id: str, kind: str, reason: str) -> bool:
        raise NotImplementedError

    def _trim(self) -> None:
        raise NotImplementedError

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
                        channel.answered_at = time.monotonic()
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
        self._trim()  # within the budget of kept answers (the oldest dropped)
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
                channel.answered_at = time.monotonic()
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
