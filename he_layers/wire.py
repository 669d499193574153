"""Byte framing of he_layers messages: no pickle, only JSON headers and raw blobs.

Frame: ``b"HEL1"`` | u32 header length | UTF-8 JSON header | blobs back to back.
The header carries ``kind`` and ``blob_sizes``; arrays travel as little-endian float64.
Malformed frames raise :class:`CiphertextError` (the he_layers member of
:class:`ValidationError`).
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np

from syft_split.errors import CiphertextError, NonFiniteError, ShapeError

__all__ = ["MAGIC", "encode_frame", "decode_frame", "frame_header", "array_to_bytes",
           "array_from_bytes", "fingerprint"]

MAGIC = b"HEL1"
_MAX_HEADER = 1 << 20
_MAX_BLOBS = 1 << 16


def encode_frame(kind: str, header: dict[str, Any], blobs: list[bytes]) -> bytes:
    """Frame ``blobs`` with a JSON ``header`` (``kind`` and ``blob_sizes`` are added)."""
    head = dict(header, kind=kind, blob_sizes=[len(b) for b in blobs])
    raw = json.dumps(head, sort_keys=True, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(raw)), raw, *blobs])


def frame_header(data: bytes, expected_kind: str) -> dict[str, Any]:
    """The JSON header of an ``expected_kind`` frame, checked as :func:`decode_frame` checks
    it, without copying the blobs (e.g. to see which context a message belongs to)."""
    head, _ = _header(data, expected_kind)
    return head


def _header(data: bytes, expected_kind: str) -> tuple[dict[str, Any], int]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CiphertextError(
            f"{expected_kind}: expected bytes, got {type(data).__name__}"
        )
    if len(data) < 8 or bytes(data[:4]) != MAGIC:
        raise CiphertextError(
            f"{expected_kind}: not an he_layers message (expected magic {MAGIC!r}, "
            f"got {data[:4]!r})"
        )
    (hlen,) = struct.unpack("<I", data[4:8])
    if hlen > _MAX_HEADER or 8 + hlen > len(data):
        raise CiphertextError(f"{expected_kind}: truncated or oversized header ({hlen} bytes)")
    try:
        head = json.loads(bytes(data[8 : 8 + hlen]).decode())
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, too-long integers
        raise CiphertextError(f"{expected_kind}: header is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise CiphertextError(f"{expected_kind}: header JSON is nested too deeply") from exc
    if not isinstance(head, dict) or head.get("kind") != expected_kind:
        got = head.get("kind") if isinstance(head, dict) else type(head).__name__
        raise CiphertextError(f"expected a {expected_kind!r} message, got {got!r}")
    return head, hlen


def decode_frame(data: bytes, expected_kind: str) -> tuple[dict[str, Any], list[bytes]]:
    """Parse a frame; refuse anything but a well-formed ``expected_kind`` message."""
    head, hlen = _header(data, expected_kind)
    data = bytes(data)
    sizes = head.get("blob_sizes")
    if (
        not isinstance(sizes, list)
        or len(sizes) > _MAX_BLOBS
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes)
        or 8 + hlen + sum(sizes) != len(data)
    ):
        raise CiphertextError(
            f"{expected_kind}: blob sizes do not match the message length {len(data)}"
        )
    blobs, pos = [], 8 + hlen
    for s in sizes:
        blobs.append(data[pos : pos + s])
        pos += s
    return head, blobs


def array_to_bytes(a: np.ndarray) -> bytes:
    """float64 little-endian, C order (the shape travels in the header)."""
    return np.ascontiguousarray(a, dtype="<f8").tobytes()


def array_from_bytes(data: bytes, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Inverse of :func:`array_to_bytes` with shape and finiteness checks."""
    expected = int(np.prod(shape)) * 8
    if len(data) != expected:
        raise ShapeError(
            f"{what}: expected shape {shape} ({expected} bytes), got {len(data)} bytes"
        )
    a = np.frombuffer(data, dtype="<f8").reshape(shape).astype(np.float64)
    if not np.isfinite(a).all():
        raise NonFiniteError(f"{what}: contains NaN or Inf")
    return a


def fingerprint(data: bytes) -> str:
    """Short identifier of a public context (binds messages to one key owner/run)."""
    return hashlib.sha256(data).hexdigest()[:32]
