"""A data owner's audit files in its state directory (:mod:`syft_split.host.store`).

``audit.jsonl`` holds one JSON line per call answered (appended as calls happen, flushed; a
line a crash or a full disk tore is ended before the next). Past :attr:`AuditFiles.bytes`
(64 MiB) it becomes ``audit.1.jsonl`` (the older ones move up to
``audit.<keep>.jsonl``; older than that are deleted) and a new ``audit.jsonl`` starts.
``audit.index`` holds the index of ``audit.jsonl``'s first line (the lines rotated away before
it), written before each rotation: audit indices (``owner("audit", since=...)``) go on across
restarts.

Imports point one way: :mod:`~syft_split.host.store` uses this module, never the reverse.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
from pathlib import Path
from typing import Any

from .. import persist
from .records import AuditEntry
from .state_trees import audit_json

__all__ = ["AUDIT_BYTES", "AUDIT_KEEP", "AuditFiles"]

_log = logging.getLogger(__name__)

#: audit.jsonl's size past which it is rotated, and how many rotated files are kept
AUDIT_BYTES = 64 * 1024 * 1024
AUDIT_KEEP = 4


class AuditFiles:
    """Appends to, rotates and reads back the audit files of the state directory ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None
        #: the writes, rotation, fsync and close, from any thread (refusals of non-admin owner
        #: ops are recorded outside the serving lock)
        self._lock = threading.Lock()
        #: audit.jsonl's size past which it is rotated, and how many rotated files are kept
        self.bytes = AUDIT_BYTES
        self.keep = AUDIT_KEEP

    def append(self, entry: AuditEntry) -> None:
        """One JSON line (flushed; fsynced by :meth:`sync`); the file is rotated past
        :attr:`bytes`. Thread-safe; never raises."""
        with self._lock:
            try:
                self._append(entry)
            except Exception as exc:  # disk full: the entry stays in memory; the next retries
                _log.warning("syft_split: audit entry not written to %s: %s", self.path, exc)
                if self._file is not None:
                    try:
                        self._file.close()
                    except Exception:
                        pass
                    self._file = None

    def _append(self, entry: AuditEntry) -> None:
        if self._file is None:
            fd = os.open(self.path / "audit.jsonl", os.O_RDWR | os.O_APPEND | os.O_CREAT,
                         0o600)
            os.fchmod(fd, 0o600)  # also a log an older version left readable by others
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a line a crash or a full disk
                os.write(fd, b"\n")  # tore: it ends here, the next entry starts a line
            self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._file.write(json.dumps(audit_json(entry), separators=(",", ":")) + "\n")
        self._file.flush()
        if self._file.tell() >= self.bytes:
            self._rotate()

    def _rotate(self) -> None:
        """audit.jsonl -> audit.1.jsonl -> ... -> audit.<keep>.jsonl (the oldest goes).
        audit.index first says where the new audit.jsonl starts (a crash before the renames
        makes the indices jump forward at the restart, never go back)."""
        self._file.close()
        self._file = None
        current = self.path / "audit.jsonl"
        persist.write_atomic(self.path / "audit.index", json.dumps(
            {"first": self._base() + count_lines(current)}).encode())
        names = ["audit.jsonl"] + [f"audit.{k}.jsonl" for k in range(1, self.keep + 1)]
        (self.path / names[-1]).unlink(missing_ok=True)
        for older, newer in reversed(list(zip(names[1:], names[:-1]))):
            if (self.path / newer).exists():
                os.replace(self.path / newer, self.path / older)
        persist.fsync_dir(self.path)

    def sync(self) -> None:
        """fsync audit.jsonl (if open)."""
        with self._lock:
            if self._file is not None:
                os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def _base(self) -> int:
        """The index of audit.jsonl's first line: from audit.index; without it (a directory
        of an older version, a damaged file), the lines of the rotated files kept."""
        try:
            first = json.loads((self.path / "audit.index").read_text())["first"]
            if isinstance(first, int) and not isinstance(first, bool) and first >= 0:
                return first
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return sum(count_lines(self.path / f"audit.{k}.jsonl")
                   for k in range(1, self.keep + 1))

    def read(self, keep: int) -> tuple[list[AuditEntry], int]:
        """The last ``keep`` entries of audit.jsonl, and the index of the first of them."""
        path = self.path / "audit.jsonl"
        base = self._base()
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


def count_lines(path: Path) -> int:
    """Lines of ``path`` (as iterating it counts them: a torn last line too); 0 if missing."""
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0
