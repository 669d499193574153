"""The data owner's host: a small dispatcher over op families, one guard, one audit log.

A :class:`DataOwnerHost` is transport-free. Its wire entry is :meth:`DataOwnerHost.handle`
(``caller``, request bytes) -> response bytes; the in-process transport calls it directly and
the PySyft plugin calls it from inside a datasite's API endpoint. Its owner-side entry is
:meth:`DataOwnerHost.owner_call` (review, approve, audit, ...), which no model owner reaches:
the in-process console (:mod:`.console`) calls it directly, the datasite only for an admin of
the datasite.

Every request is decoded under the wire schema, dispatched to the op family that declares the
op (:mod:`syft_split.host.dispatch`), and every response passes the host's
:class:`~syft_split.host.guard.Guard` before it is encoded; each call, answered or refused,
becomes an :class:`AuditEntry`. The ops themselves live in their families: proposals and
review (:mod:`.proposals`), segment steps (:mod:`.segments`), weights (:mod:`.weights`),
leakage (:mod:`.watch`), and outside this package alignment (:mod:`syft_split.alignment`) and
encryption (:mod:`syft_split.he_host`).

Exactly-once steps (a request carrying ``step``) are answered by :mod:`.answers`.
With ``state_dir`` the host keeps its state on disk (:mod:`.store`):
:meth:`DataOwnerHost.restore_state` loads it after a restart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .. import wire
from ..errors import (
    ApprovalError,
    AuthorizationError,
    ConfigError,
    EgressError,
    LeakageHaltError,
    ProtocolError,
    StateSaveError,
    SyftSplitError,
)
from .answers import error_answer, opaque, recorded_answer, step_id
from .console import HostConsole
from .dispatch import OpFamily, OpSpec, owner_op, registered_families
from .guard import Call, Guard
from .records import (
    AUDIT_TEXT,
    AuditEntry,
    Dataset,
    HostLimits,
    Proposal,
    Runtime,
    StepRecord,
    clip,
)
from .saving import Ran, before, persist
from .state_trees import audit_json
from .store import HostStore

__all__ = ["DataOwnerHost", "AUDIT_TAIL", "AUDIT_PAGE"]

_log = logging.getLogger(__name__)

#: audit entries a host keeps in memory (the newest; up to twice this many before trimming)
AUDIT_TAIL = 10_000
#: the most audit entries one ``audit`` call returns (each is clipped: a page stays small)
AUDIT_PAGE = 1_000


class DataOwnerHost(HostConsole):
    """Everything a data owner runs. Model owners reach it only through :meth:`handle`; the
    data owner through :meth:`owner_call` (its console methods: :class:`.console.HostConsole`)."""

    def __init__(
        self,
        name: str,
        datasets: dict[str, Dataset] | None = None,
        *,
        max_request_bytes: int = 64 * 1024 * 1024,
        max_batch: int = 4096,
        limits: HostLimits | None = None,
        state_dir: str | Path | None = None,
        checkpoint_every: int = 1,
    ) -> None:
        self.name = name
        self.datasets: dict[str, Dataset] = dict(datasets or {})
        self.limits = limits or HostLimits(max_request_bytes=max_request_bytes,
                                           max_batch=max_batch)
        self.guard = Guard(self.limits)
        #: the newest audit entries (at most about twice :attr:`audit_tail`; the whole log is
        #: ``audit.jsonl`` in the state directory), and the index of the first one held
        self.audit: list[AuditEntry] = []
        self.audit_first = 0
        self.audit_tail = AUDIT_TAIL
        #: guards :attr:`audit` (entries come from the endpoint, channel threads and refusals
        #: recorded outside the serving lock)
        self.audit_lock = threading.Lock()
        #: display names of callers (a datasite user's e-mail, by its principal; see
        #: :mod:`.users`): shown in the audit log and the review, never checked
        self.names: dict[str, str] = {}
        self.proposals_by_id: dict[str, Proposal] = {}
        self.runtimes: dict[str, Runtime] = {}
        self.ids: Iterator[int] = itertools.count(1)
        #: the randomized response's secret key (hex), one per data owner and kept with its
        #: state: every segment that releases a record's label releases the same noisy one
        self.label_key = secrets.token_hex(32)
        self.families: dict[str, OpFamily] = {}
        self._ops: dict[str, tuple[OpSpec, Callable[..., Any]]] = {}
        self._owner_ops: dict[str, tuple[OpSpec, Callable[..., Any]]] = {}
        self.add_family(_CoreOps(self))
        for cls in registered_families():
            self.add_family(cls(self))
        #: the data owner's state directory (None: state lives in memory only)
        self.store = (HostStore(state_dir, every=checkpoint_every, families=self.families)
                      if state_dir is not None else None)
        #: when a rate window that changed alone was last saved, by segment id ("": the
        #: proposal-rate windows in host.sspl; see :mod:`.saving`)
        self.window_saves: dict[str, float] = {}

    # ------------------------------------------------------------------- persistence
    def restore_state(self) -> bool:
        """Load the state directory (call after adding the datasets); False if it is empty."""
        return self.store.restore(self) if self.store is not None else False

    def save_state(self) -> None:
        """Write everything to the state directory now (clean shutdown); no-op without one."""
        if self.store is not None:
            self.store.save_all(self)

    def close(self) -> None:
        """Save everything and release the state directory's files."""
        if self.store is not None:
            self.store.save_all(self)
            self.store.close()

    def record(self, entry: AuditEntry) -> None:
        """Append ``entry`` to the audit log (and to the state directory's ``audit.jsonl``),
        its texts clipped (:meth:`AuditEntry.clipped`). Memory keeps the newest
        :attr:`audit_tail` to ``2 * audit_tail`` entries; older ones live on disk only.
        Thread-safe: entries keep one order in memory and in the file. A caller with a
        display name is recorded under it, its principal in ``user``."""
        name = self.names.get(entry.caller)
        if name is not None:
            entry = dataclasses.replace(entry, caller=name, user=entry.caller)
        entry = entry.clipped()
        with self.audit_lock:
            self.audit.append(entry)
            if len(self.audit) > 2 * self.audit_tail:
                drop = len(self.audit) - self.audit_tail
                del self.audit[:drop]
                self.audit_first += drop
            if self.store is not None:
                self.store.append_audit(entry)

    def who(self, caller: str) -> str:
        """``caller`` for display: its name and principal, or the principal alone."""
        name = self.names.get(caller)
        return caller if name is None else f"{name} ({caller})"

    @property
    def max_request_bytes(self) -> int:
        return self.limits.max_request_bytes

    @property
    def max_batch(self) -> int:
        return self.limits.max_batch

    def add_family(self, family: OpFamily) -> None:
        """Answer ``family``'s ops too (op names must be new)."""
        for spec, fn in family.ops():
            if family.host_state:
                spec = dataclasses.replace(spec, family_state=True)
            table = self._owner_ops if spec.owner else self._ops
            if spec.name in table:
                raise ConfigError(f"op {spec.name!r} of family {family.name!r} is already "
                                  "answered by another family")
            table[spec.name] = (spec, fn)
        self.families[family.name] = family

    # ------------------------------------------------------------------ lookups for ops
    def proposal(self, proposal_id: str) -> Proposal:
        p = self.proposals_by_id.get(proposal_id)
        if p is None:
            raise ApprovalError(f"no proposal {proposal_id!r} on {self.name}; known: "
                                f"{sorted(self.proposals_by_id)}")
        return p

    def new_proposal_id(self, kind: str) -> str:
        """A fresh proposal id ``<host>/<kind><n>`` (kind ``seg``, ``fl``): never one in use
        (the counter is shared by every kind and goes on after a restart)."""
        while True:
            pid = f"{self.name}/{kind}{next(self.ids)}"
            if pid not in self.proposals_by_id:
                return pid

    def add_proposal(self, p: Proposal) -> None:
        """Keep a new proposal; one under an id already in use is refused, nothing replaced."""
        if p.id in self.proposals_by_id:
            raise ProtocolError(f"proposal id {p.id!r} is already in use on {self.name}; "
                                "nothing was replaced")
        self.proposals_by_id[p.id] = p

    def runtime(self, caller: str, req: Mapping[str, Any], roles: tuple[str, ...]) -> Runtime:
        """The approved runtime a request names, if ``caller`` drives it and its role fits."""
        seg = req.get("segment")
        p = self.proposals_by_id.get(seg) if isinstance(seg, str) else None
        if p is None or p.status != "approved":
            state = "unknown" if p is None else p.status
            why = f" ({p.reason})" if p is not None and p.reason else ""
            cls = LeakageHaltError if p is not None and p.halted_by == "watch" else ApprovalError
            raise cls(f"segment {seg!r} is {state} on {self.name}{why}: it cannot run")
        asked = self.guard.stopped(p.id)
        if asked is not None:  # halt asked, not yet complete (it waits for the serving lock)
            raise ApprovalError(f"segment {p.id} is being halted on {self.name} by its data "
                                f"owner ({asked}): it cannot run")
        if caller != p.driver:  # principals: a datasite user's id, never its e-mail
            raise AuthorizationError(f"{self.who(caller)} may not drive {p.id}: the data "
                                     "owner approved another user")
        if p.role not in roles:
            raise ProtocolError(f"segment {p.id} has role {p.role!r}; this op needs {roles}")
        return self.runtimes[p.id]

    def owned_runtime(self, proposal_id: str) -> Runtime:
        """An approved (or halted) segment's runtime, for the data owner's own use."""
        rt = self.runtimes.get(proposal_id)
        if rt is None:
            raise ApprovalError(f"segment {proposal_id} is not approved on {self.name}")
        return rt

    def dataset(self, rt: Runtime, req: Mapping[str, Any]) -> Dataset:
        """The dataset a request names, if the segment was approved for it."""
        from ..errors import AccessError

        name = req.get("dataset", rt.proposal.datasets[0] if rt.proposal.datasets else None)
        if name not in rt.proposal.datasets:
            raise AccessError(f"segment {rt.id} was approved for {rt.proposal.datasets}, "
                              f"not {name!r}")
        return self.datasets[str(name)]

    def halt(self, proposal_id: str, reason: str = "halted by the data owner", *,
             by: str = "owner") -> None:
        """Stop an approved segment for good: every further op on it is refused with ``reason``
        (``by``: "owner", or "watch" for the leakage watch). With a state directory the halt is
        saved at once (a halt issued during a segment's op, e.g. by the leakage watch or a
        refused encrypted gradient, survives a crash right after it) and audited.

        The data owner's console (in process) calls it directly: its segment's gate closes
        first (:meth:`Guard.stop`), so an op of it in progress in another thread is refused
        and nothing of its answer leaves. The leakage watch's halt does not close the gate:
        it halts from inside the op it measured, which is answered; the next is refused."""
        p = self.proposal(proposal_id)
        if by != "watch":
            self.guard.stop(p.id, reason)
        p.status, p.reason, p.halted_by = "halted", reason, by
        rt = self.runtimes.get(p.id)
        if rt is not None:
            rt.clear_pending()
        self.record(AuditEntry(time.time(), by, "halt", p.id, {}, 0, 0, 0.0, reason))
        if self.store is not None:  # a halt lasts: on disk now, whatever op it interrupted
            try:
                self.store.save_host(self)
            except Exception as exc:  # disk full: in effect here; the next save saves it
                raise StateSaveError(
                    f"segment {p.id} is halted ({reason}) but the halt could not be saved "
                    f"({type(exc).__name__}: {exc}): if the host restarts before a save "
                    "succeeds, halt it again") from exc

    def stepped(self, rt: Runtime, grad: Any) -> None:
        """Tell every family that ``rt`` just took an optimizer step on ``grad``."""
        for family in self.families.values():
            family.after_step(rt, grad)

    # ----------------------------------------------------------------------- wire entry
    def handle(self, caller: str, data: bytes) -> bytes:
        """Answer one request from ``caller``; errors come back as (class name, message)."""
        t0 = time.perf_counter()
        op, segment, shapes = "?", None, {}
        spec: OpSpec | None = None
        call: Call | None = None
        replay: bytes | None = None
        step: int | None = None
        token = False  # a propose with a token: sent again, it is answered, not made twice
        ran: Ran | None = None  # set when the op runs (see :mod:`.saving`)
        try:
            request = wire.decode(data, max_bytes=self.limits.max_request_bytes)
            op = str(request.pop("op", "?"))
            token = op == "propose" and request.get("token") is not None
            step = step_id(request.pop("step", None))
            segment = request.get("segment") if isinstance(request.get("segment"), str) else None
            shapes = {k: list(v.shape) for k, v in request.items() if isinstance(v, torch.Tensor)}
            entry = self._ops.get(op)
            if entry is None:
                raise ProtocolError(f"unknown op {clip(op, AUDIT_TEXT)!r}; known: "
                                    f"{sorted(self._ops)}")
            spec, fn = entry
            call = Call(caller, op, request)
            if spec.roles is not None:
                call.rt = self.runtime(caller, request, spec.roles)
            digest = hashlib.sha256(data).hexdigest() if step is not None else ""
            replay = recorded_answer(call.rt, step, op, digest)
            if replay is not None:
                spec = None  # nothing ran: nothing to save
                raw, outcome = replay, f"ok (step {step} answered from the record)"
            else:
                ran = before(self, call)
                try:
                    with torch.enable_grad():  # the caller's grad mode is not ours
                        response = fn(call)
                    try:
                        response = self.guard.release(spec.egress, call, response)
                        raw = wire.encode(response)
                        self.guard.still_open(call)  # the last look: a halt asked meanwhile
                    except (EgressError, ApprovalError):  # refused by the guard (or a halt)
                        if call.undo is None and call.rt is not None:
                            call.rt.clear_pending()  # nothing of this step left: not pending
                        raise
                except Exception:
                    ran.failed = True
                    if call.undo is not None:  # a held-back step it applied: undone
                        call.undo()
                        ran.undone = True
                    raise
                if step is not None and call.rt is not None:
                    call.rt.remember(StepRecord(step, op, digest, raw))
                    call.unchanged = False  # its record is to be saved
                outcome = "ok"
        except SyftSplitError as exc:
            raw = error_answer(type(exc).__name__, str(exc), exc.peer)
            outcome = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a bug or torch failure: report, never crash the host
            # its text may be computed from private values (torch's "Target 4 is out of
            # bounds." is a label): only the exception's type leaves, the text stays in the
            # data owner's audit entry
            raw = error_answer("RemoteError", opaque(exc, op, self.name))
            outcome = f"RemoteError: {type(exc).__name__}: {exc}"
        try:  # before answering: an answered step is on disk (what changed: .saving)
            persist(self, spec, call, ran, replayed=replay is not None)
        except Exception as exc:  # disk full, I/O error: it ran, it is not saved; say so
            err = StateSaveError(
                f"op {clip(op, AUDIT_TEXT)!r} ran on {self.name} (outcome: "
                f"{clip(outcome, AUDIT_TEXT)}) but its state could not be saved "
                f"({type(exc).__name__}: {exc}): it is not durable. " + (
                    "Send the same request again (same step id) to get its answer once saved; "
                    "if the data owner restarts first, the step is lost (re-attach)"
                    if step is not None else
                    "Send the same request again (same token) to get its proposal's id once "
                    "saved; if the data owner restarts first, the proposal is lost"
                    if token else
                    "It carried no step id: sent again it runs again (check its effect "
                    "first); if the data owner restarts before a save succeeds, its effect "
                    "is lost"))
            raw = error_answer(type(err).__name__, str(err))
            outcome = f"StateSaveError: {err}"
        try:  # the call ran and is answered: a failure to record it must not un-answer it
            self.record(AuditEntry(time.time(), caller, op, segment, shapes, len(data),
                                   len(raw), time.perf_counter() - t0, outcome))
        except Exception as exc:  # (a channel would run the frame again)
            _log.warning("syft_split: %s could not record op %s: %s: %s", self.name,
                         clip(op, AUDIT_TEXT), type(exc).__name__, exc)
        return raw

    # ---------------------------------------------------------------------- owner entry
    def ask_halt(self, op: str, fields: Mapping[str, Any]) -> list[str]:
        """The part of a data-owner op that halts segments (``halt``, ``reject``,
        ``forget_user``) which takes effect at once: the guard's gate of each segment it
        stops closes now (:meth:`Guard.stop`), so an op in progress on it is refused and
        nothing of it leaves. Thread-safe and without the serving lock: the datasite calls it
        before it waits for that lock, :meth:`owner_call` first thing. An unknown op, or fields
        the op does not take (a typo), closes nothing. Returns the segments it asked to halt
        (for :meth:`undo_halt` if the op then fails)."""
        entry = self._owner_ops.get(op)
        try:
            if entry is None:
                return []
            inspect.signature(entry[1]).bind(**fields)
        except TypeError:  # the op refuses these fields itself, before halting anything
            return []
        asked: list[str] = []
        for family in list(self.families.values()):
            try:
                stops = family.stops(op, fields)
            except Exception:  # (never: stops() does not raise) the op itself still halts
                continue
            for segment, reason in stops:
                self.guard.stop(segment, reason)
                asked.append(segment)
        return asked

    def undo_halt(self, asked: list[str]) -> None:
        """The op that asked to halt ``asked`` (:meth:`ask_halt`) failed before taking effect:
        the gates of segments it did not halt or reject open again, unless another halt asked
        for them too (review R12: a halt that failed left its segment approved but refused
        for good, across restarts too). Not after a :class:`StateSaveError`: the op took
        effect (a ``forget_user`` whose second halt could not be saved had the user's third
        segment run again, review R13)."""
        self.guard.reopen(s for s in asked if s in self.proposals_by_id and
                          self.proposals_by_id[s].status not in ("halted", "rejected"))

    def owner_call(self, caller: str, op: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Answer a data-owner op (the console's); audited as ``owner.<op>``. The caller must
        already be established as the data owner (in process, or an admin of the datasite).
        An op that halts segments closes their gate first (:meth:`ask_halt`)."""
        t0 = time.perf_counter()
        segment = fields.get("segment") if isinstance(fields.get("segment"), str) else None
        outcome = "RemoteError"
        try:
            closed = self.ask_halt(op, fields)
            entry = self._owner_ops.get(op)
            try:
                if entry is None:
                    raise ProtocolError(f"unknown data-owner op {op!r}; known: "
                                        f"{sorted(self._owner_ops)}")
                response: dict[str, Any] = entry[1](**fields)
            except StateSaveError:
                raise  # it took effect (halts are in memory): its gates stay closed
            except BaseException:
                self.undo_halt(closed)
                raise
            outcome = "ok"
            if self.store is not None and entry[0].mutates:  # approvals, peers: saved at once
                try:
                    self.store.save_all(self)
                except Exception as exc:  # disk full, I/O error: in effect, not saved; say so
                    raise StateSaveError(  # store.unsaved: the next change saves everything
                        f"data-owner op {op!r} took effect on {self.name} but its state could "
                        f"not be saved ({type(exc).__name__}: {exc}): it is not durable. The "
                        "next change that saves (a data-owner op or a model owner's step) "
                        "saves it too; if the host restarts first, it is lost") from exc
            return response
        except SyftSplitError as exc:
            outcome = f"{type(exc).__name__}: {exc}"
            raise
        except TypeError as exc:
            outcome = f"ConfigError: {exc}"
            raise ConfigError(f"data-owner op {op!r}: {exc}") from exc
        finally:
            self.record(AuditEntry(time.time(), caller, f"owner.{op}", segment, {}, 0, 0,
                                   time.perf_counter() - t0, outcome))

    def owner(self, op: str, **fields: Any) -> dict[str, Any]:
        """:meth:`owner_call` as the data owner itself (the in-process console)."""
        return self.owner_call("owner", op, fields)

    def owner_ops(self) -> list[str]:
        return sorted(self._owner_ops)


class _CoreOps(OpFamily):
    """The host's own data-owner ops: ``audit``."""

    name = "core"

    @owner_op("audit", mutates=False)
    def audit(self, since: int = 0, limit: int = AUDIT_PAGE) -> dict[str, Any]:
        """One page of audit entries: at most ``limit`` (<= :data:`AUDIT_PAGE`) from index
        ``since`` on (JSON). Also ``total`` (the index the next entry gets), ``first`` (the
        oldest index still in memory; older entries are in ``audit*.jsonl`` only) and ``next``
        (the ``since`` of the next page)."""
        host = self.host
        since = since if isinstance(since, int) and since >= 0 else 0
        limit = limit if isinstance(limit, int) and 1 <= limit <= AUDIT_PAGE else AUDIT_PAGE
        with host.audit_lock:
            first = host.audit_first
            start = max(since, first)
            page = host.audit[start - first:start - first + limit]
            total = first + len(host.audit)
        return {"total": total, "first": first, "next": start + len(page),
                "entries": [audit_json(e) for e in page]}
