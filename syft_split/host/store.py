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
segments: a damaged ``host.sspl``, the index, is refused with an error naming it; a segment whose
file is missing, older than ``host.sspl`` records or damaged is halted with the reason, audited,
its file kept aside; see :mod:`~syft_split.host.state_restore`. The audit files are written
and read by :mod:`~syft_split.host.audit_files`. CKKS secret keys are never written to disk.

Imports point one way: this module uses :mod:`~syft_split.host.state_restore`,
:mod:`~syft_split.host.audit_files` and :mod:`~syft_split.host.state_trees`, never the reverse.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from .. import persist
from ..errors import ConfigError
from .audit_files import AuditFiles
from .records import AuditEntry, Runtime
from .state_restore import Restore, read_index
from .state_trees import FORMAT, proposal_tree, runtime_tree

if TYPE_CHECKING:
    from .core import DataOwnerHost
    from .dispatch import OpFamily

__all__ = ["HostStore", "FORMAT"]


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
        #: audit.jsonl and its rotated files (:mod:`~syft_split.host.audit_files`)
        self.audit = AuditFiles(self.path)
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
        #: seconds spent writing state, and how many files were written (for the report)
        self.seconds = 0.0
        self.writes = 0

    @property
    def audit_bytes(self) -> int:
        """audit.jsonl's size past which it is rotated (default 64 MiB)."""
        return self.audit.bytes

    @audit_bytes.setter
    def audit_bytes(self, value: int) -> None:
        self.audit.bytes = value

    @property
    def audit_keep(self) -> int:
        """How many rotated audit files are kept (default 4)."""
        return self.audit.keep

    @audit_keep.setter
    def audit_keep(self, value: int) -> None:
        self.audit.keep = value

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
        self.audit.append(entry)

    def save_all(self, host: DataOwnerHost) -> None:
        """Everything, now (clean shutdown; after a failed write: memory and files agree
        again, :attr:`unsaved` is cleared)."""
        for rt in host.runtimes.values():
            self.save_runtime(rt)
        self.save_host(host)
        self.audit.sync()
        self.unsaved = False

    def close(self) -> None:
        self.audit.close()

    # ----------------------------------------------------------------------- reading
    def exists(self) -> bool:
        return (self.path / "host.sspl").exists()

    def restore(self, host: DataOwnerHost) -> bool:
        """Load the directory into ``host`` (whose datasets must already be added); False
        when there is nothing to restore. A segment whose file (or what a family keeps in
        it) cannot be restored is halted, the others are restored
        (:class:`~syft_split.host.state_restore.Restore`); host.sspl that cannot be read
        stops the restore with a :class:`~syft_split.errors.WireError` naming it and the part
        (it is the index)."""
        if not self.exists():
            return False
        index = self.path / "host.sspl"
        tree = read_index(index, host)
        saved_key = tree.get("label_key")
        if isinstance(saved_key, str) and len(saved_key) == 64:
            host.label_key = saved_key
        # first: what restoring audits (halts) comes after
        tail, host.audit_first = self.audit.read(host.audit_tail)
        host.audit[:0] = tail
        run = Restore(index, self.segment_path, self._saves)
        self._restoring, self._deferred = True, False
        try:
            run.segments(host, tree)
        finally:
            self._restoring = False
        if self._deferred or saved_key != host.label_key:  # e.g. a segment halted because it
            # could not be rebuilt, or state from before the host kept a label key
            self.save_host(host)
        for pid in run.resave:  # its file without the part that failed: the next restart
            self.save_runtime(host.runtimes[pid])  # reads it clean (no new copy, no new halt)
        return True
