"""Every slot the data owner decrypts for the model owner carries a fresh mask.

The data owner decrypts the masked output Enc(xW + b + R1) and the masked weight gradient
Enc(x^T delta + R2) (level B also Enc(delta A^T) + W delta^T, whose partial sums carry
zero-sum masks). A slot holding an unmasked value would hand the data owner a plaintext
value of the model owner (or, with rotate-and-sum layouts, partial sums of it). The first
test runs the same plaintext computation through two model-owner servers that differ only in
their mask seed and decrypts *all* slots of every ciphertext (real and imaginary parts). Each
slot must carry a fresh mask: the two decryptions differ by far more than CKKS noise
(|R_1 - R_2| < 1e-3 has probability ~2.4e-7 per slot for masks uniform in +-2^12, and the
seeds are fixed).

Padding is no exception. A slot no output value uses is not "empty": the product multiplies
whatever the data owner's input holds there (its own encryption noise, which it can compute
with its secret key, or values it wrote there on purpose) by the model owner's weights. In
the one-column-per-ciphertext layout (F == 1) the slots past the L used ones decrypted, before
every slot was masked, to sum_k W[k, j] * u_k, and a data owner that wrote known values into
its input's unused slots read W exactly after one forward. Level B's padded rows (and
columns) of the input-gradient product got only zero-sum masks (none with one partial sum),
so their folded totals came back unmasked and probes written there gave delta. The tests
below decrypt what the data owner receives with its own secret key and run both attacks.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from he_layers import ConvAsLinear, HEClient, HEServer, KeyOwner, LayerSpec, ServerContext
from he_layers.packing import Layout
from he_layers.wire import decode_frame, encode_frame

pytestmark = pytest.mark.he


def _slots(client: HEClient, blobs: list[bytes]) -> np.ndarray:
    """All slots of every ciphertext, real and imaginary parts, as one vector."""
    from tenseal import sealapi

    from he_layers._seal_io import load_ciphertext

    owner = client.keys
    out = []
    for blob in blobs:
        pt = sealapi.Plaintext()
        owner._decryptor.decrypt(load_ciphertext(owner._seal, blob), pt)
        values = np.asarray(owner._encoder.decode_complex(pt))
        out += [values.real, values.imag]
    return np.concatenate(out)


def _classify(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slots with a fresh mask, slots holding an unmasked non-zero value)."""
    masked = np.abs(first - second) > 1e-3
    empty = (np.abs(first) < 1e-6) & (np.abs(second) < 1e-6)
    return masked, ~masked & ~empty


def _two_runs(kit: SimpleNamespace, level: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decrypted slots of the masked output and masked weight gradient of the same step,
    under two servers whose masks differ; plus the mask-free gradient layout size."""
    client, server, linear = kit.make_parties(16, 40, 12, level=level, lr=0.1, seed=0)
    other = HEServer.from_linear(server.context, linear, seed=99)
    x = torch.randn(16, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    delta = torch.randn(16, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    n_g = client.keys.layouts["grad"].n_outputs
    runs: dict[str, list[np.ndarray]] = {"output": [], "grad": []}
    for srv in (server, other):
        c = HEClient(client.keys, seed=5)  # same keys and plaintexts; its own encryption
        reply = srv.forward(c.encrypt_input(x))
        _, blobs = decode_frame(reply, "masked_output")
        runs["output"].append(_slots(c, blobs))
        srv.receive_output(c.decrypt_output(reply))
        _, blobs = decode_frame(srv.backward(delta), "masked_grad")
        runs["grad"].append(_slots(c, blobs[:n_g]))  # the rest is dL/dx, for the data owner
    return {k: (v[0], v[1]) for k, v in runs.items()}


@pytest.mark.parametrize("level", ["A", "B"])
def test_every_decrypted_slot_is_masked(kit: SimpleNamespace, level: str) -> None:
    values = {"output": 16 * 12, "grad": 40 * 12}  # values the layouts must carry at least
    for what, (first, second) in _two_runs(kit, level).items():
        diff = np.abs(first - second)
        masked, leaky = _classify(first, second)
        assert not leaky.any(), (f"{what}: {int(leaky.sum())} of {diff.size} slots hold an "
                                 f"unmasked value, e.g. {first[leaky][:4]}")
        assert int(masked.sum()) >= values[what], what
        assert masked.all(), f"{what}: {int((~masked).sum())} slots carry no fresh mask"
        # masks are uniform in +-2^12: their differences spread over +-2^13
        assert diff[masked].max() > 4096 and np.median(diff[masked]) > 500, what


def test_the_check_sees_unmasked_values(kit: SimpleNamespace) -> None:
    """Control: two servers with the SAME mask seed, i.e. no fresh mask anywhere. The check
    above flags every output slot as holding an unmasked value."""
    client, server, linear = kit.make_parties(16, 40, 12, seed=0)
    twin = HEServer.from_linear(server.context, linear, seed=2)  # make_parties uses seed + 2
    x = torch.randn(16, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    slots = []
    for srv in (server, twin):
        c = HEClient(client.keys, seed=5)
        _, blobs = decode_frame(srv.forward(c.encrypt_input(x, need_grad=False)),
                                "masked_output")
        slots.append(_slots(c, blobs))
    masked, leaky = _classify(slots[0], slots[1])
    assert not masked.any() and int(leaky.sum()) >= 16 * 12


# -- padding slots: what a data owner reads with its own secret key ----------------------------
def _decrypt_all(keys: KeyOwner, blobs: list[bytes]) -> np.ndarray:
    """(ciphertexts, N/2) complex: every slot of every ciphertext, under the DO's secret key."""
    from tenseal import sealapi

    from he_layers._seal_io import load_ciphertext

    vecs = []
    for blob in blobs:
        pt = sealapi.Plaintext()
        keys._decryptor.decrypt(load_ciphertext(keys._seal, blob), pt)
        vecs.append(np.asarray(keys._encoder.decode_complex(pt)))
    return np.stack(vecs)


def _value_parts(lay: Layout) -> np.ndarray:
    """(n_outputs, N/2, 2) bool: which (slot, real/imaginary part) holds a partial sum of a
    real output value (row < R, column < D). Worked out here from the packing rule in
    :mod:`he_layers.packing`, not taken from the code under test."""
    n, lanes, p, w = lay.n_outputs, lay.lanes, lay.period, lay.width
    s = np.arange(lay.slots)
    f, b = s // lanes, s % lanes
    col_in_chunk = (f // p) * w + f % w
    ct = np.arange(n)[:, None]
    col = (ct % lay.out_chunks) * lay.out_width + col_in_chunk[None, :]
    base = (ct // lay.out_chunks) * 2 * lanes + b[None, :]
    inside = (s < lay.features * lanes)[None, :] & (col < lay.out_cols)
    return np.stack([inside & (base < lay.rows), inside & (base + lanes < lay.rows)], axis=-1)


def _padding_report(lay: Layout, vecs: np.ndarray) -> tuple[int, int, float]:
    """(padding slot parts with |v| < 1e-3, padded folded values with |v| < 1e-3, median
    |v| of the padding slot parts). Masks are uniform in +-2^12: a masked part or folded
    total below 1e-3 has probability ~2.4e-7; an unmasked one holds CKKS noise (~1e-7) or,
    for zero-sum masks, the fold cancels them."""
    parts = np.stack([vecs.real, vecs.imag], axis=-1)
    pad = np.abs(parts[~_value_parts(lay)])
    full = dataclasses.replace(lay, rows=lay.row_chunks * 2 * lay.lanes,
                               out_cols=lay.out_chunks * lay.out_width).fold(vecs)
    folded = np.concatenate([full[lay.rows:].ravel(), full[:lay.rows, lay.out_cols:].ravel()])
    return int((pad < 1e-3).sum()), int((np.abs(folded) < 1e-3).sum()), float(np.median(pad))


def _conv_parties() -> tuple[KeyOwner, HEClient, HEServer, Layout]:
    """Conv2d(1, 6, 5) on 28x28, batch 8: the forward product uses the F == 1 layout with
    L = 2304 of the 4096 slots (1792 padding slots per ciphertext)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 6, 5).double()
    geo = ConvAsLinear.from_module(conv)
    spatial = (28, 28)
    out = geo.output_spatial(spatial)
    keys = KeyOwner(LayerSpec(8, math.prod(spatial), 6 * math.prod(out),
                              conv=geo.to_dict(spatial)))
    server = HEServer.from_linear(ServerContext.from_bytes(keys.public_context_bytes()), conv,
                                  seed=3)
    lay = keys.layouts["forward"]
    assert lay.features == 1 and lay.features * lay.lanes < lay.slots
    return keys, HEClient(keys, seed=4), server, lay


def test_one_column_per_ciphertext_layout_masks_its_unused_slots() -> None:
    keys, client, server, lay = _conv_parties()
    x = torch.rand(8, 784, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, blobs = decode_frame(server.forward(client.encrypt_input(x, need_grad=False)),
                            "masked_output")
    vecs = _decrypt_all(keys, blobs)
    unused = vecs[:, lay.features * lay.lanes:]
    assert unused.size == lay.n_outputs * (lay.slots - lay.lanes)
    small = int((np.abs(np.stack([unused.real, unused.imag])) < 1e-3).sum())
    assert small == 0, f"{small} parts of the unused slots decrypt to ~0: unmasked"
    assert _padding_report(lay, vecs)[:2] == (0, 0)
    assert np.median(np.abs(unused.real)) > 500 and np.abs(unused.real).max() > 3000


def test_probes_in_the_unused_input_slots_do_not_give_w() -> None:
    """The reviewer's active attack: the data owner writes known values into the unused slots
    of its own Enc(x) (the server cannot tell) and solves for W from one forward's unused
    output slots. Without masks there this recovered W to ~1e-10; now it gives noise."""
    from tenseal import sealapi

    from he_layers._seal_io import to_bytes

    keys, client, server, lay = _conv_parties()
    x = torch.rand(8, 784, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    head, up = decode_frame(client.encrypt_input(x, need_grad=False), "enc_input")
    used = lay.features * lay.lanes
    probe = np.random.default_rng(0).uniform(-1, 1, (lay.n_inputs, lay.slots - used))
    forged = []
    for k, vals in enumerate(_decrypt_all(keys, up)):
        vals[used:] = probe[k]
        pt = sealapi.Plaintext()
        keys._encoder.encode(vals.tolist(), keys._in_parms, keys.params.scale, pt)
        forged.append(to_bytes(keys._encryptor.encrypt_symmetric(pt)))
    head = {k: v for k, v in head.items() if k not in ("kind", "blob_sizes")}
    _, down = decode_frame(server.forward(encode_frame("enc_input", head, forged)),
                           "masked_output")
    out = _decrypt_all(keys, down)[:, used:].real
    w = server._w
    w_est = np.stack([np.linalg.lstsq(probe.T, out[j], rcond=None)[0]
                      for j in range(w.shape[1])], axis=1)
    corr = float(np.corrcoef(w_est.ravel(), w.ravel())[0, 1])
    assert abs(corr) < 0.4, f"W recovered from the unused slots (corr {corr:.3f})"
    assert np.abs(w_est - w).max() > 100 * np.abs(w).max()


LEVEL_B_SHAPES = [(4, 368, 5), (8, 40, 1)]  # 4 partial sums, 144 padded rows; 1, 24 (+ cols)


@pytest.mark.parametrize("shape", LEVEL_B_SHAPES, ids=["partials4", "partials1"])
def test_level_b_input_gradient_masks_padded_rows(
        kit: SimpleNamespace, shape: tuple[int, int, int]) -> None:
    batch, d_in, d_out = shape
    client, server, _ = kit.make_parties(batch, d_in, d_out, level="B", lr=0.1, seed=0)
    lay = client.keys.layouts["input_grad"]
    assert lay.row_chunks * 2 * lay.lanes > lay.rows  # the shape has padded rows
    x = torch.randn(batch, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    server.receive_output(client.decrypt_output(server.forward(client.encrypt_input(x))))
    delta = torch.randn(batch, d_out, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(2))
    _, blobs = decode_frame(server.backward(delta), "masked_grad")
    vecs = _decrypt_all(client.keys, blobs[client.keys.layouts["grad"].n_outputs:])
    slots_small, folded_small, median = _padding_report(lay, vecs)
    assert (slots_small, folded_small) == (0, 0), (
        f"{slots_small} padding slot parts and {folded_small} padded folded values unmasked")
    assert median > 500


@pytest.mark.parametrize("shape", LEVEL_B_SHAPES, ids=["partials4", "partials1"])
def test_probes_in_padded_rows_of_the_share_do_not_give_delta(
        kit: SimpleNamespace, shape: tuple[int, int, int]) -> None:
    """The reviewer's level B attack: the data owner encrypts probe values in the padded rows
    of its share A; the folded padded rows of Enc(delta A^T) used to come back unmasked
    (probe @ delta^T), giving delta and so dW = x^T delta."""
    batch, d_in, d_out = shape
    client, server, _ = kit.make_parties(batch, d_in, d_out, level="B", lr=0.1, seed=0)
    keys = client.keys
    lay = keys.layouts["input_grad"]
    big = dataclasses.replace(lay, rows=lay.row_chunks * 2 * lay.lanes)
    probe = np.random.default_rng(0).uniform(-1, 1, (big.rows - lay.rows, d_out))
    x = torch.randn(batch, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    head, blobs = decode_frame(client.encrypt_input(x), "enc_input")
    forged_a = keys.encrypt_matrix(np.vstack([client._share, probe]), big)
    head = {k: v for k, v in head.items() if k not in ("kind", "blob_sizes")}
    msg = encode_frame("enc_input", head, blobs[: -head["n_a"]] + forged_a)
    server.receive_output(client.decrypt_output(server.forward(msg)))
    delta = torch.randn(batch, d_out, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(2))
    _, gblobs = decode_frame(server.backward(delta), "masked_grad")
    full = big.fold(_decrypt_all(keys, gblobs[keys.layouts["grad"].n_outputs:]))
    est = np.linalg.lstsq(probe, full[lay.rows:], rcond=None)[0].T
    d = delta.numpy()
    corr = float(np.corrcoef(est.ravel(), d.ravel())[0, 1])
    assert abs(corr) < 0.5, f"delta recovered from the padded rows (corr {corr:.3f})"
    assert np.abs(est - d).max() > 100 * np.abs(d).max()
