"""The wire format: messages as bytes with an explicit schema. No pickle, ever.

A message is a flat ``dict[str, value]`` where a value is a :class:`torch.Tensor`, ``bytes``,
or JSON data (``None``, bool, int, float, str, and lists/dicts of those). Layout::

    b"SSPL" | version (1 byte) | header length (uint32 LE) | header (UTF-8 JSON) | payload

The header lists every tensor/bytes field with its dtype, shape, offset and length in the
payload, and carries the JSON fields inline. :func:`decode` checks every number in the header
against the payload before it builds anything, and copies the bytes (nothing is shared by
reference with the sender).
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
    "WIRE_DTYPES",
    "encode",
    "decode",
    "check_tensor",
]

MAGIC = b"SSPL"
_VERSION = 1
_PREFIX = struct.Struct("<4sBI")
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
_MAX_HEADER = 1024 * 1024
_MAX_DIMS = 8

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


def encode(message: Message) -> bytes:
    """Serialise a message to bytes (tensors are detached and copied to CPU)."""
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
    header = json.dumps({"fields": fields, "inline": inline}, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, _VERSION, len(header)) + header + b"".join(chunks)


def _field_int(field: dict[str, Any], key: str) -> int:
    value = field.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise WireError(f"bad header: field {field.get('name')!r} has invalid {key}={value!r}")
    return value


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Parse bytes made by :func:`encode`, validating the schema against the payload.

    Raises :class:`PayloadTooLargeError` above ``max_bytes`` (checked before parsing) and
    :class:`WireError` for anything malformed.
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
    if header_len > _MAX_HEADER or _PREFIX.size + header_len > len(data):
        raise WireError(f"header length {header_len} does not fit the message")
    try:
        header = json.loads(data[_PREFIX.size : _PREFIX.size + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("fields"), list):
        raise WireError("header must be an object with a 'fields' list")
    inline = header.get("inline", {})
    if not isinstance(inline, dict):
        raise WireError("header 'inline' must be an object")
    payload = memoryview(data)[_PREFIX.size + header_len :]
    out: Message = dict(inline)
    for field in header["fields"]:
        if not isinstance(field, dict) or not isinstance(field.get("name"), str):
            raise WireError(f"bad header field {field!r}")
        name = field["name"]
        if name in out:
            raise WireError(f"duplicate field {name!r}")
        offset, nbytes = _field_int(field, "offset"), _field_int(field, "nbytes")
        if offset + nbytes > len(payload):
            raise WireError(
                f"field {name!r} claims bytes {offset}..{offset + nbytes} "
                f"but the payload has {len(payload)}"
            )
        raw = bytes(payload[offset : offset + nbytes])
        kind = field.get("kind")
        if kind == "bytes":
            out[name] = raw
        elif kind == "tensor":
            out[name] = _tensor_from(field, name, raw)
        else:
            raise WireError(f"field {name!r} has unknown kind {kind!r}")
    return out


def _tensor_from(field: dict[str, Any], name: str, raw: bytes) -> torch.Tensor:
    dtype = field.get("dtype")
    if dtype not in WIRE_DTYPES:
        raise DTypeError(f"field {name!r}: dtype {dtype!r} not allowed; allowed: {sorted(WIRE_DTYPES)}")
    shape = field.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_DIMS
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise WireError(f"field {name!r}: invalid shape {shape!r}")
    np_dtype = _NUMPY[dtype]
    expected = math.prod(shape) * np.dtype(np_dtype).itemsize
    if expected != len(raw):
        raise WireError(
            f"field {name!r}: shape {shape} of {dtype} needs {expected} bytes, got {len(raw)}"
        )
    arr = np.frombuffer(raw, dtype=np_dtype).reshape(shape).copy()
    return torch.from_numpy(arr)


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
