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


# --- the fields tile the payload: no byte is decoded twice, none is left over -------------

def _bytes_field(name: str, offset: int, nbytes: int) -> dict:
    return {"name": name, "kind": "bytes", "offset": offset, "nbytes": nbytes}


def test_encode_lays_fields_back_to_back_and_fills_the_payload() -> None:
    data = wire.encode({"a": torch.ones(3), "op": "x", "b": b"xyz", "c": torch.zeros(0, 4),
                        "d": torch.arange(2, dtype=torch.int16)})
    (n,) = struct.unpack_from("<I", data, 5)
    fields = json.loads(data[9:9 + n])["fields"]
    pos = 0
    for f in fields:
        assert f["offset"] == pos
        pos += f["nbytes"]
    assert pos == len(data) - 9 - n


@pytest.mark.parametrize(
    "fields, payload",
    [
        # the reviewer's amplification: many fields naming the same bytes
        ([_bytes_field(f"f{i}", 0, 1024) for i in range(50)], b"\x00" * 1024),
        # a second field overlapping the first
        ([_bytes_field("a", 0, 4), _bytes_field("b", 2, 4)], b"\x00" * 6),
        # fields in the payload, but listed out of order
        ([_bytes_field("a", 4, 4), _bytes_field("b", 0, 4)], b"\x00" * 8),
    ],
    ids=["same-bytes", "overlap", "out-of-order"],
)
def test_overlapping_or_reused_byte_ranges_refused(fields: list, payload: bytes) -> None:
    with pytest.raises(WireError, match="back to back"):
        wire.decode(_forge(fields, payload))


def test_a_gap_between_fields_is_refused() -> None:
    data = _forge([_bytes_field("a", 0, 4), _bytes_field("b", 6, 2)], b"\x00" * 8)
    with pytest.raises(WireError, match="back to back"):
        wire.decode(data)


@pytest.mark.parametrize("fields", [[], [_bytes_field("a", 0, 4)]], ids=["no-fields", "one"])
def test_trailing_payload_bytes_are_refused(fields: list) -> None:
    with pytest.raises(WireError, match="trailing bytes"):
        wire.decode(_forge(fields, b"\x00" * 4 + b"extra"))


def test_the_host_refuses_the_amplifying_request_before_anything_runs() -> None:
    from syft_split import DataOwnerHost

    fields = [_bytes_field(f"f{i}", 0, 1024) for i in range(50)]
    data = _forge(fields, b"\x00" * 1024, inline={"op": "describe"})
    out = wire.decode(DataOwnerHost("a").handle("intruder@example.org", data))
    assert out["error"] == "WireError" and "back to back" in out["message"]


def test_too_many_fields_refused_on_both_ends() -> None:
    fields = [_bytes_field(f"{i:x}", 0, 0) for i in range(wire.MAX_FIELDS + 1)]
    with pytest.raises(WireError, match=f"at most {wire.MAX_FIELDS}"):
        wire.decode(_forge(fields))
    with pytest.raises(WireError, match=f"at most {wire.MAX_FIELDS}"):
        wire.encode({f"{i:x}": b"" for i in range(wire.MAX_FIELDS + 1)})


def test_a_header_decode_would_refuse_is_not_encoded() -> None:
    big = {"note": "x" * (1 << 20)}  # inline JSON past the 1 MiB header limit
    with pytest.raises(WireError, match="header of"):
        wire.encode(big)
    names = {f"{i:0>60}": b"" for i in range(wire.MAX_FIELDS)}  # many fields, long names
    with pytest.raises(WireError, match="header of"):
        wire.encode(names)


def test_honest_messages_with_many_and_empty_fields_round_trip() -> None:
    msg: dict = {f"t{i}": torch.full((i % 3, 2), float(i)) for i in range(300)}
    msg.update({"empty": b"", "blob": b"\x01" * 7, "scalar": torch.tensor(2.5),
                "meta": {"x": [1.5, -2e300, None], "n": 10**30}, "nested": [[[[1]]]]})
    data = wire.encode(msg)
    out = wire.decode(data, max_bytes=len(data))
    assert out.keys() == msg.keys()
    for k, v in msg.items():
        if isinstance(v, torch.Tensor):
            assert out[k].dtype == v.dtype and torch.equal(out[k], v)
        else:
            assert out[k] == v
    empty_only = wire.decode(wire.encode({"x": torch.zeros(0, 784), "op": "f"}))
    assert empty_only["x"].shape == (0, 784)


# --- a strict header: anything encode would not write is a WireError ----------------------

def _raw_header(header: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("<4sBI", b"SSPL", 1, len(header)) + header + payload


def _tensor_field(shape: list) -> dict:
    return {"name": "t", "kind": "tensor", "dtype": "float32", "shape": shape,
            "offset": 0, "nbytes": 0}


@pytest.mark.parametrize(
    "data, match",
    [
        (_raw_header(b'{"fields":[],"inline":{"w":NaN}}'), "non-finite constant NaN"),
        (_raw_header(b'{"fields":[],"inline":{"w":Infinity}}'), "non-finite constant Infinity"),
        (_raw_header(b'{"fields":[],"inline":{"w":[-Infinity]}}'), "non-finite constant"),
        (_raw_header(b'{"fields":[],"inline":{"w":1e400}}'), "not finite"),
        (_raw_header(b'{"fields":[],"inline":{"w":' + b"9" * 5000 + b"}}"), "not valid JSON"),
        (_raw_header(b'{"fields":[],"inline":{"w":' + b"[" * 200_000 + b"]" * 200_000 + b"}}"),
         "nested too deeply"),
        (_raw_header(b'{"fields":[],"inline":{"w":' + b"[" * 40 + b"]" * 40 + b"}}"),
         "nested too deeply"),
        (_raw_header(b'{"fields":[],"inline":{"op":"a","op":"b"}}'), "'op' twice"),
        (_forge([_tensor_field([2**62, 2**62, 0])]), "out of bounds"),
        (_forge([_tensor_field([2**70, 0])]), "out of bounds"),
        (_forge([_tensor_field([wire.DEFAULT_MAX_BYTES + 1, 0])]), "out of bounds"),
    ],
    ids=["nan", "inf", "-inf", "1e400", "5000-digits", "deep", "deeper-than-encode",
         "dup-key", "huge-empty-shape", "shape-past-int64", "dim-past-limit"],
)
def test_strict_header_refusals_are_wire_errors(data: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        wire.decode(data)
