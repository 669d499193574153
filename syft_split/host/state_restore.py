"""Restoring a data owner's state directory (:mod:`syft_split.host.store`) into its host.

:meth:`HostStore.restore <syft_split.host.store.HostStore.restore>` (after the host's datasets
are back) reads ``host.sspl``, the index (:func:`read_index`), then rebuilds proposals and
segments (:class:`Restore`): a damaged ``host.sspl`` is refused with an error naming it; a
segment whose file is missing or older than ``host.sspl`` records, damaged (truncated, changed
on disk), or does not fit the segment (weights of other shapes, a field missing), or whose
families' part cannot be rebuilt, is halted with the reason, audited, never run on from lost
state, and the others are restored; a damaged segment file is kept, never overwritten, as
``segments/<id>.sspl.damaged-<n>`` (the lowest ``n`` free). A pending forward is run again
from its recorded input and RNG state (so the model owner's held-back gradient lands on the
same step), and each family gets its state back (what it keeps per segment through
``OpFamily.restore_segment``). CKKS secret keys are never written to disk: a segment approved
with encryption comes back with fresh keys (the model owner fetches the new public context and
runs a step cut by the restart again from its forward); its HE cost totals and, at level B,
its weight share, saved in the segment's file with its steps, are put back.

Imports point one way: :mod:`~syft_split.host.store` uses this module, never the reverse.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import persist
from ..errors import ConfigError, SyftSplitError, WireError
from .records import AuditEntry, Proposal, Runtime, clip
from .segments import rerun_pending
from .state_trees import (
    FORMAT,
    id_number,
    initial_runtime,
    load_file,
    proposal_from,
    runtime_from,
)

if TYPE_CHECKING:
    from .core import DataOwnerHost

__all__ = ["Restore", "read_index"]

_log = logging.getLogger(__name__)

#: characters of an error's text a halt's reason keeps (a weight mismatch lists every key)
_ERROR_CHARS = 400
#: errors of the disk or machine, not of a file: they stop the restore instead of halting
_NOT_THE_FILE = (OSError, MemoryError, RecursionError)


def read_index(index: Path, host: DataOwnerHost) -> dict[str, Any]:
    """host.sspl (``index``) of ``host``'s state directory: its tree, checked to be of this
    layout's :data:`FORMAT` and of this host; a file that cannot be read raises a
    :class:`WireError` naming it, another format or host a :class:`ConfigError`."""
    tree = load_file(index)
    if not isinstance(tree, dict):
        raise index_error(index, "its contents", TypeError(
            f"expected a dict, got {type(tree).__name__}"))
    folder = index.parent
    if tree.get("format") != FORMAT:
        raise ConfigError(f"{folder}: state format {tree.get('format')!r}, expected {FORMAT}")
    if tree.get("host") != host.name:
        raise ConfigError(f"{folder} holds the state of host {tree.get('host')!r}, not "
                          f"{host.name!r}: one state directory per host")
    return tree


def index_error(index: Path, what: str, exc: Exception) -> WireError:
    """host.sspl (``index``) is readable but ``what`` in it is not: the restore stops (it is
    the index), with an error naming the file and the part."""
    return WireError(f"state file {index}: {what} cannot be restored "
                     f"({type(exc).__name__}: {clip(str(exc), _ERROR_CHARS)}); put back a "
                     "copy from a backup, or move the state directory aside to start "
                     "without it")


class Restore:
    """One restore of the proposals and segments of host.sspl (``index``) into a host.
    ``segment_path``: where a segment's file is; ``saves``: segment id -> how many times its
    file was written (the store's record, filled in here as the files are found)."""

    def __init__(self, index: Path, segment_path: Callable[[str], Path],
                 saves: dict[str, int]) -> None:
        self.index = index
        self.segment_path = segment_path
        self.saves = saves
        #: segment id -> where its damaged file was set aside (this restore)
        self.aside: dict[str, Path] = {}
        #: segments to save again once restored: their file without the part that failed
        self.resave: set[str] = set()

    def segments(self, host: DataOwnerHost, tree: dict[str, Any]) -> None:
        """Load ``tree``'s proposals, segments and families' state into ``host``. A segment
        whose file (or what a family keeps in it) cannot be restored is halted, the others
        are restored (:meth:`damaged`); a part of host.sspl that cannot be read stops the
        restore with a :class:`WireError` naming it and the part (it is the index)."""
        top, kept = 0, {}
        for p, runtime, saves in self.proposals(tree):
            host.proposals_by_id[p.id] = p
            top = max(top, id_number(p.id))
            if runtime:
                host.runtimes[p.id], kept[p.id] = self.runtime(host, p, saves)
        host.ids = itertools.count(top + 1)
        states = tree.get("families") or {}
        for name, family in host.families.items():
            try:
                family.restore(states.get(name) or {})
            except SyftSplitError:  # the family's own word (e.g. settings it refuses)
                raise
            except Exception as exc:
                raise index_error(self.index, f"the {name!r} family's state", exc) from exc
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
                    self.damaged(host, host.proposals_by_id[pid], exc, family=name)
                    self.resave.add(pid)

    def proposals(self, tree: dict[str, Any]) -> Iterator[tuple[Proposal, bool, int]]:
        """host.sspl's proposals, each with whether it has a segment file and how many times
        that was written; an entry that cannot be read stops the restore (host.sspl is the
        index: without it no segment is known)."""
        entries = tree.get("proposals")
        if not isinstance(entries, list):
            raise index_error(self.index, "the proposals", TypeError(
                f"expected a list, got {type(entries).__name__}"))
        for i, raw in enumerate(entries):
            try:
                if not isinstance(raw, dict):
                    raise TypeError(f"expected a dict, got {type(raw).__name__}")
                p, saves = proposal_from(raw), int(raw.get("saves", 0))
            except Exception as exc:
                name = raw.get("id") if isinstance(raw, dict) else None
                raise index_error(self.index, f"proposal {i} ({name!r})", exc) from exc
            yield p, bool(raw.get("runtime")), saves

    def runtime(self, host: DataOwnerHost, p: Proposal,
                saves: int) -> tuple[Runtime, dict[str, Any]]:
        """The segment as its file left it, and what the families kept with it. A file that
        is missing or older than host.sspl says (``saves``: how often it had been written)
        halts the segment (audited): it would run on from lost weights and steps. A file that
        cannot be loaded into the segment (damaged on disk: truncated, bytes changed; weights
        or optimizer state that do not fit its module; a field missing or of the wrong kind)
        halts that segment only (:meth:`damaged`: moved aside, kept for inspection); it holds
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
            self.saves[p.id] = saves  # its next file is newer than host.sspl's record
            self.damaged(host, p, exc)
            return initial_runtime(p), {}
        self.saves[p.id] = found
        if found < saves and p.status == "approved":
            host.halt(p.id, f"the datasite restarted and this segment's state file {path} is "
                      f"older than the host's record (save {found} of {saves}): its latest "
                      "weights and steps are lost; it cannot run on from older ones")
        return rt, families

    def damaged(self, host: DataOwnerHost, p: Proposal, exc: Exception, *,
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
        aside = self.aside.get(p.id)
        if aside is None:
            try:
                aside = self.aside[p.id] = _set_aside(path, move=family is None)
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
