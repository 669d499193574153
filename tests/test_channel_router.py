"""The model owner's router gives up a direct channel for good only when the data owner said no
(permission withdrawn, channel closed, segment halted); an open that failed otherwise is tried
again after a backoff, its steps going through the control plane meanwhile (in-process hosts,
real TLS on loopback, no PySyft)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from syft_split import wire
from syft_split.channel import DirectTransport, tls
from syft_split.errors import AccessError, TransportError
from syft_split.host import DataOwnerHost
from syft_split.host.channel import close_channels
from syft_split.spec import OptimizerSpec, module_to_spec, spec_state
from syft_split.transport.inprocess import InProcessTransport

MO = "model-owner@example.org"


class Flaky(InProcessTransport):
    """The control plane: its next ``down`` open_channel calls fail (the datasite restarts)."""

    down = 0

    def request(self, party: str, data: bytes) -> bytes:
        if self.down and wire.decode(data).get("op") == "open_channel":
            self.down -= 1
            raise TransportError("datasite restarting: connection refused")
        return super().request(party, data)


class Lying(Flaky):
    """Data owner "m" answers open_channel with an address of its own choosing (``ticket``)."""

    def __init__(self, hosts: list[DataOwnerHost]) -> None:
        super().__init__(hosts, user=MO)
        self.ticket: dict[str, Any] = {}
        self.asked = threading.Event()

    def request(self, party: str, data: bytes) -> bytes:
        msg = wire.decode(data)
        if party == "m" and msg.get("op") == "open_channel":
            self.asked.set()
            return wire.encode({**self.ticket, "segments": msg["segments"]})
        return super().request(party, data)


def _approved(inner: Flaky, host: DataOwnerHost) -> str:
    """A segment proposed to ``host`` and approved with a channel."""
    host.add_dataset("d", torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    seg = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten())
    pid = str(inner.call(host.name, "propose", role="input", spec=module_to_spec(seg),
                         optimizer=OptimizerSpec("sgd", lr=0.1).to_json(), datasets=["d"],
                         **{f"state/{k}": v for k, v in spec_state(seg).items()})["segment"])
    host.approve(pid, channel=True)
    return pid


def _step(pid: str) -> dict[str, Any]:
    return {"segment": pid, "indices": torch.arange(4), "train": False}


@pytest.fixture
def setup() -> Iterator[tuple[DataOwnerHost, Flaky, DirectTransport, str]]:
    host = DataOwnerHost("h")
    inner = Flaky([host], user=MO)
    pid = _approved(inner, host)
    direct = DirectTransport(inner)
    direct.router.retry_s = 0.2
    try:
        yield host, inner, direct, pid
    finally:
        direct.close()
        close_channels(host)


def test_a_failed_open_is_tried_again_after_a_backoff(
        setup: tuple[DataOwnerHost, Flaky, DirectTransport, str]) -> None:
    host, inner, direct, pid = setup
    router = direct.router
    step = _step(pid)
    inner.down = 2
    direct.call("h", "forward", **step)  # the open fails: through the control plane
    direct.call("h", "forward", **step)  # within the backoff: not even tried
    assert router.direct_calls == 0 and inner.down == 1 and router.declined == {}
    time.sleep(0.25)
    direct.call("h", "forward", **step)  # tried again, fails again: the backoff doubles
    retry_at, failures, why = router.failed[("h", pid)]
    assert failures == 2 and "restarting" in why and retry_at - time.monotonic() > 0.3
    time.sleep(0.45)
    direct.call("h", "forward", **step)  # the datasite is back: steps go over a channel
    assert router.direct_calls == 1 and router.failed == {} and router.channels()
    # the data owner closing it is final: PySyft from then on, never asked again
    [cid] = router.channels().values()
    host.owner("close_channel", channel=cid, revoke=False)
    with pytest.raises(AccessError, match="closed by the data owner"):
        direct.call("h", "forward", **step)
    assert ("h", pid) in router.declined
    assert direct.call("h", "forward", **step)["activation"].shape == (4, 128)
    assert router.direct_calls == 1


def test_a_failed_lookup_of_the_model_owners_own_name_falls_back(
        setup: tuple[DataOwnerHost, Flaky, DirectTransport, str]) -> None:
    """The transport's lookup of its own principal (a PySyft call) ran after the data owner had
    opened the channel, and any error but TransportError escaped into the user's step; the
    open channel stayed unused. It runs first now, and any failure is a failed open."""
    host, _inner, direct, pid = setup
    router = direct.router
    real = router._user_on

    def broken(party: str) -> str:
        raise KeyError("no such user")

    router._user_on = broken
    step = _step(pid)
    assert direct.call("h", "forward", **step)["activation"].shape == (4, 128)  # via PySyft
    assert router.direct_calls == 0 and "KeyError" in router.failed[("h", pid)][2]
    assert not router.channels()
    server = host.families["channel"].server  # type: ignore[attr-defined]
    assert server is None or not server.live()  # nothing opened there for nothing
    router._user_on = real


@pytest.fixture(params=["tls", "tcp", "trickle"])
def silent(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A ticket to a channel endpoint that never answers: it completes the TLS handshake, then
    says nothing ("tls") or answers the hello one byte every 0.2 s ("trickle"), or never
    accepts the connection at all ("tcp")."""
    der, pem, key = tls.make_certificate()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        context = tls.server_context(pem, key)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                held.append(context.wrap_socket(conn, server_side=True))
            except OSError:
                continue
            if request.param == "trickle":  # a 1000-byte answer, one byte at a time
                for byte in (b"\xe8\x03\x00\x00" + b"x" * 1000):
                    if stop.wait(0.2):
                        return
                    try:
                        held[-1].sendall(bytes([byte]))
                    except OSError:  # the client gave up
                        break

    thread = threading.Thread(target=serve, daemon=True)
    if request.param != "tcp":
        thread.start()
    yield {"channel": "c1", "host": "127.0.0.1", "port": listener.getsockname()[1],
           "certificate": der, "fingerprint": tls.fingerprint(der), "key": b"k" * 32,
           "idle_timeout": 300.0}
    stop.set()
    if thread.is_alive():
        thread.join(2)
    listener.close()
    for conn in held:
        conn.close()


def test_a_data_owner_whose_channel_hangs_delays_no_other_party(silent: dict[str, Any]) -> None:
    """The router opened channels (a PySyft call, TCP, TLS, hello) under its one lock, with no
    overall deadline: a data owner whose channel endpoint stayed silent stalled every call to
    every other party until its hello timed out (600 s by default). Now an open holds only its
    own segment's lock and must be done within ``open_deadline_s``, else it is a failed open:
    that step goes through PySyft and the channel is tried again after the backoff."""
    hosts = [DataOwnerHost("h"), DataOwnerHost("m")]
    inner = Lying(hosts)
    pids = {host.name: _approved(inner, host) for host in hosts}
    inner.ticket = silent
    direct = DirectTransport(inner, timeout=5.0)  # the old router waited this long, locked
    router = direct.router
    router.open_deadline_s = 1.5
    done = threading.Event()
    out: dict[str, Any] = {}

    def hanging() -> None:
        t0 = time.monotonic()
        out["answer"] = direct.call("m", "forward", **_step(pids["m"]))
        out["seconds"] = time.monotonic() - t0
        done.set()

    thread = threading.Thread(target=hanging)
    try:
        thread.start()
        assert inner.asked.wait(10)  # m's open is under way
        honest = direct.call("h", "forward", **_step(pids["h"]))  # opens h's channel, runs
        assert not done.is_set()  # answered while m's open still hangs
        assert honest["activation"].shape == (4, 128)
        assert list(router.channels()) == [("h", pids["h"])] and router.direct_calls == 1
        thread.join(10)
        # m's open failed at its deadline (not the 5 s hello wait); its step went through PySyft
        assert done.is_set() and out["answer"]["activation"].shape == (4, 128)
        assert out["seconds"] < 4.0
        _, failures, why = router.failed[("m", pids["m"])]
        assert failures == 1 and "not open within 1.5 s" in why
        assert list(router.channels()) == [("h", pids["h"])] and router.direct_calls == 1
    finally:
        thread.join(10)
        direct.close()
        for host in hosts:
            close_channels(host)


def test_calls_racing_to_open_one_segment_share_one_channel(
        setup: tuple[DataOwnerHost, Flaky, DirectTransport, str]) -> None:
    """Opening happens outside the router's lock; calls that find a segment's channel being
    opened wait for that open (and only for it) instead of opening one more."""
    _host, _inner, direct, pid = setup
    router = direct.router
    real, opens = router.open, []

    def slow(party: str, segments: list[str]) -> Any:
        opens.append(party)
        time.sleep(0.2)  # every caller arrives while it runs
        return real(party, segments)

    router.open = slow  # type: ignore[method-assign]
    start = threading.Barrier(4)
    answers: list[dict[str, Any]] = []

    def step() -> None:
        start.wait()
        answers.append(direct.call("h", "forward", **_step(pid)))

    threads = [threading.Thread(target=step) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(answers) == 4 and opens == ["h"]
    assert router.direct_calls == 4 and len(router.channels()) == 1
