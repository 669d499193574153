"""SEAL objects <-> bytes. ``tenseal.sealapi`` only saves/loads files, so a private tmpfs
directory is used; every load failure becomes :class:`CiphertextError`."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from typing import Any

from syft_split.errors import CiphertextError

__all__ = ["to_bytes", "load_ciphertext", "load_galois_keys"]

_DIR: str | None = None


def _path() -> str:
    global _DIR
    if _DIR is None or not os.path.isdir(_DIR):
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        _DIR = tempfile.mkdtemp(prefix="he_layers_", dir=base)
        atexit.register(shutil.rmtree, _DIR, True)
    return os.path.join(_DIR, uuid.uuid4().hex)


def to_bytes(obj: Any) -> bytes:
    """SEAL's own (compressed, seeded when possible) serialization of ``obj``."""
    path = _path()
    try:
        obj.save(path)
        with open(path, "rb") as fh:
            return fh.read()
    finally:
        if os.path.exists(path):
            os.unlink(path)


def _load(target: Any, seal_context: Any, data: bytes, what: str) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
        raise CiphertextError(f"{what}: expected non-empty bytes, got {type(data).__name__}")
    path = _path()
    try:
        with open(path, "wb") as fh:
            fh.write(data)
        target.load(seal_context, path)
    except Exception as exc:  # SEAL raises ValueError/RuntimeError/... for bad data
        raise CiphertextError(
            f"{what}: bytes do not deserialize under this CKKS context ({exc})"
        ) from exc
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return target


def load_ciphertext(seal_context: Any, data: bytes, what: str = "ciphertext") -> Any:
    """Load and validate a ``seal::Ciphertext`` against ``seal_context``."""
    from tenseal import sealapi

    return _load(sealapi.Ciphertext(), seal_context, data, what)


def load_galois_keys(seal_context: Any, data: bytes) -> Any:
    """Load ``seal::GaloisKeys`` (rotation keys) against ``seal_context``."""
    from tenseal import sealapi

    return _load(sealapi.GaloisKeys(), seal_context, data, "galois keys")
