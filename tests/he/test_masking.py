"""Every slot the data owner decrypts for the model owner is masked or holds nothing.

The data owner decrypts the masked output Enc(xW + b + R1) and the masked weight gradient
Enc(x^T delta + R2). A slot holding an unmasked value would hand the data owner a plaintext
value of the model owner (or, with rotate-and-sum layouts, partial sums of it). The test runs
the same plaintext computation through two model-owner servers that differ only in their mask
seed and decrypts *all* slots of every ciphertext (real and imaginary parts). Each slot must
either carry a fresh mask (the two decryptions differ by far more than CKKS noise:
|R_1 - R_2| < 1e-3 has probability ~2.4e-7 per slot for masks uniform in +-2^12, and the seeds
are fixed) or be layout padding that decrypts to zero within CKKS noise in both runs. No slot
may hold an unmasked non-zero value.

Measured here: the padding slots (weights padded to a power-of-two width, unused lanes) are
left unmasked; they decrypt to ~1e-8, i.e. they expose only CKKS noise (he_layers gives no
circuit privacy; masking every slot would hide that too).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from he_layers import HEClient, HEServer
from he_layers.wire import decode_frame

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
def test_every_decrypted_slot_is_masked_or_empty(kit: SimpleNamespace, level: str) -> None:
    values = {"output": 16 * 12, "grad": 40 * 12}  # values the layouts must carry at least
    for what, (first, second) in _two_runs(kit, level).items():
        diff = np.abs(first - second)
        masked, leaky = _classify(first, second)
        assert not leaky.any(), (f"{what}: {int(leaky.sum())} of {diff.size} slots hold an "
                                 f"unmasked value, e.g. {first[leaky][:4]}")
        assert int(masked.sum()) >= values[what], what
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
