"""In-process transport: hosts live in this process, but every message is still serialised."""

from __future__ import annotations

from ..errors import TransportError
from ..host import DataOwnerHost
from .base import Transport

__all__ = ["InProcessTransport"]


class InProcessTransport(Transport):
    """Reach :class:`~syft_split.host.DataOwnerHost` objects in this process, as ``user``.

    Requests and responses cross as bytes (:mod:`syft_split.wire`): nothing is shared by
    reference between the parties, exactly as on a real network.
    """

    def __init__(self, hosts: list[DataOwnerHost] | None = None, *,
                 user: str = "model-owner@example.org") -> None:
        super().__init__()
        self._user = user
        self._hosts: dict[str, DataOwnerHost] = {}
        for host in hosts or []:
            self.add_host(host)

    @property
    def user(self) -> str:
        return self._user

    def add_host(self, host: DataOwnerHost) -> None:
        """Make ``host`` reachable under its name."""
        if host.name in self._hosts:
            raise TransportError(f"a host named {host.name!r} is already connected")
        self._hosts[host.name] = host

    def parties(self) -> list[str]:
        return list(self._hosts)

    def request(self, party: str, data: bytes) -> bytes:
        host = self._hosts.get(party)
        if host is None:
            raise TransportError(f"unknown party {party!r}; connected: {sorted(self._hosts)}")
        return host.handle(self._user, bytes(data))
