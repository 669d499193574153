"""What a deployment is: the model owner's transport and one console per data owner.

A data owner's *console* is what it uses to review, approve and audit; a model owner never
gets one. :mod:`syft_split.deploy` builds deployments (in process, or on PySyft datasites).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .transport.base import Transport

__all__ = ["OwnerConsole", "Deployment"]


class OwnerConsole(Protocol):
    """What a data owner can do with the segments proposed to it."""

    def review(self, proposal_id: str) -> str: ...
    def approve(self, proposal_id: str, **options: Any) -> None: ...
    def reject(self, proposal_id: str) -> None: ...
    def halt(self, proposal_id: str, reason: str = ...) -> None: ...
    def release_weights(self, proposal_id: str) -> None: ...
    def export_weights(self, proposal_id: str) -> dict[str, torch.Tensor]: ...
    def audit_log(self) -> list[dict[str, Any]]: ...
    def public_key(self) -> bytes: ...
    def trust_peer(self, name: str, public_key: bytes) -> None: ...
    def allow_alignment(self, dataset: str, user: str) -> None: ...
    def revoke_alignment(self, dataset: str, user: str) -> dict[str, Any]: ...


@dataclass
class Deployment:
    """The model owner's transport plus one console per data owner."""

    transport: Transport
    owners: dict[str, OwnerConsole]
    closers: list[Any] = field(default_factory=list)

    def approve_all(self, proposals: dict[str, list[str]], *, show: bool = False,
                    **options: Any) -> None:
        """Each data owner reads its reviews (printed if ``show``) and approves once, with the
        approval ``options`` its review mentions (e.g. ``channel=True``)."""
        for party, ids in proposals.items():
            for pid in ids:
                if show:
                    print(self.owners[party].review(pid))
                self.owners[party].approve(pid, **options)

    def trust_each_other(self, parties: list[str] | None = None) -> None:
        """Every data owner pins every other's public key (out of band, in real life)."""
        names = parties or list(self.owners)
        for a in names:
            for b in names:
                if a != b:
                    self.owners[a].trust_peer(b, self.owners[b].public_key())

    def close(self) -> None:
        self.transport.close()
        for close in reversed(self.closers):
            close()
        self.closers.clear()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
