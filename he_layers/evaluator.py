"""Server-side ``Enc(M) @ P + Y`` on SEAL ciphertexts (``tenseal.sealapi``), with op counts.

Every product spends exactly ONE multiplicative level: weights are encoded at scale ``q1``
(the prime the single rescale drops), so the output keeps the input's scale. Giant-step
rotations act on the products *before* the rescale (scale Delta*q1), where the
key-switching noise is negligible; baby-step rotations act on the fresh inputs. There are no
fold rotations: the data owner adds the partial sums after decrypting.
See :mod:`he_layers.packing` for the layouts.

The encoded diagonals of the last plain matrix of each (layout, output chunk) are kept:
a product with an unchanged matrix (evaluation batches, whose weights do not move) encodes
nothing. The matrix is compared by a 128-bit BLAKE2b digest of its bytes.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from syft_split.errors import CiphertextError, ShapeError

from .packing import Layout

__all__ = ["MatmulEvaluator"]


class MatmulEvaluator:
    """``Enc(M) @ P`` and ``+ Y`` for ciphertexts in a :class:`Layout`.

    Args:
        seal_context: the ``seal::SEALContext`` of the run.
        galois_keys: Galois keys holding (at least) the layouts' rotation steps.

    ``counts`` accumulates the homomorphic operations done (``rotations`` = key switches,
    ``multiplications`` (ciphertext x plaintext), ``encodes``, ``rescales``, ``additions``).
    """

    def __init__(self, seal_context: Any, galois_keys: Any) -> None:
        from tenseal import sealapi

        self._s = sealapi
        self.context = seal_context
        self.galois_keys = galois_keys
        self.encoder = sealapi.CKKSEncoder(seal_context)
        self.evaluator = sealapi.Evaluator(seal_context)
        top = seal_context.first_context_data()
        while top.chain_index() > 1:
            top = top.next_context_data()
        self.input_parms_id = top.parms_id()
        self.output_parms_id = top.next_context_data().parms_id()
        self.rescale_prime = float(top.parms().coeff_modulus()[-1].value())
        self.counts: Counter[str] = Counter()
        self._index: dict[Layout, tuple[np.ndarray, np.ndarray]] = {}
        #: per (layout, output chunk): the plain block's digest and its encoded diagonals
        self._plains: dict[tuple[Layout, int], tuple[bytes, dict[tuple[int, int, int], Any]]] = {}

    def _ct(self) -> Any:
        return self._s.Ciphertext()

    def _rotate(self, ct: Any, step: int) -> Any:
        out = self._ct()
        self.evaluator.rotate_vector(ct, step, self.galois_keys, out)
        self.counts["rotations"] += 1
        return out

    def _encode(self, vec: np.ndarray, layout: Layout) -> Any:
        pt = self._s.Plaintext()
        if layout.features == 1:
            self.encoder.encode(float(vec[0]), self.input_parms_id, self.rescale_prime, pt)
        else:
            full = np.repeat(vec, layout.lanes)
            self.encoder.encode(full.tolist(), self.input_parms_id, self.rescale_prime, pt)
        self.counts["encodes"] += 1
        return pt

    def _near_zero(self, ct: Any) -> Any:
        """An encryption of ~0 (ct / q1, before rescale) when a whole output block is zero."""
        pt = self._s.Plaintext()
        self.encoder.encode(1.0 / self.rescale_prime, self.input_parms_id, self.rescale_prime, pt)
        out = self._ct()
        self.evaluator.multiply_plain(ct, pt, out)
        return out

    def _diagonals(self, layout: Layout, block: np.ndarray) -> np.ndarray:
        """The w rotated diagonals (w x F) of one (p x r*w) block of the plain matrix."""
        if layout not in self._index:
            self._index[layout] = layout.diagonal_index()
        rows_idx, cols_idx = self._index[layout]
        return block[rows_idx, cols_idx]

    def matmul(self, cts: list[Any], p: np.ndarray, layout: Layout, *,
               rescale: bool = True, chunks: Sequence[int] | None = None) -> list[Any]:
        """``Enc(M) @ p`` for input ciphertexts in ``layout``; one level, output at level 0.

        ``rescale=False`` keeps the output at the input's level with scale Delta*q1: twice
        the bytes, but no rescale rounding (absolute error ~1e-10 instead of ~1e-8).
        ``chunks``: compute only these output chunks (the others stay None in the returned
        list, index ``r * out_chunks + j``); :mod:`he_layers.workers` splits a product so.
        """
        if len(cts) != layout.n_inputs:
            raise CiphertextError(
                f"expected {layout.n_inputs} input ciphertexts, got {len(cts)}"
            )
        p = np.asarray(p, dtype=np.float64)
        if p.shape != (layout.cols, layout.out_cols):
            raise ShapeError(
                f"plain matrix: expected shape {(layout.cols, layout.out_cols)}, got {p.shape}"
            )
        per, ow, lanes = layout.period, layout.out_width, layout.lanes
        g, gi = layout.baby, layout.giant
        rc, cc, oc = layout.row_chunks, layout.col_chunks, layout.out_chunks
        ev = self.evaluator
        padded = np.zeros((cc * per, oc * ow))
        padded[: layout.cols, : layout.out_cols] = p
        cp = layout.copies  # client_baby: the data owner sent the g rotations itself
        baby = [[list(cts[(r * cc + i) * cp:(r * cc + i + 1) * cp]) for i in range(cc)]
                for r in range(rc)]
        for r in range(rc):
            for i in range(cc):
                chain = baby[r][i]
                chain += [self._rotate(chain[0], k * lanes) for k in range(len(chain), g)]
        out: list[Any] = [None] * (rc * oc)
        for j in (range(oc) if chunks is None else chunks):
            if not 0 <= j < oc:
                raise ShapeError(f"output chunk {j} outside 0..{oc - 1}")
            block = np.ascontiguousarray(padded[:, j * ow:(j + 1) * ow])
            digest = hashlib.blake2b(block.tobytes(), digest_size=16).digest()
            kept = self._plains.get((layout, j))
            plains: dict[tuple[int, int, int], Any] = (
                kept[1] if kept is not None and kept[0] == digest else {})
            diags = [self._diagonals(layout, block[i * per:(i + 1) * per]) for i in range(cc)]
            acc: list[Any] = [None] * rc
            for t in reversed(range(gi)):
                for r in range(rc):
                    if acc[r] is not None:
                        acc[r] = self._rotate(acc[r], g * lanes)
                inner: list[Any] = [None] * rc
                for i in range(cc):
                    for s in range(g):
                        vec = diags[i][g * t + s]
                        if not vec.any():
                            continue
                        pt = plains.get((t, i, s))
                        if pt is None:
                            pt = plains[(t, i, s)] = self._encode(vec, layout)
                        for r in range(rc):
                            prod = self._ct()
                            ev.multiply_plain(baby[r][i][s], pt, prod)
                            self.counts["multiplications"] += 1
                            if inner[r] is None:
                                inner[r] = prod
                            else:
                                ev.add_inplace(inner[r], prod)
                                self.counts["additions"] += 1
                for r in range(rc):
                    if inner[r] is None:
                        continue
                    if acc[r] is None:
                        acc[r] = inner[r]
                    else:
                        ev.add_inplace(acc[r], inner[r])
                        self.counts["additions"] += 1
            for r in range(rc):
                res = acc[r] if acc[r] is not None else self._near_zero(baby[r][0][0])
                if rescale:
                    ev.rescale_to_next_inplace(res)
                    self.counts["rescales"] += 1
                out[r * oc + j] = res
            self._plains[(layout, j)] = (digest, plains)
        return out

    def add_plain(self, cts: list[Any], y: np.ndarray, layout: Layout,
                  masks: np.ndarray | None = None) -> None:
        """Add the plain (R x D) matrix ``y`` and per-slot ``masks`` to output ciphertexts of
        ``layout``, in place (see :meth:`Layout.pack_output`)."""
        vecs = layout.pack_output(np.asarray(y, dtype=np.float64), masks)
        for ct, v in zip(cts, vecs, strict=True):
            pt = self._s.Plaintext()
            self.encoder.encode(v.tolist(), ct.parms_id(), ct.scale, pt)
            self.evaluator.add_plain_inplace(ct, pt)
            self.counts["encodes"] += 1
            self.counts["additions"] += 1
