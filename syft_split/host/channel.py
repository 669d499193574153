"""Direct channels: the data plane a data owner may allow per proposal, governed from here.

PySyft stays the control plane (proposal, review, approval, audit, console). A data owner who
approves a segment with ``channel=True`` lets its driver ask for a direct channel: model-owner
op ``open_channel`` (through PySyft, so the caller is PySyft's authenticated user) answers with
an address, a fresh certificate (and its fingerprint) and a fresh key, bound to that user and
those segments. Steps then travel over TLS 1.3 (:mod:`syft_split.channel`) and are answered by
the same :meth:`~syft_split.host.DataOwnerHost.handle` -- same checks, same guard, one audit
entry per call -- under the same lock as the PySyft endpoint (:func:`serving_lock`).

Model-owner ops: ``open_channel`` (``segments``: ids the caller drives, each approved with a
channel), ``close_channel`` (one of the caller's channels). Data-owner ops: ``channels`` (list),
``close_channel`` (by ``channel`` or every channel of a ``segment``; it also withdraws the
permission unless ``revoke=False``), ``allow_channel`` (grant or withdraw it after approval),
``channel_settings`` (``bind``, ``port``, ``advertise``, ``idle_timeout``, ``max_channels``,
``max_per_user``, ``max_handshakes_per_minute``: new connections one peer address may start a
minute, more are closed before any TLS handshake; ``max_kept_bytes``: the answers all channels
keep for reconnects, the oldest dropped first; saved with the host's state and restored on
restart, like the permissions).
A channel also closes when a segment it serves is halted or rejected, and after
``idle_timeout`` seconds without a frame.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from ..errors import AccessError, AuthorizationError, ConfigError, ValidationError
from .dispatch import OpFamily, op, owner_op, register_family
from .guard import JSON, SCALAR, TEXT, Call, Guard, _refuse
from .records import ROLES, AuditEntry, Proposal, Runtime

if TYPE_CHECKING:
    from ..channel.server import Channel, ChannelServer
    from .core import DataOwnerHost

__all__ = ["ChannelOps", "ChannelConsole", "serving_lock", "close_channels", "CHANNEL_MATERIAL"]

_DEFAULTS: dict[str, Any] = {"bind": "127.0.0.1", "port": 0, "advertise": None,
                             "idle_timeout": 300.0, "max_channels": 32, "max_per_user": 8,
                             "max_handshakes_per_minute": 120,
                             "max_kept_bytes": 64 * 1024 * 1024}
#: settings that may be 0 (the others are at least 1)
_ZERO_OK = ("port", "max_kept_bytes")


def CHANNEL_MATERIAL(name: str, value: Any, call: Call, guard: Guard) -> None:
    """A channel's certificate (public) or fingerprint/key (32 bytes): only ``open_channel``
    releases them, to the user the segments were approved for."""
    if call.op != "open_channel":
        raise _refuse(call, name, "channel material leaves only from open_channel")
    limit = 4096 if name == "certificate" else 32
    if not isinstance(value, bytes) or not 0 < len(value) <= limit or (
            name != "certificate" and len(value) != 32):
        raise _refuse(call, name, f"expected {limit} bytes at most (32 for keys)")


def _checked(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (every key of ``_DEFAULTS``) if each value is valid; else ConfigError."""
    unknown = set(settings) - set(_DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown channel settings {sorted(unknown)}; known: "
                          f"{sorted(_DEFAULTS)}")
    new = {**_DEFAULTS, **settings}
    for k in ("port", "max_channels", "max_per_user", "max_handshakes_per_minute",
              "max_kept_bytes"):
        v, least = new[k], 0 if k in _ZERO_OK else 1
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise ConfigError(f"{k} must be an int >= {least}, got {v!r}")
    t = new["idle_timeout"]
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 < t <= 86_400:
        raise ConfigError(f"idle_timeout must be in (0, 86400] seconds, got {t!r}")
    for k in ("bind", "advertise"):
        if new[k] is not None and not isinstance(new[k], str):
            raise ConfigError(f"{k} must be a host name or address, got {new[k]!r}")
    return new


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")
    return value


@register_family
class ChannelOps(OpFamily):
    """Direct channels of one host (see the module docstring)."""

    name = "channel"
    host_state = True  # the data owner's settings persist with the host

    def __init__(self, host: DataOwnerHost) -> None:
        super().__init__(host)
        #: serialises host.handle between the PySyft endpoint and the channel threads
        self.lock = threading.RLock()
        self.settings = dict(_DEFAULTS)
        self.server: ChannelServer | None = None
        self._server_lock = threading.Lock()

    # --------------------------------------------------------------------- hooks
    def review_lines(self, proposal: Proposal) -> list[str]:
        idle = self.settings["idle_timeout"]
        rt = self.host.runtimes.get(proposal.id)
        if rt is not None and proposal.status == "approved":
            if self._allowed(rt):
                return [f"  direct channel: ALLOWED for {proposal.driver} (TLS 1.3 to this "
                        f"datasite; same checks and audit per step; idle channels close after "
                        f"{idle:g} s; close_channel closes it)"]
            return ["  direct channel: not allowed (steps go through PySyft only)"]
        return [f"  direct channel: off unless you approve with channel=True; then "
                f"{proposal.driver} may open a TLS 1.3 channel straight to this datasite for "
                f"this segment (address and keys go to that user only, through PySyft; every "
                f"step is checked and audited exactly as through PySyft; you can close it any "
                f"time; it closes after {idle:g} s idle and when the segment is halted)"]

    def on_approve(self, rt: Runtime, options: dict[str, Any]) -> None:
        rt.extra[self.name] = _flag(options.pop("channel", False), "approval option channel")

    def _allowed(self, rt: Runtime) -> bool:
        return bool(rt.extra.get(self.name, False))

    def state(self) -> dict[str, Any]:
        """The data owner's settings (the permissions live with each segment, ``rt.extra``)."""
        return {"settings": dict(self.settings)}

    def restore(self, state: Any) -> None:
        saved = state.get("settings")
        if saved is None:  # saved before settings were kept: the defaults
            return
        try:
            self.settings = _checked(dict(saved))
        except ConfigError as exc:  # never serve looser limits than the data owner set
            raise ConfigError(f"saved channel settings are invalid ({exc}); fix or remove "
                              "them in the state directory") from exc

    # ------------------------------------------------------------------ the server
    def _server(self) -> ChannelServer:
        with self._server_lock:
            if self.server is None:
                from ..channel.server import ChannelServer

                s = self.settings
                self.server = ChannelServer(
                    self.host.handle, self.lock, check=self._check, audit=self._audit,
                    bind=s["bind"], port=s["port"], advertise=s["advertise"],
                    max_frame_bytes=self.host.limits.max_request_bytes,
                    data_ops=self.data_ops(),
                    max_handshakes_per_minute=s["max_handshakes_per_minute"],
                    max_kept_bytes=s["max_kept_bytes"])
            return self.server

    def data_ops(self) -> frozenset[str]:
        """The ops answered over a channel: this host's model-owner ops that run on a segment
        (declared with ``roles``); everything else goes through PySyft."""
        return frozenset(spec.name for family in self.host.families.values()
                         for spec, _ in family.ops() if spec.roles is not None and not spec.owner)

    def _check(self, channel: Channel) -> tuple[str, str] | None:
        """Why ``channel`` must close now (its segments' state), or None."""
        for sid in channel.segments:
            p = self.host.proposals_by_id.get(sid)
            asked = self.host.guard.stopped(sid)  # a halt asked closes it before it completes
            if p is None or p.status != "approved" or asked is not None:
                state = "gone" if p is None else p.status if p.status != "approved" else "halted"
                why = f": {p.reason or asked}" if p is not None and (p.reason or asked) else ""
                return "halted", f"segment {sid} is {state}{why}"
            rt = self.host.runtimes.get(sid)
            if rt is None or not self._allowed(rt):
                return "owner", f"the data owner withdrew the channel permission of {sid}"
        return None

    def _audit(self, caller: str, op_name: str, segment: str | None, nbytes: int,
               outcome: str) -> None:
        with self.lock:  # to audit.jsonl too: refusals survive a restart
            self.host.record(AuditEntry(time.time(), caller, op_name, segment, {}, nbytes,
                                        0, 0.0, outcome))

    def close_all(self, reason: str = "the data owner's host shut down") -> None:
        """Close every channel and stop the listener (the host is going away)."""
        with self._server_lock:
            server, self.server = self.server, None
        if server is not None:
            server.shutdown(reason)

    # --------------------------------------------------------------- model-owner ops
    @op("open_channel", egress={"channel": TEXT, "host": TEXT, "port": SCALAR,
                                "certificate": CHANNEL_MATERIAL, "fingerprint": CHANNEL_MATERIAL,
                                "key": CHANNEL_MATERIAL, "idle_timeout": SCALAR,
                                "segments": JSON})
    def open_channel(self, call: Call) -> dict[str, Any]:
        segments = call.req.get("segments")
        if not isinstance(segments, list) or not 1 <= len(segments) <= 16 or not all(
                isinstance(s, str) for s in segments) or len(set(segments)) != len(segments):
            raise ValidationError(f"segments must be 1..16 distinct segment ids, got "
                                  f"{segments!r:.120}")
        for sid in segments:
            rt = self.host.runtime(call.caller, {"segment": sid}, ROLES)
            if not self._allowed(rt):
                raise AccessError(f"the data owner did not allow a direct channel for {sid} "
                                  "(approval option channel=True); use PySyft")
        server = self._server()
        mine = [c for c in server.live() if c.user == call.caller
                and set(c.segments) != set(segments)]
        if len(mine) >= self.settings["max_per_user"] or (
                len(server.live()) >= self.settings["max_channels"]):
            raise ValidationError(f"{call.caller} has {len(mine)} open channels here; this data "
                                  f"owner allows {self.settings['max_per_user']} per user and "
                                  f"{self.settings['max_channels']} in all: close one first")
        channel, key = server.open(call.caller, tuple(segments),
                                   float(self.settings["idle_timeout"]))
        host, port = server.address
        return {"channel": channel.id, "host": host, "port": port,
                "certificate": channel.certificate, "fingerprint": channel.fingerprint,
                "key": key, "idle_timeout": channel.idle_timeout, "segments": list(segments)}

    @op("close_channel", egress={"closed": SCALAR})
    def close_channel(self, call: Call) -> dict[str, Any]:
        cid = call.req.get("channel")
        channel = None if self.server is None else self.server.channels.get(str(cid))
        if channel is None or channel.user != call.caller:
            raise AuthorizationError(f"{call.caller} has no channel {cid!r} here")
        assert self.server is not None
        return {"closed": self.server.close(channel.id, "client", "closed by its user")}

    # ----------------------------------------------------------------- data-owner ops
    @owner_op("channels")
    def owner_channels(self, state: str | None = None) -> dict[str, Any]:
        server = self.server
        chans = [] if server is None else list(server.channels.values())
        return {"channels": [c.info() for c in chans if state is None or c.state == state],
                "address": None if server is None else list(server.address),
                "settings": dict(self.settings)}

    @owner_op("close_channel")
    def owner_close_channel(self, channel: str | None = None, segment: str | None = None,
                            revoke: bool = True) -> dict[str, Any]:
        if (channel is None) == (segment is None):
            raise ConfigError("close_channel takes channel=<id> or segment=<id>")
        _flag(revoke, "revoke")
        server = self.server
        live = [] if server is None else server.live()
        if channel is not None:
            targets = [c for c in live if c.id == channel]
            known = server is not None and channel in server.channels
            if not targets and not known:
                raise ConfigError(f"no channel {channel!r}; open: {[c.id for c in live]}")
        else:
            self.host.proposal(str(segment))
            targets = [c for c in live if segment in c.segments]
        closed = []
        for c in targets:
            if revoke:
                for sid in c.segments:
                    rt = self.host.runtimes.get(sid)
                    if rt is not None:
                        rt.extra[self.name] = False
            assert server is not None
            if server.close(c.id, "owner", "closed by the data owner"):
                closed.append(c.id)
        if segment is not None and revoke:
            rt = self.host.runtimes.get(segment)
            if rt is not None:
                rt.extra[self.name] = False
        return {"closed": closed, "revoked": revoke}

    @owner_op("allow_channel")
    def owner_allow_channel(self, segment: str, allow: bool = True) -> dict[str, Any]:
        rt = self.host.owned_runtime(segment)
        rt.extra[self.name] = _flag(allow, "allow")
        if not allow and self.server is not None:
            for c in self.server.live():
                if segment in c.segments:
                    self.server.close(c.id, "owner", "the data owner withdrew the permission")
        return {"segment": segment, "channel": allow}

    @owner_op("channel_settings")
    def owner_channel_settings(self, **settings: Any) -> dict[str, Any]:
        new = _checked({**self.settings, **settings})
        moved = any(new[k] != self.settings[k] for k in ("bind", "port", "advertise"))
        self.settings = new
        if moved:  # the listener moves: every channel closes (their tickets name the old one)
            self.close_all("the data owner moved the channel listener")
        elif self.server is not None:  # the listener's own limits apply at once
            self.server.arrivals.per_minute = new["max_handshakes_per_minute"]
            self.server.max_kept_bytes = new["max_kept_bytes"]
        return {"settings": dict(self.settings)}


def _family(host: Any) -> ChannelOps | None:
    fam = getattr(host, "families", {}).get(ChannelOps.name)
    return fam if isinstance(fam, ChannelOps) else None


def serving_lock(host: Any) -> Any:
    """The lock every caller of ``host.handle`` must hold when channels may be open (the PySyft
    endpoint holds it around each call; channel threads too)."""
    fam = _family(host)
    return fam.lock if fam is not None else threading.RLock()


def close_channels(host: Any) -> None:
    """Close ``host``'s channels and stop its listener (the host is being forgotten)."""
    fam = _family(host)
    if fam is not None:
        fam.close_all()


class ChannelConsole:
    """The data owner's channel methods, for a console that reaches its host's data-owner ops
    through ``_call(op, **fields)`` (:class:`syft_split.datasite.DatasiteConsole`)."""

    def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        raise NotImplementedError

    def channels(self, state: str | None = None) -> list[dict[str, Any]]:
        """Direct channels on this datasite (``state="open"``: only the open ones)."""
        return list(self._call("channels", **({"state": state} if state else {}))["channels"])

    def close_channel(self, channel: str | None = None, *, segment: str | None = None,
                      revoke: bool = True) -> list[str]:
        """Close a direct channel (or every channel of ``segment``) now; with ``revoke`` no new
        one opens for its segments (their steps go through PySyft). Returns the closed ids."""
        ids = {"channel": channel, "segment": segment}
        fields = {k: v for k, v in ids.items() if v is not None}
        return list(self._call("close_channel", revoke=revoke, **fields)["closed"])

    def allow_channel(self, segment: str, allow: bool = True) -> None:
        """Grant (or withdraw) the direct-channel permission of an approved segment."""
        self._call("allow_channel", segment=segment, allow=allow)
