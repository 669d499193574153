"""The direct data plane against in-process hosts: real TLS on loopback, no PySyft.

The control plane here is the in-process transport (on datasites it is PySyft: see
tests/pysyft/test_channel.py). Every refusal is checked to change nothing at the data owner.
"""

from __future__ import annotations

import copy
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from syft_split import channel, wire
from syft_split.channel import (
    ChannelClient,
    ChannelRouter,
    ChannelServer,
    ChannelTicket,
    DirectTransport,
    tls,
)
from syft_split.errors import (
    AccessError,
    ApprovalError,
    AuthorizationError,
    ConfigError,
    TransportError,
    ValidationError,
)
from syft_split.host import DataOwnerHost, HostLimits
from syft_split.host.channel import close_channels
from syft_split.spec import OptimizerSpec, module_to_spec, spec_state
from syft_split.transport.inprocess import InProcessTransport

from .conftest import TEXT_REVIEW_S

MO, INTRUDER = "model-owner@example.org", "intruder@example.org"


@dataclass
class Site:
    host: DataOwnerHost
    direct: DirectTransport  # the model owner, channels on demand
    intruder: InProcessTransport
    features: torch.Tensor

    def propose(self, seg: nn.Module, *, transport: InProcessTransport | None = None) -> str:
        t = transport or self.direct.inner
        return str(t.call("h", "propose", role="input", spec=module_to_spec(seg),
                          optimizer=OptimizerSpec("sgd", lr=0.1).to_json(), datasets=["d"],
                          **{f"state/{k}": v for k, v in spec_state(seg).items()})["segment"])

    def approved(self, seed: int = 0, *, channel: bool = True,
                 transport: InProcessTransport | None = None) -> tuple[str, nn.Module]:
        seg = _segment(seed)
        pid = self.propose(seg, transport=transport)
        self.host.approve(pid, channel=channel)
        return pid, seg

    def ticket(self, pid: str, user: str = MO) -> ChannelTicket:
        r = self.host.handle(user, wire.encode({"op": "open_channel", "segments": [pid]}))
        response = wire.decode(r)
        if "error" in response:
            from syft_split.errors import error_from_wire

            raise error_from_wire(response["error"], response["message"])
        return ChannelTicket.from_response(response)

    def weights(self, pid: str) -> dict[str, torch.Tensor]:
        return self.host.export_weights(pid)


def _segment(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten())


def _request(op: str, pid: str, **fields: object) -> bytes:
    return wire.encode({"op": op, "segment": pid, **fields})


def _answer(raw: bytes) -> dict[str, object]:
    return wire.decode(raw)


@pytest.fixture
def site() -> Iterator[Site]:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(64, 1, 8, 8, generator=g)
    host = DataOwnerHost("h", limits=HostLimits(review_budget_s=TEXT_REVIEW_S))
    host.add_dataset("d", features, torch.randint(0, 10, (64,), generator=g))
    inner = InProcessTransport([host], user=MO)
    s = Site(host, DirectTransport(inner), InProcessTransport([host], user=INTRUDER), features)
    try:
        yield s
    finally:
        s.direct.close()
        close_channels(host)


def _local_step(seg: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    opt = torch.optim.SGD(seg.parameters(), lr=0.1)
    opt.zero_grad()
    seg(x).backward(grad)
    opt.step()


def test_public_surface_is_pinned() -> None:
    assert set(channel.__all__) == {"DATA_OPS", "Channel", "ChannelClient", "ChannelRouter",
                                    "ChannelServer", "ChannelTicket", "DirectTransport"}


def test_peek_reads_op_and_segment_and_gives_none_for_bad_headers() -> None:
    from syft_split.channel import tls

    assert tls.peek(wire.encode({"op": "forward", "segment": "s"})) == ("forward", "s")
    deep = b'{"fields":[],"inline":{"op":' + b"[" * 200_000 + b"]" * 200_000 + b"}}"
    data = wire.MAGIC + bytes([1]) + len(deep).to_bytes(4, "little") + deep
    assert tls.peek(data) == (None, None)  # was a RecursionError out of the frame loop


def test_direct_steps_equal_control_plane_steps_and_each_is_audited(site: Site) -> None:
    direct_pid, seg = site.approved(1, channel=True)
    plain_pid, _ = site.approved(1, channel=False)
    local = copy.deepcopy(seg)
    g = torch.Generator().manual_seed(3)
    for _step in range(3):
        idx = torch.randperm(64, generator=g)[:16]
        grad = torch.randn(16, 256, generator=g)
        for pid in (direct_pid, plain_pid):
            out = site.direct.call("h", "forward", segment=pid, indices=idx)["activation"]
            assert_close(out, local(site.features[idx]), rtol=1e-5, atol=1e-6)
            site.direct.call("h", "backward", segment=pid, grad=grad)
        _local_step(local, site.features[idx], grad)
    assert site.direct.router.channels() == {("h", direct_pid): site.direct.router.channels()[
        ("h", direct_pid)]}  # one channel, for the segment approved with one
    assert site.direct.router.direct_calls == 6
    assert_close(site.weights(direct_pid), site.weights(plain_pid), rtol=0, atol=1e-6)
    assert_close(site.weights(direct_pid), dict(local.state_dict()), rtol=1e-5, atol=1e-6)
    for pid in (direct_pid, plain_pid):  # one audit entry per call, either way
        ops = [e.op for e in site.host.audit if e.segment == pid and e.caller == MO]
        assert ops.count("forward") == 3 and ops.count("backward") == 3


def test_review_says_a_channel_is_opt_in(site: Site) -> None:
    pid = site.propose(_segment(0))
    assert "off unless you approve with channel=True" in site.host.review(pid)
    with pytest.raises(ConfigError, match="channel must be True or False"):
        site.host.approve(pid, channel="yes")
    assert site.host.proposal(pid).status == "pending"
    site.host.approve(pid, channel=True)
    assert f"direct channel: ALLOWED for {MO}" in site.host.review(pid)
    other, _ = site.approved(0, channel=False)
    assert "direct channel: not allowed" in site.host.review(other)


def test_open_channel_is_refused_unless_approved_with_one_for_this_user(site: Site) -> None:
    pending = site.propose(_segment(0))
    with pytest.raises(ApprovalError, match="pending"):
        site.ticket(pending)
    without, _ = site.approved(0, channel=False)
    with pytest.raises(AccessError, match="did not allow a direct channel"):
        site.ticket(without)
    mine, _ = site.approved(0, channel=True)
    with pytest.raises(AuthorizationError, match="may not drive"):
        site.ticket(mine, user=INTRUDER)
    for bad in ([], [mine, mine], "x", [1]):
        with pytest.raises(ValidationError, match="segments must be"):
            site.direct.inner.call("h", "open_channel", segments=bad)
    assert site.host.owner("channels")["channels"] == []  # nothing was opened
    # the router falls back to the control plane for a segment without a channel
    site.direct.call("h", "forward", segment=without, indices=torch.arange(4), train=False)
    assert site.direct.router.direct_calls == 0 and ("h", without) in site.direct.router.declined


def test_wrong_key_wrong_user_and_wrong_certificate_are_refused(site: Site) -> None:
    pid, _ = site.approved(0)
    ticket = site.ticket(pid)
    with pytest.raises(AuthorizationError, match="wrong key"):
        ChannelClient(replace(ticket, key=bytes(32)), MO).connect()
    with pytest.raises(AuthorizationError, match=f"belongs to {MO}"):
        ChannelClient(ticket, INTRUDER).connect()
    other = site.ticket(site.approved(1)[0])  # a real certificate, of another channel
    with pytest.raises(TransportError, match="did not present the certificate"):
        ChannelClient(replace(ticket, certificate=other.certificate,
                              fingerprint=other.fingerprint), MO).connect()
    with pytest.raises(TransportError, match="does not match its fingerprint"):
        ChannelTicket.from_response({**vars(ticket), "fingerprint": other.fingerprint})
    refusals = [e for e in site.host.audit if e.op == "channel.hello"]
    assert [e.outcome.split(":")[0] for e in refusals] == ["AuthorizationError"] * 2
    assert refusals[0].caller.startswith("unauthenticated peer")
    client = ChannelClient(ticket, MO)  # the right key still works
    out = _answer(client.request(_request("forward", pid, indices=torch.arange(4), train=False)))
    assert tuple(out["activation"].shape) == (4, 256)  # type: ignore[union-attr]
    client.close()


def test_replayed_and_out_of_order_frames_are_refused_and_nothing_runs(site: Site) -> None:
    pid, seg = site.approved(2)
    local = copy.deepcopy(seg)
    client = ChannelClient(site.ticket(pid), MO)
    idx = torch.arange(8)
    frame = _request("forward", pid, indices=idx)
    assert "activation" in _answer(client.send_frame(1, frame))
    before, audit_len = site.weights(pid), len(site.host.audit)
    replayed = _answer(client.send_frame(1, frame))
    assert replayed["error"] == "ProtocolError" and "replayed" in str(replayed["message"])
    ahead = _answer(client.send_frame(5, _request("backward", pid, grad=torch.ones(8, 256))))
    assert ahead["error"] == "ProtocolError" and "expected 2" in str(ahead["message"])
    assert_close(site.weights(pid), before, rtol=0, atol=0)
    assert site.host.runtimes[pid].pending_output is not None  # the forward still waits
    assert [e.outcome.split(":")[0] for e in site.host.audit[audit_len:]] == ["ProtocolError"] * 2
    grad = torch.randn(8, 256)
    client.seq = 1
    assert "steps" in _answer(client.request(_request("backward", pid, grad=grad)))
    _local_step(local, site.features[idx], grad)
    assert_close(site.weights(pid), dict(local.state_dict()), rtol=1e-5, atol=1e-6)
    client.close()


def test_frames_for_other_segments_and_non_data_plane_ops_are_refused(site: Site) -> None:
    pid, _ = site.approved(0)
    other, _ = site.approved(1)  # approved with a channel too, but not bound to this one
    pending = site.propose(_segment(2))
    client = ChannelClient(site.ticket(pid), MO)
    before = site.weights(other)
    for target in (other, pending, "h/seg999"):
        r = _answer(client.request(_request("forward", target, indices=torch.arange(4))))
        assert r["error"] == "AccessError" and "not to segment" in str(r["message"])
    proposals = set(site.host.proposals_by_id)
    for op in ("propose", "fl_propose", "psi_serve", "psi_request", "psi_finish", "status"):
        r = _answer(client.request(wire.encode({"op": op, "segment": pid, "datasets": ["d"]})))
        assert r["error"] == "ProtocolError" and "not a data-plane op" in str(r["message"]), op
    assert set(site.host.proposals_by_id) == proposals
    # the allow list is the host's ops that run on a segment (declared with roles)
    assert site.host.families["channel"].data_ops() == channel.DATA_OPS
    assert site.host.runtimes[other].pending_output is None
    assert_close(site.weights(other), before, rtol=0, atol=0)
    assert site.host.proposal(pending).status == "pending"
    client.close()


def test_a_second_user_cannot_use_its_channel_for_another_users_segment(site: Site) -> None:
    mine, _ = site.approved(0)
    theirs, _ = site.approved(1, transport=site.intruder)
    intruder = ChannelClient(site.ticket(theirs, user=INTRUDER), INTRUDER)
    r = _answer(intruder.request(_request("forward", mine, indices=torch.arange(4))))
    assert r["error"] == "AccessError"
    assert site.host.runtimes[mine].pending_output is None
    # and its own segment works over its own channel, as itself
    r = _answer(intruder.request(_request("forward", theirs, indices=torch.arange(4),
                                          train=False)))
    assert "activation" in r
    assert site.host.audit[-1].caller == INTRUDER
    intruder.close()


def test_the_data_owner_closes_a_channel_any_time(site: Site) -> None:
    pid, _ = site.approved(0)
    t = site.direct
    t.call("h", "forward", segment=pid, indices=torch.arange(8))
    [cid] = t.router.channels().values()
    before = site.weights(pid)
    assert site.host.owner("close_channel", channel=cid)["closed"] == [cid]
    with pytest.raises(AccessError, match="closed by the data owner"):
        t.call("h", "backward", segment=pid, grad=torch.ones(8, 256))
    assert_close(site.weights(pid), before, rtol=0, atol=0)
    assert site.host.runtimes[pid].pending_output is not None
    # the permission went with it: steps go through the control plane from now on
    with pytest.raises(AccessError, match="did not allow"):
        site.ticket(pid)
    assert t.call("h", "backward", segment=pid, grad=torch.ones(8, 256))["steps"] == 1
    [info] = site.host.owner("channels")["channels"]
    assert (info["state"], info["closed"], info["frames"]) == ("closed", "owner", 1)
    site.host.owner("allow_channel", segment=pid)  # the data owner may grant it again
    assert site.ticket(pid).segments == (pid,)
    with pytest.raises(ConfigError, match="channel=<id> or segment=<id>"):
        site.host.owner("close_channel")


def _wait_closed(host: DataOwnerHost, cid: str, timeout: float = 5.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        info = {c["channel"]: c for c in host.owner("channels")["channels"]}[cid]
        if info["state"] == "closed" or time.monotonic() > deadline:
            return info


@pytest.mark.parametrize("how", ["halt", "reject"])
def test_a_channel_closes_when_its_segment_is_halted_or_rejected(site: Site, how: str) -> None:
    pid, _ = site.approved(0)
    client = ChannelClient(site.ticket(pid), MO)
    client.request(_request("forward", pid, indices=torch.arange(4), train=False))
    site.host.owner(how, segment=pid)
    info = _wait_closed(site.host, client.channel)
    assert (info["state"], info["closed"]) == ("closed", "halted")
    with pytest.raises(AccessError, match="halted"):
        client.request(_request("forward", pid, indices=torch.arange(4), train=False))


def test_idle_channels_expire_and_the_router_opens_a_new_one(site: Site) -> None:
    site.host.owner("channel_settings", idle_timeout=0.3)
    pid, _ = site.approved(0)
    t = site.direct
    t.call("h", "forward", segment=pid, indices=torch.arange(4), train=False)
    [old] = t.router.channels().values()
    stale = t.router.clients[("h", pid)].ticket
    info = _wait_closed(site.host, old)
    assert (info["state"], info["closed"]) == ("closed", "expired")
    with pytest.raises(AccessError, match="expired"):
        ChannelClient(stale, MO).connect()
    t.call("h", "forward", segment=pid, indices=torch.arange(4), train=False)
    [new] = t.router.channels().values()
    assert new != old and t.router.direct_calls == 2


def test_a_lost_connection_resumes_and_no_frame_runs_twice(site: Site) -> None:
    pid, _ = site.approved(0)
    client = ChannelClient(site.ticket(pid), MO)
    client.request(_request("forward", pid, indices=torch.arange(4)))
    server_side = site.host.families["channel"].server.channels[client.channel]
    server_side.conn.shutdown(2)  # the connection drops (e.g. a NAT timeout)
    time.sleep(0.05)
    r = _answer(client.request(_request("backward", pid, grad=torch.ones(4, 256))))
    assert r["steps"] == 1
    # a frame that ran but whose answer was lost: resuming returns that answer, runs nothing
    answer = client.send_frame(client.seq + 1, _request("forward", pid, indices=torch.arange(4)))
    client.seq += 1
    assert client._resume(client.seq) == answer
    assert sum(e.op == "forward" for e in site.host.audit if e.segment == pid) == 2
    client.close()


def test_settings_and_limits(site: Site) -> None:
    with pytest.raises(ConfigError, match="unknown channel settings"):
        site.host.owner("channel_settings", colour="red")
    with pytest.raises(ConfigError, match="idle_timeout"):
        site.host.owner("channel_settings", idle_timeout=0)
    with pytest.raises(ConfigError, match="max_handshakes_per_minute"):
        site.host.owner("channel_settings", max_handshakes_per_minute=0)
    site.host.owner("channel_settings", max_per_user=1)
    site.ticket(site.approved(0)[0])
    with pytest.raises(ValidationError, match="allows 1 per user"):
        site.ticket(site.approved(1)[0])
    site.host.owner("channel_settings", max_handshakes_per_minute=7, max_kept_bytes=0)
    server = site.host.families["channel"].server  # type: ignore[attr-defined]
    assert server.arrivals.per_minute == 7 and server.max_kept_bytes == 0  # at once


def test_settings_survive_a_restart(tmp_path: Path) -> None:
    def start() -> DataOwnerHost:
        host = DataOwnerHost("h", state_dir=tmp_path)
        host.add_dataset("d", torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
        host.restore_state()
        return host
    first = start()
    tight = {"idle_timeout": 5.0, "max_channels": 1, "max_per_user": 1, "advertise": "dt.local",
             "max_handshakes_per_minute": 3, "max_kept_bytes": 1024}
    first.owner("channel_settings", **tight)
    with pytest.raises(ConfigError, match="max_channels"):  # refused, nothing changes
        first.owner("channel_settings", max_channels=0)
    first.close()
    again = start()
    assert again.owner("channels")["settings"] == {"bind": "127.0.0.1", "port": 0, **tight}
    family = again.families["channel"]
    with pytest.raises(ConfigError, match="saved channel settings are invalid"):
        family.restore({"settings": {**tight, "max_per_user": "many"}})
    assert again.owner("channels")["settings"]["max_per_user"] == 1  # left as it was
    close_channels(again)
    again.close()


def test_a_session_trains_over_channels_without_changing_user_code() -> None:
    """SplitSession + Trainer, unchanged: over DirectTransport the steps take the channels the
    data owners allowed, and the result equals the run over the control plane only."""
    from syft_split import OptimizerSpec as Opt
    from syft_split import SplitPlan, SplitSession, Trainer
    from syft_split.deploy import inprocess

    g = torch.Generator().manual_seed(1)
    parties = {p: {"train": (torch.randn(48, 1, 8, 8, generator=g),
                             torch.randint(0, 10, (48,), generator=g))} for p in ("a", "b")}
    states = []
    for direct in (True, False):
        torch.manual_seed(0)
        segments = [nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten()),
                    nn.Linear(128, 10)]
        dep = inprocess(parties)
        transport = DirectTransport(dep.transport) if direct else dep.transport
        plan = SplitPlan.vanilla(segments, ["a", "b"], labels="released", datasets=["train"])
        session = SplitSession(plan, transport, optimizer=Opt("adam", lr=1e-2))
        dep.approve_all(session.propose(), channel=True)
        Trainer(session, batch_size=16, progress=False, measure_leakage=False,
                test_dataset=None).fit(1, verbose=False)
        states.append([dep.owners[p].export_weights(f"{p}/seg1") for p in ("a", "b")]
                      + [dict(segments[1].state_dict())])
        if direct:
            assert isinstance(transport, DirectTransport)
            assert transport.router.direct_calls >= 6 and len(transport.router.channels()) == 2
        transport.close()
        for host in dep.owners.values():
            close_channels(host)
    for direct_state, plain_state in zip(*states):
        assert_close(direct_state, plain_state, rtol=0, atol=1e-6)


def _slow_server(seconds: float, idle: float = 60.0
                 ) -> tuple[ChannelServer, list[float], Callable[[], ChannelTicket], list[tuple]]:
    """A bare server whose host takes ``seconds`` per frame (first frame only) and counts runs."""
    runs: list[float] = []
    audits: list[tuple] = []

    def handle(user: str, data: bytes) -> bytes:
        runs.append(time.monotonic())
        time.sleep(seconds if len(runs) == 1 else 0.0)
        return wire.encode({"run": len(runs)})

    server = ChannelServer(handle, threading.RLock(), check=lambda c: None,
                           audit=lambda *a: audits.append(a), sweep_s=0.05)

    def ticket() -> ChannelTicket:
        ch, key = server.open(MO, ("s1",), idle)
        return ChannelTicket(ch.id, *server.address, ch.certificate, ch.fingerprint, key, idle,
                             ("s1",))
    return server, runs, ticket, audits


@pytest.mark.parametrize("how", ["drop", "timeout", "expiry"])
def test_a_frame_in_flight_runs_once_after_a_drop_a_timeout_or_an_expiry(how: str) -> None:
    # a local_forward (no step id: the host does not deduplicate it) runs longer than the
    # connection lives / the client waits / the channel's idle timeout
    server, runs, ticket, _ = _slow_server(1.0, idle=0.4 if how == "expiry" else 60.0)
    frame = _request("local_forward", "s1")
    try:
        if how == "expiry":  # the router resends after "expired" only if nothing ran
            def control(party: str, data: bytes) -> bytes:
                t = ticket()
                return wire.encode({"channel": t.channel, "host": t.host, "port": t.port,
                                    "certificate": t.certificate, "fingerprint": t.fingerprint,
                                    "key": t.key, "idle_timeout": t.idle_timeout,
                                    "segments": list(t.segments)})
            router = ChannelRouter(control, lambda party: MO, timeout=30)
            answer = router.route("h", frame)
            [ch] = server.channels.values()
        else:
            client = ChannelClient(ticket(), MO, timeout=0.7 if how == "timeout" else 30)
            client.connect()
            [ch] = server.channels.values()
            if how == "drop":
                conn = ch.conn
                assert conn is not None
                threading.Timer(0.3, lambda: conn.shutdown(socket.SHUT_RDWR)).start()
            answer = client.request(frame)
        time.sleep(0.3)
        assert _answer(answer) == {"run": 1}  # the answer of its one run, recovered
        assert len(runs) == 1 and ch.last_seq == 1 and ch.inflight == 0
        assert ch.state == "open"  # a frame in flight is not idleness
    finally:
        server.shutdown()


def test_an_oversized_hello_is_refused_and_audited(monkeypatch: pytest.MonkeyPatch) -> None:
    escaped: list[object] = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    server, runs, ticket, audits = _slow_server(0.0)
    t = ticket()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with ctx.wrap_socket(socket.create_connection(server.address),
                             server_hostname=t.channel) as s:
            s.sendall((10**6).to_bytes(4, "little") + b"X" * 16)
            r = wire.decode(tls.recv_frame(s, 1 << 20))
        assert r["error"] == "PayloadTooLargeError"
        time.sleep(0.2)
        assert [a[1] for a in audits] == ["channel.hello"]
        assert "PayloadTooLargeError" in audits[0][4] and "unauthenticated" in audits[0][0]
        assert escaped == [] and runs == []
        assert server.channels[t.channel].state == "open"  # a stranger cannot close it
    finally:
        server.shutdown()
