"""What a channel listener keeps and holds for its peers is bounded: answers of closed channels,
audit entries for refused hellos of peers without the key, reconnects waiting for a frame in
flight, and strangers evicted at any point (real TLS on loopback, no PySyft)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from syft_split import wire
from syft_split.channel import ChannelClient, ChannelServer, ChannelTicket, tls
from syft_split.errors import TransportError

MO = "model-owner@example.org"


class Host:
    """A bare host: its answer has ``size`` bytes; ``hold`` makes frames wait; audits kept."""

    def __init__(self, size: int = 16) -> None:
        self.size, self.runs = size, 0
        self.hold = threading.Event()
        self.hold.set()
        self.audits: list[tuple[Any, ...]] = []

    def handle(self, user: str, data: bytes) -> bytes:
        self.runs += 1
        self.hold.wait(10)
        return wire.encode({"pad": b"x" * self.size})

    def audit(self, *entry: Any) -> None:
        self.audits.append(entry)


@pytest.fixture
def host() -> Host:
    return Host()


@pytest.fixture
def server(host: Host) -> Iterator[ChannelServer]:
    s = ChannelServer(host.handle, threading.RLock(), check=lambda c: None, audit=host.audit,
                      sweep_s=0.05, max_kept_bytes=3000)
    yield s
    s.shutdown()


def _ticket(server: ChannelServer, segment: str = "s1") -> ChannelTicket:
    ch, key = server.open(MO, (segment,), 60.0)
    return ChannelTicket(ch.id, *server.address, ch.certificate, ch.fingerprint, key, 60.0,
                         (segment,))


def _forward(client: ChannelClient, segment: str = "s1") -> bytes:
    return client.request(wire.encode({"op": "forward", "segment": segment}))


def _tls(server: ChannelServer, name: str) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx.wrap_socket(socket.create_connection(server.address, timeout=5),
                           server_hostname=name)


def _until(condition: Any, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _hello(server: ChannelServer, ticket: ChannelTicket, key: bytes | None = None
           ) -> ssl.SSLSocket:
    s = _tls(server, ticket.channel)
    tls.send_frame(s, tls.HELLO + wire.encode({"key": key or ticket.key, "user": MO}))
    return s


def test_closed_channels_keep_answers_only_when_resumable_within_budget_and_grace(
        host: Host, server: ChannelServer) -> None:
    host.size = 1000
    server.closed_grace_s = 60.0  # the grace is shortened below
    closed = []
    for kind in ("client", "owner", "halted", "expired", "replaced", "expired", "replaced"):
        client = ChannelClient(_ticket(server), MO)
        _forward(client)
        ch = server.channels[client.channel]
        assert ch.last_response is not None  # open: kept for a reconnect
        server.close(ch.id, kind, "test")
        closed.append(ch)
        client._disconnect()
    kept = [c.closed_kind for c in closed if c.last_response is not None]
    # only expired/replaced keep theirs, newest first within 3000 bytes (each answer ~1 KB)
    assert kept == ["expired", "replaced"] and all(
        c.last_response is None for c in closed[:5])
    assert closed[-1].last_seq == 1  # what ran is still known
    # a client of a closed channel learns within the grace whether its frame ran
    late = ChannelClient(ChannelTicket(closed[-1].id, *server.address, closed[-1].certificate,
                                       closed[-1].fingerprint, b"", 60.0, ("s1",)), MO)
    s = _hello(server, late.ticket)
    assert wire.decode(tls.recv_frame(s, 1 << 20))["error"] == "AuthorizationError"
    s.close()
    server.closed_grace_s = 0.1  # past the grace: answers dropped, the name is unknown
    assert _until(lambda: all(c.last_response is None for c in closed))
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        _tls(server, closed[-1].id)


def test_open_channels_keep_answers_within_the_same_budget_oldest_dropped(
        host: Host, server: ChannelServer) -> None:
    """One model owner's open channels, each answered with a large response, keep at most
    ``max_kept_bytes`` in all (they kept one answer each, 5 x 1 KB here past a 3000-byte
    budget); a client whose dropped answer was lost learns only that its frame ran."""
    host.size = 1000
    clients = [ChannelClient(_ticket(server, f"s{i}"), MO) for i in range(5)]
    for i, client in enumerate(clients):
        _forward(client, f"s{i}")
    chans = [server.channels[c.channel] for c in clients]
    kept = [c.last_response is not None for c in chans]
    assert kept == [False, False, False, True, True]  # the newest, within 3000 bytes
    assert sum(len(c.last_response or b"") for c in chans) <= 3000
    assert all(c.state == "open" and c.last_seq == 1 for c in chans)
    for client in (clients[0], clients[-1]):  # both lose the answer to frame 1 and reconnect
        client._disconnect()
    assert wire.decode(clients[-1]._resume(1) or b"")["pad"] == b"x" * 1000
    with pytest.raises(TransportError, match="ran at the data owner, which no longer keeps"):
        clients[0]._resume(1)
    assert host.runs == 5  # nothing ran again
    assert wire.decode(_forward(clients[0], "s0"))["pad"] == b"x" * 1000  # still serves
    for client in clients:
        client.close()


def test_refused_hellos_without_the_key_are_audited_once_per_interval(
        host: Host, server: ChannelServer) -> None:
    ticket = _ticket(server)
    server.refusals.interval_s = 60.0  # the interval ends below
    for _ in range(12):
        s = _hello(server, ticket, key=bytes(32))
        assert wire.decode(tls.recv_frame(s, 1 << 20))["error"] == "AuthorizationError"
        s.close()
    assert len(host.audits) == 1  # the first one, at once
    assert host.audits[0][0].startswith("unauthenticated peer 127.0.0.1")
    assert "wrong key" in host.audits[0][4]
    server.refusals.interval_s = 0.1  # the interval ended: the sweep audits one summary
    assert _until(lambda: len(host.audits) == 2)
    time.sleep(0.2)
    assert len(host.audits) == 2
    caller, op, _, _, outcome = host.audits[1]
    assert caller == f"unauthenticated peers on {ticket.channel}" and op == "channel.hello"
    assert outcome.startswith("AuthorizationError: 11 more hellos refused")
    assert server.channels[ticket.channel].refused == 12 and server.refusals.total == 12
    client = ChannelClient(ticket, MO)  # the channel still serves its user
    assert wire.decode(_forward(client))["pad"] == b"x" * 16
    client.close()


def test_one_reconnect_waits_per_channel_and_a_gone_peer_stops_waiting(
        host: Host, server: ChannelServer) -> None:
    ticket = _ticket(server)
    client = ChannelClient(ticket, MO)
    client.connect()
    host.hold.clear()  # the frame stays in flight
    answers: list[bytes] = []
    running = threading.Thread(target=lambda: answers.append(_forward(client)), daemon=True)
    running.start()
    ch = server.channels[ticket.channel]
    deadline = time.monotonic() + 5
    while not ch.inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        free = server._slots._value  # type: ignore[attr-defined]
        waiting = [_hello(server, ticket) for _ in range(5)]
        for older in waiting[:-1]:  # each newer reconnect sends the older one away
            reply = wire.decode(tls.recv_frame(older, 1 << 20))
            assert reply["error"] == "ProtocolError" and "newer reconnect" in reply["message"]
            older.close()
        assert _until(lambda: server._slots._value == free - 1)  # type: ignore[attr-defined]
        assert ch.waiting is not None
        waiting[-1].close()  # its peer goes away: the server stops waiting at once
        assert _until(lambda: ch.waiting is None and server._slots._value == free, 0.5)  # type: ignore[attr-defined]
    finally:
        host.hold.set()
    running.join(5)
    assert [wire.decode(a)["pad"] for a in answers] == [b"x" * 16]  # its one run, answered
    assert host.runs == 1 and ch.state == "open"
    client.close()


def test_a_stranger_evicted_while_its_socket_is_wrapped_is_shut_down(
        server: ChannelServer) -> None:
    """Eviction lands between wrap_socket() (the raw socket detached) and wrapped()."""
    ticket = _ticket(server)
    base = server._base

    class EvictInTheWindow:
        def wrap_socket(self, raw: socket.socket, **kw: Any) -> ssl.SSLSocket:
            conn = base.wrap_socket(raw, **kw)
            with server.strangers._lock:  # another newcomer evicts this one now
                entry = server.strangers._entries[id(raw)]
                server.strangers._evict([entry])
            return conn

    server._base = EvictInTheWindow()  # type: ignore[assignment]
    server.strangers.deadline_s = 5.0
    s = socket.create_connection(server.address)
    s.settimeout(1.0)
    try:
        assert s.recv(1) == b""  # shut down at once, not at a 5 s read timeout
    finally:
        s.close()
        server._base = base
    assert _until(lambda: server.strangers.count() == 0 and server._slots._value == 64)  # type: ignore[attr-defined]
    client = ChannelClient(ticket, MO)
    assert wire.decode(_forward(client))["pad"] == b"x" * 16
    client.close()
