"""The direct data plane on real datasites (embedded and HTTP): negotiated through PySyft,
answered by the same host code, governed from the data owner's console."""

from __future__ import annotations

import copy
import time
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from syft_split import wire
from syft_split.channel import ChannelClient
from syft_split.datasite import DatasiteConsole
from syft_split.errors import AccessError, AuthorizationError

from .conftest import INTRUDER, MODEL_OWNER, SplitSite


def _segment(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten())


def _steps(site: SplitSite, pid: str, local: nn.Module, g: torch.Generator) -> None:
    """Three fused steps (the gradient of step t travels with the forward of step t+1)."""
    t = site.transport
    opt = torch.optim.SGD(local.parameters(), lr=0.1)
    idx = torch.randperm(256, generator=g)[:32]
    out = t.call(site.party, "forward", segment=pid, indices=idx)["activation"]
    for step in range(3):
        assert_close(out, local(site.features[idx]), rtol=1e-5, atol=1e-6)
        grad = torch.randn(out.shape, generator=g)
        opt.zero_grad()
        local(site.features[idx]).backward(grad)
        opt.step()
        if step < 2:
            idx = torch.randperm(256, generator=g)[:32]
            out = t.call(site.party, "forward", segment=pid, indices=idx, grad=grad)["activation"]
        else:
            t.call(site.party, "backward", segment=pid, grad=grad)


def test_direct_channel_equals_the_pysyft_path_and_audits_every_step(split_site: SplitSite) -> None:
    site = split_site
    direct_pid, plain_pid = site.propose(_segment(5)), site.propose(_segment(5))
    assert "approve with channel=True" in site.owner.review(direct_pid)
    site.owner.approve(direct_pid, channel=True)
    site.owner.approve(plain_pid)
    router = site.transport.router
    calls0 = router.direct_calls
    start = len(site.owner.audit())
    locals_ = {pid: copy.deepcopy(_segment(5)) for pid in (direct_pid, plain_pid)}
    for pid in (direct_pid, plain_pid):
        _steps(site, pid, locals_[pid], torch.Generator().manual_seed(7))
    assert router.direct_calls - calls0 == 4  # forward x3 + backward, over the channel
    assert (site.party, plain_pid) in router.declined  # no channel allowed: PySyft
    w_direct, w_plain = site.owner.export_weights(direct_pid), site.owner.export_weights(plain_pid)
    assert_close(w_direct, w_plain, rtol=0, atol=1e-6)
    assert_close(w_direct, dict(locals_[direct_pid].state_dict()), rtol=1e-5, atol=1e-6)
    entries = site.owner.audit(start)
    for pid in (direct_pid, plain_pid):  # one entry per step, whichever plane carried it
        ops = [(e.caller, e.op) for e in entries
               if e.segment == pid and e.outcome == "ok" and e.caller == MODEL_OWNER]
        assert ops == [(MODEL_OWNER, "forward")] * 3 + [(MODEL_OWNER, "backward")]
    [info] = [c for c in site.owner.channels("open") if direct_pid in c["segments"]]
    # bound to the model owner's account (its PySyft user id), not to its e-mail
    assert (info["user"], info["frames"]) == (site.transport.principal_on(site.party), 4)
    # closing the transport closes its channels on both sides at once (no idle timeout)
    site.transport.close()
    assert router.channels() == {}
    deadline = time.monotonic() + 10
    while [c for c in site.owner.channels("open") if direct_pid in c["segments"]]:
        assert time.monotonic() < deadline, "the datasite kept the channel open"
        time.sleep(0.05)
    _steps(site, direct_pid, locals_[direct_pid], torch.Generator().manual_seed(8))
    assert router.direct_calls - calls0 == 8  # a new channel on the next call


def test_refusals_on_a_datasite_leave_state_intact(split_site: SplitSite) -> None:
    site = split_site
    pid = site.propose(_segment(6))
    site.owner.approve(pid, channel=True)
    t = site.transport
    idx = torch.arange(16)
    t.call(site.party, "forward", segment=pid, indices=idx)  # opens the channel
    before = site.owner.export_weights(pid)
    start = len(site.owner.audit())
    # a second datasite user: no channel on another user's segment, through PySyft or not
    with pytest.raises(AuthorizationError, match="may not drive"):
        site.intruder.router.open(site.party, [pid])
    ticket = t.router.clients[(site.party, pid)].ticket
    mo = t.principal_on(site.party)  # the channel's user: the account, not its e-mail
    with pytest.raises(AuthorizationError, match=f"belongs to {mo}"):
        ChannelClient(ticket, INTRUDER).connect()
    # a wrong key
    with pytest.raises(AuthorizationError, match="wrong key"):
        ChannelClient(replace(ticket, key=b"\0" * 32), mo).connect()
    # a replayed frame (the model owner's own client, re-sending its last frame number)
    client = t.router.clients[(site.party, pid)]
    replay = wire.decode(client.send_frame(client.seq, wire.encode(
        {"op": "backward", "segment": pid, "grad": torch.ones(16, 256)})))
    assert replay["error"] == "ProtocolError" and "replayed" in str(replay["message"])
    # a frame for a segment the channel is not bound to (approved, but not to this channel)
    other = site.propose(_segment(7))
    site.owner.approve(other, channel=True)
    client.seq += 1
    unbound = wire.decode(client.send_frame(client.seq, wire.encode(
        {"op": "forward", "segment": other, "indices": idx})))
    assert unbound["error"] == "AccessError" and "not to segment" in str(unbound["message"])
    # the data owner closes the channel from its console
    assert site.owner.close_channel(segment=pid) == [client.channel]
    with pytest.raises(AccessError, match="closed by the data owner"):
        t.call(site.party, "backward", segment=pid, grad=torch.ones(16, 256))
    assert_close(site.owner.export_weights(pid), before, rtol=0, atol=0)
    # the forward still waits for its gradient, which now travels through PySyft
    assert t.call(site.party, "backward", segment=pid, grad=torch.ones(16, 256))["steps"] == 1
    rows = {(e.op, e.segment, e.outcome.split(":")[0]) for e in site.owner.audit(start)}
    assert {("channel.hello", None, "AuthorizationError"),  # wrong user, wrong key
            ("backward", pid, "ProtocolError"),  # the replay
            ("forward", other, "AccessError"),  # the unbound segment
            ("channel.hello", None, "AccessError")} <= rows  # the closed channel


def test_only_the_data_owner_governs_channels(split_site: SplitSite) -> None:
    site = split_site
    console = DatasiteConsole(site.transport._client(site.party))
    with pytest.raises(AuthorizationError, match="not an admin"):
        console.channels()
    with pytest.raises(AuthorizationError, match="not an admin"):
        console.close_channel(segment="x")
    pid = site.propose(_segment(8))
    site.owner.approve(pid, channel=True)
    site.transport.call(site.party, "forward", segment=pid, indices=torch.arange(4), train=False)
    site.owner.reject(pid)  # rejecting (or halting) the segment closes its channel
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        [info] = [c for c in site.owner.channels() if pid in c["segments"]]
        if info["state"] == "closed":
            break
        time.sleep(0.1)
    assert (info["state"], info["closed"]) == ("closed", "halted")

