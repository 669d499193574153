"""The wire format: messages as bytes with an explicit schema. No pickle, ever.

A message is a flat ``dict[str, value]`` where a value is a :class:`torch.Tensor`, ``bytes``,
or JSON data (``None``, bool, int, float, str, and lists/dicts of those). Layout::

    b"SSPL" | version (1 byte) | header length (uint32 LE) | header (UTF-8 JSON) | payload

The header lists every tensor/bytes field with its dtype, shape, offset and length in the
payload, and carries the JSON fields inline. The fields' bytes lie back to back in header order
and fill the payload exactly. :func:`decode` checks every number in the header against the
payload before it builds anything (so a message never decodes to more bytes than it holds),
and copies the bytes (nothing is shared by reference with the sender).
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import torch

from .errors import (
    DTypeError,
    EmptyBatchError,
    NonFiniteError,
    PayloadTooLargeError,
    ShapeError,
    WireError,
)

__all__ = [
    "MAGIC",
    "DEFAULT_MAX_BYTES",
    "MAX_FIELDS",
    "WIRE_DTYPES",
    "encode",
    "decode",
    "check_tensor",
    "within",
]

MAGIC = b"SSPL"
_VERSION = 1
_PREFIX = struct.Struct("<4sBI")
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
_MAX_HEADER = 1024 * 1024
_MAX_DIMS = 8
#: most tensor/bytes fields one message may carry (a 1 MiB header holds ~15k entries at most).
MAX_FIELDS = 1 << 14

#: dtypes that may travel; everything else is refused on both ends.
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in WIRE_DTYPES.items()}
_NUMPY = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float16,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}

Message = dict[str, Any]


def _is_json(value: Any, depth: int = 0) -> bool:
    if depth > 16:
        return False
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_is_json(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v, depth + 1) for k, v in value.items())
    return False


def encode(message: Message, *, max_header: int = _MAX_HEADER) -> bytes:
    """Serialise a message to bytes (tensors are detached and copied to CPU); its JSON header
    at most ``max_header`` bytes (a peer's messages: 1 MiB; a party's own state files more)."""
    fields: list[dict[str, Any]] = []
    inline: dict[str, Any] = {}
    chunks: list[bytes] = []
    offset = 0
    for name, value in message.items():
        if not isinstance(name, str):
            raise WireError(f"message keys must be str, got {type(name).__name__}")
        if isinstance(value, torch.Tensor):
            dtype = _DTYPE_NAMES.get(value.dtype)
            if dtype is None:
                raise DTypeError(
                    f"field {name!r}: dtype {value.dtype} cannot travel; "
                    f"allowed: {sorted(WIRE_DTYPES)}"
                )
            arr = value.detach().cpu().contiguous().numpy()
            raw = arr.tobytes()
            fields.append(
                {"name": name, "kind": "tensor", "dtype": dtype, "shape": list(arr.shape),
                 "offset": offset, "nbytes": len(raw)}
            )
        elif isinstance(value, (bytes, bytearray, memoryview)):
            raw = bytes(value)
            fields.append({"name": name, "kind": "bytes", "offset": offset, "nbytes": len(raw)})
        elif _is_json(value):
            inline[name] = value
            continue
        else:
            raise WireError(
                f"field {name!r}: {type(value).__name__} cannot travel; "
                "send a tensor, bytes, or JSON data"
            )
        chunks.append(raw)
        offset += len(raw)
    if len(fields) > MAX_FIELDS:
        raise WireError(f"message has {len(fields)} tensor/bytes fields; at most {MAX_FIELDS} travel")
    header = json.dumps({"fields": fields, "inline": inline}, separators=(",", ":")).encode()
    if len(header) > max_header:  # what decode refuses is not sent
        raise WireError(f"message header of {len(header)} bytes exceeds {max_header} bytes: "
                        "send long data as a tensor or bytes field")
    return _PREFIX.pack(MAGIC, _VERSION, len(header)) + header + b"".join(chunks)


def _field_int(field: dict[str, Any], key: str) -> int:
    value = field.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise WireError(f"bad header: field {field.get('name')!r} has invalid {key}={value!r}")
    return value


def _refuse_constant(name: str) -> Any:
    """``json.loads`` hook: ``NaN``/``Infinity``/``-Infinity`` are not JSON and never sent."""
    raise WireError(f"header holds the non-finite constant {name}: refused")


def _finite_float(text: str) -> float:
    """``json.loads`` hook: a float literal that overflows to infinity (``1e400``) is refused."""
    value = float(text)
    if not math.isfinite(value):
        raise WireError(f"header holds the number {text[:40]!r}, which is not finite: refused")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook: an object naming a key twice is ambiguous and refused."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise WireError(f"header names key {key[:80]!r} twice: refused")
        out[key] = value
    return out


def _parse_header(raw: bytes) -> dict[str, Any]:
    """The header's JSON, strictly: finite numbers only, no repeated keys, and any failure of
    the parser (bad UTF-8 or JSON, an integer past Python's digit limit, nesting past the
    recursion limit) raised as :class:`WireError`."""
    try:
        header = json.loads(
            raw.decode("utf-8"),
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise WireError(f"header is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise WireError("header JSON is nested too deeply") from exc
    if not isinstance(header, dict) or not isinstance(header.get("fields"), list):
        raise WireError("header must be an object with a 'fields' list")
    inline = header.get("inline", {})
    if not isinstance(inline, dict):
        raise WireError("header 'inline' must be an object")
    for name, value in inline.items():
        if not _is_json(value):  # the rule encode applies (nesting depth at most 16)
            raise WireError(f"inline field {name[:80]!r} is nested too deeply")
    return header


def _layout(fields: list[Any], payload_len: int) -> list[tuple[dict[str, Any], int, int]]:
    """Check the fields' byte ranges tile the payload as :func:`encode` lays them out: back to
    back in header order, starting at 0, ending at the payload's last byte. No range overlaps
    another (so no byte is decoded twice) and no byte is left over.
    Returns (field, offset, nbytes) per field."""
    if len(fields) > MAX_FIELDS:
        raise WireError(f"header lists {len(fields)} fields; at most {MAX_FIELDS} are allowed")
    out: list[tuple[dict[str, Any], int, int]] = []
    names: set[str] = set()
    pos = 0
    for field in fields:
        if not isinstance(field, dict) or not isinstance(field.get("name"), str):
            raise WireError(f"bad header field {str(field)[:200]}")
        name = field["name"]
        if name in names:
            raise WireError(f"duplicate field {name[:80]!r}")
        names.add(name)
        offset, nbytes = _field_int(field, "offset"), _field_int(field, "nbytes")
        if offset != pos:
            raise WireError(
                f"field {name[:80]!r} starts at byte {offset} but the previous field ends at "
                f"byte {pos}: fields must be laid out back to back (no overlap, no gap)"
            )
        if pos + nbytes > payload_len:
            raise WireError(
                f"field {name[:80]!r} claims bytes {offset}..{offset + nbytes} "
                f"but the payload has {payload_len}"
            )
        out.append((field, offset, nbytes))
        pos += nbytes
    if pos != payload_len:
        raise WireError(
            f"the fields cover {pos} bytes but the payload has {payload_len}: "
            "trailing bytes refused"
        )
    return out


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES,
           max_header: int = _MAX_HEADER) -> Message:
    """Parse bytes made by :func:`encode`, validating the schema against the payload.

    Raises :class:`PayloadTooLargeError` above ``max_bytes`` (checked before parsing) and
    :class:`WireError` for anything malformed: the header must be strict JSON (finite numbers,
    no repeated keys), and the fields must tile the payload exactly as :func:`encode` lays
    them out, so the decoded message never holds more bytes than were received.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise PayloadTooLargeError(
            f"message of {len(data)} bytes exceeds the limit of {max_bytes} bytes"
        )
    if len(data) < _PREFIX.size:
        raise WireError(f"message too short ({len(data)} bytes) to hold a header")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"not a syft-split message (magic {magic!r}, expected {MAGIC!r})")
    if version != _VERSION:
        raise WireError(f"unsupported wire version {version}, expected {_VERSION}")
    if header_len > max_header or _PREFIX.size + header_len > len(data):
        raise WireError(f"header length {header_len} does not fit the message")
    header = _parse_header(data[_PREFIX.size : _PREFIX.size + header_len])
    payload = memoryview(data)[_PREFIX.size + header_len :]
    out: Message = dict(header.get("inline", {}))
    layout = _layout(header["fields"], len(payload))  # every range checked before any copy
    for field, offset, nbytes in layout:
        name = field["name"]
        if name in out:
            raise WireError(f"duplicate field {name[:80]!r}")
        kind = field.get("kind")
        if kind == "bytes":
            out[name] = bytes(payload[offset : offset + nbytes])
        elif kind == "tensor":
            out[name] = _tensor_from(field, name, payload[offset : offset + nbytes], max_bytes)
        else:
            raise WireError(f"field {name[:80]!r} has unknown kind {str(kind)[:80]!r}")
    return out


def _tensor_from(
    field: dict[str, Any], name: str, raw: memoryview, max_bytes: int
) -> torch.Tensor:
    """Build a tensor from its header entry and its bytes (copied). Every dimension, and the
    product of the non-zero dimensions (what an empty tensor would hold with its zero
    dimensions at 1), is bounded by ``max_bytes``; the element count must match the bytes."""
    dtype = field.get("dtype")
    if dtype not in WIRE_DTYPES:
        raise DTypeError(
            f"field {name[:80]!r}: dtype {str(dtype)[:80]!r} not allowed; "
            f"allowed: {sorted(WIRE_DTYPES)}"
        )
    shape = field.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_DIMS
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise WireError(f"field {name[:80]!r}: invalid shape {str(shape)[:200]}")
    np_dtype = _NUMPY[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    if any(s > max_bytes for s in shape) or (
        math.prod(s for s in shape if s) * itemsize > max_bytes
    ):
        raise WireError(
            f"field {name[:80]!r}: shape {str(shape)[:200]} is out of bounds for a message "
            f"of at most {max_bytes} bytes"
        )
    expected = math.prod(shape) * itemsize
    if expected != len(raw):
        raise WireError(
            f"field {name[:80]!r}: shape {shape} of {dtype} needs {expected} bytes, "
            f"got {len(raw)}"
        )
    arr = np.frombuffer(raw, dtype=np_dtype).reshape(shape).copy()
    return torch.from_numpy(arr)


def within(t: torch.Tensor, bound: float) -> bool:
    """Every value finite and ``|v| <= bound``: one fused min/max pass (NaN fails both
    comparisons), ~8x cheaper than ``isfinite().all()`` on CPU; the slow checks run only to
    say what failed. Used by the host's egress guard and the model owner's answer checks."""
    if t.numel() == 0:
        return True
    if not math.isfinite(bound):
        return bool(torch.isfinite(t).all())
    lo, hi = torch.aminmax(t)
    return bool(lo >= -bound) and bool(hi <= bound)


def check_tensor(
    value: Any,
    name: str,
    *,
    shape: tuple[int | None, ...] | None = None,
    dtype: torch.dtype | None = None,
    finite: bool = True,
    nonempty: bool = True,
) -> torch.Tensor:
    """Validate one tensor at a party boundary; raise a message naming expected vs got.

    ``shape`` entries of ``None`` match any size.
    """
    if not isinstance(value, torch.Tensor):
        raise ShapeError(f"{name}: expected a tensor, got {type(value).__name__}")
    if dtype is not None and value.dtype != dtype:
        raise DTypeError(f"{name}: expected dtype {dtype}, got {value.dtype}")
    if shape is not None:
        ok = len(shape) == value.dim() and all(
            s is None or s == g for s, g in zip(shape, value.shape)
        )
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ShapeError(f"{name}: expected shape {want}, got {tuple(value.shape)}")
    if nonempty and (value.dim() == 0 or value.shape[0] == 0):
        if value.dim() > 0:
            raise EmptyBatchError(f"{name}: batch is empty (shape {tuple(value.shape)})")
    if finite and value.is_floating_point() and not bool(torch.isfinite(value).all()):
        n_nan = int(torch.isnan(value).sum())
        n_inf = int(torch.isinf(value).sum())
        raise NonFiniteError(f"{name}: contains {n_nan} NaN and {n_inf} Inf values")
    return value
