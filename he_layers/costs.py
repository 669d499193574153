"""Per-step cost accounting: seconds per phase and bytes each way."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["CostMeter", "merge_costs"]

_KEYS = ("enc_s", "dec_s", "client_s", "server_s", "bytes_sent", "bytes_received",
         "ciphertexts_sent", "ciphertexts_received")


class CostMeter:
    """Accumulates one party's costs, per step and in total.

    Keys: ``enc_s`` (encode+encrypt+serialize), ``dec_s`` (load+decrypt+decode),
    ``client_s`` (other data-owner work), ``server_s`` (model-owner HE work incl.
    (de)serialization), ``bytes_sent``/``bytes_received``, ``ciphertexts_sent/received``.
    """

    def __init__(self) -> None:
        self.steps = 0
        self.total: dict[str, float] = dict.fromkeys(_KEYS, 0.0)
        self.last_step: dict[str, float] = dict.fromkeys(_KEYS, 0.0)

    def begin_step(self) -> None:
        """Start a new step (the previous one stays in ``total``)."""
        self.steps += 1
        self.last_step = dict.fromkeys(_KEYS, 0.0)

    def add(self, key: str, value: float) -> None:
        """Add ``value`` to ``key`` for the current step and the total."""
        self.last_step[key] += value
        self.total[key] += value

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Time the ``with`` body into ``key``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(key, time.perf_counter() - t0)

    def as_dict(self) -> dict[str, float]:
        """``{"steps": n, "<key>": total, "last_<key>": last step}``."""
        out: dict[str, float] = {"steps": float(self.steps)}
        out.update(self.total)
        out.update({f"last_{k}": v for k, v in self.last_step.items()})
        return out


def merge_costs(client: CostMeter, server: CostMeter) -> dict[str, float]:
    """One dict for a run report: phases from both parties, bytes up/down (totals)."""
    return {
        "steps": float(max(client.steps, server.steps)),
        "enc_s": client.total["enc_s"],
        "server_s": server.total["server_s"],
        "dec_s": client.total["dec_s"],
        "client_s": client.total["client_s"],
        "bytes_up": client.total["bytes_sent"],
        "bytes_down": client.total["bytes_received"],
        "ciphertexts_up": client.total["ciphertexts_sent"],
        "ciphertexts_down": client.total["ciphertexts_received"],
    }
