"""Who drives a segment is the principal the transport names (on a datasite: the PySyft user
id), never a display name; the data owner can forget a user; state an older version recorded
for e-mails is halted, not handed to whoever has that e-mail now."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from syft_split import ConfigError, DataOwnerHost, wire
from syft_split.channel import ChannelClient, ChannelTicket
from syft_split.datasite_serve import _halt_by_email, _withdraw_email_permissions
from syft_split.errors import AuthorizationError, SyftSplitError
from syft_split.host import users
from syft_split.host.channel import close_channels
from syft_split.spec import module_to_spec, spec_state

MO, EVE = "syft-user:" + "a" * 32, "syft-user:" + "b" * 32
MAIL = "mo@example.org"


def _host(state_dir: Path | None = None) -> DataOwnerHost:
    host = DataOwnerHost("a", state_dir=state_dir)
    host.add_dataset("train", torch.randn(8, 4), torch.randint(0, 2, (8,)))
    host.restore_state()
    return host


def _call(host: DataOwnerHost, caller: str, op: str, **fields: object) -> dict[str, object]:
    answer = dict(wire.decode(host.handle(caller, wire.encode({"op": op, **fields}))))
    if "error" in answer:
        raise AuthorizationError(str(answer["message"])) if answer["error"] == (
            "AuthorizationError") else SyftSplitError(str(answer["message"]))
    return answer


def _propose(host: DataOwnerHost, caller: str) -> str:
    m = nn.Sequential(nn.Linear(4, 3))
    return str(_call(host, caller, "propose", role="input", datasets=["train"],
                     spec=module_to_spec(m), optimizer={"name": "sgd", "lr": 0.1},
                     **{f"state/{k}": v for k, v in spec_state(m).items()})["segment"])


def test_public_surface_is_pinned() -> None:
    assert users.__all__ == ["UserOps"]


def test_a_display_name_is_shown_never_checked() -> None:
    """Two principals that go by one e-mail: only the approved one drives; the audit shows
    the e-mail and, beside it, which principal called."""
    host = _host()
    host.names.update({MO: MAIL, EVE: MAIL})  # EVE renamed itself to MO's e-mail
    pid = _propose(host, MO)
    host.approve(pid)
    with pytest.raises(AuthorizationError, match="may not drive"):
        _call(host, EVE, "forward", segment=pid, indices=torch.arange(2))
    assert _call(host, MO, "forward", segment=pid, indices=torch.arange(2), train=False)
    assert MAIL in host.review(pid) and MO in host.review(pid)
    calls = [(e.caller, e.user, e.outcome.split(":")[0]) for e in host.audit
             if e.op == "forward"]
    assert calls == [(MAIL, EVE, "AuthorizationError"), (MAIL, MO, "ok")]
    assert host.owner("users")["users"] == {MO: MAIL, EVE: MAIL}


def test_forget_user_halts_its_segments_and_closes_its_channels() -> None:
    host = _host()
    host.names.update({MO: MAIL, EVE: "eve@example.org"})
    mine, pending, eves = _propose(host, MO), _propose(host, MO), _propose(host, EVE)
    host.approve(mine, channel=True)
    host.approve(eves)
    ticket = ChannelTicket.from_response(_call(host, MO, "open_channel", segments=[mine]))
    client = ChannelClient(ticket, MO)
    client.connect()
    try:
        frame = wire.encode({"op": "forward", "segment": mine, "indices": torch.arange(2),
                             "train": False})
        assert "activation" in wire.decode(client.request(frame))
        before = [(p.id, p.status) for p in host.proposals()]
        for bad in ("nobody@example.org", "", None):  # refused, nothing changed
            with pytest.raises(ConfigError, match="user"):
                host.owner("forget_user", user=bad)
        assert [(p.id, p.status) for p in host.proposals()] == before
        out = host.owner("forget_user", user=MAIL)  # the one principal that went by it
        assert out == {"user": MO, "halted": [mine, pending], "closed": [ticket.channel],
                       "alignment": []}
        assert {p.id: p.status for p in host.proposals()} == {
            mine: "halted", pending: "halted", eves: "approved"}
        assert "forgot its user" in host.proposal(mine).reason
        with pytest.raises(SyftSplitError):
            client.request(wire.encode({"op": "forward", "segment": mine,
                                        "indices": torch.arange(2), "train": False}))
        assert _call(host, EVE, "forward", segment=eves, indices=torch.arange(2), train=False)
        host.names[EVE] = MAIL
        with pytest.raises(ConfigError, match="2 users went by"):
            host.owner("forget_user", user=MAIL)
    finally:
        client.close()
        close_channels(host)


def test_names_persist_and_e_mail_drivers_of_an_older_version_are_halted(
        tmp_path: Path) -> None:
    """A state directory from before principals: its proposals name e-mails. Restored on a
    datasite they are halted (whoever has that e-mail now is not bound to them); the data
    owner keeps their weights; proposals of principals are untouched."""
    host = _host(tmp_path)
    host.names[MO] = MAIL
    old, pending, new = _propose(host, MAIL), _propose(host, MAIL), _propose(host, MO)
    host.approve(old)
    host.approve(new)
    host.close()
    again = _host(tmp_path)
    assert again.names == {MO: MAIL}
    assert _halt_by_email(again) == [old, pending]
    assert {p.id: p.status for p in again.proposals()} == {
        old: "halted", pending: "halted", new: "approved"}
    assert "named by its e-mail" in again.proposal(old).reason
    assert again.export_weights(old)
    with pytest.raises(SyftSplitError, match="halted"):
        _call(again, MAIL, "forward", segment=old, indices=torch.arange(2))
    again.close()
    assert _host(tmp_path).proposal(old).status == "halted"  # saved


def test_forget_user_withdraws_its_alignment_permissions() -> None:
    """A forgotten user whose account still exists could go on using psi_serve as a
    membership oracle for the ids it guesses: its permissions go with it (others' stay)."""
    host = DataOwnerHost("a")
    host.add_dataset("people", torch.randn(6, 2), ids=[f"id{i}" for i in range(6)])
    host.names.update({MO: MAIL, EVE: "eve@example.org"})
    host.allow_alignment("people", MO)
    host.allow_alignment("people", EVE)
    serve = {"op": "psi_serve", "dataset": "people", "request": b"x"}
    out = host.owner("forget_user", user=MO)
    assert out["alignment"] == ["people"]
    answer = dict(wire.decode(host.handle(MO, wire.encode(serve))))
    assert answer["error"] == "AccessError", answer
    answer = dict(wire.decode(host.handle(EVE, wire.encode(serve))))
    assert answer.get("error") != "AccessError", answer  # allowed (its request is garbage)


def test_alignment_permissions_saved_for_e_mails_are_withdrawn_and_audited(
        tmp_path: Path) -> None:
    """A state directory from before principals allowed alignment for an e-mail. Restored on
    a datasite that permission is withdrawn, never moved to the account that has the e-mail
    now (EVE took it); the audit tells the data owner to grant it again. A principal's
    permission stays; the withdrawal is saved."""
    def restored() -> DataOwnerHost:
        host = DataOwnerHost("a", state_dir=tmp_path)
        host.add_dataset("people", torch.randn(6, 2), ids=[f"id{i}" for i in range(6)])
        host.restore_state()
        return host

    host = restored()
    host.allow_alignment("people", MAIL)  # as an older version saved it
    host.allow_alignment("people", MO)
    host.close()
    again = restored()
    again.names.update({EVE: MAIL, MO: "mo-now@example.org"})
    assert _withdraw_email_permissions(again) == [("people", MAIL)]
    third = restored()  # a crash: the withdrawal was saved
    assert third.families["alignment"]._allowed == {("people", MO)}  # type: ignore[attr-defined]
    assert _withdraw_email_permissions(third) == []
    why = [e.outcome for e in again.audit if e.op == "restore"]
    assert len(why) == 1 and f"grant again for {MAIL} with allow_alignment" in why[0]
    request = {"op": "psi_request", "dataset": "people"}
    for caller in (EVE, MAIL):
        with pytest.raises(SyftSplitError, match="may not align"):
            _call(again, caller, **request)
    assert "request" in _call(again, MO, **request)
