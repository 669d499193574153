"""The data-owner plugin and the PySyft transport against real datasites (embedded and HTTP)."""

from __future__ import annotations

import copy
import glob
import sqlite3
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from syft_split import datasite, wire
from syft_split.errors import (
    AccessError,
    ApprovalError,
    AuthorizationError,
    ConfigError,
    DTypeError,
    EgressError,
    NonFiniteError,
    ProtocolError,
    ShapeError,
    SyftSplitError,
    TransportError,
    ValidationError,
    WireError,
)
from syft_split.transport import pysyft

from .conftest import INTRUDER, MODEL_OWNER, SplitSite


def _segment(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten())


def _approved(site: SplitSite, seed: int = 0) -> tuple[str, nn.Sequential]:
    seg = _segment(seed)
    pid = site.propose(seg)
    site.owner.approve(pid)
    return pid, seg


def _local_step(seg: nn.Module, x: torch.Tensor, grad: torch.Tensor, lr: float = 0.1) -> None:
    opt = torch.optim.SGD(seg.parameters(), lr=lr)
    opt.zero_grad()
    seg(x).backward(grad)
    opt.step()


def test_public_surface_is_pinned() -> None:
    assert set(datasite.__all__) == {
        "ENDPOINT_PATH", "DatasiteConsole", "ProposalInfo", "install", "uninstall",
        "publish_dataset", "call_endpoint", "syft_split_endpoint", "serve", "as_result",
    }
    assert set(pysyft.__all__) == {
        "PySyftTransport", "deployment", "LaunchedDatasite", "launch_datasite", "free_port",
        "connect", "restart", "DEFAULT_ADMIN",
    }


def test_propose_review_approve_train_equals_local(split_site: SplitSite) -> None:
    site, t = split_site, split_site.transport
    seg = _segment(1)
    local = copy.deepcopy(seg)
    pid = site.propose(seg)
    assert t.call(site.party, "status", segment=pid)["status"] == "pending"

    [info] = [p for p in site.owner.proposals("pending") if p.id == pid]
    assert (info.driver, info.role, info.output_shape) == (MODEL_OWNER, "input", [256])
    text = site.owner.review(pid)
    assert "Conv2d" in text and "(batch, 256)" in text and MODEL_OWNER in text
    site.owner.approve(pid)
    assert t.call(site.party, "status", segment=pid)["status"] == "approved"

    g = torch.Generator().manual_seed(2)
    for step in range(3):
        idx = torch.randperm(256, generator=g)[:32]
        out = t.call(site.party, "forward", segment=pid, indices=idx)["activation"]
        assert_close(out, local(site.features[idx]), rtol=1e-5, atol=1e-6)
        grad = torch.randn(out.shape, generator=g)
        if step == 2:  # the fused form: gradient of this forward + the next forward
            nxt = torch.randperm(256, generator=g)[:32]
            t.call(site.party, "forward", segment=pid, indices=nxt, grad=grad)
            t.call(site.party, "discard", segment=pid)
        else:
            assert t.call(site.party, "backward", segment=pid, grad=grad)["steps"] == step + 1
        _local_step(local, site.features[idx], grad)
    remote = site.owner.export_weights(pid)
    assert_close(remote, {k: v for k, v in local.state_dict().items()}, rtol=1e-5, atol=1e-6)


def test_unapproved_or_rejected_segment_cannot_run(split_site: SplitSite) -> None:
    site, t = split_site, split_site.transport
    pid = site.propose(_segment())
    with pytest.raises(ApprovalError, match="pending"):
        t.call(site.party, "forward", segment=pid, indices=torch.arange(4))
    site.owner.reject(pid)
    with pytest.raises(ApprovalError, match="rejected"):
        t.call(site.party, "forward", segment=pid, indices=torch.arange(4))
    with pytest.raises(ApprovalError):
        site.owner.approve(pid)  # a rejected proposal stays rejected
    with pytest.raises(ApprovalError, match="unknown"):
        t.call(site.party, "forward", segment="hospital/seg999", indices=torch.arange(4))


def test_the_data_owners_limits_reach_its_host(split_site: SplitSite) -> None:
    """``install(..., limits=HostLimits(...))``: the host in the datasite's process enforces
    them (here max_width=4096, the default accepts 65 536)."""
    site = split_site
    before = len(site.owner.proposals())
    wide = nn.Sequential(nn.Flatten(), nn.Linear(64, 5000))
    with pytest.raises(ConfigError, match="layer width; this data owner accepts at most 4096"):
        site.propose(wide)
    assert len(site.owner.proposals()) == before


def test_other_user_cannot_drive_an_approved_segment(split_site: SplitSite) -> None:
    site = split_site
    pid, _ = _approved(site)
    site.transport.call(site.party, "forward", segment=pid, indices=torch.arange(4))
    for op, fields in [("forward", {"indices": torch.arange(4)}),
                       ("backward", {"grad": torch.zeros(4, 256)}),
                       ("status", {}), ("discard", {}), ("export", {})]:
        with pytest.raises(AuthorizationError):
            site.intruder.call(site.party, op, segment=pid, **fields)
    # the model owner's pending forward is untouched by the intruder's attempts
    assert site.transport.call(site.party, "backward", segment=pid,
                               grad=torch.zeros(4, 256))["steps"] == 1


@pytest.mark.parametrize("who", ["model_owner", "intruder"])
def test_non_admins_cannot_run_data_owner_ops(split_site: SplitSite, who: str) -> None:
    site = split_site
    pid = site.propose(_segment())
    client = site.intruder_client if who == "intruder" else site.transport._client(site.party)
    console = datasite.DatasiteConsole(client)
    attempts: list[Callable[[], object]] = [
        lambda: console.approve(pid), lambda: console.reject(pid), lambda: console.review(pid),
        console.proposals, console.audit, lambda: console.export_weights(pid),
        lambda: console.release_weights(pid), lambda: console.trust_peer("mallory", b"k" * 32),
        console.describe,
    ]
    for attempt in attempts:
        with pytest.raises(AuthorizationError, match="not an admin"):
            attempt()
    assert site.transport.call(site.party, "status", segment=pid)["status"] == "pending"
    # nor can a non-admin re-register the endpoint
    with pytest.raises(TransportError):
        datasite.install(client, {"x": "0" * 32}, path="syft_split.evil")


def test_bad_inputs_are_refused_and_state_is_intact(split_site: SplitSite) -> None:
    site, t = split_site, split_site.transport
    pid, seg = _approved(site, seed=3)
    local = copy.deepcopy(seg)
    idx = torch.arange(16)
    with pytest.raises(ProtocolError, match="without a pending forward"):
        t.call(site.party, "backward", segment=pid, grad=torch.zeros(16, 256))
    t.call(site.party, "forward", segment=pid, indices=idx)
    before = site.owner.export_weights(pid)
    nan = torch.zeros(16, 256)
    nan[3, 7] = float("nan")
    bad = [
        (ShapeError, {"grad": torch.zeros(16, 255)}),
        (ShapeError, {"grad": torch.zeros(8, 256)}),
        (DTypeError, {"grad": torch.zeros(16, 256, dtype=torch.float64)}),
        (NonFiniteError, {"grad": nan}),
    ]
    for error, fields in bad:
        with pytest.raises(error):
            t.call(site.party, "backward", segment=pid, **fields)
    with pytest.raises(ProtocolError, match="unknown op"):
        t.call(site.party, "steal_data", segment=pid)
    with pytest.raises(ProtocolError, match="pending its gradient"):
        t.call(site.party, "forward", segment=pid, indices=idx)
    resp = wire.decode(t.request(site.party, b"definitely not a wire message"))
    assert resp["error"] == WireError.__name__
    assert_close(site.owner.export_weights(pid), before, rtol=0, atol=0)
    # the pending forward survived: the right gradient still trains, equal to local
    grad = torch.randn(16, 256)
    t.call(site.party, "backward", segment=pid, grad=grad)
    _local_step(local, site.features[idx], grad)
    assert_close(site.owner.export_weights(pid), dict(local.state_dict()), rtol=1e-5, atol=1e-6)
    t.call(site.party, "forward", segment=pid, indices=idx)  # training continues
    t.call(site.party, "discard", segment=pid)


def test_egress_guard(split_site: SplitSite) -> None:
    """What the approval fixes and what it does not.

    The guard enforces the approved per-record output shape and float32 dtype on every
    release, the approved datasets and max batch, and that weights only change by training.
    It does NOT judge information content: a segment whose initial weights are the identity
    releases the raw features in the approved shape, and the review (layers, shapes,
    parameter count) cannot show that. Reading the review is the data owner's defence.
    """
    site, t = split_site, split_site.transport
    # a segment whose output shape depends on the batch is refused at release time
    pid = site.propose(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Flatten(0, -1)))
    site.owner.approve(pid)
    with pytest.raises(EgressError, match="approved"):
        t.call(site.party, "forward", segment=pid, indices=torch.arange(4))
    # only the approved dataset, at most max_batch records, valid indices
    pid, seg = _approved(site)
    with pytest.raises(AccessError, match="approved for"):
        t.call(site.party, "forward", segment=pid, indices=torch.arange(4), dataset="other")
    with pytest.raises(ValidationError, match="max_batch"):
        t.call(site.party, "forward", segment=pid, indices=torch.arange(257) % 256)
    with pytest.raises(ValidationError, match="indices must be in"):
        t.call(site.party, "forward", segment=pid, indices=torch.tensor([0, 256]))
    # extra fields cannot smuggle new weights into an approved segment
    out = t.call(site.party, "forward", segment=pid, indices=torch.arange(4), train=False,
                 **{f"state/{k}": torch.zeros_like(v) for k, v in seg.state_dict().items()})
    assert_close(out["activation"], seg(site.features[:4]), rtol=1e-5, atol=1e-6)
    # the limit: identity initial weights release the raw features, in the approved shape
    lin = nn.Linear(64, 64)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(64))
        lin.bias.zero_()
    spy = nn.Sequential(nn.Flatten(), lin)
    pid = site.propose(spy)
    text = site.owner.review(pid)
    assert "input per record (1, 8, 8)" in text and "(batch, 64)" in text
    site.owner.approve(pid)
    out = t.call(site.party, "forward", segment=pid, indices=torch.arange(4), train=False)
    assert torch.equal(out["activation"], site.features[:4].flatten(1))


def test_audit_log_records_every_call(split_site: SplitSite) -> None:
    site, t = split_site, split_site.transport
    start = len(site.owner.audit())
    pid, _ = _approved(site)
    t.call(site.party, "forward", segment=pid, indices=torch.arange(8))
    with pytest.raises(AuthorizationError):
        site.intruder.call(site.party, "backward", segment=pid, grad=torch.zeros(8, 256))
    with pytest.raises(AuthorizationError):
        datasite.DatasiteConsole(site.intruder_client).approve(pid)
    entries = site.owner.audit(start)
    rows = [(e.caller, e.op, e.outcome.split(":")[0]) for e in entries]
    assert (MODEL_OWNER, "propose", "ok") in rows
    assert ("info@openmined.org", "owner.approve", "ok") in rows
    assert (MODEL_OWNER, "forward", "ok") in rows
    assert (INTRUDER, "backward", "AuthorizationError") in rows
    assert (INTRUDER, "owner.approve", "AuthorizationError") in rows
    fwd = next(e for e in entries if e.op == "forward")
    assert fwd.segment == pid and fwd.shapes == {"indices": [8]} and fwd.bytes_out > 8 * 256 * 4
    assert site.owner.audit_log()[-1]["op"] == "owner.audit"


def _action_objects(site: SplitSite) -> int:
    [db] = glob.glob(str(site.datasite.data_dir / "db" / "*.db"))
    with sqlite3.connect(db) as conn:
        return int(conn.execute('select count(*) from "ActionObject"').fetchone()[0])


def test_results_are_deleted_so_the_store_stays_bounded(split_site: SplitSite) -> None:
    site, t = split_site, split_site.transport
    pid, _ = _approved(site)
    t.call(site.party, "forward", segment=pid, indices=torch.arange(8), train=False)
    before = _action_objects(site)
    for _ in range(10):
        t.call(site.party, "forward", segment=pid, indices=torch.arange(8), train=False)
    assert _action_objects(site) == before
    if not site.datasite.http:  # same process: PySyft's per-call client APIs are unregistered
        from syft.client.api import APIRegistry

        n = len(APIRegistry.__api_registry__)
        t.call(site.party, "describe")
        assert len(APIRegistry.__api_registry__) == n


def test_results_of_others_are_not_deleted(split_site: SplitSite) -> None:
    site = split_site
    raw, mine = datasite.call_endpoint(site.transport._client(site.party),
                                       request=wire.encode({"op": "describe"}))
    before = _action_objects(site)
    # the intruder names the model owner's result and an asset as "done": nothing is deleted
    asset_id = site.datasite.root.datasets["digits"].assets["features"].action_id
    for victim in (mine, str(asset_id), "not-a-uid"):
        datasite.call_endpoint(site.intruder_client, request=wire.encode({"op": "describe"}),
                               done=victim)
    assert _action_objects(site) == before + 3  # the intruder's own three results
    assert wire.decode(raw)["host"] == site.party


def test_transport_errors_are_mapped(split_site: SplitSite) -> None:
    site = split_site
    with pytest.raises(TransportError, match="unknown party"):
        site.transport.call("nowhere", "describe")
    wrong = pysyft.PySyftTransport({site.party: site.transport._client(site.party)},
                                   path="syft_split.missing")
    with pytest.raises(TransportError) as info:
        wrong.call(site.party, "describe")
    assert info.value.__cause__ is not None


def test_install_refuses_a_second_endpoint_and_bad_assets(split_site: SplitSite) -> None:
    from syft_split.errors import ConfigError

    root = split_site.datasite.root
    with pytest.raises(ConfigError, match="already exists"):
        datasite.install(root, {"x": "0" * 32})
    with pytest.raises(ConfigError, match="asset"):
        datasite.install(root, {"x": "not an asset"}, path="syft_split.other")


def test_an_e_mail_that_passes_to_another_account_drives_nothing(split_site: SplitSite) -> None:
    """Approvals hold for the PySyft account (its id), not its e-mail: after the data owner
    deletes the approved user's account, another user who takes its e-mail is refused; the
    audit tells the two apart; ``forget_user`` halts the deleted user's segments and closes
    its channel, which deleting the account alone leaves open."""
    site = split_site
    victim_email, thief_email = f"victim-{site.kind}@example.org", f"thief-{site.kind}@example.org"
    victim = pysyft.PySyftTransport({site.party: site.datasite.register(victim_email, "v-pw")},
                                    direct=True)
    thief_client = site.datasite.register(thief_email, "t-pw")
    thief = pysyft.PySyftTransport({site.party: thief_client})
    pid = site.propose(_segment(), transport=victim)
    site.owner.approve(pid, channel=True)
    idx = torch.arange(4)
    for _ in range(2):  # the second forward goes over the channel
        victim.call(site.party, "forward", segment=pid, indices=idx, train=False)
    [channel] = victim.router.channels().values()
    root = site.datasite.root
    [account] = [u for u in root.users.get_all() if u.email == victim_email]
    root.users.delete(account.id)
    thief_client.api.services.user.update(uid=thief_client.account.id, email=victim_email)
    for op, fields in [("forward", {"indices": idx}), ("status", {}), ("discard", {})]:
        with pytest.raises(AuthorizationError, match=r"may not drive|did not propose"):
            thief.call(site.party, op, segment=pid, **fields)
    [info] = [p for p in site.owner.proposals() if p.id == pid]
    assert info.driver == victim_email and info.driver_id.startswith("syft-user:")
    refused = [e for e in site.owner.audit()
               if e.segment == pid and e.outcome.startswith("AuthorizationError")]
    assert refused and {(e.caller, e.user) for e in refused} == {
        (victim_email, f"syft-user:{thief_client.account.id}")}
    # the deleted account's channel still answers until the data owner forgets that user
    victim.call(site.party, "forward", segment=pid, indices=idx, train=False)
    with pytest.raises(ConfigError, match="2 users went by"):
        site.owner.forget_user(victim_email)
    forgot = site.owner.forget_user(info.driver_id)
    assert forgot["halted"] == [pid] and forgot["closed"] == [channel]
    assert [c["state"] for c in site.owner.channels() if c["channel"] == channel] == ["closed"]
    with pytest.raises(SyftSplitError):
        victim.call(site.party, "forward", segment=pid, indices=idx, train=False)
    victim.close()


def test_a_halt_refuses_the_model_owners_op_in_progress(split_site: SplitSite) -> None:
    """The console's halt while the model owner's forward runs (made slow by a hook that waits
    for the test): the forward holds the endpoint's lock and the halt waits for it, but the
    model owner gets the halt error, no activation; the halt is then saved and audited."""
    import threading

    from syft_split.datasite_serve import _ENTRIES

    if split_site.kind != "inprocess-datasite":
        pytest.skip("the host runs in the HTTP datasite's process: no hook reaches it")
    site = split_site
    pid, _ = _approved(site)
    host = next(e.host for e in list(_ENTRIES.values()) if pid in e.host.proposals_by_id)
    entered, opened = threading.Event(), threading.Event()

    def hook(*_: object) -> None:
        entered.set()
        opened.wait(60)

    host.runtimes[pid].module.register_forward_hook(hook)
    got: list[object] = []

    def forward() -> None:
        try:
            got.append(site.transport.call(site.party, "forward", segment=pid,
                                           indices=torch.arange(4)))
        except SyftSplitError as exc:
            got.append(exc)

    mo = threading.Thread(target=forward, daemon=True)
    halt = threading.Thread(target=lambda: site.owner.halt(pid, "stop it now"), daemon=True)
    mo.start()
    try:
        assert entered.wait(60), "the forward never started"
        halt.start()
        pause = threading.Event()  # never set: a wait between looks
        for _ in range(1200):  # until the halt was asked (it then waits for the lock)
            if host.guard.stopped(pid) is not None or pause.wait(0.05):
                break
    finally:
        opened.set()
        mo.join(60)
    halt.join(60)
    assert len(got) == 1 and isinstance(got[0], ApprovalError), got
    assert "halted" in str(got[0]) and "stop it now" in str(got[0])
    assert [p.status for p in site.owner.proposals() if p.id == pid] == ["halted"]
    audit = [(e.op, e.outcome.split(":")[0]) for e in site.owner.audit()
             if e.segment == pid][-3:]
    assert audit == [("forward", "ApprovalError"), ("halt", "stop it now"),
                     ("owner.halt", "ok")], audit
