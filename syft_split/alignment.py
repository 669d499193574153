"""Private record alignment over the wire (vertical split learning).

The model owner, who holds the labels, leads the k-party PSI of :mod:`syft_split.psi`; each
data owner's host answers three ops (the :class:`AlignmentOps` family), for datasets whose
alignment its owner allowed for that user (data-owner op ``allow_alignment``; withdrawn by
``revoke_alignment``, or for every dataset by the host's ``forget_user``; one an older version
saved for an e-mail is withdrawn, audited, when a datasite restores it: :meth:`AlignmentOps.withdraw_legacy`):

=================  ===================================================================
``psi_serve``      server role on the dataset's ids: ``request`` -> ``setup``, ``response``
``psi_request``    client role on all its ids: returns a ``request`` (state kept here)
``psi_finish``     ``setup``, ``response`` -> keeps the common rows, sorted by id, as a new
                   dataset ``as_name``; returns only the number of records
=================  ===================================================================

Each user keeps at most :data:`MAX_ALIGNED_PER_USER` aligned datasets here; ``as_name`` is a
new dataset name of at most :data:`MAX_NAME_CHARS` printable characters. A ``psi_serve``
request holds at most ``HostLimits.max_psi_elements`` distinct elements, and the PSI work of
each user is capped per minute (``HostLimits.max_psi_elements_per_minute``; its window is
saved with each call, so it holds across a crash of the host). The data
owner's request lists its ids in a secret random order and a response with a repeated
element is refused: a model owner that answers out of order cannot pick which rows match
(see SECURITY.md for what it can still do). Each ``psi_request`` serves one ``psi_finish``;
one with no common record creates nothing. The setup is checked before openmined-psi sees
it: only the ``"gcs"`` setup :func:`align_records` sends (see :meth:`PsiClient.intersection`).

An aligned dataset is saved as its rows and a digest of their ids. After a restart it is not
restored (audited) and a segment approved on it halts when the data owner has since given its
name to a dataset of its own (which stays), or when its source no longer holds the same ids at
those rows (re-ordered, shortened or changed).

Afterwards, with an honest model owner, row ``j`` of every party's ``as_name`` dataset and of
the model owner's aligned labels is the same record (a malicious one can swap records for
random others of the source: SECURITY.md). Who learns what is documented in
:mod:`syft_split.psi`: each data owner learns which of its records are common to all, the
model owner (leader) learns the common ids and the prefix intersections.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .errors import (
    AccessError,
    ConfigError,
    ProtocolError,
    StateSaveError,
    ValidationError,
    WireError,
)
from .host import AuditEntry, Call, Dataset, OpFamily, op, owner_op, register_family
from .host.dispatch import Host
from .host.guard import BYTES, SCALAR, WINDOW_SAVE_S, in_window, last_minute, window_save_due
from .host.records import HostLimits, clip

if TYPE_CHECKING:
    from .transport.base import Transport

__all__ = ["AlignmentOps", "align_records", "MAX_ALIGNED_PER_USER", "MAX_NAME_CHARS"]

#: aligned datasets one user may keep on a host (each holds a copy of its rows in memory)
MAX_ALIGNED_PER_USER = 8
#: longest ``as_name`` (it is kept in the host's saved state)
MAX_NAME_CHARS = 128

_log = logging.getLogger(__name__)


@register_family
class AlignmentOps(OpFamily):
    """The host side of alignment: ops ``psi_serve``, ``psi_request``, ``psi_finish``; data-owner
    ops ``allow_alignment``, ``revoke_alignment``, ``drop_aligned``."""

    name = "alignment"
    host_state = True  # aligned datasets (rows) and permissions persist with the host

    def __init__(self, host: Host) -> None:
        super().__init__(host)
        self._allowed: set[tuple[str, str]] = set()
        self._psi_clients: dict[tuple[str, str], Any] = {}
        #: aligned datasets made here: as_name -> (source dataset, its rows, the user who
        #: aligned it), kept on restart
        self._aligned: dict[str, tuple[str, torch.Tensor, str]] = {}
        #: PSI work per user: (wall-clock time, elements) of the last minute's calls
        self._work: dict[str, list[tuple[float, int]]] = {}
        self._saved_at: dict[str, float] = {}  # when _charge's last save of them ended

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

    @owner_op("revoke_alignment")
    def revoke_alignment(self, dataset: str, user: str) -> dict[str, Any]:
        """Owner: withdraw ``user``'s permission to align ``dataset`` (``user``: the principal
        it was allowed for, or a display name only one user allowed on it had). From now on
        its ``psi_serve``, ``psi_request`` and ``psi_finish`` on ``dataset`` are refused (a
        request it made is dropped); the aligned datasets it made stay (``aligned``: delete
        them with ``drop_aligned``). Its other permissions stay."""
        principal = self._allowed_user(dataset, user)
        self._allowed.discard((dataset, principal))
        self._psi_clients.pop((dataset, principal), None)
        self.host.record(AuditEntry(time.time(), "alignment", "revoke", None, {}, 0, 0, 0.0,
                                    f"{self.host.who(principal)} may no longer align "
                                    f"{dataset!r} (revoked by the data owner)"))
        made = sorted(k for k, (src, _, u) in self._aligned.items()
                      if src == dataset and u == principal)
        return {"dataset": dataset, "user": principal, "aligned": made}

    def _allowed_user(self, dataset: Any, user: Any) -> str:
        """The principal allowed on ``dataset`` that ``user`` names (itself, or its display
        name); a :class:`ConfigError` naming those allowed when there is none or several."""
        if not isinstance(user, str) or not user:
            raise ConfigError(f"user must be a principal or a display name, got {user!r}")
        if (dataset, user) in self._allowed:
            return user
        allowed = sorted(u for d, u in self._allowed if d == dataset)
        named = [u for u in allowed if self.host.names.get(u) == user]
        if len(named) == 1:
            return named[0]
        if named:
            raise ConfigError(f"{len(named)} users allowed to align {dataset!r} went by "
                              f"{user!r}: name one of {named}")
        raise ConfigError(f"{user!r} is not allowed to align {dataset!r} here: nothing to "
                          f"revoke; allowed on it: {[self.host.who(u) for u in allowed]}")

    def forget_user(self, user: str) -> list[str]:
        """Withdraw every alignment permission of ``user`` (a principal); the datasets it
        was allowed on, sorted. Called by the host's ``forget_user``."""
        gone = sorted(d for d, u in self._allowed if u == user)
        self._allowed = {(d, u) for d, u in self._allowed if u != user}
        for d in gone:
            self._psi_clients.pop((d, user), None)
        return gone

    def withdraw_legacy(self, prefix: str) -> list[tuple[str, str]]:
        """Withdraw the permissions saved for a user not named by a principal (``prefix``: how
        this host's principals begin): an older syft-split saved them under e-mails, which can
        pass to another account, so none is moved to whoever has that e-mail now. Each is
        audited ("grant again for <e-mail>"); the (dataset, e-mail) pairs, sorted."""
        legacy = sorted((d, u) for d, u in self._allowed if not u.startswith(prefix))
        for dataset, user in legacy:
            self._allowed.discard((dataset, user))
            why = (f"the permission to align {dataset!r} an older syft-split saved for the "
                   f"e-mail {user!r} was withdrawn (an e-mail can pass to another account): "
                   f"grant again for {user} with allow_alignment if that user should align it")
            _log.warning("%s: %s", self.host.name, why)
            self.host.record(AuditEntry(time.time(), "alignment", "restore", None, {}, 0, 0,
                                        0.0, why))
        return legacy

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

    def _aligned_source(self, call: Call) -> tuple[str, Dataset]:
        name = call.req.get("dataset")
        if not isinstance(name, str) or (name, call.caller) not in self._allowed:
            raise AccessError(f"{call.caller} may not align dataset {name!r} here")
        ds = self.host.datasets.get(name)
        if ds is None or ds.ids is None:  # the permission outlived it (a restart)
            raise ConfigError(f"dataset {name!r} is not here now or has no record ids; the data "
                              "owner must add it (with ids) again")
        return name, ds

    def _charge(self, caller: str, elements: int) -> None:
        """Count ``elements`` of PSI work against ``caller``'s minute
        (``HostLimits.max_psi_elements_per_minute``) before the work runs; refuse past it."""
        budget = self.host.limits.max_psi_elements_per_minute
        now = time.time()  # wall clock: the window is saved and goes on after a restart
        window, used = last_minute(self._work.get(caller, []), now)
        recent = self._work[caller] = list(window)
        if elements > budget:  # waiting cannot help: say so
            raise ValidationError(f"this call needs {elements} PSI elements processed here and "
                                  f"this data owner allows {budget} a minute in all (it may "
                                  "raise HostLimits.max_psi_elements_per_minute)")
        if used + elements > budget:
            raise ValidationError(f"{caller} had {used} PSI elements processed here in the last "
                                  f"minute and this call needs {elements}; this data owner "
                                  f"allows {budget} a minute")
        recent.append((now, elements))
        self._save_window(now)

    def _save_window(self, now: float) -> None:
        """Save the PSI work windows (with the host's state) at most every
        :data:`WINDOW_SAVE_S`: a crash gives back at most that long of PSI work, and refused
        calls, which charge nothing, write nothing (every call rewrote host.sspl, 70 ms with
        a large pending proposal in it). A failed save leaves the store marked unsaved: the
        next changing op saves everything."""
        store = getattr(self.host, "store", None)
        if store is None or not window_save_due(self._saved_at, "psi", now, WINDOW_SAVE_S):
            return
        try:
            store.save_host(self.host)
        except StateSaveError as exc:
            _log.warning("the PSI work window was not saved: %s", exc)
        finally:
            self._saved_at["psi"] = time.time()

    # psi_serve and psi_request change only the user's PSI work window (saved by _charge)
    @op("psi_serve", egress={"setup": BYTES, "response": BYTES})
    def psi_serve(self, call: Call) -> dict[str, Any]:
        from .psi import PsiServer, request_elements

        _, ds = self._aligned_source(call)
        request = _bytes(call.req, "request")
        n, most = request_elements(request), self.host.limits.max_psi_elements
        if n > most:
            raise ValidationError(f"expected a PSI request of at most {most} elements but got {n}")
        assert ds.ids is not None
        self._charge(call.caller, n + len(ds.ids))
        setup, response = PsiServer(ds.ids).handle(request)
        return {"setup": setup, "response": response}

    @op("psi_request", egress={"request": BYTES})
    def psi_request(self, call: Call) -> dict[str, Any]:
        from .psi import PsiClient

        name, ds = self._aligned_source(call)
        assert ds.ids is not None
        self._charge(call.caller, len(ds.ids))
        client = PsiClient(ds.ids)
        self._psi_clients[(name, call.caller)] = client
        return {"request": client.request()}

    @op("psi_finish", mutates=True, egress={"records": SCALAR})
    def psi_finish(self, call: Call) -> dict[str, Any]:
        from .psi import DEFAULT_FPR

        name, ds = self._aligned_source(call)
        key = (name, call.caller)
        client = self._psi_clients.get(key)
        if client is None:
            raise ProtocolError("psi_finish without psi_request")
        as_name = call.req.get("as_name")
        if (not isinstance(as_name, str) or not 0 < len(as_name) <= MAX_NAME_CHARS
                or not as_name.isprintable() or as_name in self.host.datasets):
            got = f"{as_name[:40]!r} ({len(as_name)} characters)" if isinstance(as_name, str) \
                else type(as_name).__name__
            raise ConfigError(f"as_name must be a new dataset name of 1..{MAX_NAME_CHARS} "
                              f"printable characters, got {got}")
        held = sum(1 for *_, user in self._aligned.values() if user == call.caller)
        if held >= MAX_ALIGNED_PER_USER:
            raise ConfigError(f"{call.caller} holds {held} aligned datasets here; this data "
                              f"owner keeps at most {MAX_ALIGNED_PER_USER} per user")
        setup, response = _bytes(call.req, "setup"), _bytes(call.req, "response")
        self._charge(call.caller, len(client))
        del self._psi_clients[key]  # one finish per request, whatever its outcome
        rows = client.intersection(setup, response, fpr=DEFAULT_FPR)
        if rows.numel() == 0:
            raise ConfigError(f"no record of {name!r} is common with the model owner's ids; "
                              "nothing was aligned")
        self.host.datasets[as_name] = ds.subset(rows, name)
        self._aligned[as_name] = (name, rows, call.caller)
        return {"records": int(rows.numel())}

    # --------------------------------------------------- persistence (host.store)
    def state(self) -> dict[str, Any]:
        """Alignment permissions, the PSI work windows, and the rows of each aligned dataset
        with a digest of their ids (not its data: the source dataset is the data owner's and
        comes back with the datasite)."""
        now = time.time()
        work = {u: [[t, n] for t, n in w if in_window(t, now)] for u, w in self._work.items()}
        return {"allowed": sorted([d, u] for d, u in self._allowed),
                "work": {u: w for u, w in work.items() if w},
                "aligned": {k: {"source": src, "rows": rows, "user": user,
                                "ids_digest": _digest(self.host.datasets[k].ids)}
                            for k, (src, rows, user) in self._aligned.items()}}

    def restore(self, state: Any) -> None:
        """Permissions and aligned datasets; one whose name the data owner gave to a dataset
        of its own since, or whose source holds other ids at its rows now, or whose saved
        record cannot be read, is dropped, not put in its place (:meth:`_not_restored`): the
        others are restored."""
        self._allowed = {(str(d), str(u)) for d, u in state.get("allowed", [])}
        self._work = {str(u): [(float(t), int(n)) for t, n in w]
                      for u, w in (state.get("work") or {}).items()}
        for name, rec in (state.get("aligned") or {}).items():
            try:
                self._restore_aligned(str(name), rec)
            except Exception as exc:  # this aligned dataset only: the others are restored
                self._not_restored(str(name), f"its saved record cannot be read "
                                              f"({type(exc).__name__}: {clip(str(exc), 200)})")

    def _restore_aligned(self, name: str, rec: Any) -> None:
        """One aligned dataset as saved (or :meth:`_not_restored`); raises if ``rec`` is not
        one :meth:`state` wrote."""
        source = self.host.datasets.get(rec["source"])
        if source is None:
            return  # the source dataset is gone: so is its alignment
        if name in self.host.datasets:
            self._not_restored(name, "the data owner holds a dataset of that name now (kept)")
            return
        rows = rec["rows"]
        if not isinstance(rows, torch.Tensor) or rows.dim() != 1:
            raise TypeError(f"expected rows as a 1-d tensor, got {type(rows).__name__}")
        n = len(source.ids) if source.ids is not None else 0
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
            self._not_restored(name, f"its source {rec['source']!r} has {n} records "
                                     f"with ids now, fewer than its rows reach")
            return
        ids = [] if source.ids is None else [source.ids[int(r)] for r in rows]
        if "ids_digest" in rec and _digest(ids) != rec["ids_digest"]:
            self._not_restored(name, f"its source {rec['source']!r} holds other ids at "
                                     "its rows now (re-ordered or changed)")
            return
        aligned = source.subset(rows, str(rec["source"]))
        self._aligned[name] = (str(rec["source"]), rows, str(rec.get("user", "")))
        self.host.datasets[name] = aligned

    def _not_restored(self, name: str, reason: str) -> None:
        """The aligned rows saved under ``name`` are forgotten (audited), and segments approved
        on them halt: they would read other records than those they were approved on (the data
        owner's own dataset of that name, or other rows of the source)."""
        why = f"aligned dataset {name!r} was not restored: {reason}"
        _log.warning("%s: %s", self.host.name, why)
        self.host.record(AuditEntry(time.time(), "alignment", "restore", None, {}, 0, 0, 0.0,
                                    why))
        for p in list(self.host.proposals_by_id.values()):
            if p.status == "approved" and name in p.datasets:
                self.host.halt(p.id, f"the datasite restarted and {why}: this segment was "
                                     "approved on the aligned records; align again under "
                                     "another name and propose again")


def _digest(ids: Sequence[str | int] | None) -> str:
    """SHA-256 of a list of record ids, as the strings PSI compares."""
    text = json.dumps([str(i) for i in ids or []])
    return hashlib.sha256(text.encode()).hexdigest()


def _bytes(req: dict[str, Any], name: str) -> bytes:
    value = req.get(name)
    if not isinstance(value, bytes):
        raise ConfigError(f"field {name!r} must be bytes")
    return value


def align_records(transport: Transport, parties: Sequence[str], dataset: str,
                  label_ids: Sequence[str | int], *, as_name: str | None = None,
                  max_psi_elements: int = HostLimits.max_psi_elements) -> torch.Tensor:
    """Align ``parties``' ``dataset`` with the model owner's ``label_ids``.

    Each party ends with a dataset ``as_name`` (default ``f"{dataset}@aligned"``) holding the
    records common to everyone, sorted by id; the return value is the model owner's rows into
    ``label_ids`` for the same records in the same order (index your labels with it).

    Each data owner is held to the record count its ``describe`` declares for ``dataset`` (at
    most ``max_psi_elements``, a host's default, else :class:`ConfigError`): its ``psi_serve``
    setup must be the ``"gcs"`` one an honest host sends for a set no larger
    (:class:`ProtocolError`), and its ``psi_request`` may hold no more elements
    (:class:`ValidationError`); each error names the party. So a data owner learns which of at
    most that many ids of its choosing are common, not which of any number it guesses.
    """
    from .psi import DEFAULT_FPR, PsiClient, PsiServer, canonical_ids, id_sort_key

    if (not isinstance(max_psi_elements, int) or isinstance(max_psi_elements, bool)
            or max_psi_elements < 1):
        raise ConfigError(f"Expected argument `max_psi_elements` to be a positive int but got "
                          f"{max_psi_elements!r}")
    as_name = as_name or f"{dataset}@aligned"
    lead = canonical_ids(label_ids, party="model owner")
    declared = {p: _declared_records(transport, p, dataset, max_psi_elements) for p in parties}
    cand = torch.arange(len(lead))
    for party in parties:  # narrowing: the model owner (client) against each party (server)
        client = PsiClient([lead[i] for i in cand.tolist()], pad_to=len(lead))
        r = transport.call(party, "psi_serve", dataset=dataset, request=client.request())
        try:  # the setup an honest host sends for at most the records it declared
            found = client.intersection(r["setup"], r["response"], fpr=DEFAULT_FPR,
                                        max_server_ids=declared[party])
        except (ProtocolError, WireError) as exc:
            raise type(exc)(f"data owner {party!r} answered psi_serve on {dataset!r} "
                            f"({declared[party]} records declared): {exc}") from exc
        cand = cand[found]
        if cand.numel() == 0:
            raise ConfigError("no record is common to all parties; nothing to align")
    cand = cand[sorted(range(len(cand)), key=lambda j: id_sort_key(lead[int(cand[j])]))]
    common = [lead[i] for i in cand.tolist()]
    for party in parties:  # distribution: each party (client) against the common ids
        request = transport.call(party, "psi_request", dataset=dataset)["request"]
        _check_request(party, dataset, request, declared[party])
        setup, response = PsiServer(common).handle(request)
        n = transport.call(party, "psi_finish", dataset=dataset, setup=setup,
                           response=response, as_name=as_name)["records"]
        if n != len(common):
            raise ProtocolError(f"{party} aligned {n} records, expected {len(common)} "
                                "(a PSI false positive); rerun")
    return cand


def _declared_records(transport: Transport, party: str, dataset: str, most: int) -> int:
    """How many records ``party``'s ``dataset`` holds, as its ``describe`` declares: the most
    ids it may claim in ``psi_serve`` and ask about in ``psi_request`` (at most ``most``)."""
    from .contract import check_describe

    entry = check_describe(party, transport.call(party, "describe")).get(dataset)
    n = entry.get("records") if entry is not None else None
    if not isinstance(n, int) or n < 1 or entry is None or entry.get("has_ids") is not True:
        raise ConfigError(f"data owner {party!r} declares no dataset {dataset!r} with record "
                          "ids (describe): it must add one before aligning")
    if n > most:
        raise ConfigError(f"data owner {party!r} declares {n} records in {dataset!r}; the "
                          f"model owner aligns at most {most} records per data owner (argument "
                          "max_psi_elements, a host's default HostLimits.max_psi_elements)")
    return n


def _check_request(party: str, dataset: str, request: Any, declared: int) -> None:
    """Refuse a ``psi_request`` of more elements than the records ``party`` declared: each
    element is an id tested against the common ones (and costs the model owner work)."""
    from .psi import request_elements

    try:
        n = request_elements(request)
    except WireError as exc:
        raise WireError(f"data owner {party!r} sent a bad psi_request on {dataset!r}: "
                        f"{exc}") from exc
    if n > declared:
        raise ValidationError(f"data owner {party!r} sent a PSI request of {n} elements on "
                              f"{dataset!r}, more than the {declared} records it declared "
                              "(describe); refused: each element tests one id against the "
                              "common ones")
