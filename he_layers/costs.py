"""Per-step cost accounting: seconds per phase, bytes and messages each way, HE op counts."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from syft_split.errors import ValidationError

__all__ = ["CostMeter", "merge_costs", "COST_KEYS", "OP_KEYS"]

#: Homomorphic operations (model owner): ``rotations`` are the key switches (there are no
#: relinearizations: no ciphertext x ciphertext product), ``keyswitches_min`` the fewest
#: rotations the packing needs (see :meth:`Layout.min_keyswitches`).
OP_KEYS = ("rotations", "relinearizations", "keyswitches_min", "multiplications", "encodes",
           "rescales", "additions")

#: Every key of a :class:`CostMeter`.
COST_KEYS = ("enc_s", "dec_s", "ser_s", "client_s", "server_s", "bytes_sent", "bytes_received",
             "ciphertexts_sent", "ciphertexts_received", "messages_sent", "messages_received",
             *OP_KEYS)


class CostMeter:
    """Accumulates one party's costs, per step and in total.

    Seconds: ``enc_s`` (encode+encrypt), ``dec_s`` (decrypt+decode), ``ser_s`` (SEAL
    (de)serialization and message framing), ``client_s`` (other data-owner work: unfolding,
    masks, share updates), ``server_s`` (model-owner HE compute). Traffic:
    ``bytes_sent``/``bytes_received``, ``ciphertexts_*``, ``messages_*``. HE operations:
    :data:`OP_KEYS` (model owner).
    """

    def __init__(self) -> None:
        self.steps = 0
        self.total: dict[str, float] = dict.fromkeys(COST_KEYS, 0.0)
        self.last_step: dict[str, float] = dict.fromkeys(COST_KEYS, 0.0)

    def begin_step(self) -> None:
        """Start a new step (the previous one stays in ``total``)."""
        self.steps += 1
        self.last_step = dict.fromkeys(COST_KEYS, 0.0)

    def add(self, key: str, value: float) -> None:
        """Add ``value`` to ``key`` for the current step and the total."""
        self.last_step[key] += value
        self.total[key] += value

    def add_counts(self, counts: Mapping[str, float]) -> None:
        """Add several counters at once (e.g. the evaluator's op counts of a product)."""
        for key, value in counts.items():
            self.add(key, float(value))

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Time the ``with`` body into ``key``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(key, time.perf_counter() - t0)

    def state(self) -> dict[str, Any]:
        """The totals and the step count, to outlive this meter (e.g. a restart)."""
        return {"steps": self.steps, "total": dict(self.total)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state` (the last step's figures start empty).

        Raises:
            ValidationError: an unknown key, or a count that is not finite and >= 0 (nothing
                loaded).
        """
        steps, total = state.get("steps"), state.get("total")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValidationError(f"cost meter: expected a step count >= 0, got {steps!r}")
        if not isinstance(total, Mapping) or not set(total) <= set(COST_KEYS):
            raise ValidationError(f"cost meter: expected totals keyed by {COST_KEYS}, "
                                  f"got {sorted(total) if isinstance(total, Mapping) else total!r}")
        values = {}
        for k, v in total.items():
            if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                    or v < 0):
                raise ValidationError(f"cost meter: {k!r} must be finite and >= 0, got {v!r}")
            values[k] = float(v)
        self.steps = steps
        self.total = {**dict.fromkeys(COST_KEYS, 0.0), **values}
        self.last_step = dict.fromkeys(COST_KEYS, 0.0)

    def as_dict(self) -> dict[str, float]:
        """``{"steps": n, "<key>": total, "last_<key>": last step}``."""
        out: dict[str, float] = {"steps": float(self.steps)}
        out.update(self.total)
        out.update({f"last_{k}": v for k, v in self.last_step.items()})
        return out


def merge_costs(client: CostMeter, server: CostMeter) -> dict[str, float]:
    """One dict for a run report: phases from both parties, bytes up/down (totals)."""
    out = {
        "steps": float(max(client.steps, server.steps)),
        "enc_s": client.total["enc_s"],
        "server_s": server.total["server_s"],
        "dec_s": client.total["dec_s"],
        "client_s": client.total["client_s"],
        "client_ser_s": client.total["ser_s"],
        "server_ser_s": server.total["ser_s"],
        "bytes_up": client.total["bytes_sent"],
        "bytes_down": client.total["bytes_received"],
        "ciphertexts_up": client.total["ciphertexts_sent"],
        "ciphertexts_down": client.total["ciphertexts_received"],
        "messages": client.total["messages_sent"] + client.total["messages_received"],
    }
    out.update({k: server.total[k] for k in OP_KEYS})
    return out
