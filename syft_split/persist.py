"""State on disk: nested JSON + tensors + bytes as one wire message, written atomically.

Both parties keep state with these helpers: the data owner's host (:mod:`syft_split.host.store`)
and the model owner's trainer checkpoints (:mod:`syft_split.checkpoint`). Files use the wire
format (:mod:`syft_split.wire`): an explicit schema, no pickle, every field checked on load.

:func:`pack` turns a nested structure (dicts, lists, JSON scalars, tensors, bytes; e.g. an
optimizer's ``state_dict()``) into a flat message: the JSON skeleton under ``"tree"`` with each
tensor or bytes value replaced by a reference to its own field. :func:`unpack` inverts it.
:func:`write_atomic` writes to a temporary file in the same directory, fsyncs it, renames it
over the target (``os.replace``) and fsyncs the directory: a reader sees the old file or the new
one, never a torn one, even if the process is SIGKILLed mid-write. A file starts with
:data:`SUM_MAGIC` and the sha256 of the message: :func:`load` refuses a file whose bytes
changed on disk (a flipped bit in a weight or a step counter restored silently before);
files written before the checksum (no magic) still load.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import wire
from .errors import WireError

__all__ = ["pack", "unpack", "write_atomic", "fsync_dir", "save", "load", "MAX_STATE_BYTES",
           "MAX_STATE_HEADER", "SUM_MAGIC"]

#: the largest state file read back (a segment's weights, optimizer state and last response)
MAX_STATE_BYTES = 4 * 1024 * 1024 * 1024
#: the largest JSON part of a state file: a party's own file, not a peer's message (whose
#: header stops at 1 MiB); what peers choose in it is bounded where it is let in
MAX_STATE_HEADER = 64 * 1024 * 1024
#: what a state file starts with: then the sha256 of the wire message that follows
SUM_MAGIC = b"SSPLSUM1"


def pack(tree: Any) -> dict[str, Any]:
    """A nested structure as one flat wire message (see the module docstring)."""
    fields: dict[str, Any] = {}

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = f"t{len(fields)}"
            fields[key] = value.detach().cpu().contiguous()
            return {"__t": key}
        if isinstance(value, (bytes, bytearray, memoryview)):
            key = f"b{len(fields)}"
            fields[key] = bytes(value)
            return {"__b": key}
        if isinstance(value, float) and not math.isfinite(value):
            return {"__f": repr(value)}
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: walk(v) for k, v in value.items()}
            items = []
            for k, v in value.items():
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise WireError(f"cannot store a dict key of type {type(k).__name__}")
                items.append([k, walk(v)])
            return {"__items": items}
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise WireError(f"cannot store a value of type {type(value).__name__}")

    return {"tree": walk(tree), **fields}


def unpack(message: dict[str, Any]) -> Any:
    """The structure :func:`pack` stored in ``message``."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {"__t"} or set(value) == {"__b"}:
                ref = next(iter(value.values()))
                if ref not in message:
                    raise WireError(f"state refers to a missing field {ref!r}")
                return message[ref]
            if set(value) == {"__f"}:
                return float(value["__f"])
            if set(value) == {"__items"}:
                return {k: walk(v) for k, v in value["__items"]}
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    if "tree" not in message:
        raise WireError("not a state file (no 'tree' field)")
    return walk(message["tree"])


def write_atomic(path: str | Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically and durably (temp file, fsync, rename). The file
    is readable by its owner only (0600, whatever the umask: state holds weights and keys);
    a missing directory is made 0700. A failed write raises and leaves the old file (or
    none) and no temp file."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # a temp file of its own (0600): two threads saving one file never share one
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (disk full) leaves no partial file
    fsync_dir(path.parent)


def fsync_dir(path: str | Path) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(path: str | Path, tree: Any) -> int:
    """:func:`pack` ``tree`` and write it atomically to ``path``; return the bytes written."""
    message = wire.encode(pack(tree), max_header=MAX_STATE_HEADER)
    data = SUM_MAGIC + hashlib.sha256(message).digest() + message
    write_atomic(path, data)
    return len(data)


def load(path: str | Path) -> Any:
    """Read a file written by :func:`save` (its checksum, then validated like any wire
    message); :class:`~syft_split.errors.WireError` if its bytes changed."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(SUM_MAGIC):
        head = len(SUM_MAGIC) + 32
        digest, data = data[len(SUM_MAGIC):head], data[head:]
        if hashlib.sha256(data).digest() != digest:
            raise WireError(f"state file {path}: its checksum does not match its bytes "
                            "(changed on disk)")
    return unpack(wire.decode(data, max_bytes=MAX_STATE_BYTES, max_header=MAX_STATE_HEADER))
