"""Who calls: the principal a host checks, the name it shows, and forgetting a user.

A host knows a caller by the ``caller`` string its transport hands
:meth:`~syft_split.host.DataOwnerHost.handle`: in process, the transport's user; on a
datasite, ``syft-user:<PySyft user id>`` (:mod:`syft_split.datasite_serve`). A user id never
changes and is never given to another account. An e-mail does both (a user may change its
own; a deleted account's is free again), so it is never checked: it is the caller's display
name (:attr:`DataOwnerHost.names`), shown in the audit log (with the principal beside it),
the review and the console's list of proposals. What the host records per user (a proposal's
driver, a channel's user, rate windows, alignment permissions) is the principal.

Data-owner ops: ``users`` (principal -> display name), ``forget_user`` (``user``: a principal,
or a display name only one principal had): halts every segment and pending proposal that user
drives, closes its direct channels and withdraws its alignment permissions. Deleting a PySyft
account revokes nothing here by itself (an open channel does not go through PySyft): forget
the user too.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .dispatch import OpFamily, owner_op, register_family

__all__ = ["UserOps"]


@register_family
class UserOps(OpFamily):
    """Display names and ``forget_user`` (see the module docstring)."""

    name = "users"

    def state(self) -> dict[str, Any]:
        return {"names": dict(self.host.names)}

    def restore(self, state: Any) -> None:
        names = state.get("names") if isinstance(state, dict) else None
        if isinstance(names, dict):
            self.host.names.update({str(k): str(v) for k, v in names.items()})

    @owner_op("users", mutates=False)
    def owner_users(self) -> dict[str, Any]:
        """Every caller with a display name: principal -> name."""
        return {"users": dict(self.host.names)}

    @owner_op("forget_user")
    def forget_user(self, user: str) -> dict[str, Any]:
        principal = self._principal(user)
        who = self.host.who(principal)
        halted = []
        for p in list(self.host.proposals_by_id.values()):
            if p.driver == principal and p.status in ("pending", "approved"):
                self.host.halt(p.id, f"the data owner forgot its user {who}")
                halted.append(p.id)
        closed = []
        channels: Any = self.host.families.get("channel")
        server = getattr(channels, "server", None)
        for c in [] if server is None else server.live():
            if c.user == principal:
                closed += channels.owner_close_channel(channel=c.id)["closed"]
        alignment: Any = self.host.families.get("alignment")  # no more PSI: a membership oracle
        revoked = [] if alignment is None else alignment.forget_user(principal)
        return {"user": principal, "halted": halted, "closed": closed, "alignment": revoked}

    def stops(self, op: str, fields: Any) -> list[tuple[str, str]]:
        """``forget_user`` closes the gate of every approved segment the user drives at once."""
        if op != "forget_user":
            return []
        try:
            principal = self._principal(fields.get("user"))
        except ConfigError:  # the op itself says why
            return []
        why = f"the data owner forgot its user {self.host.who(principal)}"
        return [(p.id, why) for p in list(self.host.proposals_by_id.values())
                if p.driver == principal and p.status == "approved"]

    def _principal(self, user: Any) -> str:
        """``user`` as a principal: one the host knows, or the one display name it had."""
        if not isinstance(user, str) or not user:
            raise ConfigError(f"user must be a principal or a display name, got {user!r}")
        names = dict(self.host.names)  # a copy: the endpoint adds names outside the lock
        known = set(names) | {p.driver for p in list(self.host.proposals_by_id.values())}
        if user in known:
            return user
        named = sorted(k for k, v in names.items() if v == user)
        if len(named) == 1:
            return named[0]
        if not named:
            raise ConfigError(f"no user {user!r} is known here; known: {sorted(known)}")
        raise ConfigError(f"{len(named)} users went by {user!r} here: name one of {named}")
