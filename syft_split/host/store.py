"""A data owner's state directory: what a host keeps across a crash or a restart.

A :class:`~syft_split.host.DataOwnerHost` built with ``state_dir=...`` writes there (the
directory is the data owner's: it holds weights and the peer-sealing key; the host makes the
directories 0700 and every file 0600, whatever the umask)::

    state_dir/
      host.sspl              proposals (spec JSON, initial weights -- a rejected one keeps
                             only the spec's digest, an approved one none once its segment
                             file is written --, status and, for a halted one, why and
                             by whom, approval; how many times its segment file was written;
                             the id counter goes on after the highest id), and what each op
                             family keeps (peer keys, trusted peers, alignment permissions and
                             aligned rows, ...)
      segments/<id>.sspl     per approved segment: weights, optimizer state, step counter, RNG
                             states, the last applied steps (id, op, digest, response), what
                             its pending forward ran on, and what families keep per segment
                             with its steps (``OpFamily.segment_state``: a local loss's
                             auxiliary head with its weights and optimizer state; the leakage
                             watch: bound, history, detector)
      audit.jsonl            one JSON line per call answered (appended as calls happen);
                             past ``audit_bytes`` (64 MiB) it becomes audit.1.jsonl (the older
                             ones move up to audit.<audit_keep>.jsonl; older than that are
                             deleted), and a new audit.jsonl starts
      audit.index            the index of audit.jsonl's first line (the lines rotated away
                             before it), written before each rotation: audit indices
                             (``owner("audit", since=...)``) go on across restarts

Files use the wire format (:mod:`syft_split.persist`; no pickle; the trees they hold:
:mod:`~syft_split.host.state_trees`) and are replaced atomically
(temp file, fsync, rename). A segment is saved after every ``every``-th op that changes it
(default 1: after every step, so a crash loses nothing), ``host.sspl`` after every proposal,
every data-owner op and every halt, and everything on a clean shutdown
(:meth:`HostStore.save_all`); what a model owner's call saves: :mod:`.saving`.

Restoring (:meth:`HostStore.restore`, after the host's datasets are back) rebuilds proposals and
segments (a damaged ``host.sspl``, the index, is refused with an error naming it; a segment
whose file is missing or older than ``host.sspl`` records, damaged (truncated, changed on
disk), or does not fit the segment (weights of other shapes, a field missing), or whose
families' part cannot be rebuilt, is halted with the reason, audited, never run on from lost
state, and the others are restored; a damaged segment file is kept, never overwritten, as
``segments/<id>.sspl.damaged-<n>`` (the lowest ``n`` free)), re-runs
a pending forward from its recorded input and RNG state (so the model owner's held-back gradient
lands on the same step), and hands each family its state (what it keeps per segment through
``OpFamily.restore_segment``). CKKS secret keys
are never written to disk: a segment approved with encryption comes back with fresh keys (the
model owner fetches the new public context and runs a step cut by the restart again from its
forward); its HE cost totals and, at level B, its weight share, saved in the segment's file
with its steps, are put back.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from .. import persist
from ..errors import ConfigError, SyftSplitError, WireError
from .records import AuditEntry, Proposal, Runtime, clip
from .segments import rerun_pending
from .state_trees import (
    audit_json,
    id_number,
    initial_runtime,
    load_file,
    proposal_from,
    proposal_tree,
    runtime_from,
    runtime_tree,
)

if TYPE_CHECKING:
    from .core import DataOwnerHost
    from .dispatch import OpFamily

__all__ = ["HostStore", "FORMAT"]

_log = logging.getLogger(__name__)

#: version of the state directory's layout
FORMAT = 1
#: audit.jsonl's size past which it is rotated, and how many rotated files are kept
AUDIT_BYTES = 64 * 1024 * 1024
AUDIT_KEEP = 4
#: characters of an error's text a halt's reason keeps (a weight mismatch lists every key)
_ERROR_CHARS = 400
#: errors of the disk or machine, not of a file: they stop the restore instead of halting
_NOT_THE_FILE = (OSError, MemoryError, RecursionError)


class HostStore:
    """Reads and writes one host's state directory (see the module docstring)."""

    def __init__(self, path: str | Path, *, every: int = 1,
                 families: Mapping[str, OpFamily] | None = None) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ConfigError(f"checkpoint_every must be a positive int, got {every!r}")
        self.path = Path(path)
        self.every = every
        #: the host's op families (what each keeps per segment goes in the segment's file)
        self.families: Mapping[str, OpFamily] = families if families is not None else {}
        for folder in (self.path, self.path / "segments"):  # the data owner's only
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.chmod(0o700)
        self._audit_file: Any = None
        #: audit.jsonl's writes, rotation, fsync and close, from any thread (refusals of
        #: non-admin owner ops are recorded outside the serving lock)
        self._audit_lock = threading.Lock()
        #: audit.jsonl's size past which it is rotated, and how many rotated files are kept
        self.audit_bytes = AUDIT_BYTES
        self.audit_keep = AUDIT_KEEP
        self._changes: dict[str, int] = {}
        #: how many times each segment's file was written (in the file, and in host.sspl: a
        #: restart finds a file that is missing or older than host.sspl says)
        self._saves: dict[str, int] = {}
        #: a write failed (disk full, I/O error): memory holds more than the files, until
        #: :meth:`save_all` succeeds
        self.unsaved = False
        #: set while :meth:`restore` runs: a save asked for then (a family halting a segment it
        #: cannot rebuild) waits until everything is loaded, so no half-restored state is written
        self._restoring = False
        self._deferred = False
        #: segment id -> where :meth:`restore` set its damaged file aside (this restore)
        self._aside: dict[str, Path] = {}
        #: seconds spent writing state, and how many files were written (for the report)
        self.seconds = 0.0
        self.writes = 0

    # ----------------------------------------------------------------------- writing
    def segment_path(self, segment_id: str) -> Path:
        return self.path / "segments" / f"{quote(segment_id, safe='')}.sspl"

    def save_host(self, host: DataOwnerHost) -> None:
        """Proposals, the id counter and the families' state."""
        if self._restoring:
            self._deferred = True
            return
        with self._flagging():
            self._save_host(host)

    @contextmanager
    def _flagging(self) -> Iterator[None]:
        """A write that fails marks the store :attr:`unsaved` (whoever asked for it)."""
        try:
            yield
        except Exception:
            self.unsaved = True
            raise

    def _save_host(self, host: DataOwnerHost) -> None:
        t0 = time.perf_counter()
        tree = {
            "format": FORMAT,
            "host": host.name,
            "proposals": [proposal_tree(p, p.id in host.runtimes, self._saves.get(p.id, 0))
                          for p in host.proposals_by_id.values()],
            "families": {name: fam.state() for name, fam in host.families.items()},
            "label_key": host.label_key,
        }
        persist.save(self.path / "host.sspl", tree)
        for pid in host.proposals_by_id:
            path = self.segment_path(pid)
            if pid not in host.runtimes:
                path.unlink(missing_ok=True)  # rejected: its weights are not kept
            elif not path.exists():  # newly approved: its first snapshot
                self.save_runtime(host.runtimes[pid])
        self.seconds += time.perf_counter() - t0
        self.writes += 1

    def changed(self, rt: Runtime) -> None:
        """An op changed ``rt``: save it if this is the ``every``-th change since the last save."""
        n = self._changes.get(rt.id, 0) + 1
        if n >= self.every:
            self.save_runtime(rt)
        else:
            self._changes[rt.id] = n

    def save_runtime(self, rt: Runtime) -> None:
        """The segment's snapshot, now."""
        t0 = time.perf_counter()
        saves = self._saves.get(rt.id, 0) + 1
        with self._flagging():
            persist.save(self.segment_path(rt.id), {**runtime_tree(rt, self.families),
                                                    "saves": saves})
        self._saves[rt.id] = saves
        self._changes[rt.id] = 0
        self.seconds += time.perf_counter() - t0
        self.writes += 1

    def append_audit(self, entry: AuditEntry) -> None:
        """One JSON line per call (flushed; fsynced by :meth:`save_all`); the file is rotated
        past :attr:`audit_bytes` (see the module docstring). Thread-safe; never raises."""
        with self._audit_lock:
            try:
                self._append_audit(entry)
            except Exception as exc:  # disk full: the entry stays in memory; the next retries
                _log.warning("syft_split: audit entry not written to %s: %s", self.path, exc)
                if self._audit_file is not None:
                    try:
                        self._audit_file.close()
                    except Exception:
                        pass
                    self._audit_file = None

    def _append_audit(self, entry: AuditEntry) -> None:
        if self._audit_file is None:
            fd = os.open(self.path / "audit.jsonl", os.O_RDWR | os.O_APPEND | os.O_CREAT,
                         0o600)
            os.fchmod(fd, 0o600)  # also a log an older version left readable by others
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a line a crash or a full disk
                os.write(fd, b"\n")  # tore: it ends here, the next entry starts a line
            self._audit_file = os.fdopen(fd, "a", encoding="utf-8")
        self._audit_file.write(json.dumps(audit_json(entry), separators=(",", ":")) + "\n")
        self._audit_file.flush()
        if self._audit_file.tell() >= self.audit_bytes:
            self._rotate_audit()

    def _rotate_audit(self) -> None:
        """audit.jsonl -> audit.1.jsonl -> ... -> audit.<audit_keep>.jsonl (the oldest goes).
        audit.index first says where the new audit.jsonl starts (a crash before the renames
        makes the indices jump forward at the restart, never go back)."""
        self._audit_file.close()
        self._audit_file = None
        current = self.path / "audit.jsonl"
        persist.write_atomic(self.path / "audit.index", json.dumps(
            {"first": self._audit_base() + _count_lines(current)}).encode())
        names = ["audit.jsonl"] + [f"audit.{k}.jsonl" for k in range(1, self.audit_keep + 1)]
        (self.path / names[-1]).unlink(missing_ok=True)
        for older, newer in reversed(list(zip(names[1:], names[:-1]))):
            if (self.path / newer).exists():
                os.replace(self.path / newer, self.path / older)
        persist.fsync_dir(self.path)

    def save_all(self, host: DataOwnerHost) -> None:
        """Everything, now (clean shutdown; after a failed write: memory and files agree
        again, :attr:`unsaved` is cleared)."""
        for rt in host.runtimes.values():
            self.save_runtime(rt)
        self.save_host(host)
        with self._audit_lock:
            if self._audit_file is not None:
                os.fsync(self._audit_file.fileno())
        self.unsaved = False

    def close(self) -> None:
        with self._audit_lock:
            if self._audit_file is not None:
                self._audit_file.close()
                self._audit_file = None

    # ----------------------------------------------------------------------- reading
    def exists(self) -> bool:
        return (self.path / "host.sspl").exists()

    def restore(self, host: DataOwnerHost) -> bool:
        """Load the directory into ``host`` (whose datasets must already be added); False
        when there is nothing to restore. A segment whose file (or what a family keeps in
        it) cannot be restored is halted, the others are restored (:meth:`_damaged`);
        host.sspl that cannot be read stops the restore with a :class:`WireError` naming it
        and the part (it is the index)."""
        if not self.exists():
            return False
        tree = load_file(self.path / "host.sspl")
        if not isinstance(tree, dict):
            raise self._index_error("its contents", TypeError(
                f"expected a dict, got {type(tree).__name__}"))
        if tree.get("format") != FORMAT:
            raise ConfigError(f"{self.path}: state format {tree.get('format')!r}, expected {FORMAT}")
        if tree.get("host") != host.name:
            raise ConfigError(f"{self.path} holds the state of host {tree.get('host')!r}, not "
                              f"{host.name!r}: one state directory per host")
        saved_key = tree.get("label_key")
        if isinstance(saved_key, str) and len(saved_key) == 64:
            host.label_key = saved_key
        # first: what restoring audits (halts) comes after
        tail, host.audit_first = self._read_audit(host.audit_tail)
        host.audit[:0] = tail
        self._restoring, self._deferred, self._aside = True, False, {}
        resave: set[str] = set()
        try:
            top, kept = 0, {}
            for p, runtime, saves in self._proposals(tree):
                host.proposals_by_id[p.id] = p
                top = max(top, id_number(p.id))
                if runtime:
                    host.runtimes[p.id], kept[p.id] = self._runtime(host, p, saves)
            host.ids = itertools.count(top + 1)
            states = tree.get("families") or {}
            for name, family in host.families.items():
                try:
                    family.restore(states.get(name) or {})
                except SyftSplitError:  # the family's own word (e.g. settings it refuses)
                    raise
                except Exception as exc:
                    raise self._index_error(f"the {name!r} family's state", exc) from exc
            for pid in kept:  # after the families (aligned datasets) are back
                _halt_without_data(host, host.runtimes[pid])
            for pid in kept:  # pending forwards
                rt = host.runtimes[pid]
                if rt.pending_source is not None and rt.pending_output is None:
                    try:
                        rerun_pending(host, rt, rt.pending_source)
                    except Exception as exc:  # e.g. a dataset that came back other than it was
                        host.halt(pid, "the datasite restarted and the forward pending on this "
                                  f"segment could not be run again ({type(exc).__name__}: "
                                  f"{exc}): it cannot go on from where it stood")
            for pid, families in kept.items():  # what families keep with a segment's steps
                for name, family in host.families.items():  # (after theirs: aligned datasets)
                    try:
                        family.restore_segment(host.runtimes[pid], families.get(name))
                    except _NOT_THE_FILE:
                        raise
                    except Exception as exc:  # this segment only
                        self._damaged(host, host.proposals_by_id[pid], exc, family=name)
                        resave.add(pid)
        finally:
            self._restoring = False
        if self._deferred or saved_key != host.label_key:  # e.g. a segment halted because it
            # could not be rebuilt, or state from before the host kept a label key
            self.save_host(host)
        for pid in resave:  # its file without the part that failed: the next restart reads it
            self.save_runtime(host.runtimes[pid])  # clean (no new copy, no new halt entry)
        return True

    def _proposals(self, tree: dict[str, Any]) -> Iterator[tuple[Proposal, bool, int]]:
        """host.sspl's proposals, each with whether it has a segment file and how many times
        that was written; an entry that cannot be read stops the restore (host.sspl is the
        index: without it no segment is known)."""
        entries = tree.get("proposals")
        if not isinstance(entries, list):
            raise self._index_error("the proposals", TypeError(
                f"expected a list, got {type(entries).__name__}"))
        for i, raw in enumerate(entries):
            try:
                if not isinstance(raw, dict):
                    raise TypeError(f"expected a dict, got {type(raw).__name__}")
                p, saves = proposal_from(raw), int(raw.get("saves", 0))
            except Exception as exc:
                name = raw.get("id") if isinstance(raw, dict) else None
                raise self._index_error(f"proposal {i} ({name!r})", exc) from exc
            yield p, bool(raw.get("runtime")), saves

    def _index_error(self, what: str, exc: Exception) -> WireError:
        """host.sspl is readable but ``what`` in it is not: the restore stops (it is the
        index), with an error naming the file and the part."""
        return WireError(f"state file {self.path / 'host.sspl'}: {what} cannot be restored "
                         f"({type(exc).__name__}: {clip(str(exc), _ERROR_CHARS)}); put back a "
                         "copy from a backup, or move the state directory aside to start "
                         "without it")

    def _runtime(self, host: DataOwnerHost, p: Proposal,
                 saves: int) -> tuple[Runtime, dict[str, Any]]:
        """The segment as its file left it, and what the families kept with it. A file that
        is missing or older than host.sspl says (``saves``: how often it had been written)
        halts the segment (audited): it would run on from lost weights and steps. A file that
        cannot be loaded into the segment (damaged on disk: truncated, bytes changed; weights
        or optimizer state that do not fit its module; a field missing or of the wrong kind)
        halts that segment only (:meth:`_damaged`: moved aside, kept for inspection); it holds
        its initial weights, halted, and every other segment is restored. A file that cannot
        be read (``OSError``: permissions, an I/O error) or a machine short of memory
        (``MemoryError``, ``RecursionError``) stops the restore: a halt is final."""
        path = self.segment_path(p.id)
        if not path.exists():
            if saves > 0 and p.status == "approved":
                host.halt(p.id, f"the datasite restarted and this segment's state file {path} "
                          f"is missing (it had been saved {saves} times): its weights and "
                          "steps are lost; it cannot run on from its initial weights")
            return initial_runtime(p), {}
        try:
            rt, families, found = runtime_from(p, persist.load(path), host.label_key)
        except _NOT_THE_FILE:  # the disk or the machine, not the file: fix it and restart
            raise
        except Exception as exc:  # this segment's file only: the others are restored
            self._saves[p.id] = saves  # its next file is newer than host.sspl's record
            self._damaged(host, p, exc)
            return initial_runtime(p), {}
        self._saves[p.id] = found
        if found < saves and p.status == "approved":
            host.halt(p.id, f"the datasite restarted and this segment's state file {path} is "
                      f"older than the host's record (save {found} of {saves}): its latest "
                      "weights and steps are lost; it cannot run on from older ones")
        return rt, families

    def _damaged(self, host: DataOwnerHost, p: Proposal, exc: Exception, *,
                 family: str | None = None) -> None:
        """Segment ``p``'s file (``family``: what that family keeps in it) could not be
        restored: halt the segment (an already halted one keeps its reason; the event is
        audited either way) with a reason naming the file, the error and where the file is
        kept: as ``segments/<id>.sspl.damaged-<n>``, the lowest ``n`` not taken (an earlier
        one is never overwritten; one per segment and restore). A file that could not be
        loaded at all is moved there (the next save writes the halted segment a new one); a
        file only a family's part of which did not fit stays too (its weights were loaded),
        a copy beside it."""
        path = self.segment_path(p.id)
        aside = self._aside.get(p.id)
        if aside is None:
            try:
                aside = self._aside[p.id] = _set_aside(path, move=family is None)
            except OSError as err:  # e.g. a read-only directory: the next save replaces it
                where = f"could not be set aside ({type(err).__name__}: {err})"
        if aside is not None:
            where = f"is kept as {aside.name} for inspection"
        what = "this segment's state file" if family is None else \
            f"what the {family!r} family keeps in this segment's state file"
        why = (f"the datasite restarted and {what} {path} could not be restored "
               f"({type(exc).__name__}: {clip(' '.join(str(exc).split()), _ERROR_CHARS)}); "
               f"the file {where}: "
               + ("its weights and steps are lost, it cannot run on from its initial weights"
                  if family is None else "it cannot run on without it"))
        _log.warning("%s: %s", host.name, why)
        if p.status == "approved":
            host.halt(p.id, why)
        else:
            host.record(AuditEntry(time.time(), "owner", "restore", p.id, {}, 0, 0, 0.0, why))

    def _audit_base(self) -> int:
        """The index of audit.jsonl's first line: from audit.index; without it (a directory
        of an older version, a damaged file), the lines of the rotated files kept."""
        try:
            first = json.loads((self.path / "audit.index").read_text())["first"]
            if isinstance(first, int) and not isinstance(first, bool) and first >= 0:
                return first
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return sum(_count_lines(self.path / f"audit.{k}.jsonl")
                   for k in range(1, self.audit_keep + 1))

    def _read_audit(self, keep: int) -> tuple[list[AuditEntry], int]:
        """The last ``keep`` entries of audit.jsonl, and the index of the first of them."""
        path = self.path / "audit.jsonl"
        base = self._audit_base()
        if not path.exists():
            return [], base
        lines: deque[str] = deque(maxlen=keep)
        count = 0
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                lines.append(line)
                count += 1
        out = []
        for line in lines:
            try:
                out.append(AuditEntry(**json.loads(line)).clipped())
            except (ValueError, TypeError):
                continue  # a line torn by a crash mid-write
        return out, base + count - len(lines)


def _set_aside(path: Path, *, move: bool) -> Path:
    """Keep ``path`` as ``<name>.damaged-<n>``, the lowest ``n`` not taken (a hard link, or
    a copy where there are none); ``move``: ``path`` itself goes."""
    n = 1
    while (aside := path.with_name(f"{path.name}.damaged-{n}")).exists():
        n += 1
    try:
        os.link(path, aside)
    except FileExistsError:
        raise  # never over an earlier one
    except OSError:  # no hard links on this file system: a copy (0600, like every file here)
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f, open(path, "rb") as src:
            shutil.copyfileobj(src, f)
            f.flush()
            os.fsync(f.fileno())
    if move:
        path.unlink()
    persist.fsync_dir(path.parent)
    return aside


def _halt_without_data(host: DataOwnerHost, rt: Runtime) -> None:
    """Halt (audited) an approved segment restored without a dataset it reads (the data owner
    restarted without it): its steps would fail, or run on other records."""
    p = rt.proposal
    missing = sorted(d for d in p.datasets if d not in host.datasets)
    if missing and p.status == "approved":
        host.halt(p.id, f"the datasite restarted without the dataset(s) {missing} this segment "
                  "reads: it cannot run on them (add them back and approve it again)")


def _count_lines(path: Path) -> int:
    """Lines of ``path`` (as iterating it counts them: a torn last line too); 0 if missing."""
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0
