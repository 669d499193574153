"""Deployments: the data owners of a run (their consoles) and the model owner's transport.

A data owner's *console* is what it uses to review, approve and audit; a model owner never
gets one. :func:`inprocess` builds hosts in this process; :func:`datasites` (PySyft, lazy)
puts each data owner on its own PySyft datasite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .host import DataOwnerHost, Dataset
from .transport.base import Transport
from .transport.inprocess import InProcessTransport

__all__ = ["OwnerConsole", "Deployment", "inprocess", "datasites", "PartyDatasets"]

#: party -> dataset name -> (features, labels or None[, ids[, mock]]) or a Dataset
PartyDatasets = dict[str, dict[str, Any]]


class OwnerConsole(Protocol):
    """What a data owner can do with the segments proposed to it."""

    def review(self, proposal_id: str) -> str: ...
    def approve(self, proposal_id: str, **options: Any) -> None: ...
    def reject(self, proposal_id: str) -> None: ...
    def release_weights(self, proposal_id: str) -> None: ...
    def export_weights(self, proposal_id: str) -> dict[str, torch.Tensor]: ...
    def audit_log(self) -> list[dict[str, Any]]: ...
    def public_key(self) -> bytes: ...
    def trust_peer(self, name: str, public_key: bytes) -> None: ...
    def allow_alignment(self, dataset: str, user: str) -> None: ...


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


def inprocess(parties: PartyDatasets, *, user: str = "model-owner@example.org",
              **host_kwargs: Any) -> Deployment:
    """Hosts in this process, reached through :class:`InProcessTransport` (still serialised)."""
    hosts = []
    for name, datasets in parties.items():
        host = DataOwnerHost(name, **host_kwargs)
        for ds_name, ds in datasets.items():
            host.datasets[ds_name] = ds if isinstance(ds, Dataset) else Dataset(*ds)
        hosts.append(host)
    return Deployment(InProcessTransport(hosts, user=user), {h.name: h for h in hosts})


def datasites(parties: PartyDatasets, *, http: bool = False, **kwargs: Any) -> Deployment:
    """One fresh PySyft datasite per party (embedded, or uvicorn HTTP servers on loopback with
    ``http=True``), its data uploaded as PySyft datasets and the syft-split endpoint installed;
    ``close()`` lands them and removes their data folders. Imports syft."""
    from .transport.pysyft import deployment

    return deployment(parties, http=http, **kwargs)  # type: ignore[no-any-return]
