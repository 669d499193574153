"""Unauthenticated peers cannot hold a channel listener's connection slots: one total deadline
for the TLS handshake and the hello, and caps on strangers in all and per address (real TLS on
loopback, no PySyft)."""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from syft_split import wire
from syft_split.channel import ChannelClient, ChannelServer, ChannelTicket, tls

MO = "model-owner@example.org"


def _echo(user: str, data: bytes) -> bytes:
    return wire.encode({"ok": True})


@pytest.fixture
def server() -> Iterator[ChannelServer]:
    s = ChannelServer(_echo, threading.RLock(), check=lambda c: None, audit=lambda *a: None,
                      sweep_s=0.05, max_connections=8, auth_deadline_s=0.6, max_per_address=2)
    yield s
    s.shutdown()


def _ticket(server: ChannelServer) -> ChannelTicket:
    ch, key = server.open(MO, ("s1",), 60.0)
    return ChannelTicket(ch.id, *server.address, ch.certificate, ch.fingerprint, key, 60.0,
                         ("s1",))


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """True when the server ends ``sock`` (EOF or reset) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _served(server: ChannelServer, ticket: ChannelTicket) -> bool:
    client = ChannelClient(ticket, MO, timeout=5)
    try:
        client.connect()
        return wire.decode(client.request(wire.encode({"op": "forward", "segment": "s1"}))) == {"ok": True}
    finally:
        client.close()


def test_silent_connections_are_capped_per_address_and_dropped_at_their_deadline(
        server: ChannelServer) -> None:
    ticket = _ticket(server)
    first = socket.create_connection(server.address)
    time.sleep(0.1)
    idle = [socket.create_connection(server.address) for _ in range(2)]  # over the cap
    assert _closed_by_server(first, 0.5)  # the oldest made room
    assert server.strangers.dropped["evicted"] == 1 and server.strangers.count() == 2
    # the two silent ones say nothing: ended at the deadline (the sweep or the read timeout,
    # whichever comes first), their slots come back
    t0 = time.monotonic()
    assert all(_closed_by_server(s, 2.0) for s in idle)
    assert time.monotonic() - t0 < 1.5
    time.sleep(0.1)
    assert server.strangers.count() == 0
    assert _served(server, ticket)  # an authenticated client is not a stranger for long
    for s in (*idle, first):
        s.close()


def test_a_trickled_handshake_and_hello_get_one_deadline_in_total(
        server: ChannelServer) -> None:
    ticket = _ticket(server)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    start = time.monotonic()
    s = ctx.wrap_socket(socket.create_connection(server.address), server_hostname=ticket.channel)
    hello = tls.HELLO + wire.encode({"key": ticket.key, "user": MO})
    frame = len(hello).to_bytes(4, "little") + hello
    try:
        for i in range(len(frame)):  # one byte every 0.1 s: each read is quick, the total not
            s.sendall(frame[i:i + 1])
            time.sleep(0.1)
        raise AssertionError("the server kept reading a trickled hello")
    except OSError:
        pass
    elapsed = time.monotonic() - start
    assert 0.5 < elapsed < 3.0
    assert server.strangers.dropped["deadline"] == 1
    assert server.channels[ticket.channel].state == "open"  # a stranger cannot close it
    s.close()
    assert _served(server, ticket)


def test_strangers_take_at_most_half_of_the_slots(server: ChannelServer) -> None:
    assert server.strangers.max_total == 4  # of max_connections=8
    ticket = _ticket(server)
    # loopback is one address: lift the per-address cap to reach the total cap
    server.strangers.max_per_address = 100
    idle = [socket.create_connection(server.address) for _ in range(4)]
    time.sleep(0.1)
    extra = socket.create_connection(server.address)
    assert _closed_by_server(idle[0], 0.5)  # the oldest made room
    assert not _closed_by_server(extra, 0.1)
    assert server.strangers.count() == 4
    for s in (*idle, extra):
        s.close()
    time.sleep(0.2)
    assert _served(server, ticket)


def test_a_reconnect_waiting_for_a_long_frame_is_not_cut_at_the_stranger_deadline() -> None:
    """A frame runs longer than ``auth_deadline_s`` and its connection drops: the client's
    reconnect (right key) waits in its hello for the frame, trusted, and gets its answer."""
    runs: list[int] = []

    def slow(user: str, data: bytes) -> bytes:
        runs.append(1)
        time.sleep(1.5)
        return wire.encode({"run": len(runs)})

    s = ChannelServer(slow, threading.RLock(), check=lambda c: None, audit=lambda *a: None,
                      sweep_s=0.05, auth_deadline_s=0.4)
    try:
        ticket = _ticket(s)
        client = ChannelClient(ticket, MO, timeout=10)
        client.connect()
        [ch] = s.channels.values()
        conn = ch.conn
        assert conn is not None
        threading.Timer(0.2, lambda: conn.shutdown(socket.SHUT_RDWR)).start()
        answer = wire.decode(client.request(wire.encode({"op": "forward", "segment": "s1"})))
        assert answer == {"run": 1} and len(runs) == 1
        assert s.strangers.dropped["deadline"] == 0
    finally:
        s.shutdown()


def test_idle_strangers_held_open_cannot_shut_a_client_out(server: ChannelServer) -> None:
    """Peers keep every stranger place taken (from several addresses, each at its cap, each
    closed socket renewed): a reconnecting client is still served, each time."""
    stop = threading.Event()
    held: list[socket.socket] = []

    def fill(src: str) -> None:
        mine: list[socket.socket] = []
        while not stop.is_set():
            mine = [x for x in mine if not _closed_by_server(x, 0.001)]
            while len(mine) < 2:
                x = socket.socket()
                x.bind((src, 0))
                x.connect(server.address)
                mine.append(x)
                held.append(x)
            time.sleep(0.05)

    fillers = [threading.Thread(target=fill, args=(f"127.0.0.{i}",), daemon=True)
               for i in (2, 3)]
    for f in fillers:
        f.start()
    try:
        time.sleep(0.3)
        assert server.strangers.count() == 4  # every place taken
        assert all(_served(server, _ticket(server)) for _ in range(5))
    finally:
        stop.set()
        for f in fillers:
            f.join()
        for x in held:
            x.close()


def _handshake(server: ChannelServer, name: str, source: str = "127.0.0.1") -> bool:
    """Whether a TLS handshake naming channel ``name`` from ``source`` completes."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    raw = socket.create_connection(server.address, timeout=2, source_address=(source, 0))
    try:
        ctx.wrap_socket(raw, server_hostname=name).close()
        return True
    except (OSError, ssl.SSLError):
        raw.close()
        return False


def test_connections_over_an_address_rate_are_closed_before_tls_and_audited_once() -> None:
    audits: list[tuple[object, ...]] = []
    s = ChannelServer(_echo, threading.RLock(), check=lambda c: None,
                      audit=lambda *a: audits.append(a), sweep_s=0.05,
                      max_handshakes_per_minute=5, refusal_summary_s=60.0)
    try:
        ticket = _ticket(s)
        done = [_handshake(s, ticket.channel) for _ in range(20)]
        assert done == [True] * 5 + [False] * 15  # the burst, then closed before any TLS
        assert s.arrivals.refused == 15 and s.strangers.dropped == {
            "evicted": 0, "limit": 0, "deadline": 0}
        assert _handshake(s, ticket.channel, "127.0.0.2")  # another address is not slowed
        # one summary entry at once, at the first sweep after a refusal (a sweep may fall
        # inside the burst on a loaded machine: it then counts the refusals so far)
        assert _until_audits(audits, 1)
        assert [a[:2] for a in audits] == [("unauthenticated peers", "channel.connect")]
        first = _closed(audits[0])
        assert 1 <= first <= 15
        assert not any(_handshake(s, ticket.channel) for _ in range(10))
        time.sleep(0.3)  # several sweeps
        assert len(audits) == 1  # the next ones wait for the interval's summary
        s.arrivals.interval_s = 0.1
        assert _until_audits(audits, 2) and first + _closed(audits[1]) == 25  # none lost
    finally:
        s.shutdown()


def _closed(audit: tuple[object, ...]) -> int:
    """The count of connections an arrivals summary entry reports."""
    m = re.match(r"AccessError: (\d+) connections closed at accept", str(audit[4]))
    assert m is not None, audit
    return int(m.group(1))


def _until_audits(audits: list[tuple[object, ...]], n: int) -> bool:
    deadline = time.monotonic() + 3
    while len(audits) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return len(audits) == n


def test_the_address_rate_refills_groups_ipv6_by_64_and_forgets_quiet_peers() -> None:
    from syft_split.channel.strangers import Arrivals, peer_key

    a = Arrivals(per_minute=60, interval_s=60.0, max_addresses=3)
    assert all(a.allow("10.0.0.1", 0.0) for _ in range(60)) and not a.allow("10.0.0.1", 0.0)
    assert a.allow("10.0.0.1", 1.0) and not a.allow("10.0.0.1", 1.0)  # one a second
    assert peer_key("2001:db8::1") == peer_key("2001:db8::ffff:2") == "2001:db8::/64"
    assert peer_key("::ffff:10.0.0.1") == "10.0.0.1" and peer_key("fe80::1%eth0") == "fe80::/64"
    for i in range(5):  # at most max_addresses buckets, the least recently used forgotten
        a.allow(f"10.0.1.{i}", 2.0)
    assert a.tracked() == 3
    assert a.due(2.0) and a.tracked() == 3
    assert a.due(200.0) == [] and a.tracked() == 0  # refilled: forgotten
