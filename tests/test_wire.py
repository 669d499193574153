"""The wire format: explicit schema, no pickle, every malformed message refused."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from syft_split import DTypeError, PayloadTooLargeError, WireError, wire


def test_round_trip_preserves_values_dtypes_shapes() -> None:
    msg = {
        "a": torch.randn(3, 4),
        "b": torch.arange(5, dtype=torch.int64),
        "c": torch.tensor(True),
        "d": torch.randn(2, 3).t(),  # non-contiguous
        "e": torch.zeros(0, 7),
        "raw": b"\x00\x01",
        "meta": {"k": [1, 2.5, "x", None]},
    }
    out = wire.decode(wire.encode(msg))
    for k in "abcde":
        assert out[k].dtype == msg[k].dtype and torch.equal(out[k], msg[k])
    assert out["raw"] == b"\x00\x01" and out["meta"] == msg["meta"]


def test_decoded_tensors_share_nothing_with_the_sender() -> None:
    t = torch.zeros(4)
    out = wire.decode(wire.encode({"t": t}))
    out["t"] += 1
    assert torch.equal(t, torch.zeros(4))


def test_no_pickle_in_the_format() -> None:
    data = wire.encode({"t": torch.ones(2)})
    assert data[:4] == wire.MAGIC and b"\x80\x04" not in data[:16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.complex64])
def test_dtypes_outside_the_schema_refused(dtype) -> None:
    with pytest.raises(DTypeError):
        wire.encode({"t": torch.zeros(2, dtype=dtype)})


def test_objects_refused() -> None:
    with pytest.raises(WireError, match="cannot travel"):
        wire.encode({"m": torch.nn.Linear(2, 2)})
    with pytest.raises(WireError):
        wire.encode({"x": float("nan")})


def _forge(fields: list, payload: bytes = b"", inline: object = None) -> bytes:
    header = json.dumps({"fields": fields, "inline": inline or {}}).encode()
    return struct.pack("<4sBI", b"SSPL", 1, len(header)) + header + payload


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "too short"),
        (b"XXXX\x01\x00\x00\x00\x00", "magic"),
        (struct.pack("<4sBI", b"SSPL", 9, 0), "version"),
        (struct.pack("<4sBI", b"SSPL", 1, 999), "header length"),
        (struct.pack("<4sBI", b"SSPL", 1, 3) + b"{{{", "JSON"),
        (_forge([{"name": "t", "kind": "tensor", "dtype": "float32", "shape": [4],
                  "offset": 0, "nbytes": 16}], b"\x00" * 8), "payload"),
        (_forge([{"name": "t", "kind": "tensor", "dtype": "float32", "shape": [3],
                  "offset": 0, "nbytes": 16}], b"\x00" * 16), "needs 12 bytes"),
        (_forge([{"name": "t", "kind": "tensor", "dtype": "float32", "shape": [-1],
                  "offset": 0, "nbytes": 0}]), "invalid shape"),
        (_forge([{"name": "t", "kind": "pickle", "offset": 0, "nbytes": 0}]), "unknown kind"),
        (_forge([{"name": "t", "kind": "bytes", "offset": -5, "nbytes": 1}]), "invalid offset"),
    ],
)
def test_malformed_messages_refused(data: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        wire.decode(data)


def test_unknown_dtype_refused() -> None:
    bad = _forge([{"name": "t", "kind": "tensor", "dtype": "object", "shape": [1],
                   "offset": 0, "nbytes": 8}], b"\x00" * 8)
    with pytest.raises(DTypeError):
        wire.decode(bad)


def test_size_limit_checked_before_parsing() -> None:
    with pytest.raises(PayloadTooLargeError, match="exceeds the limit of 100 bytes"):
        wire.decode(wire.encode({"t": torch.zeros(100)}), max_bytes=100)
