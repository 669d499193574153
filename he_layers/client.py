"""The data owner's party of the encrypted layer: :class:`HEClient`.

It holds the run's secret key (through :class:`KeyOwner`), its activation x and, at level B,
the weight share A. For a convolution it unfolds x into patches (im2col) before encrypting
and folds the input gradient back (col2im), so the data owner's host passes its flattened
activation in and gets ``dL/dx`` of the same shape back. See ``he_layers/README.md``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from syft_split.errors import CiphertextError, EmptyBatchError, HEError, ProtocolError, ShapeError

from ._protocol import (
    ENC_INPUT,
    GRAD_RETURN,
    MASKED_GRAD,
    MASKED_OUTPUT,
    OUTPUT_RETURN,
    Random,
    as_array,
    check_ctx,
    flood,
)
from .costs import CostMeter
from .keys import KeyOwner
from .spec import LayerSpec
from .wire import array_from_bytes, array_to_bytes, decode_frame, encode_frame

__all__ = ["HEClient"]


class HEClient:
    """Data-owner party. Holds the secret key (via ``key_owner``), x and, at level B, A.

    Args:
        key_owner: the run's :class:`KeyOwner` (fresh per run).
        seed: seeds the mask generator (tests only; default: OS CSPRNG).
    """

    def __init__(self, key_owner: KeyOwner, *, seed: int | None = None) -> None:
        self.keys = key_owner
        self.spec: LayerSpec = key_owner.spec
        self._geo = self.spec.geometry()
        self._rnd = Random(seed)
        self._step = 0
        self._pending: dict[str, Any] | None = None  # the training step in flight
        self._eval: dict[str, Any] | None = None  # an evaluation forward awaiting its output
        shape = (self.spec.mat_in, self.spec.mat_out)
        self._share = np.zeros(shape)
        self._momentum = np.zeros(shape)  # level B: the mask part of the server's velocity
        if self.spec.level == "B" and self.spec.initial_share > 0:
            self._share = self._rnd.uniform(shape, self.spec.initial_share)
        self.costs = CostMeter()

    @property
    def weight_share(self) -> torch.Tensor:
        """Level B: the data owner's share A in the layer's weight shape (zero at level A)."""
        w = torch.from_numpy(self._share.T.copy())
        if self._geo is not None:
            return w.reshape(self._geo.out_channels, self._geo.in_channels,
                             *self._geo.kernel_size)
        return w

    @property
    def step(self) -> int:
        """The id of the last encrypted forward (0: none yet); messages carry it."""
        return self._step

    def cancel(self) -> None:
        """Drop the steps in flight (the data owner discarded them): any later message of
        theirs is refused, nothing of theirs is decrypted."""
        self._pending = self._eval = None

    def state(self) -> dict[str, Any]:
        """What must outlive this client for the run to go on with new keys: the cost meter's
        totals and, at level B, the share A and the mask part of the server's velocity. No
        key material."""
        out: dict[str, Any] = {"costs": self.costs.state()}
        if self.spec.level == "B":
            out["share"] = torch.from_numpy(self._share.copy())
            out["momentum"] = torch.from_numpy(self._momentum.copy())
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`state` returned (e.g. after a restart, with fresh keys); a file
        written before costs were kept has none (the meter starts again).

        Raises:
            ShapeError: level B: a missing, misshapen or non-finite share or momentum.
            ValidationError: malformed costs. Nothing is loaded on error.
        """
        arrays = {}
        if self.spec.level == "B":
            want = (self.spec.mat_in, self.spec.mat_out)
            for name in ("share", "momentum"):
                t = state.get(name)
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != want or not bool(
                        torch.isfinite(t).all()):
                    got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ShapeError(f"level-B state {name!r}: expected finite {want}, got {got}")
                arrays[name] = t.detach().double().numpy().copy()
        costs = CostMeter()
        if state.get("costs") is not None:
            costs.load_state(state["costs"])
        if arrays:
            self._share, self._momentum = arrays["share"], arrays["momentum"]
        self.costs = costs

    def _sent(self, msg: bytes, n_ct: int) -> bytes:
        self.costs.add("bytes_sent", len(msg))
        self.costs.add("ciphertexts_sent", n_ct)
        self.costs.add("messages_sent", 1)
        return msg

    def _receive(self, msg: bytes, kind: str, stage: str
                 ) -> tuple[dict[str, Any], list[bytes], dict[str, Any]]:
        """Decode ``msg`` and find the step in flight at ``stage`` it answers (the training
        step, or at stage "output" also an evaluation forward in between)."""
        with self.costs.timed("ser_s"):
            head, blobs = decode_frame(msg, kind)
        self.costs.add("bytes_received", len(msg))
        self.costs.add("messages_received", 1)
        check_ctx(head, self.keys.context_id, kind)
        slots = (self._pending, self._eval) if stage == "output" else (self._pending,)
        for p in slots:
            if p is not None and p["stage"] == stage and head.get("step") == p["step"]:
                return head, blobs, p
        raise ProtocolError(
            f"{kind}: unexpected for step {head.get('step')!r} (pending: "
            f"{[(p['step'], p['stage']) for p in (self._pending, self._eval) if p is not None]})"
        )

    def _rows(self, x: Any) -> tuple[np.ndarray, int]:
        """x -> (rows of the encrypted matrix, records): a convolution unfolds patches."""
        a = as_array(x, "input x")
        spec = self.spec
        if self._geo is None:
            if a.ndim != 2 or a.shape[1] != spec.d_in:
                raise ShapeError(
                    f"input x: expected shape (rows <= {spec.batch_size}, {spec.d_in}), "
                    f"got {tuple(a.shape)}"
                )
            return a, a.shape[0]
        shape = (self._geo.in_channels, *spec.input_spatial)
        if a.ndim < 2 or a.shape[1:] not in (shape, (spec.d_in,)):
            raise ShapeError(
                f"input x: expected shape (records <= {spec.batch_size}, {spec.d_in}) or "
                f"(records, {', '.join(map(str, shape))}), got {tuple(a.shape)}"
            )
        n = a.shape[0]
        if n == 0:
            return np.zeros((0, spec.mat_in)), 0
        with self.costs.timed("client_s"):
            patches = self._geo.unfold(torch.from_numpy(a.reshape(n, *shape)))
        return patches.numpy(), n

    def encrypt_input(self, x: torch.Tensor, *, need_grad: bool = True) -> bytes:
        """Start a step: encrypt x -> ``enc_input`` bytes for the server.

        ``x``: (records, d_in) — for a convolution also (records, C_in, *spatial). Evaluation
        (``need_grad=False``) skips Enc(x^T) and Enc(A) and leaves a training step in flight
        as it is (an evaluation batch may run between a training forward and its backward).
        A refused x (shape, batch size, ``x_bound``) changes nothing.
        """
        spec = self.spec
        a, n = self._rows(x)
        if n == 0:
            raise EmptyBatchError("input x: a batch with no rows")
        if n > spec.batch_size:
            raise ShapeError(
                f"input x: expected at most batch_size={spec.batch_size} rows, got {n}"
            )
        if not np.abs(a).max() <= spec.x_bound:  # the value is private: not in the message
            raise HEError(
                f"input x: an activation exceeds x_bound={spec.x_bound} agreed in the LayerSpec "
                "(normalize the inputs or raise x_bound within the headroom)"
            )
        self.costs.begin_step()
        self._step += 1
        lay = self.keys.layouts
        rows = a.shape[0]
        full = np.zeros((spec.rows, spec.mat_in))
        full[:rows] = a
        blobs = self.keys.encrypt_matrix(full, lay["forward"], self.costs)
        n_x, n_xt, n_a = len(blobs), 0, 0
        if need_grad:
            xt = self.keys.encrypt_matrix(full.T, lay["grad"], self.costs)
            n_xt = len(xt)
            blobs += xt
            if spec.level == "B":
                sa = self.keys.encrypt_matrix(self._share, lay["input_grad"], self.costs)
                n_a = len(sa)
                blobs += sa
        dtype = x.dtype if isinstance(x, torch.Tensor) else torch.float64
        slot = {"step": self._step, "rows": rows, "records": n, "x": a, "stage": "output",
                "need_grad": need_grad, "dtype": dtype}
        if need_grad:
            self._pending = slot
        else:  # a training step in flight stays so (evaluation between forward and backward)
            self._eval = slot
        head = {"ctx": self.keys.context_id, "step": self._step, "rows": rows, "records": n,
                "n_x": n_x, "n_xt": n_xt, "n_a": n_a}
        with self.costs.timed("ser_s"):
            msg = encode_frame(ENC_INPUT, head, blobs)
        return self._sent(msg, len(blobs))

    def decrypt_output(self, msg: bytes) -> bytes:
        """``masked_output`` -> ``output_return``: decrypt (level B: add x A), round, return."""
        _, blobs, p = self._receive(msg, MASKED_OUTPUT, "output")
        y = self.keys.decrypt_matrix(blobs, self.keys.layouts["forward"], "masked output",
                                     self.costs)
        with self.costs.timed("client_s"):
            y = y[: p["rows"]]
            if self.spec.level == "B":
                y = y + p["x"] @ self._share
            y = flood(y, self.spec.flood_bits, self._rnd)
        p["stage"] = "grad" if p["need_grad"] else "done"
        if not p["need_grad"]:
            self._eval = None
        head = {"ctx": self.keys.context_id, "step": p["step"], "shape": list(y.shape)}
        with self.costs.timed("ser_s"):
            ret = encode_frame(OUTPUT_RETURN, head, [array_to_bytes(y)])
        return self._sent(ret, 0)

    def decrypt_gradients(self, msg: bytes) -> tuple[bytes, torch.Tensor]:
        """``masked_grad`` -> (``grad_return`` bytes, dL/dx (records x d_in)).

        Level B also refreshes the share: A' uniform in ±share_bound, and the returned
        gradient carries the correction that keeps W_s + A on the agreed SGD trajectory
        (``(A' - A)/lr`` minus the momentum the server applies to earlier corrections).
        """
        _, blobs, p = self._receive(msg, MASKED_GRAD, "grad")
        lay, spec, rows, n = self.keys.layouts, self.spec, p["rows"], p["records"]
        n_g = lay["grad"].n_outputs
        expected = n_g + (1 if spec.level == "A" else lay["input_grad"].n_outputs)
        if len(blobs) != expected:
            raise CiphertextError(f"{MASKED_GRAD}: expected {expected} blobs, got {len(blobs)}")
        g = self.keys.decrypt_matrix(blobs[:n_g], lay["grad"], "masked weight gradient",
                                     self.costs, rescaled=False)
        if spec.level == "A":
            dx = array_from_bytes(blobs[n_g], (n, spec.d_in), "input gradient")
        else:
            dxt = self.keys.decrypt_matrix(blobs[n_g:], lay["input_grad"], "input gradient",
                                           self.costs)
            dx = self._fold(dxt.T[:rows], n)
        with self.costs.timed("client_s"):
            if spec.level == "B":
                assert spec.lr is not None
                new = self._rnd.uniform(self._share.shape, spec.share_bound)
                step = (new - self._share) / spec.lr
                g = g + spec.weight_decay * self._share + step - spec.momentum * self._momentum
                self._momentum, self._share = step, new
            g = flood(g, spec.flood_bits, self._rnd)
        self._pending = None
        head = {"ctx": self.keys.context_id, "step": p["step"], "shape": list(g.shape)}
        with self.costs.timed("ser_s"):
            ret = encode_frame(GRAD_RETURN, head, [array_to_bytes(g)])
        return self._sent(ret, 0), torch.from_numpy(np.ascontiguousarray(dx)).to(p["dtype"])

    def _fold(self, dpatches: np.ndarray, n: int) -> np.ndarray:
        """Patch gradients -> dL/dx (records x d_in) for a convolution (col2im)."""
        if self._geo is None:
            return dpatches
        with self.costs.timed("client_s"):
            shape = (n, self._geo.in_channels, *self.spec.input_spatial)
            dx = self._geo.fold_input_grad(torch.from_numpy(np.ascontiguousarray(dpatches)),
                                           shape)
        return dx.reshape(n, -1).numpy()
