"""Ciphertext layouts and the one-level encrypted-matrix x plain-matrix product.

An encrypted matrix ``M`` (R x C) is packed *rows as lanes*: a ciphertext holds ``F``
columns ("features") of ``2L`` rows, slot ``f*L + b`` = ``M[b, f] + i*M[L + b, f]``
(complex packing: two rows per slot, real and imaginary part). ``F * L = N/2``.

``Enc(M) @ P`` for a plain ``P`` (C x D) is block-diagonal: every F x W block of P
(W = output width per ciphertext = min(F, D rounded up to a power of two)) contributes W
generalized diagonals ``d_k[f] = P[(f + k) mod F, f mod W]`` (Halevi-Shoup for W = F, the
GAZELLE "hybrid" method for W < F, followed by log2(F/W) rotate-and-sum steps).
The diagonal sum uses baby-step/giant-step rotations: baby rotations ``rot(ct, s*L)``
(s < g, one key each) of the fresh inputs, giant rotations applied Horner-style with one key
(step g*L). Giant and fold rotations act on the products *before* the rescale (scale
Delta*q1), where key-switching noise (~1e-6 absolute at scale 2^40) is negligible.
Every product spends exactly ONE multiplicative level (weights encoded at scale q1, one
rescale per output ciphertext). ``F == 1`` is the "one feature per ciphertext" layout:
scalar weights, no rotations, no padding of the rows; it wins for very large batches.

Slots that a product fills besides the first W features (the rotate-and-sum replicas)
hold copies of the outputs; :meth:`MatmulEvaluator.add_plain` masks every copy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from syft_split.errors import CiphertextError, ShapeError

__all__ = ["Layout", "choose_layout", "MatmulEvaluator", "galois_element", "COST_MS"]

#: Rough single-core costs (ms) at N=8192 used by :func:`choose_layout`.
COST_MS: dict[str, float] = {
    "encode_vector": 0.45,
    "encode_scalar": 0.003,
    "multiply_plain": 0.09,
    "add": 0.03,
    "rotate_top": 1.05,
    "rotate_low": 0.53,
    "rescale": 0.33,
    "encrypt": 1.6,
    "decrypt": 0.5,
    "per_kb": 0.01,
    "per_key": 2.0,
}


def galois_element(step: int, poly_modulus_degree: int) -> int:
    """SEAL Galois element of a left rotation by ``step`` slots: ``3**step mod 2N``."""
    return pow(3, step, 2 * poly_modulus_degree)


@dataclass(frozen=True)
class Layout:
    """How an R x C encrypted matrix and its product with a C x D plain matrix are packed.

    Attributes:
        rows, cols, out_cols: R, C, D.
        slots: N/2. lanes: L (two rows per lane). features: F columns per ciphertext.
        baby: g, baby-step count (F is split as g x F/g).
    """

    rows: int
    cols: int
    out_cols: int
    slots: int
    lanes: int
    features: int
    baby: int

    @property
    def kind(self) -> str:
        """``"per_feature"`` (one column per ciphertext) or ``"packed"``."""
        return "per_feature" if self.features == 1 else "packed"

    @property
    def out_width(self) -> int:
        """W: output features per ciphertext (a power of two dividing F)."""
        return min(self.features, _pow2_ceil(self.out_cols))

    @property
    def giant(self) -> int:
        """Giant-step count W/g."""
        return self.out_width // self.baby

    @property
    def row_chunks(self) -> int:
        """Ciphertexts needed along the rows (2L rows each)."""
        return -(-self.rows // (2 * self.lanes))

    @property
    def col_chunks(self) -> int:
        """Input ciphertexts per row chunk."""
        return -(-self.cols // self.features)

    @property
    def out_chunks(self) -> int:
        """Output ciphertexts per row chunk."""
        return -(-self.out_cols // self.out_width)

    @property
    def n_inputs(self) -> int:
        """Number of input ciphertexts."""
        return self.row_chunks * self.col_chunks

    @property
    def n_outputs(self) -> int:
        """Number of output ciphertexts."""
        return self.row_chunks * self.out_chunks

    @property
    def sum_steps(self) -> list[int]:
        """Rotate-and-sum steps (slots) folding F/W replicas: W*L, 2W*L, ..."""
        out, w = [], self.out_width
        while w < self.features:
            out.append(w * self.lanes)
            w *= 2
        return out

    def rotation_steps(self) -> list[int]:
        """Rotation steps (slots) the product needs: ``L``, ``g*L`` and the fold steps."""
        steps = set(self.sum_steps)
        if self.features > 1:
            steps.update(s * self.lanes for s in range(1, self.baby))
        if self.features > 1 and self.giant > 1:
            steps.add(self.baby * self.lanes)
        return sorted(steps)

    def nonzero_diagonals(self) -> int:
        """Diagonals not identically zero (= plaintext encodings; products per row chunk)."""
        f, w = self.features, self.out_width
        if w < f:
            return self.col_chunks * self.out_chunks * w
        cb = np.minimum(f, self.cols - np.arange(self.col_chunks) * f)
        db = np.minimum(w, self.out_cols - np.arange(self.out_chunks) * w)
        return int(np.minimum(f, cb[:, None] + db[None, :] - 1).sum())

    def estimate_ms(self) -> float:
        """Cost model (single core, N=8192 constants) of one product, incl. enc/dec/bytes."""
        c = COST_MS
        rc, cc, oc = self.row_chunks, self.col_chunks, self.out_chunks
        g, gi = self.baby, self.giant
        nnz = self.nonzero_diagonals()
        enc = c["encode_scalar"] if self.features == 1 else c["encode_vector"]
        ms = nnz * enc + rc * nnz * (c["multiply_plain"] + c["add"])
        ms += rc * cc * (g - 1) * c["rotate_top"]
        ms += rc * oc * ((gi - 1 + len(self.sum_steps)) * c["rotate_top"] + c["rescale"])
        ms += rc * cc * (c["encrypt"] + 115 * c["per_kb"])
        ms += rc * oc * (c["decrypt"] + 131 * c["per_kb"])
        return ms + len(self.rotation_steps()) * c["per_key"]

    # -- numpy packing -------------------------------------------------------------
    def _pack(self, m: np.ndarray, f: int, chunks: int) -> np.ndarray:
        rc, lanes = self.row_chunks, self.lanes
        padded = np.zeros((rc * 2 * lanes, chunks * f))
        padded[: m.shape[0], : m.shape[1]] = m
        z = padded.reshape(rc, 2, lanes, chunks, f)
        c = z[:, 0] + 1j * z[:, 1]
        return c.transpose(0, 2, 3, 1).reshape(rc * chunks, f * lanes)

    def _unpack(self, vecs: np.ndarray, ncols: int, f: int, chunks: int) -> np.ndarray:
        rc, lanes = self.row_chunks, self.lanes
        v = np.asarray(vecs)[:, : f * lanes].reshape(rc, chunks, f, lanes).transpose(0, 3, 1, 2)
        out = np.stack([v.real, v.imag], axis=1).reshape(rc * 2 * lanes, chunks * f)
        return out[: self.rows, :ncols]

    def pack_input(self, m: np.ndarray) -> np.ndarray:
        """(R x C) matrix -> complex slot vectors, one row per input ciphertext."""
        _check_shape("encrypted matrix", m, (self.rows, self.cols), allow_fewer_rows=False)
        return self._pack(m, self.features, self.col_chunks)

    def unpack_input(self, vecs: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`pack_input`."""
        return self._unpack(vecs, self.cols, self.features, self.col_chunks)

    def pack_output(self, y: np.ndarray) -> np.ndarray:
        """(R x D) matrix -> complex slot vectors in the product's output layout,
        replicated into every copy the rotate-and-sum leaves (F/W copies)."""
        _check_shape("output matrix", y, (self.rows, self.out_cols), allow_fewer_rows=False)
        w = self.out_width
        v = self._pack(y, w, self.out_chunks)
        reps = self.features // w
        return np.tile(v.reshape(len(v), w, self.lanes), (1, reps, 1)).reshape(len(v), -1)

    def unpack_output(self, vecs: np.ndarray) -> np.ndarray:
        """Decoded output slot vectors -> (R x D) real matrix."""
        return self._unpack(vecs, self.out_cols, self.out_width, self.out_chunks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _check_shape(
    what: str, m: np.ndarray, shape: tuple[int, int], *, allow_fewer_rows: bool
) -> None:
    ok = m.ndim == 2 and m.shape[1] == shape[1] and (
        m.shape[0] <= shape[0] if allow_fewer_rows else m.shape[0] == shape[0]
    )
    if not ok:
        raise ShapeError(f"{what}: expected shape {shape}, got {tuple(m.shape)}")


def _pow2_ceil(v: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, v))))


def choose_layout(rows: int, cols: int, out_cols: int, poly_modulus_degree: int) -> Layout:
    """Pick the cheapest layout for ``Enc(M) @ P`` with M (rows x cols), P (cols x out_cols).

    Candidates: every packed layout (power-of-two lanes L, F = N/2 / L, every baby-step
    count g | F) and the one-feature-per-ciphertext layout; the cost model
    :meth:`Layout.estimate_ms` decides. Deterministic: both parties derive the same layout.
    """
    for name, v in (("rows", rows), ("cols", cols), ("out_cols", out_cols)):
        if not isinstance(v, int) or v < 1:
            raise ShapeError(f"Expected `{name}` to be a positive int but got {v!r}")
    n = poly_modulus_degree // 2
    half_rows = -(-rows // 2)
    best = Layout(rows, cols, out_cols, n, min(n, half_rows), 1, 1)
    best_ms = best.estimate_ms()
    lanes = 1
    while lanes <= min(n // 2, _pow2_ceil(half_rows)):
        f = n // lanes
        g = 1
        while g <= f:
            cand = Layout(rows, cols, out_cols, n, lanes, f, g)
            ms = cand.estimate_ms()
            if ms < best_ms:
                best, best_ms = cand, ms
            g *= 2
        lanes *= 2
    return best


class MatmulEvaluator:
    """Server-side ``Enc(M) @ P + Y`` on SEAL ciphertexts (``tenseal.sealapi``).

    Args:
        seal_context: the ``seal::SEALContext`` of the run.
        galois_keys: Galois keys holding (at least) the layouts' rotation steps.
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

    def _ct(self) -> Any:
        return self._s.Ciphertext()

    def _rotate(self, ct: Any, step: int) -> Any:
        out = self._ct()
        self.evaluator.rotate_vector(ct, step, self.galois_keys, out)
        return out

    def _encode_weights(self, vec: np.ndarray, shift: int, layout: Layout) -> Any | None:
        pt = self._s.Plaintext()
        if layout.features == 1:
            self.encoder.encode(float(vec[0]), self.input_parms_id, self.rescale_prime, pt)
        else:
            full = np.repeat(np.roll(vec, shift), layout.lanes)
            self.encoder.encode(full.tolist(), self.input_parms_id, self.rescale_prime, pt)
        return None if pt.is_zero() else pt

    def _near_zero(self, ct: Any) -> Any:
        """An encryption of ~0 (ct / q1, before rescale) when a whole output block is zero."""
        pt = self._s.Plaintext()
        self.encoder.encode(1.0 / self.rescale_prime, self.input_parms_id, self.rescale_prime, pt)
        out = self._ct()
        self.evaluator.multiply_plain(ct, pt, out)
        return out

    def matmul(self, cts: list[Any], p: np.ndarray, layout: Layout) -> list[Any]:
        """``Enc(M) @ p`` for input ciphertexts in ``layout``; one level, output at level 0."""
        if len(cts) != layout.n_inputs:
            raise CiphertextError(
                f"expected {layout.n_inputs} input ciphertexts, got {len(cts)}"
            )
        p = np.asarray(p, dtype=np.float64)
        if p.shape != (layout.cols, layout.out_cols):
            raise ShapeError(
                f"plain matrix: expected shape {(layout.cols, layout.out_cols)}, got {p.shape}"
            )
        f, w, lanes = layout.features, layout.out_width, layout.lanes
        g, gi = layout.baby, layout.giant
        rc, cc, oc = layout.row_chunks, layout.col_chunks, layout.out_chunks
        ev = self.evaluator
        padded = np.zeros((cc * f, oc * w))
        padded[: layout.cols, : layout.out_cols] = p
        baby: list[list[list[Any]]] = []
        for r in range(rc):
            row = []
            for i in range(cc):
                chain = [cts[r * cc + i]]
                chain += [self._rotate(chain[0], k * lanes) for k in range(1, g)]
                row.append(chain)
            baby.append(row)
        ar = np.arange(f)
        rows_idx = (ar[None, :] + np.arange(w)[:, None]) % f  # [k, f] -> (f + k) mod F
        cols_idx = np.broadcast_to(ar % w, (w, f))  # [k, f] -> f mod W
        out: list[Any] = [None] * (rc * oc)
        for j in range(oc):
            diags = [
                padded[i * f : (i + 1) * f, j * w : (j + 1) * w][rows_idx, cols_idx]
                for i in range(cc)
            ]
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
                        pt = self._encode_weights(vec, g * t, layout)
                        if pt is None:
                            continue
                        for r in range(rc):
                            prod = self._ct()
                            ev.multiply_plain(baby[r][i][s], pt, prod)
                            if inner[r] is None:
                                inner[r] = prod
                            else:
                                ev.add_inplace(inner[r], prod)
                for r in range(rc):
                    if inner[r] is None:
                        continue
                    if acc[r] is None:
                        acc[r] = inner[r]
                    else:
                        ev.add_inplace(acc[r], inner[r])
            for r in range(rc):
                res = acc[r] if acc[r] is not None else self._near_zero(baby[r][0][0])
                for step in layout.sum_steps:
                    ev.add_inplace(res, self._rotate(res, step))
                ev.rescale_to_next_inplace(res)
                out[r * oc + j] = res
        return out

    def add_plain(self, cts: list[Any], y: np.ndarray, layout: Layout) -> None:
        """Add the plain (R x D) matrix ``y`` to output ciphertexts of ``layout``, in place."""
        vecs = layout.pack_output(np.asarray(y, dtype=np.float64))
        for ct, v in zip(cts, vecs, strict=True):
            pt = self._s.Plaintext()
            self.encoder.encode(v.tolist(), ct.parms_id(), ct.scale, pt)
            self.evaluator.add_plain_inplace(ct, pt)
