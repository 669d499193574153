"""Private record alignment over the wire (vertical split learning).

The model owner, who holds the labels, leads the k-party PSI of :mod:`syft_split.psi`; each
data owner's host answers three ops (the :class:`AlignmentOps` family), for datasets whose
alignment its owner allowed for that user (data-owner op ``allow_alignment``):

=================  ===================================================================
``psi_serve``      server role on the dataset's ids: ``request`` -> ``setup``, ``response``
``psi_request``    client role on all its ids: returns a ``request`` (state kept here)
``psi_finish``     ``setup``, ``response`` -> keeps the common rows, sorted by id, as a new
                   dataset ``as_name``; returns only the number of records
=================  ===================================================================

Each user keeps at most :data:`MAX_ALIGNED_PER_USER` aligned datasets here, and ``as_name``
never names a dataset the host already holds. After a restart an aligned dataset whose name
the data owner has since given to a dataset of its own is not restored (the data owner's
stays; audited), and a segment approved on the aligned rows is halted.

Afterwards row ``j`` of every party's ``as_name`` dataset and of the model owner's aligned
labels is the same record. Who learns what is documented in :mod:`syft_split.psi`: each data
owner learns which of its records are common to all, the model owner (leader) learns the
common ids and the prefix intersections.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .errors import AccessError, ConfigError, ProtocolError
from .host import AuditEntry, Call, Dataset, OpFamily, op, owner_op, register_family
from .host.dispatch import Host
from .host.guard import BYTES, SCALAR

if TYPE_CHECKING:
    from .transport.base import Transport

__all__ = ["AlignmentOps", "align_records", "MAX_ALIGNED_PER_USER"]

#: aligned datasets one user may keep on a host (each holds a copy of its rows in memory)
MAX_ALIGNED_PER_USER = 8

_log = logging.getLogger(__name__)


@register_family
class AlignmentOps(OpFamily):
    """The host side of alignment: ops ``psi_serve``, ``psi_request``, ``psi_finish``; data-owner
    op ``allow_alignment``."""

    name = "alignment"
    host_state = True  # aligned datasets (rows) and permissions persist with the host

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self._allowed: set[tuple[str, str]] = set()
        self._psi_clients: dict[tuple[str, str], Any] = {}
        #: aligned datasets made here: as_name -> (source dataset, its rows, the user who
        #: aligned it), kept on restart
        self._aligned: dict[str, tuple[str, torch.Tensor, str]] = {}

    @owner_op("allow_alignment")
    def allow_alignment(self, dataset: str, user: str) -> dict[str, Any]:
        """Owner: let ``user`` align ``dataset``'s records by PSI (ids never leave in clear)."""
        datasets: dict[str, Dataset] = self.host.datasets
        if dataset not in datasets or datasets[dataset].ids is None:
            raise ConfigError(f"dataset {dataset!r} does not exist here or has no record ids")
        from .psi import canonical_ids

        ids = datasets[dataset].ids
        assert ids is not None
        canonical_ids(ids, party=self.host.name)  # unique: said here
        self._allowed.add((dataset, user))
        return {"allowed": True}

    @owner_op("drop_aligned")
    def drop_aligned(self, dataset: str) -> dict[str, Any]:
        """Owner: delete the aligned dataset ``dataset`` (made by a user's PSI alignment);
        segments approved on it, and proposals pending on it, halt (they would read
        records that are gone). Its source dataset and the permission stay."""
        if dataset not in self._aligned:
            raise ConfigError(f"{dataset!r} is not an aligned dataset here; aligned: "
                              f"{sorted(self._aligned)}")
        stopped = []
        for p in list(self.host.proposals_by_id.values()):  # first: a halt that fails to
            if dataset not in p.datasets or p.status not in ("approved", "pending"):  # save
                continue  # leaves the dataset in place, and the call can be made again
            self.host.halt(p.id, f"the data owner deleted the aligned dataset {dataset!r} it "
                                 "reads")
            stopped.append(p.id)
        del self._aligned[dataset]
        self.host.datasets.pop(dataset, None)
        return {"dropped": dataset, "stopped": stopped}

    def _aligned_source(self, call: Call) -> Dataset:
        name = call.req.get("dataset")
        if (name, call.caller) not in self._allowed:
            raise AccessError(f"{call.caller} may not align dataset {name!r} here")
        ds: Dataset = self.host.datasets[str(name)]
        return ds

    @op("psi_serve", egress={"setup": BYTES, "response": BYTES})
    def psi_serve(self, call: Call) -> dict[str, Any]:
        from .psi import PsiServer

        ds = self._aligned_source(call)
        assert ds.ids is not None
        setup, response = PsiServer(ds.ids).handle(_bytes(call.req, "request"))
        return {"setup": setup, "response": response}

    @op("psi_request", egress={"request": BYTES})
    def psi_request(self, call: Call) -> dict[str, Any]:
        from .psi import PsiClient

        ds = self._aligned_source(call)
        assert ds.ids is not None
        client = PsiClient(ds.ids)
        self._psi_clients[(str(call.req["dataset"]), call.caller)] = client
        return {"request": client.request()}

    @op("psi_finish", mutates=True, egress={"records": SCALAR})
    def psi_finish(self, call: Call) -> dict[str, Any]:
        ds = self._aligned_source(call)
        key = (str(call.req["dataset"]), call.caller)
        client = self._psi_clients.get(key)
        if client is None:
            raise ProtocolError("psi_finish without psi_request")
        as_name = call.req.get("as_name")
        if not isinstance(as_name, str) or not as_name or as_name in self.host.datasets:
            raise ConfigError(f"as_name must be a new dataset name, got {as_name!r}")
        held = sum(1 for *_, user in self._aligned.values() if user == call.caller)
        if held >= MAX_ALIGNED_PER_USER:
            raise ConfigError(f"{call.caller} holds {held} aligned datasets here; this data "
                              f"owner keeps at most {MAX_ALIGNED_PER_USER} per user")
        rows = client.intersection(_bytes(call.req, "setup"), _bytes(call.req, "response"))
        del self._psi_clients[key]
        self.host.datasets[as_name] = ds.subset(rows, str(call.req["dataset"]))
        self._aligned[as_name] = (str(call.req["dataset"]), rows, call.caller)
        return {"records": int(rows.numel())}

    # --------------------------------------------------- persistence (host.store)
    def state(self) -> dict[str, Any]:
        """Alignment permissions and the rows of each aligned dataset (not its data: the
        source dataset is the data owner's and comes back with the datasite)."""
        return {"allowed": sorted([d, u] for d, u in self._allowed),
                "aligned": {k: {"source": src, "rows": rows, "user": user}
                            for k, (src, rows, user) in self._aligned.items()}}

    def restore(self, state: Any) -> None:
        """Permissions and aligned datasets; one whose name the data owner gave to a dataset
        of its own since is dropped, not put in its place (:meth:`_shadowed`)."""
        self._allowed = {(str(d), str(u)) for d, u in state.get("allowed", [])}
        for name, rec in (state.get("aligned") or {}).items():
            source = self.host.datasets.get(rec["source"])
            if source is None:
                continue  # the source dataset is gone: so is its alignment
            if name in self.host.datasets:
                self._shadowed(str(name))
                continue
            self._aligned[name] = (str(rec["source"]), rec["rows"], str(rec.get("user", "")))
            self.host.datasets[name] = source.subset(rec["rows"], str(rec["source"]))

    def _shadowed(self, name: str) -> None:
        """The data owner holds a dataset ``name`` of its own now: it stays; the aligned rows
        saved under that name are forgotten (audited), and segments approved on them halt
        (they would read other records than those they were approved on)."""
        why = (f"aligned dataset {name!r} was not restored: the data owner holds a dataset of "
               "that name now (kept)")
        _log.warning("%s: %s", self.host.name, why)
        self.host.record(AuditEntry(time.time(), "alignment", "restore", None, {}, 0, 0, 0.0,
                                    why))
        for p in list(self.host.proposals_by_id.values()):
            if p.status == "approved" and name in p.datasets:
                self.host.halt(p.id, f"the datasite restarted and {why}: this segment was "
                                     "approved on the aligned records; align again under "
                                     "another name and propose again")


def _bytes(req: dict[str, Any], name: str) -> bytes:
    value = req.get(name)
    if not isinstance(value, bytes):
        raise ConfigError(f"field {name!r} must be bytes")
    return value


def align_records(transport: Transport, parties: Sequence[str], dataset: str,
                  label_ids: Sequence[str | int], *, as_name: str | None = None) -> torch.Tensor:
    """Align ``parties``' ``dataset`` with the model owner's ``label_ids``.

    Each party ends with a dataset ``as_name`` (default ``f"{dataset}@aligned"``) holding the
    records common to everyone, sorted by id; the return value is the model owner's rows into
    ``label_ids`` for the same records in the same order (index your labels with it).
    """
    from .psi import PsiClient, PsiServer, canonical_ids, id_sort_key

    as_name = as_name or f"{dataset}@aligned"
    lead = canonical_ids(label_ids, party="model owner")
    cand = torch.arange(len(lead))
    for party in parties:  # narrowing: the model owner (client) against each party (server)
        client = PsiClient([lead[i] for i in cand.tolist()], pad_to=len(lead))
        r = transport.call(party, "psi_serve", dataset=dataset, request=client.request())
        cand = cand[client.intersection(r["setup"], r["response"])]
        if cand.numel() == 0:
            raise ConfigError("no record is common to all parties; nothing to align")
    cand = cand[sorted(range(len(cand)), key=lambda j: id_sort_key(lead[int(cand[j])]))]
    common = [lead[i] for i in cand.tolist()]
    for party in parties:  # distribution: each party (client) against the common ids
        request = transport.call(party, "psi_request", dataset=dataset)["request"]
        setup, response = PsiServer(common).handle(request)
        n = transport.call(party, "psi_finish", dataset=dataset, setup=setup,
                           response=response, as_name=as_name)["records"]
        if n != len(common):
            raise ProtocolError(f"{party} aligned {n} records, expected {len(common)} "
                                "(a PSI false positive); rerun")
    return cand
