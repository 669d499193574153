"""Key material: the data owner's :class:`KeyOwner` and the model owner's :class:`ServerContext`.

The data owner generates a fresh CKKS secret key per training run ("rotate per run":
never reuse a KeyOwner across runs or sessions) and exports public material only: the
TenSEAL context without secret/public/relinearization keys plus only the Galois keys the
layouts need (two per packed layout, instead of TenSEAL's ~35 MB default set).
"""

from __future__ import annotations

import math
import secrets
from typing import Any

import numpy as np
import tenseal as ts
from tenseal import sealapi

from syft_split.errors import CiphertextError, HEError, InsecureParametersError

from ._seal_io import load_ciphertext, load_galois_keys, to_bytes
from .costs import CostMeter
from .evaluator import MatmulEvaluator
from .packing import Layout, galois_element
from .params import MAX_COEFF_BITS_128, CKKSParams
from .spec import LayerSpec
from .wire import MAGIC, decode_frame, encode_frame, fingerprint

__all__ = ["KeyOwner", "ServerContext"]

_KIND = "public_context"


def _level_parms(seal_context: Any) -> tuple[Any, Any]:
    top = seal_context.first_context_data()
    while top.chain_index() > 1:
        top = top.next_context_data()
    return top.parms_id(), top.next_context_data().parms_id()


def _check_ciphertext(ct: Any, parms_id: Any, scale: float, what: str) -> None:
    if list(ct.parms_id()) != list(parms_id):
        raise CiphertextError(f"{what}: ciphertext is at the wrong modulus level")
    if ct.size() != 2 or not ct.is_ntt_form():
        raise CiphertextError(
            f"{what}: expected a size-2 NTT-form ciphertext, got size {ct.size()}"
        )
    if not math.isfinite(ct.scale) or abs(ct.scale / scale - 1.0) > 1e-9:
        raise CiphertextError(f"{what}: expected scale 2^{np.log2(scale):.1f}, got {ct.scale!r}")


class KeyOwner:
    """Data-owner side: holds the secret key of one run; encrypts and decrypts matrices.

    Args:
        spec: the public agreement (shapes, level, masks) of the encrypted layer.
        params: CKKS parameters (validated: 128-bit security, precision, headroom).
    """

    def __init__(self, spec: LayerSpec, params: CKKSParams | None = None) -> None:
        self.params = (params or CKKSParams()).validate()
        self.spec = spec.validate(self.params)
        try:
            self._ctx = ts.context(
                ts.SCHEME_TYPE.CKKS,
                self.params.poly_modulus_degree,
                coeff_mod_bit_sizes=list(self.params.coeff_mod_bit_sizes),
                encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
            )
        except ValueError as exc:
            raise InsecureParametersError(f"SEAL refused {self.params}: {exc}") from exc
        self._ctx.global_scale = self.params.scale
        sc = self._ctx.seal_context().data
        sk = self._ctx.secret_key().data
        self.layouts: dict[str, Layout] = self.spec.layouts(self.params)
        self.rotation_steps = self.spec.rotation_steps(self.params)
        n = self.params.poly_modulus_degree
        gk = b""
        if self.rotation_steps:
            keygen = sealapi.KeyGenerator(sc, sk)
            gk = to_bytes(keygen.create_galois_keys(
                [galois_element(s, n) for s in self.rotation_steps]))
        ctx_bytes = self._ctx.serialize(
            save_public_key=False, save_secret_key=False,
            save_galois_keys=False, save_relin_keys=False,
        )
        header = {
            "run_id": secrets.token_hex(16),
            "params": self.params.to_dict(),
            "spec": self.spec.to_dict(),
            "rotation_steps": self.rotation_steps,
            "layouts": {k: v.to_dict() for k, v in self.layouts.items()},
        }
        self._public = encode_frame(_KIND, header, [ctx_bytes, gk])
        self.context_id = fingerprint(self._public)
        self._seal = sc
        self._encoder = sealapi.CKKSEncoder(sc)
        self._encryptor = sealapi.Encryptor(sc, sk)
        self._decryptor = sealapi.Decryptor(sc, sk)
        self._in_parms, self._out_parms = _level_parms(sc)
        top = sc.get_context_data(self._in_parms)
        self._rescale_prime = float(top.parms().coeff_modulus()[-1].value())

    def public_context_bytes(self) -> bytes:
        """Public material for the model owner: no secret key, only the needed Galois keys."""
        return self._public

    def encrypt_matrix(self, m: np.ndarray, layout: Layout,
                       costs: CostMeter | None = None) -> list[bytes]:
        """Encrypt an (R x C) matrix in ``layout`` (seeded symmetric ciphertexts, ~half size).

        ``costs`` (optional) gets the time in ``enc_s`` (encode+encrypt) and ``ser_s``.
        """
        meter = costs or CostMeter()
        out = []
        for v in layout.pack_input(np.asarray(m, dtype=np.float64)):
            with meter.timed("enc_s"):
                pt = sealapi.Plaintext()
                self._encoder.encode(v.tolist(), self._in_parms, self.params.scale, pt)
                ct = self._encryptor.encrypt_symmetric(pt)
            with meter.timed("ser_s"):
                out.append(to_bytes(ct))
        return out

    def decrypt_matrix(self, blobs: list[bytes], layout: Layout, what: str,
                       costs: CostMeter | None = None, *, rescaled: bool = True) -> np.ndarray:
        """Decrypt the outputs of a product in ``layout`` to an (R x D) matrix.

        ``rescaled=False``: the product kept both primes (scale Delta*q1, no rescale error).
        ``costs`` (optional) gets the time in ``ser_s`` (loading) and ``dec_s``.
        """
        parms, scale = self._out_parms, self.params.scale
        if not rescaled:
            parms, scale = self._in_parms, self.params.scale * self._rescale_prime
        if len(blobs) != layout.n_outputs:
            raise CiphertextError(
                f"{what}: expected {layout.n_outputs} ciphertexts, got {len(blobs)}"
            )
        meter = costs or CostMeter()
        vecs = []
        for b in blobs:
            with meter.timed("ser_s"):
                ct = load_ciphertext(self._seal, b, what)
            _check_ciphertext(ct, parms, scale, what)
            with meter.timed("dec_s"):
                pt = sealapi.Plaintext()
                self._decryptor.decrypt(ct, pt)
                vecs.append(np.asarray(self._encoder.decode_complex(pt)))
        return layout.unpack_output(np.stack(vecs))


class ServerContext:
    """Model-owner side: the public CKKS context of one run, refused if it is private.

    Build it with :meth:`from_bytes` on the bytes of :meth:`KeyOwner.public_context_bytes`.
    """

    def __init__(
        self, params: CKKSParams, spec: LayerSpec, context: Any, galois_keys: Any,
        public_bytes: bytes,
    ) -> None:
        self.params = params
        self.spec = spec
        self.context_id = fingerprint(public_bytes)
        #: the public bytes this context was loaded from (for :mod:`he_layers.workers`)
        self.public_bytes = public_bytes
        self._ctx = context
        self.seal_context = context.seal_context().data
        self.layouts: dict[str, Layout] = spec.layouts(params)
        self.evaluator = MatmulEvaluator(self.seal_context, galois_keys)

    @classmethod
    def from_bytes(cls, data: bytes) -> ServerContext:
        """Load and check public material.

        Raises:
            HEError: the context holds a secret key, is not CKKS, or lacks rotation keys.
            InsecureParametersError: parameters below 128-bit security / too imprecise.
            CiphertextError: bytes that do not parse.
        """
        if isinstance(data, bytes | bytearray) and bytes(data[:4]) != MAGIC:
            try:
                raw = ts.context_from(bytes(data))
            except Exception as exc:
                raise CiphertextError("public context: bytes do not parse") from exc
            if raw.is_private():
                raise HEError(
                    "refusing a CKKS context that holds a SECRET KEY: the data owner must send "
                    "KeyOwner.public_context_bytes() (public material only)"
                )
            raise HEError(
                "not an he_layers public context (missing layer spec and rotation keys): "
                "expected the bytes of KeyOwner.public_context_bytes()"
            )
        head, blobs = decode_frame(data, _KIND)
        if len(blobs) != 2:
            raise CiphertextError(f"public context: expected 2 sections, got {len(blobs)}")
        try:
            ctx = ts.context_from(blobs[0])
        except Exception as exc:
            raise CiphertextError("public context: TenSEAL context does not parse") from exc
        if ctx.is_private():
            raise HEError(
                "refusing a CKKS context that holds a SECRET KEY: the data owner must send "
                "public material only (KeyOwner.public_context_bytes())"
            )
        params = CKKSParams.from_dict(head.get("params", {})).validate()
        sc = ctx.seal_context().data
        parms = sc.key_context_data().parms()
        actual_bits = tuple(m.bit_count() for m in parms.coeff_modulus())
        if not str(parms.scheme()).endswith("CKKS"):
            raise HEError(f"public context: expected a CKKS context, got {parms.scheme()}")
        n = parms.poly_modulus_degree()
        if n != params.poly_modulus_degree or actual_bits != params.coeff_mod_bit_sizes:
            raise InsecureParametersError(
                f"public context: header says N={params.poly_modulus_degree} "
                f"{params.coeff_mod_bit_sizes}, the SEAL context has N={n} {actual_bits}"
            )
        if sum(actual_bits) > MAX_COEFF_BITS_128.get(n, 0):
            raise InsecureParametersError(
                f"public context below 128-bit security: {sum(actual_bits)} coefficient bits "
                f"at N={n} (expected <= {MAX_COEFF_BITS_128.get(n)})"
            )
        spec = LayerSpec.from_dict(head.get("spec", {})).validate(params)
        mine = {k: v.to_dict() for k, v in spec.layouts(params).items()}
        if head.get("layouts") != mine:
            raise HEError(
                "public context: the data owner's ciphertext layouts differ from this side's "
                f"(expected {mine}, got {head.get('layouts')}); same he_layers version needed"
            )
        steps = spec.rotation_steps(params)
        gk = load_galois_keys(sc, blobs[1]) if blobs[1] else sealapi.GaloisKeys()
        missing = [s for s in steps if not (blobs[1] and gk.has_key(galois_element(s, n)))]
        if missing:
            raise HEError(f"public context lacks Galois keys for rotation steps {missing}")
        return cls(params, spec, ctx, gk, bytes(data))

    def is_private(self) -> bool:
        """Always False (a private context is refused at load time)."""
        return bool(self._ctx.is_private())

    def load_inputs(self, blobs: list[bytes], layout: Layout, what: str) -> list[Any]:
        """Deserialize and validate client ciphertexts for a product in ``layout``."""
        if len(blobs) != layout.n_inputs:
            raise CiphertextError(
                f"{what}: expected {layout.n_inputs} ciphertexts, got {len(blobs)}"
            )
        cts = []
        for b in blobs:
            ct = load_ciphertext(self.seal_context, b, what)
            _check_ciphertext(ct, self.evaluator.input_parms_id, self.params.scale, what)
            cts.append(ct)
        return cts
