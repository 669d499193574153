"""The model owner's party of the encrypted layer: :class:`HEServer`.

It holds W_s (level A: W), b and only the public context. For a convolution its outputs and
gradients have the convolution's shapes (``(B, C_out, *out_spatial)``, the conv weight);
the products run on im2col rows. See ``he_layers/README.md`` for the protocol.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import torch
from torch import nn

from syft_split.errors import CiphertextError, ConfigError, HEError, ProtocolError, ShapeError

from ._protocol import (
    ENC_INPUT,
    GRAD_RETURN,
    MASKED_GRAD,
    MASKED_OUTPUT,
    OUTPUT_RETURN,
    Random,
    as_array,
    check_ctx,
)
from ._seal_io import to_bytes
from .costs import CostMeter
from .keys import ServerContext
from .packing import Layout
from .spec import LayerSpec
from .wire import array_from_bytes, array_to_bytes, decode_frame, encode_frame, frame_header
from .workers import parallel_matmul

__all__ = ["HEServer"]


class HEServer:
    """Model-owner party. Holds W_s (level A: W), b and only the public context.

    Args:
        context: :class:`ServerContext` loaded from the data owner's public bytes.
        weight: like ``nn.Linear.weight`` ``(d_out, d_in)`` or, for a convolution, the conv
            weight (or its ``(C_out, C_in*k)`` view). Level B: the initial W (the data
            owner's share starts at 0 unless ``initial_share`` > 0).
        bias: ``(d_out,)`` / ``(C_out,)`` or None (must match ``spec.bias``).
        seed: seeds the mask generator (tests only; default: OS CSPRNG).
        grad_floor: level A: weight-gradient entries below this magnitude (default 2^-28,
            ~3.7e-9) are set to 0. It is the precision of the returned gradient: the data
            owner's 2^-flood_bits rounding (2^-30) plus CKKS noise (~5e-10: fresh
            encryptions, no rescale). Below it an entry cannot be told from 0, and a
            scale-free optimizer (Adam) would turn noise on an exactly-zero gradient (a dead
            unit) into a full-size step.
    """

    def __init__(
        self,
        context: ServerContext,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        seed: int | None = None,
        grad_floor: float = 2.0**-28,
    ) -> None:
        self.context = context
        self.spec: LayerSpec = context.spec
        self._geo = self.spec.geometry()
        self.dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float64
        self._set(weight, bias)
        self._rnd = Random(seed)
        self._last_step = 0
        self._pending: dict[str, Any] | None = None  # the training step in flight
        self._eval: dict[str, Any] | None = None  # an evaluation forward awaiting its output
        self._grads: tuple[np.ndarray, np.ndarray] | None = None
        self._velocity: tuple[np.ndarray, np.ndarray] | None = None
        self.grad_floor = grad_floor
        self.costs = CostMeter()

    @classmethod
    def from_linear(
        cls, context: ServerContext, linear: nn.Module, *, seed: int | None = None
    ) -> HEServer:
        """Server party initialised from an ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d``."""
        bias = getattr(linear, "bias", None)
        return cls(context, linear.weight, bias, seed=seed)  # type: ignore[arg-type]

    # -- parameters ----------------------------------------------------------------
    def _set(self, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        spec = self.spec
        if weight is not None:
            w = as_array(weight, "weight")
            shape = (spec.mat_out, spec.mat_in)
            if w.shape != self._weight_shape() and w.shape != shape:
                raise ShapeError(
                    f"weight: expected shape {self._weight_shape()}, got {tuple(w.shape)}"
                )
            self._w = w.reshape(shape).T.copy()
        if not spec.bias and bias is not None:
            raise ConfigError("bias given but the LayerSpec says bias=False")
        if bias is not None:
            b = as_array(bias, "bias")
            if b.shape != (spec.mat_out,):
                raise ShapeError(f"bias: expected shape ({spec.mat_out},), got {tuple(b.shape)}")
            self._b = b.copy()
        elif not hasattr(self, "_b"):
            self._b = np.zeros(spec.mat_out)

    def _weight_shape(self) -> tuple[int, ...]:
        if self._geo is None:
            return (self.spec.d_out, self.spec.d_in)
        return (self._geo.out_channels, self._geo.in_channels, *self._geo.kernel_size)

    @property
    def weight(self) -> torch.Tensor:
        """Server's weight (the layer's weight shape); at level B only the share W_s."""
        return torch.from_numpy(self._w.T.copy()).reshape(self._weight_shape()).to(self.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        """Bias (held by the server in plain), or None."""
        return torch.from_numpy(self._b.copy()).to(self.dtype) if self.spec.bias else None

    def set_parameters(
        self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> None:
        """Level A: load weights updated by any optimizer. Level B: only the bias."""
        if weight is not None and self.spec.level == "B":
            raise ConfigError(
                "level B: the weight share may only change through apply_sgd() with the "
                f"agreed lr={self.spec.lr} (W = W_s + A must follow the agreed SGD)"
            )
        self._set(weight, bias)

    # -- helpers -------------------------------------------------------------------
    def _headroom(self, bound: float, what: str) -> None:
        limit = 2.0 ** (self.context.params.headroom_bits - 1)
        if not math.isfinite(bound) or bound > limit:
            raise HEError(
                f"{what}: values could reach {bound:.4g} > CKKS headroom "
                f"{limit:.4g} (2^(q0 - scale - 1)); lower x_bound/mask_bits, "
                "rescale the inputs or use a larger first prime"
            )

    def grad_state(self) -> dict[str, Any]:
        """What :meth:`receive_gradients` needs of the step now waiting for its gradients (its
        step, masks and bias gradient; no key): a model owner that checkpoints keeps it until
        the answer is in, so a new process can take the answer (:meth:`expect_gradients`)."""
        p = self._expect("grad", None, "grad_state")
        return {"step": int(p["step"]), "ctx": self.context.context_id,
                "r2": torch.from_numpy(np.array(p["r2"])),
                "db": torch.from_numpy(np.array(p["db"])),
                "gbound": torch.from_numpy(np.array(p["gbound"]))}

    def expect_gradients(self, state: dict[str, Any]) -> None:
        """Wait for the gradients of the step another process of this model owner sent
        (``state``: its :meth:`grad_state`). The answer may come from keys the data owner has
        since replaced (it answers from its record): it is read against the context the step
        was sent under (it holds masked plain values only)."""
        shape = (self.spec.mat_in, self.spec.mat_out)
        r2, db = state.get("r2"), state.get("db")
        if not (isinstance(r2, torch.Tensor) and tuple(r2.shape) == shape
                and isinstance(db, torch.Tensor) and tuple(db.shape) == (self.spec.mat_out,)):
            raise ShapeError(f"grad_state: expected masks {shape} and bias gradient "
                             f"({self.spec.mat_out},)")
        gbound = state.get("gbound")  # None: a state written before answers were bounded
        if gbound is not None and not (isinstance(gbound, torch.Tensor)
                                       and tuple(gbound.shape) == (self.spec.mat_out,)
                                       and bool(torch.isfinite(gbound).all())):
            raise ShapeError(f"grad_state: expected a finite gradient bound of shape "
                             f"({self.spec.mat_out},)")
        self._pending = {"step": int(state["step"]), "stage": "grad",
                         "ctx": str(state.get("ctx", self.context.context_id)),
                         "r2": r2.double().numpy(), "db": db.double().numpy()}
        if gbound is not None:
            self._pending["gbound"] = gbound.double().numpy()

    def velocity_state(self) -> list[torch.Tensor] | None:
        """Level B with momentum: the SGD velocity (weight, bias parts), for a checkpoint."""
        if self._velocity is None:
            return None
        return [torch.from_numpy(np.array(v)) for v in self._velocity]

    def load_velocity(self, state: list[torch.Tensor] | None) -> None:
        """Put back what :meth:`velocity_state` returned."""
        if state is None:
            self._velocity = None
            return
        shapes = [(self.spec.mat_in, self.spec.mat_out), (self.spec.mat_out,)]
        if len(state) != 2 or any(tuple(t.shape) != sh for t, sh in zip(state, shapes,
                                                                          strict=True)):
            raise ShapeError(f"velocity: expected shapes {shapes}")
        self._velocity = (state[0].double().numpy(), state[1].double().numpy())

    def is_current(self, msg: bytes) -> bool:
        """Whether an encrypted input ``msg`` is bound to this server's public context (False:
        the data owner made new keys, e.g. after a restart). A malformed message counts as
        current: :meth:`forward` refuses it with its own error."""
        try:
            head = frame_header(msg, ENC_INPUT)
        except CiphertextError:
            return True
        return bool(head.get("ctx") == self.context.context_id)

    def _receive(self, msg: bytes, kind: str) -> tuple[dict[str, Any], list[bytes]]:
        with self.costs.timed("ser_s"):
            head, blobs = decode_frame(msg, kind)
        self.costs.add("bytes_received", len(msg))
        self.costs.add("messages_received", 1)
        cid = self.context.context_id
        if kind == GRAD_RETURN and self._pending is not None:  # see expect_gradients
            cid = self._pending.get("ctx", cid)
        check_ctx(head, cid, kind)
        return head, blobs

    def _reply(self, kind: str, step: int, cts: list[Any], plain: list[bytes]) -> bytes:
        with self.costs.timed("ser_s"):
            blobs = [to_bytes(c) for c in cts] + plain
            msg = encode_frame(kind, {"ctx": self.context.context_id, "step": step}, blobs)
        self.costs.add("bytes_sent", len(msg))
        self.costs.add("ciphertexts_sent", len(cts))
        self.costs.add("messages_sent", 1)
        return msg

    def _expect(self, stage: str, head: dict[str, Any] | None, kind: str) -> dict[str, Any]:
        e = self._eval
        if stage == "output" and e is not None and head is not None and head.get(
                "step") == e["step"]:
            return e  # an evaluation forward between a training forward and its backward
        p = self._pending
        if p is None or p["stage"] != stage or (head is not None and head.get("step") != p["step"]):
            raise ProtocolError(
                f"{kind}: out of order (pending: {None if p is None else (p['step'], p['stage'])})"
            )
        return p

    def _product(self, blobs: list[bytes], p: np.ndarray, layout: Layout, what: str,
                 y: np.ndarray, bound: float, *, zero_sum: bool = False,
                 rescale: bool = True) -> tuple[list[Any], np.ndarray]:
        """Load ``blobs``, compute Enc(M) @ p + y with every slot masked; count the ops.

        Returns the output ciphertexts and the (R x D) total of the masks the data owner's
        fold adds to each value (``zero_sum``: masks of each value add up to 0, so the data
        owner reads exactly ``M @ p + y`` but no partial sum of it; padded rows and columns,
        and the slots no value uses, keep independent masks, see :func:`_zero_sum`).
        """
        ctx = self.context
        self._headroom(bound + 2.0**self.spec.mask_bits, what)
        with self.costs.timed("ser_s"):
            cts = ctx.load_inputs(blobs, layout, what)
        ev = ctx.evaluator
        before = Counter(ev.counts)
        with self.costs.timed("server_s"):
            out = parallel_matmul(ctx, cts, blobs, p, layout, rescale=rescale,
                                  workers=self.spec.workers)
            masks = self._rnd.complex_uniform(layout.mask_shape, 2.0**self.spec.mask_bits)
            assert masks is not None
            if zero_sum:
                masks = _zero_sum(masks, layout)
            ev.add_plain(out, y, layout, masks)
            total = layout.fold(masks.reshape(len(out), -1))
        ops = Counter(ev.counts)
        ops.subtract(before)
        self.costs.add_counts(ops)
        self.costs.add("keyswitches_min", layout.min_keyswitches())
        return out, total

    def _share_bound(self) -> float:
        """Level B: the largest |A| the data owner's share can hold (0 at level A)."""
        spec = self.spec
        return 0.0 if spec.level == "A" else max(spec.share_bound, spec.initial_share)

    def _output_bound(self) -> np.ndarray:
        """Per output column, the largest |z| an honest data owner's answer gives: its inputs
        are within ``x_bound`` (it checks that before encrypting; the model owner cannot see
        them), so |z_j| <= x_bound * sum_i (|W_ij| + |A|max) + |b_j|."""
        a = self._share_bound()
        return self.spec.x_bound * (np.abs(self._w) + a).sum(axis=0) + np.abs(self._b)

    def _grad_bound(self, d: np.ndarray) -> np.ndarray:
        """Per output column, the largest |dW_ij| an honest answer gives: x_bound * sum_b
        |delta_bj|, plus at level B the data owner's correction ((A' - A)/lr, its momentum
        and weight decay of A)."""
        spec = self.spec
        bound = spec.x_bound * np.abs(d).sum(axis=0)
        if spec.level == "B":
            a = self._share_bound()
            assert spec.lr is not None
            bound = bound + 2 * a / spec.lr * (1 + spec.momentum) + spec.weight_decay * a
        return bound

    # -- protocol ------------------------------------------------------------------
    def forward(self, msg: bytes) -> bytes:
        """``enc_input`` -> ``masked_output`` = Enc(x W_s + b + R1). An evaluation input
        (no Enc(x^T)) leaves a training step in flight as it is."""
        self.costs.begin_step()
        spec, lay = self.spec, self.context.layouts
        head, blobs = self._receive(msg, ENC_INPUT)
        step, rows, n = head.get("step"), head.get("rows"), head.get("records", head.get("rows"))
        if not isinstance(step, int) or step <= self._last_step:
            raise ProtocolError(f"{ENC_INPUT}: step {step!r} replayed or out of order")
        if spec.level == "B" and self._grads is not None:
            raise ProtocolError(
                "level B: call apply_sgd() after receive_gradients() before the next "
                "forward (the data owner has already moved its share A)"
            )
        per = spec.rows // spec.batch_size
        if not isinstance(n, int) or not 1 <= n <= spec.batch_size or rows != n * per:
            raise ShapeError(
                f"{ENC_INPUT}: expected 1..{spec.batch_size} records of {per} rows, got "
                f"{n!r} records and {rows!r} rows"
            )
        got = tuple(head.get(k) for k in ("n_x", "n_xt", "n_a"))
        grad = got[1] != 0
        want = (lay["forward"].n_inputs,
                lay["grad"].n_inputs if grad else 0,
                lay["input_grad"].n_inputs if grad and spec.level == "B" else 0)
        if got != want or len(blobs) != sum(want):
            raise CiphertextError(
                f"{ENC_INPUT}: expected (x, x^T, A) ciphertext counts {want}, "
                f"got {got} with {len(blobs)} blobs"
            )
        n_x, n_xt, _ = want
        y = np.zeros((spec.rows, spec.mat_out))
        y[:rows] = self._b
        bound = spec.x_bound * np.abs(self._w).sum(axis=0).max() + np.abs(self._b).max(
            initial=0.0)
        out, r1 = self._product(blobs[:n_x], self._w, lay["forward"], "forward", y, bound)
        self._last_step = step
        slot = {"step": step, "rows": rows, "records": n, "r1": r1[:rows], "stage": "output",
                "zbound": self._output_bound(),
                "xt": blobs[n_x:n_x + n_xt], "a": blobs[n_x + n_xt:]}
        if grad:
            self._pending = slot
        else:  # evaluation: a training step in flight stays so
            self._eval = slot
        return self._reply(MASKED_OUTPUT, step, out, [])

    def receive_output(self, msg: bytes) -> torch.Tensor:
        """``output_return`` -> z = x W + b: (records, d_out) — a convolution's output shape
        ``(records, C_out, *out_spatial)`` — unmasked."""
        head, blobs = self._receive(msg, OUTPUT_RETURN)
        p = self._expect("output", head, OUTPUT_RETURN)
        if len(blobs) != 1:
            raise CiphertextError(f"{OUTPUT_RETURN}: expected 1 blob, got {len(blobs)}")
        y = array_from_bytes(blobs[0], (p["rows"], self.spec.mat_out), "returned output")
        z_rows = y - p["r1"]
        _within(z_rows, p["zbound"][None, :], "returned output z = xW + b", self.spec.flood_bits)
        z = torch.from_numpy(z_rows)
        if self._geo is not None:
            z = self._geo.fold_output(z, p["records"], self.spec.output_spatial)
        if p["xt"]:
            p["stage"] = "backward"
        else:
            self._eval = None
        return z.to(self.dtype)

    def _delta_rows(self, delta: torch.Tensor, p: dict[str, Any]) -> np.ndarray:
        spec, n = self.spec, p["records"]
        if self._geo is None:
            d = as_array(delta, "delta")
            if d.shape != (n, spec.d_out):
                raise ShapeError(f"delta: expected shape {(n, spec.d_out)}, got {tuple(d.shape)}")
            return d
        shape = (n, self._geo.out_channels, *spec.output_spatial)
        t = delta if isinstance(delta, torch.Tensor) else torch.as_tensor(delta)
        if tuple(t.shape) not in (shape, (n, spec.d_out)):
            raise ShapeError(f"delta: expected shape {shape}, got {tuple(t.shape)}")
        rows = self._geo.unfold_output_grad(t.reshape(shape))
        return as_array(rows, "delta")

    def backward(self, delta: torch.Tensor) -> bytes:
        """delta = dL/dz (the shape :meth:`receive_output` returned) -> ``masked_grad``."""
        p = self._expect("backward", None, "backward")
        spec, lay = self.spec, self.context.layouts
        d = self._delta_rows(delta, p)
        dpad = np.zeros((spec.rows, spec.mat_out))
        dpad[: p["rows"]] = d
        p["db"] = d.sum(axis=0)
        p["gbound"] = self._grad_bound(d)
        # no rescale: the weight gradient keeps ~1e-10 absolute precision (see grad_floor)
        g, r2 = self._product(p["xt"], dpad, lay["grad"], "weight gradient",
                              np.zeros((spec.mat_in, spec.mat_out)),
                              spec.x_bound * np.abs(d).sum(axis=0).max(), rescale=False)
        plain: list[bytes] = []
        if spec.level == "A":
            dx = d @ self._w.T
            if self._geo is not None:
                shape = (p["records"], self._geo.in_channels, *spec.input_spatial)
                dx = self._geo.fold_input_grad(torch.from_numpy(dx), shape).reshape(
                    p["records"], -1).numpy()
            plain.append(array_to_bytes(dx))
        else:
            y = self._w @ dpad.T
            bound = spec.share_bound * np.abs(d).sum(axis=1).max() + np.abs(y).max()
            g += self._product(p["a"], dpad.T, lay["input_grad"], "input gradient", y, bound,
                               zero_sum=True)[0]
        p["r2"], p["stage"] = r2, "grad"
        return self._reply(MASKED_GRAD, p["step"], g, plain)

    def receive_gradients(self, msg: bytes) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``grad_return`` -> (weight gradient (the layer's weight shape), bias gradient).

        Level A: the true dW. Level B: dW plus the data owner's correction (only
        meaningful for :meth:`apply_sgd`).
        """
        head, blobs = self._receive(msg, GRAD_RETURN)
        p = self._expect("grad", head, GRAD_RETURN)
        if len(blobs) != 1:
            raise CiphertextError(f"{GRAD_RETURN}: expected 1 blob, got {len(blobs)}")
        shape = (self.spec.mat_in, self.spec.mat_out)
        g = array_from_bytes(blobs[0], shape, "returned weight gradient") - p["r2"]
        if "gbound" in p:  # (a step resumed from a state of an older version has none)
            _within(g, p["gbound"][None, :], "returned weight gradient", self.spec.flood_bits)
        if self.spec.level == "A":
            g[np.abs(g) < self.grad_floor] = 0.0
        self._grads = (g, p["db"])
        self._pending = None
        gb = torch.from_numpy(p["db"]).to(self.dtype) if self.spec.bias else None
        gw = torch.from_numpy(g.T.copy()).reshape(self._weight_shape()).to(self.dtype)
        return gw, gb

    def apply_sgd(self, lr: float | None = None) -> None:
        """``torch.optim.SGD(lr, momentum, weight_decay)`` (the spec's) on this layer with
        the last received gradients.

        Level B requires exactly the agreed ``spec.lr`` (the data owner folded its
        correction in for it) and must follow every :meth:`receive_gradients` before the
        next forward.
        """
        if self._grads is None:
            raise ProtocolError("apply_sgd: no gradients received since the last update")
        spec = self.spec
        if spec.level == "B" and lr is not None and lr != spec.lr:
            raise ConfigError(f"level B: expected lr={spec.lr} (agreed in the spec), got {lr}")
        step = spec.lr if lr is None else lr
        if step is None:
            raise ConfigError("apply_sgd: pass `lr` (the LayerSpec has none)")
        g, db = self._grads
        g = g + spec.weight_decay * self._w
        db = db + spec.weight_decay * self._b
        if spec.momentum > 0:
            if self._velocity is not None:
                g = spec.momentum * self._velocity[0] + g
                db = spec.momentum * self._velocity[1] + db
            self._velocity = (g, db)
        self._w = self._w - step * g
        if spec.bias:
            self._b = self._b - step * db
        self._grads = None


def _within(values: np.ndarray, bound: np.ndarray, what: str, flood_bits: int) -> None:
    """Refuse a data owner's answer past what an honest one can give (CKKS error and the
    data owner's rounding allowed for). A data owner that encrypts inputs past ``x_bound``
    reads the model owner's weights through the masks (each such forward gives W to a few
    percent); the first such answer stops the layer here, after that one decryption."""
    limit = bound * (1 + 1e-6) + 1e-6 + 2.0 * 2.0**-flood_bits  # + the data owner's rounding
    if not bool(np.all(np.abs(values) <= limit)):
        worst = float(np.max(np.abs(values) - limit))
        raise HEError(f"{what}: the data owner's answer exceeds what inputs within the agreed "
                      f"x_bound can give (by {worst:.3g}): it encrypted inputs past x_bound "
                      "(this reveals the model owner's weights to it) or answered garbage; "
                      "refused, the layer stops here")


def _zero_sum(masks: np.ndarray, layout: Layout) -> np.ndarray:
    """Make the partial-sum masks of every real output value (row < R, column < D) add up to
    0; every other slot part (padded rows and columns, whose fold the data owner discards,
    and the slots past ``F*L``) keeps its independent uniform mask. With one partial sum a
    value's mask becomes 0: the protocol hands the data owner that value."""
    n, fl = len(masks), layout.features * layout.lanes
    shape = (n, layout.replicas, layout.partials, layout.width, layout.lanes)
    first = masks[:, :fl].reshape(shape)
    parts = np.stack([first.real, first.imag], axis=-1)
    zs = parts.copy()
    zs[:, :, 0] -= zs.sum(axis=2)
    parts = np.where(layout.value_mask(), zs, parts)
    out = masks.copy()
    out[:, :fl] = (parts[..., 0] + 1j * parts[..., 1]).reshape(n, fl)
    return out
