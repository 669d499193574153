"""In-process transport: hosts live in this process, but every message is still serialised."""

from __future__ import annotations

import threading

from ..errors import TransportError
from ..host import DataOwnerHost
from .base import CallPolicy, Transport

__all__ = ["InProcessTransport"]


class InProcessTransport(Transport):
    """Reach :class:`~syft_split.host.DataOwnerHost` objects in this process, as ``user``.

    Requests and responses cross as bytes (:mod:`syft_split.wire`): nothing is shared by
    reference between the parties, exactly as on a real network. Each host answers one call
    at a time (as a datasite does); calls are bounded by the transport's
    :class:`~syft_split.transport.base.CallPolicy` like any other.
    """

    def __init__(self, hosts: list[DataOwnerHost] | None = None, *,
                 user: str = "model-owner@example.org", policy: CallPolicy | None = None) -> None:
        super().__init__(policy=policy)
        self._user = user
        self._hosts: dict[str, DataOwnerHost] = {}
        self._locks: dict[str, threading.Lock] = {}
        for host in hosts or []:
            self.add_host(host)

    @property
    def user(self) -> str:
        return self._user

    def add_host(self, host: DataOwnerHost, *, replace: bool = False) -> None:
        """Make ``host`` reachable under its name (``replace``: instead of the host connected
        under that name, e.g. the same data owner restarted from its state directory)."""
        if host.name in self._hosts and not replace:
            raise TransportError(f"a host named {host.name!r} is already connected")
        self._hosts[host.name] = host
        self._locks.setdefault(host.name, threading.Lock())

    def parties(self) -> list[str]:
        return list(self._hosts)

    def request(self, party: str, data: bytes) -> bytes:
        host = self._hosts.get(party)
        if host is None:
            raise TransportError(f"unknown party {party!r}; connected: {sorted(self._hosts)}")
        with self._locks[party]:
            return host.handle(self._user, bytes(data))
