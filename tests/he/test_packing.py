"""Layouts and the one-level encrypted matmul against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from he_layers import KeyOwner, LayerSpec, ServerContext, choose_layout
from he_layers._seal_io import to_bytes
from he_layers.packing import Layout, galois_element

pytestmark = pytest.mark.he


def test_choose_layout_is_packed_for_small_batches_and_per_feature_for_huge() -> None:
    small = choose_layout(64, 512, 128, 8192)
    assert small.kind == "packed" and small.features * small.lanes == 4096
    huge = choose_layout(20_000, 27, 16, 8192)
    assert huge.kind == "per_feature" and huge.rotation_steps() == []


@pytest.mark.parametrize("shape", [(5, 7, 3), (64, 300, 20), (33, 9, 70), (3000, 6, 5)])
def test_pack_unpack_roundtrip(shape: tuple[int, int, int]) -> None:
    lay = choose_layout(*shape, 8192)
    m = np.random.default_rng(0).standard_normal(shape[:2])
    assert np.array_equal(lay.unpack_input(lay.pack_input(m)), m)
    y = np.random.default_rng(1).standard_normal((shape[0], shape[2]))
    assert np.array_equal(lay.unpack_output(lay.pack_output(y)), y)


def test_galois_element_is_power_of_three() -> None:
    assert galois_element(1, 8192) == 3
    assert galois_element(64, 8192) == pow(3, 64, 16384)


def _encrypted_matmul(m: np.ndarray, p: np.ndarray, layout: Layout | None = None) -> np.ndarray:
    rows, cols = m.shape
    owner = KeyOwner(LayerSpec(rows, cols, p.shape[1]))
    server = ServerContext.from_bytes(owner.public_context_bytes())
    lay = layout or owner.layouts["forward"]
    cts = server.load_inputs(owner.encrypt_matrix(m, lay), lay, "m")
    out = server.evaluator.matmul(cts, p, lay)
    return owner.decrypt_matrix([to_bytes(c) for c in out], lay, "out")


@pytest.mark.parametrize(
    "shape",
    [(4, 3, 2), (16, 40, 12), (64, 300, 20), (8, 1100, 3), (50, 64, 130)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_encrypted_matmul_matches_numpy(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    m = rng.standard_normal(shape[:2])
    p = rng.uniform(-0.2, 0.2, shape[1:])
    got = _encrypted_matmul(m, p)
    want = m @ p
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_several_input_ciphertexts_are_summed() -> None:
    """d_in larger than the features per ciphertext: partial products are summed."""
    owner_layout = choose_layout(64, 300, 20, 8192)
    assert owner_layout.col_chunks > 1
    rng = np.random.default_rng(3)
    m, p = rng.standard_normal((64, 300)), rng.uniform(-0.2, 0.2, (300, 20))
    got = _encrypted_matmul(m, p)
    assert np.abs(got - m @ p).max() / np.abs(m @ p).max() < 1e-5


def test_per_feature_layout_matches_numpy() -> None:
    rng = np.random.default_rng(4)
    m, p = rng.standard_normal((40, 5)), rng.uniform(-0.5, 0.5, (5, 3))
    lay = Layout(rows=40, cols=5, out_cols=3, slots=4096, lanes=20, features=1, baby=1,
                 period=1, width=1)
    got = _encrypted_matmul(m, p, lay)
    assert np.abs(got - m @ p).max() / np.abs(m @ p).max() < 1e-5


def test_zero_weights_give_zero_without_transparent_ciphertexts() -> None:
    rng = np.random.default_rng(5)
    m = rng.standard_normal((8, 6))
    p = np.zeros((6, 4))
    p[:, 1] = 0.5  # one non-zero column, whole other blocks zero
    got = _encrypted_matmul(m, p)
    assert np.abs(got - m @ p).max() < 1e-6
    assert np.abs(_encrypted_matmul(m, np.zeros((6, 4)))).max() < 1e-6


@pytest.mark.parametrize("shape", [(128, 32, 64), (40, 9, 70)], ids=lambda s: "x".join(map(str, s)))
def test_client_rotated_copies_match_numpy(shape: tuple[int, int, int]) -> None:
    """``client_baby``: the data owner encrypts the baby-step rotations; fewer server
    rotations than the all-server minimum, same product."""
    lay = choose_layout(*shape, 8192, client_baby=True)
    assert lay.baby > 1 and lay.n_inputs == lay.row_chunks * lay.col_chunks * lay.baby
    assert lay.keyswitches() < lay.min_keyswitches()
    rng = np.random.default_rng(6)
    m, p = rng.standard_normal(shape[:2]), rng.uniform(-0.2, 0.2, shape[1:])
    assert np.array_equal(lay.unpack_input(lay.pack_input(m)), m)
    got = _encrypted_matmul(m, p, lay)
    assert np.abs(got - m @ p).max() / np.abs(m @ p).max() < 1e-6
