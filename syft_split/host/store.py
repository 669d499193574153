"""A data owner's state directory: what a host keeps across a crash or a restart.

A :class:`~syft_split.host.DataOwnerHost` built with ``state_dir=...`` writes there (the
directory is the data owner's: it holds weights and the peer-sealing key; the host makes the
directories 0700 and every file 0600, whatever the umask)::

    state_dir/
      host.sspl              proposals (spec JSON, initial weights -- a rejected one keeps
                             only the spec's digest --, status and, for a halted one, why and
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
(:meth:`HostStore.save_all`).

Restoring (:meth:`HostStore.restore`, after the host's datasets are back) rebuilds proposals and
segments (a damaged file is refused with an error naming it; a segment whose file is missing or
older than ``host.sspl`` records is halted, audited, never run on from lost state), re-runs
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
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from .. import persist
from ..errors import ConfigError
from .records import AuditEntry, Proposal, Runtime, StepRecord
from .segments import rerun_pending
from .state_trees import (
    audit_json,
    id_number,
    load_file,
    proposal_from,
    proposal_tree,
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
            "proposals": [{**proposal_tree(p, p.id in host.runtimes),
                           "saves": self._saves.get(p.id, 0)}
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
        when there is nothing to restore."""
        if not self.exists():
            return False
        tree = load_file(self.path / "host.sspl")
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
        self._restoring, self._deferred = True, False
        try:
            top, kept = 0, {}
            for raw in tree["proposals"]:
                p = proposal_from(raw)
                host.proposals_by_id[p.id] = p
                top = max(top, id_number(p.id))
                if raw.get("runtime"):
                    host.runtimes[p.id], kept[p.id] = self._runtime(host, p,
                                                                    int(raw.get("saves", 0)))
            host.ids = itertools.count(top + 1)
            states = tree.get("families") or {}
            for name, family in host.families.items():
                family.restore(states.get(name) or {})
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
                    family.restore_segment(host.runtimes[pid], families.get(name))
        finally:
            self._restoring = False
        if self._deferred or saved_key != host.label_key:  # e.g. a segment halted because it
            # could not be rebuilt, or state from before the host kept a label key
            self.save_host(host)
        return True

    def _runtime(self, host: DataOwnerHost, p: Proposal,
                 saves: int) -> tuple[Runtime, dict[str, Any]]:
        """The segment as its file left it, and what the families kept with it. A file that
        is missing or older than host.sspl says (``saves``: how often it had been written)
        halts the segment (audited): it would run on from lost weights and steps."""
        assert p.module is not None
        params = list(p.module.parameters())
        rt = Runtime(p, p.module, p.optimizer.build(params) if params else None)
        path = self.segment_path(p.id)
        if not path.exists():
            if saves > 0 and p.status == "approved":
                host.halt(p.id, f"the datasite restarted and this segment's state file {path} "
                          f"is missing (it had been saved {saves} times): its weights and "
                          "steps are lost; it cannot run on from its initial weights")
            return rt, {}
        snap = load_file(path)
        found = int(snap.get("saves", 0))
        self._saves[p.id] = found
        if found < saves and p.status == "approved":
            host.halt(p.id, f"the datasite restarted and this segment's state file {path} is "
                      f"older than the host's record (save {found} of {saves}): its latest "
                      "weights and steps are lost; it cannot run on from older ones")
        rt.module.load_state_dict(snap["weights"])
        if rt.optimizer is not None and snap.get("optimizer") is not None:
            rt.optimizer.load_state_dict(snap["optimizer"])
        rt.steps = int(snap["steps"])
        rt.torch_rng = snap["torch_rng"]
        rt.records = [StepRecord(int(r["step"]), str(r["op"]), str(r["digest"]),
                                 bytes(r["response"])) for r in snap.get("records", [])]
        rt.extra.update(snap.get("extra") or {})
        rt.fresh_secrets(host.label_key)  # the release noise not replayed
        rt.he_saved = snap.get("he")
        grads = snap.get("loss_grads")
        if grads is not None:  # a loss step waiting for its weight
            for name, param in rt.module.named_parameters():
                if name in grads:
                    param.grad = grads[name].clone()
            rt.pending_loss_grads = True
        if snap.get("pending") is not None and p.he is None:
            rt.pending_source = snap["pending"]  # re-run once every dataset is back
        return rt, dict(snap.get("families") or {})

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
