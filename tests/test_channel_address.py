"""The model owner connects a direct channel only to an address it trusts for that party: the
host its transport reaches the datasite at (by name or an address that name resolves to, any
port), or the one host it allowed for the party (``channel_hosts``). A data owner's ticket
naming any other address is refused before anything is connected, and the steps go through
the control plane. The ticket's host is resolved within the open's deadline.

In-process hosts, real TLS on loopback, no PySyft (except for reading a datasite URL's host);
nothing but loopback is ever connected to. 192.0.2.7 (TEST-NET-1, never reached here) stands
for a datasite on another machine.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from syft_split.channel import DirectTransport
from syft_split.errors import ConfigError
from syft_split.host import DataOwnerHost
from syft_split.host.channel import close_channels
from syft_split.spec import OptimizerSpec, module_to_spec, spec_state
from syft_split.transport.inprocess import InProcessTransport

from .conftest import RewriteAnswers

MO = "model-owner@example.org"
ELSEWHERE = "192.0.2.7"


class Datasite(RewriteAnswers):
    """Party "h" reached at ``home``; its open_channel answers rewritten with ``ticket``."""

    def __init__(self, host: DataOwnerHost, home: str) -> None:
        super().__init__(InProcessTransport([host], user=MO), "h", "open_channel",
                         lambda req, answer: {**answer, **self.ticket})
        self.home = home
        self.ticket: dict[str, Any] = {}

    def datasite_host(self, party: str) -> str:
        return self.home


def _segment() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten())


@pytest.fixture
def host() -> Iterator[DataOwnerHost]:
    h = DataOwnerHost("h")
    h.add_dataset("d", torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                  torch.randint(0, 10, (64,)))
    try:
        yield h
    finally:
        close_channels(h)


def _approved(t: Datasite, host: DataOwnerHost) -> str:
    seg = _segment()
    pid = str(t.call("h", "propose", role="input", spec=module_to_spec(seg),
                     optimizer=OptimizerSpec("sgd", lr=0.1).to_json(), datasets=["d"],
                     **{f"state/{k}": v for k, v in spec_state(seg).items()})["segment"])
    host.approve(pid, channel=True)
    return pid


def _direct(inner: Datasite, **kwargs: Any) -> DirectTransport:
    direct = DirectTransport(inner, **kwargs)
    direct.router.open_deadline_s = 2.0  # a connection it should not have made fails fast
    return direct


def _train(direct: DirectTransport, host: DataOwnerHost, pid: str) -> None:
    """Two steps through ``direct``; the data owner's weights equal a local copy's."""
    local = _segment()
    local.load_state_dict(host.export_weights(pid))
    features = host.datasets["d"].features
    opt = torch.optim.SGD(local.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        idx = torch.randperm(64, generator=g)[:16]
        out = direct.call("h", "forward", segment=pid, indices=idx)["activation"]
        assert_close(out, local(features[idx]), rtol=1e-5, atol=1e-6)
        grad = torch.randn(16, 256, generator=g)
        direct.call("h", "backward", segment=pid, grad=grad)
        opt.zero_grad()
        local(features[idx]).backward(grad)
        opt.step()
    assert_close(host.export_weights(pid), dict(local.state_dict()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", ["127.0.0.1", "127.0.0.2"])
def test_a_ticket_naming_another_address_is_refused_without_connecting(
        host: DataOwnerHost, target: str, caplog: pytest.LogCaptureFixture) -> None:
    """The ticket's address was connected to whatever it named: a data owner could make the
    model owner open TCP/TLS connections to any host and port (here a service on the model
    owner's own machine, at its loopback address or another one). Now it is refused before any
    connection: the listener there receives nothing, the run goes on through the control
    plane and trains as it would have, and the refusal is reported like a failed open."""
    inner = Datasite(host, ELSEWHERE)
    pid = _approved(inner, host)
    listener = socket.create_server((target, 0))
    listener.settimeout(0)
    inner.ticket = {"host": target, "port": listener.getsockname()[1]}
    direct = _direct(inner)
    try:
        with caplog.at_level(logging.INFO, logger="syft_split.channel.client"):
            _train(direct, host, pid)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody knocked
        router = direct.router
        assert router.direct_calls == 0 and router.channels() == {}
        assert inner.rewritten >= 1  # the ticket was asked for, and refused
        why = router.failed[("h", pid)][2]
        assert f"names '{target}' port" in why and "nothing was connected" in why
        assert ELSEWHERE in why
        assert any("nothing was connected" in r.getMessage() for r in caplog.records)
    finally:
        direct.close()
        listener.close()


def test_a_ticket_naming_another_host_name_is_refused_without_a_lookup(
        host: DataOwnerHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name other than the datasite's is refused as it stands: the data owner cannot make the
    model owner's resolver query a name of its choosing (nor connect to what it resolves to)."""
    real: Callable[..., Any] = socket.getaddrinfo
    looked_up: list[Any] = []

    def getaddrinfo(name: Any, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(name)
        if name == "internal.example":  # never on the network from a test
            raise socket.gaierror("not here")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    inner = Datasite(host, "localhost")
    pid = _approved(inner, host)
    inner.ticket = {"host": "internal.example"}
    direct = _direct(inner)
    try:
        _train(direct, host, pid)
        assert "internal.example" not in looked_up
        assert direct.router.direct_calls == 0
        assert "nothing was connected" in direct.router.failed[("h", pid)][2]
    finally:
        direct.close()


def test_a_ticket_naming_the_datasites_host_opens_a_channel(host: DataOwnerHost) -> None:
    """By its name or by an address the name resolves to, any port: the channel opens, and it
    connects to the address the check resolved (nothing is resolved again)."""
    inner = Datasite(host, "localhost")
    pid = _approved(inner, host)
    for named in ("localhost", "127.0.0.1"):
        inner.ticket = {"host": named}
        direct = _direct(inner)
        try:
            _train(direct, host, pid)
            assert direct.router.direct_calls == 4 and direct.router.failed == {}
            [client] = direct.router.clients.values()
            port = client.ticket.port
            assert client.hosts == ("localhost",)
            assert client.addresses and {a[1][:2] for a in client.addresses} <= {
                ("127.0.0.1", port), ("::1", port)}
        finally:
            direct.close()


def test_the_model_owner_may_allow_another_data_plane_host(host: DataOwnerHost) -> None:
    """A datasite reached at 192.0.2.7 whose channel listens on loopback: refused until the
    model owner allows that host for the party (``channel_hosts``), then it opens."""
    inner = Datasite(host, ELSEWHERE)  # the ticket is the host's own: 127.0.0.1
    pid = _approved(inner, host)
    direct = _direct(inner)
    try:
        _train(direct, host, pid)
        assert direct.router.direct_calls == 0 and "nothing was connected" in \
            direct.router.failed[("h", pid)][2]
    finally:
        direct.close()
    for bad in ({"h": ""}, {"h": 7}):
        with pytest.raises(ConfigError, match="channel_hosts"):
            DirectTransport(inner, channel_hosts=bad)  # type: ignore[dict-item]
    direct = _direct(inner, channel_hosts={"h": "localhost", "other": "10.0.0.1"})
    try:
        _train(direct, host, pid)
        assert direct.router.direct_calls == 4 and list(direct.router.channels()) == [("h", pid)]
    finally:
        direct.close()


def test_a_resolver_that_hangs_fails_the_open_within_its_deadline(
        host: DataOwnerHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ticket's host was resolved by ``socket.create_connection`` before the open's deadline
    applied: a resolver that hangs stalled the step. Now the lookup counts against the deadline
    (it is left to finish on its own): the open fails, the step goes through the control plane."""
    real: Callable[..., Any] = socket.getaddrinfo
    release, asked = threading.Event(), threading.Event()

    def getaddrinfo(name: Any, *args: Any, **kwargs: Any) -> Any:
        if name == "stuck.example":
            asked.set()
            release.wait(60)
            raise socket.gaierror("released")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    inner = Datasite(host, "stuck.example")
    pid = _approved(inner, host)
    inner.ticket = {"host": "stuck.example"}
    direct = _direct(inner)
    direct.router.open_deadline_s = 1.0
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(direct.call(
        "h", "forward", segment=pid, indices=torch.arange(4), train=False)))
    try:
        thread.start()
        thread.join(20)  # generous: the deadline is 1 s; an unbounded lookup waits 60 s
        assert asked.is_set() and not thread.is_alive()
        assert out["activation"].shape == (4, 256)  # through the control plane
        why = direct.router.failed[("h", pid)][2]
        assert "not open within 1 s" in why and "resolving 'stuck.example'" in why
        assert direct.router.direct_calls == 0
    finally:
        release.set()
        thread.join(10)
        direct.close()


def test_a_pysyft_transport_trusts_its_datasite_urls_host() -> None:
    """An HTTP datasite's channel must be at its URL's host; one embedded here on loopback."""
    pytest.importorskip("syft")
    from syft.client.client import HTTPConnection

    from syft_split.transport.pysyft import PySyftTransport

    class Client:
        def __init__(self, connection: Any) -> None:
            self.connection = connection
            self.logged_in_user = MO

    class PythonConnection:  # the embedded kind, by its class name
        pass

    t = PySyftTransport({"remote": Client(HTTPConnection(url="http://dsite.example:8081")),
                         "embedded": Client(PythonConnection())},
                        channel_hosts={"remote": "10.1.2.3"})
    assert t.datasite_host("remote") == "dsite.example"
    assert t.datasite_host("embedded") == "localhost"
    assert t.router._home is not None and t.router._home("remote") == "dsite.example"
    assert t.router.channel_hosts == {"remote": "10.1.2.3"}


def test_a_datasite_name_its_dns_points_at_loopback_connects_nowhere(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review R12: the datasite's name, resolved when the channel opens, is the data owner's
    DNS; pointed at the model owner's loopback it would have the model owner connect to a port
    there of the data owner's choosing. Such addresses are refused for a name (not for
    ``localhost`` or an address the model owner wrote itself), and an IP ticket naming one
    is refused even though the name resolves to it."""
    from syft_split.channel import address
    from syft_split.errors import TransportError

    real = socket.getaddrinfo
    names = {"rebound.example": "127.0.0.1", "mapped.example": "::ffff:127.0.0.1",
             "intranet.example": "10.1.2.3"}

    def getaddrinfo(name: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if name in names:  # never on the network from a test
            family = socket.AF_INET6 if ":" in names[name] else socket.AF_INET
            return [(family, socket.SOCK_STREAM, 6, "",
                     (names[name], port) if family == socket.AF_INET else
                     (names[name], port, 0, 0))]
        return real(name, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for name in ("rebound.example", "mapped.example"):
        with pytest.raises(TransportError, match="resolves only to loopback"):
            address.vetted(name, 4433, [name], lambda: 5.0)
    with pytest.raises(TransportError, match="not the datasite's host"):
        address.vetted("127.0.0.1", 4433, ["rebound.example"], lambda: 5.0)
    # an intranet datasite keeps its private address; localhost and a literal stay loopback
    assert [a[1][0] for a in address.vetted("intranet.example", 4433, ["intranet.example"],
                                            lambda: 5.0)] == ["10.1.2.3"]
    assert address.vetted("localhost", 4433, ["localhost"], lambda: 5.0)
    assert address.vetted("127.0.0.1", 4433, ["127.0.0.1"], lambda: 5.0)
    # review R13: a datasite on the model owner's machine reached by its host name; the model
    # owner allows the loopback address it maps to, and a ticket naming the name opens
    assert [a[1][0] for a in address.vetted("rebound.example", 4433,
                                            ["rebound.example", "127.0.0.1"],
                                            lambda: 5.0)] == ["127.0.0.1"]
