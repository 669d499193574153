"""Public material only, and clear errors for bad bytes, wrong contexts, shapes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import tenseal as ts
import torch

from he_layers import HEServer, KeyOwner, LayerSpec, ServerContext
from he_layers.wire import decode_frame, encode_frame
from syft_split.errors import (
    CiphertextError,
    HEError,
    InsecureParametersError,
    ShapeError,
    SyftSplitError,
)

pytestmark = pytest.mark.he


@pytest.fixture(scope="module")
def owner() -> KeyOwner:
    return KeyOwner(LayerSpec(64, 128, 64))


def test_public_context_has_no_secret_key_and_is_small(owner: KeyOwner) -> None:
    data = owner.public_context_bytes()
    head, (ctx_bytes, _) = decode_frame(data, "public_context")
    ctx = ts.context_from(ctx_bytes)
    assert not ctx.is_private()
    server = ServerContext.from_bytes(data)
    assert not server.is_private()
    assert len(head["rotation_steps"]) <= 16
    assert len(data) < 6_000_000  # TenSEAL's default Galois key set alone is ~35 MB


def test_private_context_is_rejected(owner: KeyOwner) -> None:
    private = owner._ctx.serialize(save_secret_key=True)
    with pytest.raises(HEError, match="SECRET KEY"):
        ServerContext.from_bytes(private)
    head, blobs = decode_frame(owner.public_context_bytes(), "public_context")
    head = {k: v for k, v in head.items() if k not in ("kind", "blob_sizes")}
    forged = encode_frame("public_context", head, [private, blobs[1]])
    with pytest.raises(HEError, match="SECRET KEY"):
        ServerContext.from_bytes(forged)


def test_header_lying_about_params_is_rejected(owner: KeyOwner) -> None:
    head, blobs = decode_frame(owner.public_context_bytes(), "public_context")
    head = {k: v for k, v in head.items() if k not in ("kind", "blob_sizes")}
    head["params"] = {**head["params"], "coeff_mod_bit_sizes": [50, 40, 50]}
    with pytest.raises(InsecureParametersError, match="SEAL context has"):
        ServerContext.from_bytes(encode_frame("public_context", head, blobs))


def test_garbage_context_bytes() -> None:
    with pytest.raises(CiphertextError):
        ServerContext.from_bytes(b"not a context")


def test_bad_ciphertext_bytes_are_refused(kit: SimpleNamespace) -> None:
    client, server, _ = kit.make_parties(4, 3, 2)
    msg = client.encrypt_input(torch.randn(4, 3, dtype=torch.float64))
    head, blobs = decode_frame(msg, "enc_input")
    head = {k: v for k, v in head.items() if k not in ("kind", "blob_sizes")}
    # SEAL's header (magic, size) and the frame are checked; bytes flipped *inside* the
    # compressed coefficients can still decode to a valid ciphertext (~1% of trials measured:
    # then it is merely another ciphertext, which no check can tell from an honest one; the
    # authenticated transport, not the ciphertext, says who sent it)
    bad = bytearray(blobs[0])
    bad[:2] = b"\x00\x00"
    with pytest.raises(CiphertextError):
        server.forward(encode_frame("enc_input", head, [bytes(bad), *blobs[1:]]))
    with pytest.raises(CiphertextError):
        server.forward(encode_frame("enc_input", head, [blobs[0][: len(blobs[0]) // 2],
                                                        *blobs[1:]]))
    with pytest.raises(CiphertextError):
        server.forward(encode_frame("enc_input", head, [b"\x00" * 100, *blobs[1:]]))
    with pytest.raises(CiphertextError):
        server.forward(msg[:-10])
    with pytest.raises(CiphertextError, match="expected a 'enc_input' message"):
        server.forward(encode_frame("grad_return", head, blobs))


def test_ciphertext_from_another_key_owner_is_refused(kit: SimpleNamespace) -> None:
    client1, server1, _ = kit.make_parties(4, 3, 2)
    client2, _, _ = kit.make_parties(4, 3, 2)
    with pytest.raises(CiphertextError, match="another key owner"):
        server1.forward(client2.encrypt_input(torch.randn(4, 3, dtype=torch.float64)))
    reply = server1.forward(client1.encrypt_input(torch.randn(4, 3, dtype=torch.float64)))
    with pytest.raises(CiphertextError, match="another key owner"):
        client2.decrypt_output(reply)


def test_mismatched_shapes_are_refused(kit: SimpleNamespace) -> None:
    client, server, _ = kit.make_parties(4, 3, 2)
    with pytest.raises(ShapeError, match=r"expected shape \(rows <= 4, 3\)"):
        client.encrypt_input(torch.randn(4, 5))
    with pytest.raises(ShapeError, match="at most batch_size=4"):
        client.encrypt_input(torch.randn(6, 3))
    with pytest.raises(ShapeError, match=r"expected shape \(2, 3\)"):
        HEServer(server.context, torch.zeros(3, 2))
    kit.forward(client, server, torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ShapeError, match=r"expected shape \(4, 2\)"):
        server.backward(torch.zeros(4, 3))


def test_returned_array_with_wrong_shape_is_refused(kit: SimpleNamespace) -> None:
    client, server, _ = kit.make_parties(4, 3, 2)
    reply = server.forward(client.encrypt_input(torch.randn(4, 3, dtype=torch.float64)))
    ret = client.decrypt_output(reply)
    head, blobs = decode_frame(ret, "output_return")
    head = {k: v for k, v in head.items() if k not in ("kind", "blob_sizes")}
    with pytest.raises(ShapeError):
        server.receive_output(encode_frame("output_return", head, [blobs[0][:-8]]))


def test_server_never_receives_plaintext_inputs_or_weights(kit: SimpleNamespace) -> None:
    """Level B: no message to the server contains x, and no message to the client W_s."""
    client, server, _ = kit.make_parties(4, 3, 2, level="B", lr=0.1)
    x = torch.randn(4, 3, dtype=torch.float64)
    up = client.encrypt_input(x)
    down = server.forward(up)
    for row in x.numpy():
        assert row.astype("<f8").tobytes() not in up
    for col in server.weight.numpy():
        assert col.astype("<f8").tobytes() not in down
    ret = client.decrypt_output(down)
    z = server.receive_output(ret)
    grad = server.backward(torch.ones_like(z))
    ret2, _ = client.decrypt_gradients(grad)
    w = np.ascontiguousarray(server.weight.numpy().T)
    assert w.astype("<f8").tobytes() not in grad and w.tobytes() not in ret2


def test_every_error_is_a_syft_split_error() -> None:
    for cls in (CiphertextError, InsecureParametersError, ShapeError, HEError):
        assert issubclass(cls, SyftSplitError)


def _all_slots(client, blobs: list[bytes]) -> np.ndarray:
    from tenseal import sealapi

    from he_layers._seal_io import load_ciphertext

    owner, pt, out = client.keys, sealapi.Plaintext(), []
    for blob in blobs:
        owner._decryptor.decrypt(load_ciphertext(owner._seal, blob), pt)
        out.append(np.asarray(owner._encoder.decode_complex(pt)))
    return np.stack(out)


@pytest.mark.parametrize("shape", [(16, 40, 12), (8, 1100, 3)],
                         ids=["replicated", "partial-sums"])
def test_every_slot_the_data_owner_decrypts_is_masked(shape, kit: SimpleNamespace) -> None:
    """Every slot holds a partial sum the data owner folds after decrypting; each carries a
    mask of its own. Two servers with different masks on the same x and W: every slot that
    is not a structural zero changes, i.e. no unmasked partial product is ever decrypted."""
    client, server, linear = kit.make_parties(*shape)
    other = HEServer.from_linear(server.context, linear, seed=99)
    x = torch.randn(shape[0], shape[1], dtype=torch.float64)
    slots = []
    for srv in (server, other):
        reply = srv.forward(client.encrypt_input(x))
        srv.receive_output(client.decrypt_output(reply))
        grad = srv.backward(torch.ones(shape[0], shape[2], dtype=torch.float64))
        client.decrypt_gradients(grad)
        _, fwd_blobs = decode_frame(reply, "masked_output")
        _, grad_blobs = decode_frame(grad, "masked_grad")
        slots.append(np.concatenate([_all_slots(client, fwd_blobs),
                                     _all_slots(client, grad_blobs[:-1])]))
    a, b = slots
    zero = (np.abs(a) < 1e-6) & (np.abs(b) < 1e-6)
    assert (np.abs(a - b)[~zero] > 1e-3).all()
    assert np.abs(a[~zero]).max() > 1000  # masks are uniform in ±2^12, x W is O(1)
    lay = client.keys.layouts["forward"]
    assert lay.partials > 1  # folded by the data owner: several masked slots per value


def _frame(header: bytes, blobs: bytes = b"") -> bytes:
    import struct

    return b"HEL1" + struct.pack("<I", len(header)) + header + blobs


@pytest.mark.parametrize(
    "data, match",
    [
        (_frame(b'{"kind":"enc_input","blob_sizes":[],"n":' + b"9" * 5000 + b"}"), "not JSON"),
        (_frame(b'{"kind":"enc_input","blob_sizes":[],"n":' + b"[" * 200_000 + b"]" * 200_000
                + b"}"), "nested too deeply"),
        (_frame(b'{"kind":"enc_input","blob_sizes":[true]}', b"x"), "blob sizes"),
        (_frame(b'{"kind":"enc_input","blob_sizes":[1,1]}', b"xyz"), "blob sizes"),
    ],
    ids=["5000-digits", "deep", "bool-size", "trailing-bytes"],
)
def test_malformed_frame_headers_are_ciphertext_errors(data: bytes, match: str) -> None:
    with pytest.raises(CiphertextError, match=match):
        decode_frame(data, "enc_input")
