"""Ciphertext layouts of an encrypted matrix and the cost model that picks one.

An encrypted matrix ``M`` (R x C) is packed *rows as lanes*: a ciphertext holds ``F``
feature positions of ``2L`` rows, slot ``f*L + b`` = ``M[b, col(f)] + i*M[L + b, col(f)]``
(complex packing: two rows per slot, real and imaginary part). ``F * L = N/2``.

The ``F`` positions are ``r = F / p`` *replicas* of a block of ``p`` (the *period*, a power of
two) columns: ``col(f) = chunk*p + f mod p``. ``Enc(M) @ P`` for a plain ``P`` (C x D) uses
``w`` (the *width*) generalized diagonals per column chunk: replica ``rho`` works for the
output columns ``rho*w .. rho*w + w - 1`` of its chunk, with
``d_k[f] = P[(f + k) mod p, rho*w + f mod w]`` (Halevi-Shoup for ``w = p``, the GAZELLE
"hybrid" method for ``w < p``). After ``sum_k d_k * rot_k(x)`` slot ``f`` holds a *partial
sum* of output column ``rho*w + f mod w`` over a window of ``w`` input columns; the ``p/w``
partial sums of a column together cover the whole chunk. GAZELLE folds them with
``log2(p/w)`` rotate-and-sum steps; here the *data owner* folds them in plaintext after
decrypting (:meth:`Layout.unpack_output`), so the product needs no fold rotation at all. The
server masks every slot of every output ciphertext independently (:meth:`Layout.pack_output`,
all ``N/2`` slots, also those no output value uses), so the data owner sees
only masked partial sums and learns their total (plus the total of the masks), exactly what
it learned from a folded ciphertext. With replicas one matrix-vector pass computes ``r*w``
output columns (narrow matrices fill the slots).

The diagonal sum uses baby-step/giant-step rotations: ``g - 1`` baby rotations of each
input ciphertext (one Galois key per step ``s*L``), ``w/g - 1`` giant rotations Horner-style
(one key, step ``g*L``), all before the single rescale. With ``client_baby`` the data owner
encrypts the ``g`` rotated copies itself instead (its fresh ciphertexts carry no
key-switching noise, ~1e-9 instead of ~7e-7 absolute: used for the weight gradient, whose
exact zeros matter to scale-free optimizers). ``F == 1`` is the "one feature per
ciphertext" layout: scalar weights, no rotations; it wins for very large batches.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from syft_split.errors import ShapeError

__all__ = ["Layout", "choose_layout", "galois_element", "COST_MS"]

#: Single-core costs (ms) of one operation at N=8192, two data primes (measured with
#: ``tenseal.sealapi``; ``encrypt`` includes encoding, ``ser`` one save + one load).
#: Other ring sizes scale linearly. Both parties use these to derive the same layout.
COST_MS: dict[str, float] = {
    "encode_vector": 0.30,
    "encode_scalar": 0.003,
    "multiply_plain": 0.085,
    "add": 0.025,
    "rotate": 1.0,
    "rescale": 0.29,
    "encrypt": 1.1,
    "decrypt": 0.25,
    "ser": 1.0,
    "per_key": 0.3,
    "worker_call": 0.5,
}


def galois_element(step: int, poly_modulus_degree: int) -> int:
    """SEAL Galois element of a left rotation by ``step`` slots: ``3**step mod 2N``."""
    return pow(3, step, 2 * poly_modulus_degree)


def _pow2_ceil(v: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, v))))


@dataclass(frozen=True)
class Layout:
    """How an R x C encrypted matrix and its product with a C x D plain matrix are packed.

    Attributes:
        rows, cols, out_cols: R, C, D.
        slots: N/2. lanes: L (two rows per lane). features: F positions per ciphertext.
        baby: g, baby-step count (a power of two dividing ``width``).
        period: p, input columns per replica block (a power of two dividing F).
        width: w, diagonals per column chunk = output columns per replica block.
        client_baby: the data owner encrypts the g baby-step rotations of each input
            (``g`` ciphertexts per input block) instead of the server rotating.
    """

    rows: int
    cols: int
    out_cols: int
    slots: int
    lanes: int
    features: int
    baby: int
    period: int
    width: int
    client_baby: bool = False

    @property
    def kind(self) -> str:
        """``"per_feature"`` (one column per ciphertext) or ``"packed"``."""
        return "per_feature" if self.features == 1 else "packed"

    @property
    def replicas(self) -> int:
        """r = F / p: copies of the input block in a ciphertext."""
        return self.features // self.period

    @property
    def out_width(self) -> int:
        """Output columns per output ciphertext (``r * w``)."""
        return self.replicas * self.width

    @property
    def giant(self) -> int:
        """Giant-step count w/g."""
        return self.width // self.baby

    @property
    def row_chunks(self) -> int:
        """Ciphertexts needed along the rows (2L rows each)."""
        return -(-self.rows // (2 * self.lanes))

    @property
    def col_chunks(self) -> int:
        """Input ciphertexts per row chunk."""
        return -(-self.cols // self.period)

    @property
    def out_chunks(self) -> int:
        """Output ciphertexts per row chunk."""
        return -(-self.out_cols // self.out_width)

    @property
    def copies(self) -> int:
        """Input ciphertexts per input block (g with ``client_baby``, else 1)."""
        return self.baby if self.client_baby else 1

    @property
    def n_inputs(self) -> int:
        """Number of input ciphertexts."""
        return self.row_chunks * self.col_chunks * self.copies

    @property
    def n_outputs(self) -> int:
        """Number of output ciphertexts."""
        return self.row_chunks * self.out_chunks

    @property
    def partials(self) -> int:
        """Partial sums per output value (p/w), folded by the data owner after decryption."""
        return self.period // self.width

    def rotation_steps(self) -> list[int]:
        """Rotation steps (slots) the product needs: ``s*L`` (s < g) and ``g*L``."""
        steps: set[int] = set()
        if self.features > 1 and not self.client_baby:
            steps.update(s * self.lanes for s in range(1, self.baby))
        if self.features > 1 and self.giant > 1:
            steps.add(self.baby * self.lanes)
        return sorted(steps)

    def _nonzero_per_block(self) -> np.ndarray:
        """Non-zero diagonals of each (column chunk, output chunk) block."""
        w, p = self.width, self.period
        cb = np.minimum(p, self.cols - np.arange(self.col_chunks) * p)
        db = np.clip(self.out_cols - np.arange(self.out_chunks) * self.out_width, 0, w)
        nz = np.where(cb[:, None] >= w, w, np.minimum(w, cb[:, None] + db[None, :] - 1))
        return np.where(db[None, :] >= w, w, nz)

    def nonzero_diagonals(self) -> int:
        """Plaintext encodings per product (= multiplications per row chunk)."""
        return int(self._nonzero_per_block().sum())

    def keyswitches(self, baby: int | None = None, client_baby: bool | None = None) -> int:
        """Server rotations (key switches) of one product with ``baby`` steps (default: this
        layout's), baby steps done by the data owner if ``client_baby``."""
        if self.features == 1:
            return 0
        g = self.baby if baby is None else baby
        cb = self.client_baby if client_baby is None else client_baby
        rc, cc, oc = self.row_chunks, self.col_chunks, self.out_chunks
        return (0 if cb else rc * cc * (g - 1)) + rc * oc * (self.width // g - 1)

    def min_keyswitches(self) -> int:
        """The fewest server rotations a baby/giant split (``g | w``) of this packing needs
        when the server does every rotation — the reference a ``client_baby`` layout
        undercuts by having the data owner encrypt rotated copies."""
        gs = [1 << i for i in range(int(math.log2(self.width)) + 1)]
        return min(self.keyswitches(g, False) for g in gs)

    def chunk_owner(self, j: int, workers: int) -> int:
        """Which of ``workers`` processes computes output chunk ``j`` (0: the model owner's
        own process; chunks go round-robin, see :mod:`he_layers.workers`)."""
        return j % max(1, min(workers, self.out_chunks))

    def estimate_ms(self, workers: int = 1) -> float:
        """Cost model (N=8192 constants) of one product, incl. enc/dec/bytes; the server's
        output chunks split over ``workers`` processes (1: one core)."""
        c = COST_MS
        scale = self.slots / 4096
        rc = self.row_chunks
        nnz = self.nonzero_diagonals()
        enc = c["encode_scalar"] if self.features == 1 else c["encode_vector"]
        k = max(1, min(workers, self.out_chunks))
        if k == 1:
            ms = nnz * enc + rc * nnz * (c["multiply_plain"] + c["add"])
            ms += self.keyswitches() * c["rotate"]
        else:  # every process rotates the inputs; the chunks' work runs side by side
            per_chunk = self._nonzero_per_block().sum(axis=0)
            giant = rc * (self.width // self.baby - 1) if self.features > 1 else 0
            work = [0.0] * k
            for j, n in enumerate(per_chunk):
                work[self.chunk_owner(j, k)] += (n * enc + rc * n * (c["multiply_plain"]
                                                 + c["add"]) + giant * c["rotate"])
            baby = 0 if self.client_baby or self.features == 1 else (
                rc * self.col_chunks * (self.baby - 1))
            chunks = -(-self.out_chunks // k)
            ipc = (self.n_inputs + rc * chunks) * c["ser"] + c["worker_call"]
            ms = baby * c["rotate"] + max(work[0], max(work[1:]) + ipc)
        ms += self.n_outputs * (c["rescale"] + c["encode_vector"] + c["add"])  # + masks
        ms += self.n_inputs * (c["encrypt"] + c["ser"]) + self.n_outputs * (c["decrypt"] + c["ser"])
        return ms * scale + len(self.rotation_steps()) * c["per_key"]

    # -- numpy packing -------------------------------------------------------------
    def _pack_rows(self, m: np.ndarray, ncols: int, chunks: int) -> np.ndarray:
        """(R x chunks*ncols) -> complex (row_chunks*chunks, ncols, L)."""
        rc, lanes = self.row_chunks, self.lanes
        padded = np.zeros((rc * 2 * lanes, chunks * ncols))
        padded[: m.shape[0], : m.shape[1]] = m
        z = padded.reshape(rc, 2, lanes, chunks, ncols)
        c = z[:, 0] + 1j * z[:, 1]
        return c.transpose(0, 2, 3, 1).reshape(rc * chunks, ncols, lanes)

    def _unpack_rows(self, v: np.ndarray, nrows: int, ncols: int) -> np.ndarray:
        """Inverse of :meth:`_pack_rows` for ``v`` of shape (row_chunks*chunks, n, L)."""
        rc, lanes = self.row_chunks, self.lanes
        n = v.shape[1]
        v = v.reshape(rc, -1, n, lanes).transpose(0, 3, 1, 2)
        out = np.stack([v.real, v.imag], axis=1).reshape(rc * 2 * lanes, -1)
        return out[:nrows, :ncols]

    def pack_input(self, m: np.ndarray) -> np.ndarray:
        """(R x C) matrix -> complex slot vectors, one row per input ciphertext (with
        ``client_baby`` the ``g`` copies of each block, rotated by ``s*L`` slots)."""
        _check_shape("encrypted matrix", m, (self.rows, self.cols))
        v = self._pack_rows(m, self.period, self.col_chunks)
        v = np.tile(v, (1, self.replicas, 1)).reshape(len(v), -1)
        if not self.client_baby:
            return v
        rolled = [np.roll(v, -s * self.lanes, axis=1) for s in range(self.baby)]
        return np.stack(rolled, axis=1).reshape(-1, v.shape[1])

    def unpack_input(self, vecs: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`pack_input` (reads the first replica, unrotated copies)."""
        v = np.asarray(vecs)[:: self.copies, : self.features * self.lanes]
        v = v.reshape(len(v), self.features, self.lanes)[:, : self.period]
        return self._unpack_rows(v, self.rows, self.cols)

    @property
    def mask_shape(self) -> tuple[int, ...]:
        """Shape of the per-slot masks of the output ciphertexts (complex): one per slot of
        every output ciphertext, all ``N/2`` of them (with ``F == 1`` only the first ``L``
        carry output values; the others hold the product of the weights with whatever the
        input's unused slots hold, e.g. the data owner's encryption noise, so they are
        masked too)."""
        return (self.n_outputs, self.slots)

    def value_mask(self) -> np.ndarray:
        """Boolean (n_outputs, r, p/w, w, L, 2): which slot parts (real, imaginary) of the
        first ``F*L`` slots carry a partial sum of a real output value (row < R and
        column < D); the rest is row/column padding, whose fold the data owner discards."""
        r, w, lanes = self.replicas, self.width, self.lanes
        ones = np.ones((self.rows, self.out_cols))
        v = self._pack_rows(ones, self.out_width, self.out_chunks).reshape(-1, r, 1, w, lanes)
        v = np.broadcast_to(v, (len(v), r, self.partials, w, lanes))
        return np.stack([v.real > 0, v.imag > 0], axis=-1)

    def pack_output(self, y: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
        """(R x D) matrix -> complex slot vectors (``N/2`` slots each) to add to the
        product's outputs.

        ``y`` goes into the first partial-sum slot of each output value; ``masks``
        (:attr:`mask_shape`) is added to every slot. After :meth:`unpack_output` folds the
        partial sums, the data owner reads ``x @ P + y + fold(masks)``.
        """
        _check_shape("output matrix", y, (self.rows, self.out_cols))
        r, w, p, lanes = self.replicas, self.width, self.period, self.lanes
        v = self._pack_rows(y, self.out_width, self.out_chunks).reshape(-1, r, w, lanes)
        first = np.zeros((len(v), r, p, lanes), dtype=complex)
        first[:, :, :w] = v
        out = np.zeros((len(v), self.slots), dtype=complex)
        out[:, : self.features * lanes] = first.reshape(len(v), -1)
        if masks is not None:
            out += np.asarray(masks).reshape(out.shape)
        return out

    def fold(self, vecs: np.ndarray) -> np.ndarray:
        """Slot vectors (n_outputs x >= F*L) -> the (R x D) matrix their partial sums add to."""
        r, w, p, lanes = self.replicas, self.width, self.period, self.lanes
        v = np.asarray(vecs)[:, : self.features * lanes].reshape(-1, r, p // w, w, lanes)
        return self._unpack_rows(v.sum(axis=2).reshape(len(v), r * w, lanes), self.rows,
                                 self.out_cols)

    def unpack_output(self, vecs: np.ndarray) -> np.ndarray:
        """Decoded output slot vectors -> (R x D) real matrix (folds the partial sums)."""
        return self.fold(vecs)

    def diagonal_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(input column, output column) of every slot of every diagonal, already rotated
        for the giant steps: two (w x F) arrays indexing one (p x r*w) block of P."""
        f = np.arange(self.features)
        k = np.arange(self.width)[:, None]
        fr = (f[None, :] - (k // self.baby) * self.baby) % self.features
        c = fr % self.period
        return (c + k) % self.period, (fr // self.period) * self.width + c % self.width

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _check_shape(what: str, m: np.ndarray, shape: tuple[int, int]) -> None:
    if not (m.ndim == 2 and m.shape == shape):
        raise ShapeError(f"{what}: expected shape {shape}, got {tuple(m.shape)}")


def choose_layout(rows: int, cols: int, out_cols: int, poly_modulus_degree: int,
                  client_baby: bool = False, workers: int = 1) -> Layout:
    """Pick the cheapest layout for ``Enc(M) @ P`` with M (rows x cols), P (cols x out_cols).

    Candidates: every power-of-two lane count L (F = N/2 / L), period ``min(F, C)`` rounded
    up to a power of two (replicating narrow inputs), every width w and baby-step count g,
    and the one-feature-per-ciphertext layout; :meth:`Layout.estimate_ms` decides.
    Deterministic: both parties derive the same layout. ``client_baby``: the data owner
    encrypts the baby-step rotations (see :class:`Layout`). ``workers``: processes the model
    owner splits the output chunks over (:meth:`Layout.estimate_ms`).
    """
    for name, v in (("rows", rows), ("cols", cols), ("out_cols", out_cols),
                    ("workers", workers)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ShapeError(f"Expected `{name}` to be a positive int but got {v!r}")
    return _choose(rows, cols, out_cols, poly_modulus_degree, bool(client_baby), workers)


@lru_cache(maxsize=256)
def _choose(rows: int, cols: int, out_cols: int, poly_modulus_degree: int,
            client_baby: bool, workers: int) -> Layout:
    n = poly_modulus_degree // 2
    half_rows = -(-rows // 2)
    best = Layout(rows, cols, out_cols, n, min(n, half_rows), 1, 1, 1, 1)
    best_ms = best.estimate_ms(workers)
    lanes = 1
    while lanes <= min(n // 2, _pow2_ceil(half_rows)):
        f = n // lanes
        period = min(f, _pow2_ceil(cols))
        w = 1
        while w <= period:
            g = 1
            while g <= w:
                cand = Layout(rows, cols, out_cols, n, lanes, f, g, period, w, client_baby)
                ms = cand.estimate_ms(workers)
                if ms < best_ms:
                    best, best_ms = cand, ms
                g *= 2
            w *= 2
        lanes *= 2
    return best
