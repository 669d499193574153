"""Deployments: the data owners of a run (their consoles) and the model owner's transport.

A data owner's *console* is what it uses to review, approve and audit; a model owner never
gets one. :func:`inprocess` builds hosts in this process; :func:`datasites` (PySyft, lazy)
puts each data owner on its own PySyft datasite.
"""

from __future__ import annotations

from typing import Any

from .deployment import Deployment, OwnerConsole
from .host import DataOwnerHost, Dataset
from .transport.inprocess import InProcessTransport

__all__ = ["OwnerConsole", "Deployment", "inprocess", "datasites", "PartyDatasets"]

#: party -> dataset name -> (features, labels or None[, ids[, mock]]), a host Dataset, or a
#: map-style ``torch.utils.data.Dataset`` of (features, label) items
PartyDatasets = dict[str, dict[str, Any]]


def _tensors(parties: PartyDatasets) -> PartyDatasets:
    """``parties`` with every torch ``Dataset`` read into (features, labels) tensors."""
    from .data import is_torch_dataset, materialize

    return {party: {name: materialize(ds, name=f"{party}/{name}") if is_torch_dataset(ds) else ds
                    for name, ds in datasets.items()}
            for party, datasets in parties.items()}


def inprocess(parties: PartyDatasets, *, user: str = "model-owner@example.org",
              **host_kwargs: Any) -> Deployment:
    """Hosts in this process, reached through :class:`InProcessTransport` (still serialised)."""
    hosts = []
    for name, datasets in _tensors(parties).items():
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

    return deployment(_tensors(parties), http=http, **kwargs)  # type: ignore[no-any-return]
