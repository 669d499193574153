"""Encrypted Linear layer for split-learning training: a two-party protocol over bytes.

Parties: :class:`HEClient` (data owner: secret key, x, and at level B the share A) and
:class:`HEServer` (model owner: W_s, b, public context only). Every message is ``bytes``
(frames of :mod:`he_layers.wire`: JSON header + SEAL ciphertexts / float64 arrays).

One training step (B rows, level A or B)::

    client.encrypt_input(x)            -> enc_input      Enc(x), Enc(x^T) [, Enc(A)]
    server.forward(enc_input)          -> masked_output  Enc(x W_s + b + R1)
    client.decrypt_output(masked)      -> output_return  x W_s + b + R1 [+ x A], rounded
    server.receive_output(ret)         -> z = x W + b    (server runs its upper layers)
    server.backward(delta)             -> masked_grad    Enc(x^T delta + R2) and
                                                         A: delta W^T (plain)
                                                         B: Enc(A delta^T) + W_s delta^T
    client.decrypt_gradients(masked)   -> (grad_return, dL/dx)
                                          grad_return = x^T delta + R2 [+ eps/lr], rounded
    server.receive_gradients(ret)      -> (dW or dW + eps/lr, db)
    server.apply_sgd()                    W_s <- W_s - lr * that;  b <- b - lr * db
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from syft_split.errors import (
    CiphertextError,
    ConfigError,
    EmptyBatchError,
    HEError,
    NonFiniteError,
    ProtocolError,
    ShapeError,
)

from ._seal_io import to_bytes
from .costs import CostMeter
from .keys import KeyOwner, ServerContext
from .spec import LayerSpec
from .wire import array_from_bytes, array_to_bytes, decode_frame, encode_frame

__all__ = ["HEClient", "HEServer", "combine_shares"]

_ENC_INPUT, _MASKED_OUTPUT, _OUTPUT_RETURN = "enc_input", "masked_output", "output_return"
_MASKED_GRAD, _GRAD_RETURN = "masked_grad", "grad_return"


def combine_shares(server_share: torch.Tensor, client_share: torch.Tensor) -> torch.Tensor:
    """The true level-B weight ``W = W_s + A`` (torch layout ``(d_out, d_in)``); tests only."""
    if server_share.shape != client_share.shape:
        raise ShapeError(
            f"shares: expected equal shapes, got {tuple(server_share.shape)} "
            f"and {tuple(client_share.shape)}"
        )
    return server_share.to(torch.float64) + client_share.to(torch.float64)


def _as_array(t: Any, what: str) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        a = t.detach().cpu().to(torch.float64).numpy()
    elif isinstance(t, np.ndarray):
        a = t.astype(np.float64)
    else:
        raise ShapeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if not np.isfinite(a).all():
        raise NonFiniteError(f"{what}: contains NaN or Inf")
    return a


class _Random:
    """Uniform masks from the OS CSPRNG (or a seeded numpy generator, for tests)."""

    def __init__(self, seed: int | None) -> None:
        self._rng = None if seed is None else np.random.default_rng(seed)

    def uniform(self, shape: tuple[int, ...], bound: float) -> np.ndarray:
        n = int(np.prod(shape))
        if self._rng is not None:
            u = self._rng.random(n)
        else:
            u = (np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)) * 2.0**-53
        return ((2.0 * u - 1.0) * bound).reshape(shape)


def _flood(a: np.ndarray, bits: int, rnd: _Random) -> np.ndarray:
    """Noise ±2^-bits, then round to that grid: what a decryption leaks is coarsened."""
    q = 2.0**-bits
    return np.round((a + rnd.uniform(a.shape, q)) / q) * q


def _check_ctx(head: dict[str, Any], cid: str, what: str) -> None:
    if head.get("ctx") != cid:
        raise CiphertextError(
            f"{what}: message belongs to CKKS context {head.get('ctx')!r}, expected {cid!r} "
            "(ciphertexts from another key owner or run)"
        )


class HEClient:
    """Data-owner party. Holds the secret key (via ``key_owner``), x and, at level B, A.

    Args:
        key_owner: the run's :class:`KeyOwner` (fresh per run).
        seed: seeds the mask generator (tests only; default: OS CSPRNG).
    """

    def __init__(self, key_owner: KeyOwner, *, seed: int | None = None) -> None:
        self.keys = key_owner
        self.spec: LayerSpec = key_owner.spec
        self._rnd = _Random(seed)
        self._step = 0
        self._pending: dict[str, Any] | None = None
        self._share = np.zeros((self.spec.d_in, self.spec.d_out))
        if self.spec.level == "B" and self.spec.initial_share > 0:
            self._share = self._rnd.uniform(self._share.shape, self.spec.initial_share)
        self.costs = CostMeter()

    @property
    def weight_share(self) -> torch.Tensor:
        """Level B: the data owner's share A, torch layout ``(d_out, d_in)`` (zero at level A)."""
        return torch.from_numpy(self._share.T.copy())

    def _sent(self, msg: bytes, n_ct: int) -> bytes:
        self.costs.add("bytes_sent", len(msg))
        self.costs.add("ciphertexts_sent", n_ct)
        return msg

    def _receive(self, msg: bytes, kind: str, stage: str) -> tuple[dict[str, Any], list[bytes]]:
        head, blobs = decode_frame(msg, kind)
        self.costs.add("bytes_received", len(msg))
        _check_ctx(head, self.keys.context_id, kind)
        p = self._pending
        if p is None or p["stage"] != stage or head.get("step") != p["step"]:
            raise ProtocolError(
                f"{kind}: unexpected for step {head.get('step')!r} (pending: "
                f"{None if p is None else (p['step'], p['stage'])})"
            )
        return head, blobs

    def encrypt_input(self, x: torch.Tensor, *, need_grad: bool = True) -> bytes:
        """Start a step: encrypt x (rows x d_in) -> ``enc_input`` bytes for the server."""
        a = _as_array(x, "input x")
        spec = self.spec
        if a.ndim != 2 or a.shape[1] != spec.d_in:
            raise ShapeError(
                f"input x: expected shape (rows <= {spec.batch_size}, {spec.d_in}), "
                f"got {tuple(a.shape)}"
            )
        rows = a.shape[0]
        if rows == 0:
            raise EmptyBatchError("input x: a batch with no rows")
        if rows > spec.batch_size:
            raise ShapeError(
                f"input x: expected at most batch_size={spec.batch_size} rows, got {rows}"
            )
        if np.abs(a).max() > spec.x_bound:
            raise HEError(
                f"input x: |x| reaches {np.abs(a).max():.4g} > x_bound={spec.x_bound} agreed "
                "in the LayerSpec (normalize the inputs or raise x_bound within the headroom)"
            )
        self.costs.begin_step()
        self._step += 1
        lay = self.keys.layouts
        with self.costs.timed("enc_s"):
            full = np.zeros((spec.batch_size, spec.d_in))
            full[:rows] = a
            blobs = self.keys.encrypt_matrix(full, lay["forward"])
            n_x, n_xt, n_a = len(blobs), 0, 0
            if need_grad:
                xt = self.keys.encrypt_matrix(full.T, lay["grad"])
                n_xt = len(xt)
                blobs += xt
                if spec.level == "B":
                    sa = self.keys.encrypt_matrix(self._share, lay["input_grad"])
                    n_a = len(sa)
                    blobs += sa
        dtype = x.dtype if isinstance(x, torch.Tensor) else torch.float64
        self._pending = {"step": self._step, "rows": rows, "x": a, "stage": "output",
                         "need_grad": need_grad, "dtype": dtype}
        head = {"ctx": self.keys.context_id, "step": self._step, "rows": rows,
                "n_x": n_x, "n_xt": n_xt, "n_a": n_a}
        return self._sent(encode_frame(_ENC_INPUT, head, blobs), len(blobs))

    def decrypt_output(self, msg: bytes) -> bytes:
        """``masked_output`` -> ``output_return``: decrypt (level B: add x A), round, return."""
        head, blobs = self._receive(msg, _MASKED_OUTPUT, "output")
        p = self._pending
        assert p is not None
        with self.costs.timed("dec_s"):
            y = self.keys.decrypt_matrix(blobs, self.keys.layouts["forward"], "masked output")
        with self.costs.timed("client_s"):
            y = y[: p["rows"]]
            if self.spec.level == "B":
                y = y + p["x"] @ self._share
            y = _flood(y, self.spec.flood_bits, self._rnd)
        p["stage"] = "grad" if p["need_grad"] else "done"
        if not p["need_grad"]:
            self._pending = None
        head = {"ctx": self.keys.context_id, "step": p["step"], "shape": list(y.shape)}
        return self._sent(encode_frame(_OUTPUT_RETURN, head, [array_to_bytes(y)]), 0)

    def decrypt_gradients(self, msg: bytes) -> tuple[bytes, torch.Tensor]:
        """``masked_grad`` -> (``grad_return`` bytes, dL/dx (rows x d_in)).

        Level B also refreshes the share: A' uniform in ±share_bound, eps = A' - A, and the
        returned gradient carries eps/lr so that W_s + A follows plain SGD exactly.
        """
        _, blobs = self._receive(msg, _MASKED_GRAD, "grad")
        p = self._pending
        assert p is not None
        lay, spec, rows = self.keys.layouts, self.spec, p["rows"]
        n_g = lay["grad"].n_outputs
        expected = n_g + (1 if spec.level == "A" else lay["input_grad"].n_outputs)
        if len(blobs) != expected:
            raise CiphertextError(f"{_MASKED_GRAD}: expected {expected} blobs, got {len(blobs)}")
        with self.costs.timed("dec_s"):
            g = self.keys.decrypt_matrix(blobs[:n_g], lay["grad"], "masked weight gradient")
            if spec.level == "A":
                dx = array_from_bytes(blobs[n_g], (rows, spec.d_in), "input gradient")
            else:
                dxt = self.keys.decrypt_matrix(blobs[n_g:], lay["input_grad"], "input gradient")
                dx = dxt.T[:rows]
        with self.costs.timed("client_s"):
            if spec.level == "B":
                assert spec.lr is not None
                new = self._rnd.uniform(self._share.shape, spec.share_bound)
                g = g + (new - self._share) / spec.lr
                self._share = new
            g = _flood(g, spec.flood_bits, self._rnd)
        self._pending = None
        ret = encode_frame(_GRAD_RETURN, {"ctx": self.keys.context_id, "step": p["step"],
                                          "shape": list(g.shape)}, [array_to_bytes(g)])
        return self._sent(ret, 0), torch.from_numpy(np.ascontiguousarray(dx)).to(p["dtype"])


class HEServer:
    """Model-owner party. Holds W_s (level A: W), b and only the public context.

    Args:
        context: :class:`ServerContext` loaded from the data owner's public bytes.
        weight: ``(d_out, d_in)`` like ``nn.Linear.weight`` (level B: the initial W; the
            data owner's share starts at 0, so W_s = W until the first update).
        bias: ``(d_out,)`` or None (must match ``spec.bias``).
        seed: seeds the mask generator (tests only; default: OS CSPRNG).
    """

    def __init__(
        self,
        context: ServerContext,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        seed: int | None = None,
    ) -> None:
        self.context = context
        self.spec: LayerSpec = context.spec
        self.dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float64
        self._set(weight, bias)
        self._rnd = _Random(seed)
        self._last_step = 0
        self._pending: dict[str, Any] | None = None
        self._grads: tuple[np.ndarray, np.ndarray] | None = None
        self.costs = CostMeter()

    @classmethod
    def from_linear(
        cls, context: ServerContext, linear: torch.nn.Linear, *, seed: int | None = None
    ) -> HEServer:
        """Server party initialised from an ``nn.Linear`` (weights are copied)."""
        return cls(context, linear.weight, linear.bias, seed=seed)

    def _set(self, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        spec = self.spec
        if weight is not None:
            w = _as_array(weight, "weight")
            if w.shape != (spec.d_out, spec.d_in):
                raise ShapeError(
                    f"weight: expected shape {(spec.d_out, spec.d_in)}, got {tuple(w.shape)}"
                )
            self._w = w.T.copy()
        if not spec.bias and bias is not None:
            raise ConfigError("bias given but the LayerSpec says bias=False")
        if bias is not None:
            b = _as_array(bias, "bias")
            if b.shape != (spec.d_out,):
                raise ShapeError(f"bias: expected shape ({spec.d_out},), got {tuple(b.shape)}")
            self._b = b.copy()
        elif not hasattr(self, "_b"):
            self._b = np.zeros(spec.d_out)

    @property
    def weight(self) -> torch.Tensor:
        """Server's weight ``(d_out, d_in)``; at level B only the share W_s (not W)."""
        return torch.from_numpy(self._w.T.copy()).to(self.dtype)

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
                f"agreed lr={self.spec.lr} (W = W_s + A must follow plain SGD)"
            )
        self._set(weight, bias)

    def _limit(self) -> float:
        return 2.0 ** (self.context.params.headroom_bits - 1)

    def _headroom(self, bound: float, what: str) -> None:
        if not math.isfinite(bound) or bound > self._limit():
            raise HEError(
                f"{what}: values could reach {bound:.4g} > CKKS headroom "
                f"{self._limit():.4g} (2^(q0 - scale - 1)); lower x_bound/mask_bits, "
                "rescale the inputs or use a larger first prime"
            )

    def _receive(self, msg: bytes, kind: str) -> tuple[dict[str, Any], list[bytes]]:
        head, blobs = decode_frame(msg, kind)
        self.costs.add("bytes_received", len(msg))
        _check_ctx(head, self.context.context_id, kind)
        return head, blobs

    def _reply(self, kind: str, blobs: list[bytes], n_ct: int) -> bytes:
        assert self._pending is not None
        msg = encode_frame(kind, {"ctx": self.context.context_id,
                                  "step": self._pending["step"]}, blobs)
        self.costs.add("bytes_sent", len(msg))
        self.costs.add("ciphertexts_sent", n_ct)
        return msg

    def _expect(self, stage: str, head: dict[str, Any] | None, kind: str) -> dict[str, Any]:
        p = self._pending
        if p is None or p["stage"] != stage or (head is not None and head.get("step") != p["step"]):
            raise ProtocolError(
                f"{kind}: out of order (pending: {None if p is None else (p['step'], p['stage'])})"
            )
        return p

    def forward(self, msg: bytes) -> bytes:
        """``enc_input`` -> ``masked_output`` = Enc(x W_s + b + R1)."""
        self.costs.begin_step()
        spec, lay, ctx = self.spec, self.context.layouts, self.context
        with self.costs.timed("server_s"):
            head, blobs = self._receive(msg, _ENC_INPUT)
            step, rows = head.get("step"), head.get("rows")
            if not isinstance(step, int) or step <= self._last_step:
                raise ProtocolError(f"{_ENC_INPUT}: step {step!r} replayed or out of order")
            if spec.level == "B" and self._grads is not None:
                raise ProtocolError(
                    "level B: call apply_sgd() after receive_gradients() before the next "
                    "forward (the data owner has already moved its share A)"
                )
            if not isinstance(rows, int) or not 1 <= rows <= spec.batch_size:
                raise ShapeError(f"{_ENC_INPUT}: expected 1..{spec.batch_size} rows, got {rows!r}")
            got = tuple(head.get(k) for k in ("n_x", "n_xt", "n_a"))
            grad = got[1] != 0
            want = (lay["forward"].n_inputs,
                    lay["grad"].n_inputs if grad else 0,
                    lay["input_grad"].n_inputs if grad and spec.level == "B" else 0)
            if got != want or len(blobs) != sum(want):
                raise CiphertextError(
                    f"{_ENC_INPUT}: expected (x, x^T, A) ciphertext counts {want}, "
                    f"got {got} with {len(blobs)} blobs"
                )
            n_x, n_xt, _ = want
            x_cts = ctx.load_inputs(blobs[:n_x], lay["forward"], "encrypted input")
            colsum = np.abs(self._w).sum(axis=0).max()
            self._headroom(spec.x_bound * colsum + np.abs(self._b).max(initial=0.0)
                           + 2.0**spec.mask_bits, "forward")
            out = ctx.evaluator.matmul(x_cts, self._w, lay["forward"])
            r1 = self._rnd.uniform((rows, spec.d_out), 2.0**spec.mask_bits)
            y = np.zeros((spec.batch_size, spec.d_out))
            y[:rows] = r1 + self._b
            ctx.evaluator.add_plain(out, y, lay["forward"])
            self._last_step = step
            self._pending = {"step": step, "rows": rows, "r1": r1, "stage": "output",
                             "xt": blobs[n_x:n_x + n_xt], "a": blobs[n_x + n_xt:]}
            reply = self._reply(_MASKED_OUTPUT, [to_bytes(c) for c in out], len(out))
        return reply

    def receive_output(self, msg: bytes) -> torch.Tensor:
        """``output_return`` -> z = x W + b (rows x d_out), unmasked."""
        with self.costs.timed("server_s"):
            head, blobs = self._receive(msg, _OUTPUT_RETURN)
            p = self._expect("output", head, _OUTPUT_RETURN)
            if len(blobs) != 1:
                raise CiphertextError(f"{_OUTPUT_RETURN}: expected 1 blob, got {len(blobs)}")
            y = array_from_bytes(blobs[0], (p["rows"], self.spec.d_out), "returned output")
            z = y - p["r1"]
            if p["xt"]:
                p["stage"] = "backward"
            else:
                self._pending = None
        return torch.from_numpy(z).to(self.dtype)

    def backward(self, delta: torch.Tensor) -> bytes:
        """delta = dL/dz (rows x d_out) -> ``masked_grad`` bytes for the data owner."""
        p = self._expect("backward", None, "backward")
        spec, lay, ctx = self.spec, self.context.layouts, self.context
        d = _as_array(delta, "delta")
        if d.shape != (p["rows"], spec.d_out):
            raise ShapeError(
                f"delta: expected shape {(p['rows'], spec.d_out)}, got {tuple(d.shape)}"
            )
        with self.costs.timed("server_s"):
            dpad = np.zeros((spec.batch_size, spec.d_out))
            dpad[: p["rows"]] = d
            p["db"] = d.sum(axis=0)
            self._headroom(spec.x_bound * np.abs(d).sum(axis=0).max() + 2.0**spec.mask_bits,
                           "weight gradient")
            xt = ctx.load_inputs(p["xt"], lay["grad"], "encrypted input (transposed)")
            g = ctx.evaluator.matmul(xt, dpad, lay["grad"])
            r2 = self._rnd.uniform((spec.d_in, spec.d_out), 2.0**spec.mask_bits)
            ctx.evaluator.add_plain(g, r2, lay["grad"])
            blobs = [to_bytes(c) for c in g]
            n_ct = len(g)
            if spec.level == "A":
                blobs.append(array_to_bytes(d @ self._w.T))
            else:
                plain = self._w @ dpad.T
                self._headroom(spec.share_bound * np.abs(d).sum(axis=1).max()
                               + np.abs(plain).max(), "input gradient")
                a = ctx.load_inputs(p["a"], lay["input_grad"], "encrypted share A")
                dxt = ctx.evaluator.matmul(a, dpad.T, lay["input_grad"])
                ctx.evaluator.add_plain(dxt, plain, lay["input_grad"])
                blobs += [to_bytes(c) for c in dxt]
                n_ct += len(dxt)
            p["r2"], p["stage"] = r2, "grad"
            reply = self._reply(_MASKED_GRAD, blobs, n_ct)
        return reply

    def receive_gradients(self, msg: bytes) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``grad_return`` -> (weight gradient ``(d_out, d_in)``, bias gradient).

        Level A: the true dW. Level B: dW + eps/lr (only meaningful for :meth:`apply_sgd`).
        """
        with self.costs.timed("server_s"):
            head, blobs = self._receive(msg, _GRAD_RETURN)
            p = self._expect("grad", head, _GRAD_RETURN)
            if len(blobs) != 1:
                raise CiphertextError(f"{_GRAD_RETURN}: expected 1 blob, got {len(blobs)}")
            shape = (self.spec.d_in, self.spec.d_out)
            g = array_from_bytes(blobs[0], shape, "returned weight gradient") - p["r2"]
            self._grads = (g, p["db"])
            self._pending = None
        gb = torch.from_numpy(p["db"]).to(self.dtype) if self.spec.bias else None
        return torch.from_numpy(g.T.copy()).to(self.dtype), gb

    def apply_sgd(self, lr: float | None = None) -> None:
        """Plain SGD on this layer with the last received gradients.

        Level B requires exactly the agreed ``spec.lr`` (the data owner folded eps/lr in)
        and must follow every :meth:`receive_gradients` before the next forward.
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
        self._w -= step * g
        if spec.bias:
            self._b -= step * db
        self._grads = None
